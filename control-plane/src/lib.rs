//! The Trellis control plane: reads Kubernetes objects (or the same YAML from local
//! files), translates them into the proxy's one config model
//! (`trellis_proto::model::config::Config`) and pushes each proxy its view of it.
//!
//! The modules in the order config travels:
//!
//! - [`source`]: where objects come from, a directory of YAML ([`source::local`])
//!   or the Kubernetes API ([`source::kube`], which also writes statuses back);
//!   each reports its complete set of objects to the hub;
//! - [`translate`]: objects into the model and a status per object, a pure
//!   function with one file per input kind;
//! - [`hub`]: debounces a burst of changes, translates once, keeps the last
//!   accepted version of an object that stopped translating, and publishes a
//!   versioned snapshot; `hub/view.rs` is what one proxy sees of it;
//! - [`discovery`]: one gRPC stream per proxy, sending its view (then only what
//!   changed) and recording each ACK or NACK.
//!
//! Beside them: [`identity`], the mesh's certificate authority and the service
//! proxies get their certificates from; [`inject`], the sidecar injector (a
//! mutating admission webhook); [`crd`], Trellis's own kinds
//! (TrafficPolicy, ServerPolicy) and their CustomResourceDefinitions; [`admin`],
//! the admin port (`/ready`, `/metrics`, `/proxies`, `/status`).
//!
//! Imports point the same way: a source imports the hub, the hub imports
//! translation, discovery imports the hub, and translation imports none of them.

pub mod admin;
pub mod crd;
pub mod discovery;
pub mod hub;
pub mod identity;
pub mod inject;
pub mod source;
pub mod translate;
