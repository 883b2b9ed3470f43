//! A TFTP read client as a pure state machine: [`ReadTransfer`] (RFC 1350, 2347, 2348, 2349
//! and 7440). No sockets, no clock.
//!
//! It is the other side of a [`Session`](crate::Session): the driver owns the socket and
//! the time, feeds in what arrives and sends what comes out. The test suites, the
//! simulator and the load generators drive it; so can any program that fetches files.
//!
//! # Call order
//!
//! 1. [`ReadTransfer::new`] queues the RRQ of a [`Request`].
//! 2. After creating it and after **every** input — [`handle_datagram`](ReadTransfer::handle_datagram),
//!    [`handle_timeout`](ReadTransfer::handle_timeout), [`abort`](ReadTransfer::abort) — the
//!    driver calls [`poll_transmit`](ReadTransfer::poll_transmit) and sends the datagram it
//!    returns, if any, to its [`destination`](Transmit::destination). At most one datagram
//!    waits at a time: an input replaces one that was not taken (a later ACK supersedes an
//!    earlier one).
//! 3. When the [`deadline`](ReadTransfer::deadline) passes, the driver calls
//!    `handle_timeout(now)`. Calling it early is harmless: nothing happens.
//! 4. [`outcome`](ReadTransfer::outcome) says when the transfer is over and how: the bytes
//!    received, or a [`ClientError`] that says what failed. A transfer that completed still
//!    answers a resent final block for as long as the driver keeps feeding it datagrams.
//!
//! Every input takes `now`; the client never reads the clock.
//!
//! # Behaviour
//!
//! - The first reply from the server's IP address, from any port, fixes the server's
//!   transfer ID; a datagram from any other address is ignored and counted
//!   ([`ClientStats::foreign`]).
//! - An OACK is checked against the request: every option in it was requested, `blksize`
//!   is within 8..=the value asked, `windowsize` within 1..=the value asked, `timeout` is the
//!   value asked, `tsize` is a number; options the client does not know (added with
//!   [`Request::option`]) may have any value. It is answered with ACK 0. A request without
//!   options is answered with DATA 1; so is one whose options the server ignores, and the
//!   RFC 1350 defaults (blksize 512, lock step) then apply.
//! - Block numbers are counted in 64 bits, so the wrap 65535 → 0 is seamless.
//! - ACKs: after `windowsize` blocks in order since the last ACK, and for the final (short)
//!   block. A block beyond the next one expected (a gap) is dropped and answered with an
//!   ACK of the last block held in order, once per gap: the server resumes after it
//!   (RFC 7440 §4). A block already held is dropped, except a repeat of the last one held:
//!   the server resent it because it did not see its ACK, so it is acknowledged again (in
//!   lock step this is the classic RFC 1350 client). A repeated OACK before any DATA is
//!   answered with ACK 0 again.
//! - The client has its own timer ([`Settings::timeout`]): when nothing new arrived for
//!   that long, it sends the RRQ again (no reply yet) or the ACK of the last block held in
//!   order (the window restarts after it). After [`Settings::retries`] such resends without
//!   progress, one more expiry ends the transfer with [`ClientError::TimedOut`], silently.
//! - After the final block the transfer is complete. It answers up to [`Settings::linger`]
//!   retransmissions of the final block with the final ACK (the server did not see it); it
//!   sets no timer for that: the driver decides how long to listen.
//! - An ERROR from the server ends the transfer ([`ClientError::Server`]) without a reply.
//!   A server that breaks the protocol ends it with [`ClientError::Protocol`]; the client
//!   then sends ERROR 8 for an unacceptable OACK (RFC 2347), ERROR 4 otherwise.
//! - The driver may end a transfer itself with an ERROR at any point, up to refusing the
//!   final block ([`abort`](ReadTransfer::abort)). A UEFI-style size probe asks for
//!   `tsize`, reads it from the OACK and aborts with ERROR 8 instead of sending ACK 0.
//! - The payload is kept ([`data`](ReadTransfer::data)) unless [`Settings::keep_payload`]
//!   is off; either way [`handle_datagram`](ReadTransfer::handle_datagram) returns each new
//!   block's payload in order ([`Event::Data`]), to check or store without a copy. A
//!   netascii payload is kept as it came on the wire (CR LF, CR NUL), not translated back.
//!
//! # Example
//!
//! A transfer from an in-memory [`Session`](crate::Session), every datagram delivered at
//! once:
//!
//! ```
//! use std::time::Instant;
//! use dyntftp::client::{ReadTransfer, Request, Settings};
//! use dyntftp::{BytesSource, Mode, Output, Packet, Session, SessionConfig};
//!
//! let now = Instant::now();
//! let server = "192.0.2.1:69".parse()?;
//! let tid = "192.0.2.1:40000".parse()?; // the session's own port
//! let request = Request::new("hello.txt", Mode::Octet).blksize(8).windowsize(4).tsize();
//! let mut client = ReadTransfer::new(now, server, &request, Settings::default());
//!
//! // The RRQ goes to the server, which starts a session.
//! let rrq = client.poll_transmit().expect("the RRQ");
//! let Ok(Packet::Rrq(rrq)) = Packet::parse(rrq.contents) else { unreachable!() };
//! let source = Box::new(BytesSource::new(b"hello, sans-IO world".to_vec()));
//! let mut session = Session::new(now, rrq.options, Mode::Octet, source, SessionConfig::default());
//!
//! while client.outcome().is_none() {
//!     match session.poll_output(1) {
//!         Output::Transmit(transmit) => {
//!             client.handle_datagram(now, tid, transmit.contents);
//!             if let Some(ack) = client.poll_transmit() {
//!                 session.handle_datagram(now, ack.contents);
//!             }
//!         }
//!         Output::Wait(_) | Output::Done(_) => break,
//!     }
//! }
//! assert_eq!(client.outcome(), Some(Ok(20)));
//! assert_eq!(client.data(), b"hello, sans-IO world");
//! assert_eq!(client.oack().and_then(|oack| oack.tsize), Some(20));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::options::{parse_decimal, DEFAULT_BLKSIZE, MIN_BLKSIZE};
use crate::packet::{
    push_cstr, write_error, ErrorCode, Mode, Opcode, Options, Packet, ParseError, TftpOption,
};

/// Appends a read request to `out`: `filename` and `mode`, then the options (name, value)
/// in the given order. A NUL inside a string cuts it short.
pub fn write_rrq<'o, I>(out: &mut Vec<u8>, filename: &[u8], mode: &str, options: I)
where
    I: IntoIterator<Item = (&'o str, &'o str)>,
{
    out.extend_from_slice(&Opcode::Rrq.to_u16().to_be_bytes());
    push_cstr(out, filename);
    push_cstr(out, mode.as_bytes());
    for (name, value) in options {
        push_cstr(out, name.as_bytes());
        push_cstr(out, value.as_bytes());
    }
}

/// Appends an ACK for `block` to `out`.
pub fn write_ack(out: &mut Vec<u8>, block: u16) {
    out.extend_from_slice(&ack_packet(block));
}

