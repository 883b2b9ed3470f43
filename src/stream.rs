//! A ready-made streaming source: a [`ResponseData`] fed from another thread through a
//! bounded buffer, with backpressure for the producer and wake-ups for the event loop.
//!
//! ```
//! use std::io::Write;
//! use dyntftp::{stream, Handler, ReadRequest, Reject, ResponseData};
//!
//! struct Slow;
//!
//! impl Handler for Slow {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         let (mut writer, source) = stream::channel(req.notifier, 256 * 1024);
//!         std::thread::spawn(move || {
//!             // Anything slow: an HTTP body, a generator, a pipe. `write` blocks while the
//!             // buffer is full, and fails once the session has ended.
//!             for i in 0..1000 {
//!                 if writeln!(writer, "line {i}").is_err() {
//!                     return; // the client went away
//!                 }
//!             }
//!             writer.finish();
//!         });
//!         Ok(Box::new(source))
//!     }
//! }
//! ```
//!
//! # How it works
//!
//! [`channel`] returns a [`StreamWriter`] (`Send`, for the producer thread) and a
//! [`StreamSource`] (the `ResponseData` the handler returns from `open`). They share one
//! buffer of queued chunks behind a mutex:
//!
//! - **Loop side.** [`StreamSource::read`] copies what is buffered, never waiting. With
//!   nothing buffered and the stream not ended it returns [`io::ErrorKind::WouldBlock`] and
//!   remembers that the session is parked; the next write, [`finish`](StreamWriter::finish),
//!   [`fail`](StreamWriter::fail) or drop of the writer then calls
//!   [`Notifier::notify`] once, which resumes the session. No wake-up is lost: the "parked"
//!   flag and the data are under the same lock. While the session is not parked, writes
//!   do not touch the loop at all.
//! - **Producer side.** The buffer holds at most `capacity` bytes. [`StreamWriter::send`]
//!   and [`io::Write::write`] block while it is full — that is the backpressure when the
//!   TFTP client is slower than the producer — and [`StreamWriter::try_send`] returns the
//!   chunk instead of blocking. A chunk larger than `capacity` is accepted once the buffer
//!   is empty, so memory stays below `max(capacity, largest chunk)` per session.
//! - **End.** [`finish`](StreamWriter::finish) ends the transfer normally once the buffer
//!   is drained. [`fail`](StreamWriter::fail) ends it with an error: the session sends
//!   ERROR 0 "error reading file" and ends with
//!   [`Outcome::ReadFailed`](crate::Outcome::ReadFailed). **Dropping the writer without
//!   `finish` is a failure too**, never a silently truncated success: a producer that
//!   panics or returns early on an error cannot make the client store half a file.
//! - **Session gone.** When the session ends first (the client gave up, timed out, or the
//!   server shut down), the source is dropped: every later or blocked write returns
//!   [`io::ErrorKind::BrokenPipe`], so the producer stops instead of filling a buffer no one
//!   reads. [`StreamWriter::is_closed`] asks without writing.
//!
//! # Size and `tsize`
//!
//! A session asks its source's [`size`](ResponseData::size) **once, when it is created**,
//! right after [`Handler::open`](crate::Handler::open) returns, to answer the client's
//! `tsize` option in the OACK. So [`StreamWriter::set_size`] answers `tsize` only when it
//! is called **before `open` returns** — in `open` itself, typically with a size known from
//! a cache or a catalogue, since `open` runs on the event loop and must not wait for a
//! producer. A later `set_size` (say, when an HTTP response's `Content-Length` arrives) is
//! too late for `tsize`: the OACK leaves `tsize` out, and the client learns the end from
//! the last, short block, as without options.
//!
//! Whenever it is called, an announced size is also *checked*: a stream that delivers
//! more bytes than announced fails the write with [`io::ErrorKind::InvalidData`], and one
//! that finishes with fewer ends with ERROR 0 instead of a short transfer, so a client
//! that was promised `tsize` bytes never gets another amount with a success.
//! Netascii transfers never answer `tsize` (the translated size is unknown) but are checked
//! the same way on the raw bytes.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::handler::Notifier;
use crate::response::ResponseData;

