//! Traffic policy as operators write it (the `spec` of a TrafficPolicy, see
//! docs/reference.md), attached to a service or to one of its routes.
//!
//! Every section is optional: an absent section leaves its stage out of the route's
//! stack; an absent field inside a present section takes the documented default,
//! which `/config_dump` shows. Values are checked while
//! parsing, so a bad one is reported with its file, line and field.

use super::duration::serde_text;
use serde::{de::Error as _, Deserialize, Deserializer, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

impl Policy {
    /// The sections that say how a call is made (`timeouts`, `retry`, `rateLimit`,
    /// `fault`): they apply to calls addressed to the service or route that has them.
    pub fn call_sections(&self) -> Policy {
        Policy {
            connection_pool: None,
            outlier_detection: None,
            load_balancer: None,
            ..self.clone()
        }
    }

    /// The sections that say how a destination is treated (`connectionPool`,
    /// `outlierDetection`, `loadBalancer`): they apply wherever the service's
    /// endpoints are called, directly or as another service's route backend.
    pub fn destination_sections(&self) -> Policy {
        Policy {
            connection_pool: self.connection_pool.clone(),
            outlier_detection: self.outlier_detection.clone(),
            load_balancer: self.load_balancer.clone(),
            ..Policy::default()
        }
    }

    /// The first destination section set here, by its field name.
    pub fn destination_field(&self) -> Option<&'static str> {
        if self.connection_pool.is_some() {
            Some("connectionPool")
        } else if self.outlier_detection.is_some() {
            Some("outlierDetection")
        } else if self.load_balancer.is_some() {
            Some("loadBalancer")
        } else {
            None
        }
    }

    /// This policy with every section `narrower` sets taken from it instead: a
    /// route's policy over its service's.
    pub fn overridden_by(&self, narrower: &Policy) -> Policy {
        Policy {
            timeouts: narrower.timeouts.clone().or_else(|| self.timeouts.clone()),
            retry: narrower.retry.clone().or_else(|| self.retry.clone()),
            connection_pool: narrower
                .connection_pool
                .clone()
                .or_else(|| self.connection_pool.clone()),
            outlier_detection: narrower
                .outlier_detection
                .clone()
                .or_else(|| self.outlier_detection.clone()),
            load_balancer: narrower
                .load_balancer
                .clone()
                .or_else(|| self.load_balancer.clone()),
            rate_limit: narrower
                .rate_limit
                .clone()
                .or_else(|| self.rate_limit.clone()),
            fault: narrower.fault.clone().or_else(|| self.fault.clone()),
        }
    }
}

/// Whole-request and per-attempt deadlines (504, flag `UT`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub request: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try: Option<Duration>,
}

/// What a response or failure must be for a retry to be considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response, a connect failure or a reset.
    #[serde(rename = "5xx")]
    Status5xx,
    /// 502, 503 or 504, a connect failure or a reset.
    GatewayError,
    ConnectFailure,
    /// The upstream closed or reset the connection before answering.
    Reset,
    /// A status listed in `statusCodes`.
    RetriableStatusCodes,
    /// gRPC statuses, read from `grpc-status` in the response headers.
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retry {
    /// Retries after the first attempt.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// `on`, the old name, refused: YAML 1.1 tools (kubectl) read the key `on` as
    /// `true`, so it could never mean what the operator wrote.
    #[serde(
        default,
        rename = "on",
        alias = "true",
        skip_serializing,
        deserialize_with = "renamed_to_retry_on"
    )]
    old_on: Retired,
    #[serde(default)]
    pub status_codes: Vec<StatusCode>,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default)]
    pub budget: Budget,
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// A field that is no longer read, kept only to refuse it by name.
#[derive(Debug, Clone, Default, PartialEq)]
struct Retired;

fn renamed_to_retry_on<'de, D: Deserializer<'de>>(_: D) -> Result<Retired, D::Error> {
    Err(D::Error::custom(
        "the field is `retryOn`: YAML 1.1 tools such as kubectl read the key `on` as `true`",
    ))
}

fn default_attempts() -> u32 {
    2
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::Unavailable,
        RetryOn::Cancelled,
    ]
}

/// Exponential backoff with full jitter: attempt n waits a random time in
/// `[0, min(max, base * 2^n))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Backoff {
    #[serde(default = "default_backoff_base", with = "serde_text")]
    pub base: Duration,
    #[serde(default = "default_backoff_max", with = "serde_text")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}

fn default_backoff_max() -> Duration {
    Duration::from_millis(250)
}

/// Retries may add at most `percent` % of the requests, plus `minPerSecond`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Budget {
    #[serde(default = "default_budget_percent")]
    pub percent: Percent,
    #[serde(default = "default_budget_min")]
    pub min_per_second: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            percent: default_budget_percent(),
            min_per_second: default_budget_min(),
        }
    }
}

