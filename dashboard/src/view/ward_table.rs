use std::rc::Rc;

use yew::prelude::*;

use super::age_text;
use crate::i18n::{Label, Lang, level_class, ward_name};
use crate::route::Route;
use crate::services;
use crate::state::{Figures, Snapshot, WardRow};

/// A numeric column: its `data-field` key, headings, and where its value comes from.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub field: &'static str,
    ja: &'static str,
    en: &'static str,
    value: fn(&Figures) -> u64,
}

impl Column {
    pub fn heading(&self, lang: Lang) -> &'static str {
        lang.pick(self.ja, self.en)
    }
}

/// The columns in display order. Tests read cells by `data-field`, so keys are stable.
pub const COLUMNS: [Column; 10] = [
    Column {
        field: "sites",
        ja: "拠点",
        en: "Sites",
        value: |f| f.sites,
    },
    Column {
        field: "reporting",
        ja: "報告中",
        en: "Reporting",
        value: |f| f.reporting,
    },
    Column {
        field: "shelters_open",
        ja: "開設避難所",
        en: "Open shelters",
        value: |f| f.shelters_open,
    },
    Column {
        field: "evacuees",
        ja: "避難者数",
        en: "Evacuees",
        value: |f| f.evacuees,
    },
    Column {
        field: "capacity",
        ja: "収容人数",
        en: "Capacity",
        value: |f| f.capacity,
    },
    Column {
        field: "care_needed",
        ja: "要配慮者",
        en: "Needing care",
        value: |f| f.care_needed,
    },
    Column {
        field: "open_requests",
        ja: "未完了要請",
        en: "Open requests",
        value: |f| f.open_requests,
    },
    Column {
        field: "incidents",
        ja: "被害報告",
        en: "Incidents",
        value: |f| f.incidents,
    },
    Column {
        field: "silent",
        ja: "途絶",
        en: "Silent",
        value: |f| f.silent,
    },
    Column {
        field: "outbox_alarms",
        ja: "送信待ち満杯",
        en: "Outbox full",
        value: |f| f.outbox_alarms,
    },
];

/// Columns whose every non-zero value needs someone to act: the cell is flagged.
const ATTENTION: [&str; 2] = ["silent", "outbox_alarms"];

#[derive(Debug, Properties, PartialEq)]
pub struct WardTableProps {
    pub lang: Lang,
    pub snapshot: Rc<Snapshot>,
    /// Wards whose ward office HQ cannot reach now ([`crate::links`]).
    #[prop_or_default]
    pub cut_off: Rc<Vec<renkei_shared::WardCode>>,
}

/// The figures' cells; with the ward's office cut off, its silence is unknown, not counted.
fn cells(figures: &Figures, cut_off: bool, lang: Lang) -> Html {
    COLUMNS
        .iter()
        .map(|c| {
            let value = (c.value)(figures);
            if cut_off && c.field == "silent" {
                return html! {
                    <td data-field={c.field} data-unknown="true" class="unknown">
                        { lang.pick("不明", "unknown") }
                    </td>
                };
            }
            let class = (ATTENTION.contains(&c.field) && value > 0).then_some("attention");
            html! { <td data-field={c.field} class={classes!(class)}>{ value }</td> }
        })
        .collect()
}

#[derive(Debug, Properties, PartialEq)]
pub struct WardRowProps {
    pub lang: Lang,
    pub row: WardRow,
    /// HQ cannot reach this ward's office now.
    #[prop_or_default]
    pub cut_off: bool,
}

/// One ward's row; re-renders only when its own figures (or the language) change.
#[component]
pub fn WardRowView(props: &WardRowProps) -> Html {
    let WardRowProps { lang, row, cut_off } = props;
    let code = row.ward.code;
    let open = Callback::from(move |_: MouseEvent| services::go(Route::Ward(code)));
    let state = if *cut_off {
        Some("cut-off")
    } else {
        row.all_silent.then_some("stale")
    };
    html! {
        <tr
            data-ward={code.to_string()}
            data-line={if *cut_off { "down" } else { "up" }}
            class={classes!(level_class(row.level), state)}
            onclick={open}
        >
            <th scope="row" data-field="name">
                <a href={Route::Ward(code).hash()}>{ ward_name(row.ward, *lang) }</a>
            </th>
            { cells(&row.figures, *cut_off, *lang) }
            <td data-field="age">{ age_text(row.newest, *lang) }</td>
        </tr>
    }
}

/// One row per ward (all 23) of the viewed world, and a totals row.
#[component]
pub fn WardTable(props: &WardTableProps) -> Html {
    let lang = props.lang;
    let rows = props.snapshot.rows.iter().map(|row| {
        let cut_off = props.cut_off.contains(&row.ward.code);
        html! { <WardRowView key={row.ward.code.0} {lang} row={row.clone()} {cut_off} /> }
    });
    html! {
        <table id="wards">
            <thead>
                <tr>
                    <th scope="col">{ Label::Ward.text(lang) }</th>
                    { for COLUMNS.iter().map(|c| html! { <th scope="col" data-field={c.field}>{ c.heading(lang) }</th> }) }
                    <th scope="col" data-field="age">{ Label::Updated.text(lang) }</th>
                </tr>
            </thead>
            <tbody>{ for rows }</tbody>
            <tfoot>
                <tr id="totals">
                    <th scope="row" data-field="name">{ Label::Total.text(lang) }</th>
                    { cells(&props.snapshot.totals, false, lang) }
                    <td data-field="age"></td>
                </tr>
            </tfoot>
        </table>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_have_distinct_keys_and_two_headings() {
        let f = Figures {
            sites: 1,
            reporting: 2,
            shelters_open: 3,
            evacuees: 4,
            capacity: 5,
            care_needed: 6,
            open_requests: 7,
            incidents: 8,
            silent: 9,
            outbox_alarms: 10,
        };
        let values: Vec<u64> = COLUMNS.iter().map(|c| (c.value)(&f)).collect();
        assert_eq!(values, (1..=10).collect::<Vec<_>>());
        for c in COLUMNS {
            assert_ne!(c.heading(Lang::Ja), c.heading(Lang::En));
        }
    }
}