/// Creates a stream of at most `capacity` buffered bytes (at least 1) whose source wakes
/// the session through `notifier` (pass [`ReadRequest::notifier`](crate::ReadRequest)).
///
/// See the [module docs](self) for the semantics.
pub fn channel(notifier: &Notifier, capacity: usize) -> (StreamWriter, StreamSource) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            chunks: VecDeque::new(),
            front_pos: 0,
            buffered: 0,
            written: 0,
            size: None,
            end: None,
            reader_parked: false,
            reader_gone: false,
            #[cfg(test)]
            waits: 0,
        }),
        space: Condvar::new(),
        capacity: capacity.max(1),
        notifier: notifier.clone(),
    });
    (
        StreamWriter {
            shared: Arc::clone(&shared),
            ended: false,
        },
        StreamSource { shared },
    )
}

/// The producer's end of a [`channel`]. `Send`: move it to the thread that produces the
/// bytes. See the [module docs](self).
pub struct StreamWriter {
    shared: Arc<Shared>,
    /// `finish` or `fail` was called (so `Drop` must not record a failure).
    ended: bool,
}

/// The session's end of a [`channel`]: a [`ResponseData`] that never blocks.
pub struct StreamSource {
    shared: Arc<Shared>,
}

/// Why [`StreamWriter::try_send`] did not take a chunk; the chunk is given back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// The buffer is full; try again later (or use [`StreamWriter::send`]).
    Full(Vec<u8>),
    /// The session has ended (its source was dropped): nobody will read this.
    Closed(Vec<u8>),
}

impl fmt::Display for TrySendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("stream buffer full"),
            TrySendError::Closed(_) => f.write_str("stream closed: the session has ended"),
        }
    }
}

impl std::error::Error for TrySendError {}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the reader frees space or goes away.
    space: Condvar,
    capacity: usize,
    notifier: Notifier,
}

struct State {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the front chunk already read.
    front_pos: usize,
    /// Unread bytes in `chunks`.
    buffered: usize,
    /// Bytes accepted from the producer so far.
    written: u64,
    /// Announced total size.
    size: Option<u64>,
    end: Option<End>,
    /// The source returned `WouldBlock` and has not been notified since.
    reader_parked: bool,
    /// The source was dropped.
    reader_gone: bool,
    /// How many times a writer started waiting for space (lets tests see a blocked
    /// writer without timing).
    #[cfg(test)]
    waits: usize,
}

enum End {
    Finished,
    /// The producer's error, handed to the reader once.
    Failed(Option<io::Error>),
    /// The writer was dropped without `finish`.
    Abandoned,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state inconsistent (every
        // update is a few plain assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unlocks `state` and, if the reader was parked, notifies it (once: the parked flag
    /// is taken under the lock, the notification sent after unlocking).
    fn unlock_and_wake(&self, mut state: MutexGuard<'_, State>) {
        let parked = std::mem::take(&mut state.reader_parked);
        drop(state);
        if parked {
            self.notifier.notify();
        }
    }
}

impl State {
    /// Whether `len` more bytes fit (a chunk of any size fits an empty buffer).
    fn fits(&self, len: usize, capacity: usize) -> bool {
        self.buffered == 0 || self.buffered + len <= capacity
    }

    /// Queues `chunk` (already checked against capacity and size).
    fn push(&mut self, chunk: Vec<u8>) {
        self.buffered += chunk.len();
        self.written += chunk.len() as u64;
        self.chunks.push_back(chunk);
    }

    /// Refuses bytes beyond the announced size.
    fn check_size(&self, len: usize) -> io::Result<()> {
        match self.size {
            Some(size) if self.written + len as u64 > size => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "stream longer than its announced size of {size} bytes ({} written, {len} more)",
                    self.written
                ),
            )),
            _ => Ok(()),
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "stream closed: the session has ended",
    )
}

