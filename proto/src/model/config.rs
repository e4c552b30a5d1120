//! The proxy's typed config model and its YAML form (`--config FILE`).
//!
//! This is the one model of DESIGN.md: the static file and (later) the control
//! plane's push both describe services, their endpoints, routes and policy in
//! these types. Values are checked while parsing where they can be (so errors carry
//! a line), the rest (references between services, weights) right after. Route
//! matches (regexes, paths) are checked by the proxy, which compiles them.

pub use super::names::{Method, Workload};
use super::policy::Policy;
use serde::{Deserialize, Serialize};
use std::{collections::HashSet, fmt, net::SocketAddr, num::NonZeroU16, path::Path, sync::Arc};

/// Everything the proxy routes by. An empty config makes the proxy a transparent
/// passthrough: every connection goes to its original destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Shared: a proxy holds each service once, in the resources it was sent
    /// and in the table it runs.
    #[serde(default)]
    pub services: Vec<Arc<Service>>,
    /// Server-side policy for the pod's own ports (what a ServerPolicy becomes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<InboundPort>,
}

/// Policy the receiving proxy applies to calls to one of its pod's ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundPort {
    pub port: NonZeroU16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<super::policy::RateLimit>,
    /// Which callers the port accepts: absent is PERMISSIVE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Who may call the port: absent lets every caller in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<super::authorization::Authorization>,
}

/// What a pod's port accepts from its callers (ServerPolicy `mtls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mesh mTLS: plaintext and any other TLS are refused.
    Strict,
    /// Mesh mTLS and plaintext both.
    #[default]
    Permissive,
    /// No mesh mTLS: callers are told to send plaintext (the port's endpoints carry
    /// no identity), and plaintext is accepted.
    Disable,
}

/// A named service: requests whose authority names it (`name.namespace:port`, or the
/// longer `.svc` / `.svc.cluster.local` forms) go to its endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub port: NonZeroU16,
    /// The service's virtual address; a proxy maps an original destination of
    /// clusterIP:port to this service.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<std::net::IpAddr>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// How requests to this service are routed; none means one route to its own
    /// endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Call sections apply to every route of the service (a route's own win);
    /// destination sections apply to the service's endpoints wherever they are
    /// called, directly or as the backend of another service's route.
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: Policy,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// One rule of an HTTPRoute: requests matching any of `matches` (all requests
/// when empty) go to `backends` by weight (the service itself when empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// Names the route in metrics and logs; defaults to its index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendRef>,
    /// Call sections only, over the service's; a destination section is refused
    /// here, since it belongs to the backend, not to the route.
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: Policy,
}

/// Every condition given must hold (Gateway API HTTPRouteMatch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    pub value: PathValue,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A path match value: a path for Exact and PathPrefix, a regex otherwise; both
/// are checked when the route is compiled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PathValue(pub String);

/// A header or query parameter condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ValueMatch {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
    /// The header or parameter is there, whatever its value.
    Present,
}

/// A weighted reference to a service that serves a route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    pub name: String,
    /// Defaults to the namespace of the service the route belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub port: NonZeroU16,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// One backend address of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Who answers there: the service account its pod runs as, whose certificate
    /// (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`) the calling
    /// proxy should see. Absent: not known (no pod behind it, or not meshed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Workload>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

impl Service {
    /// The label this service carries in metrics and logs: `name.namespace:port`.
    pub fn authority(&self) -> String {
        format!("{}.{}:{}", self.name, self.namespace, self.port)
    }
}

