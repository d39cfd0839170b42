//! Clients that send a whole URL as the HTTP/2 `:authority`. etcdctl 3.4 (Debian's)
//! dials each endpoint of `endpoint status` and `endpoint hashkv` with the endpoint as
//! its target, so its requests carry `:authority: http://127.0.0.1:2379`. etcd (grpc-go)
//! accepts that; hyper's HTTP/2 server resets the stream (PROTOCOL_ERROR).
//!
//! [`AuthorityFix`] sits between a client connection and hyper. It reads the
//! connection's first request header block: when its `:authority` is an authority (every
//! other client), it steps aside for the rest of the connection and every byte passes
//! untouched. When it is not, it decodes each header block of that connection (keeping
//! the client's HPACK table) and encodes it again with the authority reduced to its host
//! and port (`http://127.0.0.1:2379/x` → `127.0.0.1:2379`). Anything it cannot follow
//! (a connection that is not HTTP/2, a block that does not decode) passes as it is, for
//! hyper to answer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames written here stay within HTTP/2's default (and smallest) maximum frame size.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this while still incomplete: give up (hyper limits it).
const MAX_PENDING: usize = 1 << 20;
/// The HPACK table size the HTTP/2 server allows its clients (HTTP/2's default
/// SETTINGS_HEADER_TABLE_SIZE, which hyper keeps): a larger size update is refused.
const TABLE_SIZE: usize = 4096;

enum Mode {
    /// Reading up to the first header block.
    Inspect,
    /// Rewriting every header block.
    Rewrite {
        decoder: Box<hpack::Decoder<'static>>,
        encoder: Box<hpack::Encoder<'static>>,
    },
    /// Out of the way.
    Pass,
}

/// A client connection whose bad `:authority` headers are mended (see the module doc).
pub struct AuthorityFix<T> {
    io: T,
    mode: Mode,
    preface_checked: bool,
    /// Bytes read from the client, not yet processed.
    pending: BytesMut,
    /// Processed bytes, for hyper.
    ready: BytesMut,
}

impl<T> AuthorityFix<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            mode: Mode::Inspect,
            preface_checked: false,
            pending: BytesMut::new(),
            ready: BytesMut::new(),
        }
    }

    /// Stops looking: everything pending goes out as it is.
    fn pass(&mut self) {
        self.mode = Mode::Pass;
        let rest = self.pending.split();
        self.ready.extend_from_slice(&rest);
    }

    /// Processes what is pending, as far as whole frames (and header blocks) go.
    fn process(&mut self) {
        if !self.preface_checked {
            let n = self.pending.len().min(PREFACE.len());
            if self.pending[..n] != PREFACE[..n] {
                return self.pass();
            }
            if n < PREFACE.len() {
                return;
            }
            self.preface_checked = true;
            let preface = self.pending.split_to(PREFACE.len());
            self.ready.extend_from_slice(&preface);
        }
        while !matches!(self.mode, Mode::Pass) {
            let Some(frame_len) = frame_len(&self.pending) else {
                return;
            };
            let kind = self.pending[3];
            if kind != HEADERS {
                let frame = self.pending.split_to(frame_len);
                self.ready.extend_from_slice(&frame);
                continue;
            }
            // A header block: the HEADERS frame and its CONTINUATIONs, all here.
            let Some(block_end) = header_block_end(&self.pending) else {
                if self.pending.len() > MAX_PENDING {
                    self.pass();
                }
                return;
            };
            let raw = self.pending.split_to(block_end);
            let Some(block) = HeaderBlock::parse(&raw) else {
                self.ready.extend_from_slice(&raw);
                return self.pass();
            };
            match &mut self.mode {
                _ if !well_formed(&block.fragment) => {
                    // For hyper to refuse (the decoder would panic on some of these, or
                    // grow its table past what HTTP/2 allows).
                    self.ready.extend_from_slice(&raw);
                    return self.pass();
                }
                Mode::Inspect => {
                    let mut decoder = Box::new(hpack::Decoder::new());
                    let Ok(headers) = decoder.decode(&block.fragment) else {
                        self.ready.extend_from_slice(&raw);
                        return self.pass();
                    };
                    if !needs_mending(&headers) {
                        self.ready.extend_from_slice(&raw);
                        return self.pass();
                    }
                    let mut encoder = Box::new(hpack::Encoder::new());
                    block.write(&mend(headers), &mut encoder, &mut self.ready);
                    self.mode = Mode::Rewrite { decoder, encoder };
                }
                Mode::Rewrite { decoder, encoder } => {
                    let Ok(headers) = decoder.decode(&block.fragment) else {
                        self.ready.extend_from_slice(&raw);
                        return self.pass();
                    };
                    block.write(&mend(headers), encoder, &mut self.ready);
                }
                Mode::Pass => unreachable!("the loop ends in Pass"),
            }
        }
    }
}

/// The length of the whole frame at the start of `buf`, once it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < FRAME_HEADER {
        return None;
    }
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    (buf.len() >= FRAME_HEADER + len).then_some(FRAME_HEADER + len)
}

