//! `trellis-proxy wait`, the postStart hook of a classically injected proxy: it
//! returns once the proxy beside it is ready, and fails, saying why, when the proxy
//! is not ready in time (so the pod fails visibly rather than starting its app
//! without a proxy).

use trellis_tests::{
    netns::Network,
    sidecar::{proxy_bin, Options, Sidecar},
};

#[tokio::test]
async fn wait_returns_once_the_proxy_is_ready_and_fails_after_its_timeout() {
    let net = Network::new(1);
    let pod = net.pod(0);
    let _sidecar = Sidecar::start(pod, Options::default()).await;
    let wait = |args: &[&str]| {
        pod.command(proxy_bin().to_str().unwrap())
            .arg("wait")
            .args(args)
            .output()
            .expect("run trellis-proxy wait")
    };
    let ready = wait(&["--timeout", "10s"]);
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    // Nothing answers on this port: the hook gives up after its timeout.
    let absent = wait(&["--admin-addr", "127.0.0.1:15999", "--timeout", "1s"]);
    assert!(!absent.status.success());
    let said = String::from_utf8_lossy(&absent.stderr);
    assert!(
        said.contains("the proxy at 127.0.0.1:15999 was not ready within 1s"),
        "{said}"
    );
}
