//! The live cross-ward state: the one [`State`] that ingest writes (after a restart, rebuilt
//! from the recorder's database first) and the rules and the HTTP API read.

use std::sync::{Arc, RwLock};

use renkei_shared::State;

/// The live state, shared by ingest, the rules and HTTP.
pub type LiveState = Arc<RwLock<State>>;
