//! What is refused, and how it is said: every object Trellis reads gets one
//! [`ObjectStatus`] built here from the problems its translation found.
//!
//! # Statuses
//!
//! Every HTTPRoute and GRPCRoute with a Service parent, every TrafficPolicy and every
//! ServerPolicy gets one [`ObjectStatus`]; a Service gets one only when it cannot
//! be used (possible in local mode: a name that is not a DNS label, a port out of
//! range, the same Service twice). `accepted` means the object is in effect. An
//! object that is not is left out of the translation entirely, so everything else
//! still comes through; its message names the field (`spec.retry.retryOn[0]: unknown
//! variant ...`, `spec.rules[1].matches[0].path.value: invalid regex ...`).
//! `resolved_refs` is false when what is wrong is a reference (a backendRef to a
//! missing Service, a parentRef or targetRef to nothing). When an object has more
//! than one problem, an invalid value is reported before a reference, and the
//! message says how many more there are.
//!
//! A section that is the model's own type (a TrafficPolicy's `retry`, a
//! ServerPolicy's `rateLimit`) is checked by deserialising it into that type
//! ([`parse_value`]), so the control plane refuses exactly what the proxy would,
//! with the same words; a spec field this version does not know is refused too
//! ([`unknown_fields`]).

use super::objects::Key;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Display;

/// Accepted=False (with reason and a message naming the field) or Accepted=True
/// for one object; which objects get one, and what it says, is under Statuses in
/// the module documentation above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStatus {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
    pub resolved_refs: bool,
}

impl ObjectStatus {
    /// The Gateway-API-style conditions to write on the object: `Accepted` and
    /// `ResolvedRefs`, each True with its own name as reason, or False with
    /// [`reason`](Self::reason) and [`message`](Self::message). A writer should
    /// keep a condition's old `lastTransitionTime` when its status is unchanged.
    pub fn conditions(&self, observed_generation: Option<i64>, now: &Time) -> Vec<Condition> {
        let condition = |type_: &str, ok: bool| Condition {
            type_: type_.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: if ok {
                type_.to_owned()
            } else {
                self.reason.clone()
            },
            message: if ok {
                String::new()
            } else {
                self.message.clone()
            },
            observed_generation,
            last_transition_time: now.clone(),
        };
        vec![
            condition("Accepted", self.accepted),
            condition("ResolvedRefs", self.resolved_refs),
        ]
    }
}

/// Why an object is not in effect.
#[derive(Clone)]
pub(super) struct Problem {
    /// A reference that resolves to nothing (rather than an invalid value).
    refs: bool,
    reason: &'static str,
    message: String,
}

/// A value that cannot be used: `field` names where it is, `message` what is wrong.
pub(super) fn invalid(reason: &'static str, field: impl Display, message: impl Display) -> Problem {
    Problem {
        refs: false,
        reason,
        message: format!("{field}: {message}"),
    }
}

/// A reference to nothing: Accepted and ResolvedRefs are both False.
pub(super) fn unresolved(
    reason: &'static str,
    field: impl Display,
    message: impl Display,
) -> Problem {
    Problem {
        refs: true,
        reason,
        message: format!("{field}: {message}"),
    }
}

/// One object's status: Accepted when it has no problems, else its first invalid
/// value (or, if none, its first unresolved reference) and how many more there are.
pub(super) fn status(kind: &'static str, key: &Key, problems: Vec<Problem>) -> ObjectStatus {
    let more = problems.len().saturating_sub(1);
    let first = problems
        .iter()
        .position(|p| !p.refs)
        .or(if problems.is_empty() { None } else { Some(0) });
    match first {
        None => ObjectStatus {
            kind,
            namespace: key.0.clone(),
            name: key.1.clone(),
            accepted: true,
            reason: "Accepted".to_owned(),
            message: String::new(),
            resolved_refs: true,
        },
        Some(i) => {
            let problem = &problems[i];
            let mut message = problem.message.clone();
            if more > 0 {
                message.push_str(&format!(
                    " (and {more} more problem{})",
                    if more == 1 { "" } else { "s" }
                ));
            }
            ObjectStatus {
                kind,
                namespace: key.0.clone(),
                name: key.1.clone(),
                accepted: false,
                reason: problem.reason.to_owned(),
                message,
                resolved_refs: !problem.refs,
            }
        }
    }
}

/// Deserialises a JSON value into a model type; the error names the field under
/// `at` (e.g. `spec.retry.retryOn[0]: unknown variant ...`).
pub(super) fn parse_value<T: DeserializeOwned>(value: Value, at: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            at.to_owned()
        } else {
            format!("{at}.{path}")
        };
        invalid("Invalid", field, e.into_inner())
    })
}

/// A spec field this version does not know, left in by local mode (the API
/// server prunes them): refused, so a misspelt section is not silently ignored.
pub(super) fn unknown_fields(unknown: &BTreeMap<String, Value>, known: &str) -> Vec<Problem> {
    unknown
        .keys()
        .map(|field| {
            invalid(
                "Invalid",
                format!("spec.{field}"),
                format!("unknown field, expected one of {known}"),
            )
        })
        .collect()
}
