//! Opaque TCP forwarding: bytes in both directions until either side closes.

use std::{io, net::SocketAddr, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Connects to `target` and copies bytes both ways, half-closing each direction as
/// its sender finishes. A failed connect closes the client connection.
pub async fn forward<C>(
    client: &mut C,
    target: SocketAddr,
    connect_timeout: Duration,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut server = tokio::time::timeout(connect_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {target} timed out"),
            )
        })??;
    let _ = server.set_nodelay(true);
    tokio::io::copy_bidirectional(client, &mut server).await?;
    Ok(())
}