impl StreamWriter {
    /// Queues `chunk`, waiting while the buffer is full. Fails with
    /// [`io::ErrorKind::BrokenPipe`] once the session has ended, and with
    /// [`io::ErrorKind::InvalidData`] if it would exceed the size given to
    /// [`set_size`](StreamWriter::set_size). An empty chunk is accepted and does nothing.
    pub fn send(&mut self, chunk: Vec<u8>) -> io::Result<()> {
        if chunk.is_empty() {
            return if self.is_closed() {
                Err(closed())
            } else {
                Ok(())
            };
        }
        let mut state = self.shared.lock();
        loop {
            if state.reader_gone {
                return Err(closed());
            }
            state.check_size(chunk.len())?;
            if state.fits(chunk.len(), self.shared.capacity) {
                break;
            }
            #[cfg(test)]
            {
                state.waits += 1;
            }
            state = self
                .shared
                .space
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.push(chunk);
        self.shared.unlock_and_wake(state);
        Ok(())
    }

    /// Queues `chunk` if it fits now, without waiting; gives it back otherwise. A chunk
    /// that would exceed the size given to [`set_size`](StreamWriter::set_size) fails the
    /// stream (as [`send`](StreamWriter::send) reports `InvalidData`) and is given back as
    /// [`TrySendError::Closed`].
    pub fn try_send(&mut self, chunk: Vec<u8>) -> Result<(), TrySendError> {
        let mut state = self.shared.lock();
        if state.reader_gone {
            return Err(TrySendError::Closed(chunk));
        }
        if let Err(e) = state.check_size(chunk.len()) {
            // The producer broke its own promise: end the stream as failed.
            state.end = Some(End::Failed(Some(e)));
            self.ended = true;
            self.shared.unlock_and_wake(state);
            return Err(TrySendError::Closed(chunk));
        }
        if !state.fits(chunk.len(), self.shared.capacity) {
            return Err(TrySendError::Full(chunk));
        }
        if !chunk.is_empty() {
            state.push(chunk);
        }
        self.shared.unlock_and_wake(state);
        Ok(())
    }

    /// Announces the total size. It answers `tsize` only if called before the handler's
    /// `open` returns, and is checked against what is written whenever it is called (see
    /// the [module docs](self#size-and-tsize)).
    pub fn set_size(&self, size: u64) {
        self.shared.lock().size = Some(size);
    }

    /// True once the session has ended and nothing will read the stream any more.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().reader_gone
    }

    /// Ends the stream successfully: the session sends what is buffered, then the last
    /// block. If a size was announced and fewer bytes were written, the stream fails
    /// instead (ERROR 0).
    pub fn finish(mut self) {
        self.end(|state| match state.size {
            Some(size) if state.written != size => End::Failed(Some(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "stream ended after {} of its announced {size} bytes",
                    state.written
                ),
            ))),
            _ => End::Finished,
        });
    }

    /// Ends the stream with an error: the session sends ERROR 0 "error reading file"
    /// (after the blocks already sent) and ends with
    /// [`Outcome::ReadFailed`](crate::Outcome::ReadFailed). Buffered bytes are still
    /// delivered first.
    pub fn fail(mut self, error: io::Error) {
        self.end(|_| End::Failed(Some(error)));
    }

    /// Records how the stream ended (the first end wins) and wakes a parked session.
    fn end(&mut self, make: impl FnOnce(&State) -> End) {
        self.ended = true;
        let mut state = self.shared.lock();
        if state.end.is_none() {
            state.end = Some(make(&state));
        }
        self.shared.unlock_and_wake(state);
    }
}

impl io::Write for StreamWriter {
    /// Copies as much of `buf` as fits, waiting while the buffer is full (so
    /// `io::copy(&mut body, &mut writer)` streams with backpressure).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let capacity = self.shared.capacity;
        let mut state = self.shared.lock();
        let room = loop {
            if state.reader_gone {
                return Err(closed());
            }
            if state.buffered < capacity {
                break capacity - state.buffered;
            }
            #[cfg(test)]
            {
                state.waits += 1;
            }
            state = self
                .shared
                .space
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        };
        let n = room.min(buf.len());
        state.check_size(n)?;
        state.push(buf[..n].to_vec());
        self.shared.unlock_and_wake(state);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if !self.ended {
            self.end(|_| End::Abandoned);
        }
    }
}

impl fmt::Debug for StreamWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("StreamWriter")
            .field("buffered", &state.buffered)
            .field("written", &state.written)
            .field("capacity", &self.shared.capacity)
            .field("closed", &state.reader_gone)
            .finish()
    }
}

