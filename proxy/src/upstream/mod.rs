//! The upstream side: sending a request to one endpoint ([`forward`]) on pooled
//! connections ([`pool`]), with the bodies that cross the proxy ([`request_body`],
//! [`body`]). Knows nothing of routes or policy.

pub mod body;
pub mod forward;
pub mod pool;
pub mod request_body;
