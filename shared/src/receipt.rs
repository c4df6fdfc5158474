//! Receipts: HQ's word to a site that its messages are on disk at HQ.
//!
//! ```text
//! renkei/receipt/v1/{ward}/{site}      HQ → agent, QoS 1, not retained
//! [ SCHEMA_VERSION: u8 ][ postcard(Receipt) ]
//! ```
//!
//! An MQTT PUBACK says only that the broker's router took a message; the broker's recorder
//! commits it to its database up to a batch later, so a broker killed in that window has
//! acknowledged a message it never kept. An agent therefore keeps every record in its outbox
//! until a receipt names it, and sends again whatever got a PUBACK but no receipt (the
//! recorder keeps one row per `(origin, boot, seq)`, so a second copy changes nothing). The
//! broker publishes a receipt after every committed batch, for every site in it, naming the
//! `(boot, seq)` of each of that site's messages now stored, redeliveries included.
//!
//! Receipts live outside `renkei/v1/`, so the broker's ingest, dashboards and integrators never
//! see them; only the broker publishes there.

use serde::{Deserialize, Serialize};

use crate::codec::{CodecError, SCHEMA_VERSION};
use crate::model::SiteRef;
use crate::ward::WardCode;

/// The root of the receipt tree.
pub const RECEIPT_ROOT: &str = "renkei/receipt/v1";

/// Ranges in one receipt, at most: a receipt stays a few KiB, far inside [`MAX_FRAME`](crate::codec::MAX_FRAME) (a
/// range is at most 25 bytes of postcard).
pub const MAX_RANGES: usize = 256;

/// The topic HQ sends `site`'s receipts on, which is also the filter its agent subscribes to.
pub fn receipt_topic(site: &SiteRef) -> String {
    format!("{RECEIPT_ROOT}/{}/{}", site.ward, site.site)
}

/// The filter of every receipt of `ward`'s sites: what a ward broker's uplink subscribes to at
/// HQ.
pub fn receipt_ward_filter(ward: WardCode) -> String {
    format!("{RECEIPT_ROOT}/{ward}/+")
}

/// The site whose receipt topic this is, if it is one (exactly `renkei/receipt/v1/{ward}/{site}`).
pub fn parse_receipt_topic(topic: &str) -> Option<SiteRef> {
    let (ward, site) = topic
        .strip_prefix(RECEIPT_ROOT)?
        .strip_prefix('/')?
        .split_once('/')?;
    // The command topic has the same two levels: its parser checks them.
    match crate::topic::Topic::parse(&format!("{}/cmd/{ward}/{site}", crate::topic::ROOT)) {
        Ok(crate::topic::Topic::Command { site }) => Some(site),
        _ => None,
    }
}

/// Consecutive sequence numbers of one boot, `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    pub boot: u32,
    pub first: u64,
    pub last: u64,
}

/// The messages of one site that HQ has stored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Receipt {
    pub recorded: Vec<SeqRange>,
}

/// Why bytes are not a receipt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("receipt has {0} ranges, more than {MAX_RANGES}")]
    TooManyRanges(usize),
    #[error("receipt range {first}..={last} runs backwards")]
    Backwards { first: u64, last: u64 },
}

impl Receipt {
    /// Receipts naming exactly `keys` (`(boot, seq)`, in any order, repeats allowed): sorted,
    /// consecutive seqs merged into ranges, split so that none holds more than [`MAX_RANGES`].
    pub fn of_keys(keys: impl IntoIterator<Item = (u32, u64)>) -> Vec<Receipt> {
        let mut keys: Vec<(u32, u64)> = keys.into_iter().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut ranges: Vec<SeqRange> = Vec::new();
        for (boot, seq) in keys {
            match ranges.last_mut() {
                Some(r) if r.boot == boot && r.last.checked_add(1) == Some(seq) => r.last = seq,
                _ => ranges.push(SeqRange {
                    boot,
                    first: seq,
                    last: seq,
                }),
            }
        }
        ranges
            .chunks(MAX_RANGES)
            .map(|chunk| Receipt {
                recorded: chunk.to_vec(),
            })
            .collect()
    }

    /// Whether this receipt names `(boot, seq)`.
    pub fn covers(&self, boot: u32, seq: u64) -> bool {
        self.recorded
            .iter()
            .any(|r| r.boot == boot && (r.first..=r.last).contains(&seq))
    }

    /// How many messages this receipt names.
    pub fn count(&self) -> u64 {
        self.recorded
            .iter()
            .map(|r| (r.last - r.first).saturating_add(1))
            .fold(0, u64::saturating_add)
    }

    /// The wire form: the schema version byte, then postcard.
    pub fn encode(&self) -> Result<Vec<u8>, ReceiptError> {
        self.check()?;
        let out = postcard::to_extend(self, vec![SCHEMA_VERSION])
            .map_err(|e| ReceiptError::Codec(CodecError::Encode(e)))?;
        Ok(out)
    }

