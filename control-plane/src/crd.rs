//! Trellis's own kinds, `TrafficPolicy` and `ServerPolicy` (group
//! `policy.trellis.dev`, version `v1alpha1`, namespaced), as the operator writes
//! them (`shared/API.md`, `docs/reference.md`).
//!
//! The policy sections (`timeouts`, `retry`, ... for a TrafficPolicy; `rateLimit`,
//! `mtls`, `authorization` for a ServerPolicy) are kept here as raw JSON with a
//! permissive schema (`x-kubernetes-preserve-unknown-fields`) rather than typed:
//! their one typed form is the proxy's model in `trellis-proto`, which has no
//! `JsonSchema`. Translation deserialises each section into the model type, so a
//! bad value is reported on the object's status with the field named
//! (`spec.retry.retryOn[0]: unknown variant ...`) and the same checks hold in a cluster
//! and in local mode. `targetRefs` and `ports` are typed, as the API server can
//! check them itself.
//!
//! Both kinds have a `status` subresource holding Gateway-API-style `conditions`
//! (`Accepted`, `ResolvedRefs`), which the control plane writes.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The API group of both kinds.
pub const GROUP: &str = "policy.trellis.dev";

/// How clients call a service (applied by the calling proxy). Every section is
/// optional; an absent one leaves its stage out.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "policy.trellis.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "Default",
    derive = "PartialEq",
    shortname = "tp",
    category = "trellis",
    doc = "How clients call a Service or the routes of an HTTPRoute: timeouts, retries, connection limits, outlier detection, load balancing, rate limits and fault injection.",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// What the policy applies to: a Service (optionally one port by sectionName),
    /// or an HTTPRoute (optionally one rule by sectionName: its name, or its index).
    pub target_refs: Vec<TargetRef>,
    /// `{request, perTry}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub timeouts: Option<Value>,
    /// `{attempts, retryOn, statusCodes, backoff, budget, retryNonIdempotent}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub retry: Option<Value>,
    /// `{maxConnections, maxPendingRequests, maxRequests, maxRetries}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub connection_pool: Option<Value>,
    /// `{consecutive5xx, consecutiveGatewayErrors, interval, baseEjectionTime, maxEjectionPercent}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub outlier_detection: Option<Value>,
    /// `{type: P2CEwma | RingHash, hashOn: {header | sourceIP}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub load_balancer: Option<Value>,
    /// `{maxTokens, tokensPerFill, fillInterval, keyHeader, maxKeys}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub rate_limit: Option<Value>,
    /// `{delay: {fixed, percent}, abort: {httpStatus | grpcStatus, percent}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub fault: Option<Value>,
    /// Fields this version does not know. The API server prunes them; in local
    /// mode they are kept here so translation can refuse a misspelt section
    /// instead of ignoring it.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, Value>,
}

/// How a service's pods accept calls (applied by the receiving proxy).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "policy.trellis.dev",
    version = "v1alpha1",
    kind = "ServerPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "Default",
    derive = "PartialEq",
    shortname = "sp",
    category = "trellis",
    doc = "How the pods of a Service accept calls: mTLS mode, an inbound rate limit and authorization.",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServerPolicySpec {
    /// The Services whose pods apply the policy (optionally one port by
    /// sectionName, the port's name).
    pub target_refs: Vec<TargetRef>,
    /// Service ports the policy covers; absent: every port of the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub ports: Option<Vec<i32>>,
    /// `STRICT`, `PERMISSIVE` (default) or `DISABLE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mtls_schema")]
    pub mtls: Option<Value>,
    /// `{maxTokens, tokensPerFill, fillInterval, keyHeader, maxKeys}`, per pod port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub rate_limit: Option<Value>,
    /// `{action: ALLOW | DENY, rules: [{from: [...], to: [...]}]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub authorization: Option<Value>,
    /// Fields this version does not know (see [`TrafficPolicySpec::unknown`]).
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, Value>,
}

fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// A reference to an object in the policy's own namespace (Gateway API's
/// `LocalPolicyTargetReferenceWithSectionName`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// `""` (or `core`) for a Service, `gateway.networking.k8s.io` for an HTTPRoute.
    /// Absent means `""`; the schema states no default, which some API servers
    /// (1.20) refuse for an empty string.
    #[serde(default)]
    #[schemars(transform = no_default)]
    pub group: String,
    /// `Service` or `HTTPRoute`.
    pub kind: String,
    pub name: String,
    /// A Service port's name, or an HTTPRoute rule's name (its index when unnamed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// What the control plane observed: `Accepted` and `ResolvedRefs` conditions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// One condition per type (server-side apply merges them by type).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A ServerPolicy's `authorization`. Checked during translation; not yet enforced.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Authorization {
    pub action: AuthorizationAction,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    /// Only calls matching a rule pass.
    Allow,
    /// Calls matching a rule are refused.
    Deny,
}

/// A call matches when it comes from any of `from` and goes to any of `to` (an
/// empty list matches everything).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationRule {
    #[serde(default)]
    pub from: Vec<AuthorizationSource>,
    #[serde(default)]
    pub to: Vec<AuthorizationOperation>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationSource {
    /// Exact SPIFFE IDs.
    #[serde(default)]
    pub identities: Vec<String>,
    /// `namespace/name`.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationOperation {
    /// Service ports, as ServerPolicy `ports` names them.
    #[serde(default)]
    pub ports: Vec<i32>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
}

/// Any JSON object, kept as written; translation checks it.
fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn mtls_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["STRICT", "PERMISSIVE", "DISABLE"],
    })
}

