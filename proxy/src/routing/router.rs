//! Route matching: which of a service's routes a request takes.
//!
//! Every (route, match) pair is compiled once and ordered by Gateway API HTTPRoute
//! precedence; the first pair that holds wins:
//! 1. an Exact path, then the longest PathPrefix, then a RegularExpression path;
//! 2. a method match before none;
//! 3. more header matches first, then more query parameter matches;
//! 4. the earlier route (then the earlier match) in the config.
//!
//! Exact paths and prefixes are indexed by path, so a lookup costs one hash probe
//! per segment of the request path, however many routes there are; only regex paths
//! are tried one by one. A PathPrefix matches whole segments and ignores a trailing
//! slash (`/api` and `/api/` both match `/api`, `/api/x`, not `/apix`). A route with
//! no matches matches every request, as a PathPrefix of `/`.

use foldhash::HashMap;
use http::{HeaderMap, HeaderName, Method, Uri};
use regex::Regex;
use trellis_proto::model::config::{PathMatchType, RouteMatch, ValueMatch, ValueMatchType};
use trellis_proto::model::regex::full_match;

/// The compiled routes of one service; `find` returns the index of the route taken.
#[derive(Debug, Default)]
pub struct Router {
    /// Candidates by exact path, each list in precedence order.
    exact: HashMap<String, Vec<Candidate>>,
    /// Candidates by normalised prefix, each list in precedence order.
    prefix: HashMap<String, Vec<Candidate>>,
    /// Regex paths, in precedence order.
    regex: Vec<Candidate>,
}

#[derive(Debug)]
struct Candidate {
    route: usize,
    path: PathMatcher,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
    Present,
}

fn value_matcher(m: &ValueMatch) -> Result<ValueMatcher, (String, String)> {
    match (m.kind, &m.value) {
        (ValueMatchType::Present, _) => Ok(ValueMatcher::Present),
        (ValueMatchType::Exact, Some(v)) => Ok(ValueMatcher::Exact(v.clone())),
        (ValueMatchType::RegularExpression, Some(v)) => full_match(v)
            .map(ValueMatcher::Regex)
            .map_err(|e| ("value".to_owned(), e)),
        (_, None) => Err((
            "value".to_owned(),
            "a value is required unless type is Present".to_owned(),
        )),
    }
}

fn compile(route: usize, m: &RouteMatch) -> Result<Candidate, (String, String)> {
    let path = match &m.path {
        None => PathMatcher::Prefix("/".to_owned()),
        Some(p) => {
            let value = &p.value.0;
            let must_be_path = || {
                if value.starts_with('/') {
                    Ok(())
                } else {
                    Err((
                        "path.value".to_owned(),
                        format!("{value:?} must start with '/'"),
                    ))
                }
            };
            match p.kind {
                PathMatchType::Exact => {
                    must_be_path()?;
                    PathMatcher::Exact(value.clone())
                }
                PathMatchType::PathPrefix => {
                    must_be_path()?;
                    PathMatcher::Prefix(normalise_prefix(value).to_owned())
                }
                PathMatchType::RegularExpression => {
                    PathMatcher::Regex(full_match(value).map_err(|e| ("path.value".to_owned(), e))?)
                }
            }
        }
    };
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            (
                format!("headers[{i}].name"),
                format!("{:?} is not a header name", h.name),
            )
        })?;
        let matcher = value_matcher(h).map_err(|(f, e)| (format!("headers[{i}].{f}"), e))?;
        headers.push((name, matcher));
    }
    let mut query = Vec::with_capacity(m.query_params.len());
    for (i, q) in m.query_params.iter().enumerate() {
        let matcher = value_matcher(q).map_err(|(f, e)| (format!("queryParams[{i}].{f}"), e))?;
        query.push((q.name.clone(), matcher));
    }
    Ok(Candidate {
        route,
        path,
        method: m.method.as_ref().map(|m| m.0.clone()),
        headers,
        query,
    })
}

