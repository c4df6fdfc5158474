//! The long-lived work behind the page, kept out of components: find the broker, run the MQTT
//! client, coalesce its messages into batches, tick the clock so silence shows without new
//! messages, follow the URL hash, and publish what operators send. All of it reports to the
//! reducer through its dispatcher.

use renkei_shared::{Id, Mode, SiteRef};
use yew::UseReducerDispatcher;

use crate::alerts::RequestStep;
use crate::history::{HistoryError, Point};
use crate::i18n::Lang;
use crate::mqtt::Credentials;
use crate::route::Route;
use crate::state::Dashboard;

/// How often silence and ages are re-evaluated without messages, in ms.
pub const TICK_MS: u32 = 2_000;

/// Starts the services for the life of the page.
pub fn start(dispatcher: UseReducerDispatcher<Dashboard>) {
    #[cfg(target_arch = "wasm32")]
    browser::start(dispatcher);
    #[cfg(not(target_arch = "wasm32"))]
    drop(dispatcher);
}

/// Logs in with what the operator typed: asks the broker who that is, then connects as them.
pub fn log_in(dispatcher: UseReducerDispatcher<Dashboard>, url: &str, credentials: Credentials) {
    #[cfg(target_arch = "wasm32")]
    browser::log_in(dispatcher, url.to_owned(), credentials);
    #[cfg(not(target_arch = "wasm32"))]
    drop((dispatcher, url, credentials));
}

/// Publishes the current user's acknowledgement of an alert of `mode`'s world.
pub fn acknowledge(alert_id: Id, mode: Mode) {
    #[cfg(target_arch = "wasm32")]
    browser::acknowledge(alert_id, mode);
    #[cfg(not(target_arch = "wasm32"))]
    drop((alert_id, mode));
}

/// Publishes the current user's step on a supply request of `mode`'s world.
pub fn request_step(step: RequestStep, mode: Mode) {
    #[cfg(target_arch = "wasm32")]
    browser::request_step(step, mode);
    #[cfg(not(target_arch = "wasm32"))]
    drop((step, mode));
}

/// Fetches the shelter reports of `site` in `mode`'s world from the broker's HTTP API, as
/// the logged-in user, and hands them to `done`.
pub fn fetch_history(
    site: SiteRef,
    mode: Mode,
    done: impl FnOnce(Result<Vec<Point>, HistoryError>) + 'static,
) {
    #[cfg(target_arch = "wasm32")]
    wasm_bindgen_futures::spawn_local(async move {
        done(browser::fetch_history(&site, mode).await);
    });
    #[cfg(not(target_arch = "wasm32"))]
    done(Err(HistoryError::Network(format!(
        "no browser to fetch {site:?} in {mode:?}"
    ))));
}

/// Shows `route` by changing the URL hash (the hash listener then updates the state).
pub fn go(route: Route) {
    if let Some(location) = web_sys::window().map(|w| w.location()) {
        let _ = location.set_hash(&route.hash());
    }
}

