//! Which replica writes status: the holder of a `coordination.k8s.io` Lease. Every
//! replica watches, translates and serves proxies; only the holder writes status,
//! so two replicas never fight over an object's conditions. The holder renews
//! every [`RENEW`]; a Lease not renewed for [`DURATION`] is taken over by another
//! replica. Every change of hands goes through the API server's optimistic
//! concurrency (resourceVersion), so two replicas never both hold it.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::time::Duration;
use tokio::sync::watch;

/// How often the holder renews, and others look.
pub const RENEW: Duration = Duration::from_secs(5);
/// How long a Lease holds without renewal.
pub const DURATION: Duration = Duration::from_secs(15);

/// Holds (or waits for) Lease `namespace/name` as `identity`, telling `leader`
/// whether this replica holds it. Runs until the process ends.
pub async fn hold(
    client: kube::Client,
    namespace: String,
    name: String,
    identity: String,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut renewed_at: Option<tokio::time::Instant> = None;
    loop {
        let held = match try_hold(&api, &name, &identity).await {
            Ok(held) => {
                if held {
                    renewed_at = Some(tokio::time::Instant::now());
                }
                held
            }
            Err(error) => {
                tracing::warn!(lease = %name, %error, "cannot read or renew the lease");
                // Ours until it would have run out.
                renewed_at.is_some_and(|at| at.elapsed() < DURATION)
            }
        };
        if leader.send_replace(held) != held {
            tracing::info!(lease = %name, %identity, held, "status writing {}", if held { "taken" } else { "left to another replica" });
        }
        tokio::time::sleep(RENEW).await;
    }
}

/// One look at the Lease: create, renew or take it over when that is right;
/// whether this replica holds it afterwards.
async fn try_hold(api: &Api<Lease>, name: &str, identity: &str) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let seconds = i32::try_from(DURATION.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
            Err(error) => Err(error),
        };
    };
    let spec = lease.spec.get_or_insert_default();
    let ours = spec.holder_identity.as_deref() == Some(identity);
    if !ours {
        let duration = spec.lease_duration_seconds.map_or(DURATION, |s| {
            Duration::from_secs(u64::try_from(s).unwrap_or(0))
        });
        let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
            let age = now.0.duration_since(renewed.0);
            age.as_secs() >= i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
        });
        if !expired {
            return Ok(false);
        }
        spec.holder_identity = Some(identity.to_owned());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(seconds);
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else renewed or took it first.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}
