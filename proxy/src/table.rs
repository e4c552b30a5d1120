//! The immutable routing snapshot built from a [`Config`], and the lock-free cell
//! that holds the current one.
//!
//! Requests read the table through [`arc_swap::ArcSwap`]: a load is a few atomic
//! operations, never a lock, and a new config replaces the table whole while requests
//! that already hold the old one finish with it.

use crate::config::Config;
use arc_swap::ArcSwap;
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

/// The DNS suffix of services inside the cluster.
const CLUSTER_DOMAIN: &str = "svc.cluster.local";

/// Shared handle to the current table.
pub type SharedTable = Arc<ArcSwap<RouteTable>>;

/// A service as requests see it: where to send them and what to call it in metrics.
#[derive(Debug)]
pub struct Target {
    /// `name.namespace:port`, the bounded label used in metrics.
    pub label: Arc<str>,
    endpoints: Box<[SocketAddr]>,
    next: AtomicUsize,
}

impl Target {
    /// Round robin over the endpoints; `None` when the service has none.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.endpoints[i % self.endpoints.len()])
    }
}

/// Authorities (as clients write them) to targets, plus the config they came from.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_authority: HashMap<Box<str>, Arc<Target>>,
    pub config: Config,
}

impl RouteTable {
    pub fn new(config: Config) -> RouteTable {
        let mut by_authority = HashMap::new();
        for service in &config.services {
            let target = Arc::new(Target {
                label: service.authority().into(),
                endpoints: service.endpoints.iter().map(|e| e.address).collect(),
                next: AtomicUsize::new(0),
            });
            let port = service.port.get();
            let base = format!("{}.{}", service.name, service.namespace);
            for host in [
                base.clone(),
                format!("{base}.svc"),
                format!("{base}.{CLUSTER_DOMAIN}"),
            ] {
                if port == 80 {
                    by_authority.insert(host.clone().into(), target.clone());
                }
                by_authority.insert(format!("{host}:{port}").into(), target.clone());
            }
        }
        RouteTable {
            by_authority,
            config,
        }
    }

    /// The named service an authority (`Host` header or `:authority`) refers to.
    pub fn lookup(&self, authority: &str) -> Option<&Arc<Target>> {
        let authority = authority.strip_suffix('.').unwrap_or(authority);
        match self.by_authority.get(authority) {
            Some(target) => Some(target),
            // Hosts are case-insensitive; lowercase only in the rare case that needs it.
            None if authority.bytes().any(|b| b.is_ascii_uppercase()) => self
                .by_authority
                .get(authority.to_ascii_lowercase().as_str()),
            None => None,
        }
    }
}

pub fn shared(config: Config) -> SharedTable {
    Arc::new(ArcSwap::from_pointee(RouteTable::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let config = Config::parse(
            "t",
            "services:
  - name: reviews
    namespace: shop
    port: 8080
    endpoints: [{address: 198.18.0.2:8080}, {address: 198.18.0.3:8080}]
  - name: web
    port: 80
",
        )
        .unwrap();
        RouteTable::new(config)
    }

    #[test]
    fn finds_services_by_every_authority_form() {
        let table = table();
        for authority in [
            "reviews.shop:8080",
            "reviews.shop.svc:8080",
            "reviews.shop.svc.cluster.local:8080",
            "Reviews.Shop:8080",
        ] {
            let target = table.lookup(authority).expect(authority);
            assert_eq!(&*target.label, "reviews.shop:8080");
        }
        assert!(table.lookup("reviews.shop:9090").is_none());
        assert!(table.lookup("reviews:8080").is_none());
        // Port 80 may be left out, as clients do.
        assert!(table.lookup("web.default").is_some());
        assert!(table.lookup("web.default:80").is_some());
    }

    #[test]
    fn round_robin_spreads_requests_and_empty_services_have_none() {
        let table = table();
        let target = table.lookup("reviews.shop:8080").unwrap();
        let picks: Vec<_> = (0..4).map(|_| target.pick().unwrap().port()).collect();
        assert_eq!(picks, [8080; 4]);
        let ips: Vec<_> = (0..4).map(|_| target.pick().unwrap().ip()).collect();
        assert_ne!(ips[0], ips[1]);
        assert_eq!(ips[0], ips[2]);
        assert!(table.lookup("web.default").unwrap().pick().is_none());
    }
}