/// The world the page was asked to open with `?mode=actual|exercise|test`, if any: a drill's
/// own link (the demo's simulated sites are an exercise) opens that world, under its banner.
pub fn requested_mode() -> Option<renkei_shared::Mode> {
    let search = web_sys::window()?.location().search().ok()?;
    let value = web_sys::UrlSearchParams::new_with_str(&search)
        .ok()?
        .get("mode")?;
    renkei_shared::Mode::ALL
        .into_iter()
        .find(|&m| crate::i18n::mode_key(m) == value)
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
    use std::cell::RefCell;
    use std::rc::Rc;

    use futures::channel::mpsc::{self, UnboundedSender};
    use gloo_timers::callback::{Interval, Timeout};
    use renkei_shared::{Id, Mode, SiteRef, Timestamp, Topic, encode};
    use wasm_bindgen::JsCast;
    use wasm_bindgen::closure::Closure;
    use yew::UseReducerDispatcher;

    use super::TICK_MS;
    use crate::alerts::{DEFAULT_USER, HqSender, RequestStep, user_id};
    use crate::config;
    use crate::history::{self, HistoryError, Point};
    use crate::inbox::{FLUSH_MS, Inbox};
    use crate::log;
    use crate::mqtt::{self, ConnState, Credentials, Event, Outgoing};
    use crate::perf;
    use crate::route::Route;
    use crate::state::{Access, Action, Dashboard};
    use crate::whoami::Login;

    /// The way out to the broker, once connected.
    struct Publisher {
        /// `None` for a login that only reads (an integrator).
        sender: Option<HqSender>,
        outgoing: UnboundedSender<Outgoing>,
    }

    thread_local! {
        static PUBLISHER: RefCell<Option<Publisher>> = const { RefCell::new(None) };
        /// The login the broker accepted over MQTT, for the HTTP API's Basic auth. Kept in
        /// this page's memory only, never in storage or the state.
        static LOGIN: RefCell<Option<Credentials>> = const { RefCell::new(None) };
        /// The server's other WebSocket addresses (`/config.json`), tried in turn when the
        /// one in use is lost.
        static FAILOVER: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    fn current_route() -> Route {
        let hash = web_sys::window()
            .and_then(|w| w.location().hash().ok())
            .unwrap_or_default();
        Route::parse(&hash)
    }

    pub fn start(dispatcher: UseReducerDispatcher<Dashboard>) {
        let tick = dispatcher.clone();
        Interval::new(TICK_MS, move || {
            tick.dispatch(Action::Tick(Timestamp::now()));
        })
        .forget();

        // Ward mode's lines: asked now and then, as the logged-in user once there is one.
        let lines = dispatcher.clone();
        Interval::new(crate::links::EVERY_MS, move || {
            let lines = lines.clone();
            wasm_bindgen_futures::spawn_local(async move {
                if let Some(links) = fetch_links().await {
                    lines.dispatch(Action::Links(links));
                }
            });
        })
        .forget();

        dispatcher.dispatch(Action::Route(current_route(), Timestamp::now()));
        let on_hash = dispatcher.clone();
        let listener = Closure::<dyn Fn()>::new(move || {
            on_hash.dispatch(Action::Route(current_route(), Timestamp::now()));
        });
        if let Some(window) = web_sys::window() {
            let _ = window
                .add_event_listener_with_callback("hashchange", listener.as_ref().unchecked_ref());
        }
        // The listener lives as long as the page.
        listener.forget();

        wasm_bindgen_futures::spawn_local(async move {
            let endpoint = config::resolve().await;
            FAILOVER.with(|f| f.borrow_mut().clone_from(&endpoint.failover));
            dispatcher.dispatch(Action::Endpoint(endpoint.url.as_str().into()));
            if endpoint.auth_required {
                // Nothing connects until someone logs in: say so rather than "connecting".
                dispatcher.dispatch(Action::Connection(ConnState::Disconnected));
                dispatcher.dispatch(Action::Access(Access::Login { error: None }));
            } else {
                dispatcher.dispatch(Action::Access(Access::Demo));
                connect(dispatcher, endpoint.url, None, &Login::demo());
            }
        });
    }

    /// Asks the broker who `credentials` name (`GET /api/v1/whoami`), then connects as that
    /// login; a refusal goes back to the login form with the reason.
    pub fn log_in(
        dispatcher: UseReducerDispatcher<Dashboard>,
        url: String,
        credentials: Credentials,
    ) {
        wasm_bindgen_futures::spawn_local(async move {
            match who_is(&credentials).await {
                Ok(login) => connect(dispatcher, url, Some(credentials), &login),
                Err(why) => {
                    log::warn(&format!("renkei: login refused ({why})"));
                    dispatcher.dispatch(Action::Access(Access::Login {
                        error: Some(why.into()),
                    }));
                }
            }
        });
    }

    async fn who_is(c: &Credentials) -> Result<Login, String> {
        let response = gloo_net::http::Request::get("/api/v1/whoami")
            .header("Authorization", &history::basic_auth(&c.user, &c.password))
            // A 401 then comes without a challenge, which the browser would answer with a
            // password dialog of its own in front of the page.
            .header("X-Requested-With", "XMLHttpRequest")
            .send()
            .await
            .map_err(|e| format!("cannot reach the broker: {e}"))?;
        match response.status() {
            200 => {}
            401 => return Err("wrong user name or password".into()),
            403 => return Err("this login cannot use the dashboard".into()),
            status => return Err(format!("the broker answered HTTP {status}")),
        }
        let body = response
            .text()
            .await
            .map_err(|e| format!("cannot read the broker's answer: {e}"))?;
        Login::parse(&body).map_err(|e| e.to_string())
    }

    /// Runs the MQTT client as `login`, with `credentials` if the broker wants a login.
    pub fn connect(
        dispatcher: UseReducerDispatcher<Dashboard>,
        url: String,
        credentials: Option<Credentials>,
        login: &Login,
    ) {
        let filters = match login.filters() {
            Ok(filters) => filters,
            Err(why) => {
                dispatcher.dispatch(Action::Access(Access::Login {
                    error: Some(why.to_string().into()),
                }));
                return;
            }
        };
        let user = credentials
            .as_ref()
            .map_or_else(|| user_id(DEFAULT_USER), |c| user_id(&c.user));
        if let Some(c) = &credentials {
            dispatcher.dispatch(Action::Access(Access::LoggedIn {
                user: c.user.as_str().into(),
            }));
        }
        LOGIN.with(|l| *l.borrow_mut() = credentials.clone());
        let boot = (js_sys::Math::random() * f64::from(u32::MAX)) as u32;
        let (outgoing, receiver) = mpsc::unbounded();
        PUBLISHER.with(|p| {
            *p.borrow_mut() = Some(Publisher {
                sender: login.ack_role().map(|role| HqSender::new(user, role, boot)),
                outgoing,
            });
        });
        let inbox = Rc::new(Inbox::new());
        let others = FAILOVER.with(|f| f.borrow().clone());
        mqtt::client::spawn(
            mqtt::backoff::Addresses::new(url, others),
            filters,
            credentials,
            receiver,
            move |event| match event {
                Event::State(conn) => dispatcher.dispatch(Action::Connection(conn)),
                Event::Refused(why) => {
                    PUBLISHER.with(|p| p.borrow_mut().take());
                    LOGIN.with(|l| l.borrow_mut().take());
                    dispatcher.dispatch(Action::Access(Access::Login {
                        error: Some(why.into()),
                    }));
                }
                Event::Message(message) => {
                    if inbox.push(message) {
                        let inbox = inbox.clone();
                        let dispatcher = dispatcher.clone();
                        Timeout::new(FLUSH_MS, move || flush(&dispatcher, &inbox)).forget();
                    }
                }
            },
        );
    }

    /// Hands the queued messages to the reducer and measures the batch to the end of its
    /// render.
    fn flush(dispatcher: &UseReducerDispatcher<Dashboard>, inbox: &Inbox) {
        let started = perf::browser::now();
        perf::browser::batch_started();
        dispatcher.dispatch(Action::Batch {
            messages: inbox.take(),
            now: Timestamp::now(),
        });
        // Yew renders in a task queued by the dispatch; this one is queued after it, so it
        // runs once the render is done.
        wasm_bindgen_futures::spawn_local(async move {
            perf::browser::batch_finished(started);
        });
    }

    pub fn acknowledge(alert_id: Id, mode: Mode) {
        publish("acknowledgement", |sender| {
            sender.ack(alert_id, mode, Timestamp::now())
        });
    }

    pub fn request_step(step: RequestStep, mode: Mode) {
        publish("request step", |sender| {
            sender.request_step(step, mode, Timestamp::now())
        });
    }

    /// Publishes what `build` makes as the page's sender (retained, QoS 1).
    fn publish(what: &str, build: impl FnOnce(&mut HqSender) -> renkei_shared::Envelope) {
        PUBLISHER.with(|p| {
            let mut p = p.borrow_mut();
            let Some(publisher) = p.as_mut() else {
                log::warn(&format!("renkei: not connected; the {what} was not sent"));
                return;
            };
            let Some(sender) = publisher.sender.as_mut() else {
                log::warn(&format!(
                    "renkei: this login only reads; the {what} was not sent"
                ));
                return;
            };
            let env = build(sender);
            let message = match (Topic::of(&env), encode(&env)) {
                (Ok(topic), Ok(payload)) => Outgoing {
                    topic: topic.to_string(),
                    payload,
                },
                (Err(e), _) => return log::warn(&format!("renkei: {what} has no topic: {e}")),
                (_, Err(e)) => return log::warn(&format!("renkei: {what} does not encode: {e}")),
            };
            let _ = publisher.outgoing.unbounded_send(message);
        });
    }

    /// `GET /api/v1/links`; `None` when it cannot be read (not logged in yet, an older
    /// broker): nothing is then said about the lines.
    async fn fetch_links() -> Option<crate::links::Links> {
        // Before a login the broker answers 401, without the Basic challenge that would put
        // the browser's own password dialog in front of the page.
        let mut request = gloo_net::http::Request::get(crate::links::PATH)
            .header("X-Requested-With", "XMLHttpRequest");
        if let Some(c) = LOGIN.with(|l| l.borrow().clone()) {
            request = request.header("Authorization", &history::basic_auth(&c.user, &c.password));
        }
        let response = request.send().await.ok()?;
        if !response.ok() {
            return None;
        }
        crate::links::parse(&response.text().await.ok()?)
    }

    pub async fn fetch_history(site: &SiteRef, mode: Mode) -> Result<Vec<Point>, HistoryError> {
        let mut request = gloo_net::http::Request::get(&history::path(site));
        if let Some(c) = LOGIN.with(|l| l.borrow().clone()) {
            request = request
                .header("Authorization", &history::basic_auth(&c.user, &c.password))
                .header("X-Requested-With", "XMLHttpRequest");
        }
        let response = request
            .send()
            .await
            .map_err(|e| HistoryError::Network(e.to_string()))?;
        if !response.ok() {
            return Err(HistoryError::Status(response.status()));
        }
        let body = response
            .text()
            .await
            .map_err(|e| HistoryError::Network(e.to_string()))?;
        history::points(&body, mode)
    }
}
