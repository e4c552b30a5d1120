//! A real Kubernetes API server for tests (`tests/kube/`: kube-apiserver 1.20 and
//! etcd on loopback, built once by `tests/kube/install.sh` into
//! `~/.cache/trellis/kube-1.20`), and the control plane and a proxy as plain
//! processes in the root network namespace, where they reach it on 127.0.0.1.
//!
//! The API server listens on fixed ports, so only one may run at a time: an
//! [`ApiServer`] holds a process-wide lock for as long as it lives, and tests that
//! start one run one after another.

use crate::{
    sidecar::{control_plane_bin, proxy_bin},
    TempDir,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};
use tokio::sync::{Mutex, MutexGuard};

/// The port `tests/kube/start.sh` gives the API server.
pub const APISERVER_PORT: u16 = 16443;
/// etcd's client port (the peer port is the next one).
pub const ETCD_PORT: u16 = 12379;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// `tests/kube/` in the source tree.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube")
}

/// Where `install.sh` puts kube-apiserver and etcd.
pub fn install_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/trellis/kube-1.20")
}

/// A running etcd + kube-apiserver with fresh state; dropping it stops both.
pub struct ApiServer {
    pub client: ::kube::Client,
    pub kubeconfig: PathBuf,
    started: Started,
    // Released after `started` has stopped the server (fields drop in order).
    _lock: MutexGuard<'static, ()>,
}

/// What `start.sh RUN` started; `stop.sh RUN` on drop.
struct Started {
    run: TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = std::process::Command::new(scripts_dir().join("stop.sh"))
            .arg(&self.run.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Started {
    /// The last lines of the API server's log.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.run.0.join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl ApiServer {
    /// Waits for any other test's API server to stop, then starts one (bounded:
    /// 90 s). Panics with what went wrong when it cannot start.
    pub async fn start() -> ApiServer {
        let lock = ONE_AT_A_TIME.lock().await;
        let bin = install_dir().join("bin");
        assert!(
            bin.join("kube-apiserver").exists() && bin.join("etcd").exists(),
            "no kube-apiserver/etcd in {}: run tests/kube/install.sh first (scripts/test does)",
            bin.display()
        );
        for port in [APISERVER_PORT, ETCD_PORT, ETCD_PORT + 1] {
            assert!(
                TcpListener::bind(("127.0.0.1", port)).is_ok(),
                "127.0.0.1:{port} is in use: is a kube-apiserver or etcd from an earlier run \
                 still running? (`ss -ltnp 'sport = :{port}'`)"
            );
        }
        let started = Started {
            run: TempDir::new("kube"),
        };
        let script = scripts_dir().join("start.sh");
        let mut command = tokio::process::Command::new(&script);
        command
            .arg(&started.run.0)
            .arg(install_dir())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = match tokio::time::timeout(Duration::from_secs(90), command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => panic!("cannot run {}: {e}", script.display()),
            Err(_) => panic!(
                "{} did not finish within 90 s; apiserver log (tail):\n{}",
                script.display(),
                started.log()
            ),
        };
        assert!(
            output.status.success(),
            "the Kubernetes API server did not start ({}):\n{}\n{}\napiserver log (tail):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            started.log()
        );
        let kubeconfig = started.run.0.join("kubeconfig");
        let client = client_for(&kubeconfig).await;
        // start.sh stops waiting for /readyz after 60 s without failing: prove the
        // server answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.apiserver_version().await {
                Ok(_) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "the Kubernetes API server does not answer: {e}\napiserver log (tail):\n{}",
                    started.log()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ApiServer {
            client,
            kubeconfig,
            started,
            _lock: lock,
        }
    }

    /// The run directory: kubeconfig, pki/, logs.
    pub fn dir(&self) -> &Path {
        &self.started.run.0
    }

    /// The last lines of the API server's log.
    pub fn log(&self) -> String {
        self.started.log()
    }
}

/// A kube client for `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> ::kube::Client {
    let file = ::kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
    let config = ::kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("load {}: {e}", kubeconfig.display()));
    ::kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"))
}

/// A free port on 127.0.0.1 (free when asked; the tests here run one at a time).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// A child process with its stderr in a log file; killed on drop.
pub struct Process {
    name: &'static str,
    child: Option<Child>,
    logs: TempDir,
}

impl Process {
    fn new(name: &'static str) -> Process {
        Process {
            name,
            child: None,
            logs: TempDir::new(name),
        }
    }

    /// Starts `command` (killing the earlier run, if any), its stderr appended to the log.
    fn start(&mut self, command: &mut std::process::Command) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.0.join("log"))
            .expect("open log");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.name));
        self.child = Some(child);
    }

    /// Everything the process (and its earlier runs) logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.logs.0.join("log")).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Panics with its log if it has exited.
    fn check_running(&mut self) {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// Waits (bounded) until `GET /ready` on `admin` answers 200.
    async fn wait_ready(&mut self, admin: SocketAddr, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = get(admin, "/ready").await {
                return;
            }
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "{} not ready after {limit:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `trellis-control-plane` in Kubernetes mode, on loopback ports of its own.
pub struct ControlPlane {
    pub process: Process,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts it against the API server `kubeconfig` names and waits until it has
    /// translated a first snapshot.
    pub async fn start(kubeconfig: &Path) -> ControlPlane {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cp = ControlPlane {
            process: Process::new("kube-cp"),
            grpc,
            admin,
            kubeconfig: kubeconfig.to_owned(),
        };
        cp.restart().await;
        cp
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same ports (killing it first if it runs) and waits
    /// until it is ready.
    pub async fn restart(&mut self) {
        self.process.start(
            std::process::Command::new(control_plane_bin())
                .arg("--grpc-addr")
                .arg(self.grpc.to_string())
                .arg("--admin-addr")
                .arg(self.admin.to_string())
                .env("KUBECONFIG", &self.kubeconfig)
                .env("RUST_LOG", "info,trellis_control_plane=debug"),
        );
        self.process
            .wait_ready(self.admin, Duration::from_secs(30))
            .await;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// `trellis-proxy run` fed by a control plane, on loopback ports of its own.
pub struct Proxy {
    pub process: Process,
    pub admin: SocketAddr,
}

impl Proxy {
    /// Starts it and waits until it is ready (it has a first config).
    pub async fn start(control_plane: &str) -> Proxy {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let outbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let inbound = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut process = Process::new("kube-proxy");
        process.start(
            std::process::Command::new(proxy_bin())
                .arg("run")
                .arg("--control-plane")
                .arg(control_plane)
                .arg("--pod-namespace")
                .arg("shop")
                .arg("--pod-name")
                .arg("client")
                .arg("--outbound-addr")
                .arg(outbound.to_string())
                .arg("--inbound-addr")
                .arg(inbound.to_string())
                .arg("--admin-addr")
                .arg(admin.to_string())
                .env("RUST_LOG", "info"),
        );
        process.wait_ready(admin, Duration::from_secs(30)).await;
        Proxy { process, admin }
    }

    /// The proxy's `/config_dump`.
    pub async fn config_dump(&self) -> serde_json::Value {
        match get(self.admin, "/config_dump").await {
            Ok((200, body)) => serde_json::from_slice(&body).expect("config_dump is JSON"),
            other => panic!(
                "GET /config_dump: {other:?}\nproxy log:\n{}",
                self.process.log()
            ),
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// `GET path` over plain HTTP/1.1 on a new connection; the status and body.
pub async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = http::Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| format!("GET {addr}{path}: no answer in 5 s"))?
}
