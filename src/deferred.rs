//! Deferred open: a source whose opening completes later, from any thread, so that the
//! first answer (and the `tsize` in it) waits for a backend without blocking the loop.
//!
//! [`Handler::open`](crate::Handler::open) runs on the event-loop thread and must not wait
//! for a network. A handler whose data lives behind one (an HTTP repository, an inventory
//! service) returns a [`Deferred`] source at once and hands the [`Opener`] to another
//! thread. The session then sends nothing — a retransmitted request from the client is
//! absorbed — until the opener completes:
//!
//! - [`Opener::open`] with the real source: the session answers as if `open` had returned
//!   it, with its [`size`](ResponseData::size) as `tsize` in the OACK. UEFI firmware reads
//!   the size from the first OACK of a name (its size probe), so it must be known here.
//! - [`Opener::refuse`]: the client gets the ERROR (ERROR 1 for a name the backend does not
//!   have) instead of any OACK.
//! - Nothing within the server's open timeout
//!   ([`ServerBuilder::open_timeout`](crate::ServerBuilder::open_timeout), 2 s by default:
//!   below the 4 s that EDK2 waits before it repeats a request): ERROR 0, and the session
//!   ends with [`Outcome::SourceStalled`](crate::Outcome::SourceStalled).
//!
//! A session that waits holds its slot (counted towards `max_sessions` and the per-client
//! caps of unverified sessions, like any session nobody acknowledged) and no packet
//! memory. An opener dropped without completing refuses with ERROR 0;
//! [`Opener::is_abandoned`] tells the backend that the session has gone meanwhile.
//!
//! ```
//! use dyntftp::deferred::deferred;
//! use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData};
//!
//! struct Inventory;
//!
//! impl Handler for Inventory {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         let (opener, source) = deferred(req.notifier);
//!         let name = req.filename_lossy().into_owned();
//!         std::thread::spawn(move || {
//!             // e.g. a lookup in a remote inventory; here, a rule on the name.
//!             if name.ends_with(".cfg") {
//!                 let text = format!("# generated for {name}\n");
//!                 opener.open(Box::new(BytesSource::new(text.into_bytes())));
//!             } else {
//!                 opener.refuse(Reject::not_found());
//!             }
//!         });
//!         Ok(Box::new(source))
//!     }
//! }
//! # let _ = Inventory;
//! ```

use std::fmt;
use std::io::{self, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use crate::handler::{Notifier, Reject};
use crate::packet::ErrorCode;
use crate::response::ResponseData;

/// A source whose opening completes later, and the handle that completes it.
///
/// Return the [`Deferred`] from `open` and complete the [`Opener`] from any thread; the
/// request's session is woken through `notifier` (pass the request's
/// [`ReadRequest::notifier`](crate::ReadRequest::notifier)).
pub fn deferred(notifier: &Notifier) -> (Opener, Deferred) {
    let slot = Arc::new(Mutex::new(Slot::Pending));
    let opener = Opener {
        slot: Arc::clone(&slot),
        notifier: notifier.clone(),
        completed: false,
    };
    (opener, Deferred { slot, source: None })
}

/// What the opener said, waiting for the session to take it.
enum Slot {
    Pending,
    Opened(Box<dyn ResponseData + Send>),
    Refused(Reject),
    /// The session took the opened source.
    Taken,
}

/// Locks the slot; a panic on the other side while it held the lock left a value that is
/// still whole, so the poison is ignored.
fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Completes a [`Deferred`] source once, from any thread. See the [module
/// documentation](self).
pub struct Opener {
    slot: Arc<Mutex<Slot>>,
    notifier: Notifier,
    completed: bool,
}

impl Opener {
    /// The data is ready: the session answers with `source` (its size, if known, as
    /// `tsize`).
    pub fn open(mut self, source: Box<dyn ResponseData + Send>) {
        self.complete(Slot::Opened(source));
    }

    /// The request is refused: the client gets `reject` as an ERROR (no OACK was sent).
    /// A [`retry_later`](Reject::retry_later) refusal is an ordinary refusal here: the
    /// request cannot go back to wait.
    pub fn refuse(mut self, reject: Reject) {
        self.complete(Slot::Refused(reject));
    }

    /// True once the session stopped waiting (its open timeout passed, it was evicted,
    /// the client gave up, the server shut down): whatever is completed now is dropped,
    /// so a backend may stop its work.
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.slot) == 1
    }

    fn complete(&mut self, answer: Slot) {
        self.completed = true;
        if self.is_abandoned() {
            // Dropped here, on the opener's thread, not in the loop.
            return;
        }
        *lock(&self.slot) = answer;
        self.notifier.notify();
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        if !self.completed {
            self.complete(Slot::Refused(Reject::new(
                ErrorCode::NotDefined,
                "error opening file",
            )));
        }
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("notifier", &self.notifier)
            .field("completed", &self.completed)
            .finish()
    }
}

