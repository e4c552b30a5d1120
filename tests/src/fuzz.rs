//! The fuzz targets' bodies (`fuzz/fuzz_targets/` calls them): each takes
//! arbitrary bytes to one place where Trellis reads untrusted input and must never
//! panic. The regression test runs them on every input kept in
//! `fuzz/regressions/<target>/`, so a crash found once stays fixed.

use std::{sync::Arc, sync::OnceLock, time::Duration};
use trellis_proxy::{listen::detect::classify, routing::router::Router, upstream::pool::Pool};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/regressions/` names its directories.
pub const TARGETS: [(&str, Target); 6] = [
    ("detect", detect),
    ("proxy_config", proxy_config),
    ("control_plane_yaml", control_plane_yaml),
    ("discovery", discovery),
    ("durations_and_headers", durations_and_headers),
    ("route_match", route_match),
];

/// Protocol detection on arbitrary first bytes, as they arrive, byte by byte.
pub fn detect(data: &[u8]) {
    for end in 0..=data.len() {
        let _ = classify(&data[..end]);
    }
}

/// The proxy's config file, then the table built from it (regexes compiled,
/// policy stacks made).
pub fn proxy_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = trellis_proxy::config::parse("fuzz.yaml", text) {
        let pool = Pool::new(Duration::from_secs(1));
        let _ = trellis_proxy::routing::table::RouteTable::new(config, &pool);
    }
}

/// Every YAML kind the control plane reads, then their translation.
pub fn control_plane_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(objects) = trellis_control_plane::source::local::parse_text("fuzz.yaml", text) {
        let _ = trellis_control_plane::translate::translate(&objects);
    }
}

/// The discovery and identity messages as the proxy decodes them: each resource of
/// a response parsed into the model, and a certificate chain parsed.
pub fn discovery(data: &[u8]) {
    use prost::Message;
    if let Ok(response) = trellis_proto::v1::DiscoveryResponse::decode(data) {
        for resource in &response.resources {
            let _ = trellis_proto::model::resources::parse_resource(&resource.name, &resource.json);
        }
    }
    if let Ok(answer) = trellis_proto::v1::CertifyResponse::decode(data) {
        for der in &answer.chain {
            let _ = x509_parser::parse_x509_certificate(der);
        }
    }
}

/// Durations as flags and policies write them, and header values.
pub fn durations_and_headers(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = trellis_proto::model::duration::parse(text);
    }
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let _ = value.to_str();
    }
}

/// A router with every kind of match, and a request made of the bytes: the
/// method from the first byte, then `path`, then `name: value` lines.
pub fn route_match(data: &[u8]) {
    static ROUTER: OnceLock<Arc<Router>> = OnceLock::new();
    let router = ROUTER.get_or_init(|| {
        let matches: Vec<Vec<trellis_proto::model::config::RouteMatch>> =
            serde_yaml_ng::from_str(ROUTES).expect("the fuzz routes parse");
        Arc::new(Router::new(matches.iter().map(Vec::as_slice)).expect("the fuzz routes compile"))
    });
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let method = [
        http::Method::GET,
        http::Method::POST,
        http::Method::PUT,
        http::Method::DELETE,
    ][usize::from(first) % 4]
        .clone();
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let Ok(uri) = lines.next().unwrap_or("/").parse::<http::Uri>() else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            headers.append(name, value);
        }
    }
    let _ = router.find(&method, &uri, &headers);
}

/// Routes with every kind of match the model has.
const ROUTES: &str = r#"
- - path: {type: Exact, value: /exact}
  - path: {type: PathPrefix, value: /api}
    method: GET
    headers: [{name: x-canary, value: "true"}]
- - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
    queryParams: [{name: debug, type: Present}]
- - headers: [{name: x-user, type: RegularExpression, value: "[a-z]{2,8}"}]
- []
"#;
