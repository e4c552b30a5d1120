//! Every response the proxy makes itself, built in one place: an error (no route,
//! no endpoint, a limit, a timeout, an upstream failure) or a fault abort. The
//! reason travels in `x-trellis-error`. A gRPC client gets what a gRPC client can
//! read: a trailers-only response with `grpc-status` and `grpc-message` (the code
//! the stage chose, or the one gRPC's HTTP-to-gRPC mapping gives the status).

use crate::{
    stack::outcome::{Failure, Rsp},
    upstream::body::ResponseBody,
};
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use trellis_proto::model::policy::GrpcCode;

/// Response header naming why the proxy, not the upstream, produced or changed a
/// response.
pub const FLAGS_HEADER: &str = "x-trellis-flags";
/// Response header with the detail behind the flags, for whoever reads the response.
pub const ERROR_HEADER: &str = "x-trellis-error";

/// The response for a request the proxy answers itself; `grpc`: the request was gRPC.
pub fn failure(failure: &Failure, grpc: bool) -> Rsp {
    let mut response = if grpc {
        let code = failure.grpc.unwrap_or_else(|| grpc_code(failure.status));
        let mut response = Response::new(ResponseBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code as i32));
        if let Ok(message) = HeaderValue::from_str(&grpc_message(&failure.message)) {
            headers.insert("grpc-message", message);
        }
        response
    } else {
        let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(format!(
            "{}\n",
            failure.message
        )))));
        *response.status_mut() = failure.status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    };
    if let Ok(value) = HeaderValue::from_str(&failure.message) {
        response.headers_mut().insert(ERROR_HEADER, value);
    }
    response
}

/// gRPC's mapping of the HTTP statuses a proxy may answer with
/// (grpc/doc/http-grpc-status-mapping.md).
fn grpc_code(status: StatusCode) -> GrpcCode {
    match status.as_u16() {
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502 | 503 | 504 => GrpcCode::Unavailable,
        _ => GrpcCode::Unknown,
    }
}

/// `grpc-message` is percent-encoded outside printable ASCII (gRPC over HTTP/2).
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::outcome::Flags;

    #[test]
    fn http_clients_get_the_status_and_the_reason() {
        let failure = Failure::local(StatusCode::SERVICE_UNAVAILABLE, Flags::UH, "no endpoints");
        let response = super::failure(&failure, false);
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[ERROR_HEADER], "no endpoints");
        assert!(response.headers().get("grpc-status").is_none());
    }

    #[test]
    fn grpc_clients_get_a_grpc_status_in_a_trailers_only_response() {
        let failure = Failure::local(StatusCode::NOT_FOUND, Flags::NR, "no route");
        let response = super::failure(&failure, true);
        assert_eq!(response.status(), 200, "gRPC statuses ride on HTTP 200");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(response.headers()["grpc-status"], "12", "UNIMPLEMENTED");
        assert_eq!(response.headers()["grpc-message"], "no route");

        // A code the stage chose wins over the mapping; the message is encoded.
        let failure = Failure {
            grpc: Some(GrpcCode::ResourceExhausted),
            ..Failure::local(StatusCode::TOO_MANY_REQUESTS, Flags::RL, "100% used")
        };
        let response = super::failure(&failure, true);
        assert_eq!(response.headers()["grpc-status"], "8");
        assert_eq!(response.headers()["grpc-message"], "100%25 used");
        let timeout = Failure::timeout(std::time::Duration::from_secs(1));
        assert_eq!(super::failure(&timeout, true).headers()["grpc-status"], "4");
    }
}