/// The source a handler returns for a deferred open: not open until its [`Opener`]
/// completes, then the opener's source.
pub struct Deferred {
    slot: Arc<Mutex<Slot>>,
    source: Option<Box<dyn ResponseData + Send>>,
}

impl Deferred {
    fn opened(&mut self) -> io::Result<&mut Box<dyn ResponseData + Send>> {
        self.source
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))
    }
}

impl ResponseData for Deferred {
    fn poll_open(&mut self) -> Poll<Result<(), Reject>> {
        if self.source.is_some() {
            return Poll::Ready(Ok(()));
        }
        let mut slot = lock(&self.slot);
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Pending => {
                *slot = Slot::Pending;
                Poll::Pending
            }
            Slot::Opened(source) => {
                self.source = Some(source);
                Poll::Ready(Ok(()))
            }
            Slot::Refused(reject) => {
                *slot = Slot::Refused(reject.clone());
                Poll::Ready(Err(reject))
            }
            Slot::Taken => Poll::Ready(Err(Reject::new(
                ErrorCode::NotDefined,
                "error opening file",
            ))),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.opened()?.read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        self.opened()?.read_vectored(bufs)
    }

    fn size(&self) -> Option<u64> {
        self.source.as_ref().and_then(|source| source.size())
    }
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred")
            .field("open", &self.source.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::BytesSource;

    fn pending() -> (Opener, Deferred) {
        deferred(&Notifier::detached())
    }

    #[test]
    fn pending_until_opened_then_the_openers_source() {
        let (opener, mut source) = pending();
        assert_eq!(source.poll_open(), Poll::Pending);
        assert_eq!(source.size(), None);
        let mut buf = [0u8; 8];
        let e = source.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(!opener.is_abandoned());
        std::thread::spawn(move || opener.open(Box::new(BytesSource::new(&b"kernel"[..]))))
            .join()
            .unwrap();
        assert_eq!(source.poll_open(), Poll::Ready(Ok(())));
        assert_eq!(source.poll_open(), Poll::Ready(Ok(())));
        assert_eq!(source.size(), Some(6));
        assert_eq!(source.read(&mut buf).unwrap(), 6);
        assert_eq!(&buf[..6], b"kernel");
    }

    #[test]
    fn a_refusal_is_kept_and_a_dropped_opener_refuses_with_error_0() {
        let (opener, mut source) = pending();
        opener.refuse(Reject::not_found());
        assert_eq!(source.poll_open(), Poll::Ready(Err(Reject::not_found())));
        assert_eq!(source.poll_open(), Poll::Ready(Err(Reject::not_found())));

        let (opener, mut source) = pending();
        drop(opener);
        let Poll::Ready(Err(reject)) = source.poll_open() else {
            panic!("a dropped opener must refuse");
        };
        assert_eq!(reject.code, ErrorCode::NotDefined);
    }

    #[test]
    fn the_opener_knows_when_the_session_went_away() {
        let (opener, source) = pending();
        drop(source);
        assert!(opener.is_abandoned());
        // Completing an abandoned opener is harmless.
        opener.open(Box::new(BytesSource::new(&b"late"[..])));
    }

    /// Counts notifications, as the server's ready queue would.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl crate::handler::ReadySink for Counter {
        fn ready(&self, _: crate::server::SessionId) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn completing_wakes_the_session_once_and_an_abandoned_one_never() {
        let counter = Arc::new(Counter(Default::default()));
        let notifier = Notifier::new(counter.clone(), crate::server::SessionId::new(3, 1));
        let count = || counter.0.load(std::sync::atomic::Ordering::SeqCst);
        let (opener, _source) = deferred(&notifier);
        opener.refuse(Reject::not_found());
        assert_eq!(count(), 1);
        let (opener, source) = deferred(&notifier);
        drop(source);
        drop(opener);
        assert_eq!(count(), 1);
    }
}
