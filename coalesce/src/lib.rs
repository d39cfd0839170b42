//! Write coalescing for HTTP/2 connections (pgetcd's client listeners and the loadgen's
//! connections).
//!
//! hyper's HTTP/2 connection task (server and client alike) writes its queued frames
//! and flushes whenever it runs out of other work, and every call task that hands it a
//! frame wakes it. A unary response even takes two flushes: its HEADERS go out first,
//! its DATA and trailers only after the connection task granted the stream send
//! capacity. Measured under Range load (1,000 clients over 100 connections): 1.85
//! `writev` per call, and on loopback each one also runs the peer's TCP receive path,
//! so 44% of pgetcd's CPU was the kernel's send path.
//!
//! [`CoalescedWrites`] keeps small writes in its own buffer and, when asked to flush,
//! first yields once to the runtime: the call tasks already runnable (the rest of the
//! same response, other responses on the connection) queue their frames meanwhile, and
//! the next flush writes all of them with one syscall. Under that load: 0.1 writes per
//! call instead of 1.85, and 14–18 µs of server CPU per Range instead of 20–23
//! (docs/performance.md). The cost is one extra trip through the run queue per flush,
//! which shows only when the server is idle (one client: the same latency, ~15 µs more
//! CPU per call). Large writes (list pages) go to the socket directly once the buffer is
//! drained, without a copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes at least this large skip the buffer when it is empty.
const DIRECT_WRITE_BYTES: usize = 32 * 1024;
/// The buffer is written out before it would grow beyond this.
const BUFFER_LIMIT_BYTES: usize = 256 * 1024;

/// An I/O stream whose small writes are gathered and sent together at the next flush,
/// one yield to the runtime later.
#[derive(Debug)]
pub struct CoalescedWrites<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already written.
    written: usize,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<T> CoalescedWrites<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            yielded: false,
        }
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> CoalescedWrites<T> {
    /// Writes the buffer out; Ready once it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: Ready(true) when they should go to the socket
    /// directly, Ready(false) when they should be buffered.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buffered() > 0 && self.buffered() + len > BUFFER_LIMIT_BYTES {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(self.buffered() == 0 && len >= DIRECT_WRITE_BYTES))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 {
            if !this.yielded {
                // Let the runnable call tasks queue their frames first.
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A sink that records each write call; `accept` bytes per call at most.
    #[derive(Default)]
    struct Sink {
        writes: Vec<Vec<u8>>,
        accept: Option<usize>,
        flushes: usize,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.accept.map_or(data.len(), |a| a.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(io: &mut CoalescedWrites<Sink>, cx: &mut Context<'_>, data: &[u8]) {
        let n = Pin::new(io).poll_write(cx, data);
        assert!(matches!(n, Poll::Ready(Ok(n)) if n == data.len()));
    }

    #[test]
    fn small_writes_go_out_together_one_yield_after_the_flush() {
        let wakes = Arc::new(CountWakes::default());
        let waker = wakes.clone().into();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Sink::default());
        write(&mut io, &mut cx, b"headers");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the yield wakes the task"
        );
        assert!(io.io.writes.is_empty(), "nothing written before the yield");
        let vectored = [io::IoSlice::new(b"+data"), io::IoSlice::new(b"+trailers")];
        assert!(matches!(
            Pin::new(&mut io).poll_write_vectored(&mut cx, &vectored),
            Poll::Ready(Ok(14))
        ));
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.io.writes, vec![b"headers+data+trailers".to_vec()]);
        assert_eq!(io.io.flushes, 1);
        // The next flush yields again; an empty buffer flushes at once.
        write(&mut io, &mut cx, b"next");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.io.writes.len(), 2);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn large_writes_skip_the_buffer_and_a_full_buffer_is_written_first() {
        let waker = Arc::new(CountWakes::default()).into();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Sink::default());
        let page = vec![7u8; DIRECT_WRITE_BYTES];
        write(&mut io, &mut cx, &page);
        assert_eq!(
            io.io.writes,
            vec![page.clone()],
            "written through, not copied"
        );
        // With bytes buffered, a large write is buffered behind them (order kept) ...
        write(&mut io, &mut cx, b"small");
        write(&mut io, &mut cx, &page);
        assert_eq!(io.io.writes.len(), 1);
        // ... until the buffer would pass its limit: then it is written out first.
        let big = vec![1u8; BUFFER_LIMIT_BYTES];
        write(&mut io, &mut cx, &big);
        assert_eq!(io.io.writes.len(), 3);
        assert_eq!(io.io.writes[1].len(), 5 + DIRECT_WRITE_BYTES);
        assert_eq!(io.io.writes[2], big);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped_and_shutdown_drains() {
        let waker = Arc::new(CountWakes::default()).into();
        let mut cx = Context::from_waker(&waker);
        let mut io = CoalescedWrites::new(Sink {
            accept: Some(3),
            ..Sink::default()
        });
        write(&mut io, &mut cx, b"abcdefgh");
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(io.io.writes.concat(), b"abcdefgh");
        assert_eq!(io.io.writes.len(), 3);
    }
}
