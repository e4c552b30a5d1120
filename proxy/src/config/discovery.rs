//! Dynamic mode: config from the control plane over the discovery stream.
//!
//! The proxy opens one stream, says who it is, and applies each version it receives
//! as a change to its running table ([`crate::routing::table::RouteTable::next`],
//! so state survives); it answers every version with an ACK, or a NACK naming the
//! resource and field it refused. When the stream breaks it keeps serving its last
//! good config and reconnects with jittered exponential backoff.
//!
//! A refused resource blocks only itself: the rest of its version applies, the
//! resource keeps its last accepted form (or stays absent), and later versions that
//! do not touch it apply as usual. [`Versions`] keeps the resources the table runs,
//! parsed; a version's changes are parsed and tried on top of them, so a version
//! costs what it changes, not what the mesh holds.

use super::file::check_routes;
use crate::upstream::pool::Pool;
use crate::{
    backoff::backoff, control_plane::ControlPlane, identity::Identity, rng::Rng,
    routing::table::SharedTable,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};
use tokio::sync::{mpsc, watch};
use trellis_proto::{
    model::resources::{assemble, parse_resource, service_name, Parsed, ResourceError},
    v1::{discovery_client::DiscoveryClient, DiscoveryRequest, DiscoveryResponse, Nack, Node},
};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Keeps the proxy's table in step with the control plane, forever.
/// `loaded` turns true once the first version has been applied.
pub async fn run(
    control_plane: ControlPlane,
    node: Node,
    table: SharedTable,
    pool: Arc<Pool>,
    loaded: watch::Sender<bool>,
    identity: Option<Arc<Identity>>,
) {
    // With an identity, the stream presents the proxy's certificate: wait for it.
    if let Some(identity) = &identity {
        identity.wait_certified().await;
    }
    let rng = Rng::from_entropy();
    let mut state = Versions::default();
    let mut failures = 0u32;
    let url = control_plane.url().to_owned();
    loop {
        let seen = state.responses;
        match session(&control_plane, &node, &table, &pool, &loaded, &mut state).await {
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
        let wait = backoff(BACKOFF_BASE, BACKOFF_MAX, failures, &rng);
        tokio::time::sleep(wait).await;
    }
}

/// What the proxy has applied of the control plane's versions.
#[derive(Default)]
pub struct Versions {
    /// The resources the running table was built from, by name, parsed.
    accepted: BTreeMap<String, Arc<Parsed>>,
    applied_version: String,
    responses: u64,
}

/// One connection: runs until the stream ends or fails.
async fn session(
    control_plane: &ControlPlane,
    node: &Node,
    table: &SharedTable,
    pool: &Arc<Pool>,
    loaded: &watch::Sender<bool>,
    state: &mut Versions,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = control_plane.connect().await?;
    let mut client = DiscoveryClient::new(channel);
    let (requests, outgoing) = mpsc::channel(16);
    requests
        .send(DiscoveryRequest {
            node: Some(node.clone()),
            applied_version: state.applied_version.clone(),
            ..Default::default()
        })
        .await?;
    let mut responses = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await?
        .into_inner();
    tracing::info!(url = control_plane.url(), "connected to the control plane");
    // A version comes in parts (`more`); it is applied whole, once the last arrives.
    let mut gathered = None;
    while let Some(part) = responses.message().await? {
        let Some(response) = gather(&mut gathered, part) else {
            continue;
        };
        state.responses += 1;
        let answer = state.apply(&response, table, pool);
        match &answer.nack {
            None => tracing::info!(version = %response.version, "config applied"),
            Some(nack) => tracing::error!(
                version = %response.version,
                resource = %nack.resource,
                error = %nack.message,
                "resource refused; the rest of the version applies"
            ),
        }
        if !state.applied_version.is_empty() {
            loaded.send_replace(true);
        }
        requests.send(answer).await?;
    }
    Ok(())
}

/// Adds `part` to the version being gathered; returns the whole version once its
/// last part has come. Parts of one version arrive together, so a part of another
/// version starts afresh.
fn gather(
    gathered: &mut Option<DiscoveryResponse>,
    part: DiscoveryResponse,
) -> Option<DiscoveryResponse> {
    let whole = match gathered.take() {
        Some(mut so_far) if so_far.version == part.version => {
            so_far.resources.extend(part.resources);
            so_far.removed.extend(part.removed);
            so_far.nonce = part.nonce;
            so_far.more = part.more;
            so_far
        }
        _ => part,
    };
    if whole.more {
        *gathered = Some(whole);
        return None;
    }
    Some(whole)
}

impl Versions {
    /// Applies one response to `table` and says how it went.
    pub fn apply(
        &mut self,
        response: &DiscoveryResponse,
        table: &SharedTable,
        pool: &Arc<Pool>,
    ) -> DiscoveryRequest {
        // What this version changes, on top of what runs: only that is parsed.
        let mut candidate = self.accepted.clone();
        let mut changed: BTreeSet<&str> = BTreeSet::new();
        let mut refused: Vec<ResourceError> = Vec::new();
        if response.full {
            changed.extend(self.accepted.keys().map(String::as_str));
            candidate.clear();
        }
        for resource in &response.resources {
            changed.insert(&resource.name);
            match parse_resource(&resource.name, &resource.json) {
                Ok(parsed) => {
                    candidate.insert(resource.name.clone(), Arc::new(parsed));
                }
                Err(error) => {
                    self.keep_accepted(&mut candidate, &resource.name);
                    refused.push(error);
                }
            }
        }
        for name in &response.removed {
            candidate.remove(name);
            changed.insert(name);
        }
        // A resource the version changed that the whole refuses goes back to how it
        // runs now, and the rest is tried again; one the version did not change
        // refuses it all.
        let built = loop {
            match build(&candidate, table, pool) {
                Ok(new) => break Some(new),
                Err(error) if changed.remove(error.resource.as_str()) => {
                    self.keep_accepted(&mut candidate, &error.resource);
                    refused.push(error);
                }
                Err(error) => {
                    refused.push(error);
                    break None;
                }
            }
        };
        if let Some(new) = built {
            table.store(Arc::new(new));
            self.accepted = candidate;
            self.applied_version = response.version.clone();
        }
        DiscoveryRequest {
            version: response.version.clone(),
            nonce: response.nonce.clone(),
            applied_version: self.applied_version.clone(),
            nack: refused.first().map(|first| Nack {
                resource: first.resource.clone(),
                message: match refused.len() {
                    1 => format!("{}: {}", first.path, first.message),
                    n => format!(
                        "{}: {} (and {} more refused)",
                        first.path,
                        first.message,
                        n - 1
                    ),
                },
            }),
            ..Default::default()
        }
    }

    /// Puts `name` in `candidate` back as it runs now (or takes it out).
    fn keep_accepted(&self, candidate: &mut BTreeMap<String, Arc<Parsed>>, name: &str) {
        match self.accepted.get(name) {
            Some(parsed) => candidate.insert(name.to_owned(), parsed.clone()),
            None => candidate.remove(name),
        };
    }
}

/// The table for `resources`, as a change to the running one; an error names the
/// resource it is about where it can.
fn build(
    resources: &BTreeMap<String, Arc<Parsed>>,
    table: &SharedTable,
    pool: &Arc<Pool>,
) -> Result<crate::routing::table::RouteTable, ResourceError> {
    let config = assemble(resources.iter().map(|(name, parsed)| (name, &**parsed)))?;
    check_routes(&config).map_err(|(path, message)| {
        // "services[i]..." names a service; say which resource that is.
        let resource = path
            .strip_prefix("services[")
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(i, _)| config.services.get(i.parse::<usize>().ok()?))
            .map(|service| service_name(service))
            .unwrap_or_default();
        ResourceError {
            resource,
            path,
            message,
        }
    })?;
    table
        .load()
        .next(config, pool)
        .map_err(|message| ResourceError {
            resource: String::new(),
            path: String::new(),
            message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::v1::Resource;

    #[test]
    fn a_version_in_parts_is_gathered_whole() {
        let part =
            |version: &str, nonce: &str, full: bool, name: &str, more: bool| DiscoveryResponse {
                version: version.into(),
                nonce: nonce.into(),
                full,
                resources: vec![resource(name, "{}")],
                removed: vec![format!("gone-{nonce}")],
                more,
            };
        let mut gathered = None;
        assert!(gather(&mut gathered, part("7", "1", true, "a", true)).is_none());
        assert!(gather(&mut gathered, part("7", "2", false, "b", true)).is_none());
        let whole = gather(&mut gathered, part("7", "3", false, "c", false)).unwrap();
        let names: Vec<&str> = whole.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(whole.removed, ["gone-1", "gone-2", "gone-3"]);
        assert!(whole.full && !whole.more);
        assert_eq!((whole.version.as_str(), whole.nonce.as_str()), ("7", "3"));

        // A stream that broke off mid-version: the next version's parts start afresh.
        assert!(gather(&mut gathered, part("8", "4", true, "a", true)).is_none());
        let next = gather(&mut gathered, part("9", "1", true, "d", false)).unwrap();
        assert_eq!(next.resources.len(), 1);
        assert_eq!(next.version, "9");
        assert!(gathered.is_none());
    }

    fn resource(name: &str, json: &str) -> Resource {
        Resource {
            name: name.into(),
            json: json.as_bytes().to_vec().into(),
        }
    }

    fn response(
        version: &str,
        full: bool,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version: version.into(),
            nonce: format!("n{version}"),
            full,
            resources,
            removed: removed.iter().map(|r| r.to_string()).collect(),
            more: false,
        }
    }

    const WEB: &str = r#"{"name":"web","namespace":"shop","port":80,"endpoints":[{"address":"198.18.0.3:8080"}]}"#;
    const BAD_API: &str = r#"{"name":"api","namespace":"shop","port":80,"routes":[{"matches":[{"path":{"type":"RegularExpression","value":"("}}]}]}"#;

    #[tokio::test]
    async fn applies_full_then_incremental_and_nacks_without_losing_the_good_table() {
        let pool = Pool::new(Duration::from_secs(1));
        let table = crate::routing::table::shared(Default::default(), &pool).unwrap();
        let mut state = Versions::default();
        let full = response("1", true, vec![resource("service/shop/web/80", WEB)], &[]);
        let ack = state.apply(&full, &table, &pool);
        assert!(ack.nack.is_none());
        assert_eq!((ack.version.as_str(), ack.nonce.as_str()), ("1", "n1"));
        assert!(table.load().lookup("web.shop").is_some());

        // An incremental version with a bad regex is refused, naming resource and field.
        let update = response(
            "2",
            false,
            vec![resource("service/shop/api/80", BAD_API)],
            &[],
        );
        let nack = state.apply(&update, &table, &pool);
        let refused = nack.nack.expect("a NACK");
        assert_eq!(refused.resource, "service/shop/api/80");
        assert!(
            refused.message.contains("routes[0].matches[0].path.value"),
            "{}",
            refused.message
        );
        assert!(
            table.load().lookup("web.shop").is_some(),
            "the good table stays"
        );
        assert!(table.load().lookup("api.shop").is_none());

        // The next increment removes it.
        let fixed = response("3", false, vec![], &["service/shop/api/80"]);
        assert!(state.apply(&fixed, &table, &pool).nack.is_none());
        assert_eq!(state.applied_version, "3");
        assert!(table.load().lookup("web.shop").is_some());
    }

    #[tokio::test]
    async fn a_refused_resource_blocks_only_itself() {
        let pool = Pool::new(Duration::from_secs(1));
        let table = crate::routing::table::shared(Default::default(), &pool).unwrap();
        let mut state = Versions::default();
        let full = response("1", true, vec![resource("service/shop/web/80", WEB)], &[]);
        assert!(state.apply(&full, &table, &pool).nack.is_none());

        // A bad resource and a good one in one version: the good one applies.
        let cart = r#"{"name":"cart","namespace":"shop","port":80}"#;
        let mixed = response(
            "2",
            false,
            vec![
                resource("service/shop/api/80", BAD_API),
                resource("service/shop/cart/80", cart),
            ],
            &[],
        );
        let answer = state.apply(&mixed, &table, &pool);
        assert_eq!(answer.nack.expect("a NACK").resource, "service/shop/api/80");
        assert_eq!(answer.applied_version, "2", "the rest of version 2 runs");
        assert!(table.load().lookup("cart.shop").is_some());
        assert!(table.load().lookup("api.shop").is_none());

        // Later versions that leave it alone apply, and are acknowledged.
        for version in ["3", "4"] {
            let web = WEB.replace("198.18.0.3", &format!("198.18.0.{version}"));
            let next = response(
                version,
                false,
                vec![resource("service/shop/web/80", &web)],
                &[],
            );
            let answer = state.apply(&next, &table, &pool);
            assert!(
                answer.nack.is_none(),
                "version {version}: {:?}",
                answer.nack
            );
            assert_eq!(answer.applied_version, version);
            let dump = table.load().effective();
            let web = dump["services"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["service"] == "web.shop:80")
                .unwrap()
                .clone();
            assert_eq!(
                web["endpoints"][0]["address"],
                format!("198.18.0.{version}:8080")
            );
        }
        assert!(table.load().lookup("api.shop").is_none());

        // A fixed form of it is taken.
        let api = r#"{"name":"api","namespace":"shop","port":80}"#;
        let answer = state.apply(
            &response("5", false, vec![resource("service/shop/api/80", api)], &[]),
            &table,
            &pool,
        );
        assert!(answer.nack.is_none());
        assert!(table.load().lookup("api.shop").is_some());
    }
}
