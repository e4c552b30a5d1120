//! `trellis-control-plane`: watches the Kubernetes API (or, in local mode, a
//! directory of YAML) and pushes each proxy its view of the mesh; `crds` prints the
//! CustomResourceDefinitions.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use trellis_control_plane::{admin, discovery, hub::Hub, source};

#[derive(Parser)]
#[command(
    name = "trellis-control-plane",
    version,
    about = "Trellis service-mesh control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Local mode: the directory of YAML to serve (Services, EndpointSlices, Pods,
    /// HTTPRoutes, TrafficPolicies, ServerPolicies), re-read when it changes.
    /// Without it, the same kinds are watched through the Kubernetes API (in-cluster
    /// config, or KUBECONFIG).
    #[arg(long)]
    local: Option<PathBuf>,
    #[arg(long, default_value = "0.0.0.0:15010")]
    grpc_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15014")]
    admin_addr: SocketAddr,
    /// How long a burst of changes must be quiet before it is pushed.
    #[arg(long, default_value = "100ms", value_parser = trellis_proto::model::duration::parse)]
    debounce: Duration,
    /// How often local mode checks the directory for changes.
    #[arg(long, default_value = "200ms", value_parser = trellis_proto::model::duration::parse)]
    poll: Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Print Trellis's CustomResourceDefinitions (TrafficPolicy, ServerPolicy).
    Crds,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crds) = cli.command {
        print!("{}", trellis_control_plane::crd::crds_yaml());
        return Ok(());
    }
    if let Some(dir) = &cli.local {
        anyhow::ensure!(dir.is_dir(), "--local {}: not a directory", dir.display());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let recorder = admin::metrics_recorder().context("metric buckets")?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).context("metrics recorder")?;
    admin::describe_metrics();

    let hub = Hub::start(cli.debounce, cli.debounce * 10);
    let proxies = discovery::Proxies::default();
    let file_errors = source::local::FileErrors::default();
    let reading = match &cli.local {
        Some(dir) => {
            tokio::spawn(source::local::watch(
                dir.clone(),
                cli.poll,
                hub.clone(),
                file_errors.clone(),
            ));
            format!("local directory {}", dir.display())
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes mode: cannot configure a client (in-cluster config or KUBECONFIG); use --local DIR for local mode")?;
            tokio::spawn(source::kube::run(client, hub.clone()));
            "Kubernetes API".to_owned()
        }
    };

    let admin_listener = tokio::net::TcpListener::bind(cli.admin_addr)
        .await
        .with_context(|| format!("cannot bind the admin port {}", cli.admin_addr))?;
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(admin::Admin {
            hub: hub.clone(),
            proxies: proxies.clone(),
            file_errors,
            metrics: handle,
        }),
    ));
    let grpc_listener = tokio::net::TcpListener::bind(cli.grpc_addr)
        .await
        .with_context(|| format!("cannot bind the gRPC port {}", cli.grpc_addr))?;
    tracing::info!(source = %reading, grpc = %cli.grpc_addr, admin = %cli.admin_addr, "control plane started");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    tonic::transport::Server::builder()
        .add_service(discovery::DiscoveryService::new(hub, proxies))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            async {
                tokio::select! { _ = shutdown => {}, _ = term => {} }
            },
        )
        .await
        .context("gRPC server")?;
    Ok(())
}