/// The four bytes of an ACK for `block`.
fn ack_packet(block: u16) -> [u8; 4] {
    let [op_hi, op_lo] = Opcode::Ack.to_u16().to_be_bytes();
    let [hi, lo] = block.to_be_bytes();
    [op_hi, op_lo, hi, lo]
}

/// What to ask the server for: a read request, encoded once.
///
/// Built with [`new`](Self::new) and the option methods, in the order the options should
/// appear on the wire; cloning it is cheap (the datagram is shared), so one request can
/// start any number of transfers. The filename must not be empty, and a NUL inside any
/// string cuts it short.
///
/// ```
/// use dyntftp::client::Request;
/// use dyntftp::Mode;
///
/// let request = Request::new("pxelinux.0", Mode::Octet).blksize(1468).tsize();
/// assert_eq!(request.as_bytes(), b"\x00\x01pxelinux.0\x00octet\x00blksize\x001468\x00tsize\x000\x00");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    rrq: Arc<[u8]>,
    asked: Asked,
}

impl Request {
    /// A request for `filename` in `mode`, without options.
    pub fn new(filename: impl AsRef<[u8]>, mode: Mode) -> Request {
        Request::with_mode_name(filename, mode.as_str())
    }

    /// A request for `filename` with the mode spelled as given: in any case, or a mode
    /// the server may not know (for testing servers). The client treats the data the same
    /// whatever the mode: it keeps the bytes as they come.
    pub fn with_mode_name(filename: impl AsRef<[u8]>, mode: &str) -> Request {
        let mut rrq = Vec::new();
        write_rrq(&mut rrq, filename.as_ref(), mode, []);
        Request::from_rrq(rrq)
    }

    /// Asks for `blksize` bytes per block (RFC 2348).
    pub fn blksize(self, blksize: u16) -> Request {
        self.option("blksize", &blksize.to_string())
    }

    /// Asks for a window of `blocks` blocks per ACK (RFC 7440).
    pub fn windowsize(self, blocks: u16) -> Request {
        self.option("windowsize", &blocks.to_string())
    }

    /// Asks for the transfer size (RFC 2349), as `tsize 0`.
    pub fn tsize(self) -> Request {
        self.option("tsize", "0")
    }

    /// Asks the server to retransmit after `seconds` (RFC 2349).
    pub fn timeout(self, seconds: u8) -> Request {
        self.option("timeout", &seconds.to_string())
    }

    /// Adds any option, as it is. `blksize`, `windowsize`, `tsize` and `timeout` added here
    /// are checked as with their own methods (the first occurrence counts, as on the
    /// server); the server may acknowledge any other requested option with any value.
    pub fn option(self, name: &str, value: &str) -> Request {
        let mut rrq = self.rrq.to_vec();
        push_cstr(&mut rrq, name.as_bytes());
        push_cstr(&mut rrq, value.as_bytes());
        Request::from_rrq(rrq)
    }

    /// The RRQ datagram.
    pub fn as_bytes(&self) -> &[u8] {
        &self.rrq
    }

    fn from_rrq(rrq: Vec<u8>) -> Request {
        let asked = match Packet::parse(&rrq) {
            Ok(Packet::Rrq(request)) => Asked::from_options(request.options),
            _ => Asked::default(),
        };
        Request {
            rrq: rrq.into(),
            asked,
        }
    }

    /// Whether the request carries option `name` (case-insensitive).
    fn asks_for(&self, name: &[u8]) -> bool {
        matches!(Packet::parse(&self.rrq), Ok(Packet::Rrq(request))
            if request.options.iter().any(|o| o.name.eq_ignore_ascii_case(name)))
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Packet::parse(&self.rrq) {
            Ok(Packet::Rrq(request)) => f
                .debug_struct("Request")
                .field("filename", &String::from_utf8_lossy(request.filename))
                .field("mode", &String::from_utf8_lossy(request.mode_name))
                .field("options", &request.options)
                .finish(),
            _ => f.debug_tuple("Request").field(&self.rrq).finish(),
        }
    }
}

/// The options a request asked for that the client checks the OACK against (the first
/// occurrence of each; `None` when absent or not a decimal number).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Asked {
    any: bool,
    blksize: Option<u64>,
    windowsize: Option<u64>,
    tsize: bool,
    timeout: Option<u64>,
}

impl Asked {
    fn from_options(options: Options<'_>) -> Asked {
        let first = |name: &str| options.iter().find(|o| o.is(name));
        let number = |name: &str| first(name).and_then(|o| parse_decimal(o.value));
        Asked {
            any: !options.is_empty(),
            blksize: number("blksize"),
            windowsize: number("windowsize"),
            tsize: first("tsize").is_some(),
            timeout: number("timeout"),
        }
    }
}

/// Client policy: timers, retries, what is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long without anything new before the RRQ or the last ACK is sent again.
    /// Default 1 s.
    pub timeout: Duration,
    /// Resends without progress before giving up (at the next expiry). Default 5.
    pub retries: u32,
    /// Retransmissions of the final block answered with the final ACK after the end.
    /// Default 2.
    pub linger: u32,
    /// Keep the payload for [`ReadTransfer::data`]. Off, the transfer only counts the bytes
    /// (a load generator checks each [`Event::Data`] as it comes). Default true.
    pub keep_payload: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            timeout: Duration::from_secs(1),
            retries: 5,
            linger: 2,
            keep_payload: true,
        }
    }
}

/// A datagram to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// Where to: the server's request address for the RRQ, its transfer ID for the rest.
    pub destination: SocketAddr,
    /// The datagram.
    pub contents: &'a [u8],
}

/// What a datagram brought, returned by [`ReadTransfer::handle_datagram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The server's OACK, accepted: its values are in [`ReadTransfer::oack`], and ACK 0 is
    /// queued (call [`ReadTransfer::abort`] now instead to probe the size).
    Oack(Options<'a>),
    /// The payload of the next block in order (already counted and, if so set, kept).
    Data(&'a [u8]),
}

/// The options the server acknowledged in its OACK (`None`: left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Acknowledged {
    /// Bytes per block.
    pub blksize: Option<u16>,
    /// Blocks per window.
    pub windowsize: Option<u16>,
    /// The transfer size.
    pub tsize: Option<u64>,
    /// The server's retransmission interval, in seconds.
    pub timeout: Option<u8>,
}

/// Counters of one transfer, beyond the blocks and bytes received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Timer expiries that sent the RRQ or the last ACK again.
    pub timer_resends: u64,
    /// ACKs of the last block held in order, sent because a later block arrived (once per
    /// gap).
    pub gap_acks: u64,
    /// ACKs sent again for a repeated OACK or a repeat of the last block held in order.
    pub repeat_acks: u64,
    /// Final ACKs sent again after the end, for a resent final block.
    pub linger_acks: u64,
    /// Blocks received again and dropped without a reply (older than the last one held),
    /// and OACKs repeated after DATA began.
    pub duplicates: u64,
    /// Datagrams from an address other than the server's transfer ID, ignored.
    pub foreign: u64,
}

