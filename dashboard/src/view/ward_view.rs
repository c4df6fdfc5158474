//! One ward's view: its shelters (sortable, filterable), stock, supply requests and incidents.

use std::rc::Rc;

use renkei_shared::{DamageCounts, WardCode};
use web_sys::HtmlInputElement;
use yew::prelude::*;

use super::{age_text, figure};
use crate::detail::{ShelterRow, SortKey, WardDetail, sort_and_filter};
use crate::i18n::{self, Label, Lang, ward_name};
use crate::route::Route;

#[derive(Debug, Properties, PartialEq)]
pub struct ShelterRowProps {
    pub lang: Lang,
    pub row: ShelterRow,
}

/// One shelter; greyed out when its site has gone quiet, flagged when its agent dropped.
#[component]
pub fn ShelterRowView(props: &ShelterRowProps) -> Html {
    let ShelterRowProps { lang, row } = props;
    let lang = *lang;
    let f = &row.freshness;
    let flag = if f.dead {
        Some(Label::Offline)
    } else if f.stale {
        Some(Label::Stale)
    } else {
        None
    };
    html! {
        <tr
            data-site={row.site.to_string()}
            class={classes!(f.silent().then_some("stale"))}
            data-stale={f.stale.to_string()}
            data-dead={f.dead.to_string()}
        >
            <th scope="row" data-field="name">
                { &row.name }
                if let Some(flag) = flag {
                    { " " }<span class="flag">{ flag.text(lang) }</span>
                }
            </th>
            <td data-field="state">
                { row.state.map_or(Label::Unknown.text(lang), |s| i18n::shelter_state(s, lang)) }
            </td>
            <td data-field="evacuees">{ figure(row.evacuees) }{ " / " }{ figure(row.capacity) }</td>
            <td data-field="occupancy">{ figure(row.occupancy_pct.map(|p| format!("{p}%"))) }</td>
            <td data-field="care">{ figure(row.care_needed) }</td>
            <td data-field="age">{ age_text(row.reported_age.or(f.age), lang) }</td>
        </tr>
    }
}

#[derive(Debug, Properties, PartialEq)]
pub struct WardViewProps {
    pub lang: Lang,
    pub ward: WardCode,
    pub detail: Option<Rc<WardDetail>>,
}

fn sort_heading(lang: Lang) -> impl Fn(SortKey) -> &'static str {
    move |key| match key {
        SortKey::Name => Label::Name.text(lang),
        SortKey::State => Label::State.text(lang),
        SortKey::Evacuees => Label::Evacuees.text(lang),
        SortKey::Occupancy => Label::Occupancy.text(lang),
        SortKey::Care => Label::CareNeeded.text(lang),
        SortKey::Age => Label::Updated.text(lang),
    }
}

fn counts_text(c: &DamageCounts, lang: Lang) -> String {
    let parts = [
        (lang.pick("死者", "dead"), c.dead),
        (lang.pick("行方不明", "missing"), c.missing),
        (lang.pick("重傷", "seriously injured"), c.injured_serious),
        (lang.pick("軽傷", "slightly injured"), c.injured_minor),
        (lang.pick("全壊", "destroyed"), c.houses_destroyed),
        (lang.pick("半壊", "half destroyed"), c.houses_half_destroyed),
        (
            lang.pick("床上浸水", "flooded above floor"),
            c.flooded_above_floor,
        ),
        (lang.pick("停電", "without power"), c.without_power),
        (lang.pick("断水", "without water"), c.without_water),
    ];
    let known: Vec<String> = parts
        .iter()
        .filter_map(|(name, n)| n.map(|n| format!("{name} {n}")))
        .collect();
    if known.is_empty() {
        "—".into()
    } else {
        known.join("・")
    }
}

