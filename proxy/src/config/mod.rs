//! Where config comes from: a file ([`file`]) or the control plane ([`discovery`]).
//! Both produce the one model of `trellis-proto` and apply it as a change to the
//! running [`crate::routing::table::RouteTable`].

pub mod discovery;
pub mod file;

pub use file::{check_routes, load, parse};
pub use trellis_proto::model::config::*;
