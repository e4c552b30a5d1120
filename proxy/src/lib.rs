//! Trellis sidecar proxy: the data plane of the Trellis service mesh.
//!
//! A pod's TCP traffic is redirected here by the iptables rules that [`iptables`]
//! writes. Each accepted connection has its original destination recovered and its
//! protocol detected ([`detect`]) in [`server`], and is then forwarded either as
//! opaque bytes ([`tcp`]) or request by request ([`http`]) over pooled upstream
//! connections ([`pool`]). Named services come from the config ([`config`]), compiled
//! into an immutable [`table::RouteTable`] that requests read lock-free.

pub mod admin;
pub mod config;
pub mod detect;
pub mod duration;
pub mod http;
pub mod io;
pub mod iptables;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod rng;
pub mod server;
pub mod shutdown;
pub mod table;
pub mod tcp;
