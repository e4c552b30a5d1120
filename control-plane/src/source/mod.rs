//! Where objects come from: a directory of YAML (`local.rs`) or the Kubernetes API
//! (`kube/`). Either way a source reads the same kinds into one
//! [`Objects`](crate::translate::Objects) and reports its complete current set to
//! the [`Hub`](crate::hub::Hub) whenever it changes; the hub coalesces bursts. A
//! source in Kubernetes mode also writes each snapshot's statuses back to the
//! objects.

pub mod kube;
pub mod local;
