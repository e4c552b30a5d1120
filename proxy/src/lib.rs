//! Trellis sidecar proxy: the data plane of the Trellis service mesh. The modules,
//! in the order a connection meets them:
//!
//! - [`iptables`]: `trellis-proxy init` writes the rules that redirect a pod's TCP here.
//! - [`run`]: `trellis-proxy run` starts everything below and drains on shutdown.
//! - [`listen`]: accepts a connection, recovers its original destination, detects
//!   its protocol, and forwards opaque bytes or hands HTTP on.
//! - [`http`]: the hyper service; picks the service and route a request takes and
//!   builds every response the proxy makes itself ([`http::respond`]); closes an
//!   HTTP/1 connection that is slow to send a request head ([`http::head_wait`]).
//! - [`routing`]: the immutable table of services, routes and destinations, and
//!   route matching; a new config is applied to it as a diff.
//! - [`stack`]: the policy stages in request order, and how a route's and a
//!   destination's stages are put together.
//! - [`upstream`]: forwarding one request to one endpoint over pooled connections.
//! - [`config`]: where config comes from (a file, or the control plane), over
//!   [`control_plane`], the connection the proxy's [`identity`] is certified over too.
//! - [`admin`], [`metrics`]: the admin port and what it reports.
//! - [`settings`], [`shutdown`], [`alarm`], [`backoff`], [`rng`]: shared plumbing.
//! - `allocations` (the `count-allocations` feature): a counting allocator for
//!   `benches/allocations`.

pub mod admin;
pub mod alarm;
#[cfg(feature = "count-allocations")]
pub mod allocations;
pub mod backoff;
pub mod config;
pub mod control_plane;
pub mod http;
pub mod identity;
pub mod iptables;
pub mod listen;
pub mod metrics;
pub mod rng;
pub mod routing;
pub mod run;
pub mod settings;
pub mod shutdown;
pub mod stack;
pub mod tls;
pub mod upstream;
