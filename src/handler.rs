//! The [`Handler`] trait: decides, per request, where the bytes come from, and receives the
//! statistics (fbtftp's `get_handler` / `get_response_data` plus both stats callbacks).
//!
//! The handler runs on the event-loop thread, so its methods take `&mut self` and need no
//! locks; they must not block for long. A panic inside them ends only the request or
//! session concerned.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::family::ClientFamily;
use crate::mac::MacAddr;
use crate::packet::{ErrorCode, Mode, Options};
use crate::response::ResponseData;
use crate::server::SessionId;
use crate::stats::{ServerStats, SessionStats};

/// A read request as the handler sees it.
#[derive(Clone, Copy, Debug)]
pub struct ReadRequest<'a> {
    /// The client's address and port (its TID).
    pub peer: SocketAddr,
    /// The address the client sent its request to (the server's address as the client
    /// knows it; with a wildcard listener it is the real destination address).
    pub local: SocketAddr,
    /// The requested filename, as sent (no NUL; not necessarily UTF-8).
    pub filename: &'a [u8],
    /// The transfer mode (`octet` or `netascii`; `mail` is refused before the handler).
    pub mode: Mode,
    /// The options the client requested (negotiation happens after `open`).
    pub options: Options<'a>,
    /// Wakes this request's session when its source, having returned `WouldBlock`, has
    /// data again. Clone it into the source or its producer thread.
    pub notifier: &'a Notifier,
    /// What the handler notes about the session it starts (see
    /// [`set_label`](ReadRequest::set_label)); the server copies it into the session's
    /// [`SessionStats`].
    pub notes: &'a SessionNotes,
    /// When the server read the request (the loop's clock): a handler that keeps time
    /// (the file cache's load allowance) uses it rather than reading the clock itself.
    pub now: Instant,
}

impl ReadRequest<'_> {
    /// The filename as text, with invalid UTF-8 replaced.
    pub fn filename_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.filename)
    }

    /// The firmware or boot loader that most likely sent the request, told from its
    /// options and filename (see [`ClientFamily`]).
    pub fn family(&self) -> ClientFamily {
        ClientFamily::classify(self.filename, self.options)
    }

    /// Names what answered this request — a routing rule, a backend — for the session's
    /// log line and [`SessionStats::label`], cut to [`MAX_LABEL_LEN`] bytes. The last call
    /// wins. Keep the set of labels small (one per rule, not per client): exporters count
    /// sessions per label.
    pub fn set_label(&self, label: &str) {
        self.notes.set_label(label);
    }

    /// The client's MAC address: the kernel's neighbour table entry for the peer's IP
    /// (the client's own hardware address, known only for a client on a link of this
    /// host), else the one in a per-machine file name (`pxelinux.cfg/01-aa-bb-…`,
    /// `grub.cfg-01-…`, `<mac>/…`; see [`MacAddr::from_filename`]); `None` when neither
    /// says.
    ///
    /// Cost: one rtnetlink round trip ([`MacAddr::neighbour`]: a dump of one family's
    /// table, bounded), made only when this is called, on the calling thread; call it
    /// once per request, only when a decision needs it. Both answers can be forged: a
    /// client names any file, and anyone on the link can answer ARP or NDP for the
    /// address it sends from. Choose content by it, never grant access by it.
    ///
    /// The answer is kept with the request's [`SessionNotes`]: a second call (by a
    /// wrapped handler, a backend) costs nothing, and the session's
    /// [`SessionStats::mac`] and log line carry it.
    pub fn mac(&self) -> Option<MacAddr> {
        if let Some(known) = self.notes.mac.get() {
            return known;
        }
        let mac =
            MacAddr::neighbour(self.peer.ip()).or_else(|| MacAddr::from_filename(self.filename));
        self.notes.mac.set(Some(mac));
        mac
    }
}

/// The longest label [`ReadRequest::set_label`] keeps, in bytes.
pub const MAX_LABEL_LEN: usize = 64;

/// What a handler notes about the session a request starts, through
/// [`ReadRequest::set_label`], and the MAC [`ReadRequest::mac`] looked up. The server
/// makes one per request; make one with `SessionNotes::default()` to call a handler
/// outside a server.
#[derive(Debug, Default)]
pub struct SessionNotes {
    label: RefCell<Option<Arc<str>>>,
    /// `None` until [`ReadRequest::mac`] looked; then what it found.
    mac: Cell<Option<Option<MacAddr>>>,
}

