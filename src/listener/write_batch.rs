//! Sends everything a connection's task writes during one poll as a single TLS write.
//!
//! hyper and h2 flush after each step: the server SETTINGS, the SETTINGS ACK and the
//! response each became their own TLS record and their own `writev`, and on loopback or a
//! LAN every packet costs the server about as much kernel time as the record's crypto.
//! A Talos call arrives whole with the client's Finished, so one poll can answer it: the
//! server's whole reply then leaves in one record, like the bare handshake's SETTINGS.
//!
//! [`BatchedIo`] is the stream hyper sees: reads pass through, writes are queued and
//! `poll_flush` is a no-op. [`WriteBatch::send`] writes the queue out; the handler calls it
//! after every poll of the connection, so nothing queued waits for a later event, but for
//! one: while a call's answer waits on the store (a seal's commit, an unseal's PostgreSQL
//! round trip), the SETTINGS queued before it wait too ([`Hold`]), up to [`ANSWER_HOLD`].
//! Sent alone, they cost a record, a `writev`, and the client's acknowledgement to read.

use crate::locking::lock;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Queued bytes beyond which writes wait for the queue to drain: bounds a connection's
/// memory when the peer does not read.
const MAX_QUEUED: usize = 64 * 1024;

/// The longest the queue waits for an answer: longer than a commit's `fdatasync` or a
/// PostgreSQL round trip on a busy machine, short enough that a stalled store does not
/// hold a client's PING acknowledgement for long.
pub const ANSWER_HOLD: Duration = Duration::from_millis(50);

struct Shared<IO> {
    io: IO,
    queued: Vec<u8>,
    /// A write was refused for a full queue; the task must be polled again once it drains.
    refused: bool,
    /// Writing the queue failed; every later operation reports it.
    failed: Option<io::ErrorKind>,
}

/// The stream handed to hyper.
pub struct BatchedIo<IO>(Arc<Mutex<Shared<IO>>>);

/// The handler's handle on the same stream, to send what a poll queued.
pub struct WriteBatch<IO>(Arc<Mutex<Shared<IO>>>);

pub fn batched<IO>(io: IO) -> (BatchedIo<IO>, WriteBatch<IO>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        queued: Vec::new(),
        refused: false,
        failed: None,
    }));
    (BatchedIo(Arc::clone(&shared)), WriteBatch(shared))
}

impl<IO: AsyncWrite + Unpin> Shared<IO> {
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while !self.queued.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.queued) {
                Poll::Ready(Ok(0)) => return self.fail(io::ErrorKind::WriteZero),
                Poll::Ready(Ok(written)) => {
                    self.queued.drain(..written);
                }
                Poll::Ready(Err(error)) => return self.fail(error.kind()),
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Err(error)) => self.fail(error.kind()),
            other => other,
        }
    }

    fn fail(&mut self, kind: io::ErrorKind) -> Poll<io::Result<()>> {
        self.failed = Some(kind);
        self.queued = Vec::new();
        Poll::Ready(Err(kind.into()))
    }
}

impl<IO> WriteBatch<IO> {
    /// A write was refused for a full queue (or the stream failed): the queue must go now.
    fn must_send(&self) -> bool {
        let shared = lock(&self.0);
        shared.refused || shared.failed.is_some()
    }
}

/// The calls of one connection whose answers are still being computed.
#[derive(Clone, Default)]
pub struct Unanswered(Arc<AtomicUsize>);

/// One call being answered; dropped when its answer is ready.
pub struct Answering(Arc<AtomicUsize>);