/// A prefix without its trailing slash (`/` stays `/`).
fn normalise_prefix(prefix: &str) -> &str {
    match prefix.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

/// The prefixes that match `path`, longest first: the path itself (trailing
/// slash dropped), then each shorter run of whole segments, then `/`.
fn segment_prefixes(path: &str) -> impl Iterator<Item = &str> {
    let path = normalise_prefix(path);
    let mut end = Some(path.len());
    std::iter::from_fn(move || {
        let current = end?;
        let prefix = if current == 0 { "/" } else { &path[..current] };
        end = if prefix == "/" {
            None
        } else {
            path[..current].rfind('/')
        };
        Some(prefix)
    })
}

/// Checks one match the way [`Router::new`] will compile it; the error names the
/// field within the match.
pub fn check_match(m: &RouteMatch) -> Result<(), (String, String)> {
    compile(0, m).map(|_| ())
}

impl Candidate {
    /// Sort key: smaller is tried first.
    fn precedence(&self) -> (u8, usize, bool, usize, usize, usize) {
        let (rank, longest) = match &self.path {
            PathMatcher::Exact(_) => (0, 0),
            PathMatcher::Prefix(p) => (1, usize::MAX - p.len()),
            PathMatcher::Regex(_) => (2, 0),
        };
        (
            rank,
            longest,
            self.method.is_none(),
            usize::MAX - self.headers.len(),
            usize::MAX - self.query.len(),
            self.route,
        )
    }

    /// Everything but the path, which the index (or `find` for regexes) checked.
    fn conditions_hold(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && self.headers.iter().all(|(name, matcher)| {
                let value = headers.get(name).and_then(|v| v.to_str().ok());
                matcher.matches(value)
            })
            && self.query.iter().all(|(name, matcher)| {
                let value = uri.query().and_then(|q| {
                    q.split('&').find_map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        (k == name).then_some(v)
                    })
                });
                matcher.matches(value)
            })
    }
}

impl ValueMatcher {
    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (ValueMatcher::Present, Some(_)) => true,
            (ValueMatcher::Exact(e), Some(v)) => e == v,
            (ValueMatcher::Regex(r), Some(v)) => r.is_match(v),
        }
    }
}

