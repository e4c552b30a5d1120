//! How the proxy runs: the flags and defaults that the listeners, the config
//! sources and the admin server share (see `trellis-proxy run --help`).

use serde::Serialize;
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};
use trellis_proto::model::duration::serde_text;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub config_file: Option<PathBuf>,
    /// The control plane's discovery URL (dynamic mode), instead of a config file.
    pub control_plane: Option<String>,
    #[serde(skip)]
    pub identity: Identity,
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    #[serde(with = "serde_text")]
    pub detect_timeout: Duration,
    #[serde(with = "serde_text")]
    pub connect_timeout: Duration,
    #[serde(with = "serde_text")]
    pub drain_timeout: Duration,
    /// How often the config file is checked for changes.
    #[serde(with = "serde_text")]
    pub config_poll: Duration,
    pub access_log: bool,
    /// Ports proxied as opaque TCP without detection (server-first protocols).
    pub opaque_ports: BTreeSet<u16>,
}

/// Who this proxy is, as the injector describes it (sent to the control plane).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    pub node: String,
    pub pod_ip: String,
}

/// Linkerd's default opaque ports: SMTP, MySQL, Galera, PostgreSQL, Redis,
/// Elasticsearch, memcached. Their servers speak first, so detection would stall.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];
