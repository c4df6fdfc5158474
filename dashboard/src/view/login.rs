//! The login form shown before connecting to a broker that requires one. The password goes
//! into CONNECT and the HTTP API's `Authorization` header, held in the page's memory by the
//! services; never into storage, the URL or the state.

use web_sys::HtmlInputElement;
use yew::prelude::*;

use crate::i18n::{Label, Lang, login_refused};
use crate::mqtt::Credentials;

#[derive(Debug, Properties, PartialEq)]
pub struct LoginProps {
    pub lang: Lang,
    /// Why the last attempt failed, if one did.
    pub error: Option<AttrValue>,
    pub on_login: Callback<Credentials>,
}

#[component]
pub fn Login(props: &LoginProps) -> Html {
    let lang = props.lang;
    let user = use_node_ref();
    let password = use_node_ref();
    let onsubmit = {
        let (user, password, on_login) = (user.clone(), password.clone(), props.on_login.clone());
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let value = |r: &NodeRef| {
                r.cast::<HtmlInputElement>()
                    .map(|i| i.value())
                    .unwrap_or_default()
            };
            let credentials = Credentials {
                user: value(&user).trim().to_owned(),
                password: value(&password),
            };
            if let Some(input) = password.cast::<HtmlInputElement>() {
                input.set_value("");
            }
            if !credentials.user.is_empty() {
                on_login.emit(credentials);
            }
        })
    };
    html! {
        <form id="login" {onsubmit}>
            <h2>{ Label::LogIn.text(lang) }</h2>
            if let Some(error) = &props.error {
                <p id="login-error" role="alert" title={error.clone()}>{ login_refused(lang) }</p>
            }
            <label>
                { Label::User.text(lang) }
                <input id="login-user" ref={user} type="text" autocomplete="username" required=true />
            </label>
            <label>
                { Label::Password.text(lang) }
                <input id="login-password" ref={password} type="password" autocomplete="current-password" />
            </label>
            <button id="login-submit" type="submit">{ Label::LogIn.text(lang) }</button>
        </form>
    }
}
