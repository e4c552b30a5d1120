//! Request bodies as they cross the proxy.
//!
//! Bodies stream frame by frame (trailers included) and are never collected. A
//! client's body that stalls mid-way is cut ([`ClientBody`]). The one exception is a request on a route with retries: [`ReplayBody`] keeps a copy of
//! what it streamed, up to [`REPLAY_LIMIT`], so a retry can send it again; past the
//! limit the copy is dropped and the request is no longer retried.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio::time::{Instant, Sleep};

/// Request bodies larger than this are never buffered for a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Original = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

pub enum RequestBody {
    Incoming(ClientBody),
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

/// A client's request body, cut when it stalls: a client that stops sending
/// mid-body would hold the upstream request (and its connection) open for as long
/// as it likes, so after `limit` without a frame the body ends in [`BodyStalled`].
pub struct ClientBody<B = Incoming> {
    body: B,
    /// `None` when the body had ended already, or nothing is ever cut.
    stall: Option<Stall>,
}

struct Stall {
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    stalled: Arc<AtomicBool>,
}

/// The error a stalled client body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no part of its request body for {0:?} (--request-idle-timeout)")]
pub struct BodyStalled(pub Duration);

impl<B: Body> ClientBody<B> {
    /// Watches `body` for stalls longer than `limit` (zero: never cut). The flag
    /// that comes with it is set once the body is cut, so the request's answer can
    /// say why. A body that has already ended costs nothing.
    pub fn new(body: B, limit: Duration) -> (ClientBody<B>, Option<Arc<AtomicBool>>) {
        if limit.is_zero() || body.is_end_stream() {
            return (ClientBody { body, stall: None }, None);
        }
        let stalled = Arc::new(AtomicBool::new(false));
        let stall = Stall {
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            stalled: stalled.clone(),
        };
        let body = ClientBody {
            body,
            stall: Some(stall),
        };
        (body, Some(stalled))
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(stall) = &mut this.stall {
                    let next = Instant::now() + stall.limit;
                    stall.timer.as_mut().reset(next);
                }
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(stall) = &mut this.stall else {
                    return Poll::Pending;
                };
                if stall.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                stall.stalled.store(true, Ordering::Relaxed);
                let limit = stall.limit;
                this.stall = None;
                Poll::Ready(Some(Err(BodyStalled(limit).into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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

    type Fed = Result<Frame<Bytes>, Infallible>;

    /// A body the test feeds frame by frame.
    fn fed() -> (
        tokio::sync::mpsc::Sender<Fed>,
        http_body_util::StreamBody<tokio_stream::wrappers::ReceiverStream<Fed>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        (tx, body)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_is_cut_after_the_limit_and_only_then() {
        let limit = Duration::from_secs(5);
        let (tx, body) = fed();
        let (mut body, stalled) = ClientBody::new(body, limit);
        let stalled = stalled.expect("a body still to come is watched");
        // A frame every 4 s keeps it alive: each frame restarts the clock.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"part"))))
                .await
                .unwrap();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "part");
        }
        assert!(!stalled.load(Ordering::Relaxed));
        // Then nothing: cut after exactly the limit.
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), limit);
        assert!(error.is::<BodyStalled>(), "{error}");
        assert!(stalled.load(Ordering::Relaxed));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_body_or_a_zero_limit_is_never_cut() {
        let (_, none) = ClientBody::new(
            http_body_util::Empty::<Bytes>::new(),
            Duration::from_secs(1),
        );
        assert!(none.is_none(), "nothing to watch on an ended body");
        let (tx, body) = fed();
        let (mut body, flag) = ClientBody::new(body, Duration::ZERO);
        assert!(flag.is_none());
        let later = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
                .await
                .unwrap();
        };
        let (frame, ()) = tokio::join!(body.frame(), later);
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "late");
    }
}