/// A config that could not be loaded: which file, where in it, and what was wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line and column, when the YAML parser knows them.
    pub location: Option<(usize, usize)>,
    /// The field path, e.g. `services[1].endpoints[0].address`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        if !self.path.is_empty() && self.path != "." {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            location: None,
            path: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&file, &text)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        // An empty file is an empty config, not an error.
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError {
                file: file.to_owned(),
                location: inner.location().map(|l| (l.line(), l.column())),
                message: bare_message(&inner.to_string(), &path),
                path,
            }
        })?;
        config.validate().map_err(|(path, message)| ConfigError {
            file: file.to_owned(),
            location: None,
            path,
            message,
        })?;
        Ok(config)
    }

    /// Checks what the types alone cannot; the error is (field path, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut seen = HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            if !is_dns_label(&service.name) {
                return Err((
                    at("name"),
                    format!(
                        "{:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                        service.name
                    ),
                ));
            }
            if !is_dns_label(&service.namespace) {
                return Err((
                    at("namespace"),
                    format!("{:?} is not a DNS label", service.namespace),
                ));
            }
            if !seen.insert(service.authority()) {
                return Err((
                    at("name"),
                    format!("service {} is defined twice", service.authority()),
                ));
            }
        }
        for (i, service) in self.services.iter().enumerate() {
            for (j, route) in service.routes.iter().enumerate() {
                let at = |field: String| format!("services[{i}].routes[{j}].{field}");
                for (k, backend) in route.backends.iter().enumerate() {
                    let namespace = backend.namespace.as_deref().unwrap_or(&service.namespace);
                    let authority = format!("{}.{namespace}:{}", backend.name, backend.port);
                    if !seen.contains(&authority) {
                        return Err((
                            at(format!("backends[{k}].name")),
                            format!("no service {authority} is defined"),
                        ));
                    }
                }
                if let Some(field) = route.policy.destination_field() {
                    return Err((
                        at(format!("policy.{field}")),
                        format!(
                            "{field} follows the destination, not the route: set it in the \
                             policy of the service whose endpoints are called"
                        ),
                    ));
                }
                if !route.backends.is_empty() && route.backends.iter().all(|b| b.weight == 0) {
                    return Err((
                        at("backends".to_owned()),
                        "the weights sum to 0: no request could be sent anywhere".to_owned(),
                    ));
                }
            }
        }
        let mut ports = HashSet::new();
        for (i, inbound) in self.inbound.iter().enumerate() {
            if !ports.insert(inbound.port) {
                return Err((
                    format!("inbound[{i}].port"),
                    format!("port {} is listed twice", inbound.port),
                ));
            }
        }
        Ok(())
    }
}

/// serde_yaml_ng's message repeats the location (" at line L column C") and often
/// the path ("services[0]: ..."); both are reported separately, so keep the rest.
fn bare_message(message: &str, path: &str) -> String {
    let message = match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    match message.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') && path.starts_with(prefix) => {
            rest.to_owned()
        }
        _ => message.to_owned(),
    }
}

