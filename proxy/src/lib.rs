//! Trellis sidecar proxy: the data plane of the Trellis service mesh.
//!
//! A pod's TCP traffic is redirected here by the iptables rules that [`iptables`]
//! writes. Each accepted connection has its original destination recovered and its
//! protocol detected ([`detect`]) in [`server`], and is then forwarded either as
//! opaque bytes ([`tcp`]) or request by request ([`http`]) over pooled upstream
//! connections ([`pool`]). Named services, their routes and policy come from the
//! config ([`config`], [`policy`]), compiled into an immutable [`table::RouteTable`]
//! that requests read lock-free; each route runs the policy stack of [`stack`].

pub mod admin;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod duration;
pub mod fault;
pub mod http;
pub mod io;
pub mod iptables;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod ratelimit;
pub mod retry;
pub mod rng;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod split;
pub mod stack;
pub mod table;
pub mod tcp;
pub mod timeout;
