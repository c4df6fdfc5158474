//! The 23 special wards (特別区) of Tokyo and their official local-government codes.
//!
//! The table mirrors `shared/data/wards.csv` (a test keeps the two equal). A [`WardCode`] is the
//! six-digit official code with its check digit (全国地方公共団体コード, e.g. 131041 新宿区); the
//! five-digit form without the check digit is accepted when parsing text.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// A ward's six-digit official code, e.g. `131041` for Shinjuku.
///
/// Any `u32` can be held (it arrives from the network); [`WardCode::ward`] tells whether it is one
/// of the 23, and validation refuses messages whose code is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct WardCode(
    #[cfg_attr(feature = "schema", schemars(range(min = 131016, max = 131237)))] pub u32,
);

impl WardCode {
    /// The ward this code names, if it is one of the 23.
    pub fn ward(self) -> Option<&'static Ward> {
        WARDS.iter().find(|w| w.code == self)
    }

    /// Whether the code is one of the 23 special wards.
    pub fn is_known(self) -> bool {
        self.ward().is_some()
    }

    /// The five-digit form (without check digit), e.g. `13104`.
    pub fn code5(self) -> u32 {
        self.0 / 10
    }

    /// The check digit of a five-digit local-government code (mod 11, weights 6-5-4-3-2).
    pub fn check_digit(code5: u32) -> u32 {
        let digits = [
            code5 / 10_000 % 10,
            code5 / 1_000 % 10,
            code5 / 100 % 10,
            code5 / 10 % 10,
            code5 % 10,
        ];
        let sum: u32 = digits.iter().zip([6, 5, 4, 3, 2]).map(|(d, w)| d * w).sum();
        // 11 − remainder, keeping the last digit: a remainder of 0 gives 1, of 1 gives 0.
        (11 - sum % 11) % 10
    }
}

impl fmt::Display for WardCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06}", self.0)
    }
}

/// Why a text is not a ward code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WardCodeError {
    /// Not five or six ASCII digits.
    #[error("ward code {0:?} is not 5 or 6 digits")]
    NotDigits(String),
    /// Six digits whose last is not the check digit of the first five.
    #[error("ward code {0:?} has a wrong check digit")]
    CheckDigit(String),
    /// A well-formed code that is not one of Tokyo's 23 special wards.
    #[error("ward code {0:?} is not one of the 23 special wards")]
    Unknown(String),
}

impl FromStr for WardCode {
    type Err = WardCodeError;

    /// Parses `131041` or `13104`; only the 23 special wards are accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(s.len() == 5 || s.len() == 6) || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WardCodeError::NotDigits(s.into()));
        }
        let n: u32 = s.parse().map_err(|_| WardCodeError::NotDigits(s.into()))?;
        let code = if s.len() == 5 {
            WardCode(n * 10 + WardCode::check_digit(n))
        } else {
            if n % 10 != WardCode::check_digit(n / 10) {
                return Err(WardCodeError::CheckDigit(s.into()));
            }
            WardCode(n)
        };
        if code.is_known() {
            Ok(code)
        } else {
            Err(WardCodeError::Unknown(s.into()))
        }
    }
}

/// One special ward: its names, office location, place on the schematic map and shelter plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ward {
    pub code: WardCode,
    pub name_ja: &'static str,
    pub name_en: &'static str,
    pub name_kana: &'static str,
    /// Ward office latitude in micro-degrees (WGS84, ~100 m).
    pub office_lat_e6: i32,
    /// Ward office longitude in micro-degrees.
    pub office_lon_e6: i32,
    /// Row in the 6×6 tile map (0 is north).
    pub tile_row: u8,
    /// Column in the 6×6 tile map (0 is west).
    pub tile_col: u8,
    /// Designated shelters (NHK survey, January 2024).
    pub shelters_2024: u32,
    /// Their planned capacity in people, where published.
    pub shelter_capacity_2024: Option<u32>,
}