impl Router {
    /// Compiles the matches of `routes` (already validated by the config loader).
    /// `routes[i]` is the list of matches of route `i`.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a [RouteMatch]>) -> Result<Router, String> {
        let mut candidates = Vec::new();
        for (route, matches) in routes.into_iter().enumerate() {
            if matches.is_empty() {
                candidates.push(compile(route, &RouteMatch::default()).map_err(|e| e.1)?);
            }
            for m in matches {
                candidates.push(compile(route, m).map_err(|e| e.1)?);
            }
        }
        candidates.sort_by_key(Candidate::precedence);
        let mut router = Router::default();
        for candidate in candidates {
            match &candidate.path {
                PathMatcher::Exact(p) => router.exact.entry(p.clone()).or_default().push(candidate),
                PathMatcher::Prefix(p) => {
                    router.prefix.entry(p.clone()).or_default().push(candidate)
                }
                PathMatcher::Regex(_) => router.regex.push(candidate),
            }
        }
        // Held for as long as the version runs, in every sidecar: no spare room.
        for list in router.exact.values_mut().chain(router.prefix.values_mut()) {
            list.shrink_to_fit();
        }
        router.regex.shrink_to_fit();
        Ok(router)
    }

    /// The index of the route a request takes, if any.
    pub fn find(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<usize> {
        let path = uri.path();
        let first = |list: &[Candidate]| {
            list.iter()
                .find(|c| c.conditions_hold(method, uri, headers))
                .map(|c| c.route)
        };
        if let Some(route) = self.exact.get(path).and_then(|l| first(l)) {
            return Some(route);
        }
        for prefix in segment_prefixes(path) {
            if let Some(route) = self.prefix.get(prefix).and_then(|l| first(l)) {
                return Some(route);
            }
        }
        self.regex
            .iter()
            .find(|c| {
                matches!(&c.path, PathMatcher::Regex(r) if r.is_match(path))
                    && c.conditions_hold(method, uri, headers)
            })
            .map(|c| c.route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(yaml: &str) -> Router {
        let routes: Vec<Vec<RouteMatch>> = serde_yaml_ng::from_str(yaml).unwrap();
        Router::new(routes.iter().map(Vec::as_slice)).unwrap()
    }

    fn find(router: &Router, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<usize> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        router.find(&method.parse().unwrap(), &uri.parse().unwrap(), &map)
    }

    #[test]
    fn paths_exact_prefix_and_regex() {
        let r = router(
            "- [{path: {type: Exact, value: /api}}]
- [{path: {type: PathPrefix, value: /api}}]
- [{path: {type: RegularExpression, value: '/v[0-9]+/.*'}}]
",
        );
        assert_eq!(find(&r, "GET", "/api", &[]), Some(0));
        assert_eq!(find(&r, "GET", "/api/x?y=1", &[]), Some(1));
        assert_eq!(
            find(&r, "GET", "/apix", &[]),
            None,
            "prefixes match whole segments"
        );
        assert_eq!(find(&r, "GET", "/v2/items", &[]), Some(2));
        assert_eq!(
            find(&r, "GET", "/xv2/items", &[]),
            None,
            "regexes match the whole path"
        );
    }

    #[test]
    fn precedence_follows_gateway_api_not_config_order() {
        // Written from least to most specific; the most specific must still win.
        let r = router(
            "- []
- [{path: {value: /api}}]
- [{path: {value: /api/v1}}]
- [{path: {value: /api}, method: POST}]
- [{path: {value: /api}, headers: [{name: x-canary, value: 'true'}]}]
- [{path: {value: /api}, headers: [{name: x-canary, value: 'true'}], queryParams: [{name: debug, type: Present}]}]
- [{path: {type: Exact, value: /api/v1/items}}]
",
        );
        assert_eq!(find(&r, "GET", "/other", &[]), Some(0));
        assert_eq!(find(&r, "GET", "/api/x", &[]), Some(1));
        assert_eq!(
            find(&r, "GET", "/api/v1/x", &[]),
            Some(2),
            "longer prefix wins"
        );
        assert_eq!(
            find(&r, "POST", "/api/x", &[("x-canary", "true")]),
            Some(3),
            "method before headers"
        );
        assert_eq!(find(&r, "GET", "/api/x", &[("x-canary", "true")]), Some(4));
        assert_eq!(
            find(&r, "GET", "/api/x?debug", &[("x-canary", "true")]),
            Some(5),
            "more conditions win"
        );
        assert_eq!(
            find(&r, "GET", "/api/v1/items", &[]),
            Some(6),
            "exact beats every prefix"
        );
    }

    #[test]
    fn headers_and_query_exact_regex_present() {
        let r = router(
            "- [{headers: [{name: x-user, type: RegularExpression, value: 'admin-.*'}]}]
- [{queryParams: [{name: v, value: '2'}]}]
- [{headers: [{name: x-trace, type: Present}]}]
",
        );
        assert_eq!(find(&r, "GET", "/", &[("x-user", "admin-7")]), Some(0));
        assert_eq!(find(&r, "GET", "/", &[("x-user", "user-7")]), None);
        assert_eq!(find(&r, "GET", "/?a=1&v=2", &[]), Some(1));
        assert_eq!(find(&r, "GET", "/?v=22", &[]), None);
        assert_eq!(find(&r, "GET", "/", &[("x-trace", "")]), Some(2));
    }

    #[test]
    fn prefixes_ignore_a_trailing_slash_and_list_segments_longest_first() {
        let r = router("- [{path: {value: /api/}}]\n- [{path: {value: /}}]\n");
        assert_eq!(find(&r, "GET", "/api", &[]), Some(0));
        assert_eq!(find(&r, "GET", "/api/", &[]), Some(0));
        assert_eq!(find(&r, "GET", "/apix", &[]), Some(1));
        let all: Vec<_> = segment_prefixes("/a/b/c/").collect();
        assert_eq!(all, ["/a/b/c", "/a/b", "/a", "/"]);
        assert_eq!(segment_prefixes("/").collect::<Vec<_>>(), ["/"]);
    }

    #[test]
    fn a_route_without_matches_takes_everything_left() {
        let r = router("- [{path: {value: /a}}]\n- []\n");
        assert_eq!(find(&r, "DELETE", "/zzz", &[]), Some(1));
        assert_eq!(find(&r, "GET", "/a", &[]), Some(0));
    }

    #[test]
    fn bad_matches_name_the_field() {
        let m: RouteMatch = serde_yaml_ng::from_str(
            "{headers: [{name: a}, {name: b, type: RegularExpression, value: '('}]}",
        )
        .unwrap();
        let (field, message) = check_match(&m).unwrap_err();
        assert_eq!(field, "headers[0].value");
        assert!(message.contains("required"), "{message}");
        let m: RouteMatch = serde_yaml_ng::from_str("{path: {type: Exact, value: api}}").unwrap();
        assert_eq!(check_match(&m).unwrap_err().0, "path.value");
    }
}
