//! How the proxy runs: the flags and defaults that the listeners, the config
//! sources and the admin server share (see `trellis-proxy run --help`).

use serde::Serialize;
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};
use trellis_proto::{model::duration::serde_text, v1::Node};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    pub config_file: Option<PathBuf>,
    /// The control plane's discovery URL (dynamic mode), instead of a config file.
    pub control_plane: Option<String>,
    /// The roots the control plane's certificate (and, with mTLS, every meshed
    /// peer's) must chain to; `https://` control planes need them.
    pub trust_anchors: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    pub control_plane_name: String,
    /// The credential the proxy proves its identity with; with it, the proxy gets
    /// a certificate from the control plane and keeps it current.
    pub identity_token_file: Option<PathBuf>,
    /// Who this proxy is, as the injector describes it (sent to the control plane).
    #[serde(skip)]
    pub node: Node,
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
    /// How long an HTTP/1 client may take to send a whole request head: a slow
    /// client (slowloris) is cut off after it.
    #[serde(with = "serde_text")]
    pub header_read_timeout: Duration,
    /// Open connections per listener; more are closed at once and counted.
    pub max_connections: usize,
    /// The largest request head (HTTP/1) or header list (HTTP/2) taken, in bytes.
    pub max_header_bytes: u32,
    /// Streams one HTTP/2 client may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// How long any request may wait for its response headers, whatever its
    /// route says: an upstream that never answers gets a 504, not a hang.
    #[serde(with = "serde_text")]
    pub response_headers_timeout: Duration,
    /// How long a client may stall mid-way through a request body before the
    /// request is cut (408), so it cannot hold an upstream request open.
    #[serde(with = "serde_text")]
    pub request_idle_timeout: Duration,
}

/// Linkerd's default opaque ports: SMTP, MySQL, Galera, PostgreSQL, Redis,
/// Elasticsearch, memcached. Their servers speak first, so detection would stall.
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];
