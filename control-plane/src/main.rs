//! `trellis-control-plane`: watches the Kubernetes API (or, in local mode, a
//! directory of YAML) and pushes each proxy its view of the mesh; `crds` prints the
//! CustomResourceDefinitions.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};
use trellis_control_plane::{
    admin, discovery,
    hub::Hub,
    identity::{
        ca::Authority,
        credentials::Credentials,
        secret,
        service::{IdentityService, ISSUER_EXPIRY_SECONDS, ROOT_EXPIRY_SECONDS},
        tokens::BootstrapTokens,
    },
    inject, source,
};
use trellis_proto::model::config::Workload;

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
    /// How often local mode checks the directory for changes (a file written,
    /// moved or deleted is noticed at once, by inotify).
    #[arg(long, default_value = "200ms", value_parser = trellis_proto::model::duration::parse)]
    poll: Duration,
    /// Be the mesh's certificate authority, with the root (or intermediate) kept in
    /// DIR as ca.crt and ca.key, made there on first start when neither exists. The
    /// gRPC port (discovery and identity) is then served over TLS only.
    #[arg(long, conflicts_with = "ca_secret")]
    ca_dir: Option<PathBuf>,
    /// Kubernetes mode: be the mesh's certificate authority with the root kept in
    /// the Secret NAMESPACE/NAME (`ca.crt`, `ca.key`), made there when it does not
    /// exist and never replaced.
    #[arg(long)]
    ca_secret: Option<String>,
    /// Local mode's credentials: lines of `TOKEN NAMESPACE/SERVICEACCOUNT`. In
    /// Kubernetes mode proxies prove who they are with their service-account
    /// token instead, checked with a TokenReview.
    #[arg(long)]
    bootstrap_tokens: Option<PathBuf>,
    /// The audience a service-account token must have been made for.
    #[arg(long, default_value = "trellis")]
    token_audience: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// How long the certificates proxies get are valid (never past the CA's own).
    #[arg(long, default_value = "24h", value_parser = trellis_proto::model::duration::parse)]
    certificate_lifetime: Duration,
    /// The DNS names proxies reach the control plane by, in its serving certificate.
    #[arg(long, default_value = "trellis-control-plane.trellis-system.svc")]
    server_name: Vec<String>,
    /// The control plane's own identity, as NAMESPACE/SERVICEACCOUNT.
    #[arg(long, default_value = "trellis-system/trellis-control-plane")]
    identity: String,
    /// Kubernetes mode with more than one replica: the Lease NAMESPACE/NAME whose
    /// holder alone writes status. Without it this replica always writes.
    #[arg(long)]
    lease: Option<String>,
    #[command(flatten)]
    inject: InjectArgs,
}