impl ResponseData for StreamSource {
    /// Copies buffered bytes; `WouldBlock` when there are none yet; `Ok(0)` after
    /// [`StreamWriter::finish`]; an error after [`StreamWriter::fail`] or when the writer
    /// was dropped without finishing.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut state = self.shared.lock();
        let mut n = 0;
        while n < buf.len() {
            let front_pos = state.front_pos;
            let Some(front) = state.chunks.front() else {
                break;
            };
            let take = (front.len() - front_pos).min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&front[front_pos..front_pos + take]);
            n += take;
            if front_pos + take == front.len() {
                state.chunks.pop_front();
                state.front_pos = 0;
            } else {
                state.front_pos += take;
            }
        }
        if n > 0 {
            state.buffered -= n;
            drop(state);
            // A waiting writer may fit now (there is at most one writer).
            self.shared.space.notify_all();
            return Ok(n);
        }
        match &mut state.end {
            None => {
                state.reader_parked = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
            Some(End::Finished) => Ok(0),
            Some(End::Failed(error)) => Err(error
                .take()
                .unwrap_or_else(|| io::Error::other("stream failed"))),
            Some(End::Abandoned) => Err(io::Error::other(
                "stream producer stopped without finishing the stream",
            )),
        }
    }

    /// The size given to [`StreamWriter::set_size`] so far, if any.
    fn size(&self) -> Option<u64> {
        self.shared.lock().size
    }
}

impl Drop for StreamSource {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.reader_gone = true;
        state.chunks.clear();
        state.buffered = 0;
        drop(state);
        self.shared.space.notify_all();
    }
}

