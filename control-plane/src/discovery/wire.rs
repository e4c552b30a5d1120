//! The discovery stream on the wire, written by hand rather than generated. Each
//! response goes out as the gRPC message frame it is, in two buffers: a small head
//! (frame header, version, nonce, flags, removed names) made per stream, and its
//! resources already encoded. The whole mesh's resources are encoded once per
//! snapshot, cut into parts, and every stream sends those same buffers, where
//! tonic's generated server would build every stream its own messages and copy
//! each into the stream's encode buffer (a 1 000-proxy restart copied the whole
//! view 1 000 times). Protobuf lets a message's fields come in any order, so the
//! head and the resources concatenate into one `DiscoveryResponse`.

use crate::hub::{Json, Resources};
use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message as _;
use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
};
use tokio::sync::mpsc;
use tonic::{codec::Codec, Status, Streaming};
use trellis_proto::v1::{DiscoveryRequest, DiscoveryResponse};

/// Resource bytes per part of a response (see `more` in the discovery API): a
/// part holds resources until it passes this, and at least one.
pub const PART_BYTES: usize = 16 * 1024;

/// `resources` in `DiscoveryResponse`.
const RESOURCES_FIELD: u32 = 4;

/// Encodes `resources` as `DiscoveryResponse.resources` entries, cut into parts:
/// a part holds resources until it passes [`PART_BYTES`], and at least one.
pub(super) fn encode_parts<'a>(
    resources: impl IntoIterator<Item = (&'a String, &'a Json)>,
) -> Vec<Bytes> {
    let mut parts = Vec::new();
    let mut part = BytesMut::new();
    for (name, json) in resources {
        if part.len() >= PART_BYTES {
            parts.push(part.split().freeze());
        }
        encode_resource(name, json, &mut part);
    }
    if !part.is_empty() {
        parts.push(part.freeze());
    }
    parts
}

/// One `Resource { name = 1, json = 2 }` as a `resources` entry.
fn encode_resource(name: &str, json: &[u8], into: &mut BytesMut) {
    let field = |number: u32, len: usize| key_len(number) + encoded_len_varint(len as u64) + len;
    let inner = field(1, name.len()) + field(2, json.len());
    into.reserve(field(RESOURCES_FIELD, inner));
    encode_key(RESOURCES_FIELD, WireType::LengthDelimited, into);
    encode_varint(inner as u64, into);
    encode_key(1, WireType::LengthDelimited, into);
    encode_varint(name.len() as u64, into);
    into.put_slice(name.as_bytes());
    encode_key(2, WireType::LengthDelimited, into);
    encode_varint(json.len() as u64, into);
    into.put_slice(json);
}

/// Meshes encoded into parts, each once, for as long as a snapshot holds the
/// mesh (the whole mesh and every narrowed one).
#[derive(Default)]
pub(super) struct EncodedMeshes(Mutex<Vec<EncodedMesh>>);

/// A mesh (while a snapshot holds it) and its parts.
type EncodedMesh = (Weak<Resources>, Arc<[Bytes]>);

impl EncodedMeshes {
    /// `mesh` in parts; the first stream to ask encodes it, the others share that.
    pub(super) fn parts(&self, mesh: &Arc<Resources>) -> Arc<[Bytes]> {
        let mut meshes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        meshes.retain(|(held, _)| held.strong_count() > 0);
        // A live Weak keeps its allocation, so an equal address is the same mesh.
        if let Some((_, parts)) = meshes
            .iter()
            .find(|(held, _)| std::ptr::eq(held.as_ptr(), Arc::as_ptr(mesh)))
        {
            return parts.clone();
        }
        let parts: Arc<[Bytes]> = encode_parts(mesh.iter()).into();
        meshes.push((Arc::downgrade(mesh), parts.clone()));
        parts
    }
}

/// One response as its gRPC message frame: the head, then the resources.
pub(crate) struct Message {
    head: Bytes,
    resources: Bytes,
}