/// The 23 special wards, in official code order.
pub static WARDS: [Ward; 23] = [
    Ward {
        code: WardCode(131016),
        name_ja: "千代田区",
        name_en: "Chiyoda",
        name_kana: "ちよだく",
        office_lat_e6: 35694000,
        office_lon_e6: 139753600,
        tile_row: 2,
        tile_col: 3,
        shelters_2024: 16,
        shelter_capacity_2024: Some(19320),
    },
    Ward {
        code: WardCode(131024),
        name_ja: "中央区",
        name_en: "Chuo",
        name_kana: "ちゅうおうく",
        office_lat_e6: 35670600,
        office_lon_e6: 139772000,
        tile_row: 3,
        tile_col: 3,
        shelters_2024: 23,
        shelter_capacity_2024: Some(43855),
    },
    Ward {
        code: WardCode(131032),
        name_ja: "港区",
        name_en: "Minato",
        name_kana: "みなとく",
        office_lat_e6: 35658100,
        office_lon_e6: 139751500,
        tile_row: 3,
        tile_col: 2,
        shelters_2024: 58,
        shelter_capacity_2024: Some(41530),
    },
    Ward {
        code: WardCode(131041),
        name_ja: "新宿区",
        name_en: "Shinjuku",
        name_kana: "しんじゅくく",
        office_lat_e6: 35693800,
        office_lon_e6: 139703500,
        tile_row: 2,
        tile_col: 2,
        shelters_2024: 51,
        shelter_capacity_2024: Some(29805),
    },
    Ward {
        code: WardCode(131059),
        name_ja: "文京区",
        name_en: "Bunkyo",
        name_kana: "ぶんきょうく",
        office_lat_e6: 35708000,
        office_lon_e6: 139752200,
        tile_row: 1,
        tile_col: 3,
        shelters_2024: 36,
        shelter_capacity_2024: Some(39335),
    },
    Ward {
        code: WardCode(131067),
        name_ja: "台東区",
        name_en: "Taito",
        name_kana: "たいとうく",
        office_lat_e6: 35712600,
        office_lon_e6: 139780000,
        tile_row: 2,
        tile_col: 4,
        shelters_2024: 43,
        shelter_capacity_2024: Some(50774),
    },
    Ward {
        code: WardCode(131075),
        name_ja: "墨田区",
        name_en: "Sumida",
        name_kana: "すみだく",
        office_lat_e6: 35710700,
        office_lon_e6: 139801500,
        tile_row: 2,
        tile_col: 5,
        shelters_2024: 39,
        shelter_capacity_2024: Some(56447),
    },
    Ward {
        code: WardCode(131083),
        name_ja: "江東区",
        name_en: "Koto",
        name_kana: "こうとうく",
        office_lat_e6: 35673000,
        office_lon_e6: 139817000,
        tile_row: 3,
        tile_col: 4,
        shelters_2024: 194,
        shelter_capacity_2024: Some(154530),
    },
    Ward {
        code: WardCode(131091),
        name_ja: "品川区",
        name_en: "Shinagawa",
        name_kana: "しながわく",
        office_lat_e6: 35609200,
        office_lon_e6: 139730200,
        tile_row: 4,
        tile_col: 2,
        shelters_2024: 52,
        shelter_capacity_2024: Some(90000),
    },
    Ward {
        code: WardCode(131105),
        name_ja: "目黒区",
        name_en: "Meguro",
        name_kana: "めぐろく",
        office_lat_e6: 35641400,
        office_lon_e6: 139698200,
        tile_row: 4,
        tile_col: 1,
        shelters_2024: 110,
        shelter_capacity_2024: Some(57500),
    },
    Ward {
        code: WardCode(131113),
        name_ja: "大田区",
        name_en: "Ota",
        name_kana: "おおたく",
        office_lat_e6: 35561300,
        office_lon_e6: 139716000,
        tile_row: 5,
        tile_col: 1,
        shelters_2024: 217,
        shelter_capacity_2024: Some(210000),
    },
    Ward {
        code: WardCode(131121),
        name_ja: "世田谷区",
        name_en: "Setagaya",
        name_kana: "せたがやく",
        office_lat_e6: 35646400,
        office_lon_e6: 139653300,
        tile_row: 3,
        tile_col: 0,
        shelters_2024: 95,
        shelter_capacity_2024: None,
    },
    Ward {
        code: WardCode(131130),
        name_ja: "渋谷区",
        name_en: "Shibuya",
        name_kana: "しぶやく",
        office_lat_e6: 35664000,
        office_lon_e6: 139698200,
        tile_row: 3,
        tile_col: 1,
        shelters_2024: 33,
        shelter_capacity_2024: None,
    },
    Ward {
        code: WardCode(131148),
        name_ja: "中野区",
        name_en: "Nakano",
        name_kana: "なかのく",
        office_lat_e6: 35707400,
        office_lon_e6: 139663800,
        tile_row: 2,
        tile_col: 1,
        shelters_2024: 43,
        shelter_capacity_2024: Some(50200),
    },
    Ward {
        code: WardCode(131156),
        name_ja: "杉並区",
        name_en: "Suginami",
        name_kana: "すぎなみく",
        office_lat_e6: 35699500,
        office_lon_e6: 139636400,
        tile_row: 2,
        tile_col: 0,
        shelters_2024: 65,
        shelter_capacity_2024: Some(98198),
    },
    Ward {
        code: WardCode(131164),
        name_ja: "豊島区",
        name_en: "Toshima",
        name_kana: "としまく",
        office_lat_e6: 35726300,
        office_lon_e6: 139716500,
        tile_row: 1,
        tile_col: 2,
        shelters_2024: 35,
        shelter_capacity_2024: Some(28528),
    },
    Ward {
        code: WardCode(131172),
        name_ja: "北区",
        name_en: "Kita",
        name_kana: "きたく",
        office_lat_e6: 35752800,
        office_lon_e6: 139733600,
        tile_row: 0,
        tile_col: 3,
        shelters_2024: 57,
        shelter_capacity_2024: Some(136391),
    },
    Ward {
        code: WardCode(131181),
        name_ja: "荒川区",
        name_en: "Arakawa",
        name_kana: "あらかわく",
        office_lat_e6: 35736100,
        office_lon_e6: 139783400,
        tile_row: 1,
        tile_col: 4,
        shelters_2024: 37,
        shelter_capacity_2024: Some(140714),
    },
    Ward {
        code: WardCode(131199),
        name_ja: "板橋区",
        name_en: "Itabashi",
        name_kana: "いたばしく",
        office_lat_e6: 35751200,
        office_lon_e6: 139709300,
        tile_row: 0,
        tile_col: 2,
        shelters_2024: 87,
        shelter_capacity_2024: Some(70993),
    },
    Ward {
        code: WardCode(131202),
        name_ja: "練馬区",
        name_en: "Nerima",
        name_kana: "ねりまく",
        office_lat_e6: 35735600,
        office_lon_e6: 139651700,
        tile_row: 1,
        tile_col: 1,
        shelters_2024: 98,
        shelter_capacity_2024: Some(78200),
    },
    Ward {
        code: WardCode(131211),
        name_ja: "足立区",
        name_en: "Adachi",
        name_kana: "あだちく",
        office_lat_e6: 35775000,
        office_lon_e6: 139804400,
        tile_row: 0,
        tile_col: 4,
        shelters_2024: 120,
        shelter_capacity_2024: Some(153826),
    },
    Ward {
        code: WardCode(131229),
        name_ja: "葛飾区",
        name_en: "Katsushika",
        name_kana: "かつしかく",
        office_lat_e6: 35743400,
        office_lon_e6: 139847200,
        tile_row: 1,
        tile_col: 5,
        shelters_2024: 77,
        shelter_capacity_2024: Some(84579),
    },
    Ward {
        code: WardCode(131237),
        name_ja: "江戸川区",
        name_en: "Edogawa",
        name_kana: "えどがわく",
        office_lat_e6: 35706800,
        office_lon_e6: 139868300,
        tile_row: 3,
        tile_col: 5,
        shelters_2024: 112,
        shelter_capacity_2024: Some(152959),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The table must say what the checked-in reference CSV says.
    #[test]
    fn table_matches_reference_csv() {
        let csv = include_str!("../data/wards.csv");
        let mut lines = csv.lines();
        let header = lines.next().unwrap();
        assert!(header.starts_with("code6,code5,name_ja"));
        let rows: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(rows.len(), WARDS.len());
        for (row, ward) in rows.iter().zip(WARDS.iter()) {
            let f: Vec<&str> = row.split(',').collect();
            assert_eq!(f[0].parse::<u32>().unwrap(), ward.code.0);
            assert_eq!(f[1].parse::<u32>().unwrap(), ward.code.code5());
            assert_eq!(f[2], ward.name_ja);
            assert_eq!(f[3], ward.name_en);
            assert_eq!(f[4], ward.name_kana);
            let lat: f64 = f[5].parse().unwrap();
            assert_eq!((lat * 1e6).round() as i32, ward.office_lat_e6);
            assert_eq!(f[7].parse::<u8>().unwrap(), ward.tile_row);
            assert_eq!(f[8].parse::<u8>().unwrap(), ward.tile_col);
            assert_eq!(f[9].parse::<u32>().unwrap(), ward.shelters_2024);
            assert_eq!(f[10].parse::<u32>().ok(), ward.shelter_capacity_2024);
        }
        assert_eq!(WARDS.iter().map(|w| w.shelters_2024).sum::<u32>(), 1698);
    }

    #[test]
    fn every_code_carries_its_check_digit() {
        for w in &WARDS {
            assert_eq!(
                w.code.0 % 10,
                WardCode::check_digit(w.code.code5()),
                "{}",
                w.name_en
            );
        }
    }

    #[test]
    fn parses_five_and_six_digit_forms() {
        assert_eq!("131041".parse::<WardCode>(), Ok(WardCode(131041)));
        assert_eq!("13104".parse::<WardCode>(), Ok(WardCode(131041)));
        assert_eq!(WardCode(131041).ward().unwrap().name_ja, "新宿区");
        assert!(matches!(
            "131042".parse::<WardCode>(),
            Err(WardCodeError::CheckDigit(_))
        ));
        // Hachioji: a real code, but not a special ward.
        assert!(matches!(
            "132012".parse::<WardCode>(),
            Err(WardCodeError::Unknown(_))
        ));
        assert!(matches!(
            "13x04".parse::<WardCode>(),
            Err(WardCodeError::NotDigits(_))
        ));
        assert!(matches!(
            "".parse::<WardCode>(),
            Err(WardCodeError::NotDigits(_))
        ));
    }

    #[test]
    fn tiles_do_not_overlap() {
        let mut seen = std::collections::HashSet::new();
        for w in &WARDS {
            assert!(w.tile_row < 6 && w.tile_col < 6);
            assert!(
                seen.insert((w.tile_row, w.tile_col)),
                "{} overlaps",
                w.name_en
            );
        }
    }
}