/// Both CustomResourceDefinitions as multi-document YAML (`---` between them), for
/// `kubectl apply -f -` and the Helm chart.
pub fn crds_yaml() -> String {
    [TrafficPolicy::crd(), ServerPolicy::crd()]
        .iter()
        .map(|crd| {
            // A CRD is plain data: serialising it cannot fail.
            serde_yaml_ng::to_string(crd).unwrap_or_else(|e| format!("# not serialisable: {e}\n"))
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// What wraps the Gateway API CRDs in the chart's template.
pub const GATEWAY_API_CRDS_IF: &str = "{{- if .Values.gatewayAPI.installCRDs }}\n";
pub const GATEWAY_API_CRDS_END: &str = "{{- end }}\n";

/// The HTTPRoute and GRPCRoute CRDs of the Gateway API version the control plane
/// reads (the gateway-api crate's types), as multi-document YAML in a form every
/// API server from 1.20 on takes (see [`for_kubernetes_1_20`]): what the chart
/// installs when `gatewayAPI.installCRDs` is on.
pub fn gateway_api_crds_yaml() -> String {
    use gateway_api::apis::standard::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
    [HttpRoute::crd(), GrpcRoute::crd()]
        .iter()
        .map(|crd| {
            serde_yaml_ng::to_string(&for_kubernetes_1_20(crd))
                .unwrap_or_else(|e| format!("# not serialisable: {e}\n"))
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `crd` as Kubernetes 1.20 takes it: without the JSON value that server
/// mishandles in a schema, and with the `api-approved.kubernetes.io` annotation
/// when its group is a `*.k8s.io` one.
///
/// In 1.20 a `null` in an `enum` (schemars writes one for an optional enum, as in
/// the gateway-api crate's routes) silently fails the CRD's v1 conversion, which
/// then shows as "per-version schemas may not all be set to identical values".
/// Newer servers take it; `null` is never sent. The annotation is one the upstream
/// Gateway API CRDs carry but `HttpRoute::crd()` (generated by kube-derive) lacks.
pub fn for_kubernetes_1_20(crd: &CustomResourceDefinition) -> CustomResourceDefinition {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                if let Some(Value::Array(values)) = map.get_mut("enum") {
                    values.retain(|v| !v.is_null());
                }
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(crd) else {
        return crd.clone();
    };
    strip(&mut value["spec"]);
    let mut crd: CustomResourceDefinition =
        serde_json::from_value(value).unwrap_or_else(|_| crd.clone());
    if crd.spec.group.ends_with(".k8s.io") {
        crd.metadata.annotations.get_or_insert_default().insert(
            "api-approved.kubernetes.io".into(),
            "https://github.com/kubernetes-sigs/gateway-api/pull/2466".into(),
        );
    }
    crd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart installs the Gateway API CRDs from a template, behind a value.
    #[test]
    fn the_chart_holds_the_generated_gateway_api_crds() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/trellis/templates/gateway-api-crds.yaml"
        );
        let in_chart = std::fs::read_to_string(path).expect("read the chart's Gateway API CRDs");
        let expected = format!(
            "{GATEWAY_API_CRDS_IF}{}{GATEWAY_API_CRDS_END}",
            gateway_api_crds_yaml()
        );
        assert!(
            in_chart == expected,
            "charts/trellis/templates/gateway-api-crds.yaml is out of date: regenerate it with \
             `cargo run -p trellis-control-plane -- gateway-api-crds > charts/trellis/templates/gateway-api-crds.yaml`"
        );
    }

    /// The Helm chart installs the CRDs from a file; it must be what the types say.
    #[test]
    fn the_chart_holds_the_generated_crds() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/trellis/crds/trellis-policies.yaml"
        );
        let in_chart = std::fs::read_to_string(path).expect("read the chart's CRDs");
        assert!(
            in_chart == crds_yaml(),
            "charts/trellis/crds/trellis-policies.yaml is out of date: regenerate it with \
             `cargo run -p trellis-control-plane -- crds > charts/trellis/crds/trellis-policies.yaml`"
        );
    }

    #[test]
    fn crds_yaml_parses_and_names_both_kinds() {
        let text = crds_yaml();
        let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| serde_json::Value::deserialize(doc).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{text}");
        let kinds: Vec<&str> = docs
            .iter()
            .map(|d| d["spec"]["names"]["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["TrafficPolicy", "ServerPolicy"]);
        for doc in &docs {
            assert_eq!(doc["kind"], "CustomResourceDefinition");
            assert_eq!(doc["spec"]["group"], GROUP);
            assert_eq!(doc["spec"]["scope"], "Namespaced");
            let version = &doc["spec"]["versions"][0];
            assert_eq!(version["name"], "v1alpha1");
            assert!(version["subresources"]["status"].is_object(), "{doc}");
            let schema = &version["schema"]["openAPIV3Schema"]["properties"];
            assert_eq!(
                schema["spec"]["required"],
                serde_json::json!(["targetRefs"]),
                "{doc}"
            );
            assert!(schema["status"]["properties"]["conditions"].is_object());
        }
        let retry = &docs[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"]["retry"];
        assert_eq!(
            retry["x-kubernetes-preserve-unknown-fields"], true,
            "{retry}"
        );
    }

    #[test]
    fn operator_yaml_parses_into_the_kinds() {
        let policy: TrafficPolicy = serde_yaml_ng::from_str(
            "apiVersion: policy.trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: reviews}]
  retry: {attempts: 2, retryOn: [gateway-error]}
",
        )
        .unwrap();
        assert_eq!(policy.spec.target_refs[0].kind, "Service");
        assert_eq!(policy.spec.retry.as_ref().unwrap()["attempts"], 2);
        assert!(policy.spec.unknown.is_empty());

        let policy: ServerPolicy = serde_yaml_ng::from_str(
            "apiVersion: policy.trellis.dev/v1alpha1
kind: ServerPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{group: \"\", kind: Service, name: reviews}]
  ports: [8080]
  mtls: STRICT
  rateLimits: {maxTokens: 1}
",
        )
        .unwrap();
        assert_eq!(policy.spec.ports, Some(vec![8080]));
        assert!(policy.spec.unknown.contains_key("rateLimits"));
    }
}
