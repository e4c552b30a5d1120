//! Kubernetes mode: the same kinds local mode reads from files (Services,
//! EndpointSlices, Pods, HTTPRoutes, GRPCRoutes, TrafficPolicies, ServerPolicies),
//! watched in every namespace through the API server (`watch.rs`), and the status
//! the translation gives each TrafficPolicy, ServerPolicy, HTTPRoute and GRPCRoute
//! written back to it (`status.rs`).
//!
//! Whenever a store changes, the stores are read into one
//! [`Objects`](crate::translate::Objects) and handed to the [`Hub`] (which
//! coalesces bursts). Nothing is reported until every kind has listed once (or is
//! known not to be served), so a restarting control plane never pushes a
//! half-listed mesh.

mod status;
mod watch;

pub use status::CONTROLLER_NAME;

use crate::hub::Hub;
use ::kube::Client;
use std::sync::Arc;
use tokio::sync::Notify;

/// Watches the API server and reports every change to `hub`; writes statuses
/// back after each snapshot. Runs until the process ends.
pub async fn run(client: Client, hub: Hub) {
    let changed = Arc::new(Notify::new());
    let sources = Arc::new(watch::Sources::start(&client, changed.clone()));
    tokio::spawn(status::write_statuses(client, hub.clone(), sources.clone()));
    let mut waiting_logged = false;
    loop {
        changed.notified().await;
        let pending = sources.pending();
        if !pending.is_empty() {
            if !waiting_logged {
                tracing::info!(?pending, "waiting for every kind to be listed");
                waiting_logged = true;
            }
            continue;
        }
        hub.update(sources.objects());
    }
}
