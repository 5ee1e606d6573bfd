//! The byte side of one client connection: the socket, a read buffer and a write buffer.
//!
//! Only this type touches the socket. It is generic over the stream so TCP, TLS and test
//! streams share it. Packets are encoded into the write buffer as they are produced and the
//! whole buffer goes out with one write when the task next waits, so a burst of deliveries or
//! acknowledgements costs one syscall rather than one per packet.
//!
//! Design: reading and writing progress in the same poll ([`Connection::io`]): a client whose
//! socket is full keeps being read (so its PINGREQs, PUBACKs and DISCONNECT are seen), and one
//! that stops reading only fills our write buffer up to a bound, after which we stop reading
//! from it too.
//!
//! Lazy reads ([`Connection::set_lazy`], [`Connection::read_now`]): a plain TCP connection can
//! ask the kernel not to wake us for small amounts of input, and be read by the client's own
//! loop instead; `client.rs` says when that is worth it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use polyhub_mqtt::{EncodeError, Packet, ProtocolVersion, PublishRef, encode, encode_publish};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bytes read from the socket per read call.
const READ_CHUNK: usize = 16 * 1024;

/// The receive low-water mark of a lazy connection: less input than this does not wake us.
/// Thousands of acknowledgements, yet well under half the default receive buffer, above which
/// Linux resizes the buffer and its window clamp to fit the mark.
const LAZY_LOW_WATER_MARK: u32 = 16 * 1024;

/// Bytes a lazy read takes per call: acknowledgements are 4 bytes each.
const LAZY_READ_CHUNK: usize = 4 * 1024;

/// Most read calls one lazy read makes, so that a client sending fast cannot keep a turn of
/// its task reading; what is left is read at the next turn, or wakes us as usual once it
/// reaches the low-water mark.
const LAZY_READ_CALLS: usize = 4;

/// Above this many unsent bytes we stop reading from the client (it is not reading ours).
const WRITE_BUFFER_LIMIT: usize = 1024 * 1024;

/// Initial capacity of the write buffer when it is (re)allocated.
const WRITE_BUFFER_INITIAL: usize = 4 * 1024;

/// Most write buffers a thread keeps for reuse.
const SPARE_WRITE_BUFFERS: usize = 32;

thread_local! {
    /// Write buffers released by idle connections, for the next connection with something to
    /// send. Design: an idle connection must hold no buffer (idle RSS budget), yet allocating
    /// and freeing a buffer per wake-up cost a malloc, a free and (at this size) a consolidation
    /// of the allocator's fast bins per delivery; a short per-thread stack of spares keeps the
    /// first property without the cost.
    static SPARE_WRITE_BUFFERS_POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A write buffer with room for [`WRITE_BUFFER_INITIAL`] bytes, reused when one is spare.
fn take_write_buffer() -> BytesMut {
    let spare = SPARE_WRITE_BUFFERS_POOL
        .try_with(|pool| pool.borrow_mut().pop())
        .ok()
        .flatten();
    let mut buf = spare.unwrap_or_default();
    // For a returned buffer this reclaims its own allocation (it is empty and unshared).
    buf.reserve(WRITE_BUFFER_INITIAL);
    buf
}

/// Give an emptied write buffer back for reuse; a grown or surplus one is freed.
fn return_write_buffer(mut buf: BytesMut) {
    buf.clear();
    // Written bytes were advanced past, which hides their room; an empty, unshared buffer
    // gets it back here, so the capacity checked is the allocation's real size.
    buf.reserve(1);
    if buf.capacity() > 4 * WRITE_BUFFER_INITIAL {
        return;
    }
    let _ = SPARE_WRITE_BUFFERS_POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < SPARE_WRITE_BUFFERS {
            pool.push(buf);
        }
    });
}

/// What [`Connection::io`] observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoEvent {
    /// This many bytes were appended to the read buffer.
    Read(usize),
    /// The write buffer has been fully written (reported only when asked for).
    Drained,
    /// The peer closed its side.
    Eof,
}

