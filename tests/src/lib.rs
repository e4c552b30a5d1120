//! End-to-end harness for Trellis: pods as network namespaces ([`netns`]), real
//! sidecars written by `trellis-proxy init` and run as uid 1337 ([`sidecar`]), the
//! applications that run in the pods ([`apps`]) and clients that know nothing of the
//! mesh ([`http`], [`grpc`]); a real Kubernetes API server with the control plane
//! and a proxy as processes beside it ([`kube`]). Tests wait for events, never for
//! a fixed time ([`wait`]).

pub mod apps;
pub mod control_plane;
pub mod fake_apiserver;
pub mod fuzz;
pub mod grpc;
pub mod h2frames;
pub mod http;
pub mod kube;
pub mod kube_api;
pub mod mesh;
pub mod netns;
pub mod policy;
pub mod prom;
pub mod shop;
pub mod sidecar;
pub mod wait;

/// The test gRPC service (`proto/echo.proto`), generated ahead of time like the
/// discovery API.
pub mod proto {
    include!("gen/trellis.test.rs");
}

/// A directory under the system temp dir, readable by the proxy's uid, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "trellis-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
