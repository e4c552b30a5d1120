//! Identity: the control plane as the mesh's certificate authority ([`ca`], its
//! root in a directory or a Kubernetes [`secret`]), the
//! credentials that prove a proxy's identity ([`credentials`]: service-account
//! tokens through TokenReview, or local mode's [`tokens`]), and the gRPC service
//! proxies get their certificates from ([`service`]).

pub mod ca;
pub mod credentials;
pub mod secret;
pub mod service;
pub mod tokens;