/// The plain TCP socket under a stream, for lazy reads; `None` where the stream keeps input
/// of its own that the socket does not show (TLS), so such connections are never lazy.
pub(crate) trait PlainSocket {
    fn plain_socket(&self) -> Option<&tokio::net::TcpStream>;
}

impl PlainSocket for tokio::net::TcpStream {
    fn plain_socket(&self) -> Option<&tokio::net::TcpStream> {
        Some(self)
    }
}

impl<IO> PlainSocket for tokio_rustls::server::TlsStream<IO> {
    fn plain_socket(&self) -> Option<&tokio::net::TcpStream> {
        None
    }
}

/// A client's socket with its buffers.
#[derive(Debug)]
pub(crate) struct Connection<S> {
    stream: S,
    /// Bytes received and not yet decoded.
    pub(crate) read_buf: BytesMut,
    /// Encoded packets not yet written.
    write_buf: BytesMut,
    /// Whether written bytes may still sit in the stream's own buffer (TLS).
    needs_flush: bool,
    /// The protocol the peer speaks, known after CONNECT.
    pub(crate) version: ProtocolVersion,
    /// Bytes read and written since [`Connection::take_byte_counts`] was last called.
    bytes_read: u64,
    bytes_written: u64,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub(crate) fn new(stream: S) -> Connection<S> {
        Connection {
            stream,
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            needs_flush: false,
            version: ProtocolVersion::V311,
            bytes_read: 0,
            bytes_written: 0,
        }
    }

    /// Append `packet`, encoded for this connection's version, to the write buffer.
    pub(crate) fn send(&mut self, packet: &Packet) -> Result<(), EncodeError> {
        self.send_within(packet, usize::MAX).map(|_| ())
    }

    /// Like [`Connection::send`], but a packet larger than `limit` bytes is not kept; returns
    /// whether it was.
    pub(crate) fn send_within(
        &mut self,
        packet: &Packet,
        limit: usize,
    ) -> Result<bool, EncodeError> {
        self.encode_within(limit, |version, buf| encode(packet, version, buf))
    }

    /// Like [`Connection::send_within`] for a borrowed PUBLISH (a delivery of a shared
    /// message), with no owned packet built.
    pub(crate) fn send_publish_within(
        &mut self,
        publish: &PublishRef<'_>,
        limit: usize,
    ) -> Result<bool, EncodeError> {
        self.encode_within(limit, |version, buf| encode_publish(publish, version, buf))
    }

    /// Append what `write` encodes, dropping it again if it is larger than `limit`.
    fn encode_within(
        &mut self,
        limit: usize,
        write: impl FnOnce(ProtocolVersion, &mut BytesMut) -> Result<(), EncodeError>,
    ) -> Result<bool, EncodeError> {
        if self.write_buf.capacity() == 0 {
            self.write_buf = take_write_buffer();
        }
        let start = self.write_buf.len();
        if let Err(error) = write(self.version, &mut self.write_buf) {
            self.write_buf.truncate(start);
            return Err(error);
        }
        if self.write_buf.len() - start > limit {
            self.write_buf.truncate(start);
            return Ok(false);
        }
        Ok(true)
    }

    /// Bytes encoded and not yet written.
    pub(crate) fn pending_write(&self) -> usize {
        self.write_buf.len()
    }

    /// Bytes read and written since the last call.
    pub(crate) fn take_byte_counts(&mut self) -> (u64, u64) {
        let counts = (self.bytes_read, self.bytes_written);
        self.bytes_read = 0;
        self.bytes_written = 0;
        counts
    }

