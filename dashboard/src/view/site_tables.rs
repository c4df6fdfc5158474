//! The supply request and incident tables, shown in the ward view (every site of the ward)
//! and the site view (that site only).

use renkei_shared::{AckAction, DamageCounts, Mode, SiteRef, WardCode};
use web_sys::HtmlInputElement;
use yew::prelude::*;

use super::figure;
use crate::alerts::{RequestStep, request_actions};
use crate::detail::{IncidentRow, RequestRow};
use crate::i18n::{self, Label, Lang};
use crate::services;

#[derive(Debug, Properties, PartialEq)]
pub struct RequestActionsProps {
    pub lang: Lang,
    pub mode: Mode,
    pub ward: WardCode,
    pub row: RequestRow,
}

/// The buttons that move one open request forward; a delivery asks how much arrived.
#[component]
pub fn RequestActions(props: &RequestActionsProps) -> Html {
    let RequestActionsProps {
        lang,
        mode,
        ward,
        row,
    } = props;
    let (lang, mode) = (*lang, *mode);
    let quantity = use_node_ref();
    let actions = request_actions(row.state);
    if actions.is_empty() {
        return html! {};
    }
    let button = |action: AckAction| {
        let quantity = quantity.clone();
        let site = SiteRef {
            ward: *ward,
            site: row.site.clone(),
        };
        let request_id = row.request_id.clone();
        let onclick = Callback::from(move |_: MouseEvent| {
            let fulfilled = (action == AckAction::Deliver).then(|| {
                quantity
                    .cast::<HtmlInputElement>()
                    .and_then(|i| i.value().trim().parse::<u32>().ok())
            });
            if fulfilled == Some(None) {
                // A delivery without a readable quantity is not sent.
                return;
            }
            services::request_step(
                RequestStep {
                    site: site.clone(),
                    request_id: request_id.clone(),
                    action,
                    fulfilled: fulfilled.flatten(),
                },
                mode,
            );
        });
        html! {
            <button
                type="button"
                class={classes!("req-action", format!("req-{}", i18n::ack_action_key(action)))}
                data-action={i18n::ack_action_key(action)}
                {onclick}
            >
                { i18n::request_action(action, lang) }
            </button>
        }
    };
    let default_quantity = row.quantity.unwrap_or(row.fulfilled).to_string();
    html! {
        <span class="req-actions">
            if actions.contains(&AckAction::Deliver) {
                <input
                    ref={quantity.clone()}
                    class="req-fulfilled"
                    type="number"
                    min="0"
                    value={default_quantity}
                    aria-label={Label::DeliveredQuantity.text(lang)}
                    title={Label::DeliveredQuantity.text(lang)}
                />
            }
            { for actions.into_iter().map(button) }
        </span>
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

/// `#requests`: each request with its lifecycle state and the steps HQ can take on it.
pub fn requests_table(requests: &[RequestRow], ward: WardCode, mode: Mode, lang: Lang) -> Html {
    if requests.is_empty() {
        return html! { <p class="empty">{ Label::Nothing.text(lang) }</p> };
    }
    html! {
        <table id="requests">
            <thead><tr>
                <th scope="col">{ Label::Site.text(lang) }</th>
                <th scope="col">{ Label::Item.text(lang) }</th>
                <th scope="col">{ Label::State.text(lang) }</th>
                <th scope="col">{ Label::Delivered.text(lang) }{ " / " }{ Label::Requested.text(lang) }</th>
                <th scope="col">{ Label::Updated.text(lang) }</th>
                <th scope="col">{ Label::Actions.text(lang) }</th>
            </tr></thead>
            <tbody>
                { for requests.iter().map(|r| html! {
                    <tr
                        key={format!("{}/{}", r.site, r.request_id)}
                        data-site={r.site.to_string()}
                        data-request={r.request_id.to_string()}
                        data-state={format!("{:?}", r.state).to_lowercase()}
                        class={classes!(r.state.is_closed().then_some("closed"))}
                    >
                        <td>{ &r.site_name }</td>
                        <td>{ r.item.map_or(Label::Unknown.text(lang), |i| i18n::item(i, lang)) }</td>
                        <td data-field="state">{ i18n::request_state(r.state, lang) }</td>
                        <td data-field="fulfilled">{ r.fulfilled }{ " / " }{ figure(r.quantity) }</td>
                        <td data-field="age">{ i18n::age(r.age, lang) }</td>
                        <td data-field="actions">
                            <RequestActions {lang} {mode} {ward} row={r.clone()} />
                        </td>
                    </tr>
                }) }
            </tbody>
        </table>
    }
}

/// `#incidents`: each incident report, worst first.
pub fn incidents_table(incidents: &[IncidentRow], lang: Lang) -> Html {
    if incidents.is_empty() {
        return html! { <p class="empty">{ Label::Nothing.text(lang) }</p> };
    }
    html! {
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
                { for incidents.iter().map(|i| html! {
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
}
