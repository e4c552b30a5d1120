//! Weighted backends (a canary): each request goes to one backend, drawn with
//! probability weight / total. Backends of weight 0 get nothing.

use crate::{
    rng::Rng,
    stack::{BoxFuture, Failure, Req, RouteService, Rsp},
};
use std::{
    sync::Arc,
    task::{Context, Poll},
};
use tower::{Service, ServiceExt};

#[derive(Clone)]
pub struct Split {
    /// Backends with their cumulative weight, for a binary search per request.
    backends: Arc<[(RouteService, u64)]>,
    total: u64,
    rng: Arc<Rng>,
}

impl Split {
    /// `backends` with weights; the config guarantees the weights do not sum to 0.
    pub fn new(backends: Vec<(RouteService, u32)>, rng: Rng) -> Split {
        let mut total = 0u64;
        let backends: Vec<_> = backends
            .into_iter()
            .filter(|(_, weight)| *weight > 0)
            .map(|(service, weight)| {
                total += u64::from(weight);
                (service, total)
            })
            .collect();
        Split {
            backends: backends.into(),
            total,
            rng: Arc::new(rng),
        }
    }
}

impl Service<Req> for Split {
    type Response = Rsp;
    type Error = Failure;
    type Future = BoxFuture<Result<Rsp, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let draw = self.rng.below(self.total.max(1));
        let index = self
            .backends
            .partition_point(|(_, cumulative)| *cumulative <= draw);
        match self.backends.get(index) {
            Some((backend, _)) => {
                let backend = backend.clone();
                Box::pin(backend.oneshot(req))
            }
            None => Box::pin(std::future::ready(Err(Failure::local(
                http::StatusCode::SERVICE_UNAVAILABLE,
                crate::stack::Flags::UH,
                "the route has no backend with a weight above 0",
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::{request, Scripted};
    use tower::util::BoxCloneSyncService;

    #[tokio::test]
    async fn weights_hold_within_statistical_bounds() {
        let (v1, v2, off) = (
            Scripted::always(200),
            Scripted::always(200),
            Scripted::always(200),
        );
        let split = Split::new(
            vec![
                (BoxCloneSyncService::new(v1.clone()), 90),
                (BoxCloneSyncService::new(v2.clone()), 10),
                (BoxCloneSyncService::new(off.clone()), 0),
            ],
            Rng::with_seed(42),
        );
        const N: usize = 10_000;
        for _ in 0..N {
            split.clone().oneshot(request()).await.unwrap();
        }
        // Binomial(10 000, 0.1): standard deviation 30; 5 sigma is 150.
        let canary = v2.calls();
        assert!((850..=1150).contains(&canary), "canary got {canary} of {N}");
        assert_eq!(v1.calls() + canary, N);
        assert_eq!(off.calls(), 0, "weight 0 gets nothing");
    }
}