/// Why a transfer failed.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The server sent an ERROR.
    Server {
        /// Its code.
        code: ErrorCode,
        /// Its message (invalid UTF-8 replaced).
        message: String,
    },
    /// Nothing new arrived for [`Settings::retries`] resends and one more timeout.
    TimedOut,
    /// The server broke the protocol; the client told it with an ERROR.
    Protocol(Violation),
    /// The driver ended the transfer with [`ReadTransfer::abort`], sending this code.
    Aborted(ErrorCode),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Server { code, message } => {
                write!(f, "server error {}: {message}", code.to_u16())
            }
            ClientError::TimedOut => f.write_str("timed out"),
            ClientError::Protocol(violation) => write!(f, "protocol violation: {violation}"),
            ClientError::Aborted(code) => write!(f, "aborted with error {}", code.to_u16()),
        }
    }
}

impl std::error::Error for ClientError {}

/// How the server broke the protocol.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A datagram that does not parse.
    Malformed(ParseError),
    /// A packet that has no place here: a request or an ACK, an OACK to a request without
    /// options or after DATA without one.
    Unexpected(Opcode),
    /// An OACK option that was not requested, or whose value is not what was asked.
    Option {
        /// The option's name, as sent.
        name: String,
        /// Its value, as sent.
        value: String,
    },
    /// A DATA block longer than the block size.
    Oversize {
        /// The block (counted from 1, not wrapped).
        block: u64,
        /// Its payload length.
        len: usize,
        /// The block size in effect.
        blksize: u16,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Malformed(e) => write!(f, "malformed packet: {e}"),
            Violation::Unexpected(opcode) => write!(f, "unexpected {opcode:?}"),
            Violation::Option { name, value } => write!(f, "bad OACK option {name}={value}"),
            Violation::Oversize {
                block,
                len,
                blksize,
            } => write!(f, "DATA {block} carries {len} bytes, blksize is {blksize}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The RRQ is out; waiting for the OACK (or DATA 1).
    Requesting,
    /// Receiving DATA.
    Receiving,
    /// Got the final block (and lingers).
    Complete,
    /// Failed: why is in `failure`.
    Failed,
}

/// The datagram waiting for [`ReadTransfer::poll_transmit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Nothing,
    Rrq,
    /// The ACK in `ack`.
    Ack,
    /// The ERROR in `error`.
    Error,
}

/// One read transfer, client side. See the [module documentation](self) for the call order.
pub struct ReadTransfer {
    server: SocketAddr,
    rrq: Request,
    settings: Settings,
    state: State,
    failure: Option<ClientError>,
    /// The server's transfer ID, fixed by its first reply.
    peer: Option<SocketAddr>,
    oack: Option<Acknowledged>,
    blksize: u16,
    window: u16,
    /// Blocks received in order (the next one expected is `blocks + 1`).
    blocks: u64,
    bytes: u64,
    data: Vec<u8>,
    /// In-order blocks since the last ACK.
    since_ack: u64,
    /// A gap was acknowledged since the last in-order block.
    gap_acked: bool,
    deadline: Option<Instant>,
    /// Timer resends since the last progress.
    resends: u32,
    linger_left: u32,
    pending: Pending,
    ack: [u8; 4],
    error: Vec<u8>,
    stats: ClientStats,
}

impl ReadTransfer {
    /// Starts a transfer of `request` from the server at `server`: the RRQ is queued.
    #[inline]
    pub fn new(now: Instant, server: SocketAddr, request: &Request, settings: Settings) -> Self {
        ReadTransfer {
            server,
            rrq: request.clone(),
            settings,
            state: State::Requesting,
            failure: None,
            peer: None,
            oack: None,
            blksize: DEFAULT_BLKSIZE,
            window: 1,
            blocks: 0,
            bytes: 0,
            data: Vec::new(),
            since_ack: 0,
            gap_acked: false,
            deadline: Some(now + settings.timeout),
            resends: 0,
            linger_left: 0,
            pending: Pending::Rrq,
            ack: ack_packet(0),
            error: Vec::new(),
            stats: ClientStats::default(),
        }
    }