impl fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("StreamSource")
            .field("buffered", &state.buffered)
            .field("size", &state.size)
            .field("ended", &state.end.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::handler::ReadySink;

    /// Counts notifications.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl ReadySink for Counter {
        fn ready(&self, _session: crate::server::SessionId) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counted(capacity: usize) -> (Arc<Counter>, StreamWriter, StreamSource) {
        let counter = Arc::new(Counter::default());
        let notifier = Notifier::new(counter.clone(), crate::server::SessionId::new(3, 7));
        let (writer, source) = channel(&notifier, capacity);
        (counter, writer, source)
    }

    fn notified(counter: &Counter) -> usize {
        counter.0.load(Ordering::SeqCst)
    }

    fn kind(result: io::Result<usize>) -> io::ErrorKind {
        result.expect_err("expected an error").kind()
    }

    /// Waits (bounded) until a writer has started waiting for space `n` times in total.
    fn wait_for_blocked_writer(source: &StreamSource, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while source.shared.lock().waits < n {
            assert!(Instant::now() < deadline, "the writer never blocked");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn bytes_arrive_in_order_across_chunks_then_the_end() {
        let (_, mut writer, mut source) = counted(1 << 20);
        let mut buf = [0u8; 4];
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::WouldBlock);
        writer.send(b"hello".to_vec()).unwrap();
        writer.send(Vec::new()).unwrap();
        writer.write_all(b" wor").unwrap();
        writer.send(b"ld".to_vec()).unwrap();
        assert_eq!(source.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"hell");
        assert_eq!(source.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"o wo");
        assert_eq!(source.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"rld");
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::WouldBlock);
        writer.finish();
        assert_eq!(source.read(&mut buf).unwrap(), 0);
        assert_eq!(source.read(&mut buf).unwrap(), 0);
        assert_eq!(source.size(), None);
    }

    #[test]
    fn notifies_once_per_park_and_only_when_parked() {
        let (counter, mut writer, mut source) = counted(1 << 20);
        let mut buf = [0u8; 64];
        // Not parked: writes cost the loop nothing.
        writer.send(b"a".to_vec()).unwrap();
        assert_eq!(notified(&counter), 0);
        assert_eq!(source.read(&mut buf).unwrap(), 1);
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::WouldBlock);
        writer.send(b"b".to_vec()).unwrap();
        writer.send(b"c".to_vec()).unwrap();
        assert_eq!(
            notified(&counter),
            1,
            "one wake-up for the first write after parking"
        );
        assert_eq!(source.read(&mut buf).unwrap(), 2);
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::WouldBlock);
        assert_eq!(writer.try_send(b"d".to_vec()), Ok(()));
        assert_eq!(notified(&counter), 2);
        assert_eq!(source.read(&mut buf).unwrap(), 1);
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::WouldBlock);
        writer.finish();
        assert_eq!(notified(&counter), 3, "finish wakes a parked session");
        assert_eq!(source.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn failing_and_dropping_the_writer_wake_a_parked_session() {
        let (counter, writer, mut source) = counted(16);
        assert_eq!(kind(source.read(&mut [0; 8])), io::ErrorKind::WouldBlock);
        writer.fail(io::Error::other("upstream said 500"));
        assert_eq!(notified(&counter), 1);
        let e = source.read(&mut [0; 8]).unwrap_err();
        assert_eq!(e.to_string(), "upstream said 500");

        let (counter, writer, mut source) = counted(16);
        assert_eq!(kind(source.read(&mut [0; 8])), io::ErrorKind::WouldBlock);
        drop(writer);
        assert_eq!(notified(&counter), 1);
        assert_eq!(kind(source.read(&mut [0; 8])), io::ErrorKind::Other);
    }

    #[test]
    fn a_dropped_writer_is_a_failure_not_a_short_success() {
        let (_, mut writer, mut source) = counted(64);
        writer.send(b"partial".to_vec()).unwrap();
        drop(writer);
        let mut buf = [0u8; 64];
        // What was written is delivered, then an error, never Ok(0).
        assert_eq!(source.read(&mut buf).unwrap(), 7);
        for _ in 0..3 {
            let e = source.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Other);
            assert!(e.to_string().contains("without finishing"), "{e}");
        }
        // A producer thread that panics drops its writer too.
        let (_, mut writer, mut source) = counted(64);
        let producer = thread::spawn(move || {
            writer.send(b"x".to_vec()).unwrap();
            panic!("producer bug (expected by the test)");
        });
        assert!(producer.join().is_err());
        assert_eq!(source.read(&mut buf).unwrap(), 1);
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::Other);
    }

    #[test]
    fn buffered_bytes_come_before_the_failure() {
        let (_, mut writer, mut source) = counted(64);
        writer.send(b"abc".to_vec()).unwrap();
        writer.fail(io::Error::new(io::ErrorKind::NotFound, "gone"));
        let mut buf = [0u8; 2];
        assert_eq!(source.read(&mut buf).unwrap(), 2);
        assert_eq!(source.read(&mut buf).unwrap(), 1);
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::NotFound);
        // Still an error afterwards (the session stops at the first one anyway).
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::Other);
    }

    #[test]
    fn try_send_reports_a_full_buffer_and_gives_the_chunk_back() {
        let (_, mut writer, mut source) = counted(10);
        assert_eq!(writer.try_send(vec![1; 6]), Ok(()));
        assert_eq!(writer.try_send(vec![2; 4]), Ok(()));
        assert_eq!(
            writer.try_send(vec![3; 1]),
            Err(TrySendError::Full(vec![3]))
        );
        let mut buf = [0u8; 3];
        assert_eq!(source.read(&mut buf).unwrap(), 3);
        assert_eq!(
            writer.try_send(vec![3; 4]),
            Err(TrySendError::Full(vec![3; 4]))
        );
        assert_eq!(writer.try_send(vec![3; 3]), Ok(()));
        // A chunk larger than the capacity goes in once the buffer is empty.
        let mut all = vec![0u8; 64];
        assert_eq!(source.read(&mut all).unwrap(), 10);
        assert_eq!(all[..10], [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]);
        assert_eq!(writer.try_send(vec![9; 25]), Ok(()));
        assert_eq!(
            writer.try_send(vec![9; 1]),
            Err(TrySendError::Full(vec![9]))
        );
        assert_eq!(source.read(&mut all).unwrap(), 25);
    }

    #[test]
    fn send_blocks_while_full_until_the_session_reads() {
        let (_, mut writer, mut source) = counted(8);
        writer.send(vec![1; 8]).unwrap();
        let producer = thread::spawn(move || {
            writer.send(vec![2; 4]).unwrap();
            writer.finish();
        });
        wait_for_blocked_writer(&source, 1);
        let mut buf = [0u8; 32];
        // The blocked chunk is not in the buffer yet.
        assert_eq!(source.read(&mut buf).unwrap(), 8);
        assert_eq!(buf[..8], [1; 8]);
        producer.join().unwrap();
        assert_eq!(source.read(&mut buf).unwrap(), 4);
        assert_eq!(buf[..4], [2; 4]);
        assert_eq!(source.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn write_takes_what_fits_and_blocks_when_full() {
        let (_, mut writer, mut source) = counted(10);
        assert_eq!(writer.write(&[5; 25]).unwrap(), 10);
        let producer = thread::spawn(move || {
            let n = writer.write(&[6; 25]).unwrap();
            writer.finish();
            n
        });
        wait_for_blocked_writer(&source, 1);
        let mut buf = [0u8; 4];
        assert_eq!(source.read(&mut buf).unwrap(), 4);
        assert_eq!(
            producer.join().unwrap(),
            4,
            "only the freed space is filled"
        );
        let mut rest = Vec::new();
        let mut big = [0u8; 64];
        loop {
            match source.read(&mut big) {
                Ok(0) => break,
                Ok(n) => rest.extend_from_slice(&big[..n]),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(rest, [[5u8; 6].as_slice(), &[6; 4]].concat());
    }

    #[test]
    fn the_writer_learns_that_the_session_ended() {
        let (_, mut writer, source) = counted(4);
        writer.send(vec![0; 4]).unwrap();
        assert!(!writer.is_closed());
        let producer = thread::spawn(move || {
            let blocked = writer.send(vec![1; 4]).unwrap_err().kind();
            let later = writer.write(b"more").unwrap_err().kind();
            let tried = writer.try_send(vec![2]);
            (blocked, later, tried, writer.is_closed())
        });
        wait_for_blocked_writer(&source, 1);
        drop(source);
        let (blocked, later, tried, closed) = producer.join().unwrap();
        assert_eq!(blocked, io::ErrorKind::BrokenPipe);
        assert_eq!(later, io::ErrorKind::BrokenPipe);
        assert_eq!(tried, Err(TrySendError::Closed(vec![2])));
        assert!(closed);
    }

    #[test]
    fn an_announced_size_answers_size_and_is_enforced() {
        let (_, mut writer, mut source) = counted(64);
        assert_eq!(source.size(), None);
        writer.set_size(6);
        assert_eq!(source.size(), Some(6));
        writer.send(b"four".to_vec()).unwrap();
        assert_eq!(
            writer.send(b"three".to_vec()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        writer.write_all(b"ok").unwrap();
        writer.finish();
        let mut buf = [0u8; 16];
        assert_eq!(source.read(&mut buf).unwrap(), 6);
        assert_eq!(
            source.read(&mut buf).unwrap(),
            0,
            "exact size ends normally"
        );

        // Finishing short of the announced size is a failure.
        let (_, mut writer, mut source) = counted(64);
        writer.set_size(10);
        writer.send(b"short".to_vec()).unwrap();
        writer.finish();
        assert_eq!(source.read(&mut buf).unwrap(), 5);
        let e = source.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("5 of its announced 10"), "{e}");

        // try_send past the size fails the stream.
        let (_, mut writer, mut source) = counted(64);
        writer.set_size(2);
        assert_eq!(
            writer.try_send(b"abc".to_vec()),
            Err(TrySendError::Closed(b"abc".to_vec()))
        );
        drop(writer); // already ended: dropping changes nothing
        assert_eq!(kind(source.read(&mut buf)), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_producer_thread_streams_a_large_body_through_a_small_buffer() {
        let (counter, mut writer, mut source) = counted(1000);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let producer = thread::spawn(move || {
            for piece in data.chunks(333) {
                writer.write_all(piece).unwrap();
            }
            writer.finish();
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "stream did not end");
            match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, expected);
        eprintln!("{} notifications", notified(&counter));
    }

    #[test]
    fn detached_notifier_works_outside_a_server() {
        let (mut writer, mut source) = channel(&Notifier::detached(), 0);
        writer.send(b"x".to_vec()).unwrap();
        writer.finish();
        let mut buf = [0u8; 2];
        assert_eq!(source.read(&mut buf).unwrap(), 1);
        assert_eq!(source.read(&mut buf).unwrap(), 0);
    }
}