/// Where the header block starting at `buf` (a HEADERS frame, then CONTINUATIONs until
/// END_HEADERS) ends, once it is all there.
fn header_block_end(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = frame_len(&buf[at..])?;
        let flags = buf[at + 4];
        at += len;
        if flags & END_HEADERS != 0 {
            return Some(at);
        }
        if buf.len() < at + FRAME_HEADER || buf[at + 3] != CONTINUATION {
            // Incomplete, or (a protocol error) not a continuation: hyper decides.
            return (buf.len() >= at + FRAME_HEADER).then_some(at);
        }
    }
}

/// One header block: its stream, flags and priority, and its HPACK fragment.
struct HeaderBlock {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl HeaderBlock {
    fn parse(raw: &[u8]) -> Option<HeaderBlock> {
        let mut buf = raw;
        let mut first = true;
        let mut block = HeaderBlock {
            stream: [0; 4],
            end_stream: false,
            priority: None,
            fragment: Vec::new(),
        };
        while !buf.is_empty() {
            let len = frame_len(buf)?;
            let flags = buf[4];
            let mut payload = &buf[FRAME_HEADER..len];
            if first {
                block.stream.copy_from_slice(&buf[5..9]);
                block.end_stream = flags & END_STREAM != 0;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    pad = usize::from(*payload.first()?);
                    payload = &payload[1..];
                }
                if flags & PRIORITY != 0 {
                    block.priority = Some(payload.get(..5)?.try_into().ok()?);
                    payload = &payload[5..];
                }
                payload = payload.get(..payload.len().checked_sub(pad)?)?;
                first = false;
            }
            block.fragment.extend_from_slice(payload);
            buf.advance(len);
        }
        Some(block)
    }