/// A DNS label (RFC 1123): what a Service's name and namespace must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ROUTED: &str = "services:
  - name: reviews
    port: 8080
    routes:
      - name: canary
        matches: [{headers: [{name: x-canary, value: \"true\"}]}]
        backends: [{name: reviews-v2, port: 8080}]
      - backends:
          - {name: reviews-v1, port: 8080, weight: 90}
          - {name: reviews-v2, port: 8080, weight: 10}
        policy:
          retry: {attempts: 3, retryOn: [5xx]}
  - {name: reviews-v1, port: 8080, endpoints: [{address: 198.18.0.2:8080}]}
  - {name: reviews-v2, port: 8080, endpoints: [{address: 198.18.0.3:8080}]}
";

    #[test]
    fn routes_backends_and_policy_parse_with_defaults() {
        let config = Config::parse("r.yaml", ROUTED).unwrap();
        let routes = &config.services[0].routes;
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[1].backends[0].weight, 90);
        let retry = routes[1].policy.retry.as_ref().unwrap();
        assert_eq!(retry.attempts, 3);
        assert_eq!(retry.backoff.base, std::time::Duration::from_millis(25));
        assert_eq!(retry.budget.percent.0, 20.0);
    }

    fn error_for(text: &str) -> ConfigError {
        Config::parse("p.yaml", text).unwrap_err()
    }

    #[test]
    fn bad_policy_values_name_file_line_and_field() {
        let base = "services:\n  - name: a\n    port: 80\n    policy:\n";
        let cases = [
            (
                "      retry: {retryOn: [sometimes]}\n",
                "services[0].policy.retry.retryOn[0]",
                "unknown variant `sometimes`",
            ),
            (
                "      retry: {on: [5xx]}\n",
                "services[0].policy.retry.on",
                "the field is `retryOn`",
            ),
            (
                // What kubectl sends for `on:` after reading it as YAML 1.1.
                "      retry: {\"true\": [5xx]}\n",
                "services[0].policy.retry.true",
                "the field is `retryOn`",
            ),
            (
                "      rateLimit: {maxTokens: 1, fillInterval: 1s, keyHeader: \"x user\"}\n",
                "services[0].policy.rateLimit.keyHeader",
                "\"x user\" is not a header name",
            ),
            (
                "      fault: {abort: {httpStatus: 503, percent: 120}}\n",
                "services[0].policy.fault.abort.percent",
                "outside 0 to 100",
            ),
            (
                "      timeouts: {request: 0s}\n",
                "services[0].policy.timeouts.request",
                "greater than zero",
            ),
            (
                "      timeouts: {perTry: -1s}\n",
                "services[0].policy.timeouts.perTry",
                "invalid duration",
            ),
            (
                "      rateLimit: {maxTokens: 0, fillInterval: 1s}\n",
                "services[0].policy.rateLimit.maxTokens",
                "from 1",
            ),
        ];
        for (policy, path, message) in cases {
            let err = error_for(&format!("{base}{policy}"));
            assert_eq!(err.path, path, "{err}");
            assert!(err.message.contains(message), "{err}");
            assert_eq!(err.location.map(|l| l.0), Some(5), "{err}");
        }
    }

    #[test]
    fn bad_routes_are_refused_with_the_field_named() {
        let err = error_for(
            &ROUTED
                .replace("weight: 90", "weight: 0")
                .replace("weight: 10", "weight: 0"),
        );
        assert_eq!(err.path, "services[0].routes[1].backends");
        assert!(err.message.contains("sum to 0"), "{err}");

        let err = error_for(&ROUTED.replace(
            "name: reviews-v2, port: 8080}]",
            "name: ghost, port: 8080}]",
        ));
        assert_eq!(err.path, "services[0].routes[0].backends[0].name");
        assert!(err.message.contains("ghost.default:8080"), "{err}");

        let err = error_for(&ROUTED.replace(
            "retry: {attempts: 3, retryOn: [5xx]}",
            "outlierDetection: {consecutive5xx: 3}",
        ));
        assert_eq!(err.path, "services[0].routes[1].policy.outlierDetection");
        assert!(err.message.contains("follows the destination"), "{err}");
        let err =
            error_for(&ROUTED.replace("matches: [{headers", "matches: [{method: get, headers"));
        assert!(err.message.contains("not an HTTP method"), "{err}");
    }

    #[test]
    fn parses_services_with_defaults() {
        let config = Config::parse(
            "mesh.yaml",
            "services:\n  - name: reviews\n    port: 8080\n    endpoints:\n      - address: 198.18.0.2:8080\n",
        )
        .unwrap();
        assert_eq!(config.services.len(), 1);
        let service = &config.services[0];
        assert_eq!(service.namespace, "default");
        assert_eq!(service.authority(), "reviews.default:8080");
        assert_eq!(
            service.endpoints[0].address,
            "198.18.0.2:8080".parse().unwrap()
        );
    }

    #[test]
    fn empty_file_is_passthrough() {
        assert_eq!(Config::parse("x", "\n").unwrap(), Config::default());
    }

    #[test]
    fn bad_address_names_file_line_and_field() {
        let err = Config::parse(
            "mesh.yaml",
            "services:\n  - name: reviews\n    port: 8080\n    endpoints:\n      - address: 198.18.0.2\n",
        )
        .unwrap_err();
        assert_eq!(err.file, "mesh.yaml");
        assert_eq!(err.path, "services[0].endpoints[0].address");
        assert_eq!(err.location.map(|l| l.0), Some(5));
        let text = err.to_string();
        assert!(
            text.starts_with("mesh.yaml:5:"),
            "error should lead with file and line: {text}"
        );
        assert_eq!(
            text,
            "mesh.yaml:5:18: services[0].endpoints[0].address: invalid socket address syntax"
        );
    }

    #[test]
    fn unknown_field_and_zero_port_are_refused() {
        let err = Config::parse(
            "m.yaml",
            "services:\n  - name: a\n    port: 80\n    weight: 3\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `weight`"), "{err}");
        assert_eq!(err.location.map(|l| l.0), Some(4));

        let err = Config::parse("m.yaml", "services:\n  - name: a\n    port: 0\n").unwrap_err();
        assert_eq!(err.path, "services[0].port");
        assert_eq!(err.location.map(|l| l.0), Some(3));
    }

    #[test]
    fn invalid_names_and_duplicates_name_the_field() {
        let err =
            Config::parse("m.yaml", "services:\n  - name: Reviews\n    port: 80\n").unwrap_err();
        assert_eq!(err.path, "services[0].name");
        let err = Config::parse(
            "m.yaml",
            "services:\n  - {name: a, port: 80}\n  - {name: a, port: 80}\n",
        )
        .unwrap_err();
        assert_eq!(err.path, "services[1].name");
        assert!(err.message.contains("defined twice"), "{err}");
    }
}
