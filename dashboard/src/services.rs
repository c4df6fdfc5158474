//! The long-lived work behind the page, kept out of components: find the broker, run the MQTT
//! client, coalesce its messages into batches, and tick the clock so silence shows without
//! new messages. All of it reports to the reducer through its dispatcher.

use yew::UseReducerDispatcher;

use crate::i18n::Lang;
use crate::state::Dashboard;

/// How often silence is re-evaluated without messages, in ms.
pub const TICK_MS: u32 = 2_000;

/// The page's clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    js_sys::Date::now() as i64
}

/// Starts the services for the life of the page.
pub fn start(dispatcher: UseReducerDispatcher<Dashboard>) {
    #[cfg(target_arch = "wasm32")]
    browser::start(dispatcher);
    #[cfg(not(target_arch = "wasm32"))]
    drop(dispatcher);
}

/// Keeps `<html lang>` in step with the language shown, for fonts and screen readers.
pub fn set_document_lang(lang: Lang) {
    if let Some(root) = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.document_element())
    {
        let _ = root.set_attribute("lang", lang.tag());
    }
}

#[cfg(target_arch = "wasm32")]
mod browser {
    use std::rc::Rc;

    use gloo_timers::callback::{Interval, Timeout};
    use renkei_shared::{Timestamp, topic};
    use yew::UseReducerDispatcher;

    use super::{TICK_MS, now_ms};
    use crate::config;
    use crate::inbox::{FLUSH_MS, Inbox};
    use crate::mqtt::{self, Event};
    use crate::state::{Action, Dashboard};

    pub fn start(dispatcher: UseReducerDispatcher<Dashboard>) {
        let tick = dispatcher.clone();
        Interval::new(TICK_MS, move || {
            tick.dispatch(Action::Tick(Timestamp(now_ms())));
        })
        .forget();

        wasm_bindgen_futures::spawn_local(async move {
            let url = config::resolve().await;
            dispatcher.dispatch(Action::Endpoint(url.as_str().into()));
            let inbox = Rc::new(Inbox::new());
            mqtt::client::spawn(url, topic::ALL, move |event| match event {
                Event::State(conn) => dispatcher.dispatch(Action::Connection(conn)),
                Event::Message(message) => {
                    if inbox.push(message) {
                        let inbox = inbox.clone();
                        let dispatcher = dispatcher.clone();
                        Timeout::new(FLUSH_MS, move || {
                            dispatcher.dispatch(Action::Batch {
                                messages: inbox.take(),
                                now: Timestamp(now_ms()),
                            });
                        })
                        .forget();
                    }
                }
            });
        });
    }
}
