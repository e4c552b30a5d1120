//! Kubernetes mode: the same kinds local mode reads from files (Services,
//! EndpointSlices, Pods, HTTPRoutes, GRPCRoutes, TrafficPolicies, ServerPolicies),
//! watched in every namespace through the API server (`watch.rs`), and the status
//! the translation gives each TrafficPolicy, ServerPolicy, HTTPRoute and GRPCRoute
//! written back to it (`status.rs`) by the replica that holds the Lease
//! (`lease.rs`), when there is one.
//!
//! Whenever a store changes, the stores are read into one
//! [`Objects`](crate::translate::Objects) and handed to the [`Hub`] (which
//! coalesces bursts). Nothing is reported until every kind has listed once (or is
//! known not to be served), so a restarting control plane never pushes a
//! half-listed mesh.

mod lease;
mod status;
mod watch;

pub use status::CONTROLLER_NAME;

use crate::hub::Hub;
use ::kube::Client;
use std::sync::Arc;
use tokio::sync::Notify;

/// Which Lease decides the replica that writes status: its namespace and name,
/// and this replica's identity in it.
pub struct LeaseName {
    pub namespace: String,
    pub name: String,
    pub identity: String,
}

/// Watches the API server and reports every change to `hub`; writes statuses
/// back after each snapshot (with a Lease, only while holding it). Runs until the
/// process ends.
pub async fn run(client: Client, hub: Hub, lease: Option<LeaseName>) {
    let changed = Arc::new(Notify::new());
    let sources = Arc::new(watch::Sources::start(&client, changed.clone()));
    let leader = lease.map(|lease| {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(lease::hold(
            client.clone(),
            lease.namespace,
            lease.name,
            lease.identity,
            tx,
        ));
        rx
    });
    tokio::spawn(status::write_statuses(
        client,
        hub.clone(),
        sources.clone(),
        leader,
    ));
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
