//! A real Kubernetes API server for tests (`tests/kube/`: kube-apiserver 1.20 and
//! etcd on loopback, built once by `tests/kube/install.sh` into
//! `~/.cache/trellis/kube-1.20`), and the control plane and a proxy as plain
//! processes in the root network namespace, where they reach it on 127.0.0.1.
//!
//! An API server listens on the fixed ports of one of two slots ([`SLOTS`]), so
//! that a server left over from a killed run is found and named. An [`ApiServer`]
//! holds its slot for as long as it lives, and a test that starts one waits for a
//! free slot: no more than two run at once, since a start keeps a core busy for
//! about six seconds.
//!
//! The operator's own clients, `kubectl` and `helm`, are real static builds that
//! `scripts/setup` installs into `~/.cache/trellis/bin` ([`tool`]); a test runs
//! them against the API server with the kubeconfig it wrote ([`ApiServer::kubectl`]).

use crate::{
    sidecar::{control_plane_bin, proxy_bin},
    wait, TempDir,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};
use tokio::sync::{Mutex, MutexGuard};

/// The API server's port in slot 0; slot `i` adds `i`.
const APISERVER_PORT: u16 = 16443;
/// etcd's client port in slot 0 (the peer port is the next one); slot `i` adds `2 * i`.
const ETCD_PORT: u16 = 12379;

/// One lock per slot, two slots: at most two API servers run at once.
static SLOTS: [Mutex<()>; 2] = [Mutex::const_new(()), Mutex::const_new(())];

/// A slot's ports, held until dropped.
struct Slot {
    index: u16,
    _held: MutexGuard<'static, ()>,
}

impl Slot {
    /// Waits for the first slot to be free and takes it.
    async fn take() -> Slot {
        let locks = SLOTS.iter().map(|slot| Box::pin(slot.lock()));
        let (held, index, _) = futures_util::future::select_all(locks).await;
        Slot {
            index: u16::try_from(index).expect("two slots"),
            _held: held,
        }
    }

    fn apiserver_port(&self) -> u16 {
        APISERVER_PORT + self.index
    }

    fn etcd_port(&self) -> u16 {
        ETCD_PORT + 2 * self.index
    }
}

/// `tests/kube/` in the source tree.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kube")
}

/// What `install.sh` writes to `bin/BUILD` for the build it makes (its `BUILD`):
/// an older build lacks a fix the tests rely on.
pub const APISERVER_BUILD: &str = "v1.20.2 reflect2-1.0.2 zero-values-not-null";

/// Where `install.sh` puts kube-apiserver and etcd.
pub fn install_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/trellis/kube-1.20")
}

/// Where `scripts/setup` installs `kubectl` and `helm` (`TRELLIS_TOOLS_DIR`, as
/// the script reads it, else `~/.cache/trellis/bin`).
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("TRELLIS_TOOLS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/trellis/bin")
        }
    }
}

/// The operator tool `name` (`kubectl`, `helm`) that `scripts/setup` installed;
/// panics saying to run it when the tool is missing. Tests never download it.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join(name);
    assert!(
        path.is_file(),
        "no {name} at {}: run scripts/setup first (scripts/test does), which installs \
         kubectl and helm there",
        path.display()
    );
    path
}

/// A running etcd + kube-apiserver with fresh state; dropping it stops both.
pub struct ApiServer {
    pub client: ::kube::Client,
    pub kubeconfig: PathBuf,
    started: Started,
    // Released after `started` has stopped the server (fields drop in order).
    _slot: Slot,
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
    /// Waits for a free slot, then starts a server in it (bounded: 90 s). Panics
    /// with what went wrong when it cannot start.
    pub async fn start() -> ApiServer {
        let slot = Slot::take().await;
        let bin = install_dir().join("bin");
        assert!(
            bin.join("kube-apiserver").exists() && bin.join("etcd").exists(),
            "no kube-apiserver/etcd in {}: run tests/kube/install.sh first (scripts/test does)",
            bin.display()
        );
        let build = std::fs::read_to_string(bin.join("BUILD")).unwrap_or_default();
        assert_eq!(
            build.trim(),
            APISERVER_BUILD,
            "the kube-apiserver in {} is an older build: run tests/kube/install.sh again \
             (scripts/test does) to rebuild it",
            bin.display()
        );
        for port in [
            slot.apiserver_port(),
            slot.etcd_port(),
            slot.etcd_port() + 1,
        ] {
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
            .env("APISERVER_PORT", slot.apiserver_port().to_string())
            .env("ETCD_PORT", slot.etcd_port().to_string())
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
        let answered = wait::poll(Duration::from_secs(30), || async {
            client.apiserver_version().await.map_err(|e| e.to_string())
        })
        .await;
        if let Err(e) = answered {
            panic!(
                "the Kubernetes API server does not answer: {e}\napiserver log (tail):\n{}",
                started.log()
            );
        }
        ApiServer {
            client,
            kubeconfig,
            started,
            _slot: slot,
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

    /// Runs the real `kubectl` ([`tool`]) with `args` against this server, through
    /// the kubeconfig it wrote, with `stdin` as its standard input; bounded (60 s).
    pub async fn kubectl(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use tokio::io::AsyncWriteExt;
        let mut command = tokio::process::Command::new(tool("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            // No cache of discovery or OpenAPI outside this run's directory.
            .env("KUBECACHEDIR", self.dir().join("kubectl-cache"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("run kubectl {args:?}: {e}"));
        let mut input = child.stdin.take().expect("kubectl's stdin is piped");
        let stdin = stdin.to_owned();
        let writer = tokio::spawn(async move {
            let _ = input.write_all(stdin.as_bytes()).await;
        });
        let output = wait::within(
            Duration::from_secs(60),
            &format!("kubectl {args:?}"),
            child.wait_with_output(),
        )
        .await
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
        let _ = writer.await;
        output
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

/// A port on 127.0.0.1 that is free when asked and that no other caller in this
/// process gets: counted up from below the kernel's ephemeral range (32768 and
/// up), so that neither another test nor an outgoing connection takes it before
/// its user binds it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(20_000);
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(port < 32_000, "free_port: ports 20000-31999 all handed out");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
        let ready = wait::poll(limit, || {
            self.check_running();
            async move {
                match get(admin, "/ready").await {
                    Ok((200, _)) => Ok(()),
                    Ok((status, body)) => Err(format!(
                        "/ready answers {status}: {}",
                        String::from_utf8_lossy(&body)
                    )),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        if let Err(reason) = ready {
            panic!(
                "{} not ready after {limit:?} ({reason}):\n{}",
                self.name,
                self.log()
            );
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
    /// Flags beyond the ports.
    args: Vec<String>,
}

impl ControlPlane {
    /// Starts it against the API server `kubeconfig` names and waits until it has
    /// translated a first snapshot.
    pub async fn start(kubeconfig: &Path) -> ControlPlane {
        ControlPlane::start_with(kubeconfig, &[]).await
    }

    /// [`ControlPlane::start`] with more flags.
    pub async fn start_with(kubeconfig: &Path, args: &[&str]) -> ControlPlane {
        ControlPlane::start_at(
            kubeconfig,
            SocketAddr::from(([127, 0, 0, 1], free_port())),
            args,
        )
        .await
    }

    /// [`ControlPlane::start_with`], serving proxies on `grpc`.
    pub async fn start_at(kubeconfig: &Path, grpc: SocketAddr, args: &[&str]) -> ControlPlane {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cp = ControlPlane {
            process: Process::new("kube-cp"),
            grpc,
            admin,
            kubeconfig: kubeconfig.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
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
                .args(&self.args)
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
