//! Request bodies as they cross the proxy.
//!
//! Bodies stream frame by frame (trailers included) and are never collected. The
//! one exception is a request on a route with retries: [`ReplayBody`] keeps a copy of
//! what it streamed, up to [`REPLAY_LIMIT`], so a retry can send it again; past the
//! limit the copy is dropped and the request is no longer retried.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

/// Request bodies larger than this are never buffered for a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Original = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

pub enum RequestBody {
    Incoming(Incoming),
    Replay(ReplayBody),
    /// No body (requests the proxy makes itself, and tests).
    Empty,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Incoming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::Replay(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Incoming(body) => body.is_end_stream(),
            RequestBody::Replay(body) => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Incoming(body) => body.size_hint(),
            RequestBody::Replay(body) => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What every copy of a [`ReplayBody`] shares: the original body, still being read,
/// and the frames read from it so far.
struct Replay {
    original: Original,
    hint: SizeHint,
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    /// More than [`REPLAY_LIMIT`] was read: the copy is gone, no more replays.
    overflowed: bool,
    ended: bool,
}

/// A request body that can be sent again: each clone reads the frames already seen
/// from the shared copy, then continues from the original. Attempts run one after
/// another, so clones never read at the same time.
pub struct ReplayBody {
    shared: Arc<Mutex<Replay>>,
    /// How many data frames of the copy this clone has sent.
    position: usize,
    sent_trailers: bool,
}

impl ReplayBody {
    pub fn new<B>(original: B) -> ReplayBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let hint = original.size_hint();
        let ended = original.is_end_stream();
        let original: Original = Box::pin(http_body_util::BodyExt::map_err(original, Into::into));
        // A body known to be too large is not worth copying at all.
        let overflowed = hint.lower() > REPLAY_LIMIT as u64;
        ReplayBody {
            shared: Arc::new(Mutex::new(Replay {
                original,
                hint,
                data: Vec::new(),
                trailers: None,
                buffered: 0,
                overflowed,
                ended,
            })),
            position: 0,
            sent_trailers: false,
        }
    }

    /// A copy for another attempt, or `None` once the body outgrew the replay limit.
    pub fn try_clone(&self) -> Option<ReplayBody> {
        let shared = lock(&self.shared);
        (!shared.overflowed).then(|| ReplayBody {
            shared: self.shared.clone(),
            position: 0,
            sent_trailers: false,
        })
    }
}

fn lock(shared: &Mutex<Replay>) -> std::sync::MutexGuard<'_, Replay> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut shared = lock(&this.shared);
        if !shared.overflowed && this.position < shared.data.len() {
            let data = shared.data[this.position].clone();
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if shared.ended {
            if !this.sent_trailers {
                this.sent_trailers = true;
                if let Some(trailers) = shared.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        let frame = match shared.original.as_mut().poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                this.sent_trailers = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if shared.original.is_end_stream() {
            shared.ended = true;
        }
        let frame = match frame.into_data() {
            Ok(data) => {
                if !shared.overflowed {
                    shared.buffered += data.len();
                    if shared.buffered > REPLAY_LIMIT {
                        shared.overflowed = true;
                        shared.data = Vec::new();
                    } else {
                        shared.data.push(data.clone());
                        this.position += 1;
                    }
                }
                Frame::data(data)
            }
            Err(frame) => {
                if let Some(trailers) = frame.trailers_ref() {
                    shared.trailers = Some(trailers.clone());
                    shared.ended = true;
                    this.sent_trailers = true;
                }
                frame
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        shared.ended
            && (shared.overflowed || self.position >= shared.data.len())
            && (self.sent_trailers || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.shared).hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::{collections::VecDeque, convert::Infallible};

    /// A body that yields the given frames, one per poll.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn body(sizes: &[usize], trailers: bool) -> ReplayBody {
        let mut frames: VecDeque<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Frame::data(Bytes::from(vec![i as u8; *n])))
            .collect();
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-timeout", "1S".parse().unwrap());
            frames.push_back(Frame::trailers(map));
        }
        ReplayBody::new(Frames(frames))
    }

    async fn read(body: ReplayBody) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_bytes_and_trailers() {
        let first = body(&[10, 20, 30], true);
        let second = first.try_clone().unwrap();
        let (a, ta) = read(first).await;
        let (b, tb) = read(second).await;
        assert_eq!(a.len(), 60);
        assert_eq!(a, b);
        assert_eq!(ta, tb);
        assert!(ta.is_some());
    }

    #[tokio::test]
    async fn a_retry_after_a_partial_read_replays_then_continues() {
        let mut first = body(&[5, 5, 5], false);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().len(), 5);
        let second = first.try_clone().unwrap();
        drop(first);
        let (bytes, _) = read(second).await;
        assert_eq!(bytes, [vec![0u8; 5], vec![1u8; 5], vec![2u8; 5]].concat());
    }

    #[tokio::test]
    async fn bodies_over_the_limit_stream_but_are_not_replayed() {
        let first = body(&[REPLAY_LIMIT, 1], false);
        let copy = first.try_clone();
        assert!(copy.is_some(), "not known to be large until read");
        let (bytes, _) = read(first).await;
        assert_eq!(
            bytes.len(),
            REPLAY_LIMIT + 1,
            "the whole body still streams"
        );
        drop(copy);
        let again = body(&[REPLAY_LIMIT, 1], false);
        let _ = read(again.try_clone().unwrap()).await;
        assert!(again.try_clone().is_none(), "no replay past the limit");
    }
}
