//! `trellis-proxy init` against real iptables in pods: idempotence, exact cleanup,
//! dry runs, and that exclusions really let traffic past the proxy.
//!
//! The exclusion tests run no proxy: a redirected connection then finds nothing
//! listening and is refused, while an excluded one reaches the app.

use std::{net::SocketAddr, process::Output};
use trellis_tests::{
    apps::{self, App},
    netns::{Network, Pod},
    sidecar::proxy_bin,
};

fn init(pod: &Pod, args: &[&str]) -> Output {
    let output = pod
        .command(proxy_bin().to_str().unwrap())
        .arg("init")
        .args(args)
        .output()
        .expect("run trellis-proxy init");
    assert!(
        output.status.success(),
        "trellis-proxy init {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn init_twice_equals_once_and_cleanup_restores_the_table() {
    let net = Network::new(1);
    let pod = net.pod(0);
    // A rule that is not Trellis's must survive init and cleanup.
    let status = pod
        .command("iptables")
        .args([
            "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "RETURN",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let before = pod.nat_rules();

    init(pod, &[]);
    let once = pod.nat_rules();
    assert!(
        once.contains("-A OUTPUT -p tcp -j TRELLIS_OUTPUT"),
        "{once}"
    );
    assert!(
        once.contains("-A PREROUTING -p tcp -j TRELLIS_INBOUND"),
        "{once}"
    );
    assert!(
        once.contains("-A TRELLIS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN"),
        "the admin port is excluded by default: {once}"
    );
    init(pod, &[]);
    assert_eq!(pod.nat_rules(), once, "a second init must change nothing");

    init(pod, &["--cleanup"]);
    assert_eq!(pod.nat_rules(), before);
    // Cleanup with nothing to clean is fine too.
    init(pod, &["--cleanup"]);
    assert_eq!(pod.nat_rules(), before);
}

#[test]
fn init_with_other_flags_replaces_the_earlier_rules() {
    let net = Network::new(1);
    let pod = net.pod(0);
    init(pod, &["--exclude-outbound-ports", "5432"]);
    init(
        pod,
        &[
            "--exclude-outbound-ports",
            "6379",
            "--outbound-port",
            "16001",
        ],
    );
    let rules = pod.nat_rules();
    assert!(!rules.contains("5432"), "{rules}");
    assert!(rules.contains("--dport 6379 -j RETURN"), "{rules}");
    assert!(rules.contains("--to-ports 16001"), "{rules}");
    assert_eq!(rules.matches("-j TRELLIS_OUTPUT").count(), 1, "{rules}");
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    let net = Network::new(1);
    let pod = net.pod(0);
    let before = pod.nat_rules();
    let output = init(
        pod,
        &[
            "--dry-run",
            "--iptables-backend",
            "nft",
            "--exclude-outbound-cidrs",
            "198.19.0.0/16",
        ],
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed
            .contains("iptables-nft -t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
        "{printed}"
    );
    assert!(
        printed.contains("-A TRELLIS_OUTPUT -d 198.19.0.0/16 -j RETURN"),
        "{printed}"
    );
    assert_eq!(pod.nat_rules(), before);
}

#[test]
fn init_writes_with_the_iptables_the_pod_already_uses() {
    let backend = |pod: &Pod| {
        let output = init(pod, &["--dry-run"]);
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        printed.split(' ').next().unwrap_or_default().to_owned()
    };
    let net = Network::new(2);
    // Rules the node (or a CNI) wrote with legacy iptables: init follows them.
    let legacy = net.pod(0);
    let status = legacy
        .command("iptables-legacy")
        .args([
            "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(backend(legacy), "iptables-legacy");
    init(legacy, &[]);
    let saved = legacy
        .command("iptables-legacy-save")
        .args(["-t", "nat"])
        .output()
        .unwrap();
    let saved = String::from_utf8_lossy(&saved.stdout);
    assert!(
        saved.contains("-A OUTPUT -p tcp -j TRELLIS_OUTPUT"),
        "{saved}"
    );
    // No rules either way: the one `iptables` itself is (nf_tables here).
    assert_eq!(backend(net.pod(1)), "iptables-nft");
    let refused = net
        .pod(1)
        .command(proxy_bin().to_str().unwrap())
        .args(["init", "--iptables-backend", "ebtables"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("\"ebtables\" is not an iptables backend"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn bad_flags_are_refused_with_the_value_named() {
    let net = Network::new(1);
    let output = net
        .pod(0)
        .command(proxy_bin().to_str().unwrap())
        .args(["init", "--exclude-outbound-cidrs", "198.18.0.0/40"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("198.18.0.0/40") && stderr.contains("--exclude-outbound-cidrs"),
        "{stderr}"
    );
}

/// Whether a process in `pod` running as `uid` can open a TCP connection to `addr`.
fn can_connect(pod: &Pod, uid: &str, addr: SocketAddr) -> bool {
    pod.command("setpriv")
        .args([
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            "--",
            "bash",
            "-c",
        ])
        .arg(format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()))
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn exclusions_and_the_proxy_uid_bypass_redirection() {
    let net = Network::new(3);
    let (client, server, other) = (net.pod(0), net.pod(1), net.pod(2));
    let _apps: Vec<App> = vec![
        apps::tcp_echo_app(server.listen(8080)),
        apps::tcp_echo_app(server.listen(8081)),
        apps::tcp_echo_app(server.listen(15020)),
        apps::tcp_echo_app(other.listen(8080)),
    ];
    init(
        client,
        &[
            "--exclude-outbound-ports",
            "8081",
            "--exclude-outbound-cidrs",
            &format!("{}/32", other.ip),
        ],
    );
    init(server, &["--exclude-inbound-ports", "8081"]);
    let at = |pod: &Pod, port| SocketAddr::from((pod.ip, port));
    // The connection attempts run as separate processes; keep the apps serving.
    let check = |pod: &Pod, uid: &str, addr| {
        let pod = pod.clone();
        let uid = uid.to_owned();
        tokio::task::spawn_blocking(move || can_connect(&pod, &uid, addr))
    };

    // Outbound from the client pod, no proxy listening on 15001.
    assert!(
        !check(client, "1000", at(server, 8080)).await.unwrap(),
        "redirected to the (absent) outbound proxy"
    );
    assert!(
        check(client, "1000", at(server, 8081)).await.unwrap(),
        "excluded outbound (and inbound) port"
    );
    assert!(
        check(client, "1000", at(other, 8080)).await.unwrap(),
        "excluded outbound CIDR"
    );
    assert!(
        check(client, "1337", at(other, 8080)).await.unwrap(),
        "the proxy's own uid is never redirected"
    );

    // Inbound to the server pod, no proxy listening on 15006.
    assert!(
        !check(other, "1000", at(server, 8080)).await.unwrap(),
        "redirected to the (absent) inbound proxy"
    );
    assert!(
        check(other, "1000", at(server, 8081)).await.unwrap(),
        "excluded inbound port"
    );
    assert!(
        check(other, "1000", at(server, 15020)).await.unwrap(),
        "the admin port is never redirected"
    );

    // Loopback inside the pod is left alone.
    let _local = apps::tcp_echo_app(client.listen(9000));
    assert!(check(client, "1000", "127.0.0.1:9000".parse().unwrap())
        .await
        .unwrap());
}
