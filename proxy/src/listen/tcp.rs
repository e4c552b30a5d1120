//! Opaque TCP forwarding: bytes in both directions until either side closes.
//!
//! Between two plain TCP sockets the bytes never enter the proxy: `splice(2)`
//! moves them from one socket into a pipe and from the pipe into the other,
//! inside the kernel. Anything else (a TLS side) is copied through a buffer.

use super::io::ClientIo;
use std::{
    io,
    net::{Shutdown, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest},
    net::TcpStream,
};

/// A connection to `target`, or why there is none.
pub async fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let server = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {target} timed out"),
            )
        })??;
    let _ = server.set_nodelay(true);
    Ok(server)
}

/// Copies bytes both ways, half-closing each direction as its sender finishes.
pub async fn copy<C, S>(client: &mut C, mut server: S) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(client, &mut server).await?;
    Ok(())
}

/// Bytes per `splice(2)` call: the pipe's default capacity.
const SPLICE_CHUNK: usize = 64 * 1024;

/// Forwards between a plain TCP client and server without copying through the
/// proxy: what detection already read goes first, then `splice(2)` both ways,
/// half-closing each direction as its sender finishes. Bytes are counted as
/// [`ClientIo`] counts them.
pub async fn splice(client: &mut ClientIo<TcpStream>, mut server: TcpStream) -> io::Result<()> {
    let prefix = client.take_prefix();
    if !prefix.is_empty() {
        server.write_all(&prefix).await?;
        client.from_client().increment(prefix.len() as u64);
    }
    let (from_client, to_client) = (client.from_client().clone(), client.to_client().clone());
    let client = client.inner();
    tokio::try_join!(
        one_way(client, &server, &from_client),
        one_way(&server, client, &to_client),
    )?;
    Ok(())
}

/// Moves bytes from `from` to `to` until `from` closes, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream, counted: &metrics::Counter) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe()?;
    loop {
        // The pipe is empty here, so a would-block means the socket has nothing.
        let mut in_pipe = from
            .async_io(Interest::READABLE, || {
                splice_once(from.as_raw_fd(), pipe_in.as_raw_fd(), SPLICE_CHUNK)
            })
            .await?;
        if in_pipe == 0 {
            return socket2::SockRef::from(to)
                .shutdown(Shutdown::Write)
                .or_else(|e| {
                    // The other side may be gone already; that direction is done anyway.
                    match e.kind() {
                        io::ErrorKind::NotConnected => Ok(()),
                        _ => Err(e),
                    }
                });
        }
        while in_pipe > 0 {
            // The pipe holds data here, so a would-block means the socket is full.
            let moved = to
                .async_io(Interest::WRITABLE, || {
                    splice_once(pipe_out.as_raw_fd(), to.as_raw_fd(), in_pipe)
                })
                .await?;
            if moved == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            in_pipe -= moved;
            counted.increment(moved as u64);
        }
    }
}

/// A non-blocking pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One non-blocking `splice(2)` of up to `len` bytes.
fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null
    // offsets are what splice takes for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
