//! One site's view: its latest heartbeat and shelter report, its history as a chart, and its
//! own stock, requests and incidents.

use std::rc::Rc;

use gloo_timers::callback::Timeout;
use renkei_shared::{LinkState, Mode, ShelterStatus, SiteRef, SiteStatus};
use yew::prelude::*;

use super::history_chart::{HistoryChart, HistoryState};
use super::site_tables::{incidents_table, requests_table};
use super::{age_text, figure};
use crate::age::Age;
use crate::i18n::{self, Label, Lang, clock_jst, ward_name};
use crate::route::Route;
use crate::services;
use crate::site::SiteDetail;

/// Wait for the site's reports to settle before fetching its history again: a backlog
/// flushed after an outage arrives as a burst, and the broker's recorder writes in batches.
const REFETCH_AFTER_MS: u32 = 1_000;

#[derive(Debug, Properties, PartialEq)]
pub struct SiteViewProps {
    pub lang: Lang,
    pub mode: Mode,
    pub site: SiteRef,
    pub detail: Option<Rc<SiteDetail>>,
}

/// One `<dt>`/`<dd>` pair, wrapped so tests and styles can find it by field.
fn fact(field: &'static str, label: &'static str, value: Html) -> Html {
    html! {
        <div data-field={field}>
            <dt>{ label }</dt>
            <dd>{ value }</dd>
        </div>
    }
}

fn link(state: Option<LinkState>, lang: Lang) -> Html {
    match state {
        Some(s) => html! {
            <span class={classes!("link", format!("link-{s:?}").to_lowercase())}>{ i18n::link_state(s, lang) }</span>
        },
        None => figure::<&str>(None),
    }
}

fn status_facts(status: &SiteStatus, age: Age, lang: Lang) -> Html {
    let c = &status.comms;
    let comms = html! {
        <ul class="comms">
            <li>{ Label::Internet.text(lang) }{ ": " }{ link(c.internet, lang) }</li>
            <li>{ Label::Mobile.text(lang) }{ ": " }{ link(c.mobile, lang) }</li>
            <li>{ Label::Landline.text(lang) }{ ": " }{ link(c.landline, lang) }</li>
            <li>{ Label::Radio.text(lang) }{ ": " }{ link(c.radio, lang) }</li>
        </ul>
    };
    let interval = match lang {
        Lang::Ja => format!("{}秒", status.interval_s),
        Lang::En => format!("{} s", status.interval_s),
    };
    html! {
        <dl id="site-status" data-kind={i18n::site_kind_key(status.kind)}>
            { fact("kind", Label::Kind.text(lang), html! { i18n::site_kind(status.kind, lang) }) }
            { fact("power", Label::Power.text(lang), html! { i18n::power(status.power, lang) }) }
            { fact("battery", Label::Battery.text(lang), figure(status.battery_pct.map(|p| format!("{p}%")))) }
            { fact("comms", Label::Comms.text(lang), comms) }
            { fact("hq", Label::HqState.text(lang), html! { i18n::hq_state(status.hq, lang) }) }
            { fact("interval", Label::Interval.text(lang), html! { interval }) }
            { fact("queue_depth", Label::QueueDepth.text(lang), figure(status.queue_depth)) }
            { fact("status_age", Label::Updated.text(lang), html! { i18n::age(age, lang) }) }
        </dl>
    }
}

fn shelter_facts(s: &ShelterStatus, occupancy: Option<u64>, age: Age, lang: Lang) -> Html {
    let care = &s.care;
    let care_counts = [
        care.elderly,
        care.disabled,
        care.infants,
        care.pregnant,
        care.medical,
        care.foreign_language,
        care.injured,
    ];
    let l = &s.lifelines;
    let lifelines = [
        ("power", Label::Power, l.power),
        ("water", Label::Water, l.water),
        ("gas", Label::Gas, l.gas),
        ("toilets", Label::Toilets, l.toilets),
        ("comms", Label::Comms, l.comms),
    ];
    let time =
        |t: Option<renkei_shared::Timestamp>| figure(t.map(|t| format!("{} JST", clock_jst(t))));
    html! {
        <>
            <dl id="shelter-details">
                { fact("shelter_type", Label::ShelterType.text(lang), html! { i18n::shelter_type(s.shelter_type, lang) }) }
                { fact("state", Label::State.text(lang), html! { i18n::shelter_state(s.state, lang) }) }
                { fact("evacuees", Label::Evacuees.text(lang), html! { <>{ figure(s.evacuees) }{ " / " }{ figure(s.capacity) }</> }) }
                { fact("occupancy", Label::Occupancy.text(lang), figure(occupancy.map(|p| format!("{p}%")))) }
                { fact("households", Label::Households.text(lang), figure(s.households)) }
                { fact("crowding", Label::Crowding.text(lang), figure(s.crowding.map(|c| i18n::crowding(c, lang)))) }
                { fact("pets", Label::Pets.text(lang), figure(s.pets)) }
                { fact("building_safety", Label::BuildingSafety.text(lang), match s.building_safety {
                    Some(b) => html! { <span class={classes!("safety", format!("safety-{b:?}").to_lowercase())}>{ i18n::building_safety(b, lang) }</span> },
                    None => figure::<&str>(None),
                }) }
                { fact("opened_at", lang.pick("開設日時", "Opened"), time(s.opened_at)) }
                { fact("checked_at", lang.pick("確認日時", "Checked"), time(s.checked_at)) }
                { fact("shelter_age", Label::Updated.text(lang), html! { i18n::age(age, lang) }) }
            </dl>
            <div class="site-tables">
                <table id="care-needs">
                    <caption>{ Label::CareBreakdown.text(lang) }</caption>
                    <tbody>
                        { for i18n::care_needs(lang).iter().zip(care_counts).enumerate().map(|(i, (name, n))| html! {
                            <tr data-need={i.to_string()}><th scope="row">{ *name }</th><td>{ figure(n) }</td></tr>
                        }) }
                        <tr class="total"><th scope="row">{ Label::Total.text(lang) }</th><td>{ figure(care.total()) }</td></tr>
                    </tbody>
                </table>
                <table id="lifelines">
                    <caption>{ Label::Lifelines.text(lang) }</caption>
                    <tbody>
                        { for lifelines.iter().map(|(key, label, state)| html! {
                            <tr data-lifeline={*key} data-state={state.map(|s| format!("{s:?}").to_lowercase())}>
                                <th scope="row">{ label.text(lang) }</th>
                                <td>{ figure(state.map(|s| i18n::lifeline_state(s, lang))) }</td>
                            </tr>
                        }) }
                    </tbody>
                </table>
            </div>
        </>
    }
}