/// The sidecar injector: served in Kubernetes mode when the control plane is the
/// CA (its serving certificate is the webhook's).
#[derive(clap::Args)]
struct InjectArgs {
    /// Where the mutating admission webhook listens.
    #[arg(long, default_value = "0.0.0.0:15017")]
    webhook_addr: SocketAddr,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps.
    #[arg(long, default_value = "trellis-sidecar-injector")]
    webhook_configuration: String,
    /// The image of injected init steps and proxies.
    #[arg(long, default_value = "ghcr.io/trellis-mesh/trellis:latest")]
    proxy_image: String,
    /// Where injected proxies reach the control plane.
    #[arg(
        long,
        default_value = "https://trellis-control-plane.trellis-system.svc:15010"
    )]
    proxy_control_plane: String,
    /// Injected proxies' CPU request, unless a pod's trellis.dev/proxy-cpu says.
    #[arg(long, default_value = "100m")]
    proxy_cpu: String,
    /// Injected proxies' memory request and limit, unless trellis.dev/proxy-memory says.
    #[arg(long, default_value = "64Mi")]
    proxy_memory: String,
    /// Injected proxies' log filter (RUST_LOG).
    #[arg(long, default_value = "info")]
    proxy_log_level: String,
    /// The ConfigMap of trust anchors kept in each injected namespace.
    #[arg(long, default_value = "trellis-trust-anchors")]
    trust_anchors_config_map: String,
    /// Inject native sidecars (`always`), classic ones (`never`), or whichever
    /// the API server supports (`auto`: native from 1.29).
    #[arg(long, default_value = "auto")]
    native_sidecars: NativeSidecars,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NativeSidecars {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Print Trellis's CustomResourceDefinitions (TrafficPolicy, ServerPolicy).
    Crds,
    /// Print the chart's template of the Gateway API CRDs the control plane reads
    /// (HTTPRoute, GRPCRoute).
    GatewayApiCrds,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds) => {
            print!("{}", trellis_control_plane::crd::crds_yaml());
            return Ok(());
        }
        Some(Command::GatewayApiCrds) => {
            use trellis_control_plane::crd::{
                gateway_api_crds_yaml, GATEWAY_API_CRDS_END, GATEWAY_API_CRDS_IF,
            };
            print!(
                "{GATEWAY_API_CRDS_IF}{}{GATEWAY_API_CRDS_END}",
                gateway_api_crds_yaml()
            );
            return Ok(());
        }
        None => {}
    }
    if let Some(dir) = &cli.local {
        anyhow::ensure!(dir.is_dir(), "--local {}: not a directory", dir.display());
    }
    if cli.ca_secret.is_some() {
        anyhow::ensure!(
            cli.local.is_none(),
            "--ca-secret is for Kubernetes mode; in local mode keep the root in --ca-dir DIR"
        );
    }
    if cli.ca_dir.is_some() && cli.local.is_some() {
        anyhow::ensure!(
            cli.bootstrap_tokens.is_some(),
            "--ca-dir in local mode needs credentials to check: --bootstrap-tokens FILE"
        );
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
    let client = match &cli.local {
        Some(_) => None,
        None => Some(kube::Client::try_default().await.context(
            "Kubernetes mode: cannot configure a client (in-cluster config or KUBECONFIG); use --local DIR for local mode",
        )?),
    };
    let reading = match (&cli.local, &client) {
        (Some(dir), _) => {
            tokio::spawn(source::local::watch(
                dir.clone(),
                cli.poll,
                hub.clone(),
                file_errors.clone(),
            ));
            format!("local directory {}", dir.display())
        }
        (None, Some(client)) => {
            let lease = match &cli.lease {
                None => None,
                Some(lease) => {
                    let (namespace, name) = lease
                        .split_once('/')
                        .context("--lease: expected NAMESPACE/NAME")?;
                    // The pod's name (the chart sets POD_NAME), unique per replica.
                    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
                        format!(
                            "{}-{}",
                            std::process::id(),
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_nanos())
                        )
                    });
                    Some(source::kube::LeaseName {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                        identity,
                    })
                }
            };
            tokio::spawn(source::kube::run(client.clone(), hub.clone(), lease));
            "Kubernetes API".to_owned()
        }
        (None, None) => anyhow::bail!("neither --local nor a Kubernetes client"),
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
    let mut server = tonic::transport::Server::builder();
    let mut identity = None;
    let authority = match (&cli.ca_dir, &cli.ca_secret, &client) {
        (Some(dir), _, _) => Some(Authority::load_or_create(
            dir,
            &cli.trust_domain,
            cli.certificate_lifetime,
        )),
        (None, Some(secret), Some(client)) => {
            let (namespace, name) = secret
                .split_once('/')
                .context("--ca-secret: expected NAMESPACE/NAME")?;
            Some(
                secret::load_or_create(
                    client,
                    namespace,
                    name,
                    &cli.trust_domain,
                    cli.certificate_lifetime,
                )
                .await,
            )
        }
        _ => None,
    };
    if let Some(authority) = authority {
        let authority = Arc::new(authority.context("the certificate authority")?);
        let credentials = match (&cli.bootstrap_tokens, client.clone()) {
            (Some(tokens), _) => {
                Credentials::Bootstrap(BootstrapTokens::load(tokens).map_err(anyhow::Error::msg)?)
            }
            (None, Some(client)) => Credentials::Kubernetes {
                client,
                audience: cli.token_audience.clone(),
            },
            (None, None) => anyhow::bail!("--ca-dir in local mode needs --bootstrap-tokens FILE"),
        };
        let (namespace, service_account) = cli
            .identity
            .split_once('/')
            .context("--identity: expected NAMESPACE/SERVICEACCOUNT")?;
        let workload = Workload {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let (chain, key) = authority
            .serving_certificate(&workload, &cli.server_name)
            .context("the control plane's serving certificate")?;
        // Proxies present their mesh certificate once they have one: discovery
        // requires it, identity (where they get it) cannot.
        let bundle = authority.trust_bundle_pem();
        server = server
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(&chain, &key))
                    .client_ca_root(tonic::transport::Certificate::from_pem(bundle))
                    .client_auth_optional(true),
            )
            .context("TLS for the gRPC port")?;
        if let (Some(client), None) = (&client, &cli.local) {
            start_injector(&cli, client.clone(), &authority, &chain, &key).await?;
        }
        tokio::spawn(report_root_expiry(authority.clone()));
        identity = Some(IdentityService::new(authority, Arc::new(credentials)));
    }
    server
        .add_service(discovery::DiscoveryServer::new(
            hub,
            proxies,
            identity.is_some(),
        ))
        .add_optional_service(identity)
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

