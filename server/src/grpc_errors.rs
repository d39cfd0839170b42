//! Rewrites transport-level gRPC errors that tonic words differently from grpc-go, so
//! clients see exactly what etcd sends. Today: a request above the receive limit is
//! `ResourceExhausted` "grpc: received message larger than max (N vs. M)" in etcd,
//! where tonic answers `OutOfRange` with its own message.

use http::HeaderValue;

const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// Parses tonic's message into (found, limit).
fn parse_too_large(msg: &str) -> Option<(u64, u64)> {
    let rest = msg.strip_prefix(TONIC_TOO_LARGE)?;
    let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
    let limit = rest.strip_suffix(" bytes")?;
    Some((found.parse().ok()?, limit.parse().ok()?))
}

/// Percent-decodes a grpc-message header value.
fn decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%'
            && i + 2 < v.len()
            && let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&v[i + 1..i + 3]), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Rewrites the grpc-status/grpc-message headers of a trailers-only error response.
pub fn etcd_transport_errors<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers_mut();
    let is_out_of_range = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"11");
    if !is_out_of_range {
        return resp;
    }
    let Some(msg) = headers.get("grpc-message").map(|m| decode(m.as_bytes())) else {
        return resp;
    };
    if let Some((found, limit)) = parse_too_large(&msg) {
        let text = format!("grpc: received message larger than max ({found} vs. {limit})");
        if let Ok(v) = HeaderValue::from_str(&text) {
            headers.insert("grpc-status", HeaderValue::from_static("8"));
            headers.insert("grpc-message", v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_tonic_size_error_like_grpc_go() {
        let resp = http::Response::builder()
            .header("grpc-status", "11")
            .header(
                "grpc-message",
                "Error,%20decoded%20message%20length%20too%20large:%20found%202200014%20bytes,%20the%20limit%20is:%202097152%20bytes",
            )
            .body(())
            .unwrap_or_default();
        let resp = etcd_transport_errors(resp);
        assert_eq!(resp.headers()["grpc-status"], "8");
        assert_eq!(
            resp.headers()["grpc-message"],
            "grpc: received message larger than max (2200014 vs. 2097152)"
        );
        let other = http::Response::builder()
            .header("grpc-status", "11")
            .header(
                "grpc-message",
                "etcdserver: mvcc: required revision is a future revision",
            )
            .body(())
            .unwrap_or_default();
        let other = etcd_transport_errors(other);
        assert_eq!(other.headers()["grpc-status"], "11");
    }
}
