//! HTTP/2 written frame by frame, to send what no well-behaved client would
//! (streams reset as soon as they open, endless CONTINUATION, floods of PING and
//! SETTINGS) and to see every frame the server answers, GOAWAY included.

use crate::netns::Pod;
use std::{net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::tcp::OwnedWriteHalf,
    sync::mpsc,
};

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// Error codes (RFC 9113 section 7).
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const CANCEL: u32 = 0x8;
pub const REFUSED_STREAM: u32 = 0x7;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame as it travels.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `count` whole requests (HEADERS ending the stream, `block` each) on streams
/// `first`, `first + 2`, ...
pub fn requests(block: &[u8], first: u32, count: u32) -> Vec<u8> {
    (0..count)
        .flat_map(|i| frame(HEADERS, END_STREAM | END_HEADERS, first + 2 * i, block))
        .collect()
}

/// RST_STREAM with `code`.
pub fn reset(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// The HPACK block of `GET path` to `authority`: static-table entries and
/// literals never indexed, so the block means the same whatever came before.
pub fn get(authority: &str, path: &str) -> Vec<u8> {
    // :method GET, :scheme http.
    let mut block = vec![0x82, 0x86];
    literal(&mut block, 0x04, path); // :path
    literal(&mut block, 0x01, authority); // :authority
    block
}

/// A literal header field without indexing, its name taken from the static table.
fn literal(block: &mut Vec<u8>, name_index: u8, value: &str) {
    assert!(value.len() < 127, "short values only: {value}");
    block.push(name_index);
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}

/// A frame the server sent.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    pub fn code(&self) -> Option<u32> {
        let at = match self.kind {
            GOAWAY => 4,
            RST_STREAM => 0,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }
}

/// A raw HTTP/2 client connection. Frames are read as they arrive, by a task of
/// their own, so what the server said before it closed is kept even when the
/// close is a reset.
pub struct RawH2 {
    writer: OwnedWriteHalf,
    frames: mpsc::UnboundedReceiver<Frame>,
}

impl RawH2 {
    /// Connects from `pod` to `to`, sends the preface and empty SETTINGS, and
    /// acknowledges the server's SETTINGS, so its limits are in force.
    pub async fn connect(pod: &Pod, to: SocketAddr) -> std::io::Result<RawH2> {
        let stream = pod.connect(to).await?;
        let (mut reader, mut writer) = stream.into_split();
        writer.write_all(PREFACE).await?;
        writer.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        let (tx, frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut header = [0u8; 9];
            while reader.read_exact(&mut header).await.is_ok() {
                let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0u8; len];
                if reader.read_exact(&mut payload).await.is_err() {
                    break;
                }
                let stream = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
                let frame = Frame {
                    kind: header[3],
                    flags: header[4],
                    stream,
                    payload,
                };
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
        let mut raw = RawH2 { writer, frames };
        let settings = raw
            .next_where(Duration::from_secs(10), |f| {
                f.kind == SETTINGS && f.flags & ACK == 0
            })
            .await;
        if settings.is_none() {
            return Err(std::io::Error::other("the server sent no SETTINGS"));
        }
        raw.send(&frame(SETTINGS, ACK, 0, &[])).await?;
        Ok(raw)
    }

    /// Writes `bytes` (whole frames, usually many).
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// The next frame from the server, or `None` once it closed or `limit` passed.
    pub async fn next(&mut self, limit: Duration) -> Option<Frame> {
        tokio::time::timeout(limit, self.frames.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next frame that `wanted` picks, skipping the others (bounded by `limit`).
    pub async fn next_where(
        &mut self,
        limit: Duration,
        wanted: impl Fn(&Frame) -> bool,
    ) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.next(left).await?;
            if wanted(&frame) {
                return Some(frame);
            }
        }
    }

    /// The code of the GOAWAY the server closes with, or what happened instead.
    pub async fn goaway(&mut self, limit: Duration) -> Result<u32, String> {
        match self.next_where(limit, |f| f.kind == GOAWAY).await {
            Some(frame) => frame
                .code()
                .ok_or_else(|| format!("short GOAWAY {frame:?}")),
            None => Err(format!("no GOAWAY within {limit:?}")),
        }
    }

    /// Every frame until the server closes or `limit` passes.
    pub async fn drain(&mut self, limit: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(frame) => frames.push(frame),
                None => return frames,
            }
        }
    }
}
