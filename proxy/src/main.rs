//! `trellis-proxy`: `init` writes the pod's iptables rules, `run` is the sidecar.

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{
    collections::BTreeSet, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration,
};
use trellis_proto::model::duration;
use trellis_proxy::{
    config::Config,
    iptables::{self, Cidr, Rules},
    settings::{Settings, DEFAULT_OPAQUE_PORTS},
};

#[cfg(feature = "count-allocations")]
#[global_allocator]
static ALLOCATOR: trellis_proxy::allocations::Counting = trellis_proxy::allocations::Counting;

#[derive(Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "Trellis service-mesh sidecar proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the pod's iptables nat rules that redirect its TCP through the proxy.
    Init(InitArgs),
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Wait until the proxy beside this process is ready (`GET /ready` on its
    /// admin port answers 200), at most `--timeout`: a postStart hook, so that
    /// the app's containers start only once the proxy can carry their traffic.
    Wait(WaitArgs),
}

#[derive(Args)]
struct WaitArgs {
    #[arg(long, default_value = "127.0.0.1:15020")]
    admin_addr: SocketAddr,
    #[arg(long, default_value = "120s", value_parser = duration::parse)]
    timeout: Duration,
}

#[derive(Args)]
struct InitArgs {
    /// The uid the proxy runs as; its own traffic is never redirected.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The gid the proxy runs as [default: the proxy uid].
    #[arg(long)]
    proxy_gid: Option<u32>,
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The proxy's admin port, never redirected inbound.
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// Inbound destination ports left alone (comma list).
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma list).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Outbound destination ranges left alone (comma list of CIDRs).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<Cidr>,
    /// Which iptables to write with: `nft`, `legacy`, or (absent) the one this
    /// network namespace already uses, as iptables-wrapper chooses.
    #[arg(long, env = "TRELLIS_IPTABLES_BACKEND")]
    iptables_backend: Option<iptables::Backend>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules init added, and nothing else.
    #[arg(long)]
    cleanup: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct RunArgs {
    /// Static config (services and their endpoints). Without it the proxy is a
    /// transparent passthrough.
    #[arg(long, env = "TRELLIS_CONFIG", conflicts_with = "control_plane")]
    config: Option<PathBuf>,
    /// The control plane's discovery URL, e.g. http://trellis.trellis-system:15010.
    /// Config then comes from it; the proxy is ready once the first version arrives.
    #[arg(long, env = "TRELLIS_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// The roots (PEM) the control plane's certificate must chain to; needed for
    /// an https:// control plane.
    #[arg(long, env = "TRELLIS_TRUST_ANCHORS")]
    trust_anchors: Option<PathBuf>,
    /// The name the control plane's certificate must carry.
    #[arg(
        long,
        env = "TRELLIS_CONTROL_PLANE_NAME",
        default_value = "trellis-control-plane.trellis-system.svc"
    )]
    control_plane_name: String,
    /// The credential this proxy proves its identity with (the pod's projected
    /// service-account token); with it the proxy gets a certificate from the
    /// control plane, and is ready only once it has one.
    #[arg(long, env = "TRELLIS_IDENTITY_TOKEN_FILE", requires = "control_plane")]
    identity_token_file: Option<PathBuf>,
    /// This pod's name, namespace, service account, IP and node, as the injector sets them.
    #[arg(long, env = "TRELLIS_POD_NAME", default_value = "")]
    pod_name: String,
    #[arg(long, env = "TRELLIS_POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,
    #[arg(long, env = "TRELLIS_SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    #[arg(long, env = "TRELLIS_POD_IP", default_value = "")]
    pod_ip: String,
    #[arg(long, env = "TRELLIS_NODE_NAME", default_value = "")]
    node_name: String,
    #[arg(long, default_value = "0.0.0.0:15001")]
    outbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    admin_addr: SocketAddr,
    /// How long to wait for a client's first bytes before treating it as opaque TCP.
    #[arg(long, default_value = "1s", value_parser = duration::parse)]
    detect_timeout: Duration,
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    connect_timeout: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    drain_timeout: Duration,
    /// How often the config file is checked for changes (a bad new file is refused
    /// and the running config kept).
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    config_poll: Duration,
    /// Log one structured line per request (target `access`).
    #[arg(long, env = "TRELLIS_ACCESS_LOG")]
    access_log: bool,
    /// Ports proxied as opaque TCP without protocol detection (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_OPAQUE_PORTS)]
    opaque_ports: Vec<u16>,
    /// How long an HTTP/1 client may take to send a whole request head; a slower
    /// one (slowloris) is disconnected.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    header_read_timeout: Duration,
    /// Open connections per listener (inbound, outbound); more are closed at once.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// The largest request head (HTTP/1: 431 beyond it) or header list (HTTP/2),
    /// in bytes.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(8192..))]
    max_header_bytes: u32,
    /// Streams one HTTP/2 client may have open at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    http2_max_concurrent_streams: u32,
    /// How long any request may wait for its response headers (504 UT after it),
    /// whatever its route's timeouts: an upstream that never answers is not a hang.
    #[arg(long, default_value = "300s", value_parser = duration::parse)]
    response_headers_timeout: Duration,
    /// How long a client may go without sending any of a request body it started
    /// (408 SI after it); upgraded connections and CONNECT tunnels are exempt.
    #[arg(long, default_value = "5m", value_parser = duration::parse)]
    request_idle_timeout: Duration,
    /// Worker threads; 1 runs everything on one thread, which suits a sidecar.
    #[arg(long, default_value_t = 1, env = "TRELLIS_THREADS")]
    threads: usize,
    #[arg(long, value_enum, default_value = "text", env = "TRELLIS_LOG_FORMAT")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(args) => init(args),
        Command::Run(args) => run(*args),
        Command::Wait(args) => wait(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trellis-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let rules = Rules {
        proxy_uid: args.proxy_uid,
        proxy_gid: args.proxy_gid.unwrap_or(args.proxy_uid),
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        admin_port: args.admin_port,
        exclude_inbound_ports: args.exclude_inbound_ports,
        exclude_outbound_ports: args.exclude_outbound_ports,
        exclude_outbound_cidrs: args.exclude_outbound_cidrs,
    };
    let backend = args
        .iptables_backend
        .unwrap_or_else(iptables::Backend::detect);
    if args.dry_run {
        let commands = if args.cleanup {
            iptables::cleanup_commands()
        } else {
            iptables::cleanup_commands()
                .into_iter()
                .chain(rules.install_commands())
                .collect()
        };
        for command in commands {
            println!("{} -t nat {}", backend.command(), command.join(" "));
        }
        return Ok(());
    }
    if args.cleanup {
        iptables::cleanup(backend)?;
    } else {
        iptables::install(&rules, backend)?;
    }
    Ok(())
}

