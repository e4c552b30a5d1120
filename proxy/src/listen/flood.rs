//! PING and SETTINGS floods on a downstream HTTP/2 connection.
//!
//! Every PING and SETTINGS frame a client sends obliges the proxy to answer with
//! an ACK. h2 answers one at a time and reads nothing more until the ACK is out,
//! so a flooder that does not read stalls only itself; one that reads could keep
//! a core busy answering. [`FloodGuard`] sits under h2, reads the frame headers
//! going both ways, and holds each client to a budget of such frames: [`BURST`]
//! at once, refilled at [`REFILL_PER_SECOND`] and by one for each DATA frame the
//! proxy sends (a client estimating bandwidth pings once per round trip of data,
//! as grpc-go and hyper do). Past it the proxy sends GOAWAY ENHANCE_YOUR_CALM
//! (between two of h2's frames, never inside one) and closes the connection.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// PING and SETTINGS frames a client may send at once.
pub const BURST: f64 = 1000.0;
/// How fast the budget refills.
pub const REFILL_PER_SECOND: f64 = 100.0;

const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Follows frame boundaries in one direction of an HTTP/2 byte stream.
struct Frames {
    /// Bytes to pass before the next frame header (the preface, a payload).
    skip: usize,
    header: [u8; 9],
    have: usize,
}

impl Frames {
    fn new(skip: usize) -> Frames {
        Frames {
            skip,
            header: [0; 9],
            have: 0,
        }
    }

    /// True between two frames.
    fn at_boundary(&self) -> bool {
        self.skip == 0 && self.have == 0
    }

    /// How many of the next bytes still belong to the frame under way.
    fn left_in_frame(&self) -> usize {
        match self.have {
            0 => self.skip,
            have => 9 - have,
        }
    }

    /// Reads `bytes`, calling `frame(kind, flags, stream)` for each frame header.
    fn scan(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8, u32)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                let h = self.header;
                self.have = 0;
                self.skip = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                frame(h[3], h[4], stream);
            }
        }
    }
}

/// The budget of frames that oblige an answer.
struct Budget {
    tokens: f64,
    refilled: Instant,
}

impl Budget {
    /// Takes one token; false once there is none.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * REFILL_PER_SECOND).min(BURST);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    fn credit(&mut self) {
        self.tokens = (self.tokens + 1.0).min(BURST);
    }
}

/// A downstream HTTP/2 connection's bytes, with PING and SETTINGS floods cut.
pub struct FloodGuard<I> {
    io: I,
    read: Frames,
    write: Frames,
    budget: Budget,
    /// The highest stream the client opened, named in the GOAWAY.
    last_stream: u32,
    /// Once flooded: the GOAWAY, and how much of it is written.
    goaway: Option<([u8; 17], usize)>,
    /// The listener's direction, the label the flood is counted under.
    direction: &'static str,
}

impl<I> FloodGuard<I> {
    pub fn new(io: I, direction: &'static str) -> FloodGuard<I> {
        FloodGuard {
            io,
            read: Frames::new(PREFACE_LEN),
            write: Frames::new(0),
            budget: Budget {
                tokens: BURST,
                refilled: Instant::now(),
            },
            last_stream: 0,
            goaway: None,
            direction,
        }
    }

    fn flooded(&self) -> bool {
        self.goaway.is_some()
    }
}

fn goaway(last_stream: u32) -> [u8; 17] {
    let mut frame = [0u8; 17];
    frame[2] = 8; // payload length
    frame[3] = 0x7; // GOAWAY
    frame[9..13].copy_from_slice(&last_stream.to_be_bytes());
    frame[13..17].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    frame
}

fn flood_error() -> io::Error {
    io::Error::other("PING or SETTINGS flood: closed with GOAWAY ENHANCE_YOUR_CALM")
}