impl Unanswered {
    pub fn call(&self) -> Answering {
        self.0.fetch_add(1, Ordering::AcqRel);
        Answering(Arc::clone(&self.0))
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether what a poll queued waits for an answer still being computed.
pub struct Hold {
    unanswered: Unanswered,
    until: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Hold {
    pub fn new(unanswered: &Unanswered) -> Hold {
        Hold {
            unanswered: unanswered.clone(),
            until: None,
        }
    }

    /// True while the queue should wait: a call is unanswered and has been for less than
    /// [`ANSWER_HOLD`]; the task is woken when that time is up.
    pub fn poll_wait<IO>(&mut self, cx: &mut Context<'_>, batch: &WriteBatch<IO>) -> bool {
        if !self.unanswered.any() {
            self.until = None;
            return false;
        }
        if batch.must_send() {
            return false;
        }
        let until = self
            .until
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(ANSWER_HOLD)));
        until.as_mut().poll(cx).is_pending()
    }
}

impl<IO: AsyncWrite + Unpin> WriteBatch<IO> {
    /// Writes out what the last poll queued. If the socket is full, the task is woken when
    /// it drains; if a write was refused for a full queue, the task is woken to retry it.
    pub fn send(&self, cx: &mut Context<'_>) {
        let mut shared = lock(&self.0);
        let sent = shared.poll_send(cx);
        if shared.refused && !sent.is_pending() {
            shared.refused = false;
            cx.waker().wake_by_ref();
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for BatchedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for BatchedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.0);
        if let Some(kind) = shared.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if shared.queued.len() >= MAX_QUEUED {
            // WriteBatch::send runs after this poll and wakes the task once there is room.
            shared.refused = true;
            return Poll::Pending;
        }
        let before = shared.queued.len();
        for buf in bufs {
            shared.queued.extend_from_slice(buf);
        }
        Poll::Ready(Ok(shared.queued.len() - before))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).failed {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        std::task::ready!(shared.poll_send(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the handler does at the end of each poll of the connection.
    async fn end_of_poll<IO: AsyncWrite + Unpin>(batch: &WriteBatch<IO>) {
        std::future::poll_fn(|cx| {
            batch.send(cx);
            Poll::Ready(())
        })
        .await;
    }

    /// Runs one "poll" of a task that writes `parts`, then sends the batch.
    async fn write_then_send<IO: AsyncWrite + Unpin>(
        io: &mut BatchedIo<IO>,
        batch: &WriteBatch<IO>,
        parts: &[&[u8]],
    ) {
        for part in parts {
            io.write_all(part).await.expect("queue accepts");
            io.flush().await.expect("flush is a no-op");
        }
        end_of_poll(batch).await;
    }

    #[tokio::test]
    async fn writes_of_one_poll_arrive_together_and_reads_pass_through() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, batch) = batched(near);
        write_then_send(&mut io, &batch, &[b"SETTINGS", b"+ACK", b"+RESPONSE"]).await;
        let mut got = vec![0; 64];
        let n = far.read(&mut got).await.expect("read");
        assert_eq!(&got[..n], b"SETTINGS+ACK+RESPONSE");

        far.write_all(b"request").await.expect("write");
        let mut request = [0; 7];
        io.read_exact(&mut request).await.expect("read through");
        assert_eq!(&request, b"request");
    }

    #[tokio::test]
    async fn a_full_socket_keeps_the_rest_queued_until_the_peer_reads() {
        let (near, mut far) = tokio::io::duplex(16);
        let (mut io, batch) = batched(near);
        let message: Vec<u8> = (0..100u8).collect();
        write_then_send(&mut io, &batch, &[&message]).await;
        let mut got = Vec::new();
        for _ in 0..20 {
            let mut chunk = [0; 16];
            let n = far.read(&mut chunk).await.expect("read");
            got.extend_from_slice(&chunk[..n]);
            if got.len() == message.len() {
                break;
            }
            end_of_poll(&batch).await;
        }
        assert_eq!(got, message);
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_queued_first() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, _batch) = batched(near);
        io.write_all(b"last words").await.expect("queue");
        io.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read to EOF");
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_failed_send_is_reported_to_later_writes() {
        let (near, far) = tokio::io::duplex(1024);
        drop(far);
        let (mut io, batch) = batched(near);
        write_then_send(&mut io, &batch, &[b"into the void"]).await;
        let error = io.write_all(b"more").await.expect_err("the peer is gone");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }

    /// One poll of the connection as the handler drives it: sends unless `hold` waits.
    async fn end_of_poll_holding<IO: AsyncWrite + Unpin>(batch: &WriteBatch<IO>, hold: &mut Hold) {
        std::future::poll_fn(|cx| {
            if !hold.poll_wait(cx, batch) {
                batch.send(cx);
            }
            Poll::Ready(())
        })
        .await;
    }

    /// Whatever `far` has received so far, without waiting.
    fn received(far: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut got = vec![0; 256];
        let mut buf = ReadBuf::new(&mut got);
        let waker = std::task::Waker::noop();
        match Pin::new(far).poll_read(&mut Context::from_waker(waker), &mut buf) {
            Poll::Ready(Ok(())) => buf.filled().to_vec(),
            _ => Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn settings_wait_for_an_answer_being_computed_and_leave_with_it() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, batch) = batched(near);
        let unanswered = Unanswered::default();
        let mut hold = Hold::new(&unanswered);

        let call = unanswered.call();
        io.write_all(b"SETTINGS+ACK").await.expect("queue");
        end_of_poll_holding(&batch, &mut hold).await;
        tokio::time::advance(ANSWER_HOLD / 2).await;
        end_of_poll_holding(&batch, &mut hold).await;
        assert_eq!(received(&mut far), b"", "sent before the answer");

        io.write_all(b"+RESPONSE").await.expect("queue");
        drop(call);
        end_of_poll_holding(&batch, &mut hold).await;
        assert_eq!(received(&mut far), b"SETTINGS+ACK+RESPONSE");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_takes_too_long_does_not_hold_the_rest() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, batch) = batched(near);
        let unanswered = Unanswered::default();
        let mut hold = Hold::new(&unanswered);

        let _stuck = unanswered.call();
        io.write_all(b"SETTINGS+ACK").await.expect("queue");
        end_of_poll_holding(&batch, &mut hold).await;
        assert_eq!(received(&mut far), b"");
        tokio::time::advance(ANSWER_HOLD).await;
        end_of_poll_holding(&batch, &mut hold).await;
        assert_eq!(received(&mut far), b"SETTINGS+ACK");
        io.write_all(b"PING-ACK").await.expect("queue");
        end_of_poll_holding(&batch, &mut hold).await;
        assert_eq!(
            received(&mut far),
            b"PING-ACK",
            "held again after the hold ran out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_waits_when_no_answer_is_being_computed() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut io, batch) = batched(near);
        let unanswered = Unanswered::default();
        let mut hold = Hold::new(&unanswered);
        drop(unanswered.call());
        io.write_all(b"PING-ACK").await.expect("queue");
        end_of_poll_holding(&batch, &mut hold).await;
        assert_eq!(received(&mut far), b"PING-ACK");
    }
}
