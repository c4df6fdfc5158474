//! The components. They only render: data comes from [`crate::state::Snapshot`], and the
//! services that produce it are started by [`crate::services`].

mod app;
mod header;
mod ward_table;

pub use app::App;
