//! Stream handles: [`SendStream`] (`AsyncWrite`) and [`RecvStream`] (`AsyncRead`).
//!
//! Writes go into the stream's send buffer (bounded by
//! [`TransportConfig::stream_send_buffer`](crate::TransportConfig::stream_send_buffer)) and wait
//! when it is full; reads take from the receive buffer and only then extend the peer's
//! flow-control window, so a slow reader slows the sender down.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::connection::{ConnInner, ConnState};
use crate::proto::{StreamError, StreamId};

fn io_error(e: StreamError) -> io::Error {
    let kind = match e {
        StreamError::Reset(_) | StreamError::Stopped(_) => io::ErrorKind::ConnectionReset,
        StreamError::ConnectionLost(_) => io::ErrorKind::ConnectionAborted,
        StreamError::Finished | StreamError::UnknownStream => io::ErrorKind::BrokenPipe,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// The sending half of a stream. Dropping it finishes the stream (sends FIN) unless it was
/// finished or reset already.
pub struct SendStream {
    conn: Arc<ConnInner>,
    id: StreamId,
    done: bool,
    epoch: u32,
    /// Writes leave on flush, sent from the flushing task ([`SendStream::set_send_on_flush`]).
    send_on_flush: bool,
}

/// A handle from before a 0-RTT rejection refers to a discarded stream whose ID may now
/// belong to another one.
fn check_epoch(st: &ConnState, epoch: u32) -> Result<(), StreamError> {
    if st.stream_epoch == epoch {
        Ok(())
    } else {
        Err(StreamError::ZeroRttRejected)
    }
}

impl SendStream {
    pub(crate) fn new(conn: &Arc<ConnInner>, id: StreamId) -> Self {
        SendStream {
            epoch: conn.lock().stream_epoch,
            conn: conn.acquire(),
            id,
            done: false,
            send_on_flush: false,
        }
    }

    /// The stream's ID.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Send-on-flush mode, for applications that flush after each batch of writes (as an
    /// MQTT connection does after each batch of packets): a write only queues the data, and
    /// [`AsyncWriteExt::flush`](tokio::io::AsyncWriteExt::flush) sends it at once from the
    /// calling task, with whatever else the connection has to send (ACKs, other streams).
    /// That saves a wake-up of the connection's driver task per batch, and with it the
    /// latency of a task switch on every message of a request/response exchange.
    ///
    /// Off (the default), each write wakes the driver, which sends soon after. In this mode
    /// data written and never flushed waits for the connection's next send for another
    /// reason (an ACK, a timer), so always flush. A write that finds the send buffer full
    /// still wakes the driver.
    pub fn set_send_on_flush(&mut self, on: bool) {
        self.send_on_flush = on;
    }

    fn poll_write_inner(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize, StreamError>> {
        let mut st = self.conn.lock();
        check_epoch(&st, self.epoch)?;
        match st.proto.stream_write(self.id, buf) {
            Ok(n) => {
                drop(st);
                if !self.send_on_flush {
                    self.conn.wake_driver();
                }
                Poll::Ready(Ok(n))
            }
            Err(StreamError::Blocked) => {
                st.write_wakers.insert(self.id, cx.waker().clone());
                drop(st);
                // The driver may need to push data out to make room.
                self.conn.wake_driver();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Writes some of `buf`, waiting for buffer space; returns how much was taken.
    pub async fn write(&mut self, buf: &[u8]) -> Result<usize, StreamError> {
        std::future::poll_fn(|cx| self.poll_write_inner(cx, buf)).await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), StreamError> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Queues a whole chunk without copying, waiting first while the send buffer is full.
    pub async fn write_chunk(&mut self, data: Bytes) -> Result<(), StreamError> {
        std::future::poll_fn(|cx| {
            let mut st = self.conn.lock();
            check_epoch(&st, self.epoch)?;
            match st.proto.stream_send_room(self.id) {
                Err(StreamError::Blocked) => {
                    st.write_wakers.insert(self.id, cx.waker().clone());
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
                Ok(_) => {}
            }
            match st.proto.stream_write_bytes(self.id, data.clone()) {
                Ok(()) => {
                    drop(st);
                    if !self.send_on_flush {
                        self.conn.wake_driver();
                    }
                    Poll::Ready(Ok(()))
                }
                Err(StreamError::Blocked) => {
                    st.write_wakers.insert(self.id, cx.waker().clone());
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e)),
            }
        })
        .await
    }

    /// Finishes the stream: FIN is sent after the buffered data.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        self.done = true;
        let r = {
            let mut st = self.conn.lock();
            check_epoch(&st, self.epoch).and_then(|()| st.proto.stream_finish(self.id))
        };
        self.conn.wake_driver();
        r
    }

    /// Abandons the stream with RESET_STREAM and an application error code.
    pub fn reset(&mut self, code: u64) -> Result<(), StreamError> {
        self.done = true;
        let r = {
            let mut st = self.conn.lock();
            check_epoch(&st, self.epoch).and_then(|()| st.proto.stream_reset(self.id, code))
        };
        self.conn.wake_driver();
        r
    }

    /// Waits until the peer stops the stream (returns its code) or the stream completes
    /// (returns `None`: FIN sent and everything acknowledged, or the connection ended).
    pub async fn stopped(&mut self) -> Option<u64> {
        std::future::poll_fn(|cx| {
            let mut st = self.conn.lock();
            if check_epoch(&st, self.epoch).is_err() {
                return Poll::Ready(None);
            }
            match st.proto.stream_send_room(self.id) {
                Err(StreamError::Stopped(code)) => return Poll::Ready(Some(code)),
                Err(StreamError::UnknownStream) | Err(StreamError::ConnectionLost(_)) => {
                    return Poll::Ready(None);
                }
                _ => {}
            }
            if !st.proto.stream_exists(self.id) || st.error.is_some() {
                return Poll::Ready(None);
            }
            st.write_wakers.insert(self.id, cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.conn.lock();
            if check_epoch(&st, self.epoch).is_ok() {
                let _ = st.proto.stream_finish(self.id);
            }
            drop(st);
            self.conn.wake_driver();
        }
        self.conn.release();
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_inner(cx, buf).map_err(io_error)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.send_on_flush {
            self.conn.transmit_now();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(this.finish().map_err(io_error))
    }
}

/// The receiving half of a stream. Dropping it before the end sends STOP_SENDING (code 0).
pub struct RecvStream {
    conn: Arc<ConnInner>,
    id: StreamId,
    done: bool,
    epoch: u32,
}

impl RecvStream {
    pub(crate) fn new(conn: &Arc<ConnInner>, id: StreamId) -> Self {
        RecvStream {
            epoch: conn.lock().stream_epoch,
            conn: conn.acquire(),
            id,
            done: false,
        }
    }

    /// The stream's ID.
    pub fn id(&self) -> StreamId {
        self.id
    }

    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, StreamError>> {
        if self.done {
            return Poll::Ready(Ok(None));
        }
        let mut st = self.conn.lock();
        if let Err(e) = check_epoch(&st, self.epoch) {
            self.done = true;
            return Poll::Ready(Err(e));
        }
        match st.proto.stream_read_chunk(self.id, max) {
            Ok(Some(b)) => {
                let wake = st.note_read(b.len());
                drop(st);
                if wake {
                    self.conn.wake_driver();
                }
                Poll::Ready(Ok(Some(b)))
            }
            Ok(None) => {
                self.done = true;
                Poll::Ready(Ok(None))
            }
            Err(StreamError::Blocked) => {
                st.read_wakers.insert(self.id, cx.waker().clone());
                Poll::Pending
            }
            Err(e) => {
                self.done = true;
                Poll::Ready(Err(e))
            }
        }
    }

    /// The next chunk of data (up to `max` bytes), `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        std::future::poll_fn(|cx| self.poll_chunk(cx, max)).await
    }

    /// Reads the whole stream, failing if it is longer than `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, ReadToEndError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read_chunk(usize::MAX).await? {
            if out.len() + chunk.len() > limit {
                return Err(ReadToEndError::TooLong);
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Tells the peer to stop sending (STOP_SENDING with `code`); unread data is discarded.
    pub fn stop(&mut self, code: u64) -> Result<(), StreamError> {
        self.done = true;
        let r = {
            let mut st = self.conn.lock();
            check_epoch(&st, self.epoch).and_then(|()| st.proto.stream_stop(self.id, code))
        };
        self.conn.wake_driver();
        r
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        if !self.done {
            let mut st = self.conn.lock();
            if check_epoch(&st, self.epoch).is_ok() {
                let _ = st.proto.stream_stop(self.id, 0);
            }
            drop(st);
            self.conn.wake_driver();
        }
        self.conn.release();
    }
}

/// Why [`RecvStream::read_to_end`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadToEndError {
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The stream is longer than the limit.
    #[error("stream longer than the limit")]
    TooLong,
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Ok(()));
        }
        let mut st = this.conn.lock();
        if let Err(e) = check_epoch(&st, this.epoch) {
            this.done = true;
            return Poll::Ready(Err(io_error(e)));
        }
        // Copied straight into the caller's (possibly uninitialised) space: no zeroing of a
        // large read buffer per call.
        match st
            .proto
            .stream_read_with(this.id, buf.remaining(), |data| buf.put_slice(data))
        {
            Ok(Some(n)) => {
                let wake = st.note_read(n);
                drop(st);
                if wake {
                    this.conn.wake_driver();
                }
                Poll::Ready(Ok(()))
            }
            Ok(None) => {
                this.done = true;
                Poll::Ready(Ok(()))
            }
            Err(StreamError::Blocked) => {
                st.read_wakers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
            Err(e) => {
                this.done = true;
                Poll::Ready(Err(io_error(e)))
            }
        }
    }
}
