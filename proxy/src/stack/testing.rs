//! In-process stages for testing each stage alone: a scripted upstream, and a
//! way to run one stage in front of it.

use super::{
    outcome::{Avoid, BoxFuture, Failure, FailureKind, Flags, Outcome, Req, Routed, Rsp},
    stage::{Next, Stack, Stage},
};
use crate::upstream::{body::ResponseBody, request_body::RequestBody};
use http::{Request, Response, StatusCode};
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

pub fn request() -> Req {
    Request::get("http://svc.test/")
        .body(RequestBody::Empty)
        .unwrap()
}

/// `stage` in front of `inner`, as a stack.
pub fn stack(stage: impl Stage + 'static, inner: impl Stage + 'static) -> Arc<Stack> {
    Arc::new(Stack::new(vec![Box::new(stage), Box::new(inner)]))
}

/// Runs one request through `stage` in front of `inner`.
pub async fn run(
    stage: impl Stage + 'static,
    inner: impl Stage + 'static,
    req: Req,
) -> Result<Routed, Failure> {
    stack(stage, inner).call(req).await
}

/// What one call of a [`Scripted`] stage does.
#[derive(Clone, Debug)]
pub enum Step {
    Status(u16),
    Fail(FailureKind),
    /// Answers 200 after this long.
    Delay(Duration),
    /// Answers 503 from this endpoint (for `Avoid`).
    From(SocketAddr),
    /// Answers 200 with `grpc-status` set to this code.
    Grpc(u16),
}

/// Answers calls by a script, then by its last step forever; counts calls and
/// records the `Avoid` each request carried.
#[derive(Clone)]
pub struct Scripted {
    steps: Arc<Mutex<VecDeque<Step>>>,
    last: Step,
    calls: Arc<AtomicUsize>,
    pub avoided: Arc<Mutex<Vec<Option<SocketAddr>>>>,
}

impl Scripted {
    pub fn new(steps: Vec<Step>, then: Step) -> Scripted {
        Scripted {
            steps: Arc::new(Mutex::new(steps.into())),
            last: then,
            calls: Arc::new(AtomicUsize::new(0)),
            avoided: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn always(status: u16) -> Scripted {
        Scripted::new(vec![], Step::Status(status))
    }

    pub fn delayed(delay: Duration) -> Scripted {
        Scripted::new(vec![], Step::Delay(delay))
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub fn status(code: u16) -> Rsp {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
}

impl Stage for Scripted {
    fn call<'a>(&'a self, req: Req, _: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.avoided
            .lock()
            .unwrap()
            .push(req.extensions().get::<Avoid>().map(|a| a.0));
        let step = self
            .steps
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(self.last.clone());
        Box::pin(async move {
            match step {
                Step::Status(code) => Ok(status(code).into()),
                Step::Fail(kind) => Err(Failure {
                    kind,
                    ..Failure::local(StatusCode::BAD_GATEWAY, Flags::UC, "scripted failure")
                }),
                Step::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(status(200).into())
                }
                Step::From(addr) => Ok(Routed {
                    response: status(503),
                    outcome: Outcome {
                        endpoint: Some(addr),
                        ..Default::default()
                    },
                }),
                Step::Grpc(code) => {
                    let mut response = status(200);
                    response
                        .headers_mut()
                        .insert("grpc-status", code.to_string().parse().unwrap());
                    Ok(response.into())
                }
            }
        })
    }
}
