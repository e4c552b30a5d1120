//! The certificate authority in Kubernetes mode, against a real API server
//! (kube-apiserver 1.20, `tests/kube/`): a proxy proves who it is with a projected
//! service-account token made for the audience `trellis` (TokenRequest here, as the
//! injector's projected volume will), the control plane checks it with a
//! TokenReview that names that audience, and certifies the service account the
//! token belongs to. A token made for another audience, or none, is refused. The
//! root lives in a Secret the control plane makes on first start and never
//! replaces.

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Secret, ServiceAccount},
};
use kube::api::{Api, PostParams};
use rcgen::{CertificateParams, KeyPair};
use serde_json::json;
use trellis_proto::v1::{identity_client::IdentityClient, CertifyRequest};
use trellis_tests::{
    http::TIMEOUT,
    kube::{ApiServer, ControlPlane},
};

const SERVER_NAME: &str = "trellis-control-plane.trellis-system.svc";

/// A token for `shop/frontend` made for `audience`.
async fn token(client: &kube::Client, audience: &str) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), "shop")
        .create_token_request("frontend", &PostParams::default(), &request)
        .await
        .expect("a token from TokenRequest")
        .status
        .expect("a token in the answer")
        .token
}

fn csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec()
}

#[tokio::test]
async fn a_service_account_token_for_trellis_is_certified_after_a_token_review() {
    let api = ApiServer::start().await;
    let namespaces: Api<Namespace> = Api::all(api.client.clone());
    for name in ["shop", "trellis-system"] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(api.client.clone(), "shop");
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "frontend"}})).unwrap(),
        )
        .await
        .unwrap();

    let mut cp = ControlPlane::start_with(
        &api.kubeconfig,
        &["--ca-secret", "trellis-system/trellis-ca"],
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(api.client.clone(), "trellis-system");
    let stored = secrets
        .get("trellis-ca")
        .await
        .expect("the root's Secret was made");
    let root_of = |secret: &Secret| {
        String::from_utf8(secret.data.as_ref().unwrap()["ca.crt"].0.clone()).unwrap()
    };
    let root = root_of(&stored);
    assert!(stored.data.as_ref().unwrap().contains_key("ca.key"));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&root))
        .domain_name(SERVER_NAME);
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cp.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT)
        .connect()
        .await
        .expect("TLS to the control plane");
    let mut client = IdentityClient::new(channel);

    let issued = client
        .certify(CertifyRequest {
            token: token(&api.client, "trellis").await,
            csr: csr(),
        })
        .await
        .unwrap_or_else(|e| panic!("refused: {e:?}\n{}", cp.log()))
        .into_inner();
    assert_eq!(
        issued.identity,
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );

    // A token for another audience proves nothing to Trellis.
    for token in [token(&api.client, "vault").await, "not-a-token".to_owned()] {
        let refused = client
            .certify(CertifyRequest { token, csr: csr() })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }

    // A restart reads the same root; the Secret is not written again.
    cp.restart().await;
    let after = secrets.get("trellis-ca").await.unwrap();
    assert_eq!(root_of(&after), root);
    assert_eq!(
        after.metadata.resource_version,
        stored.metadata.resource_version
    );
}
