//! The accepted connection as the forwarding code sees it: the bytes protocol
//! detection already read are replayed first, and every byte is counted.

use bytes::{Buf, Bytes};
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An accepted stream with the detection prefix put back in front of it.
///
/// `from_client` and `to_client` count bytes as they pass; they are metric handles
/// resolved once per connection, so counting costs one atomic add per read or write.
pub struct ClientIo<I> {
    prefix: Bytes,
    inner: I,
    from_client: metrics::Counter,
    to_client: metrics::Counter,
}

impl<I> ClientIo<I> {
    pub fn new(
        prefix: Bytes,
        inner: I,
        from_client: metrics::Counter,
        to_client: metrics::Counter,
    ) -> Self {
        ClientIo {
            prefix,
            inner,
            from_client,
            to_client,
        }
    }

    /// The bytes detection read that were not yet read back, taken.
    pub fn take_prefix(&mut self) -> Bytes {
        std::mem::take(&mut self.prefix)
    }

    pub fn inner(&self) -> &I {
        &self.inner
    }

    pub fn from_client(&self) -> &metrics::Counter {
        &self.from_client
    }

    pub fn to_client(&self) -> &metrics::Counter {
        &self.to_client
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ClientIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.from_client.increment(n as u64);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.from_client
                .increment((buf.filled().len() - before) as u64);
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ClientIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = poll {
            self.to_client.increment(n as u64);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.to_client.increment(n as u64);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that keeps a copy of what is read from it until told to stop, so that
/// a ClientHello read to see whether it asks for mesh mTLS can be replayed to the
/// app's own TLS server when it does not.
pub struct Recorder<I> {
    inner: I,
    recorded: Option<Vec<u8>>,
}

impl<I> Recorder<I> {
    pub fn new(inner: I) -> Self {
        Recorder {
            inner,
            recorded: Some(Vec::new()),
        }
    }

    /// Stops keeping a copy (the handshake goes on as mesh mTLS).
    pub fn stop(&mut self) {
        self.recorded = None;
    }

    /// What was read so far, and the stream to read the rest from.
    pub fn into_parts(self) -> (Bytes, I) {
        (Bytes::from(self.recorded.unwrap_or_default()), self.inner)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Recorder<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(copy)) = (&poll, this.recorded.as_mut()) {
            copy.extend_from_slice(&buf.filled()[before..]);
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Recorder<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn replays_prefix_then_reads_inner() {
        let (mut far, near) = tokio::io::duplex(64);
        let mut io = ClientIo::new(
            Bytes::from_static(b"GET "),
            near,
            metrics::Counter::noop(),
            metrics::Counter::noop(),
        );
        far.write_all(b"/ HTTP/1.1\r\n").await.unwrap();
        drop(far);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\n");
    }
}
