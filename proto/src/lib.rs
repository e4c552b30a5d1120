//! What the control plane and the proxy share, and nothing else: the config model
//! ([`model`]) and the discovery API that carries it ([`v1`]).

pub mod model {
    pub mod authorization;
    pub mod config;
    pub mod duration;
    pub mod names;
    pub mod policy;
    pub mod regex;
    pub mod resources;
}

/// The discovery and identity APIs (`proto/trellis/v1/`), generated ahead of time
/// so that a build needs no protobuf compiler; a test in `tests/` checks that the
/// generated code matches the `.proto` files.
pub mod v1 {
    include!("gen/trellis.v1.rs");
}
