//! Dynamic mode: config from the control plane over the discovery stream.
//!
//! The proxy opens one stream, says who it is, and applies each version it receives
//! by rebuilding its [`RouteTable`] and swapping it in; it answers every version with
//! an ACK, or a NACK naming the resource and field it refused (keeping the table it
//! had). When the stream breaks it keeps serving its last good config and reconnects
//! with jittered exponential backoff.
//!
//! Two resource sets are kept: `received`, what the control plane believes this
//! proxy has (incremental updates apply on top of it, refused or not), and the
//! table actually running, built from the last version that was accepted.

use crate::{pool::Pool, rng::Rng, table::RouteTable, table::SharedTable};
use std::{collections::BTreeMap, sync::Arc, time::Duration};
use tokio::sync::{mpsc, watch};
use trellis_proto::{
    model::resources::{from_resources, ResourceError},
    v1::{discovery_client::DiscoveryClient, DiscoveryRequest, DiscoveryResponse, Nack, Node},
};

/// Who this proxy is, as the injector describes it.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    pub node: String,
    pub pod_ip: String,
}

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps the proxy's table in step with the control plane at `url`, forever.
/// `loaded` turns true once the first version has been applied.
pub async fn run(
    url: String,
    identity: Identity,
    table: SharedTable,
    pool: Arc<Pool>,
    loaded: watch::Sender<bool>,
) {
    let rng = Rng::from_entropy();
    let mut state = State {
        received: BTreeMap::new(),
        applied_version: String::new(),
        responses: 0,
    };
    let mut failures = 0u32;
    loop {
        let seen = state.responses;
        match session(&url, &identity, &table, &pool, &loaded, &mut state).await {
            Ok(()) => tracing::warn!(%url, "control plane closed the stream"),
            Err(error) => tracing::warn!(%url, %error, "control plane stream failed"),
        }
        // A stream that delivered config was healthy: start the backoff over.
        failures = if state.responses > seen {
            1
        } else {
            failures + 1
        };
        // Full jitter, so a restarted control plane is not met by every proxy at once.
        let wait = crate::retry::backoff(BACKOFF_BASE, BACKOFF_MAX, failures, &rng);
        tokio::time::sleep(wait).await;
    }
}

struct State {
    received: BTreeMap<String, Vec<u8>>,
    applied_version: String,
    responses: u64,
}

/// One connection: runs until the stream ends or fails.
async fn session(
    url: &str,
    identity: &Identity,
    table: &SharedTable,
    pool: &Arc<Pool>,
    loaded: &watch::Sender<bool>,
    state: &mut State,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = DiscoveryClient::new(channel);
    let (requests, outgoing) = mpsc::channel(16);
    requests
        .send(DiscoveryRequest {
            node: Some(Node {
                namespace: identity.namespace.clone(),
                pod: identity.pod.clone(),
                service_account: identity.service_account.clone(),
                node: identity.node.clone(),
                pod_ip: identity.pod_ip.clone(),
            }),
            applied_version: state.applied_version.clone(),
            ..Default::default()
        })
        .await?;
    let mut responses = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    tracing::info!(%url, "connected to the control plane");
    while let Some(response) = responses.message().await? {
        state.responses += 1;
        let answer = apply(&response, table, pool, state);
        match &answer.nack {
            None => {
                loaded.send_replace(true);
                tracing::info!(version = %response.version, "config applied");
            }
            Some(nack) => tracing::error!(
                version = %response.version,
                resource = %nack.resource,
                error = %nack.message,
                "config refused; keeping the running config"
            ),
        }
        requests.send(answer).await?;
    }
    Ok(())
}

