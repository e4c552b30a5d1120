//! A control plane in local mode, running in a pod of its own, serving a directory
//! the test writes; sidecars in other pods connect to it.

use crate::{
    http::get,
    netns::Pod,
    sidecar::{control_plane_bin, Options, Sidecar},
    wait, TempDir,
};
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

pub const GRPC_PORT: u16 = 15010;

/// A sidecar in `pod` named `name` in namespace `shop`, with its control plane at
/// `url`, and `more` flags.
async fn sidecar_of(pod: &Pod, name: &str, url: &str, more: &[&str]) -> Sidecar {
    let ip = pod.ip.to_string();
    let mut args = vec![
        "--control-plane",
        url,
        "--pod-name",
        name,
        "--pod-namespace",
        "shop",
        "--pod-ip",
        ip.as_str(),
    ];
    args.extend_from_slice(more);
    Sidecar::start(
        pod,
        Options {
            run_args: &args,
            ..Default::default()
        },
    )
    .await
}
pub const ADMIN_PORT: u16 = 15014;

pub struct ControlPlane {
    pub pod: Pod,
    pub dir: TempDir,
    /// Flags beyond `--local DIR`.
    args: Vec<String>,
    child: Option<Child>,
    logs: TempDir,
    starts: usize,
}

impl ControlPlane {
    /// Starts `trellis-control-plane --local <dir>` in `pod` with `files` written
    /// into the directory first.
    pub async fn start(pod: &Pod, files: &[(&str, &str)]) -> ControlPlane {
        ControlPlane::start_with(pod, files, &[]).await
    }

    /// [`ControlPlane::start`] with more flags.
    pub async fn start_with(pod: &Pod, files: &[(&str, &str)], args: &[&str]) -> ControlPlane {
        let dir = TempDir::new("mesh");
        for (name, text) in files {
            std::fs::write(dir.0.join(name), text).expect("write mesh file");
        }
        let mut cp = ControlPlane {
            pod: pod.clone(),
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            logs: TempDir::new("cp-logs"),
            starts: 0,
        };
        cp.restart().await;
        cp
    }

    /// A control plane that is also the mesh CA, its root kept in
    /// `secrets/ca`, with a bootstrap token for each `shop/<account>` of
    /// `accounts` (see [`ControlPlane::meshed_sidecar`]).
    pub async fn issuing(
        pod: &Pod,
        files: &[(&str, &str)],
        secrets: &TempDir,
        accounts: &[&str],
        args: &[&str],
    ) -> ControlPlane {
        let mut lines = String::new();
        for account in accounts {
            lines.push_str(&format!("{account}-token shop/{account}\n"));
            std::fs::write(
                secrets.0.join(format!("{account}.token")),
                format!("{account}-token"),
            )
            .expect("write token");
        }
        let tokens = secrets.0.join("tokens");
        std::fs::write(&tokens, lines).expect("write tokens");
        let ca_dir = secrets.0.join("ca");
        let mut all = vec![
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--bootstrap-tokens",
            tokens.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        ControlPlane::start_with(pod, files, &all).await
    }

    /// A sidecar in `pod`, named `name` in namespace `shop`, certified as
    /// `shop/<account>` by an [`issuing`](ControlPlane::issuing) control plane
    /// that keeps its root in `secrets/ca`.
    pub async fn meshed_sidecar(
        &self,
        pod: &Pod,
        name: &str,
        secrets: &TempDir,
        account: &str,
    ) -> Sidecar {
        let url = format!("https://{}:{GRPC_PORT}", self.pod.ip);
        let anchors = secrets.0.join("ca").join("ca.crt");
        let token = secrets.0.join(format!("{account}.token"));
        let identity = [
            "--trust-anchors",
            anchors.to_str().unwrap(),
            "--identity-token-file",
            token.to_str().unwrap(),
        ];
        sidecar_of(pod, name, &url, &identity).await
    }

    /// A sidecar in `pod`, named `name` in namespace `shop`, taking its config from
    /// this control plane.
    pub async fn sidecar(&self, pod: &Pod, name: &str) -> Sidecar {
        sidecar_of(pod, name, &self.url(), &[]).await
    }

    /// The URL sidecars are given.
    pub fn url(&self) -> String {
        format!("http://{}:{GRPC_PORT}", self.pod.ip)
    }

    fn log_path(&self) -> PathBuf {
        self.logs.0.join("control-plane.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes (or replaces) one file of the served directory.
    pub fn write(&self, name: &str, text: &str) {
        // Write then rename, as an editor or `kubectl` would, so no half file is read.
        let tmp = self.dir.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.dir.0.join(name)).expect("rename");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.0.join(name)).expect("remove");
    }

    /// Kills the control plane at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) and waits until it has translated the directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open log");
        let child = self
            .pod
            .command(control_plane_bin().to_str().unwrap())
            .arg("--local")
            .arg(&self.dir.0)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn trellis-control-plane");
        self.child = Some(child);
        let (pod, admin) = (self.pod.clone(), self.admin());
        let limit = Duration::from_secs(20);
        let ready = wait::poll(limit, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("control plane exited ({status}):\n{}", self.log());
            }
            let pod = pod.clone();
            async move {
                match get(&pod, admin, "/ready").await {
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
                "control plane not ready after {limit:?} ({reason}):\n{}",
                self.log()
            );
        }
    }

    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from((self.pod.ip, ADMIN_PORT))
    }

    /// `GET <path>` on the admin port, as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin_text(path).await).expect("admin JSON")
    }

    /// `GET <path>` on the admin port, as text.
    pub async fn admin_text(&self, path: &str) -> String {
        let (status, _, body) = get(&self.pod, self.admin(), path).await.expect("admin");
        assert_eq!(status, 200, "{path}");
        String::from_utf8(body.to_vec()).expect("admin text")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The mesh CA an [`issuing`](ControlPlane::issuing) control plane keeps in
/// `secrets/ca`, to sign with.
pub fn mesh_ca(secrets: &TempDir) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let read = |name: &str| std::fs::read_to_string(secrets.0.join("ca").join(name)).unwrap();
    let key = rcgen::KeyPair::from_pem(&read("ca.key")).unwrap();
    rcgen::Issuer::from_ca_cert_pem(&read("ca.crt"), key).unwrap()
}

/// A certificate for `shop/<account>`, as a proxy would hold one, signed by
/// `issuer`, written to `secrets/<name>.pem` and `.key`; `expired` puts its
/// validity in the past.
pub fn workload_certificate(
    secrets: &TempDir,
    name: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    account: &str,
    expired: bool,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://cluster.local/ns/shop/sa/{account}")
            .try_into()
            .unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    }
    let cert = params.signed_by(&key, issuer).unwrap();
    let cert_file = secrets.0.join(format!("{name}.pem"));
    let key_file = secrets.0.join(format!("{name}.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (cert_file, key_file)
}
