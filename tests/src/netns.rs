//! Pods as network namespaces: each pod gets an `eth0` on a bridge of its own test
//! network, an address in 198.18.0.0/24, loopback and a default route, as a pod has.
//!
//! Names carry the process id and a counter, so tests run in parallel; dropping the
//! [`Network`] deletes every namespace it made (and with them their veths and
//! iptables rules), also when a test fails.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Fails the test with a clear message when the machine cannot host pods.
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and iptables rules: run them as root"
    );
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("setpriv", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is missing: install it with `apt-get install -y {package}` (scripts/test does)"
        );
    }
}

/// Runs a command and fails the test with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

static NEXT_NETWORK: AtomicUsize = AtomicUsize::new(0);

/// A bridge and the pods attached to it.
pub struct Network {
    switch: String,
    pods: Vec<Pod>,
    prefix: String,
}

/// One pod: a network namespace with an address.
#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl Network {
    /// Creates a network with `pods` pods at 198.18.0.2, 198.18.0.3, ...
    pub fn new(pods: usize) -> Network {
        require_root_and_tools();
        let prefix = format!(
            "trellis-{}-{}",
            std::process::id(),
            NEXT_NETWORK.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}-sw");
        let mut network = Network {
            switch: switch.clone(),
            pods: Vec::new(),
            prefix: prefix.clone(),
        };
        run("ip", &["netns", "add", &switch]);
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        for i in 0..pods {
            let netns = format!("{prefix}-p{i}");
            let ip = Ipv4Addr::new(198, 18, 0, 2 + i as u8);
            run("ip", &["netns", "add", &netns]);
            network.pods.push(Pod {
                netns: netns.clone(),
                ip,
            });
            let port = format!("port{i}");
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &port,
                    "netns", &switch,
                ],
            );
            run(
                "ip",
                &["-n", &switch, "link", "set", &port, "master", "br0", "up"],
            );
            run(
                "ip",
                &[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
            // A pod has a default route; without one, a connect to an address off the
            // pod network fails before iptables can redirect it.
            run(
                "ip",
                &["-n", &netns, "route", "add", "default", "dev", "eth0"],
            );
        }
        network
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    /// Connects the host (the root network namespace, where the API server and a
    /// control plane in Kubernetes mode run) to pod `i`: a veth from the host to
    /// the network's bridge, the host at `host_ip` and a route to the pod's
    /// address alone. Gone with the network.
    pub fn link_host(&self, i: usize, host_ip: Ipv4Addr) {
        let name = format!(
            "trh{}",
            NEXT_NETWORK.fetch_add(1, Ordering::Relaxed)
                + std::process::id() as usize % 100_000 * 100
        );
        let bridge_side = format!("{name}b");
        run(
            "ip",
            &[
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                &bridge_side,
                "netns",
                &self.switch,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &self.switch,
                "link",
                "set",
                &bridge_side,
                "master",
                "br0",
                "up",
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/32"), "dev", &name],
        );
        run("ip", &["link", "set", &name, "up"]);
        run(
            "ip",
            &[
                "route",
                "add",
                &format!("{}/32", self.pods[i].ip),
                "dev",
                &name,
            ],
        );
    }

    /// The name prefix of everything this network created.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// For harnesses built with `panic = "abort"` (the release profile), where no
/// `Drop` runs: on a panic, kills what runs in this process's namespaces and
/// deletes them, so a failed bench leaves nothing behind.
pub fn clean_up_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let prefix = format!("trellis-{}-", std::process::id());
        let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
            return;
        };
        let list = String::from_utf8_lossy(&list.stdout);
        for netns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if !netns.starts_with(&prefix) {
                continue;
            }
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", netns]).output() {
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }));
}

impl Drop for Network {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}

impl Pod {
    /// Runs `f` on a fresh thread that has entered this pod's network namespace.
    /// Sockets made there stay in the pod and can be used from any thread.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let path = format!("/run/netns/{}", self.netns);
                    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                    // SAFETY: a valid namespace fd; only this short-lived thread moves.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        rc,
                        0,
                        "setns into {}: {}",
                        self.netns,
                        std::io::Error::last_os_error()
                    );
                    f()
                })
                .join()
                .expect("thread inside the pod panicked")
        })
    }

    /// A listener bound inside the pod, for the pod's application.
    pub fn listen(&self, port: u16) -> TcpListener {
        let std = self.within(|| {
            let l = std::net::TcpListener::bind(("0.0.0.0", port))
                .unwrap_or_else(|e| panic!("bind port {port} in {}: {e}", self.netns));
            l.set_nonblocking(true).unwrap();
            l
        });
        TcpListener::from_std(std).expect("register listener with tokio")
    }

    /// An unconnected socket inside the pod: what an application in the pod dials with.
    pub fn socket(&self) -> TcpSocket {
        let std = self.within(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_nonblocking(true).unwrap();
            std::net::TcpStream::from(s)
        });
        TcpSocket::from_std_stream(std)
    }

    /// Connects from inside the pod, as its application would.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let stream = self.socket().connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// `ip netns exec <pod> program args...`
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// The pod's nat table as `iptables-save` prints it, without comments and
    /// packet counters, so two dumps compare equal when the rules are equal.
    pub fn nat_rules(&self) -> String {
        let output = self
            .command("iptables-save")
            .args(["-t", "nat"])
            .output()
            .expect("run iptables-save");
        assert!(output.status.success(), "iptables-save failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.find(" [") {
                Some(i) if l.starts_with(':') => &l[..i],
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Every frame seen on one interface of a pod, from [`Pod::capture`] until
/// [`Capture::stop`]: what a tap on the wire between pods would see.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Capture {
    /// Stops capturing; every frame's bytes, one after the other.
    pub fn stop(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("capture thread"))
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Pod {
    /// Captures the frames of `interface` (both directions) with a packet socket
    /// opened inside the pod, until the capture is stopped. Returns once the
    /// socket is bound, so nothing sent afterwards is missed.
    pub fn capture(&self, interface: &str) -> Capture {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (bound, ready) = std::sync::mpsc::channel();
        let (netns, interface, stopped) = (self.netns.clone(), interface.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let path = format!("/run/netns/{netns}");
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: a valid namespace fd; this thread only captures.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket calls on a descriptor this thread owns.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(interface.clone()).unwrap();
            // SAFETY: a NUL-terminated name.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(index > 0, "no interface {interface} in {netns}");
            // SAFETY: zeroed is a valid sockaddr_ll; the fields are set below.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = protocol;
            address.sll_ifindex = index as i32;
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: pointers to live values of the sizes given.
            unsafe {
                assert_eq!(
                    libc::bind(
                        fd,
                        (&address as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    ),
                    0,
                    "bind the packet socket: {}",
                    std::io::Error::last_os_error()
                );
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            let _ = bound.send(());
            let mut frames = Vec::new();
            let mut buffer = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: the buffer is as long as said.
                let n = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0) };
                if n > 0 {
                    frames.extend_from_slice(&buffer[..n as usize]);
                }
            }
            // SAFETY: closes the descriptor opened above, once.
            unsafe { libc::close(fd) };
            frames
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the capture socket bound");
        Capture {
            stop,
            thread: Some(thread),
        }
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