    /// Feeds a datagram that came from `from`. Returns what it brought that the driver may
    /// want to look at: the accepted OACK, or the payload of the next block in order.
    #[inline]
    pub fn handle_datagram<'d>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &'d [u8],
    ) -> Option<Event<'d>> {
        match self.peer {
            Some(peer) if peer == from => {}
            None if from.ip().to_canonical() == self.server.ip().to_canonical() => {
                if self.state == State::Requesting {
                    self.peer = Some(from);
                }
            }
            _ => {
                self.stats.foreign += 1;
                return None;
            }
        }
        match self.state {
            State::Requesting | State::Receiving => {}
            State::Complete => {
                if let Ok(Packet::Data { block, .. }) = Packet::parse(datagram) {
                    self.linger(block);
                }
                return None;
            }
            State::Failed => return None,
        }
        match Packet::parse(datagram) {
            Ok(Packet::Oack(options)) => self.on_oack(now, options),
            Ok(Packet::Data { block, data }) => self.on_data(now, block, data),
            Ok(Packet::Error { code, message }) => {
                self.pending = Pending::Nothing;
                self.fail(ClientError::Server {
                    code,
                    message: String::from_utf8_lossy(message).into_owned(),
                });
                None
            }
            Ok(other) => self.violation(Violation::Unexpected(other.opcode())),
            Err(e) => self.violation(Violation::Malformed(e)),
        }
    }

    /// Tells the transfer that time has passed. Before the deadline it does nothing; at or
    /// after it, it resends the RRQ or the last ACK, or gives up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        if self.resends >= self.settings.retries {
            self.pending = Pending::Nothing;
            self.fail(ClientError::TimedOut);
            return;
        }
        self.resends += 1;
        self.stats.timer_resends += 1;
        if self.state == State::Requesting {
            self.pending = Pending::Rrq;
        } else {
            self.queue_ack(self.blocks);
            self.gap_acked = false;
        }
        self.deadline = Some(now + self.settings.timeout);
    }

    /// Ends the transfer with an ERROR to the server (`code`, `message`), in place of
    /// anything not yet taken from [`poll_transmit`](Self::poll_transmit); nothing is sent
    /// when the server has not answered yet. A transfer that just completed can still be
    /// aborted while its final ACK was not taken (the driver refuses the last block).
    /// Does nothing once the transfer failed, or completed and its final ACK was taken.
    pub fn abort(&mut self, code: ErrorCode, message: &str) {
        match self.state {
            State::Requesting | State::Receiving => {}
            State::Complete if self.pending == Pending::Ack => {}
            State::Complete | State::Failed => return,
        }
        self.queue_error(code, message);
        self.fail(ClientError::Aborted(code));
    }

    /// The datagram to send now, if any. Call after every input.
    #[inline]
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        let pending = std::mem::replace(&mut self.pending, Pending::Nothing);
        let (destination, contents): (SocketAddr, &[u8]) = match pending {
            Pending::Nothing => return None,
            Pending::Rrq => (self.server, self.rrq.as_bytes()),
            Pending::Ack => (self.peer?, &self.ack),
            Pending::Error => (self.peer?, &self.error),
        };
        Some(Transmit {
            destination,
            contents,
        })
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next; `None` once the
    /// transfer is over.
    #[inline]
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// How the transfer ended: the payload bytes received, or what failed. `None` while it
    /// runs.
    #[inline]
    pub fn outcome(&self) -> Option<Result<u64, &ClientError>> {
        match self.state {
            State::Requesting | State::Receiving => None,
            State::Complete => Some(Ok(self.bytes)),
            State::Failed => self.failure.as_ref().map(Err),
        }
    }

    /// The server's request address, where the RRQ goes.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The server's transfer ID, once it answered.
    #[inline]
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// What the server's OACK acknowledged; `None` before it, or when the server answered
    /// with DATA directly.
    #[inline]
    pub fn oack(&self) -> Option<Acknowledged> {
        self.oack
    }

    /// The block size in effect.
    #[inline]
    pub fn blksize(&self) -> u16 {
        self.blksize
    }

    /// The window in effect, in blocks.
    #[inline]
    pub fn window(&self) -> u16 {
        self.window
    }

    /// Blocks received in order so far (not wrapped).
    #[inline]
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Payload bytes received in order so far.
    #[inline]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The payload received in order (empty when [`Settings::keep_payload`] is off).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Takes the payload received in order.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }

    /// The counters.
    #[inline]
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    fn on_oack<'d>(&mut self, now: Instant, options: Options<'d>) -> Option<Event<'d>> {
        match self.state {
            State::Requesting => {}
            // Our ACK 0 was lost, or is late, and the server resent its OACK.
            State::Receiving if self.oack.is_some() && self.blocks == 0 => {
                self.stats.repeat_acks += 1;
                self.queue_ack(0);
                return None;
            }
            State::Receiving if self.oack.is_some() => {
                self.stats.duplicates += 1;
                return None;
            }
            _ => return self.violation(Violation::Unexpected(Opcode::Oack)),
        }
        if !self.rrq.asked.any {
            return self.violation(Violation::Unexpected(Opcode::Oack));
        }
        let mut acknowledged = Acknowledged::default();
        for option in options {
            if !self.accept(option, &mut acknowledged) {
                return self.violation(Violation::Option {
                    name: String::from_utf8_lossy(option.name).into_owned(),
                    value: String::from_utf8_lossy(option.value).into_owned(),
                });
            }
        }
        self.oack = Some(acknowledged);
        self.blksize = acknowledged.blksize.unwrap_or(DEFAULT_BLKSIZE);
        self.window = acknowledged.windowsize.unwrap_or(1);
        self.state = State::Receiving;
        self.progress(now);
        self.queue_ack(0);
        Some(Event::Oack(options))
    }

    /// Checks one OACK option against the request and records it; false when it is not
    /// acceptable.
    fn accept(&self, option: TftpOption<'_>, acknowledged: &mut Acknowledged) -> bool {
        let asked = &self.rrq.asked;
        let value = parse_decimal(option.value);
        if option.is("blksize") {
            let valid = value.filter(|&v| {
                v >= u64::from(MIN_BLKSIZE) && asked.blksize.is_some_and(|max| v <= max)
            });
            acknowledged.blksize = valid.and_then(|v| u16::try_from(v).ok());
            acknowledged.blksize.is_some()
        } else if option.is("windowsize") {
            let valid = value.filter(|&v| v >= 1 && asked.windowsize.is_some_and(|max| v <= max));
            acknowledged.windowsize = valid.and_then(|v| u16::try_from(v).ok());
            acknowledged.windowsize.is_some()
        } else if option.is("tsize") {
            acknowledged.tsize = value.filter(|_| asked.tsize);
            acknowledged.tsize.is_some()
        } else if option.is("timeout") {
            let valid = value.filter(|&v| Some(v) == asked.timeout);
            acknowledged.timeout = valid.and_then(|v| u8::try_from(v).ok());
            acknowledged.timeout.is_some()
        } else {
            self.rrq.asks_for(option.name)
        }
    }

    #[inline]
    fn on_data<'d>(&mut self, now: Instant, wire: u16, payload: &'d [u8]) -> Option<Event<'d>> {
        if self.state == State::Requesting {
            // DATA 1 without an OACK: no options were asked for, or the server ignored them.
            self.state = State::Receiving;
        }
        let expected = self.blocks + 1;
        let block = unwrap_block(expected, wire);
        if payload.len() > usize::from(self.blksize) {
            return self.violation(Violation::Oversize {
                block,
                len: payload.len(),
                blksize: self.blksize,
            });
        }
        if block > expected {
            if !self.gap_acked {
                self.gap_acked = true;
                self.stats.gap_acks += 1;
                self.queue_ack(self.blocks);
            }
            return None;
        }
        if block < expected {
            if block == self.blocks {
                self.stats.repeat_acks += 1;
                self.queue_ack(block);
            } else {
                self.stats.duplicates += 1;
            }
            return None;
        }
        self.gap_acked = false;
        self.blocks = block;
        self.bytes += payload.len() as u64;
        if self.settings.keep_payload {
            self.data.extend_from_slice(payload);
        }
        self.since_ack += 1;
        self.progress(now);
        if payload.len() < usize::from(self.blksize) {
            self.queue_ack(block);
            self.linger_left = self.settings.linger;
            self.state = State::Complete;
            self.deadline = None;
        } else if self.since_ack >= u64::from(self.window) {
            self.queue_ack(block);
        }
        Some(Event::Data(payload))
    }

    /// A DATA after the end: a resent final block is acknowledged again, a few times.
    fn linger(&mut self, wire: u16) {
        if unwrap_block(self.blocks + 1, wire) == self.blocks && self.linger_left > 0 {
            self.linger_left -= 1;
            self.stats.linger_acks += 1;
            self.queue_ack(self.blocks);
        }
    }

    /// The server broke the protocol: tell it, and end.
    fn violation<'d>(&mut self, violation: Violation) -> Option<Event<'d>> {
        let (code, message) = match violation {
            Violation::Option { .. } => (ErrorCode::OptionNegotiation, "unacceptable OACK"),
            _ => (ErrorCode::IllegalOperation, "illegal TFTP operation"),
        };
        self.queue_error(code, message);
        self.fail(ClientError::Protocol(violation));
        None
    }

    /// Something new arrived: the timer and the retry budget start over.
    #[inline]
    fn progress(&mut self, now: Instant) {
        self.resends = 0;
        self.deadline = Some(now + self.settings.timeout);
    }

    #[inline]
    fn queue_ack(&mut self, block: u64) {
        self.ack = ack_packet(block as u16);
        self.pending = Pending::Ack;
        self.since_ack = 0;
    }

    fn queue_error(&mut self, code: ErrorCode, message: &str) {
        self.pending = Pending::Nothing;
        if self.peer.is_some() {
            self.error.clear();
            write_error(&mut self.error, code, message);
            self.pending = Pending::Error;
        }
    }

    fn fail(&mut self, failure: ClientError) {
        self.state = State::Failed;
        self.failure = Some(failure);
        self.deadline = None;
    }
}

