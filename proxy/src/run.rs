//! `trellis-proxy run`: binds the outbound, inbound and admin listeners, starts
//! the config source (file or control plane), serves until SIGTERM or
//! `POST /shutdown`, then drains.

use crate::{
    admin::{self, AdminState},
    config::Config,
    control_plane::ControlPlane,
    identity::Identity,
    listen::{self, Listener},
    metrics::Direction,
    routing::table,
    settings::Settings,
    shutdown,
    upstream::pool::Pool,
};
use std::{io, net::SocketAddr, sync::atomic::Ordering, sync::Arc};
use tokio::net::TcpListener;

/// Runs the proxy until shutdown is requested and the drain finishes.
pub async fn run(settings: Settings, config: Config) -> io::Result<()> {
    let metrics = crate::metrics::install();
    raise_open_files_limit(settings.max_connections);
    let settings = Arc::new(settings);
    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind the {what} listener on {addr}: {e}"),
            )
        })
    };
    let outbound = bind(settings.outbound_addr, "outbound").await?;
    let inbound = bind(settings.inbound_addr, "inbound").await?;
    let admin_listener = bind(settings.admin_addr, "admin").await?;

    let control_plane = match &settings.control_plane {
        Some(url) => Some(
            ControlPlane::new(
                url,
                settings.trust_anchors.as_deref(),
                &settings.control_plane_name,
            )
            .map_err(io::Error::other)?,
        ),
        None => None,
    };
    let identity = match (&settings.identity_token_file, &control_plane) {
        (None, _) => None,
        (Some(token_file), Some(control_plane)) if control_plane.is_tls() => {
            let identity = Arc::new(Identity::default());
            tokio::spawn(crate::identity::run(
                control_plane.clone(),
                token_file.clone(),
                identity.clone(),
            ));
            Some(identity)
        }
        (Some(_), _) => {
            return Err(io::Error::other(
                "--identity-token-file needs an https:// --control-plane and --trust-anchors: \
                 the token is a secret and is never sent in plaintext",
            ))
        }
    };
    let pool = Pool::meshed(settings.connect_timeout, identity.clone());
    let table = table::shared(config, &pool).map_err(io::Error::other)?;
    let admin = AdminState::new(metrics, table.clone(), settings.clone(), identity.clone());
    tokio::spawn(admin::serve(admin_listener, admin.clone()));

    let (loaded_tx, loaded) = tokio::sync::watch::channel(settings.control_plane.is_none());
    if let Some(control_plane) = control_plane {
        tokio::spawn(crate::config::discovery::run(
            control_plane,
            settings.node.clone(),
            table.clone(),
            pool.clone(),
            loaded_tx,
            identity.clone(),
        ));
    } else {
        drop(loaded_tx);
    }
    let (trigger, drain) = shutdown::channel();
    for (listener, direction) in [
        (outbound, Direction::Outbound),
        (inbound, Direction::Inbound),
    ] {
        let state = Listener::new(
            direction,
            &settings,
            loaded.clone(),
            &table,
            &pool,
            identity.clone(),
        );
        tokio::spawn(listen::accept_loop(listener, state, drain.clone()));
    }
    drop(drain);
    if let Some(path) = settings.config_file.clone() {
        tokio::spawn(crate::config::file::watch(
            path,
            settings.config_poll,
            table.clone(),
            pool.clone(),
        ));
    }
    admin.listening.store(true, Ordering::Release);
    tokio::spawn(mark_loaded(loaded, admin.clone()));
    tracing::info!(
        outbound = %settings.outbound_addr,
        inbound = %settings.inbound_addr,
        admin = %settings.admin_addr,
        "proxy ready"
    );

    wait_for_shutdown(&admin).await;
    admin.listening.store(false, Ordering::Release);
    tracing::info!(timeout = ?settings.drain_timeout, "draining");
    if trigger.drain(settings.drain_timeout).await {
        tracing::info!("drained");
    } else {
        tracing::warn!("drain timeout passed with connections still open; exiting");
    }
    Ok(())
}

/// Tells the admin port once the first config is in place.
async fn mark_loaded(mut loaded: tokio::sync::watch::Receiver<bool>, admin: Arc<AdminState>) {
    // Ok at once with a config file (the value starts true); with a control plane,
    // once the first version is applied.
    if loaded.wait_for(|loaded| *loaded).await.is_ok() {
        admin.config_loaded.store(true, Ordering::Release);
    }
}

async fn wait_for_shutdown(admin: &AdminState) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => {
            tracing::warn!("cannot install signal handlers; only POST /shutdown stops the proxy");
            admin.shutdown.notified().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = admin.shutdown.notified() => tracing::info!("shutdown requested on the admin port"),
    }
}

/// Each proxied connection holds two descriptors (client and upstream) on each
/// listener; a soft limit of 1024, common outside containers, would refuse
/// connections long before `--max-connections`. So the soft limit is raised to
/// the hard one at start, as Go programs do, and a hard limit too low is logged.
fn raise_open_files_limit(max_connections: usize) {
    let wanted = (max_connections as u64)
        .saturating_mul(4)
        .saturating_add(256);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-files limit is below what --max-connections on both listeners needs"
        ),
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open-files limit"),
    }
}
