//! The pod annotations the injector reads, each checked: a bad value refuses the
//! pod with a message that names the annotation, rather than injecting a proxy
//! that would fail at start.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub const INJECT: &str = "trellis.dev/inject";
pub const EXCLUDE_INBOUND_PORTS: &str = "trellis.dev/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "trellis.dev/exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.dev/exclude-outbound-cidrs";
pub const OPAQUE_PORTS: &str = "trellis.dev/opaque-ports";
pub const PROXY_CPU: &str = "trellis.dev/proxy-cpu";
pub const PROXY_MEMORY: &str = "trellis.dev/proxy-memory";

/// What a pod's annotations change in its proxy; values as the proxy's flags
/// take them.
#[derive(Debug, Default, PartialEq)]
pub struct Overrides {
    pub exclude_inbound_ports: Vec<String>,
    pub exclude_outbound_ports: Vec<String>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub opaque_ports: Vec<String>,
    pub proxy_cpu: Option<String>,
    pub proxy_memory: Option<String>,
}

impl Overrides {
    /// The overrides in `annotations`, or the first bad one, named.
    pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Overrides, String> {
        let get = |name: &str| annotations.get(name).map(|v| v.trim());
        let ports = |name: &str| -> Result<Vec<String>, String> {
            list(get(name), |item| {
                item.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(|p| p.to_string())
                    .ok_or_else(|| format!("{item:?} is not a port (1 to 65535)"))
            })
            .map_err(|e| format!("annotation {name}: {e}"))
        };
        let quantity = |name: &str, cpu: bool| -> Result<Option<String>, String> {
            match get(name) {
                None => Ok(None),
                Some(value) if is_quantity(value, cpu) => Ok(Some(value.to_owned())),
                Some(value) => Err(format!(
                    "annotation {name}: {value:?} is not a {} quantity (e.g. {})",
                    if cpu { "CPU" } else { "memory" },
                    if cpu { "100m" } else { "64Mi" }
                )),
            }
        };
        Ok(Overrides {
            exclude_inbound_ports: ports(EXCLUDE_INBOUND_PORTS)?,
            exclude_outbound_ports: ports(EXCLUDE_OUTBOUND_PORTS)?,
            exclude_outbound_cidrs: list(get(EXCLUDE_OUTBOUND_CIDRS), cidr)
                .map_err(|e| format!("annotation {EXCLUDE_OUTBOUND_CIDRS}: {e}"))?,
            opaque_ports: ports(OPAQUE_PORTS)?,
            proxy_cpu: quantity(PROXY_CPU, true)?,
            proxy_memory: quantity(PROXY_MEMORY, false)?,
        })
    }
}

/// A comma list, each item checked (and normalised) by `item`.
fn list(
    value: Option<&str>,
    item: impl Fn(&str) -> Result<String, String>,
) -> Result<Vec<String>, String> {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(item)
        .collect()
}

/// `198.18.0.0/15`, `fd00::/8` or a bare address.
fn cidr(text: &str) -> Result<String, String> {
    let bad = || format!("{text:?} is not an address range (e.g. 10.0.0.0/8)");
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match prefix.map(str::parse::<u8>) {
        None => Ok(text.to_owned()),
        Some(Ok(p)) if p <= max => Ok(text.to_owned()),
        Some(_) => Err(bad()),
    }
}

/// A Kubernetes quantity as resources take one: digits, an optional fraction,
/// and a suffix (`m` only for CPU; binary or decimal multiples for memory).
fn is_quantity(value: &str, cpu: bool) -> bool {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && !number.starts_with('.')
        && !number.ends_with('.');
    let suffixes: &[&str] = if cpu {
        &["", "m"]
    } else {
        &["", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"]
    };
    number_ok && suffixes.contains(&suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Overrides, String> {
        Overrides::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn good_annotations_become_the_proxys_flags() {
        let overrides = parse(&[
            (EXCLUDE_INBOUND_PORTS, "22, 9090"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,fd00::/8"),
            (OPAQUE_PORTS, "5432"),
            (PROXY_CPU, "250m"),
            (PROXY_MEMORY, "64Mi"),
        ])
        .unwrap();
        assert_eq!(overrides.exclude_inbound_ports, ["22", "9090"]);
        assert_eq!(overrides.exclude_outbound_cidrs, ["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(overrides.opaque_ports, ["5432"]);
        assert_eq!(overrides.proxy_cpu.as_deref(), Some("250m"));
        assert_eq!(overrides.proxy_memory.as_deref(), Some("64Mi"));
    }

    #[test]
    fn a_bad_value_is_refused_naming_its_annotation() {
        for (pair, expected) in [
            (
                (EXCLUDE_INBOUND_PORTS, "22,http"),
                "annotation trellis.dev/exclude-inbound-ports: \"http\" is not a port (1 to 65535)",
            ),
            (
                (EXCLUDE_OUTBOUND_PORTS, "0"),
                "annotation trellis.dev/exclude-outbound-ports: \"0\" is not a port (1 to 65535)",
            ),
            (
                (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33"),
                "annotation trellis.dev/exclude-outbound-cidrs: \"10.0.0.0/33\" is not an address range (e.g. 10.0.0.0/8)",
            ),
            (
                (PROXY_CPU, "1Gi"),
                "annotation trellis.dev/proxy-cpu: \"1Gi\" is not a CPU quantity (e.g. 100m)",
            ),
            (
                (PROXY_MEMORY, "lots"),
                "annotation trellis.dev/proxy-memory: \"lots\" is not a memory quantity (e.g. 64Mi)",
            ),
        ] {
            assert_eq!(parse(&[pair]), Err(expected.to_owned()));
        }
    }
}
