//! Opaque TCP forwarding: bytes in both directions until either side closes.

use std::{io, net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncWrite},
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
pub async fn splice<C, S>(client: &mut C, mut server: S) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(client, &mut server).await?;
    Ok(())
}
