//! Durations as operators write them (shared with the control plane).
pub use trellis_proto::model::duration::*;
