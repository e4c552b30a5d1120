//! The traffic policy types of the shared config model.
pub use trellis_proto::model::policy::*;