#[component]
pub fn WardView(props: &WardViewProps) -> Html {
    let lang = props.lang;
    let sort = use_state(|| (SortKey::Name, false));
    let filter = use_state(String::new);
    let on_filter = {
        let filter = filter.clone();
        Callback::from(move |e: InputEvent| {
            let input: HtmlInputElement = e.target_unchecked_into();
            filter.set(input.value());
        })
    };
    let name = props.ward.ward().map_or("", |w| ward_name(w, lang));
    let empty = WardDetail {
        ward: props.ward,
        shelters: Vec::new(),
        stock: Vec::new(),
        requests: Vec::new(),
        incidents: Vec::new(),
    };
    let detail = props.detail.as_deref().unwrap_or(&empty);
    let (key, descending) = *sort;
    let shown = sort_and_filter(&detail.shelters, key, descending, &filter);
    let heading = sort_heading(lang);
    let header_cell = |k: SortKey| {
        let sort = sort.clone();
        let onclick = Callback::from(move |_: MouseEvent| {
            let (cur, desc) = *sort;
            sort.set(if cur == k {
                (k, !desc)
            } else {
                (k, k.default_descending())
            });
        });
        let aria = if k == key {
            if descending {
                "descending"
            } else {
                "ascending"
            }
        } else {
            "none"
        };
        html! {
            <th scope="col" data-sort={k.as_str()} aria-sort={aria}>
                <button type="button" {onclick}>
                    { heading(k) }
                    if k == key { { if descending { " ▼" } else { " ▲" } } }
                </button>
            </th>
        }
    };
    html! {
        <section id="ward-view" data-ward={props.ward.to_string()}>
            <a id="back" href={Route::Overview.hash()}>{ Label::BackToOverview.text(lang) }</a>
            <h2>{ name }</h2>

            <h3>{ Label::Shelters.text(lang) }</h3>
            <input
                id="shelter-filter"
                type="search"
                placeholder={Label::Filter.text(lang)}
                aria-label={Label::Filter.text(lang)}
                value={(*filter).clone()}
                oninput={on_filter}
            />
            <table id="shelters" data-count={shown.len().to_string()}>
                <thead>
                    <tr>{ for SortKey::ALL.into_iter().map(header_cell) }</tr>
                </thead>
                <tbody>
                    { for shown.iter().map(|row| html! {
                        <ShelterRowView key={row.site.to_string()} {lang} row={(*row).clone()} />
                    }) }
                </tbody>
            </table>
            if detail.shelters.is_empty() {
                <p class="empty">{ Label::NoShelters.text(lang) }</p>
            }

            <h3>{ Label::Stock.text(lang) }</h3>
            if detail.stock.is_empty() {
                <p class="empty">{ Label::Nothing.text(lang) }</p>
            } else {
                <table id="stock">
                    <thead><tr>
                        <th scope="col">{ Label::Site.text(lang) }</th>
                        <th scope="col">{ Label::Item.text(lang) }</th>
                        <th scope="col">{ Label::OnHand.text(lang) }</th>
                        <th scope="col">{ Label::DailyNeed.text(lang) }</th>
                        <th scope="col">{ Label::DaysLeft.text(lang) }</th>
                        <th scope="col">{ Label::Updated.text(lang) }</th>
                    </tr></thead>
                    <tbody>
                        { for detail.stock.iter().map(|s| html! {
                            <tr class={classes!(s.stale.then_some("stale"))} data-item={s.item.as_str()}>
                                <td>{ &s.site_name }</td>
                                <td>{ i18n::item(s.item, lang) }</td>
                                <td data-field="on_hand">{ figure(s.on_hand) }</td>
                                <td data-field="daily_need">{ figure(s.daily_need) }</td>
                                <td data-field="days_left" class={classes!(s.days_left_tenths.is_some_and(|d| d < 10).then_some("attention"))}>
                                    { figure(s.days_left_tenths.map(|d| i18n::days_tenths(d, lang))) }
                                </td>
                                <td data-field="age">{ i18n::age(s.age, lang) }</td>
                            </tr>
                        }) }
                    </tbody>
                </table>
            }

            <h3>{ Label::Requests.text(lang) }</h3>
            if detail.requests.is_empty() {
                <p class="empty">{ Label::Nothing.text(lang) }</p>
            } else {
                <table id="requests">
                    <thead><tr>
                        <th scope="col">{ Label::Site.text(lang) }</th>
                        <th scope="col">{ Label::Item.text(lang) }</th>
                        <th scope="col">{ Label::State.text(lang) }</th>
                        <th scope="col">{ Label::Delivered.text(lang) }{ " / " }{ Label::Requested.text(lang) }</th>
                        <th scope="col">{ Label::Updated.text(lang) }</th>
                    </tr></thead>
                    <tbody>
                        { for detail.requests.iter().map(|r| html! {
                            <tr
                                key={format!("{}/{}", r.site, r.request_id)}
                                data-request={r.request_id.to_string()}
                                data-state={format!("{:?}", r.state).to_lowercase()}
                                class={classes!(r.state.is_closed().then_some("closed"))}
                            >
                                <td>{ &r.site_name }</td>
                                <td>{ r.item.map_or(Label::Unknown.text(lang), |i| i18n::item(i, lang)) }</td>
                                <td data-field="state">{ i18n::request_state(r.state, lang) }</td>
                                <td data-field="fulfilled">{ r.fulfilled }{ " / " }{ figure(r.quantity) }</td>
                                <td data-field="age">{ i18n::age(r.age, lang) }</td>
                            </tr>
                        }) }
                    </tbody>
                </table>
            }

            <h3>{ Label::Incidents.text(lang) }</h3>
            if detail.incidents.is_empty() {
                <p class="empty">{ Label::Nothing.text(lang) }</p>
            } else {
                <table id="incidents">
                    <thead><tr>
                        <th scope="col">{ Label::Site.text(lang) }</th>
                        <th scope="col">{ Label::Category.text(lang) }</th>
                        <th scope="col">{ Label::Casualties.text(lang) }</th>
                        <th scope="col">{ Label::Severity.text(lang) }</th>
                        <th scope="col">{ Label::Report.text(lang) }</th>
                        <th scope="col">{ Label::Updated.text(lang) }</th>
                    </tr></thead>
                    <tbody>
                        { for detail.incidents.iter().map(|i| html! {
                            <tr
                                key={format!("{}/{}", i.site, i.incident_id)}
                                data-incident={i.incident_id.to_string()}
                                data-severity={i18n::severity_key(i.severity)}
                                class={classes!(i.stale.then_some("stale"))}
                            >
                                <td>{ &i.site_name }</td>
                                <td data-field="category">{ i18n::category(i.category, lang) }</td>
                                <td data-field="counts">{ counts_text(&i.counts, lang) }</td>
                                <td data-field="severity">{ i18n::severity(i.severity, lang) }</td>
                                <td>{ i18n::report_version(i.version, lang) }</td>
                                <td data-field="age">{ i18n::age(i.age, lang) }</td>
                            </tr>
                        }) }
                    </tbody>
                </table>
            }
        </section>
    }
}
