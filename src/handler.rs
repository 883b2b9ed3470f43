//! The [`Handler`] trait: decides, per request, where the bytes come from, and receives the
//! statistics (fbtftp's `get_handler` / `get_response_data` plus both stats callbacks).
//!
//! The handler runs on the event-loop thread, so its methods take `&mut self` and need no
//! locks; they must not block for long. A panic inside them ends only the request or
//! session concerned.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;

use crate::packet::{ErrorCode, Mode, Options};
use crate::response::ResponseData;
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
}

impl ReadRequest<'_> {
    /// The filename as text, with invalid UTF-8 replaced.
    pub fn filename_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.filename)
    }
}

/// A refusal: the client gets an ERROR with this code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// The TFTP error code.
    pub code: ErrorCode,
    /// The message sent to the client. Never put server paths here.
    pub message: Cow<'static, str>,
}

impl Reject {
    /// A refusal with any code and message.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Reject {
        Reject {
            code,
            message: message.into(),
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
