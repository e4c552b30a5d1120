//! Protocol detection: read the first bytes a client sends and decide how to proxy
//! the connection.
//!
//! Decisions are made on as few bytes as possible (a method and a space, the 24-byte
//! HTTP/2 preface, two bytes of a TLS record) so a client is never held longer than
//! it takes to send them. A client that sends nothing is given up on after the
//! detection timeout and proxied as opaque TCP, which is what server-first protocols
//! need; ports known to be server-first skip detection altogether.

use bytes::BytesMut;
use std::{io, time::Duration};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How a connection is proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello: forwarded opaquely (the bytes are encrypted end to end).
    Tls,
    Opaque,
}

impl Protocol {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

/// What HTTP/2 "prior knowledge" clients send first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request methods recognised as the start of an HTTP/1 request line.
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Decides from the bytes read so far; `None` means more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        // A TLS handshake record: content type 22, then major version 3.
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    let mut undecided = H2_PREFACE.starts_with(buf);
    for method in METHODS {
        if buf.len() > method.len() {
            if buf.starts_with(method) && buf[method.len()] == b' ' {
                return Some(Protocol::Http1);
            }
        } else if method.starts_with(buf) {
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Reads from `io` into `buf` until the protocol is known, the peer stops sending
/// (EOF), or `timeout` passes; the latter two mean opaque TCP. Everything read stays
/// in `buf` to be replayed to the upstream.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(buf) {
            return Ok(protocol);
        }
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Err(_elapsed) => return Ok(Protocol::Opaque),
            Ok(Ok(0)) => return Ok(Protocol::Opaque),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Tls));
        assert_eq!(classify(b"\x16\x01"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x00\x00\x00"), Some(Protocol::Opaque));
    }

    #[test]
    fn waits_on_prefixes_that_could_still_be_http() {
        for partial in [
            &b""[..],
            b"G",
            b"GE",
            b"GET",
            b"PRI * HTTP/2",
            b"P",
            b"\x16",
        ] {
            assert_eq!(
                classify(partial),
                None,
                "{:?}",
                String::from_utf8_lossy(partial)
            );
        }
        // "PRI" is the preface, never a method: a wrong preface is opaque.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_is_opaque_exactly_at_the_timeout() {
        let (_far, mut near) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let mut buf = BytesMut::new();
        let protocol = detect(&mut near, &mut buf, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert!(buf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_split_across_reads_are_joined_and_kept() {
        let (mut far, mut near) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            far.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            far.write_all(b"\r\nSM\r\n\r\nrest").await.unwrap();
            far
        });
        let start = tokio::time::Instant::now();
        let mut buf = BytesMut::new();
        let protocol = detect(&mut near, &mut buf, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(&buf[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn eof_before_a_decision_is_opaque() {
        let (mut far, mut near) = tokio::io::duplex(64);
        far.write_all(b"GE").await.unwrap();
        drop(far);
        let mut buf = BytesMut::new();
        let protocol = detect(&mut near, &mut buf, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert_eq!(&buf[..], b"GE");
    }
}
