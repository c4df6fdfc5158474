//! The 23 wards as a 6×6 tile map, each tile coloured by the ward's level.

use std::rc::Rc;

use renkei_shared::Ward;
use yew::prelude::*;

use super::age_text;
use crate::i18n::{Label, Lang, level_class, ward_name};
use crate::route::Route;
use crate::state::{Snapshot, WardRow};

/// Side of the tile map, in tiles (the CSS grid in style.css has as many tracks).
#[cfg(test)]
const GRID: u8 = 6;

/// The CSS grid placement of a ward's tile (lines are 1-based).
pub fn grid_area(ward: &Ward) -> String {
    format!(
        "grid-row: {}; grid-column: {};",
        ward.tile_row + 1,
        ward.tile_col + 1
    )
}

#[derive(Debug, Properties, PartialEq)]
pub struct TileProps {
    pub lang: Lang,
    pub row: WardRow,
    /// HQ cannot reach this ward's office now: its sites' state is unknown.
    #[prop_or_default]
    pub cut_off: bool,
}

/// One ward's tile: name, evacuees / capacity, silent sites, age of the freshest report.
#[component]
pub fn WardTile(props: &TileProps) -> Html {
    let TileProps { lang, row, cut_off } = props;
    let lang = *lang;
    let f = &row.figures;
    let code = row.ward.code;
    let state = if *cut_off {
        Some("cut-off")
    } else {
        row.all_silent.then_some("stale")
    };
    html! {
        <a
            class={classes!("tile", level_class(row.level), state)}
            data-ward={code.to_string()}
            data-line={if *cut_off { "down" } else { "up" }}
            href={Route::Ward(code).hash()}
            style={grid_area(row.ward)}
        >
            <span class="tile-name">{ ward_name(row.ward, lang) }</span>
            <span class="tile-evacuees" data-field="evacuees">
                { format!("{} / {}", f.evacuees, f.capacity) }
            </span>
            if *cut_off {
                <span class="tile-silent" data-field="silent" data-unknown="true">
                    { lang.pick("区本部と通信途絶", "office cut off") }
                </span>
            } else if f.silent > 0 {
                <span class="tile-silent" data-field="silent">
                    { format!("{} {}", Label::Silent.text(lang), f.silent) }
                </span>
            }
            <span class="tile-age" data-field="age">{ age_text(row.newest, lang) }</span>
        </a>
    }
}

#[derive(Debug, Properties, PartialEq)]
pub struct WardMapProps {
    pub lang: Lang,
    pub snapshot: Rc<Snapshot>,
    /// Wards whose ward office HQ cannot reach now ([`crate::links`]).
    #[prop_or_default]
    pub cut_off: Rc<Vec<renkei_shared::WardCode>>,
}

#[component]
pub fn WardMap(props: &WardMapProps) -> Html {
    let lang = props.lang;
    html! {
        <section class="map-section">
            <h2>{ Label::Map.text(lang) }</h2>
            <div id="ward-map" role="list">
                { for props.snapshot.rows.iter().map(|row| {
                    let cut_off = props.cut_off.contains(&row.ward.code);
                    html! { <WardTile key={row.ward.code.0} {lang} row={row.clone()} {cut_off} /> }
                }) }
            </div>
        </section>
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use renkei_shared::WARDS;

    use super::*;

    #[test]
    fn every_ward_has_its_own_tile_inside_the_grid() {
        let places: BTreeSet<(u8, u8)> = WARDS.iter().map(|w| (w.tile_row, w.tile_col)).collect();
        assert_eq!(places.len(), WARDS.len(), "two wards share a tile");
        assert!(places.iter().all(|&(r, c)| r < GRID && c < GRID));
        let shinjuku = WARDS.iter().find(|w| w.code.0 == 131041).unwrap();
        assert_eq!(
            grid_area(shinjuku),
            format!(
                "grid-row: {}; grid-column: {};",
                shinjuku.tile_row + 1,
                shinjuku.tile_col + 1
            )
        );
    }
}
