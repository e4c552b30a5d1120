//! The applications that run in test pods: an HTTP/1.1 + h2c server, a gRPC
//! service, a WebSocket echo, a TCP echo and a server-first (banner) protocol.
//! They run on the test's runtime, listening on sockets made inside the pod.

use crate::proto::{
    echo_server::{Echo, EchoServer},
    EchoReply, EchoRequest, StreamRequest,
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};
use tonic::Status;

type AppBody = BoxBody<Bytes, Infallible>;

/// The byte at offset `i` of every generated body, so a receiver can check content.
pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// A running app; dropping it stops the accept loop.
pub struct App {
    task: JoinHandle<()>,
    in_flight: Arc<AtomicUsize>,
    /// The path of every request received (by [`http_app`]).
    paths: Arc<std::sync::Mutex<Vec<String>>>,
}

impl App {
    fn new(task: JoinHandle<()>) -> App {
        App::counting(task, Arc::default(), Arc::default())
    }

    fn counting(
        task: JoinHandle<()>,
        in_flight: Arc<AtomicUsize>,
        paths: Arc<std::sync::Mutex<Vec<String>>>,
    ) -> App {
        App {
            task,
            in_flight,
            paths,
        }
    }

    /// The paths of the requests [`http_app`] received, in order.
    pub fn requests(&self) -> Vec<String> {
        self.paths.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Requests the app is handling right now (counted by [`http_app`]; 0 for the
    /// others): what a test waits on to know its requests have arrived.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits, at most 10 s, until the app is handling exactly `n` requests;
    /// panics naming `what` otherwise.
    pub async fn until_in_flight(&self, n: usize, what: &str) {
        crate::wait::until(Duration::from_secs(10), what, || async {
            match self.in_flight() {
                now if now == n => Ok(()),
                now => Err(format!("{now} in flight")),
            }
        })
        .await;
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_accept<F, Fut>(listener: TcpListener, serve: F) -> JoinHandle<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    })
}

/// Counts a request in flight until it is dropped (answered or abandoned).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// HTTP/1.1 and h2c on one port. Routes:
/// - `/` answers `hello from <name>`;
/// - `/upload` reads the whole request body as a stream and answers `<len> <sum>`;
/// - `/bytes/<n>` streams `n` pattern bytes in 64 KiB chunks;
/// - `/slow/<ms>` answers after `ms` milliseconds;
/// - `/status/<code>` answers with that status.
///
/// Every response carries `x-app` (the name), `x-seen-host` (the Host or authority
/// the app saw), `x-seen-headers` (the request header names it got) and
/// `x-seen-version` (the request's HTTP version, as `HTTP/1.1`).
/// [`App::in_flight`] counts the requests it is handling.
pub fn http_app(listener: TcpListener, name: &'static str) -> App {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (count, seen) = (in_flight.clone(), paths.clone());
    let task = spawn_accept(listener, move |stream| {
        let (count, seen) = (count.clone(), seen.clone());
        async move {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                if let Ok(mut seen) = seen.lock() {
                    seen.push(req.uri().path().to_owned());
                }
                let guard = InFlight::start(&count);
                async move {
                    let response = handle(name, req).await;
                    drop(guard);
                    response
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        }
    });
    App::counting(task, in_flight, paths)
}

async fn handle(
    name: &'static str,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    let seen_host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let seen_headers = req
        .headers()
        .keys()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let seen_version = format!("{:?}", req.version());
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (status, body): (StatusCode, AppBody) = match (parts.next(), parts.next()) {
        (Some("upload"), _) => {
            let mut body = req.into_body();
            let (mut len, mut sum) = (0u64, 0u64);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    for (i, b) in data.iter().enumerate() {
                        sum = sum.wrapping_add((len + i as u64).wrapping_mul(u64::from(*b)));
                    }
                    len += data.len() as u64;
                }
            }
            (StatusCode::OK, full(format!("{len} {sum}")))
        }
        (Some("bytes"), Some(n)) => {
            let total: usize = n.parse().unwrap_or(0);
            let chunks = (0..total).step_by(64 * 1024).map(move |start| {
                let end = (start + 64 * 1024).min(total);
                Ok::<_, Infallible>(Frame::data(Bytes::from(
                    (start..end).map(pattern).collect::<Vec<u8>>(),
                )))
            });
            (
                StatusCode::OK,
                BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks))),
            )
        }
        (Some("slow"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            (StatusCode::OK, full("slow done".to_owned()))
        }
        (Some("status"), Some(code)) => (
            StatusCode::from_u16(code.parse().unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            full(String::new()),
        ),
        _ => (StatusCode::OK, full(format!("hello from {name}"))),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("x-app", name.parse().unwrap());
    if let Ok(v) = seen_host.parse() {
        headers.insert("x-seen-host", v);
    }
    if let Ok(v) = seen_headers.parse() {
        headers.insert("x-seen-headers", v);
    }
    if let Ok(v) = seen_version.parse() {
        headers.insert("x-seen-version", v);
    }
    Ok(response)
}

fn full(text: String) -> AppBody {
    Full::new(Bytes::from(text)).boxed()
}

/// Answers `status` to `percent` % of requests and 200 to the rest; the draw is
/// seeded, so a run of sequential requests fails the same ones every time.
pub fn failing_app(listener: TcpListener, name: &'static str, status: u16, percent: f64) -> App {
    let state = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0x5EED));
    App::new(spawn_accept(listener, move |stream| {
        let state = state.clone();
        async move {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                // splitmix64 over a shared counter: repeatable, lock-free.
                let mut z = state
                    .fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed)
                    .wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let draw = (z ^ (z >> 31)) as f64 / u64::MAX as f64 * 100.0;
                let code = if draw < percent { status } else { 200 };
                let mut response = Response::new(full(format!("{code} from {name}")));
                *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                response
                    .headers_mut()
                    .insert("x-app", name.parse().unwrap());
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }))
}

