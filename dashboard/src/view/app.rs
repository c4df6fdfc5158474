use renkei_shared::{Mode, Timestamp};
use web_sys::HtmlSelectElement;
use yew::prelude::*;

use super::alerts_panel::AlertsPanel;
use super::header::Header;
use super::login::Login;
use super::site_view::SiteView;
use super::ward_map::WardMap;
use super::ward_table::WardTable;
use super::ward_view::WardView;
use crate::i18n::{self, Label, Lang};
use crate::mqtt::Credentials;
use crate::route::Route;
use crate::services;
use crate::state::{Access, Action, Dashboard};

/// The whole page.
#[component]
pub fn App() -> Html {
    let dashboard = use_reducer(|| Dashboard::new(Timestamp::now()));
    let lang = use_state(Lang::default);
    {
        let dispatcher = dashboard.dispatcher();
        use_effect_with((), move |_| {
            if let Some(mode) = services::requested_mode() {
                dispatcher.dispatch(Action::ViewMode(mode, Timestamp::now()));
            }
            services::start(dispatcher)
        });
    }
    use_effect_with(*lang, |lang| services::set_document_lang(*lang));
    // Effects run after the render is in the DOM: this is when a site first shows.
    use_effect_with(dashboard.snapshot.totals.sites > 0, |&shown| {
        #[cfg(target_arch = "wasm32")]
        if shown {
            crate::perf::browser::first_render();
        }
        #[cfg(not(target_arch = "wasm32"))]
        let _ = shown;
    });

    let toggle_lang = {
        let lang = lang.clone();
        Callback::from(move |_| lang.set(lang.other()))
    };
    let lang = *lang;
    let snapshot = dashboard.snapshot.clone();
    let access = match &dashboard.access {
        Access::Demo => Some(("demo", AttrValue::from(Label::Demo.text(lang)))),
        Access::LoggedIn { user } => Some(("user", AttrValue::from(user.to_string()))),
        Access::Resolving | Access::Login { .. } => None,
    };
    let header = html! {
        <Header
            {lang}
            conn={dashboard.conn}
            endpoint={dashboard.endpoint.clone()}
            last_update={snapshot.last_update}
            {access}
            on_toggle_lang={toggle_lang}
        />
    };

    if let Access::Login { error } = &dashboard.access {
        let on_login = {
            let dispatcher = dashboard.dispatcher();
            let url = dashboard.endpoint.clone();
            Callback::from(move |credentials: Credentials| {
                if let Some(url) = &url {
                    services::log_in(dispatcher.clone(), url, credentials);
                }
            })
        };
        return html! {
            <>
                { header }
                <main><Login {lang} error={error.as_deref().map(|e| AttrValue::from(e.to_owned()))} {on_login} /></main>
            </>
        };
    }

    let drills = snapshot
        .drills
        .iter()
        .map(|&m| i18n::mode_key(m))
        .collect::<Vec<_>>()
        .join(" ");
    let rejected_detail = snapshot
        .rejected
        .iter()
        .map(|(reason, n)| format!("{reason}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let on_mode = {
        let dispatcher = dashboard.dispatcher();
        Callback::from(move |e: Event| {
            let select: HtmlSelectElement = e.target_unchecked_into();
            let mode = Mode::ALL
                .into_iter()
                .find(|&m| i18n::mode_key(m) == select.value())
                .unwrap_or(Mode::Actual);
            dispatcher.dispatch(Action::ViewMode(mode, Timestamp::now()));
        })
    };
    let viewed = snapshot.mode;
    let cut_off = dashboard.links.wards_cut_off();
    let content = match &dashboard.view.route {
        Route::Overview => html! {
            <>
                <WardMap {lang} snapshot={snapshot.clone()} cut_off={cut_off.clone()} />
                <section class="table-section">
                    <WardTable {lang} snapshot={snapshot.clone()} {cut_off} />
                </section>
            </>
        },
        Route::Ward(ward) => html! {
            <WardView key={ward.0} {lang} mode={viewed} ward={*ward} detail={snapshot.detail.clone()} cut_off={cut_off.contains(ward)} />
        },
        // Keyed by site and world: another site, or another world's history, starts afresh.
        Route::Site(site) => html! {
            <SiteView
                key={format!("{}/{}/{}", site.ward, site.site, i18n::mode_key(viewed))}
                {lang}
                mode={viewed}
                site={site.clone()}
                detail={snapshot.site.clone()}
            />
        },
    };

    html! {
        <>
            { header }
            if !snapshot.drills.is_empty() {
                // Fixed bilingual text: a drill must be unmistakable whatever the language.
                <div id="mode-banner" data-modes={drills} role="alert">{ "訓練 EXERCISE" }</div>
            }
            { for crate::links::notices(&dashboard.links, lang).into_iter().map(|notice| html! {
                <div class="links-banner" role="alert">{ notice }</div>
            }) }
            if viewed != Mode::Actual {
                <div id="view-mode-banner" data-mode={i18n::mode_key(viewed)} role="alert">
                    { format!("{} — {}", i18n::mode(viewed, lang), Label::ViewingDrill.text(lang)) }
                </div>
            }
            <nav class="toolbar">
                <label>
                    { Label::ViewWorld.text(lang) }{ " " }
                    <select id="mode-select" onchange={on_mode}>
                        { for Mode::ALL.into_iter().map(|m| html! {
                            <option value={i18n::mode_key(m)} selected={m == viewed}>
                                { i18n::mode(m, lang) }
                            </option>
                        }) }
                    </select>
                </label>
            </nav>
            <main class={classes!("layout", (viewed != Mode::Actual).then_some("drill"))} data-mode={i18n::mode_key(viewed)}>
                <div class="content">{ content }</div>
                <AlertsPanel {lang} mode={viewed} alerts={snapshot.alerts.clone()} />
            </main>
            <footer>
                <span id="received" data-count={snapshot.received.to_string()}>
                    { format!("{} {}", Label::Received.text(lang), snapshot.received) }
                </span>
                <span id="rejected" data-count={snapshot.rejected_total().to_string()} title={rejected_detail}>
                    { format!("{} {}", Label::Rejected.text(lang), snapshot.rejected_total()) }
                </span>
            </footer>
        </>
    }
}
