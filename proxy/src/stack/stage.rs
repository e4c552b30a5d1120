//! The one mechanism every policy stage uses: a [`Stage`] gets the request and the
//! rest of the stack ([`Next`]) and decides whether, when and how often to pass the
//! request on. A [`Stack`] is a list of stages, outermost first.
//!
//! Stages borrow the stack for the life of a request (the route table that owns it
//! is held by the request), so calling the next stage clones nothing.

use super::outcome::{BoxFuture, Failure, Flags, Req, Routed};
use http::StatusCode;

/// One step of a route's policy stack.
pub trait Stage: Send + Sync {
    /// Handles `req`, handing it to `next` when it should go further in.
    fn call<'a>(&'a self, req: Req, next: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>>;
}

/// The stages after the one being called; `call` may be used any number of times
/// (a retry), or not at all (a limit, a fault, a terminal stage).
#[derive(Clone, Copy)]
pub struct Next<'a> {
    stages: &'a [Box<dyn Stage>],
}

impl<'a> Next<'a> {
    pub fn call(self, req: Req) -> BoxFuture<'a, Result<Routed, Failure>> {
        match self.stages.split_first() {
            Some((stage, rest)) => stage.call(req, Next { stages: rest }),
            // Every stack ends in a stage that answers; this names a stack built wrong.
            None => Box::pin(std::future::ready(Err(Failure::local(
                StatusCode::INTERNAL_SERVER_ERROR,
                Flags::NONE,
                "the policy stack has no stage that answers",
            )))),
        }
    }
}

/// Stages in request order, outermost first.
pub struct Stack {
    stages: Box<[Box<dyn Stage>]>,
}

impl Stack {
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Stack {
        Stack {
            stages: stages.into_boxed_slice(),
        }
    }

    pub fn call(&self, req: Req) -> BoxFuture<'_, Result<Routed, Failure>> {
        Next {
            stages: &self.stages,
        }
        .call(req)
    }
}

/// A whole stack used as one stage (a split's backends are stacks of their own).
impl Stage for Stack {
    fn call<'a>(&'a self, req: Req, _: Next<'a>) -> BoxFuture<'a, Result<Routed, Failure>> {
        Stack::call(self, req)
    }
}
