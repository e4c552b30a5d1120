//! Weighted backends (a canary): each request goes to one backend, drawn with
//! probability weight / total. Backends of weight 0 get nothing.

use super::{
    outcome::{BoxFuture, Failure, Flags, Req, Routed},
    stage::{Next, Stage},
};
use crate::rng::Rng;

pub struct Split {
    /// Backends with their cumulative weight, for a binary search per request.
    backends: Box<[(Box<dyn Stage>, u64)]>,
    total: u64,
    rng: Rng,
}

impl Split {
    /// `backends` with weights; the config guarantees the weights do not sum to 0.
    pub fn new(backends: Vec<(Box<dyn Stage>, u32)>, rng: Rng) -> Split {
        let mut total = 0u64;
        let backends: Vec<_> = backends
            .into_iter()
            .filter(|(_, weight)| *weight > 0)
            .map(|(backend, weight)| {
                total += u64::from(weight);
                (backend, total)
            })
            .collect();
        Split {
            backends: backends.into_boxed_slice(),
            total,
            rng,
        }
    }
}

impl Stage for Split {
    /// A backend ends the route's stack, so `next` is not used.
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        let draw = self.rng.below(self.total.max(1));
        let index = self
            .backends
            .partition_point(|(_, cumulative)| *cumulative <= draw);
        match self.backends.get(index) {
            Some((backend, _)) => backend.call(req, next),
            None => Box::pin(std::future::ready(Err(Failure::local(
                http::StatusCode::SERVICE_UNAVAILABLE,
                Flags::UH,
                "the route has no backend with a weight above 0",
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{
        stage::Stack,
        testing::{request, Scripted},
    };

    #[tokio::test]
    async fn weights_hold_within_statistical_bounds() {
        let (v1, v2, off) = (
            Scripted::always(200),
            Scripted::always(200),
            Scripted::always(200),
        );
        let split = Stack::new(vec![Box::new(Split::new(
            vec![
                (Box::new(v1.clone()), 90),
                (Box::new(v2.clone()), 10),
                (Box::new(off.clone()), 0),
            ],
            Rng::with_seed(42),
        ))]);
        const N: usize = 10_000;
        for _ in 0..N {
            split.call(request()).await.unwrap();
        }
        // Binomial(10 000, 0.1): standard deviation 30; 5 sigma is 150.
        let canary = v2.calls();
        assert!((850..=1150).contains(&canary), "canary got {canary} of {N}");
        assert_eq!(v1.calls() + canary, N);
        assert_eq!(off.calls(), 0, "weight 0 gets nothing");
    }
}