    /// Reads a receipt, refusing anything malformed, oversize, or with a range that runs
    /// backwards.
    pub fn decode(bytes: &[u8]) -> Result<Receipt, ReceiptError> {
        let receipt: Receipt = crate::codec::unframe(bytes)?;
        receipt.check()?;
        Ok(receipt)
    }

    fn check(&self) -> Result<(), ReceiptError> {
        if self.recorded.len() > MAX_RANGES {
            return Err(ReceiptError::TooManyRanges(self.recorded.len()));
        }
        match self.recorded.iter().find(|r| r.first > r.last) {
            Some(r) => Err(ReceiptError::Backwards {
                first: r.first,
                last: r.last,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MAX_FRAME;
    use crate::model::Id;
    use crate::ward::WardCode;

    #[test]
    fn keys_merge_into_ranges_per_boot() {
        let receipts = Receipt::of_keys([(2, 1), (1, 7), (1, 5), (1, 6), (1, 9), (2, 2), (1, 6)]);
        assert_eq!(
            receipts,
            vec![Receipt {
                recorded: vec![
                    SeqRange {
                        boot: 1,
                        first: 5,
                        last: 7
                    },
                    SeqRange {
                        boot: 1,
                        first: 9,
                        last: 9
                    },
                    SeqRange {
                        boot: 2,
                        first: 1,
                        last: 2
                    },
                ]
            }]
        );
        let r = &receipts[0];
        assert!(r.covers(1, 6) && r.covers(1, 9) && r.covers(2, 2));
        assert!(!r.covers(1, 8) && !r.covers(2, 5) && !r.covers(3, 1));
        assert_eq!(r.count(), 6);
        assert!(Receipt::of_keys([]).is_empty());
    }

    #[test]
    fn large_sets_split_and_every_piece_fits_a_frame() {
        // Every other seq: no two merge, the worst case.
        let keys: Vec<(u32, u64)> = (0..1000u64).map(|i| (u32::MAX, u64::MAX - 2 * i)).collect();
        let receipts = Receipt::of_keys(keys.clone());
        assert_eq!(receipts.len(), 4);
        for r in &receipts {
            let bytes = r.encode().unwrap();
            assert!(bytes.len() < MAX_FRAME, "{} bytes", bytes.len());
            assert_eq!(&Receipt::decode(&bytes).unwrap(), r);
        }
        assert!(
            keys.iter()
                .all(|&(b, s)| receipts.iter().any(|r| r.covers(b, s)))
        );
    }

    #[test]
    fn bad_bytes_are_refused_with_a_reason() {
        let good = Receipt::of_keys([(1, 1)]).remove(0).encode().unwrap();
        assert!(matches!(
            Receipt::decode(&[]),
            Err(ReceiptError::Codec(CodecError::Empty))
        ));
        let mut other_version = good.clone();
        other_version[0] = 9;
        assert!(matches!(
            Receipt::decode(&other_version),
            Err(ReceiptError::Codec(CodecError::UnsupportedVersion(9)))
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            Receipt::decode(&trailing),
            Err(ReceiptError::Codec(CodecError::TrailingBytes(1)))
        ));
        assert!(Receipt::decode(&good[..good.len() - 1]).is_err());
        let backwards = Receipt {
            recorded: vec![SeqRange {
                boot: 1,
                first: 5,
                last: 4,
            }],
        };
        assert!(backwards.encode().is_err());
        let mut bytes = vec![SCHEMA_VERSION];
        bytes = postcard::to_extend(&backwards, bytes).unwrap();
        assert!(matches!(
            Receipt::decode(&bytes),
            Err(ReceiptError::Backwards { first: 5, last: 4 })
        ));
        // A length prefix claiming far more ranges than the bytes hold.
        let mut huge = vec![SCHEMA_VERSION];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Receipt::decode(&huge).is_err());
        assert!(Receipt::decode(&vec![SCHEMA_VERSION; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn topic_names_the_site() {
        let site = SiteRef {
            ward: WardCode(131041),
            site: Id::new("nishi-shinjuku-es").unwrap(),
        };
        assert_eq!(
            receipt_topic(&site),
            "renkei/receipt/v1/131041/nishi-shinjuku-es"
        );
        assert!(!receipt_topic(&site).starts_with(crate::topic::ROOT));
        assert_eq!(parse_receipt_topic(&receipt_topic(&site)), Some(site));
        for not_one in [
            "renkei/receipt/v1/131041",
            "renkei/receipt/v1/131041/+",
            "renkei/receipt/v1/131041/a/b",
            "renkei/receipt/v1/999999/a",
            "renkei/v1/cmd/131041/a",
        ] {
            assert_eq!(parse_receipt_topic(not_one), None, "{not_one}");
        }
    }
}
