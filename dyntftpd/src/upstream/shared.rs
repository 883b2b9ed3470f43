//! One HTTP body shared by every session that asked for its URL: the worker appends chunks
//! as they arrive, each session reads from its own position through a [`BodyReader`].
//!
//! - A reader at the written end gets `WouldBlock` and is notified (through the notifier
//!   of its request) when the next chunk arrives, when the body ends or when it fails.
//! - A failure (connection cut, stall, a body shorter or longer than its Content-Length)
//!   is every reader's next read after the bytes already written: ERROR 0, never a short
//!   success.
//! - A *kept* body (one the cache admitted) keeps every byte. Any other body drops the
//!   chunks its slowest reader has read, and the worker waits while what is left (the
//!   chunk that reader is in counted whole) fills a window of [`Body::window`] bytes, so
//!   such a body never holds more than the window plus the chunk being appended.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use dyntftp::{Notifier, ResponseData};

/// The origin's validators, sent back as `If-None-Match` / `If-Modified-Since`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl Validators {
    /// True when the origin gave something to revalidate with.
    pub fn any(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }
}

/// A growing, shared body.
pub struct Body {
    state: Mutex<State>,
    /// Signalled when a reader moves on or leaves (a windowed body's worker waits on it).
    moved: Condvar,
    /// Announced length (Content-Length): more or fewer bytes is a failure.
    size: Option<u64>,
    /// Keep every byte (a cached body) instead of a window.
    kept: bool,
    /// Bytes a windowed body holds at most before an append (its chunks from the one its
    /// slowest reader is in).
    window: u64,
    validators: Validators,
}

struct State {
    /// Kept bytes, in order, each chunk with its offset; `chunks[0]` starts at `base`.
    chunks: VecDeque<(u64, Box<[u8]>)>,
    base: u64,
    written: u64,
    end: Option<End>,
    readers: HashMap<u64, Reader>,
    next_reader: u64,
}

struct Reader {
    pos: u64,
    notifier: Notifier,
    /// Returned `WouldBlock` and not notified since.
    parked: bool,
}

#[derive(Clone)]
enum End {
    Complete,
    Failed(String),
}

/// Why [`Body::append`] took no more bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum AppendError {
    /// More bytes than the announced size: the body is failed.
    TooLong,
    /// A windowed body whose readers have all gone: nobody wants the rest.
    NoReaders,
}