impl<I: AsyncWrite + Unpin> FloodGuard<I> {
    /// Writes the GOAWAY (only ever between two frames); ready once it is out.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((frame, written)) = &mut self.goaway else {
            return Poll::Ready(Ok(()));
        };
        while *written < frame.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &frame[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        Poll::Ready(Err(flood_error()))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for FloodGuard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flooded() {
            if this.write.at_boundary() {
                return this.poll_goaway(cx);
            }
            // h2 is inside a frame: its next write finishes it, then the GOAWAY.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let (budget, last_stream) = (&mut this.budget, &mut this.last_stream);
        let mut flooded = false;
        this.read
            .scan(&buf.filled()[before..], |kind, flags, stream| {
                if stream % 2 == 1 {
                    *last_stream = (*last_stream).max(stream);
                }
                if (kind == PING || kind == SETTINGS) && flags & ACK == 0 && !budget.take() {
                    flooded = true;
                }
            });
        if flooded {
            tracing::info!("HTTP/2 PING or SETTINGS flood; closing with ENHANCE_YOUR_CALM");
            this.goaway = Some((goaway(this.last_stream), 0));
            metrics::counter!(crate::metrics::HTTP_ERRORS_TOTAL, "direction" => this.direction, "kind" => "http2")
                .increment(1);
            // What was read is dropped: nothing more of this client is served.
            buf.set_filled(before);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FloodGuard<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.flooded() && this.write.at_boundary() {
            return this.poll_goaway(cx).map(|r| r.map(|()| 0));
        }
        // Once flooded, only the rest of the frame under way goes out.
        let buf = match this.flooded() {
            true => &buf[..this.write.left_in_frame().min(buf.len())],
            false => buf,
        };
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        let budget = &mut this.budget;
        this.write.scan(&buf[..n], |kind, _, _| {
            if kind == DATA {
                budget.credit();
            }
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend(payload);
        out
    }

    /// A guarded server side and the raw client side of an in-memory connection,
    /// the client's preface already sent.
    async fn pair() -> (FloodGuard<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, mut client) = tokio::io::duplex(1 << 20);
        client.write_all(&[b'P'; PREFACE_LEN]).await.unwrap();
        (FloodGuard::new(server, "test"), client)
    }

    #[test]
    fn frame_headers_are_found_however_the_bytes_are_split() {
        let mut bytes = vec![0u8; PREFACE_LEN];
        bytes.extend(frame(PING, 0, 0, &[1; 8]));
        bytes.extend(frame(0x1, 0x4, 3, &[9; 20]));
        bytes.extend(frame(SETTINGS, ACK, 0, &[]));
        for chunk in [1, 2, 7, 9, 10, 64] {
            let mut frames = Frames::new(PREFACE_LEN);
            let mut seen = Vec::new();
            for piece in bytes.chunks(chunk) {
                frames.scan(piece, |kind, flags, stream| {
                    seen.push((kind, flags, stream))
                });
            }
            assert_eq!(seen, [(PING, 0, 0), (0x1, 0x4, 3), (SETTINGS, ACK, 0)]);
            assert!(frames.at_boundary());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_taken_and_a_flood_past_it_gets_goaway() {
        let (mut guard, mut client) = pair().await;
        let ping = frame(PING, 0, 0, &[0; 8]);
        client.write_all(&frame(0x1, 0x5, 7, &[])).await.unwrap();
        client
            .write_all(&ping.repeat(BURST as usize))
            .await
            .unwrap();
        let mut read = vec![0u8; 1 << 20];
        let n = guard.read(&mut read).await.unwrap();
        assert_eq!(n, PREFACE_LEN + 9 + ping.len() * BURST as usize);
        // One more, at once: past the budget.
        client.write_all(&ping).await.unwrap();
        let error = guard.read(&mut read).await.unwrap_err();
        assert!(error.to_string().contains("flood"), "{error}");
        let mut sent = [0u8; 17];
        client.read_exact(&mut sent).await.unwrap();
        assert_eq!(sent, goaway(7), "GOAWAY ENHANCE_YOUR_CALM, last stream 7");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_with_time_and_with_data_sent() {
        let (mut guard, mut client) = pair().await;
        let ping = frame(PING, 0, 0, &[0; 8]);
        let mut read = vec![0u8; 1 << 20];
        client
            .write_all(&ping.repeat(BURST as usize))
            .await
            .unwrap();
        let _ = guard.read(&mut read).await.unwrap();
        // A keep-alive ping every 20 ms, for a minute: within the refill.
        for _ in 0..3000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(&ping).await.unwrap();
            assert_eq!(guard.read(&mut read).await.unwrap(), 17);
        }
        // A ping per DATA frame sent, as fast as data goes (bandwidth probes).
        for _ in 0..5000 {
            guard
                .write_all(&frame(DATA, 0, 1, &[0; 100]))
                .await
                .unwrap();
            client.write_all(&ping).await.unwrap();
            assert_eq!(guard.read(&mut read).await.unwrap(), 17);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_goaway_waits_for_the_frame_under_way() {
        let (mut guard, mut client) = pair().await;
        let mut read = vec![0u8; 1 << 20];
        client
            .write_all(&frame(PING, 0, 0, &[0; 8]).repeat(BURST as usize + 1))
            .await
            .unwrap();
        // h2 had written half a DATA frame when the flood was found.
        let data = frame(DATA, 0, 1, &[5; 32]);
        assert_eq!(guard.write(&data[..20]).await.unwrap(), 20);
        let reading = guard.read(&mut read);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), reading)
                .await
                .is_err(),
            "no GOAWAY inside a frame"
        );
        // Only the rest of that frame goes out, then the GOAWAY.
        let rest = [&data[20..], &frame(DATA, 0, 1, &[6; 8])[..]].concat();
        let n = guard.write(&rest).await.unwrap();
        assert_eq!(n, data.len() - 20);
        assert!(guard.write(&rest[n..]).await.is_err());
        let mut sent = vec![0u8; data.len() + 17];
        client.read_exact(&mut sent).await.unwrap();
        assert_eq!(&sent[..data.len()], &data[..]);
        assert_eq!(sent[data.len() + 3], 0x7, "then GOAWAY");
    }
}
