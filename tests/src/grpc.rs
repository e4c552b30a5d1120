//! A gRPC client that dials from inside a pod, bounded like the HTTP clients
//! ([`crate::http::TIMEOUT`]) so a hung proxy fails the call instead of the test
//! hanging.

use crate::{
    http::{BoxError, TIMEOUT},
    netns::Pod,
    proto::echo_client::EchoClient,
};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tonic::transport::{Channel, Endpoint, Uri};

/// An Echo client whose connections start in `pod` and dial `addr`.
pub async fn echo_client(pod: &Pod, addr: SocketAddr) -> Result<EchoClient<Channel>, BoxError> {
    Ok(EchoClient::new(
        channel(pod, addr, &format!("http://{addr}")).await?,
    ))
}

/// A channel to `uri` (its authority is what the server sees) whose connections
/// start in `pod` and dial `addr`; connecting and each call (to its response
/// headers) are bounded by [`TIMEOUT`].
pub async fn channel(pod: &Pod, addr: SocketAddr, uri: &str) -> Result<Channel, BoxError> {
    let pod = pod.clone();
    let endpoint = Endpoint::from_shared(uri.to_owned())?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let pod = pod.clone();
        async move { pod.connect(addr).await.map(TokioIo::new) }
    }));
    match tokio::time::timeout(TIMEOUT, connect).await {
        Ok(channel) => Ok(channel?),
        Err(_) => Err(format!("gRPC connection to {addr}: none within {TIMEOUT:?}").into()),
    }
}