impl Body {
    /// An empty body of `size` bytes (if known), kept whole or windowed.
    pub fn new(size: Option<u64>, kept: bool, window: u64, validators: Validators) -> Body {
        Body {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                base: 0,
                written: 0,
                end: None,
                readers: HashMap::new(),
                next_reader: 0,
            }),
            moved: Condvar::new(),
            size,
            kept,
            window: window.max(1),
            validators,
        }
    }

    /// A complete body holding `data` (for tests and tiny sources).
    #[cfg(test)]
    pub fn complete(data: &[u8]) -> Body {
        let body = Body::new(Some(data.len() as u64), true, 1, Validators::default());
        body.append(data.to_vec(), Duration::ZERO).unwrap();
        body.finish();
        body
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few assignments: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The validators of the response this body came from.
    pub fn validators(&self) -> &Validators {
        &self.validators
    }

    /// True once every byte is in (and was the announced number).
    pub fn is_complete(&self) -> bool {
        matches!(self.lock().end, Some(End::Complete))
    }

    /// True once the body failed.
    #[cfg(test)]
    pub fn is_failed(&self) -> bool {
        matches!(self.lock().end, Some(End::Failed(_)))
    }

    /// A reader from the first byte, woken through `notifier`; `None` when a windowed
    /// body has already dropped its first bytes or the body failed.
    pub fn reader(self: &std::sync::Arc<Self>, notifier: &Notifier) -> Option<BodyReader> {
        let mut state = self.lock();
        if state.base > 0 || matches!(state.end, Some(End::Failed(_))) {
            return None;
        }
        let id = state.next_reader;
        state.next_reader += 1;
        state.readers.insert(
            id,
            Reader {
                pos: 0,
                notifier: notifier.clone(),
                parked: false,
            },
        );
        Some(BodyReader {
            body: std::sync::Arc::clone(self),
            id,
        })
    }

    /// Number of readers now.
    #[cfg(test)]
    pub fn readers(&self) -> usize {
        self.lock().readers.len()
    }

    /// Bytes held in memory now.
    pub fn resident(&self) -> u64 {
        let state = self.lock();
        state.written - state.base
    }

    /// Appends a chunk and wakes the parked readers. A windowed body first drops the chunks
    /// its slowest reader has read and waits (checking every `poll`) until what it still
    /// holds is less than a window: then at most the window plus this chunk is held.
    pub fn append(&self, chunk: Vec<u8>, poll: Duration) -> Result<(), AppendError> {
        let mut state = self.lock();
        if let Some(size) = self.size {
            if state.written + chunk.len() as u64 > size {
                drop(state);
                self.fail(format!("body longer than its Content-Length {size}"));
                return Err(AppendError::TooLong);
            }
        }
        if !self.kept {
            loop {
                if state.readers.is_empty() {
                    return Err(AppendError::NoReaders);
                }
                if !self.window_full(&mut state) {
                    break;
                }
                state = self
                    .moved
                    .wait_timeout(state, poll)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let start = state.written;
        state.written += chunk.len() as u64;
        state.chunks.push_back((start, chunk.into_boxed_slice()));
        self.wake(state);
        Ok(())
    }

    /// Drops the chunks every reader has read; true when what is left fills the window,
    /// so that an append must wait. The slowest reader may be inside the first chunk left,
    /// which counts whole: the measure is what is held, not how far that reader is behind.
    fn window_full(&self, state: &mut State) -> bool {
        let slowest = state.readers.values().map(|r| r.pos).min().unwrap_or(0);
        while let Some((start, front)) = state.chunks.front() {
            let end = start + front.len() as u64;
            if end > slowest {
                break;
            }
            state.base = end;
            state.chunks.pop_front();
        }
        state.written - state.base >= self.window
    }

    /// The producer is done: complete if the announced size was reached, failed otherwise.
    pub fn finish(&self) {
        let mut state = self.lock();
        if state.end.is_some() {
            return;
        }
        match self.size {
            Some(size) if state.written != size => {
                let message = format!(
                    "body cut short: {} of {size} bytes (Content-Length)",
                    state.written
                );
                state.end = Some(End::Failed(message));
            }
            _ => state.end = Some(End::Complete),
        }
        self.wake(state);
    }

    /// Fails the body: every reader's next read past the written bytes is an error.
    pub fn fail(&self, why: String) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(End::Failed(why));
            self.wake(state);
        }
    }

    /// Unlocks and notifies every parked reader (once each).
    fn wake(&self, mut state: MutexGuard<'_, State>) {
        let parked: Vec<Notifier> = state
            .readers
            .values_mut()
            .filter_map(|r| std::mem::take(&mut r.parked).then(|| r.notifier.clone()))
            .collect();
        drop(state);
        for notifier in parked {
            notifier.notify();
        }
    }
}

/// One session's view of a [`Body`]: a [`ResponseData`] that never blocks.
pub struct BodyReader {
    body: std::sync::Arc<Body>,
    id: u64,
}

