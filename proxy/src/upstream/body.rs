//! Response bodies as they cross the proxy, and the request and response types.
//!
//! An upstream response body streams frame by frame (trailers included); an
//! HTTP/1 one carries the [`Lease`] of its connection, given back to the pool once
//! the body has been read to its end.

use super::pool::Lease;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::{
    pin::Pin,
    task::{Context, Poll},
};

use super::request_body::RequestBody;

/// A request as it crosses the proxy.
pub type Req = http::Request<RequestBody>;
/// A response as it crosses the proxy.
pub type Rsp = http::Response<ResponseBody>;

/// The body of a proxied response: the upstream's, streamed frame by frame
/// (trailers included), or a short one the proxy made.
pub enum ResponseBody {
    Upstream {
        body: Incoming,
        /// The HTTP/1 connection the body arrives on, returned to the pool once the
        /// body has been read to its end.
        lease: Option<Lease>,
    },
    Full(Option<Bytes>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Upstream { .. } => f.write_str("ResponseBody::Upstream"),
            ResponseBody::Full(data) => write!(f, "ResponseBody::Full({data:?})"),
        }
    }
}

impl ResponseBody {
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    fn release_if_done(&mut self) {
        if let ResponseBody::Upstream { body, lease } = self {
            if body.is_end_stream() {
                if let Some(lease) = lease.take() {
                    lease.release();
                }
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match this {
            ResponseBody::Upstream { body, .. } => {
                let poll = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(None) = poll {
                    this.release_if_done();
                }
                poll
            }
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies hyper never polls (HEAD, 204, 304, empty) end here.
        self.release_if_done();
    }
}