impl fmt::Debug for ReadTransfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadTransfer")
            .field("state", &self.state)
            .field("failure", &self.failure)
            .field("peer", &self.peer)
            .field("blksize", &self.blksize)
            .field("window", &self.window)
            .field("blocks", &self.blocks)
            .field("bytes", &self.bytes)
            .field("deadline", &self.deadline)
            .field("resends", &self.resends)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The 64-bit block number congruent to `wire` modulo 65536 that is closest to `reference`
/// (never below 0).
fn unwrap_block(reference: u64, wire: u16) -> u64 {
    let delta = i64::from(wire.wrapping_sub(reference as u16) as i16);
    reference
        .checked_add_signed(delta)
        .unwrap_or(u64::from(wire))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::write_oack;
    use crate::response::BytesSource;
    use crate::session::{Outcome, Output, Session, SessionConfig};

    const SERVER: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        69,
    );
    const TID: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
        50_000,
    );

    fn data(block: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 3];
        out.extend_from_slice(&block.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn oack(options: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        write_oack(&mut out, options.iter().copied());
        out
    }

    fn ack(block: u16) -> Vec<u8> {
        ack_packet(block).to_vec()
    }

    fn error(code: ErrorCode, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write_error(&mut out, code, message);
        out
    }

    /// What the client sends now: destination and bytes.
    fn sent(client: &mut ReadTransfer) -> Option<(SocketAddr, Vec<u8>)> {
        client
            .poll_transmit()
            .map(|t| (t.destination, t.contents.to_vec()))
    }

    /// A client whose RRQ was taken.
    fn started(now: Instant, request: &Request, settings: Settings) -> ReadTransfer {
        let mut client = ReadTransfer::new(now, SERVER, request, settings);
        assert_eq!(
            sent(&mut client),
            Some((SERVER, request.as_bytes().to_vec()))
        );
        assert_eq!(sent(&mut client), None);
        client
    }

    fn octet() -> Request {
        Request::new("f", Mode::Octet)
    }

    #[test]
    fn writers_produce_parseable_packets() {
        let mut out = Vec::new();
        write_rrq(&mut out, b"a/b", "octet", [("windowsize", "16")]);
        assert_eq!(out, b"\x00\x01a/b\x00octet\x00windowsize\x0016\x00");
        out.clear();
        write_ack(&mut out, 7);
        assert_eq!(out, b"\x00\x04\x00\x07");
        assert_eq!(Packet::parse(&out), Ok(Packet::Ack { block: 7 }));
    }

    #[test]
    fn a_mode_is_sent_as_spelled() {
        let request = Request::with_mode_name("f", "NetASCII").blksize(8);
        assert_eq!(
            request.as_bytes(),
            b"\x00\x01f\x00NetASCII\x00blksize\x008\x00"
        );
        assert_eq!(
            Request::new("f", Mode::Octet),
            Request::with_mode_name("f", "octet")
        );
    }

    #[test]
    fn request_encodes_options_in_order() {
        let request = Request::new("dir/file", Mode::Netascii)
            .blksize(1428)
            .windowsize(16)
            .tsize()
            .timeout(3)
            .option("utimeout", "50000");
        assert_eq!(
            request.as_bytes(),
            b"\x00\x01dir/file\x00netascii\x00blksize\x001428\x00windowsize\x0016\x00\
              tsize\x000\x00timeout\x003\x00utimeout\x0050000\x00"
        );
        assert_eq!(
            format!("{request:?}"),
            "Request { filename: \"dir/file\", mode: \"netascii\", options: \
             [blksize=1428, windowsize=16, tsize=0, timeout=3, utimeout=50000] }"
        );
        // Cloning shares the datagram.
        assert_eq!(request.clone(), request);
    }

    #[test]
    fn lock_step_without_options() {
        let now = Instant::now();
        let mut client = started(now, &octet(), Settings::default());
        let block = [7u8; 512];
        let first = data(1, &block);
        let event = client.handle_datagram(now, TID, &first);
        assert_eq!(event, Some(Event::Data(&block[..])));
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        assert_eq!(client.peer(), Some(TID));
        assert_eq!(client.oack(), None);
        assert_eq!(client.outcome(), None);
        assert_eq!(
            client.handle_datagram(now, TID, &data(2, b"end")),
            Some(Event::Data(&b"end"[..]))
        );
        assert_eq!(sent(&mut client), Some((TID, ack(2))));
        assert_eq!(client.outcome(), Some(Ok(515)));
        assert_eq!(client.data().len(), 515);
        assert_eq!(client.deadline(), None);
        assert_eq!(client.blocks(), 2);
    }

    #[test]
    fn oack_within_the_request_is_applied_and_answered_with_ack_0() {
        let now = Instant::now();
        let request = octet()
            .blksize(1024)
            .windowsize(8)
            .tsize()
            .timeout(3)
            .option("UTIMEOUT", "50000");
        let mut client = started(now, &request, Settings::default());
        let reply = oack(&[
            ("BLKSIZE", "1000"),
            ("windowsize", "4"),
            ("tsize", "77"),
            ("timeout", "3"),
            ("utimeout", "49999"),
        ]);
        assert!(matches!(
            client.handle_datagram(now, TID, &reply),
            Some(Event::Oack(options)) if options.len() == 5
        ));
        assert_eq!(sent(&mut client), Some((TID, ack(0))));
        assert_eq!(
            client.oack(),
            Some(Acknowledged {
                blksize: Some(1000),
                windowsize: Some(4),
                tsize: Some(77),
                timeout: Some(3),
            })
        );
        assert_eq!((client.blksize(), client.window()), (1000, 4));

        // An OACK may leave options out: the defaults stay.
        let mut client = started(now, &request, Settings::default());
        client.handle_datagram(now, TID, &oack(&[("tsize", "5")]));
        assert_eq!((client.blksize(), client.window()), (512, 1));
    }

    #[test]
    fn oack_outside_the_request_is_a_violation_answered_with_error_8() {
        let now = Instant::now();
        let request = octet().blksize(1024).windowsize(8).timeout(3);
        let bad: [&[(&str, &str)]; 7] = [
            &[("blksize", "1025")],
            &[("blksize", "7")],
            &[("windowsize", "0")],
            &[("windowsize", "9")],
            &[("timeout", "4")],
            &[("tsize", "100")],
            &[("blksize", "x")],
        ];
        for options in bad {
            let mut client = started(now, &request, Settings::default());
            assert_eq!(client.handle_datagram(now, TID, &oack(options)), None);
            let (name, value) = options[0];
            assert_eq!(
                client.outcome(),
                Some(Err(&ClientError::Protocol(Violation::Option {
                    name: name.into(),
                    value: value.into()
                })))
            );
            let answer = sent(&mut client).expect("an ERROR");
            assert_eq!(
                answer,
                (
                    TID,
                    error(ErrorCode::OptionNegotiation, "unacceptable OACK")
                )
            );
            assert_eq!(client.deadline(), None);
        }
        // An OACK to a request without options.
        let mut client = started(now, &octet(), Settings::default());
        client.handle_datagram(now, TID, &oack(&[("blksize", "512")]));
        assert_eq!(
            client.outcome(),
            Some(Err(&ClientError::Protocol(Violation::Unexpected(
                Opcode::Oack
            ))))
        );
        assert_eq!(
            sent(&mut client),
            Some((
                TID,
                error(ErrorCode::IllegalOperation, "illegal TFTP operation")
            ))
        );
    }

    #[test]
    fn data_1_without_oack_uses_the_rfc_1350_defaults() {
        let now = Instant::now();
        let mut client = started(
            now,
            &octet().blksize(1428).windowsize(16),
            Settings::default(),
        );
        client.handle_datagram(now, TID, &data(1, &[1; 512]));
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        assert_eq!(
            (client.blksize(), client.window(), client.oack()),
            (512, 1, None)
        );
        // An OACK after that has no place.
        client.handle_datagram(now, TID, &oack(&[("blksize", "1428")]));
        assert!(matches!(
            client.outcome(),
            Some(Err(ClientError::Protocol(Violation::Unexpected(
                Opcode::Oack
            ))))
        ));
    }

    #[test]
    fn window_is_acked_after_window_blocks_and_on_the_final_block() {
        let now = Instant::now();
        let mut client = started(now, &octet().blksize(8).windowsize(4), Settings::default());
        client.handle_datagram(now, TID, &oack(&[("blksize", "8"), ("windowsize", "4")]));
        assert_eq!(sent(&mut client), Some((TID, ack(0))));
        for block in 1..=3 {
            client.handle_datagram(now, TID, &data(block, &[block as u8; 8]));
            assert_eq!(sent(&mut client), None, "block {block}");
        }
        client.handle_datagram(now, TID, &data(4, &[4; 8]));
        assert_eq!(sent(&mut client), Some((TID, ack(4))));
        client.handle_datagram(now, TID, &data(5, &[5; 8]));
        assert_eq!(sent(&mut client), None);
        client.handle_datagram(now, TID, &data(6, &[6; 2]));
        assert_eq!(sent(&mut client), Some((TID, ack(6))));
        assert_eq!(client.outcome(), Some(Ok(42)));
    }

    #[test]
    fn a_gap_is_acked_once_and_duplicates_only_of_the_last_block() {
        let now = Instant::now();
        let mut client = started(now, &octet().windowsize(4), Settings::default());
        client.handle_datagram(now, TID, &oack(&[("windowsize", "4")]));
        sent(&mut client);
        let full = [0u8; 512];
        client.handle_datagram(now, TID, &data(1, &full));
        // 2 is lost: 3 shows the gap (ACK 1, once), 4 is dropped quietly.
        assert_eq!(client.handle_datagram(now, TID, &data(3, &full)), None);
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        assert_eq!(client.handle_datagram(now, TID, &data(4, &full)), None);
        assert_eq!(sent(&mut client), None);
        // The server resumes from 2: a new window of four.
        for block in 2..=5 {
            client.handle_datagram(now, TID, &data(block, &full));
        }
        assert_eq!(sent(&mut client), Some((TID, ack(5))));
        // A repeat of the last block held is acknowledged again; older ones are not.
        client.handle_datagram(now, TID, &data(5, &full));
        assert_eq!(sent(&mut client), Some((TID, ack(5))));
        client.handle_datagram(now, TID, &data(3, &full));
        assert_eq!(sent(&mut client), None);
        let stats = *client.stats();
        assert_eq!(
            (stats.gap_acks, stats.repeat_acks, stats.duplicates),
            (1, 1, 1)
        );
        assert_eq!(client.blocks(), 5);
    }

    #[test]
    fn a_repeated_oack_is_answered_with_ack_0_until_data_comes() {
        let now = Instant::now();
        let mut client = started(now, &octet().tsize(), Settings::default());
        let reply = oack(&[("tsize", "600")]);
        assert!(client.handle_datagram(now, TID, &reply).is_some());
        assert_eq!(sent(&mut client), Some((TID, ack(0))));
        assert_eq!(client.handle_datagram(now, TID, &reply), None);
        assert_eq!(sent(&mut client), Some((TID, ack(0))));
        client.handle_datagram(now, TID, &data(1, &[0; 512]));
        sent(&mut client);
        assert_eq!(client.handle_datagram(now, TID, &reply), None);
        assert_eq!(sent(&mut client), None);
        assert_eq!(client.stats().repeat_acks, 1);
        assert_eq!(client.stats().duplicates, 1);
    }

    #[test]
    fn block_numbers_wrap_to_zero() {
        let now = Instant::now();
        let mut client = started(now, &octet().blksize(8), Settings::default());
        client.handle_datagram(now, TID, &oack(&[("blksize", "8")]));
        for block in 1..=65_537u64 {
            let datagram = data(block as u16, &[1; 8]);
            let event = client.handle_datagram(now, TID, &datagram);
            assert!(event.is_some(), "block {block}");
        }
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        // Wire block 0 is now 65536, a duplicate; wire block 2 is the next one.
        client.handle_datagram(now, TID, &data(0, &[1; 8]));
        assert_eq!(client.stats().duplicates, 1);
        client.handle_datagram(now, TID, &data(2, b""));
        assert_eq!(sent(&mut client), Some((TID, ack(2))));
        assert_eq!(client.outcome(), Some(Ok(65_537 * 8)));
        assert_eq!(client.blocks(), 65_538);
    }

    #[test]
    fn the_timer_resends_the_rrq_or_the_last_ack_then_gives_up() {
        let start = Instant::now();
        let settings = Settings {
            timeout: Duration::from_millis(100),
            retries: 2,
            ..Settings::default()
        };
        let mut client = started(start, &octet(), settings);
        let ms = |n| start + Duration::from_millis(n);
        assert_eq!(client.deadline(), Some(ms(100)));
        client.handle_timeout(ms(99));
        assert_eq!(sent(&mut client), None);
        client.handle_timeout(ms(100));
        assert_eq!(
            sent(&mut client),
            Some((SERVER, octet().as_bytes().to_vec()))
        );
        assert_eq!(client.deadline(), Some(ms(200)));
        // DATA 1 is progress: the budget starts over.
        client.handle_datagram(ms(150), TID, &data(1, &[0; 512]));
        sent(&mut client);
        assert_eq!(client.deadline(), Some(ms(250)));
        client.handle_timeout(ms(250));
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        // A duplicate is not progress.
        client.handle_datagram(ms(260), TID, &data(1, &[0; 512]));
        sent(&mut client);
        assert_eq!(client.deadline(), Some(ms(350)));
        client.handle_timeout(ms(350));
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        client.handle_timeout(ms(450));
        assert_eq!(sent(&mut client), None);
        assert_eq!(client.outcome(), Some(Err(&ClientError::TimedOut)));
        assert_eq!(client.deadline(), None);
        assert_eq!(client.stats().timer_resends, 3);
    }

    #[test]
    fn after_the_end_a_resent_final_block_is_acked_a_few_times() {
        let now = Instant::now();
        let settings = Settings {
            linger: 2,
            ..Settings::default()
        };
        let mut client = started(now, &octet(), settings);
        client.handle_datagram(now, TID, &data(1, b"short"));
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        for _ in 0..2 {
            assert_eq!(client.handle_datagram(now, TID, &data(1, b"short")), None);
            assert_eq!(sent(&mut client), Some((TID, ack(1))));
        }
        client.handle_datagram(now, TID, &data(1, b"short"));
        assert_eq!(sent(&mut client), None);
        // Anything else after the end is ignored.
        client.handle_datagram(now, TID, b"garbage");
        client.handle_datagram(now, TID, &error(ErrorCode::NotDefined, "late"));
        assert_eq!(sent(&mut client), None);
        assert_eq!(client.outcome(), Some(Ok(5)));
        assert_eq!(client.stats().linger_acks, 2);
    }

    #[test]
    fn a_server_error_ends_the_transfer_without_reply() {
        let now = Instant::now();
        let mut client = started(now, &octet(), Settings::default());
        client.handle_datagram(now, TID, &error(ErrorCode::FileNotFound, "nope"));
        assert_eq!(sent(&mut client), None);
        assert_eq!(
            client.outcome(),
            Some(Err(&ClientError::Server {
                code: ErrorCode::FileNotFound,
                message: "nope".into()
            }))
        );
        assert_eq!(client.deadline(), None);
        assert_eq!(
            client.outcome().unwrap().unwrap_err().to_string(),
            "server error 1: nope"
        );
    }

    #[test]
    fn violations_end_the_transfer_with_error_4() {
        let now = Instant::now();
        let cases: [(&[u8], Violation); 4] = [
            (b"\x00", Violation::Malformed(ParseError::Truncated)),
            (b"\x00\x04\x00\x01", Violation::Unexpected(Opcode::Ack)),
            (
                b"\x00\x01f\x00octet\x00",
                Violation::Unexpected(Opcode::Rrq),
            ),
            (
                &data(1, &[0; 513]),
                Violation::Oversize {
                    block: 1,
                    len: 513,
                    blksize: 512,
                },
            ),
        ];
        for (datagram, violation) in cases {
            let mut client = started(now, &octet(), Settings::default());
            assert_eq!(client.handle_datagram(now, TID, datagram), None);
            assert_eq!(
                client.outcome(),
                Some(Err(&ClientError::Protocol(violation)))
            );
            assert_eq!(
                sent(&mut client),
                Some((
                    TID,
                    error(ErrorCode::IllegalOperation, "illegal TFTP operation")
                ))
            );
        }
    }

    #[test]
    fn datagrams_from_elsewhere_are_ignored() {
        let now = Instant::now();
        let mut client = started(now, &octet(), Settings::default());
        // Before the first reply: any port of the server's address, no other address.
        let stranger: SocketAddr = "198.51.100.7:50000".parse().unwrap();
        assert_eq!(client.handle_datagram(now, stranger, &data(1, b"x")), None);
        assert_eq!(client.peer(), None);
        client.handle_datagram(now, TID, &data(1, &[0; 512]));
        sent(&mut client);
        // After it: that address and port only.
        let other_port: SocketAddr = "192.0.2.1:50001".parse().unwrap();
        assert_eq!(
            client.handle_datagram(now, other_port, &data(2, b"x")),
            None
        );
        assert_eq!(sent(&mut client), None);
        assert_eq!(client.outcome(), None);
        assert_eq!(client.stats().foreign, 2);
        // An IPv4-mapped IPv6 source is the same host.
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:50000".parse().unwrap();
        let mut client = started(now, &octet(), Settings::default());
        assert!(client
            .handle_datagram(now, mapped, &data(1, b"x"))
            .is_some());
    }

    #[test]
    fn abort_replaces_what_is_queued_and_ends() {
        let now = Instant::now();
        // A size probe: tsize from the OACK, ERROR 8 instead of ACK 0.
        let mut client = started(now, &octet().tsize(), Settings::default());
        client.handle_datagram(now, TID, &oack(&[("tsize", "9000")]));
        client.abort(ErrorCode::OptionNegotiation, "tsize probe");
        assert_eq!(
            sent(&mut client),
            Some((TID, error(ErrorCode::OptionNegotiation, "tsize probe")))
        );
        assert_eq!(
            client.outcome(),
            Some(Err(&ClientError::Aborted(ErrorCode::OptionNegotiation)))
        );
        assert_eq!(client.oack().and_then(|o| o.tsize), Some(9000));
        assert_eq!(client.deadline(), None);
        // Over is over.
        client.abort(ErrorCode::DiskFull, "again");
        assert_eq!(sent(&mut client), None);

        // The final block can be refused while its ACK was not taken; not after.
        let mut client = started(now, &octet(), Settings::default());
        client.handle_datagram(now, TID, &data(1, b"last"));
        assert_eq!(client.outcome(), Some(Ok(4)));
        client.abort(ErrorCode::DiskFull, "no room");
        assert_eq!(
            sent(&mut client),
            Some((TID, error(ErrorCode::DiskFull, "no room")))
        );
        assert_eq!(
            client.outcome(),
            Some(Err(&ClientError::Aborted(ErrorCode::DiskFull)))
        );
        let mut client = started(now, &octet(), Settings::default());
        client.handle_datagram(now, TID, &data(1, b"last"));
        assert_eq!(sent(&mut client), Some((TID, ack(1))));
        client.abort(ErrorCode::DiskFull, "too late");
        assert_eq!(sent(&mut client), None);
        assert_eq!(client.outcome(), Some(Ok(4)));

        // Before any reply there is nobody to tell.
        let mut client = ReadTransfer::new(now, SERVER, &octet(), Settings::default());
        client.abort(ErrorCode::NotDefined, "never mind");
        assert_eq!(sent(&mut client), None);
        assert!(client.outcome().is_some());
    }

    #[test]
    fn without_keep_payload_only_the_count_is_kept() {
        let now = Instant::now();
        let settings = Settings {
            keep_payload: false,
            ..Settings::default()
        };
        let mut client = started(now, &octet(), settings);
        assert_eq!(
            client.handle_datagram(now, TID, &data(1, b"abc")),
            Some(Event::Data(&b"abc"[..]))
        );
        assert_eq!(client.outcome(), Some(Ok(3)));
        assert!(client.data().is_empty());
        assert_eq!(client.bytes(), 3);
    }

    // -----------------------------------------------------------------------------------
    // Against the real session
    // -----------------------------------------------------------------------------------

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Dir {
        ToClient,
        ToServer,
    }

    /// A client and a session talking with no delay. Datagrams `lose` picks are dropped;
    /// when nothing is in flight, time jumps to the earlier deadline. `react` sees every
    /// event the client returns. Runs until both sides are over.
    fn converse(
        request: &Request,
        source: &[u8],
        lose: &mut dyn FnMut(Dir, &[u8]) -> bool,
        react: &mut dyn FnMut(&mut ReadTransfer, Event<'_>),
    ) -> (ReadTransfer, Session) {
        let mut now = Instant::now();
        let mut client = ReadTransfer::new(now, SERVER, request, Settings::default());
        let rrq = client.poll_transmit().expect("the RRQ");
        let Ok(Packet::Rrq(rrq)) = Packet::parse(rrq.contents) else {
            panic!("the RRQ does not parse");
        };
        let mode = rrq.mode().expect("a mode");
        let source = Box::new(BytesSource::new(source.to_vec()));
        let mut session = Session::new(now, rrq.options, mode, source, SessionConfig::default());
        let mut to_server: Vec<Vec<u8>> = Vec::new();
        for _ in 0..10_000_000 {
            let mut to_client = Vec::new();
            let session_done = loop {
                match session.poll_output(64) {
                    Output::Transmit(t) => to_client.extend(t.segments().map(<[u8]>::to_vec)),
                    Output::Wait(_) => break false,
                    Output::Done(_) => break true,
                }
            };
            for datagram in &to_client {
                if lose(Dir::ToClient, datagram) {
                    continue;
                }
                if let Some(event) = client.handle_datagram(now, TID, datagram) {
                    react(&mut client, event);
                }
                if let Some(t) = client.poll_transmit() {
                    assert_eq!(t.destination, TID);
                    to_server.push(t.contents.to_vec());
                }
            }
            let in_flight = !to_client.is_empty() || !to_server.is_empty();
            for datagram in to_server.drain(..) {
                if !lose(Dir::ToServer, &datagram) {
                    session.handle_datagram(now, &datagram);
                }
            }
            if in_flight {
                continue;
            }
            if session_done && client.outcome().is_some() {
                return (client, session);
            }
            let Some(next) = [session.deadline(), client.deadline()]
                .into_iter()
                .flatten()
                .min()
            else {
                return (client, session);
            };
            now = now.max(next);
            session.handle_timeout(now);
            client.handle_timeout(now);
            // The client's timer resends its RRQ (to the request port, where the session
            // already exists: nothing to deliver) or an ACK.
            if let Some(t) = client.poll_transmit() {
                if t.destination == TID {
                    to_server.push(t.contents.to_vec());
                }
            }
        }
        panic!("no end: {client:?} {session:?}");
    }

    fn fetch(request: &Request, source: &[u8]) -> (ReadTransfer, Session) {
        converse(request, source, &mut |_, _| false, &mut |_, _| {})
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn with_the_session_lock_step() {
        for len in [0, 1, 511, 512, 513, 3 * 512 + 100] {
            let source = pattern(len);
            let (client, session) = fetch(&octet(), &source);
            assert_eq!(client.outcome(), Some(Ok(len as u64)), "{len}");
            assert_eq!(client.data(), source);
            assert_eq!(session.stats().outcome, Some(Outcome::Completed));
            assert_eq!(session.stats().retransmits, 0);
        }
    }

    #[test]
    fn with_the_session_windows() {
        for (blksize, window, len) in [
            (512, 4, 10 * 512),
            (512, 4, 10 * 512 + 1),
            (1428, 16, 100_000),
            (8, 64, 8 * 64 * 3 + 5),
        ] {
            let request = octet().blksize(blksize).windowsize(window).tsize();
            let source = pattern(len);
            let (client, session) = fetch(&request, &source);
            assert_eq!(client.data(), source, "{blksize} {window} {len}");
            assert_eq!(
                client.oack(),
                Some(Acknowledged {
                    blksize: Some(blksize),
                    windowsize: Some(window),
                    tsize: Some(len as u64),
                    timeout: None
                })
            );
            let stats = session.stats();
            assert_eq!(stats.outcome, Some(Outcome::Completed));
            // One ACK per window (ACK 0 included), none repeated.
            let blocks = len as u64 / u64::from(blksize) + 1;
            assert_eq!(stats.acks, 1 + blocks.div_ceil(u64::from(window)));
            assert_eq!((stats.retransmits, stats.duplicate_acks), (0, 0));
        }
    }

    #[test]
    fn with_the_session_block_numbers_wrap() {
        let source = pattern(8 * 65_537 + 3);
        let request = octet().blksize(8).windowsize(16);
        let (client, session) = fetch(&request, &source);
        assert_eq!(client.blocks(), 65_538);
        assert_eq!(client.data(), source);
        assert_eq!(session.stats().outcome, Some(Outcome::Completed));
    }

    #[test]
    fn with_the_session_netascii_arrives_as_on_the_wire() {
        let text = b"line one\nline two\r\nbare\rend\n".repeat(40);
        let request = Request::new("f", Mode::Netascii).windowsize(4);
        let (client, session) = fetch(&request, &text);
        let mut wire = Vec::new();
        for &b in &text {
            match b {
                b'\n' => wire.extend_from_slice(b"\r\n"),
                b'\r' => wire.extend_from_slice(b"\r\0"),
                _ => wire.push(b),
            }
        }
        assert_eq!(client.data(), wire);
        assert_eq!(session.stats().outcome, Some(Outcome::Completed));
    }

    #[test]
    fn with_the_session_a_size_probe() {
        let request = octet().blksize(1468).tsize();
        let (client, session) = converse(
            &request,
            &pattern(9000),
            &mut |_, _| false,
            &mut |client, event| {
                if let Event::Oack(_) = event {
                    client.abort(ErrorCode::OptionNegotiation, "tsize probe");
                }
            },
        );
        assert_eq!(client.oack().and_then(|o| o.tsize), Some(9000));
        assert_eq!(
            client.outcome(),
            Some(Err(&ClientError::Aborted(ErrorCode::OptionNegotiation)))
        );
        assert_eq!(session.stats().outcome, Some(Outcome::Probe));
        assert_eq!(session.stats().packets_sent, 1);
    }

    #[test]
    fn with_the_session_losses_are_recovered_by_both_timers() {
        // Lock step, every tenth datagram either way lost: only timers recover (a window
        // would recover most losses with gap ACKs).
        let source = pattern(40 * 512 + 9);
        let mut n = 0;
        let (client, session) = converse(
            &octet(),
            &source,
            &mut |_, _| {
                n += 1;
                n % 10 == 0
            },
            &mut |_, _| {},
        );
        assert_eq!(client.data(), source);
        let stats = session.stats();
        assert!(
            matches!(
                stats.outcome,
                Some(Outcome::Completed | Outcome::FinalAckMissing)
            ),
            "{stats:?}"
        );
        assert!(stats.retransmits + stats.early_retransmits > 0, "{stats:?}");
        // A lost ACK makes the session resend the block, which the client acknowledges
        // again.
        assert!(client.stats().repeat_acks > 0, "{client:?}");
    }
}