impl ResponseData for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let body = &self.body;
        let mut state = body.lock();
        let State {
            chunks,
            written,
            end,
            readers,
            ..
        } = &mut *state;
        let reader = readers.get_mut(&self.id).expect("a reader is registered");
        if reader.pos < *written && !buf.is_empty() {
            // The chunk holding `pos` (binary search: a kept body has many), then on.
            let first = chunks.partition_point(|(start, c)| start + c.len() as u64 <= reader.pos);
            let mut copied = 0;
            for (start, chunk) in chunks.range(first..) {
                let from = (reader.pos - start) as usize;
                let n = (chunk.len() - from).min(buf.len() - copied);
                buf[copied..copied + n].copy_from_slice(&chunk[from..from + n]);
                copied += n;
                reader.pos += n as u64;
                if copied == buf.len() {
                    break;
                }
            }
            drop(state);
            if !body.kept {
                body.moved.notify_all();
            }
            return Ok(copied);
        }
        match end {
            Some(End::Complete) => Ok(0),
            Some(End::Failed(why)) => Err(io::Error::other(why.clone())),
            None => {
                reader.parked = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    fn size(&self) -> Option<u64> {
        self.body.size
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        self.body.lock().readers.remove(&self.id);
        self.body.moved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    const POLL: Duration = Duration::from_millis(10);

    fn read_all(reader: &mut BodyReader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match reader.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn readers_share_a_growing_body_each_from_its_own_position() {
        let body = Arc::new(Body::new(Some(10), true, 1, Validators::default()));
        let notifier = Notifier::detached();
        let mut a = body.reader(&notifier).unwrap();
        let mut b = body.reader(&notifier).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            a.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        body.append(b"hello".to_vec(), POLL).unwrap();
        assert_eq!(a.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"hell");
        body.append(b"world".to_vec(), POLL).unwrap();
        body.finish();
        assert!(body.is_complete());
        assert_eq!(read_all(&mut b).unwrap(), b"helloworld");
        assert_eq!(read_all(&mut a).unwrap(), b"oworld");
        assert_eq!(a.size(), Some(10));
        // A late reader of a kept body starts from the first byte.
        let mut late = body.reader(&notifier).unwrap();
        assert_eq!(read_all(&mut late).unwrap(), b"helloworld");
    }

    #[test]
    fn a_short_body_fails_after_the_bytes_written() {
        let body = Arc::new(Body::new(Some(10), true, 1, Validators::default()));
        let mut reader = body.reader(&Notifier::detached()).unwrap();
        body.append(b"abc".to_vec(), POLL).unwrap();
        body.finish();
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 3);
        let err = reader.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(body.is_failed());
        assert!(body.reader(&Notifier::detached()).is_none());
    }

    #[test]
    fn a_long_body_fails() {
        let body = Arc::new(Body::new(Some(3), true, 1, Validators::default()));
        let mut reader = body.reader(&Notifier::detached()).unwrap();
        assert_eq!(
            body.append(b"abcd".to_vec(), POLL),
            Err(AppendError::TooLong)
        );
        body.finish(); // does not turn the failure into a success
        assert!(read_all(&mut reader).is_err());
    }

    #[test]
    fn a_failure_reaches_a_parked_reader() {
        let body = Arc::new(Body::new(None, true, 1, Validators::default()));
        let mut reader = body.reader(&Notifier::detached()).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            reader.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        body.fail("connection reset".into());
        assert!(reader
            .read(&mut buf)
            .unwrap_err()
            .to_string()
            .contains("reset"));
    }

    #[test]
    fn a_windowed_body_holds_at_most_its_window_past_the_slowest_reader() {
        let body = Arc::new(Body::new(Some(1000), false, 100, Validators::default()));
        let mut reader = body.reader(&Notifier::detached()).unwrap();
        let producer = {
            let body = Arc::clone(&body);
            thread::spawn(move || {
                for _ in 0..100 {
                    body.append(vec![7u8; 10], POLL).unwrap();
                }
                body.finish();
            })
        };
        let mut got = 0;
        let mut buf = [0u8; 3];
        while got < 1000 {
            // Resident bytes: at most the window, plus the chunk being appended.
            assert!(body.resident() <= 110, "resident {}", body.resident());
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        producer.join().unwrap();
        assert_eq!(got, 1000);
        assert_eq!(reader.read(&mut buf).unwrap(), 0);
        // Its first bytes are gone: nobody can start reading it from the beginning.
        assert!(body.reader(&Notifier::detached()).is_none());
    }

    #[test]
    fn the_chunk_the_slowest_reader_is_in_counts_against_the_window() {
        let body = Arc::new(Body::new(None, false, 100, Validators::default()));
        let mut reader = body.reader(&Notifier::detached()).unwrap();
        body.append(vec![1; 50], POLL).unwrap();
        let mut buf = [0u8; 49];
        assert_eq!(reader.read(&mut buf).unwrap(), 49);
        // Each append finds room: 50, 60, … 90 bytes held before it.
        for _ in 0..5 {
            body.append(vec![2; 10], POLL).unwrap();
        }
        // The reader is only 51 bytes behind, but 100 are held: the next append waits.
        assert_eq!(body.resident(), 100);
        assert!(body.window_full(&mut body.lock()));
        // Once it has read the first chunk, that chunk goes, and there is room again.
        assert_eq!(reader.read(&mut buf[..1]).unwrap(), 1);
        assert!(!body.window_full(&mut body.lock()));
        assert_eq!(body.resident(), 50);
    }

    #[test]
    fn a_windowed_body_stops_when_its_readers_leave() {
        let body = Arc::new(Body::new(None, false, 4, Validators::default()));
        let reader = body.reader(&Notifier::detached()).unwrap();
        body.append(b"abcd".to_vec(), POLL).unwrap();
        assert_eq!(body.readers(), 1);
        drop(reader);
        assert_eq!(
            body.append(b"efgh".to_vec(), POLL),
            Err(AppendError::NoReaders)
        );
    }

    #[test]
    fn a_complete_body_serves_from_memory() {
        let body = Arc::new(Body::complete(b"cached"));
        let mut reader = body.reader(&Notifier::detached()).unwrap();
        assert_eq!(read_all(&mut reader).unwrap(), b"cached");
    }
}
