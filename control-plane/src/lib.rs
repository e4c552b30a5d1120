//! The Trellis control plane: reads Kubernetes objects (or the same YAML from local
//! files) and translates them into the proxy's one config model
//! (`trellis_proto::model::config::Config`), then pushes each proxy its view over
//! the discovery stream ([`server`]); [`hub`] holds the translated snapshots,
//! [`local`] watches a directory of YAML, [`admin`] serves the admin port.

pub mod admin;
pub mod crd;
pub mod hub;
pub mod kube_source;
pub mod local;
pub mod server;
pub mod translate;
