//! Identity: the control plane as the mesh's certificate authority ([`ca`]), the
//! credentials that prove a proxy's identity ([`tokens`] in local mode), and the
//! gRPC service proxies get their certificates from ([`service`]).

pub mod ca;
pub mod service;
pub mod tokens;