/// Serves the injection webhook with the control plane's serving certificate, and
/// keeps its configuration's caBundle and the proxies' trust anchors current.
async fn start_injector(
    cli: &Cli,
    client: kube::Client,
    authority: &Authority,
    chain: &str,
    key: &str,
) -> anyhow::Result<()> {
    let args = &cli.inject;
    let native_sidecars = match args.native_sidecars {
        NativeSidecars::Always => true,
        NativeSidecars::Never => false,
        NativeSidecars::Auto => {
            let version = client
                .apiserver_version()
                .await
                .context("the API server's version")?;
            let minor: u32 = version
                .minor
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or(0);
            version.major == "1" && minor >= 29
        }
    };
    let namespace = cli
        .identity
        .split_once('/')
        .map_or("trellis-system", |(namespace, _)| namespace)
        .to_owned();
    let trust_anchors = authority.trust_bundle_pem();
    let settings = inject::Settings {
        proxy_image: args.proxy_image.clone(),
        control_plane_url: args.proxy_control_plane.clone(),
        control_plane_name: cli.server_name.first().cloned().unwrap_or_default(),
        namespace,
        native_sidecars,
        token_audience: cli.token_audience.clone(),
        trust_anchors_config_map: args.trust_anchors_config_map.clone(),
        proxy_cpu: args.proxy_cpu.clone(),
        proxy_memory: args.proxy_memory.clone(),
        log_level: args.proxy_log_level.clone(),
    };
    let tls = webhook_tls(chain, key).context("TLS for the webhook")?;
    let listener = tokio::net::TcpListener::bind(args.webhook_addr)
        .await
        .with_context(|| format!("cannot bind the webhook port {}", args.webhook_addr))?;
    tracing::info!(addr = %args.webhook_addr, native_sidecars, "sidecar injector started");
    tokio::spawn(inject::webhook::keep_ca_bundle(
        client.clone(),
        args.webhook_configuration.clone(),
        trust_anchors.clone(),
    ));
    tokio::spawn(inject::webhook::serve(
        listener,
        tls,
        Arc::new(inject::webhook::Webhook {
            settings,
            client,
            trust_anchors,
        }),
    ));
    Ok(())
}

/// A TLS server configuration of a PEM chain and key.
fn webhook_tls(chain: &str, key: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certificates = pem::parse_many(chain)?
        .into_iter()
        .map(|block| rustls::pki_types::CertificateDer::from(block.into_contents()))
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pem::parse(key)?.into_contents().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certificates, key)?;
    Ok(Arc::new(config))
}

/// Keeps the seconds left on the CA's own certificate and on the first root of
/// its trust bundle on `/metrics`.
async fn report_root_expiry(authority: Arc<Authority>) {
    let (issuer, root) = (
        metrics::gauge!(ISSUER_EXPIRY_SECONDS),
        metrics::gauge!(ROOT_EXPIRY_SECONDS),
    );
    let left = |at: std::time::SystemTime| {
        at.duration_since(std::time::SystemTime::now())
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        issuer.set(left(authority.not_after()));
        root.set(left(authority.roots_not_after()));
    }
}