impl SessionNotes {
    fn set_label(&self, label: &str) {
        let mut end = label.len().min(MAX_LABEL_LEN);
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        *self.label.borrow_mut() = Some(Arc::from(&label[..end]));
    }

    /// The label set for the request, if any.
    pub fn label(&self) -> Option<Arc<str>> {
        self.label.borrow().clone()
    }

    /// The client's MAC, if [`ReadRequest::mac`] was asked and found one.
    pub fn mac(&self) -> Option<MacAddr> {
        self.mac.get().flatten()
    }
}

/// Tells the event loop that a source which returned `io::ErrorKind::WouldBlock` may be
/// readable now, from any thread.
///
/// A session whose source returns `WouldBlock` parks: it keeps answering retransmissions
/// but reads nothing until [`notify`](Notifier::notify) is called (or, if blocks are in
/// flight, until its retransmission timer fires). With nothing in flight, a source that
/// stays pending past the server's source timeout ends the session with
/// [`Outcome::SourceStalled`](crate::session::Outcome::SourceStalled).
///
/// Notifying costs one lock and, at most, one write to the loop's eventfd; notifying a
/// session that has ended, or one that is not blocked, does nothing.
#[derive(Clone)]
pub struct Notifier {
    target: Option<(Arc<dyn ReadySink>, SessionId)>,
}

/// Where notifications go: the server's queue of sessions to resume.
pub(crate) trait ReadySink: Send + Sync {
    /// Queues `session` and wakes the loop.
    fn ready(&self, session: SessionId);
}

impl Notifier {
    /// A notifier attached to nothing (for sources used outside a server, and tests):
    /// `notify` does nothing.
    pub fn detached() -> Notifier {
        Notifier { target: None }
    }

    pub(crate) fn new(sink: Arc<dyn ReadySink>, session: SessionId) -> Notifier {
        Notifier {
            target: Some((sink, session)),
        }
    }

    /// Asks the loop to try the session's source again.
    pub fn notify(&self) {
        if let Some((sink, session)) = &self.target {
            sink.ready(*session);
        }
    }
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Some((_, session)) => write!(f, "Notifier({session:?})"),
            None => f.write_str("Notifier(detached)"),
        }
    }
}

/// A refusal: the client gets an ERROR with this code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The TFTP error code.
    pub code: ErrorCode,
    /// The message sent to the client. Never put server paths here.
    pub message: Cow<'static, str>,
    /// The refusal is temporary and due to a resource that running sessions hold (file
    /// descriptors): the server keeps the request, sends nothing, and asks the handler
    /// again once a session has ended (or after a second). See [`Reject::retry_later`].
    pub retry_later: bool,
}

impl Reject {
    /// A refusal with any code and message.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Reject {
        Reject {
            code,
            message: message.into(),
            retry_later: false,
        }
    }

    /// A temporary refusal for lack of file descriptors: nothing is sent; the request
    /// is retried when a session ends (or after a second). `code` and `message` say what
    /// the refusal would be otherwise, e.g. for a handler wrapping this one.
    pub fn retry_later(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Reject {
        Reject {
            retry_later: true,
            ..Reject::new(code, message)
        }
    }

    /// ERROR 1 "file not found".
    pub fn not_found() -> Reject {
        Reject::new(ErrorCode::FileNotFound, "file not found")
    }

    /// ERROR 2 "access violation".
    pub fn access_violation() -> Reject {
        Reject::new(ErrorCode::AccessViolation, "access violation")
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ERROR {}: {}", self.code, self.message)
    }
}

/// Per-request logic plugged into the server.
pub trait Handler {
    /// Opens the data for `request`, or refuses it. Called once per new request, on the
    /// event-loop thread.
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject>;

    /// Called exactly once for every session that started, whatever its outcome.
    fn session_finished(&mut self, stats: &SessionStats) {
        let _ = stats;
    }

    /// Called every stats interval with the counters since the previous call.
    fn server_stats(&mut self, stats: &ServerStats) {
        let _ = stats;
    }
}

impl<H: Handler + ?Sized> Handler for Box<H> {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        (**self).open(request)
    }
    fn session_finished(&mut self, stats: &SessionStats) {
        (**self).session_finished(stats)
    }
    fn server_stats(&mut self, stats: &ServerStats) {
        (**self).server_stats(stats)
    }
}
