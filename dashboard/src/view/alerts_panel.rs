//! Active alerts with their acknowledgements, and the button that publishes one.

use std::rc::Rc;

use renkei_shared::Mode;
use yew::prelude::*;

use crate::alerts::AlertRow;
use crate::i18n::{self, Label, Lang, ward_name};
use crate::services;

#[derive(Debug, Properties, PartialEq)]
pub struct AlertItemProps {
    pub lang: Lang,
    pub mode: Mode,
    pub alert: AlertRow,
}

#[component]
pub fn AlertItem(props: &AlertItemProps) -> Html {
    let AlertItemProps { lang, mode, alert } = props;
    let lang = *lang;
    let ack = {
        let (id, mode) = (alert.alert_id.clone(), *mode);
        Callback::from(move |_: MouseEvent| services::acknowledge(id.clone(), mode))
    };
    let wards = alert
        .wards
        .iter()
        .filter_map(|w| w.ward())
        .map(|w| ward_name(w, lang))
        .collect::<Vec<_>>()
        .join("・");
    let severity = i18n::severity_key(alert.severity);
    html! {
        <li
            class={classes!("alert", format!("severity-{severity}"))}
            data-alert={alert.alert_id.to_string()}
            data-severity={severity}
        >
            <div class="alert-head">
                <span class="severity">{ i18n::severity(alert.severity, lang) }</span>
                <span class="headline">{ &alert.headline }</span>
                <span class="age">{ i18n::age(alert.age, lang) }</span>
            </div>
            <div class="alert-wards">{ Label::Wards.text(lang) }{ ": " }{ wards }</div>
            <button class="ack" type="button" data-alert={alert.alert_id.to_string()} onclick={ack}>
                { Label::Acknowledge.text(lang) }
            </button>
            if !alert.acks.is_empty() {
                <div class="acks">
                    <span class="acks-label">{ Label::AcknowledgedBy.text(lang) }</span>
                    <ul>
                        { for alert.acks.iter().map(|a| html! {
                            <li data-user={a.user.to_string()}>
                                { format!("{} ({}, {})", a.user, i18n::ack_action(a.action, lang), i18n::age(a.age, lang)) }
                            </li>
                        }) }
                    </ul>
                </div>
            }
        </li>
    }
}

#[derive(Debug, Properties, PartialEq)]
pub struct AlertsPanelProps {
    pub lang: Lang,
    pub mode: Mode,
    pub alerts: Rc<Vec<AlertRow>>,
}

#[component]
pub fn AlertsPanel(props: &AlertsPanelProps) -> Html {
    let lang = props.lang;
    html! {
        <aside id="alerts" data-count={props.alerts.len().to_string()}>
            <h2>{ Label::Alerts.text(lang) }</h2>
            if props.alerts.is_empty() {
                <p class="empty">{ Label::NoAlerts.text(lang) }</p>
            } else {
                <ul>
                    { for props.alerts.iter().map(|a| html! {
                        <AlertItem key={a.alert_id.to_string()} {lang} mode={props.mode} alert={a.clone()} />
                    }) }
                </ul>
            }
        </aside>
    }
}
