//! A gRPC client that dials from inside a pod.

use crate::{http::BoxError, netns::Pod, proto::echo_client::EchoClient};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use tonic::transport::{Channel, Endpoint, Uri};

/// An Echo client whose connections start in `pod` and dial `addr`.
pub async fn echo_client(pod: &Pod, addr: SocketAddr) -> Result<EchoClient<Channel>, BoxError> {
    let pod = pod.clone();
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let pod = pod.clone();
            async move { pod.connect(addr).await.map(TokioIo::new) }
        }))
        .await?;
    Ok(EchoClient::new(channel))
}