fn wait(args: WaitArgs) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + args.timeout;
    let mut last = String::from("not tried");
    while std::time::Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream =
                std::net::TcpStream::connect_timeout(&args.admin_addr, Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(
                b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })();
        match attempt {
            Ok(answer) if answer.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(answer) => last = answer.lines().last().unwrap_or_default().to_owned(),
            Err(error) => last = error.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!(
        "the proxy at {} was not ready within {:?}: {last}",
        args.admin_addr,
        args.timeout
    )
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into log files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }

    let config = match &args.config {
        Some(path) => trellis_proxy::config::load(path)?,
        None => Config::default(),
    };
    let settings = Settings {
        config_file: args.config,
        control_plane: args.control_plane,
        trust_anchors: args.trust_anchors,
        control_plane_name: args.control_plane_name,
        identity_token_file: args.identity_token_file,
        node: trellis_proto::v1::Node {
            namespace: args.pod_namespace,
            pod: args.pod_name,
            service_account: args.service_account,
            node: args.node_name,
            pod_ip: args.pod_ip,
        },
        outbound_addr: args.outbound_addr,
        inbound_addr: args.inbound_addr,
        admin_addr: args.admin_addr,
        detect_timeout: args.detect_timeout,
        connect_timeout: args.connect_timeout,
        drain_timeout: args.drain_timeout,
        config_poll: args.config_poll,
        access_log: args.access_log,
        opaque_ports: args.opaque_ports.into_iter().collect::<BTreeSet<_>>(),
        header_read_timeout: args.header_read_timeout,
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        max_header_bytes: args.max_header_bytes,
        http2_max_concurrent_streams: args.http2_max_concurrent_streams,
        response_headers_timeout: args.response_headers_timeout,
        request_idle_timeout: args.request_idle_timeout,
    };
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(trellis_proxy::run::run(settings, config))?;
    Ok(())
}
