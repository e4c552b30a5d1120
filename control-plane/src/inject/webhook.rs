//! The injector as a mutating admission webhook for Pod CREATE, over TLS with a
//! serving certificate from the mesh CA. The control plane keeps the `caBundle`
//! of its own MutatingWebhookConfiguration current (as istiod does), so no
//! cert-manager is needed, and keeps the trust anchors ConfigMap in each namespace
//! it injects into, which injected proxies mount.

use super::{decide, Decision, Settings, TRUST_KEY};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{ConfigMap, Namespace, Pod},
};
use kube::{
    api::{Api, ObjectMeta, PostParams},
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};
use tokio::net::TcpListener;

/// Counter, label `result`: `injected`, `skipped`, `refused`, `error`.
pub const INJECTIONS_TOTAL: &str = "trellis_injections_total";
/// An AdmissionReview larger than this is refused (a Pod is far smaller).
const MAX_REVIEW_BYTES: usize = 4 << 20;
/// How often the webhook configuration's `caBundle` is checked and repaired.
const CA_BUNDLE_EVERY: Duration = Duration::from_secs(30);

pub fn describe_metrics() {
    metrics::describe_counter!(
        INJECTIONS_TOTAL,
        metrics::Unit::Count,
        "Pods the injector saw, by result: injected, skipped, refused (a bad annotation), error."
    );
}

pub struct Webhook {
    pub settings: Settings,
    pub client: kube::Client,
    /// The trust bundle, PEM: what injected proxies trust.
    pub trust_anchors: String,
}

/// Serves the webhook on `listener` with `tls` until the process ends.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, webhook: Arc<Webhook>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, webhook) = (acceptor.clone(), webhook.clone());
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let service = service_fn(move |req| {
                let webhook = webhook.clone();
                async move { Ok::<_, Infallible>(webhook.handle(req).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Webhook {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(error) => return plain(StatusCode::BAD_REQUEST, &format!("{error}")),
        };
        let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
            Ok(review) => review,
            Err(error) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!("not an AdmissionReview: {error}"),
                )
            }
        };
        let request: AdmissionRequest<Pod> = match review.try_into() {
            Ok(request) => request,
            Err(error) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    &format!("an AdmissionReview without a request: {error}"),
                )
            }
        };
        let response = self.review(&request).await;
        match serde_json::to_vec(&response.into_review()) {
            Ok(json) => Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .unwrap_or_default(),
            Err(error) => plain(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
        }
    }

    /// The answer to one Pod CREATE.
    async fn review(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let allow = AdmissionResponse::from(request);
        let Some(pod) = &request.object else {
            return allow;
        };
        let namespace = request
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        let labels = match Api::<Namespace>::all(self.client.clone())
            .get_opt(&namespace)
            .await
        {
            Ok(found) => found.and_then(|n| n.metadata.labels).unwrap_or_default(),
            Err(error) => {
                return self.failed(
                    allow,
                    &format!("cannot read namespace {namespace}: {error}"),
                )
            }
        };
        let name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();
        match decide(&self.settings, pod, &namespace, &labels) {
            Decision::Skip(reason) => {
                metrics::counter!(INJECTIONS_TOTAL, "result" => "skipped").increment(1);
                tracing::debug!(%namespace, pod = %name, reason, "not injected");
                allow
            }
            Decision::Refuse(message) => {
                metrics::counter!(INJECTIONS_TOTAL, "result" => "refused").increment(1);
                tracing::info!(%namespace, pod = %name, %message, "pod refused");
                allow.deny(message)
            }
            Decision::Inject(patch) => {
                if !request.dry_run {
                    if let Err(error) = self.keep_trust_anchors(&namespace).await {
                        return self.failed(
                            allow,
                            &format!("cannot write the trust anchors in {namespace}: {error}"),
                        );
                    }
                }
                let patch: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(patch) => patch,
                    Err(error) => return self.failed(allow, &error.to_string()),
                };
                match allow.clone().with_patch(patch) {
                    Ok(response) => {
                        metrics::counter!(INJECTIONS_TOTAL, "result" => "injected").increment(1);
                        tracing::info!(%namespace, pod = %name, "injected");
                        response
                    }
                    Err(error) => self.failed(allow, &error.to_string()),
                }
            }
        }
    }

    fn failed(&self, response: AdmissionResponse, message: &str) -> AdmissionResponse {
        metrics::counter!(INJECTIONS_TOTAL, "result" => "error").increment(1);
        tracing::warn!(message, "injection failed");
        response.deny(format!("trellis injector: {message}"))
    }

    /// Creates or updates the trust anchors ConfigMap in `namespace`.
    async fn keep_trust_anchors(&self, namespace: &str) -> Result<(), kube::Error> {
        keep_config_map(
            &self.client,
            namespace,
            &self.settings.trust_anchors_config_map,
            &self.trust_anchors,
        )
        .await
    }
}

/// Makes ConfigMap `namespace/name` hold `pem` under [`TRUST_KEY`].
pub async fn keep_config_map(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([(TRUST_KEY.to_owned(), pem.to_owned())]);
    match api.get_opt(name).await? {
        Some(existing) if existing.data.as_ref() == Some(&data) => Ok(()),
        Some(mut existing) => {
            existing.data = Some(data);
            api.replace(name, &PostParams::default(), &existing).await?;
            Ok(())
        }
        None => {
            let config_map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "trellis".to_owned(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &config_map).await {
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
                other => other.map(|_| ()),
            }
        }
    }
}

/// Keeps every webhook of the MutatingWebhookConfiguration `name` trusting
/// `ca_bundle` (PEM), checking now and every [`CA_BUNDLE_EVERY`] (a `helm
/// upgrade` may reset it).
pub async fn keep_ca_bundle(client: kube::Client, name: String, ca_bundle: String) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut tick = tokio::time::interval(CA_BUNDLE_EVERY);
    loop {
        tick.tick().await;
        match set_ca_bundle(&api, &name, &ca_bundle).await {
            Ok(true) => tracing::info!(configuration = %name, "webhook caBundle set"),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(configuration = %name, %error, "cannot set the webhook caBundle")
            }
        }
    }
}

/// Whether the configuration had to change.
async fn set_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_bundle: &str,
) -> Result<bool, kube::Error> {
    let Some(mut configuration) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let bundle = k8s_openapi::ByteString(ca_bundle.as_bytes().to_vec());
    let mut changed = false;
    for webhook in configuration.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            webhook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &configuration)
            .await?;
    }
    Ok(changed)
}

fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(message.to_owned())))
        .unwrap_or_default()
}
