//! The components. They only render: data comes from [`crate::state::Snapshot`], and the
//! services that produce it are started by [`crate::services`].
//!
//! Rows, tiles and alerts are components of their own with `PartialEq` props and keys, so a
//! batch that changes one ward re-renders that ward's row and tile, not all 23.

mod alerts_panel;
mod app;
mod header;
mod history_chart;
mod login;
mod site_tables;
mod site_view;
mod ward_map;
mod ward_table;
mod ward_view;

pub use app::App;

use yew::prelude::*;

use crate::age::Age;
use crate::i18n::{self, Lang};

/// An age, or a dash when nothing was ever heard.
fn age_text(age: Option<Age>, lang: Lang) -> String {
    age.map_or_else(|| "—".to_owned(), |a| i18n::age(a, lang))
}

/// A figure that may be unknown: unknown shows as a dash, never as 0.
fn figure<T: std::fmt::Display>(value: Option<T>) -> Html {
    match value {
        Some(v) => html! { { v.to_string() } },
        None => html! { <span class="unknown">{ "—" }</span> },
    }
}