fn default_budget_percent() -> Percent {
    Percent(20.0)
}

fn default_budget_min() -> u32 {
    10
}

/// Per-backend limits (Envoy's circuit-breaker thresholds); over one: 503 `UO`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default = "default_limit")]
    pub max_connections: Limit,
    /// May be 0: nothing waits, every request over the limit overflows at once.
    #[serde(default = "default_pending")]
    pub max_pending_requests: u32,
    #[serde(default = "default_limit")]
    pub max_requests: Limit,
    #[serde(default = "default_max_retries")]
    pub max_retries: Limit,
}

fn default_limit() -> Limit {
    Limit(1024)
}

fn default_pending() -> u32 {
    1024
}

fn default_max_retries() -> Limit {
    Limit(3)
}

/// Ejects endpoints that keep failing (Envoy's outlier detection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xx", default = "default_consecutive")]
    pub consecutive_5xx: Limit,
    #[serde(default = "default_consecutive")]
    pub consecutive_gateway_errors: Limit,
    #[serde(default = "default_interval", with = "serde_text")]
    pub interval: Duration,
    #[serde(default = "default_base_ejection", with = "serde_text")]
    pub base_ejection_time: Duration,
    #[serde(default = "default_max_ejection")]
    pub max_ejection_percent: Percent,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: default_consecutive(),
            consecutive_gateway_errors: default_consecutive(),
            interval: default_interval(),
            base_ejection_time: default_base_ejection(),
            max_ejection_percent: default_max_ejection(),
        }
    }
}

fn default_consecutive() -> Limit {
    Limit(5)
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}

fn default_max_ejection() -> Percent {
    Percent(10.0)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BalancerType {
    /// Power of two choices over a peak-EWMA latency estimate (the default).
    #[default]
    P2CEwma,
    /// Consistent hashing on `hashOn`, so one key keeps reaching one endpoint.
    RingHash,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(rename = "type", default)]
    pub kind: BalancerType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderKey>,
    #[serde(default, rename = "sourceIP")]
    pub source_ip: bool,
}

/// A token bucket: starts full with `maxTokens`, gains `tokensPerFill` every
/// `fillInterval` up to `maxTokens`; a request takes one token or gets 429 `RL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimit {
    pub max_tokens: Limit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_fill: Option<Limit>,
    #[serde(with = "serde_text")]
    pub fill_interval: Duration,
    /// One bucket per value of this header (requests without it share one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_header: Option<HeaderKey>,
    #[serde(default = "default_max_keys")]
    pub max_keys: Limit,
}

impl RateLimit {
    pub fn tokens_per_fill(&self) -> u32 {
        self.tokens_per_fill.unwrap_or(self.max_tokens).0
    }
}

fn default_max_keys() -> Limit {
    Limit(10_000)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Delays `percent` % of requests by `fixed` (flag `DI`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    #[serde(with = "serde_text")]
    pub fixed: Duration,
    #[serde(default = "all")]
    pub percent: Percent,
}

/// Answers `percent` % of requests itself (flag `FI`): an HTTP status, or for gRPC
/// a `grpc-status` in a trailers-only response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<StatusCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCode>,
    #[serde(default = "all")]
    pub percent: Percent,
}

fn all() -> Percent {
    Percent(100.0)
}

/// A header name a policy keys on, checked when parsed (so a typo is refused with
/// its field, not silently ignored) and kept lower-cased, as HTTP/2 sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderKey(pub http::HeaderName);

impl Serialize for HeaderKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for HeaderKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        http::HeaderName::from_bytes(text.as_bytes())
            .map(HeaderKey)
            .map_err(|_| D::Error::custom(format!("{text:?} is not a header name")))
    }
}

/// A percentage, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        if (0.0..=100.0).contains(&value) {
            Ok(Percent(value))
        } else {
            Err(D::Error::custom(format!(
                "percentage {value} is outside 0 to 100"
            )))
        }
    }
}

/// A count or limit that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limit(pub u32);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        u32::try_from(value)
            .ok()
            .filter(|v| *v >= 1)
            .map(Limit)
            .ok_or_else(|| D::Error::custom(format!("{value} must be a whole number from 1")))
    }
}

/// An HTTP status code, 100 to 599.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct StatusCode(pub u16);

impl<'de> Deserialize<'de> for StatusCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        u16::try_from(value)
            .ok()
            .filter(|v| (100..=599).contains(v))
            .map(StatusCode)
            .ok_or_else(|| D::Error::custom(format!("{value} is not an HTTP status (100 to 599)")))
    }
}

/// A gRPC status code by its canonical name, e.g. `UNAVAILABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GrpcCode {
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

/// Optional text durations (`10s`) for serde.
mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serde_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        super::super::duration::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}
