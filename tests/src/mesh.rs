//! Two pods with sidecars and the apps the tests call, ready to use.

use crate::{
    apps::{self, App},
    netns::{Network, Pod},
    sidecar::{Options, Sidecar},
};
use std::net::SocketAddr;

pub const HTTP: u16 = 8080;
pub const GRPC: u16 = 50051;
pub const WS: u16 = 7070;
pub const ECHO: u16 = 7000;
/// MySQL's port: opaque by default, so no detection.
pub const BANNER_OPAQUE: u16 = 3306;
/// Not an opaque port: detection runs and must give up on the silent client.
pub const BANNER_DETECTED: u16 = 2525;
/// Resets every connection after reading the request.
pub const RESET: u16 = 8090;
/// Answers 503 to 30 % of requests (a seeded draw), 200 to the rest.
pub const FLAKY: u16 = 8082;
/// Answers 500 to every request.
pub const BROKEN: u16 = 8083;

/// Two pods with sidecars; fields drop in order, so processes stop before the
/// namespaces go.
pub struct Mesh {
    pub client: Sidecar,
    pub server: Sidecar,
    /// The server pod's apps, by port.
    apps: Vec<(u16, App)>,
    pub net: Network,
}

impl Mesh {
    /// Both sidecars with these `run` flags and no config.
    pub async fn start(client_run_args: &[&str], server_run_args: &[&str]) -> Mesh {
        Mesh::start_with_config(client_run_args, server_run_args, None).await
    }

    /// The client sidecar with `config` (the services it calls by name).
    pub async fn start_with_config(
        client_run_args: &[&str],
        server_run_args: &[&str],
        config: Option<&str>,
    ) -> Mesh {
        Mesh::start_with_configs(client_run_args, server_run_args, config, None).await
    }

    /// Both sidecars with their own configs.
    pub async fn start_with_configs(
        client_run_args: &[&str],
        server_run_args: &[&str],
        client_config: Option<&str>,
        server_config: Option<&str>,
    ) -> Mesh {
        let net = Network::new(2);
        let server_pod = net.pod(1).clone();
        let apps = vec![
            (HTTP, apps::http_app(server_pod.listen(HTTP), "server")),
            (
                HTTP + 1,
                apps::http_app(server_pod.listen(HTTP + 1), "server-b"),
            ),
            (GRPC, apps::grpc_app(server_pod.listen(GRPC))),
            (WS, apps::websocket_app(server_pod.listen(WS))),
            (ECHO, apps::tcp_echo_app(server_pod.listen(ECHO))),
            (
                BANNER_OPAQUE,
                apps::banner_app(server_pod.listen(BANNER_OPAQUE)),
            ),
            (
                BANNER_DETECTED,
                apps::banner_app(server_pod.listen(BANNER_DETECTED)),
            ),
            (RESET, apps::reset_app(server_pod.listen(RESET))),
            (
                FLAKY,
                apps::failing_app(server_pod.listen(FLAKY), "flaky", 503, 30.0),
            ),
            (
                BROKEN,
                apps::failing_app(server_pod.listen(BROKEN), "broken", 500, 100.0),
            ),
        ];
        let server = Sidecar::start(
            &server_pod,
            Options {
                run_args: server_run_args,
                config: server_config,
                ..Default::default()
            },
        )
        .await;
        let client = Sidecar::start(
            net.pod(0),
            Options {
                run_args: client_run_args,
                config: client_config,
                ..Default::default()
            },
        )
        .await;
        Mesh {
            client,
            server,
            apps,
            net,
        }
    }

    /// The server pod's app on `port`.
    pub fn app(&self, port: u16) -> &App {
        self.apps
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, app)| app)
            .unwrap_or_else(|| panic!("no app on port {port} in the server pod"))
    }

    pub fn client_pod(&self) -> &Pod {
        self.net.pod(0)
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.net.pod(1).ip, port))
    }

    /// Requests each sidecar counted for `protocol`: (client outbound, server inbound).
    pub async fn hops(&self, protocol: &str, code: &str) -> (f64, f64) {
        let client = self.client.metrics().await.sum(
            "trellis_requests_total",
            &[
                ("direction", "outbound"),
                ("protocol", protocol),
                ("code", code),
            ],
        );
        let server = self.server.metrics().await.sum(
            "trellis_requests_total",
            &[
                ("direction", "inbound"),
                ("protocol", protocol),
                ("code", code),
            ],
        );
        (client, server)
    }

    /// Opaque connections each sidecar proxied: (client outbound, server inbound).
    pub async fn opaque_hops(&self) -> (f64, f64) {
        let labels = |direction| [("direction", direction), ("protocol", "opaque")];
        let client = self
            .client
            .metrics()
            .await
            .sum("trellis_tcp_connections_total", &labels("outbound"));
        let server = self
            .server
            .metrics()
            .await
            .sum("trellis_tcp_connections_total", &labels("inbound"));
        (client, server)
    }
}