#[component]
pub fn SiteView(props: &SiteViewProps) -> Html {
    let lang = props.lang;
    let history = use_state(|| HistoryState::Loading);
    let version = props.detail.as_ref().and_then(|d| d.shelter_version);
    {
        let history = history.clone();
        let (site, mode) = (props.site.clone(), props.mode);
        use_effect_with(version, move |_| {
            let timeout = Timeout::new(REFETCH_AFTER_MS, move || {
                services::fetch_history(site, mode, move |result| {
                    history.set(match result {
                        Ok(points) => HistoryState::Ready(Rc::new(points)),
                        Err(e) => HistoryState::Failed(e),
                    });
                });
            });
            // A newer report within the wait replaces this fetch.
            move || drop(timeout)
        });
    }

    let site = &props.site;
    let ward = site.ward.ward();
    let detail = props.detail.as_deref();
    let name = detail.map_or(site.site.as_str(), |d| d.name.as_str());
    let alarm = detail
        .and_then(|d| d.status.as_ref())
        .is_some_and(|(s, _)| s.outbox_alarm);
    let freshness = detail.map(|d| d.freshness);
    let flag = match freshness {
        Some(f) if f.dead => Some(Label::Offline),
        Some(f) if f.stale => Some(Label::Stale),
        _ => None,
    };
    html! {
        <section
            id="site-view"
            data-ward={site.ward.to_string()}
            data-site={site.site.to_string()}
            data-outbox-alarm={alarm.to_string()}
            class={classes!(freshness.is_some_and(|f| f.silent()).then_some("stale"))}
        >
            <a id="back" href={Route::Ward(site.ward).hash()}>
                { "← " }{ ward.map_or("", |w| ward_name(w, lang)) }
            </a>
            <h2>
                { name }
                if let Some(flag) = flag {
                    { " " }<span class="flag">{ flag.text(lang) }</span>
                }
            </h2>
            <p class="site-meta">
                { Label::LastHeard.text(lang) }{ ": " }{ age_text(freshness.and_then(|f| f.age), lang) }
            </p>
            if alarm {
                <div id="outbox-alarm" class="outbox-alarm" role="alert">{ Label::OutboxAlarm.text(lang) }</div>
            }
            if !detail.is_some_and(|d| d.known) {
                <p class="empty">{ Label::NoSiteData.text(lang) }</p>
            }

            <h3>{ Label::SiteStatus.text(lang) }</h3>
            { match detail.and_then(|d| d.status.as_ref()) {
                Some((status, age)) => status_facts(status, *age, lang),
                None => html! { <p class="empty">{ Label::Nothing.text(lang) }</p> },
            } }

            if let Some((shelter, age)) = detail.and_then(|d| d.shelter.as_ref()) {
                <h3>{ Label::ShelterDetails.text(lang) }</h3>
                { shelter_facts(shelter, detail.and_then(|d| d.occupancy_pct), *age, lang) }
            }

            <h3>{ Label::History.text(lang) }</h3>
            <HistoryChart {lang} history={(*history).clone()} />

            <h3>{ Label::Requests.text(lang) }</h3>
            { requests_table(detail.map_or(&[][..], |d| &d.rows.requests), site.ward, props.mode, lang) }

            <h3>{ Label::Incidents.text(lang) }</h3>
            { incidents_table(detail.map_or(&[][..], |d| &d.rows.incidents), lang) }
        </section>
    }
}
