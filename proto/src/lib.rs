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

/// The generated discovery and identity APIs (`proto/trellis/v1/`).
pub mod v1 {
    tonic::include_proto!("trellis.v1");
}