    /// Free empty buffers, so a connection waiting for input holds no buffer memory.
    fn release_idle_buffers(&mut self) {
        // Even with no capacity left, an empty buffer split from a larger one still holds a
        // share of that allocation.
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        }
        if self.write_buf.is_empty() && self.write_buf.capacity() > 0 {
            return_write_buffer(std::mem::take(&mut self.write_buf));
        }
    }

    /// Write what is buffered and read what arrives, until something is read, the peer
    /// closes, or (with `report_drained`) the write buffer empties.
    pub(crate) async fn io(&mut self, report_drained: bool) -> io::Result<IoEvent> {
        poll_fn(|cx| self.poll_io(cx, report_drained)).await
    }

    /// Read once: for the CONNECT phase, when nothing is written.
    pub(crate) async fn read_more(&mut self) -> io::Result<IoEvent> {
        poll_fn(|cx| self.poll_read_chunk(cx)).await
    }

    /// Write everything buffered and flush the stream.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_write_all(cx)).await
    }

    /// Flush what is buffered (bounded by `limit`) and close our side of the stream.
    pub(crate) async fn close(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            if self.flush().await.is_ok() {
                let _ = self.stream.shutdown().await;
            }
        })
        .await;
    }

    /// Makes the kernel wake us for this socket's input only once a lot of it is queued, or at
    /// its end, or on an error (`lazy`), or for any input again. Returns whether the mode
    /// changed: a stream without a plain socket, or a refused option, stays as it was.
    pub(crate) fn set_lazy(&mut self, lazy: bool) -> bool
    where
        S: PlainSocket,
    {
        let Some(socket) = self.stream.plain_socket() else {
            return false;
        };
        let mark = if lazy { LAZY_LOW_WATER_MARK } else { 1 };
        polyhub_sockopt::set_receive_low_water_mark(socket, mark).is_ok()
    }

    /// Reads whatever the socket holds now, without waiting and whatever tokio last heard of
    /// its readiness (a lazy socket's small input never made it readable). Returns the bytes
    /// read, `None` at the end of the stream.
    pub(crate) fn read_now(&mut self) -> io::Result<Option<usize>>
    where
        S: PlainSocket,
    {
        let Some(socket) = self.stream.plain_socket() else {
            return Ok(Some(0));
        };
        let socket = socket2::SockRef::from(socket);
        let mut chunk = [0; LAZY_READ_CHUNK];
        let mut total = 0;
        for _ in 0..LAZY_READ_CALLS {
            let read = match std::io::Read::read(&mut &*socket, &mut chunk) {
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Some(total)),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            if read == 0 {
                return Ok(if total == 0 { None } else { Some(total) });
            }
            self.read_buf.extend_from_slice(&chunk[..read]);
            self.bytes_read += read as u64;
            total += read;
            if read < LAZY_READ_CHUNK {
                break;
            }
        }
        Ok(Some(total))
    }

    fn poll_io(&mut self, cx: &mut Context<'_>, report_drained: bool) -> Poll<io::Result<IoEvent>> {
        match self.poll_write_all(cx) {
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Ready(Ok(())) if report_drained => return Poll::Ready(Ok(IoEvent::Drained)),
            _ => {}
        }
        if self.write_buf.len() >= WRITE_BUFFER_LIMIT {
            // The peer is not reading; stop reading it until it does (its own writes block).
            return Poll::Pending;
        }
        let read = self.poll_read_chunk(cx);
        if read.is_pending() {
            // About to sleep: an idle connection keeps no buffer memory.
            self.release_idle_buffers();
        }
        read
    }

    /// Write as much of the buffer as the socket takes, then flush; ready once all is out.
    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.write_buf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.write_buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(written)) => {
                    self.write_buf.advance(written);
                    self.bytes_written += written as u64;
                    self.needs_flush = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.needs_flush {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Read one chunk into the read buffer. The chunk lives on the stack only for the poll, so
    /// an idle connection waiting here holds no read buffer.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<IoEvent>> {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled();
                if filled.is_empty() {
                    return Poll::Ready(Ok(IoEvent::Eof));
                }
                self.read_buf.extend_from_slice(filled);
                self.bytes_read += filled.len() as u64;
                Poll::Ready(Ok(IoEvent::Read(filled.len())))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}
