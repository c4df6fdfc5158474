use std::rc::Rc;

use renkei_shared::Timestamp;
use yew::prelude::*;

use crate::i18n::{Label, Lang, clock_jst};
use crate::mqtt::ConnState;

#[derive(Debug, Properties, PartialEq)]
pub struct HeaderProps {
    pub lang: Lang,
    pub conn: ConnState,
    /// The broker's WebSocket URL, once known.
    pub endpoint: Option<Rc<str>>,
    pub last_update: Option<Timestamp>,
    /// `("demo", label)` when no login is required, `("user", name)` when logged in.
    pub access: Option<(&'static str, AttrValue)>,
    pub on_toggle_lang: Callback<MouseEvent>,
}

/// Title, connection indicator, who is connected, last update and the language switch.
#[component]
pub fn Header(props: &HeaderProps) -> Html {
    let lang = props.lang;
    let last_update = match props.last_update {
        Some(t) => html! {
            <time id="last-update" data-ts={t.0.to_string()}>{ format!("{} JST", clock_jst(t)) }</time>
        },
        None => html! { <time id="last-update">{ Label::Never.text(lang) }</time> },
    };
    html! {
        <header>
            <h1>{ Label::Title.text(lang) }</h1>
            <span
                id="conn"
                data-state={props.conn.as_str()}
                title={props.endpoint.as_deref().unwrap_or_default().to_owned()}
            >
                { Label::Conn(props.conn).text(lang) }
            </span>
            if let Some((kind, text)) = &props.access {
                <span id="access" data-access={*kind}>{ text.clone() }</span>
            }
            <span class="last-update">{ Label::LastUpdate.text(lang) }{ " " }{ last_update }</span>
            <button id="lang-switch" type="button" lang={lang.other().tag()} onclick={props.on_toggle_lang.clone()}>
                { Label::Switch.text(lang) }
            </button>
        </header>
    }
}
