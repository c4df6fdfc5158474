//! One ward's view: its shelters (sortable, filterable, each opening its site view), ward
//! offices and depots, stock, supply requests and incidents.

use std::rc::Rc;

use renkei_shared::{Mode, SiteRef, WardCode};
use web_sys::HtmlInputElement;
use yew::prelude::*;

use super::site_tables::{incidents_table, requests_table};
use super::{age_text, figure};
use crate::detail::{ShelterRow, SiteRow, SortKey, WardDetail, sort_and_filter};
use crate::i18n::{self, Label, Lang, ward_name};
use crate::route::Route;
use crate::services;

#[derive(Debug, Properties, PartialEq)]
pub struct ShelterRowProps {
    pub lang: Lang,
    pub ward: WardCode,
    pub row: ShelterRow,
    /// HQ cannot reach the ward's office: a quiet site is unknown, not silent.
    #[prop_or_default]
    pub cut_off: bool,
}

/// The row's class and flag for a site gone quiet: `unknown` while its ward's office is cut
/// off from HQ (its silence is the line's), else `stale`.
fn quiet(silent: bool, cut_off: bool) -> (Option<&'static str>, bool) {
    match (silent, cut_off) {
        (true, true) => (Some("unknown"), true),
        (true, false) => (Some("stale"), false),
        (false, _) => (None, false),
    }
}

/// One shelter; greyed out when its site has gone quiet, flagged when its agent dropped.
/// Clicking it opens the site's view.
#[component]
pub fn ShelterRowView(props: &ShelterRowProps) -> Html {
    let ShelterRowProps {
        lang,
        ward,
        row,
        cut_off,
    } = props;
    let lang = *lang;
    let route = Route::Site(SiteRef {
        ward: *ward,
        site: row.site.clone(),
    });
    let href = route.hash();
    let open = Callback::from(move |_: MouseEvent| services::go(route.clone()));
    let f = &row.freshness;
    let (class, unknown) = quiet(f.silent(), *cut_off);
    let flag = if unknown {
        Some(Label::Unknown)
    } else if f.dead {
        Some(Label::Offline)
    } else if f.stale {
        Some(Label::Stale)
    } else {
        None
    };
    html! {
        <tr
            data-site={row.site.to_string()}
            class={classes!(class)}
            data-unknown={unknown.to_string()}
            data-stale={f.stale.to_string()}
            data-dead={f.dead.to_string()}
            data-outbox-alarm={row.outbox_alarm.to_string()}
            onclick={open}
        >
            <th scope="row" data-field="name">
                <a href={href}>{ &row.name }</a>
                if let Some(flag) = flag {
                    { " " }<span class="flag">{ flag.text(lang) }</span>
                }
                if row.outbox_alarm {
                    { " " }<span class="flag outbox" title={Label::OutboxAlarm.text(lang)}>{ Label::OutboxFull.text(lang) }</span>
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
pub struct OtherSiteRowProps {
    pub lang: Lang,
    pub ward: WardCode,
    pub row: SiteRow,
    /// HQ cannot reach the ward's office: a quiet site is unknown, not silent.
    #[prop_or_default]
    pub cut_off: bool,
}

/// A ward office or depot, by its heartbeat; clicking it opens the site's view.
#[component]
pub fn OtherSiteRowView(props: &OtherSiteRowProps) -> Html {
    let OtherSiteRowProps {
        lang,
        ward,
        row,
        cut_off,
    } = props;
    let lang = *lang;
    let route = Route::Site(SiteRef {
        ward: *ward,
        site: row.site.clone(),
    });
    let href = route.hash();
    let open = Callback::from(move |_: MouseEvent| services::go(route.clone()));
    let f = &row.freshness;
    let (class, unknown) = quiet(f.silent(), *cut_off);
    html! {
        <tr
            data-site={row.site.to_string()}
            data-kind={i18n::site_kind_key(row.kind)}
            data-outbox-alarm={row.outbox_alarm.to_string()}
            data-stale={f.stale.to_string()}
            data-dead={f.dead.to_string()}
            data-unknown={unknown.to_string()}
            class={classes!(class)}
            onclick={open}
        >
            <th scope="row" data-field="name">
                <a href={href}>{ &row.name }</a>
                if unknown {
                    { " " }<span class="flag">{ Label::Unknown.text(lang) }</span>
                } else if f.dead {
                    { " " }<span class="flag">{ Label::Offline.text(lang) }</span>
                } else if f.stale {
                    { " " }<span class="flag">{ Label::Stale.text(lang) }</span>
                }
                if row.outbox_alarm {
                    { " " }<span class="flag outbox" title={Label::OutboxAlarm.text(lang)}>{ Label::OutboxFull.text(lang) }</span>
                }
            </th>
            <td data-field="kind">{ i18n::site_kind(row.kind, lang) }</td>
            <td data-field="hq">{ i18n::hq_state(row.hq, lang) }</td>
            <td data-field="power">
                { i18n::power(row.power, lang) }
                if let Some(pct) = row.battery_pct { { format!(" ({pct}%)") } }
            </td>
            <td data-field="comms">{ figure(row.worst_link.map(|l| i18n::link_state(l, lang))) }</td>
            <td data-field="queue_depth" class={classes!(row.outbox_alarm.then_some("attention"))}>{ figure(row.queue_depth) }</td>
            <td data-field="age">{ age_text(f.age, lang) }</td>
        </tr>
    }
}

#[derive(Debug, Properties, PartialEq)]
pub struct WardViewProps {
    pub lang: Lang,
    /// The world shown: steps on its requests are sent in it.
    pub mode: Mode,
    pub ward: WardCode,
    pub detail: Option<Rc<WardDetail>>,
    /// HQ cannot reach this ward's office now ([`crate::links`]).
    #[prop_or_default]
    pub cut_off: bool,
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
    let empty = WardDetail::empty(props.ward);
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
                        <ShelterRowView key={row.site.to_string()} {lang} ward={props.ward} row={(*row).clone()} cut_off={props.cut_off} />
                    }) }
                </tbody>
            </table>
            if detail.shelters.is_empty() {
                <p class="empty">{ Label::NoShelters.text(lang) }</p>
            }

            <h3>{ Label::OtherSites.text(lang) }</h3>
            if detail.other_sites.is_empty() {
                <p class="empty">{ Label::NoOtherSites.text(lang) }</p>
            } else {
                <table id="other-sites" data-count={detail.other_sites.len().to_string()}>
                    <thead><tr>
                        <th scope="col">{ Label::Name.text(lang) }</th>
                        <th scope="col">{ Label::Kind.text(lang) }</th>
                        <th scope="col">{ Label::HqState.text(lang) }</th>
                        <th scope="col">{ Label::Power.text(lang) }</th>
                        <th scope="col">{ Label::Comms.text(lang) }</th>
                        <th scope="col">{ Label::QueueDepth.text(lang) }</th>
                        <th scope="col">{ Label::LastHeard.text(lang) }</th>
                    </tr></thead>
                    <tbody>
                        { for detail.other_sites.iter().map(|row| html! {
                            <OtherSiteRowView key={row.site.to_string()} {lang} ward={props.ward} row={row.clone()} cut_off={props.cut_off} />
                        }) }
                    </tbody>
                </table>
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
            { requests_table(&detail.requests, props.ward, props.mode, lang) }

            <h3>{ Label::Incidents.text(lang) }</h3>
            { incidents_table(&detail.incidents, lang) }
        </section>
    }
}