/// Applies one response and says how it went.
fn apply(
    response: &DiscoveryResponse,
    table: &SharedTable,
    pool: &Arc<Pool>,
    state: &mut State,
) -> DiscoveryRequest {
    if response.full {
        state.received.clear();
    }
    for resource in &response.resources {
        state
            .received
            .insert(resource.name.clone(), resource.json.clone());
    }
    for name in &response.removed {
        state.received.remove(name);
    }
    let built = from_resources(&state.received)
        .and_then(|config| {
            crate::config::check_routes(&config).map_err(|(path, message)| {
                // "services[i]..." names a service; say which resource that is.
                let resource = path
                    .strip_prefix("services[")
                    .and_then(|rest| rest.split_once(']'))
                    .and_then(|(i, _)| config.services.get(i.parse::<usize>().ok()?))
                    .map(trellis_proto::model::resources::service_name)
                    .unwrap_or_default();
                ResourceError {
                    resource,
                    path,
                    message,
                }
            })?;
            Ok(config)
        })
        .and_then(|config| {
            RouteTable::new(config, pool).map_err(|message| ResourceError {
                resource: String::new(),
                path: String::new(),
                message,
            })
        });
    let mut answer = DiscoveryRequest {
        version: response.version.clone(),
        nonce: response.nonce.clone(),
        ..Default::default()
    };
    match built {
        Ok(new) => {
            table.store(Arc::new(new));
            state.applied_version = response.version.clone();
        }
        Err(error) => {
            answer.nack = Some(Nack {
                resource: error.resource.clone(),
                message: format!("{}: {}", error.path, error.message),
            });
        }
    }
    answer.applied_version = state.applied_version.clone();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::v1::Resource;

    fn resource(name: &str, json: &str) -> Resource {
        Resource {
            name: name.into(),
            json: json.as_bytes().to_vec(),
        }
    }

    #[tokio::test]
    async fn applies_full_then_incremental_and_nacks_without_losing_the_good_table() {
        let pool = Pool::new(Duration::from_secs(1));
        let table = crate::table::shared(Default::default(), &pool).unwrap();
        let mut state = State {
            received: BTreeMap::new(),
            applied_version: String::new(),
            responses: 0,
        };
        let web = r#"{"name":"web","namespace":"shop","port":80,"endpoints":[{"address":"198.18.0.3:8080"}]}"#;
        let full = DiscoveryResponse {
            version: "1".into(),
            nonce: "a".into(),
            full: true,
            resources: vec![resource("service/shop/web/80", web)],
            removed: vec![],
        };
        let ack = apply(&full, &table, &pool, &mut state);
        assert!(ack.nack.is_none());
        assert_eq!((ack.version.as_str(), ack.nonce.as_str()), ("1", "a"));
        assert!(table.load().lookup("web.shop").is_some());

        // An incremental version with a bad regex is refused, naming resource and field.
        let bad = r#"{"name":"api","namespace":"shop","port":80,"routes":[{"matches":[{"path":{"type":"RegularExpression","value":"("}}]}]}"#;
        let update = DiscoveryResponse {
            version: "2".into(),
            nonce: "b".into(),
            full: false,
            resources: vec![resource("service/shop/api/80", bad)],
            removed: vec![],
        };
        let nack = apply(&update, &table, &pool, &mut state);
        let refused = nack.nack.expect("a NACK");
        assert_eq!(refused.resource, "service/shop/api/80");
        assert!(
            refused.message.contains("routes[0].matches[0].path.value"),
            "{}",
            refused.message
        );
        assert_eq!(nack.applied_version, "1");
        assert!(
            table.load().lookup("web.shop").is_some(),
            "the good table stays"
        );
        assert!(table.load().lookup("api.shop").is_none());

        // The next increment fixes it on top of what was received.
        let fixed = DiscoveryResponse {
            version: "3".into(),
            nonce: "c".into(),
            full: false,
            resources: vec![],
            removed: vec!["service/shop/api/80".into()],
        };
        assert!(apply(&fixed, &table, &pool, &mut state).nack.is_none());
        assert_eq!(state.applied_version, "3");
        assert!(table.load().lookup("web.shop").is_some());
    }
}