impl Message {
    /// `head` (a response without resources) followed by `resources` (encoded
    /// entries), or an error when the message is past gRPC's 4 GiB frame.
    pub(super) fn new(head: &DiscoveryResponse, resources: Bytes) -> Result<Message, String> {
        let len = head.encoded_len() + resources.len();
        let len = u32::try_from(len)
            .map_err(|_| format!("a response of {len} bytes is past gRPC's 4 GiB message"))?;
        let mut buf = BytesMut::with_capacity(5 + head.encoded_len());
        buf.put_u8(0); // not compressed
        buf.put_u32(len);
        head.encode_raw(&mut buf);
        Ok(Message {
            head: buf.freeze(),
            resources,
        })
    }

    /// The response this message carries, decoded as a proxy would.
    #[cfg(test)]
    pub(crate) fn decode(&self) -> DiscoveryResponse {
        let mut bytes = self.head[5..].to_vec();
        bytes.extend_from_slice(&self.resources);
        let len = u32::from_be_bytes(self.head[1..5].try_into().unwrap());
        assert_eq!(
            len as usize,
            bytes.len(),
            "the frame header counts the message"
        );
        DiscoveryResponse::decode(&bytes[..]).expect("a valid DiscoveryResponse")
    }
}

/// A stream's response body: its messages as they come, then grpc-status OK when
/// the stream ends.
struct ResponseBody {
    messages: mpsc::Receiver<Message>,
    resources: Option<Bytes>,
    ended: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(resources) = this.resources.take() {
            return Poll::Ready(Some(Ok(Frame::data(resources))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(this.messages.poll_recv(cx)) {
            Some(message) => {
                this.resources = Some(message.resources).filter(|r| !r.is_empty());
                Poll::Ready(Some(Ok(Frame::data(message.head))))
            }
            None => {
                this.ended = true;
                let mut trailers = http::HeaderMap::new();
                trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }
}

/// A stream's request as the service reads it: its messages decoded by tonic.
pub(super) fn request(
    request: http::Request<tonic::body::Body>,
) -> tonic::Request<Streaming<DiscoveryRequest>> {
    let decoder =
        tonic_prost::ProstCodec::<DiscoveryResponse, DiscoveryRequest>::default().decoder();
    tonic::Request::from_http(request.map(|body| Streaming::new_request(decoder, body, None, None)))
}

/// A stream's response: `messages` as they come, then grpc-status OK.
pub(super) fn response(messages: mpsc::Receiver<Message>) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(ResponseBody {
        messages,
        resources: None,
        ended: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(names: &[&str]) -> Arc<Resources> {
        Arc::new(
            names
                .iter()
                .map(|n| (n.to_string(), Json::from(format!("{{\"name\":\"{n}\"}}"))))
                .collect(),
        )
    }

    #[test]
    fn a_mesh_is_encoded_once_for_every_stream_while_a_snapshot_holds_it() {
        let meshes = EncodedMeshes::default();
        let (one, two) = (mesh(&["a", "b"]), mesh(&["a", "b"]));
        let first = meshes.parts(&one);
        assert!(Arc::ptr_eq(&first, &meshes.parts(&one)), "the same buffers");
        assert!(
            !Arc::ptr_eq(&first, &meshes.parts(&two)),
            "another mesh, its own"
        );
        drop(one);
        meshes.parts(&two);
        assert_eq!(
            meshes.0.lock().unwrap().len(),
            1,
            "a mesh no snapshot holds is let go"
        );
    }

    #[test]
    fn parts_decode_as_the_resources_they_were_made_of() {
        let names: Vec<String> = (0..100).map(|i| format!("service/shop/s{i}/80")).collect();
        let json = Json::from(vec![b'x'; 1000]);
        let parts = encode_parts(names.iter().map(|n| (n, &json)));
        assert!(parts.len() > 1, "about 100 KB goes in more than one part");
        let mut decoded = Vec::new();
        for part in parts {
            let head = DiscoveryResponse {
                version: "7".into(),
                ..Default::default()
            };
            let response = Message::new(&head, part).unwrap().decode();
            assert_eq!(response.version, "7");
            decoded.extend(response.resources);
        }
        let decoded_names: Vec<&String> = decoded.iter().map(|r| &r.name).collect();
        assert_eq!(decoded_names, names.iter().collect::<Vec<_>>());
        assert!(decoded.iter().all(|r| r.json == json));
    }
}