    /// Writes `headers` as this block: a HEADERS frame and CONTINUATIONs as needed.
    fn write(
        &self,
        headers: &[(Vec<u8>, Vec<u8>)],
        encoder: &mut hpack::Encoder<'static>,
        out: &mut BytesMut,
    ) {
        let encoded = encoder.encode(headers.iter().map(|(k, v)| (&k[..], &v[..])));
        let mut body = Vec::with_capacity(encoded.len() + 5);
        if let Some(p) = self.priority {
            body.extend_from_slice(&p);
        }
        body.extend_from_slice(&encoded);
        let chunks: Vec<&[u8]> = if body.is_empty() {
            vec![&body[..]]
        } else {
            body.chunks(MAX_FRAME).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let (kind, mut flags) = if i == 0 {
                let mut f = 0;
                if self.end_stream {
                    f |= END_STREAM;
                }
                if self.priority.is_some() {
                    f |= PRIORITY;
                }
                (HEADERS, f)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            let len = chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            out.extend_from_slice(&self.stream);
            out.extend_from_slice(chunk);
        }
    }
}

/// Whether an HPACK block is one the decoder takes safely: every integer well formed,
/// every string within the block, every table size update at most [`TABLE_SIZE`]
/// (RFC 7541 section 6).
fn well_formed(mut block: &[u8]) -> bool {
    while let Some(&first) = block.first() {
        let ok = if first & 0x80 != 0 {
            integer(&mut block, 7).is_some()
        } else if first & 0x40 != 0 {
            field(&mut block, 6)
        } else if first & 0x20 != 0 {
            integer(&mut block, 5).is_some_and(|size| size <= TABLE_SIZE)
        } else {
            field(&mut block, 4)
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A literal field: its name's index (0: a name string follows), then its value.
fn field(block: &mut &[u8], prefix: u32) -> bool {
    match integer(block, prefix) {
        Some(0) => string(block) && string(block),
        Some(_) => string(block),
        None => false,
    }
}

/// A string literal (Huffman bit, length, octets), skipped.
fn string(block: &mut &[u8]) -> bool {
    match integer(block, 7) {
        Some(len) if len <= block.len() => {
            *block = &block[len..];
            true
        }
        _ => false,
    }
}

/// An HPACK integer with a `prefix`-bit prefix, consumed; None when cut short or
/// larger than 2^28.
fn integer(block: &mut &[u8], prefix: u32) -> Option<usize> {
    let max = (1usize << prefix) - 1;
    let (&first, rest) = block.split_first()?;
    *block = rest;
    let mut value = usize::from(first) & max;
    if value < max {
        return Some(value);
    }
    for shift in (0..=21).step_by(7) {
        let (&byte, rest) = block.split_first()?;
        *block = rest;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Whether a request's `:authority` is not an authority.
fn needs_mending(headers: &[(Vec<u8>, Vec<u8>)]) -> bool {
    headers
        .iter()
        .any(|(k, v)| k == b":authority" && http::uri::Authority::try_from(&v[..]).is_err())
}

/// The headers with a URL in `:authority` reduced to its host and port.
fn mend(mut headers: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    for (k, v) in &mut headers {
        if k == b":authority" && http::uri::Authority::try_from(&v[..]).is_err() {
            let text = String::from_utf8_lossy(v);
            let rest = text.split_once("://").map_or(&text[..], |(_, r)| r);
            let host = rest.split('/').next().unwrap_or("");
            if http::uri::Authority::try_from(host).is_ok() {
                *v = host.as_bytes().to_vec();
            }
        }
    }
    headers
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Pass) {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // The client's end: whatever is pending goes as it is.
                    this.pass();
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    this.pending.extend_from_slice(rb.filled());
                    this.process();
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn headers_frame(stream: u32, block: &[u8], flags: u8) -> Vec<u8> {
        let len = block.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            HEADERS,
            flags,
        ];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(block);
        f
    }

    async fn through(input: Vec<u8>) -> Vec<u8> {
        let mut fix = AuthorityFix::new(&input[..]);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.expect("read");
        out
    }

    fn request(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/etcdserverpb.Maintenance/Status".to_vec(),
            ),
            (b":authority".to_vec(), authority.as_bytes().to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
        ]
    }

    /// Decodes the header blocks of the frames in `bytes` (after the preface).
    fn blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut d = hpack::Decoder::new();
        let mut at = PREFACE.len();
        let mut out = Vec::new();
        while at < bytes.len() {
            let end = at + header_block_end(&bytes[at..]).expect("a whole block");
            let b = HeaderBlock::parse(&bytes[at..end]).expect("a block");
            out.push(d.decode(&b.fragment).expect("decodes"));
            at = end;
        }
        out
    }

    #[tokio::test]
    async fn a_good_authority_passes_untouched_and_a_url_is_mended_on_every_request() {
        let mut e = hpack::Encoder::new();
        let mut good = PREFACE.to_vec();
        good.extend(headers_frame(
            1,
            &e.encode(
                request("127.0.0.1:2379")
                    .iter()
                    .map(|(k, v)| (&k[..], &v[..])),
            ),
            END_HEADERS,
        ));
        good.extend(headers_frame(
            3,
            &e.encode(
                request("127.0.0.1:2379")
                    .iter()
                    .map(|(k, v)| (&k[..], &v[..])),
            ),
            END_HEADERS | END_STREAM,
        ));
        assert_eq!(through(good.clone()).await, good);

        // Two requests; the second refers to the first's entries in the client's table.
        let mut e = hpack::Encoder::new();
        let mut bad = PREFACE.to_vec();
        for stream in [1u32, 3] {
            let block = e.encode(
                request("http://127.0.0.1:2379")
                    .iter()
                    .map(|(k, v)| (&k[..], &v[..])),
            );
            bad.extend(headers_frame(stream, &block, END_HEADERS));
        }
        let out = through(bad).await;
        let got = blocks(&out);
        assert_eq!(
            got,
            vec![request("127.0.0.1:2379"), request("127.0.0.1:2379")]
        );
    }

    #[tokio::test]
    async fn padded_and_prioritised_blocks_split_over_continuations_are_read() {
        let mut e = hpack::Encoder::new();
        let block = e.encode(
            request("https://h:1/p")
                .iter()
                .map(|(k, v)| (&k[..], &v[..])),
        );
        let (a, b) = block.split_at(10);
        let mut first = vec![2u8];
        first.extend_from_slice(&[0, 0, 0, 0, 16]);
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(1, &first, PADDED | PRIORITY));
        let len = b.len();
        input.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            CONTINUATION,
            END_HEADERS,
            0,
            0,
            0,
            1,
        ]);
        input.extend_from_slice(b);
        let out = through(input).await;
        assert_eq!(blocks(&out), vec![request("h:1")]);
    }

    /// Blocks the HPACK decoder would panic on (a size update cut short), or that
    /// would grow its table past HTTP/2's size, are left to hyper; every block that
    /// passes the check decodes without a panic.
    #[test]
    fn only_well_formed_blocks_reach_the_decoder() {
        assert!(!well_formed(&[0x3f]));
        // A size update to 4096 is allowed, to 4097 not.
        assert!(well_formed(&[0x3f, 0xe1, 0x1f]));
        assert!(!well_formed(&[0x3f, 0xe2, 0x1f]));
        assert!(well_formed(&[0x20]));
        assert!(!well_formed(&[0x40, 0x05, b'a']));
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut checked = 0;
        for _ in 0..200_000 {
            let len = (next() % 48) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if !well_formed(&block) {
                continue;
            }
            checked += 1;
            let decoded = std::panic::catch_unwind(|| {
                let _ = hpack::Decoder::new().decode(&block);
            });
            assert!(decoded.is_ok(), "the decoder panicked on {block:?}");
        }
        assert!(checked > 10_000, "{checked}");
    }

    #[tokio::test]
    async fn what_is_not_http2_passes_as_it_is() {
        let input = b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\n\r\n{}".to_vec();
        assert_eq!(through(input.clone()).await, input);
    }
}