/// Echoes every WebSocket message back.
pub fn websocket_app(listener: TcpListener) -> App {
    App::new(spawn_accept(listener, |stream| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            if ws.send(message).await.is_err() {
                break;
            }
        }
    }))
}

/// Echoes bytes until the client closes.
pub fn tcp_echo_app(listener: TcpListener) -> App {
    App::new(spawn_accept(listener, |mut stream| async move {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    }))
}

/// An app that speaks its own TLS (a certificate of its own, for `name`) and
/// echoes what arrives inside it. Returns the app and its certificate (DER), for
/// the client to trust.
pub fn tls_echo_app(listener: TcpListener, name: &str) -> (App, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .and_then(|params| params.self_signed(&key))
        .expect("a self-signed certificate");
    let der = cert.der().to_vec();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_no_client_auth().with_single_cert(
            vec![der.clone().into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
    })
    .expect("a TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = App::new(spawn_accept(listener, move |stream| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(tls) = acceptor.accept(stream).await {
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        }
    }));
    (app, der)
}

/// Reads the start of a request, then resets the connection without answering.
pub fn reset_app(listener: TcpListener) -> App {
    App::new(spawn_accept(listener, |mut stream| async move {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        // Linger 0: close sends RST instead of FIN.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }))
}

/// The greeting a server-first app sends as soon as a client connects.
pub const BANNER: &[u8] = b"220 trellis-test ready\r\n";

/// Speaks first, like SMTP or MySQL: sends [`BANNER`], then echoes.
pub fn banner_app(listener: TcpListener) -> App {
    App::new(spawn_accept(listener, |mut stream| async move {
        if stream.write_all(BANNER).await.is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    }))
}

/// Echo service state: `Unary` with a message starting "flaky" fails every other
/// call with UNAVAILABLE (for retry tests).
#[derive(Default)]
struct EchoService {
    flaky_calls: std::sync::atomic::AtomicUsize,
}

type ReplyStream = Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        if request.get_ref().message.starts_with("flaky")
            && self
                .flaky_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                % 2
                == 0
        {
            return Err(Status::unavailable("flaky: try again"));
        }
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            index: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<StreamRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let request = request.into_inner();
        let message = request.message.clone();
        let replies = (0..request.count).map(move |index| {
            Ok(EchoReply {
                message: message.clone(),
                index,
            })
        });
        let end = (!request.fail_with.is_empty())
            .then(|| Err(Status::failed_precondition(request.fail_with)));
        let stream = futures_util::stream::iter(replies.chain(end));
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// The gRPC Echo service.
pub fn grpc_app(listener: TcpListener) -> App {
    App::new(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::default()))
            .serve_with_incoming(incoming)
            .await;
    }))
}
