//! Where a request goes: the immutable table of services, routes and destinations
//! ([`table`], swapped whole behind an `ArcSwap`) and the matching of a request to
//! one of a service's routes ([`router`]).

pub mod router;
pub mod table;
