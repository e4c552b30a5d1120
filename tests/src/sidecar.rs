//! A Trellis sidecar in a pod: `trellis-proxy init` writes the pod's iptables rules,
//! then `trellis-proxy run` starts as uid 1337, as the injector will arrange.

use crate::{http::get, netns::Pod, prom::Metrics, wait, TempDir};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::OnceLock,
    time::Duration,
};

pub const PROXY_UID: &str = "1337";
pub const ADMIN: &str = "127.0.0.1:15020";

/// The `trellis-proxy` binary the build made.
pub fn proxy_bin() -> PathBuf {
    let built = std::env::var_os("TRELLIS_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/deps/<test> -> target/<profile>/trellis-proxy
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe.parent().expect("exe dir").to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir.join("trellis-proxy")
        });
    assert!(
        built.exists(),
        "{} is missing: build it first with `cargo build --bins` (scripts/test does)",
        built.display()
    );
    built
}

/// Runs `trellis-proxy run` with its listeners on loopback (port 0) and `args`,
/// to its exit: for the cases where it must refuse to start.
pub fn run_refused<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    std::process::Command::new(proxy_bin())
        .args([
            "run",
            "--admin-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .args(["--inbound-addr", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run trellis-proxy")
}

/// The `trellis-control-plane` binary the build made, beside the proxy's.
pub fn control_plane_bin() -> PathBuf {
    let bin = proxy_bin().with_file_name("trellis-control-plane");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --bins` (scripts/test does)",
        bin.display()
    );
    bin
}

/// The binary as uid 1337 can run it: in place when every directory above it is
/// open to others, else a copy made once per test process (the build tree may sit
/// where only root can enter).
pub fn proxy_bin_for_uid() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let built = proxy_bin();
        let open_to_others = built.ancestors().skip(1).all(|dir| {
            dir.metadata()
                .map(|m| m.permissions().mode() & 0o001 != 0)
                .unwrap_or(false)
        });
        if open_to_others {
            return built;
        }
        let dir = std::env::temp_dir().join(format!("trellis-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("chmod bin dir");
        let copy = dir.join("trellis-proxy");
        std::fs::copy(&built, &copy).expect("copy trellis-proxy");
        copy
    })
}

/// A running sidecar; dropping it kills the proxy.
pub struct Sidecar {
    pub pod: Pod,
    child: Child,
    dir: TempDir,
}

/// What to start a sidecar with.
#[derive(Default)]
pub struct Options<'a> {
    /// YAML for `--config`.
    pub config: Option<&'a str>,
    /// Extra `trellis-proxy init` flags.
    pub init_args: &'a [&'a str],
    /// Extra `trellis-proxy run` flags.
    pub run_args: &'a [&'a str],
}

impl Sidecar {
    /// Writes the pod's rules, starts the proxy as uid 1337 and waits until `/ready`.
    pub async fn start(pod: &Pod, options: Options<'_>) -> Sidecar {
        let bin = proxy_bin_for_uid();
        let init = pod
            .command(bin.to_str().unwrap())
            .arg("init")
            .args(options.init_args)
            .output()
            .expect("run trellis-proxy init");
        assert!(
            init.status.success(),
            "trellis-proxy init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let dir = TempDir::new("sidecar");
        let log = std::fs::File::create(dir.0.join("proxy.log")).expect("create log");
        let mut command = pod.command("setpriv");
        command.args([
            "--reuid",
            PROXY_UID,
            "--regid",
            PROXY_UID,
            "--clear-groups",
            "--",
        ]);
        command.arg(bin).arg("run").args(options.run_args);
        if let Some(config) = options.config {
            let path = dir.0.join("config.yaml");
            std::fs::write(&path, config).expect("write config");
            command.arg("--config").arg(&path);
        }
        command.env("RUST_LOG", "info");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn trellis-proxy run");
        let mut sidecar = Sidecar {
            pod: pod.clone(),
            child,
            dir,
        };
        sidecar.wait_ready().await;
        sidecar
    }

    async fn wait_ready(&mut self) {
        let limit = Duration::from_secs(20);
        let pod = self.pod.clone();
        let ready = wait::poll(limit, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "trellis-proxy exited before it was ready ({status}):\n{}",
                    self.log()
                );
            }
            let pod = pod.clone();
            async move {
                match get(&pod, admin(), "/ready").await {
                    Ok((status, _, _)) if status == 200 => Ok(()),
                    Ok((status, _, body)) => Err(format!(
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
                "trellis-proxy not ready after {limit:?} ({reason}):\n{}",
                self.log()
            );
        }
    }

    /// The config file the proxy was started with (tests rewrite it to reload).
    pub fn config_path(&self) -> Option<PathBuf> {
        let path = self.dir.0.join("config.yaml");
        path.exists().then_some(path)
    }

    /// What the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("proxy.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The proxy's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the proxy's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Asserts the proxy's RSS grew by at most `growth_kib` since `before_kib`
    /// (from [`Sidecar::rss_kib`]), and prints both under `what`.
    pub fn assert_rss_bounded(&self, what: &str, before_kib: u64, growth_kib: u64) {
        let after = self.rss_kib();
        eprintln!("RSS {what}: {before_kib} KiB before, {after} KiB after");
        assert!(
            after <= before_kib + growth_kib,
            "{what}: RSS grew from {before_kib} to {after} KiB"
        );
    }

    /// The proxy's metrics, scraped from its admin port.
    pub async fn metrics(&self) -> Metrics {
        let (status, _, body) = get(&self.pod, admin(), "/metrics")
            .await
            .expect("scrape /metrics");
        assert_eq!(status, 200);
        Metrics::parse(&String::from_utf8_lossy(&body))
    }

    /// The proxy's `/config_dump`, or why there is none.
    pub async fn config_dump(&self) -> Result<serde_json::Value, String> {
        let (status, _, body) = get(&self.pod, admin(), "/config_dump")
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("/config_dump: {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    /// Waits (bounded) for the proxy to exit and returns how it exited.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let exited = wait::poll(limit, || {
            let status = self.child.try_wait().expect("try_wait");
            std::future::ready(status.ok_or_else(|| "still running".to_owned()))
        })
        .await;
        exited.unwrap_or_else(|_| {
            panic!(
                "trellis-proxy still running {limit:?} after shutdown:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn admin() -> SocketAddr {
    ADMIN.parse().unwrap()
}
