use renkei_shared::{Mode, Timestamp};
use yew::prelude::*;

use super::header::Header;
use super::ward_table::WardTable;
use crate::i18n::{Label, Lang};
use crate::services;
use crate::state::Dashboard;

/// The whole page.
#[component]
pub fn App() -> Html {
    let dashboard = use_reducer(|| Dashboard::new(Timestamp(services::now_ms())));
    let lang = use_state(Lang::default);
    {
        let dispatcher = dashboard.dispatcher();
        use_effect_with((), move |_| services::start(dispatcher));
    }
    use_effect_with(*lang, |lang| services::set_document_lang(*lang));

    let toggle_lang = {
        let lang = lang.clone();
        Callback::from(move |_| lang.set(lang.other()))
    };
    let lang = *lang;
    let snapshot = dashboard.snapshot.clone();
    let drills = snapshot
        .drills
        .iter()
        .map(|m| match m {
            Mode::Actual => "actual",
            Mode::Exercise => "exercise",
            Mode::Test => "test",
        })
        .collect::<Vec<_>>()
        .join(" ");
    let rejected_detail = snapshot
        .rejected
        .iter()
        .map(|(reason, n)| format!("{reason}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");

    html! {
        <>
            <Header
                {lang}
                conn={dashboard.conn}
                endpoint={dashboard.endpoint.clone()}
                last_update={snapshot.last_update}
                on_toggle_lang={toggle_lang}
            />
            if !snapshot.drills.is_empty() {
                // Fixed bilingual text: a drill must be unmistakable whatever the language.
                <div id="mode-banner" data-modes={drills} role="alert">{ "訓練 EXERCISE" }</div>
            }
            <main>
                <WardTable {lang} snapshot={snapshot.clone()} />
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
