//! One read transfer as a pure state machine: no sockets, no clock.
//!
//! # Call order
//!
//! 1. [`Session::new`] negotiates the options and prepares the first packet (OACK or DATA 1).
//! 2. After creating it and after **every** input — [`handle_datagram`](Session::handle_datagram),
//!    [`handle_packet`](Session::handle_packet), [`handle_timeout`](Session::handle_timeout),
//!    [`handle_source_ready`](Session::handle_source_ready),
//!    [`handle_repeated_request`](Session::handle_repeated_request), [`abort`](Session::abort) — the
//!    driver calls [`poll_output`](Session::poll_output) until it returns
//!    [`Output::Wait`] or [`Output::Done`], sending every [`Output::Transmit`] to the peer.
//!    `poll_output` takes the most datagrams the driver can send with one system call: a
//!    driver with UDP generic segmentation offload asks for many and gets a window's DATA
//!    packets back to back ([`Transmit::segment_size`] apart); any other asks for one.
//! 3. When the wait deadline passes, the driver calls `handle_timeout(now)`. Calling it early
//!    is harmless: nothing happens.
//!
//! Every input takes `now`; the session never reads the clock, so tests drive it with a
//! virtual clock.
//!
//! # Behaviour
//!
//! - Starts with an OACK (then waits for ACK 0) when any option was accepted, else DATA 1.
//!   A source not open yet ([`ResponseData::poll_open`] pending: a
//!   [`Deferred`](crate::deferred::Deferred) one) holds that first answer: the session sends
//!   nothing, counts repeated requests and ignores ACKs until
//!   [`handle_source_ready`](Session::handle_source_ready) finds it open (the OACK then
//!   carries its size as `tsize`) or refused ([`Outcome::Refused`], its ERROR), or until
//!   [`SessionConfig::open_timeout`] (ERROR 0, [`Outcome::SourceStalled`]).
//! - Sends up to `window` blocks (RFC 7440), then waits. An ACK for the last block sent
//!   slides the window; an ACK for an earlier block of the window means the client lost
//!   the rest, so sending resumes right after the acknowledged block (go-back-N).
//! - **Sends caused by ACKs are clocked.** One ACK causes at most one go-back-N, and
//!   go-back-Ns of every cause (timer included) spend the tokens of one clock, a token
//!   bucket of [`GO_BACK_BURST`] refilled one per interval: a client that lost several
//!   blocks of one flight recovers each at once, while the long run stays at one go-back
//!   per interval. The interval is a round trip, the shorter of the smoothed round trip
//!   and the smoothed time earlier go-backs took to be answered
//!   ([`UNMEASURED_GO_BACK_INTERVAL`] before either is measured), never below
//!   [`MIN_GO_BACK_INTERVAL`] nor above the base timeout (the client's or ours,
//!   undoubled), [`SessionConfig::adaptive`] or not. An in-window ACK that finds no token
//!   only slides the window and releases blocks never sent before, up to
//!   `base + window`; the go-back it asked for is made when the clock allows one, unless
//!   an ACK of everything sent comes first. So the DATA one ACK releases is at most what
//!   it newly acknowledges plus one window, and in any span `d` ACKs cause at most
//!   `GO_BACK_BURST + d / MIN_GO_BACK_INTERVAL` go-backs: a blind attacker forging
//!   ACK 1, 2, 3, … faster than that no longer gets a window per ACK (counters:
//!   [`TransferStats::go_back_acks`], [`TransferStats::go_back_held`]).
//! - A duplicate ACK (of the last acknowledged block) is evidence that the next DATA was
//!   lost once that block has been out for the retransmission estimate (`srtt + max(100 µs,
//!   4 × rttvar)`, at least [`SessionConfig::min_rto`], from the first round-trip sample
//!   on; [`UNMEASURED_LOSS_EVIDENCE`] before any), counted from its first send and from
//!   the last go-back-N: then it goes back to it when the clock allows, so at most once
//!   per estimate, never once per duplicate, and never for the duplicate a client sends a
//!   round trip after a resend it did not need. With [`SessionConfig::adaptive`], a
//!   duplicate that comes sooner (a client that answers a gap at once) makes that go-back
//!   owed for when the estimate has passed, unless an ACK of everything sent comes
//!   first. Any older ACK never causes a
//!   send (Sorcerer's Apprentice). Resends come from the stored packets, without reading
//!   the source again.
//! - **Resends made on time back off until a round trip is measured** (Karn's algorithm,
//!   as TCP keeps a backed-off timer): each go-back a duplicate ACK's evidence makes, each
//!   owed go-back and each early retransmission doubles both the evidence a duplicate ACK
//!   needs and the early retransmission interval (never past the base timeout), and only
//!   an ACK of a block sent once — a round-trip sample — or a go-back answered within the
//!   estimate (the resend was needed, and the client keeps up: a loss on a lossy path),
//!   but not sooner than half a round trip (that answers the first send: the resend was
//!   needless), starts them over. Progress alone does not: a client that falls behind (a guest
//!   starved of CPU) acknowledges blocks that were all resent, so no sample shows how
//!   late it answers, and EDK2 answers each resend it did not need with a duplicate ACK
//!   that looks like fresh evidence — without the backoff, every go-back drew a window's
//!   worth of them and the server sent 40–90 times the file to a starved OVMF without
//!   ever finishing (`tests/starved.rs`).
//! - A repeated request ([`handle_repeated_request`](Session::handle_repeated_request))
//!   before the peer acknowledged anything says that the first reply (OACK or DATA 1) was
//!   lost: it is resent as if the timer had fired (a retry spent), at most once per
//!   go-back interval and clock token, so never more often than the timer schedule allows
//!   in all.
//! - Block numbers wrap 65535 → 0. A size that is an exact multiple of blksize ends with an
//!   empty DATA; an empty source is one empty DATA 1.
//! - Retries: exactly [`SessionConfig::retries`] retransmissions after the last progress,
//!   then the session ends with [`Outcome::TimedOut`] (or [`Outcome::FinalAckMissing`] when
//!   every block was sent and only the last ACK is missing). No ERROR is sent on timeout.
//!   The interval starts at the client's `timeout`/`utimeout` when it chose one, else at
//!   [`SessionConfig::timeout`], and doubles with every retry, up to 8 × that value: with
//!   `timeout 2` and 5 retries the sends go at 0, 2, 6, 14, 30 and 46 s.
//! - Whatever the schedule, a session ends after [`SessionConfig::progress_timeout`]
//!   without progress (an ACK that acknowledges something new; counted from the start
//!   before the first), silently with `TimedOut` or `FinalAckMissing` — or, when nothing is
//!   in flight and the source is not ready, with ERROR 0 and [`Outcome::SourceStalled`].
//!   With `timeout 2` and the defaults above that is at 60 s instead of 62 s; a spoofed
//!   request with `timeout 255` gets its first packet and nothing more, and ends at 60 s.
//! - Adaptive retransmission ([`SessionConfig::adaptive`]): the round-trip time is measured
//!   from every ACK of a packet sent once (Karn's rule: never from a resent one), smoothed
//!   as in RFC 6298, and once three samples are in, the estimate `srtt + max(100 µs, 4 ×
//!   rttvar)` (at least [`SessionConfig::min_rto`]) is used while it is below the
//!   timeout: a lost packet on a fast network costs a few round trips, not a second.
//!   With one or two samples the early timer waits 200 ms at least (they say little of
//!   how the round trip varies): a loss in the first windows, which a windowed client
//!   may answer only at its own timeout, costs that rather than the timeout.
//!   Nothing in the estimate is kept for good: after a slow outlier it follows the path
//!   back down within a few dozen samples. These early retransmissions
//!   double their interval each time (and stay doubled, progress or not, until a round
//!   trip is measured: see above) and stop once it reaches the timeout, so they are
//!   bounded, and they do not spend the retry budget; the full schedule above follows
//!   them unchanged. Before any measurement (a spoofed request is never acknowledged)
//!   only the full schedule runs. The client's negotiated timeout stays the upper bound.
//! - Memory: the ring of stored packets is allocated as blocks are read to be sent, never
//!   ahead of the window: a session waiting for ACK 0 holds no ring at all, one whose
//!   client went silent after ACK 0 holds at most one window
//!   ([`buffer_bytes`](Session::buffer_bytes) says how much).
//! - An ERROR from the client ends the session without a reply; code 8 right after our OACK
//!   is a size probe ([`Outcome::Probe`]). An ERROR that comes once the client
//!   acknowledged every byte of the file ([`Outcome::Completed`]: only an empty final
//!   block is unacknowledged, or, before the end was read, as many bytes as the source
//!   announced) is a client that closed after it had everything — GRUB stops reading at
//!   the size `tsize` promised, and a lost empty final DATA used to end its successful
//!   boot as `peer_error`. Any other ERROR is [`Outcome::PeerError`].
//! - A read error from the source sends ERROR 0 "error reading file" (ERROR 1 "file not
//!   found" for `io::ErrorKind::NotFound`, ERROR 2 "access violation" for
//!   `PermissionDenied`: a streamed source may learn that late) and ends with
//!   [`Outcome::ReadFailed`].
//! - A source that returns `WouldBlock` parks the session: it waits for
//!   [`handle_source_ready`](Session::handle_source_ready), keeps retransmitting what is in
//!   flight, and ends with [`Outcome::SourceStalled`] when no data came for
//!   [`SessionConfig::source_timeout`]. `Interrupted` is retried at once, but more than a
//!   few times in a row counts as `WouldBlock`.

mod opening;
mod output;
mod reading;
mod recovery;
mod rtt;

use std::io;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::options::{negotiate, Limits, Negotiated};
use crate::packet::{write_error, ErrorCode, Mode, Options, Packet, DATA_HEADER_LEN};
use crate::response::{Netascii, ResponseData};
use crate::stats::TransferStats;

pub use output::{Outcome, Output, Retransmission, Transmit};
pub use recovery::{
    GO_BACK_BURST, MIN_GO_BACK_INTERVAL, UNMEASURED_GO_BACK_INTERVAL, UNMEASURED_LOSS_EVIDENCE,
};
use rtt::RttEstimator;

/// Server policy for sessions. Clients never change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Base retransmission interval when the client does not choose one. Default 1 s.
    pub timeout: Duration,
    /// Retransmissions after the last progress before giving up. Default 5.
    pub retries: u32,
    /// How long a source may stay not ready (`WouldBlock`) with nothing in flight before
    /// the session ends with [`Outcome::SourceStalled`]. Default 30 s.
    pub source_timeout: Duration,
    /// Negotiation limits.
    pub limits: Limits,
    /// Retransmit early, at a timeout derived from the measured round-trip time (RFC 6298
    /// style), when that is far below the timeout. Default true.
    pub adaptive: bool,
    /// The shortest adaptive retransmission interval. Default 500 µs: a loss on a path
    /// of 0.1 ms round trips costs about five of them.
    pub min_rto: Duration,
    /// The longest a session may go without progress (an ACK that acknowledges something
    /// new), counted from its start or its last progress, whatever the retransmission
    /// schedule or the client's `timeout`: then it ends without sending anything more.
    /// Must be more than zero. Default 60 s: twice the 31 s that the default schedule
    /// (1 s, 5 retries) takes, so it cuts only schedules that clients stretched with
    /// their `timeout` option (dnsmasq abandons a transfer after 120 s; half of that
    /// halves what a spoofed request holds).
    pub progress_timeout: Duration,
    /// How long a [`Deferred`](crate::deferred::Deferred) source may stay unopened before
    /// the client gets ERROR 0 ([`Outcome::SourceStalled`]); never more than
    /// `progress_timeout`. Default 2 s.
    pub open_timeout: Duration,
    /// Whether the client rolls block numbers over past 65,535. A client that cannot (the
    /// Raspberry Pi EEPROM) gets ERROR 3 for a file of more blocks when a deferred source
    /// opens (the server refuses a source that is open at once before any session).
    /// Default true.
    pub block_rollover: bool,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            timeout: Duration::from_secs(1),
            retries: 5,
            source_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            adaptive: true,
            min_rto: Duration::from_micros(500),
            progress_timeout: Duration::from_secs(60),
            open_timeout: Duration::from_secs(2),
            block_rollover: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The source is not open yet (a deferred open): nothing sent; waiting for it.
    Opening,
    /// OACK to be sent or sent; waiting for ACK 0.
    Oack,
    /// Sending data.
    Transfer,
    /// An ERROR is in `control` and must be sent, then the session ends.
    Error(Outcome),
    /// Over.
    Done(Outcome),
}

/// One read transfer. See the [module documentation](self) for the call order.
pub struct Session {
    state: State,
    source: Box<dyn ResponseData>,
    config: SessionConfig,
    params: Negotiated,
    /// The OACK or a pending ERROR, encoded.
    control: Vec<u8>,
    /// True while `control` holds something not yet handed out.
    control_pending: bool,

    /// Ring of up to `window` packet slots, each `DATA_HEADER_LEN + blksize` bytes. It
    /// grows as blocks are read (see [`ensure_slots`](Self::ensure_slots)): empty until
    /// the first DATA, never more than the window.
    ring: Vec<u8>,
    /// Packet length (header + payload) of each slot in `ring`.
    lens: Vec<usize>,
    /// First block not yet acknowledged (blocks count from 1; u64 so they never wrap).
    base: u64,
    /// Next block to hand out.
    next: u64,
    /// Last block read into the ring (blocks `base..=filled` are stored).
    filled: u64,
    /// Payload bytes already read into block `filled + 1` (a read that was interrupted by
    /// `WouldBlock`).
    partial: usize,
    /// The last block, once a short read showed the end.
    last: Option<u64>,
    /// Highest block ever handed out, to tell first sends from resends.
    high_sent: u64,

    retries: u32,
    /// A retransmission timer fired; the next transmission is the resend it caused.
    retransmission: Option<Retransmission>,
    /// The armed deadline is an early one.
    deadline_early: bool,
    /// When each ring slot's packet was first sent, and whether it was sent again since.
    sent_at: Vec<(Instant, bool)>,
    /// When the last go-back-N started (a timer retransmission, or one an ACK caused):
    /// when a duplicate ACK can be evidence again, and what go-backs' answers are timed
    /// from.
    last_go_back: Option<Instant>,
    /// The go-back clock's theoretical time (GCRA): a go-back-N is allowed once `now` is
    /// no more than `GO_BACK_BURST - 1` intervals before it; each one moves it one
    /// interval on from `max(it, now)`.
    go_back_clock: Option<Instant>,
    /// The first block the last go-back-N resent, until an ACK of it or a later block
    /// times that go-back.
    go_back_from: Option<u64>,
    /// A go-back-N an ACK asked for and did not get at once, due at this instant or when
    /// the clock allows one, whichever is later: an in-window ACK's, which the clock did
    /// not allow (due at once), or a duplicate ACK's that came before the evidence was
    /// complete (due when it is).
    go_back_owed: Option<Instant>,
    /// Resends made on evidence of time since the last round-trip sample or go-back
    /// answered in time ([`go_back_answered`](Self::go_back_answered)): go-back-Ns on a
    /// duplicate ACK's evidence, owed
    /// ones, early retransmissions. Each doubles the evidence a duplicate ACK needs
    /// ([`duplicate_evidence`](Self::duplicate_evidence)) and the early retransmission
    /// interval.
    backoff: u32,
    /// How long go-back-Ns took to be answered: a shorter go-back clock for a client whose
    /// resends leave the main estimate without samples.
    recovery_rtt: RttEstimator,
    /// The start of the session or its last progress: the session ends
    /// [`SessionConfig::progress_timeout`] after it.
    progress_at: Instant,
    /// When the OACK was first sent, and whether it was sent again since.
    oack_sent_at: Option<(Instant, bool)>,
    /// When the session last sent an OACK or DATA.
    last_sent: Option<Instant>,
    rtt: RttEstimator,
    deadline: Option<Instant>,
    /// When the source first said `WouldBlock` for the block being read.
    stalled_since: Option<Instant>,
    /// The size the source announced at the start (compared with the real length at the
    /// end, see [`TransferStats::size_mismatch`]).
    announced: Option<u64>,
    /// The source said `WouldBlock` and has not signalled readiness since (a timer expiry
    /// also clears it, so a source that never signals is still retried, once per timeout).
    source_blocked: bool,
    now: Instant,
    stats: TransferStats,
}

impl Session {
    /// Starts a transfer of `source` in `mode` with the client's `options`.
    ///
    /// A netascii transfer wraps the source in [`Netascii`]; its size is then unknown, so
    /// `tsize` is not answered.
    pub fn new(
        now: Instant,
        options: Options<'_>,
        mode: Mode,
        source: Box<dyn ResponseData>,
        config: SessionConfig,
    ) -> Session {
        let source: Box<dyn ResponseData> = match mode {
            Mode::Netascii => Box::new(Netascii::new(source)),
            Mode::Octet | Mode::Mail => source,
        };
        let mut source = source;
        let opening = source.poll_open();
        let open = matches!(opening, Poll::Ready(Ok(())));
        let announced = if open { source.size() } else { None };
        // Until the source opens, `tsize` keeps its place in the answer with a size of 0.
        let params = negotiate(
            options,
            &config.limits,
            announced.or(Some(0).filter(|_| !open)),
        );
        let mut session = Session {
            state: State::Opening,
            source,
            config,
            control_pending: false,
            control: Vec::new(),
            ring: Vec::new(),
            lens: Vec::new(),
            base: 1,
            next: 1,
            filled: 0,
            partial: 0,
            last: None,
            high_sent: 0,
            retries: 0,
            retransmission: None,
            deadline_early: false,
            sent_at: Vec::new(),
            last_go_back: None,
            go_back_clock: None,
            go_back_from: None,
            go_back_owed: None,
            backoff: 0,
            recovery_rtt: RttEstimator::default(),
            progress_at: now,
            oack_sent_at: None,
            last_sent: None,
            rtt: RttEstimator::default(),
            deadline: None,
            stalled_since: None,
            source_blocked: false,
            now,
            stats: TransferStats::new(now, params.clone()),
            announced,
            params,
        };
        match opening {
            Poll::Ready(Ok(())) => session.start_transfer(),
            Poll::Ready(Err(reject)) => session.refuse(&reject),
            Poll::Pending => session.source_blocked = true,
        }
        session
    }

    /// The negotiated transfer parameters.
    pub fn params(&self) -> &Negotiated {
        &self.params
    }

    /// Counters and outcome so far.
    pub fn stats(&self) -> &TransferStats {
        &self.stats
    }

    /// When `handle_timeout` must be called next, if the session is waiting for one.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Done(_) => None,
            State::Error(_) => self.deadline,
            State::Opening => Some(self.open_deadline()),
            State::Oack | State::Transfer => Some(self.with_progress_deadline(self.deadline)),
        }
    }

    /// True once the peer acknowledged something this session sent it: ACK 0 of the OACK
    /// or an ACK of a DATA block (`stats().acks > 0`). The peer thereby proved that it
    /// receives at its address, so the request was not spoofed from someone else's. In
    /// single-port mode, where the session's port is the well-known listening port, an
    /// attacker can forge such an ACK blind (it knows every number in it), so there it
    /// proves less.
    pub fn is_verified(&self) -> bool {
        self.stats.acks > 0
    }

    /// Bytes of packet storage the session holds now: the ring of stored DATA packets and
    /// its per-slot bookkeeping. 0 until the first DATA is read; at most about
    /// `window × (blksize + 4 + 32)` bytes. It never shrinks while the session lives. For a
    /// driver that budgets window memory across sessions.
    pub fn buffer_bytes(&self) -> usize {
        self.ring.capacity()
            + self.lens.capacity() * std::mem::size_of::<usize>()
            + self.sent_at.capacity() * std::mem::size_of::<(Instant, bool)>()
    }

    /// True while the transfer runs and the peer has acknowledged every block the session
    /// has sent (or, just after the OACK's ACK 0, before any). Whatever the peer sends
    /// next answers what the session sends next, so a driver that has just fed the ACK
    /// that made this true knows anything still queued from the peer was sent before it:
    /// a duplicate, an older ACK, an ERROR.
    pub fn all_sent_acknowledged(&self) -> bool {
        self.state == State::Transfer && self.high_sent + 1 == self.base
    }

    /// True once the session has ended (the outcome is in [`stats`](Self::stats)).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done(_))
    }

    /// Feeds a datagram that came from the peer. Datagrams that do not parse are counted
    /// and otherwise ignored (they may be corruption); the transfer goes on.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        match Packet::parse(datagram) {
            Ok(packet) => self.handle_packet(now, packet),
            Err(_) => {
                self.now = now;
                self.stats.malformed += 1;
            }
        }
    }

    /// Feeds a parsed packet that came from the peer.
    pub fn handle_packet(&mut self, now: Instant, packet: Packet<'_>) {
        self.now = now;
        if matches!(self.state, State::Done(_) | State::Error(_)) {
            return;
        }
        match packet {
            // Nothing was sent yet: an ACK acknowledges nothing.
            Packet::Ack { .. } if self.state == State::Opening => self.stats.unexpected_acks += 1,
            Packet::Ack { block } => self.on_ack(block),
            Packet::Error { code, message } => {
                let outcome = if self.state == State::Oack && code == ErrorCode::OptionNegotiation {
                    Outcome::Probe
                } else if self.every_byte_acknowledged() {
                    // The client closed after it had every byte (GRUB stops reading
                    // once it has the size `tsize` promised, and answers a lost empty
                    // final DATA's resend, or nothing, with ERROR 0 "closed").
                    Outcome::Completed
                } else {
                    Outcome::PeerError(code)
                };
                self.stats.peer_error = Some((code, peer_error_text(message)));
                self.finish(outcome);
            }
            Packet::Rrq(_) | Packet::Wrq(_) | Packet::Data { .. } | Packet::Oack(_) => {
                self.fail(
                    ErrorCode::IllegalOperation,
                    "unexpected packet during a read transfer",
                    Outcome::IllegalOperation,
                );
            }
        }
    }

    /// Tells the session that time has passed. Before the deadline it does nothing; at or
    /// after it, it retransmits, makes a go-back-N an ACK asked for too early, or gives
    /// up (retries spent, or no progress for the progress timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.state == State::Opening {
            return self.open_timed_out();
        }
        if matches!(self.state, State::Oack | State::Transfer) && now >= self.progress_deadline() {
            self.progress_timed_out();
            return;
        }
        if self.owed_go_back_at().is_some_and(|at| now >= at) {
            // The go-back-N an ACK asked for too early (the send re-arms the
            // retransmission timer).
            self.back_off();
            self.go_back(true);
            return;
        }
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        self.deadline = None;
        match self.state {
            State::Oack => {
                if self.spend_retry() {
                    self.control_pending = true;
                }
            }
            State::Transfer => {
                if self.next > self.base {
                    if self.deadline_early {
                        // Early retransmissions keep to the go-back clock too.
                        if let Some(at) = self.go_back_allowed_at() {
                            if now < at {
                                self.deadline = Some(at);
                                return;
                            }
                        }
                    }
                    if self.spend_retry() {
                        self.go_back(false);
                        self.source_blocked = false;
                    }
                } else if self.stalled_since.is_some() {
                    self.fail(
                        ErrorCode::NotDefined,
                        "source not ready",
                        Outcome::SourceStalled,
                    );
                }
            }
            State::Opening | State::Error(_) | State::Done(_) => {}
        }
    }

    /// Tells a session whose source returned `WouldBlock` that the source may be ready.
    pub fn handle_source_ready(&mut self, now: Instant) {
        self.now = now;
        self.source_blocked = false;
    }

    /// Tells the session that its peer sent the same request again while it runs (the
    /// driver saw a request from the session's peer identical to the one that started
    /// it). Until the peer acknowledged anything, that says the first reply (the OACK or
    /// DATA 1) was lost: GRUB repeats its request 0.4 s after a lost one, long before the
    /// timer. The session then resends it as if the retransmission timer had fired now —
    /// one retry spent ([`TransferStats::retransmits`], [`TransferStats::repeat_resends`]),
    /// the schedule doubling on from here — but only when a retry is left, the reply has
    /// been out for the go-back interval (a repeat that crossed it is no evidence) and the
    /// go-back clock allows a go-back. So a flood of repeats gets no more replies than the
    /// timer would send (`1 + retries`, the session is unverified: the request may be
    /// spoofed), and never one per repeat. A verified session only counts the repeat
    /// ([`TransferStats::repeated_requests`]).
    pub fn handle_repeated_request(&mut self, now: Instant) {
        self.now = now;
        if !matches!(self.state, State::Opening | State::Oack | State::Transfer) {
            return;
        }
        self.stats.repeated_requests += 1;
        if self.state == State::Opening
            || self.is_verified()
            || (self.state == State::Oack && self.control_pending)
        {
            return;
        }
        // Unverified: the first reply is all that was sent (a session without options
        // has a window of one block).
        let Some(sent) = self.last_sent else {
            return;
        };
        let fresh = now.saturating_duration_since(sent) < self.go_back_interval();
        if fresh || !self.go_back_allowed() || self.retries >= self.config.retries {
            return;
        }
        self.deadline_early = false;
        if !self.spend_retry() {
            return;
        }
        self.stats.repeat_resends += 1;
        if self.state == State::Oack {
            self.spend_go_back_token();
            self.control_pending = true;
        } else {
            self.go_back(false);
            self.source_blocked = false;
        }
    }

    /// Ends the session from outside (shutdown, a panic in user code): queues an ERROR with
    /// `code` and `message` for the peer and ends with `outcome`.
    pub fn abort(&mut self, now: Instant, code: ErrorCode, message: &str, outcome: Outcome) {
        self.now = now;
        if !matches!(self.state, State::Done(_) | State::Error(_)) {
            self.fail(code, message, outcome);
        }
    }

    /// Ends the session at once with `outcome`, sending nothing more (the driver learnt
    /// that the peer cannot be reached, [`Outcome::PeerUnreachable`]). Nothing happens if
    /// it has ended already.
    pub fn end(&mut self, now: Instant, outcome: Outcome) {
        self.now = now;
        if !matches!(self.state, State::Done(_)) {
            self.finish(outcome);
        }
    }

    /// The next thing to do. Call until it returns `Wait` or `Done`.
    ///
    /// `max_datagrams` is the most datagrams one [`Transmit`] may carry. With more than
    /// one, consecutive DATA packets that are already read or can be read now without
    /// blocking come out together, stored back to back — every one
    /// [`segment_size`](Transmit::segment_size) bytes long but the last — for one UDP GSO
    /// send; OACKs, ERRORs and a lone DATA packet still come one at a time. Accounting
    /// and timers are exactly as if the packets had come out one by one.
    pub fn poll_output(&mut self, max_datagrams: usize) -> Output<'_> {
        loop {
            match self.state {
                State::Done(outcome) => return Output::Done(outcome),
                State::Error(outcome) => {
                    if self.control_pending {
                        self.control_pending = false;
                        self.stats.errors_sent += 1;
                        return Output::Transmit(Transmit::single(&self.control, 0, None));
                    }
                    self.finish(outcome);
                }
                State::Opening => {
                    if !self.poll_opening() {
                        return Output::Wait(self.open_deadline());
                    }
                }
                State::Oack => {
                    if self.control_pending {
                        self.control_pending = false;
                        self.stats.packets_sent += 1;
                        self.last_sent = Some(self.now);
                        self.oack_sent_at = match self.oack_sent_at {
                            None => Some((self.now, false)),
                            Some((at, _)) => Some((at, true)),
                        };
                        self.arm_retransmit();
                        let retransmission = self.retransmission.take();
                        return Output::Transmit(Transmit::single(
                            &self.control,
                            0,
                            retransmission,
                        ));
                    }
                    return self.wait();
                }
                State::Transfer => {
                    if max_datagrams > 1 && self.params.window > 1 {
                        if let Some((start, len, datagrams)) = self.data_run(max_datagrams) {
                            let retransmission = self.retransmission.take();
                            return Output::Transmit(Transmit {
                                contents: &self.ring[start..start + len],
                                segment_size: self.slot_len(),
                                datagrams,
                                payload: (len - datagrams * DATA_HEADER_LEN) as u64,
                                retransmission,
                            });
                        }
                        if self.state != State::Transfer {
                            // Reading ahead failed: the ERROR goes out next.
                            continue;
                        }
                    }
                    let window_end = self.base + self.params.window as u64;
                    let more =
                        self.next < window_end && self.last.is_none_or(|last| self.next <= last);
                    let must_read = self.next > self.filled;
                    if !more {
                        return self.wait();
                    }
                    if must_read && self.source_blocked {
                        self.arm_stall_deadline();
                        return self.wait();
                    }
                    if must_read {
                        match self.read_block() {
                            Ok(true) => {}
                            Ok(false) => {
                                self.source_blocked = true;
                                self.stalled_since.get_or_insert(self.now);
                                self.arm_stall_deadline();
                                return self.wait();
                            }
                            Err(e) => {
                                self.fail_read(&e);
                                continue;
                            }
                        }
                    }
                    return self.transmit_next();
                }
            }
        }
    }

    /// Hands out the next DATA packets together when two or more are ready (see
    /// [`poll_output`](Self::poll_output)): up to `max_packets` consecutive blocks that
    /// are already read or can be read now without blocking, back to back in the ring.
    /// `None` when fewer than two are ready; the single-packet path then handles the
    /// rest (a blocked source, the end, a read that failed here). Returns where the
    /// packets start in the ring, their total length and how many there are.
    fn data_run(&mut self, max_packets: usize) -> Option<(usize, usize, usize)> {
        if self.state != State::Transfer || max_packets < 2 {
            return None;
        }
        let window = self.params.window.max(1) as u64;
        let window_end = self.base + window;
        // The ring slots of `next..` are contiguous until the slot index wraps.
        let ring_end = self.next - self.slot(self.next) as u64 + window;
        let mut end = window_end.min(ring_end).min(self.next + max_packets as u64);
        if let Some(last) = self.last {
            end = end.min(last + 1);
        }
        // Read ahead what the run needs, stopping at anything unusual: several blocks
        // with one vectored read first, then block by block.
        if self.partial == 0 && self.filled + 2 < end && self.last.is_none() && !self.source_blocked
        {
            match self.read_blocks(end - self.filled - 1) {
                Ok(true) => {}
                Ok(false) => {
                    self.source_blocked = true;
                    self.stalled_since.get_or_insert(self.now);
                }
                Err(e) => {
                    self.fail_read(&e);
                    return None;
                }
            }
        }
        while self.filled + 1 < end && self.last.is_none() && !self.source_blocked {
            match self.read_block() {
                Ok(true) => {}
                Ok(false) => {
                    self.source_blocked = true;
                    self.stalled_since.get_or_insert(self.now);
                    break;
                }
                Err(e) => {
                    self.fail_read(&e);
                    return None;
                }
            }
        }
        if let Some(last) = self.last {
            end = end.min(last + 1);
        }
        end = end.min(self.filled + 1);
        let slot_len = self.slot_len();
        // Every packet but the last of the run must be full.
        let mut count = 0;
        while self.next + count < end {
            let len = self.lens[self.slot(self.next + count)];
            count += 1;
            if len != slot_len {
                break;
            }
        }
        if count < 2 {
            return None;
        }
        let first = self.next;
        let start = self.slot(first) * slot_len;
        let bytes_len = (first..first + count)
            .map(|b| self.account_send(b))
            .sum::<usize>();
        self.next += count;
        self.arm_retransmit();
        Some((start, bytes_len, count as usize))
    }

    /// With nothing in flight, a blocked source is waited for until the source timeout.
    fn arm_stall_deadline(&mut self) {
        if self.next == self.base {
            let since = self.stalled_since.unwrap_or(self.now);
            self.deadline_early = false;
            self.deadline = Some(since + self.config.source_timeout);
        }
    }

    fn wait(&self) -> Output<'_> {
        // Every waiting state has a deadline (a send arms it, a stall arms it); the
        // fallback only keeps the contract total.
        let deadline = self
            .deadline
            .unwrap_or(self.now + self.config.source_timeout);
        Output::Wait(self.with_progress_deadline(Some(deadline)))
    }

    /// When the session ends for want of progress.
    fn progress_deadline(&self) -> Instant {
        self.progress_at + self.config.progress_timeout
    }

    /// The earliest of `deadline`, an owed go-back-N and the progress deadline.
    fn with_progress_deadline(&self, deadline: Option<Instant>) -> Instant {
        [deadline, self.owed_go_back_at()]
            .into_iter()
            .flatten()
            .fold(self.progress_deadline(), Instant::min)
    }

    /// Nothing acknowledged for the progress timeout: the session ends without sending
    /// anything more — unless it is only waiting for its own source, which gets the
    /// ERROR a source stall gets.
    fn progress_timed_out(&mut self) {
        if self.state == State::Transfer && self.next == self.base && self.stalled_since.is_some() {
            self.fail(
                ErrorCode::NotDefined,
                "source not ready",
                Outcome::SourceStalled,
            );
        } else {
            self.give_up();
        }
    }

    /// Hands out block `next` from the ring and arms the timer when the window is out.
    fn transmit_next(&mut self) -> Output<'_> {
        let block = self.next;
        self.next += 1;
        let len = self.account_send(block);
        // The timer runs from the last packet sent.
        self.arm_retransmit();
        let start = self.slot(block) * self.slot_len();
        let payload = (len - DATA_HEADER_LEN) as u64;
        let retransmission = self.retransmission.take();
        Output::Transmit(Transmit::single(
            &self.ring[start..start + len],
            payload,
            retransmission,
        ))
    }

    /// Counts block `block` as sent now (first send or resend, for the round-trip
    /// samples too); returns its packet length.
    #[inline]
    fn account_send(&mut self, block: u64) -> usize {
        let slot = self.slot(block);
        let len = self.lens[slot];
        let payload = (len - DATA_HEADER_LEN) as u64;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += payload;
        self.last_sent = Some(self.now);
        if block <= self.high_sent {
            self.stats.packets_resent += 1;
            self.stats.bytes_resent += payload;
            self.sent_at[slot].1 = true;
        } else {
            self.high_sent = block;
            self.sent_at[slot] = (self.now, false);
        }
        len
    }

    fn on_ack(&mut self, block: u16) {
        match self.state {
            State::Oack => {
                if block == 0 {
                    self.state = State::Transfer;
                    self.stats.acks += 1;
                    if let Some((sent, false)) = self.oack_sent_at {
                        self.sample_rtt(sent);
                    }
                    self.progress();
                } else {
                    self.stats.unexpected_acks += 1;
                }
            }
            State::Transfer => {
                // The ACK names a block in base-1 ..= high_sent (sent, if only before a
                // go-back that is not sent yet); the window is at most 65535 blocks, so
                // the 16-bit number maps to exactly one candidate.
                let low = self.base - 1;
                let offset = block.wrapping_sub(low as u16) as u64;
                let acked = low + offset;
                if acked > self.high_sent {
                    self.stats.unexpected_acks += 1;
                    return;
                }
                if acked == low {
                    self.stats.duplicate_acks += 1;
                    self.on_duplicate_ack();
                    return;
                }
                self.stats.acks += 1;
                self.stats.blocks_acked += acked - low;
                // The acknowledged block's slot is refilled only after this.
                if let (sent, false) = self.sent_at[self.slot(acked)] {
                    self.sample_rtt(sent);
                }
                // The first ACK of a block that the last go-back-N resent times that
                // go-back (for the go-back clock only: it may be the ACK of an earlier
                // copy, which Karn's rule keeps out of the estimate above).
                if let (Some(from), Some(at)) = (self.go_back_from, self.last_go_back) {
                    if acked >= from {
                        self.go_back_answered(self.now.saturating_duration_since(at));
                    }
                }
                self.base = acked + 1;
                if self.last == Some(acked) {
                    self.finish(Outcome::Completed);
                    return;
                }
                self.progress();
                if self.high_sent >= self.base {
                    // An ACK inside the window: the client lost what followed. Resume
                    // from the block after it (RFC 7440 §4) when the go-back clock has a
                    // token; otherwise only slide (`next` never falls behind `base`) and
                    // go back when it has one again.
                    if self.go_back_allowed() {
                        self.go_back(true);
                    } else {
                        self.stats.go_back_held += 1;
                        self.next = self.next.max(self.high_sent + 1);
                        self.go_back_owed = Some(self.now);
                    }
                    // Still in flight: the timer runs from now (a send re-arms it).
                    self.arm_retransmit();
                } else {
                    // Everything sent is acknowledged (a go-back that was not sent yet
                    // included): nothing is missing.
                    self.next = self.base;
                    self.go_back_owed = None;
                }
            }
            State::Opening | State::Error(_) | State::Done(_) => {}
        }
    }

    /// Progress was made: the retry budget and the timer start over.
    fn progress(&mut self) {
        self.progress_at = self.now;
        self.retries = 0;
        self.deadline_early = false;
        self.deadline = None;
    }

    /// Feeds the round trip of a packet sent once at `sent` and acknowledged now.
    fn sample_rtt(&mut self, sent: Instant) {
        self.rtt.sample(self.now.saturating_duration_since(sent));
        self.backoff = 0;
        self.stats.srtt = self.rtt.srtt();
        self.stats.rttvar = self.rtt.rttvar();
    }

    /// Arms the retransmission timer for a packet sent now: early when the measured
    /// round-trip time allows it and the early intervals have not reached the timeout.
    fn arm_retransmit(&mut self) {
        let full = self.rto();
        let early = match self.rtt.rto(self.config.min_rto) {
            Some(estimate) if self.config.adaptive && self.retries == 0 => {
                let interval = estimate.saturating_mul(1 << self.backoff.min(20));
                (interval < full).then_some(interval)
            }
            _ => None,
        };
        self.deadline_early = early.is_some();
        self.deadline = Some(self.now + early.unwrap_or(full));
    }

    /// Takes one retry from the budget; false (and the session ends) when it is empty.
    /// An early deadline takes nothing from the budget.
    fn spend_retry(&mut self) -> bool {
        if self.deadline_early {
            self.back_off();
            self.stats.early_retransmits += 1;
            self.retransmission = Some(Retransmission::Early);
            return true;
        }
        if self.retries >= self.config.retries {
            self.give_up();
            return false;
        }
        self.retries += 1;
        self.stats.retransmits += 1;
        self.retransmission = Some(Retransmission::Timeout);
        true
    }

    /// Whether the peer acknowledged every payload byte: every block before `base` is
    /// full, so that is `(base - 1) × blksize` bytes, and the file has that many — all of
    /// it read (only an empty final block, or nothing, is unacknowledged), or, before the
    /// end was read, as many as the source announced and no more read.
    fn every_byte_acknowledged(&self) -> bool {
        if self.state != State::Transfer {
            return false;
        }
        let acknowledged = (self.base - 1) * u64::from(self.params.blksize);
        match self.last {
            Some(_) => acknowledged >= self.stats.bytes_read,
            None => self.announced == Some(acknowledged) && self.stats.bytes_read == acknowledged,
        }
    }

    /// The peer stopped answering: the session ends, silently.
    fn give_up(&mut self) {
        let all_sent =
            self.state == State::Transfer && self.last.is_some_and(|last| self.high_sent >= last);
        self.finish(if all_sent {
            Outcome::FinalAckMissing
        } else {
            Outcome::TimedOut
        });
    }

    /// The current retransmission interval: the client's timeout or ours, doubled with
    /// every retry up to 8 times.
    fn rto(&self) -> Duration {
        let base = self.params.timeout.unwrap_or(self.config.timeout);
        base.saturating_mul(1 << self.retries.min(3))
    }

    /// The source failed: the client gets an ERROR. A source that learns late that the
    /// file does not exist or may not be read (a streamed HTTP 404 or 403) says so with the
    /// matching error kind.
    fn fail_read(&mut self, e: &io::Error) {
        let (code, message) = match e.kind() {
            io::ErrorKind::NotFound => (ErrorCode::FileNotFound, "file not found"),
            io::ErrorKind::PermissionDenied => (ErrorCode::AccessViolation, "access violation"),
            _ => (ErrorCode::NotDefined, "error reading file"),
        };
        self.fail(code, message, Outcome::ReadFailed);
    }

    fn fail(&mut self, code: ErrorCode, message: &str, outcome: Outcome) {
        self.stats.error_sent = Some((code, message.to_owned()));
        self.control.clear();
        write_error(&mut self.control, code, message);
        self.control_pending = true;
        self.state = State::Error(outcome);
        self.deadline = None;
        self.retransmission = None;
    }

    fn finish(&mut self, outcome: Outcome) {
        self.state = State::Done(outcome);
        self.deadline = None;
        self.stats.finish(self.now, outcome);
    }

    fn slot_len(&self) -> usize {
        DATA_HEADER_LEN + self.params.blksize as usize
    }

    /// The ring slot of `block` (blocks count from 1): a window that starts after a
    /// whole window was acknowledged fills the ring from slot 0, so that it is read
    /// with one vectored read and sent as one run.
    fn slot(&self, block: u64) -> usize {
        (block.saturating_sub(1) % self.params.window.max(1) as u64) as usize
    }
}

/// The most bytes of a peer's ERROR message kept in [`TransferStats::peer_error`].
pub const MAX_PEER_ERROR_LEN: usize = 200;

/// A peer's ERROR message as kept: invalid UTF-8 replaced, then cut to at most
/// [`MAX_PEER_ERROR_LEN`] bytes on a character boundary.
fn peer_error_text(message: &[u8]) -> String {
    // A character that starts within the kept bytes ends within 3 bytes after them, so
    // decoding this much decodes them exactly as decoding the whole message would.
    let message = &message[..message.len().min(MAX_PEER_ERROR_LEN + 4)];
    let mut text = String::from_utf8_lossy(message).into_owned();
    if text.len() > MAX_PEER_ERROR_LEN {
        let mut end = MAX_PEER_ERROR_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.state)
            .field("params", &self.params)
            .field("base", &self.base)
            .field("next", &self.next)
            .field("filled", &self.filled)
            .field("last", &self.last)
            .field("retries", &self.retries)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;

    use super::reading::MAX_INTERRUPTED;
    use super::*;
    use crate::response::BytesSource;

    /// A session plus the time; collects what it sends.
    struct Harness {
        now: Instant,
        session: Session,
    }

    impl Harness {
        fn new(options: &[u8], data: Vec<u8>, config: SessionConfig) -> Harness {
            let now = Instant::now();
            let options = Options::parse(options).expect("valid options");
            let session = Session::new(
                now,
                options,
                Mode::Octet,
                Box::new(BytesSource::new(data)),
                config,
            );
            Harness { now, session }
        }

        /// Drains the output: the datagrams sent and how the session now waits or ended.
        fn drain(&mut self) -> (Vec<Vec<u8>>, Output<'static>) {
            let mut sent = Vec::new();
            loop {
                match self.session.poll_output(1) {
                    Output::Transmit(transmit) => sent.push(transmit.contents.to_vec()),
                    Output::Wait(t) => return (sent, Output::Wait(t)),
                    Output::Done(o) => return (sent, Output::Done(o)),
                }
            }
        }

        fn ack(&mut self, block: u16) -> Vec<Vec<u8>> {
            self.session.handle_packet(self.now, Packet::Ack { block });
            self.drain().0
        }

        fn advance(&mut self, by: Duration) -> Vec<Vec<u8>> {
            self.now += by;
            self.session.handle_timeout(self.now);
            self.drain().0
        }
    }

    fn data(block: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 3];
        out.extend_from_slice(&block.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn blocks(sent: &[Vec<u8>]) -> Vec<u16> {
        sent.iter()
            .map(|p| match Packet::parse(p).unwrap() {
                Packet::Data { block, .. } => block,
                other => panic!("not DATA: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn end_finishes_at_once_without_sending() {
        let mut h = Harness::new(b"", b"abc".to_vec(), SessionConfig::default());
        let (sent, _) = h.drain();
        assert_eq!(sent, vec![data(1, b"abc")]);
        let later = h.now + Duration::from_millis(10);
        h.session.end(later, Outcome::PeerUnreachable);
        assert_eq!(
            h.session.poll_output(64),
            Output::Done(Outcome::PeerUnreachable)
        );
        assert_eq!(h.session.stats().outcome, Some(Outcome::PeerUnreachable));
        assert_eq!(h.session.stats().finished, Some(later));
        assert_eq!(h.session.stats().packets_sent, 1);
        // Once ended, it stays so.
        h.session.end(later, Outcome::TimedOut);
        assert_eq!(
            h.session.poll_output(64),
            Output::Done(Outcome::PeerUnreachable)
        );
    }

    #[test]
    fn outcome_all_lists_every_kind_once_and_names_map_back() {
        let names: std::collections::BTreeSet<_> =
            Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), Outcome::ALL.len());
        for outcome in Outcome::ALL {
            // Exhaustive: a new variant must be added to ALL (and here).
            match outcome {
                Outcome::Completed
                | Outcome::FinalAckMissing
                | Outcome::TimedOut
                | Outcome::Probe
                | Outcome::PeerError(_)
                | Outcome::IllegalOperation
                | Outcome::ReadFailed
                | Outcome::SourceStalled
                | Outcome::Panicked
                | Outcome::ShutDown
                | Outcome::Evicted
                | Outcome::Refused
                | Outcome::PeerUnreachable => {}
            }
            assert_eq!(Outcome::from_name(outcome.as_str()), Some(outcome));
        }
        assert_eq!(Outcome::from_name("nonsense"), None);
    }

    #[test]
    fn lock_step_without_options() {
        let mut h = Harness::new(b"", b"abc".to_vec(), SessionConfig::default());
        let (sent, wait) = h.drain();
        assert_eq!(sent, vec![data(1, b"abc")]);
        assert_eq!(wait, Output::Wait(h.now + Duration::from_secs(1)));
        assert!(h.ack(1).is_empty());
        assert_eq!(h.session.poll_output(1), Output::Done(Outcome::Completed));
        assert_eq!(h.session.stats().outcome, Some(Outcome::Completed));
        assert_eq!(h.session.deadline(), None);
    }

    #[test]
    fn oack_then_ack0_then_data_and_oack_resent_on_timeout() {
        let mut h = Harness::new(b"tsize\x000\x00", vec![7; 10], SessionConfig::default());
        let (sent, _) = h.drain();
        assert_eq!(sent, vec![b"\x00\x06tsize\x0010\x00".to_vec()]);
        // Early timeout: nothing.
        assert!(h.advance(Duration::from_millis(999)).is_empty());
        assert_eq!(h.advance(Duration::from_millis(1)), sent);
        assert_eq!(h.session.stats().retransmits, 1);
        assert_eq!(h.ack(0), vec![data(1, &[7; 10])]);
        // A repeated ACK 0 sends nothing.
        for _ in 0..100 {
            assert!(h.ack(0).is_empty());
        }
        assert_eq!(h.session.stats().duplicate_acks, 100);
        h.ack(1);
        assert!(h.session.is_done());
    }

    #[test]
    fn exact_multiple_ends_with_empty_block_and_empty_source_is_one_empty_block() {
        let mut h = Harness::new(b"blksize\x008\x00", vec![1; 16], SessionConfig::default());
        h.drain();
        assert_eq!(h.ack(0), vec![data(1, &[1; 8])]);
        assert_eq!(h.ack(1), vec![data(2, &[1; 8])]);
        assert_eq!(h.ack(2), vec![data(3, b"")]);
        h.ack(3);
        assert_eq!(h.session.poll_output(1), Output::Done(Outcome::Completed));

        let mut h = Harness::new(b"", Vec::new(), SessionConfig::default());
        assert_eq!(h.drain().0, vec![data(1, b"")]);
        h.ack(1);
        assert!(h.session.is_done());
    }

    /// 80 bytes in blocks of 8 (ten full blocks and an empty 11th), windowsize 4: the
    /// first window sent.
    fn window_of_4_sent() -> Harness {
        let payload: Vec<u8> = (0..80).collect();
        let mut h = Harness::new(
            b"blksize\x008\x00windowsize\x004\x00",
            payload,
            SessionConfig::default(),
        );
        h.drain();
        assert_eq!(blocks(&h.ack(0)), vec![1, 2, 3, 4]);
        h
    }

    #[test]
    fn window_sends_whole_window_and_resumes_after_partial_ack() {
        let mut h = window_of_4_sent();
        // Client got 1 and 2 only: resume at 3, window 3..=6.
        assert_eq!(blocks(&h.ack(2)), vec![3, 4, 5, 6]);
        assert_eq!(h.session.stats().packets_resent, 2);
        // A stale ACK 2 again: nothing.
        assert!(h.ack(2).is_empty());
        // ACK for a block never sent: ignored.
        assert!(h.ack(9).is_empty());
        assert_eq!(h.session.stats().unexpected_acks, 1);
        assert_eq!(blocks(&h.ack(6)), vec![7, 8, 9, 10]);
        assert_eq!(blocks(&h.ack(10)), vec![11]); // 80 bytes = 10 full blocks + empty 11
        h.ack(11);
        assert_eq!(h.session.poll_output(1), Output::Done(Outcome::Completed));
    }

    #[test]
    fn acks_fed_together_count_what_was_sent_before_a_go_back_not_yet_sent() {
        // A driver that feeds several queued ACKs before it sends (catching up on a
        // session's socket): the first goes back, the next acknowledges blocks that were
        // sent before that go-back and are not resent yet.
        let mut h = window_of_4_sent();
        h.session.handle_packet(h.now, Packet::Ack { block: 1 });
        h.session.handle_packet(h.now, Packet::Ack { block: 3 });
        // ACK 3 counts (it used to be taken for an ACK of a block never sent), and the
        // go-back is from block 4, not 2.
        assert_eq!(blocks(&h.drain().0), vec![4, 5, 6, 7]);
        // Everything sent before the go-back, acknowledged: nothing is resent at all.
        h.session.handle_packet(h.now, Packet::Ack { block: 5 });
        h.session.handle_packet(h.now, Packet::Ack { block: 7 });
        assert_eq!(blocks(&h.drain().0), vec![8, 9, 10, 11]);
        let stats = h.session.stats();
        assert_eq!((stats.acks, stats.unexpected_acks), (5, 0));
        assert_eq!(stats.packets_resent, 1);
        // Blocks never sent are still refused.
        h.session.handle_packet(h.now, Packet::Ack { block: 12 });
        assert_eq!(h.session.stats().unexpected_acks, 1);
    }

    #[test]
    fn all_sent_acknowledged_only_when_nothing_is_in_flight() {
        let payload: Vec<u8> = (0..40).collect();
        let mut h = Harness::new(
            b"blksize\x008\x00windowsize\x002\x00",
            payload,
            SessionConfig::default(),
        );
        // The OACK is out, unacknowledged.
        h.drain();
        assert!(!h.session.all_sent_acknowledged());
        // ACK 0, before the session sends its first window.
        h.session.handle_packet(h.now, Packet::Ack { block: 0 });
        assert!(h.session.all_sent_acknowledged());
        h.drain();
        assert!(!h.session.all_sent_acknowledged());
        // An ACK inside the window leaves block 2 in flight.
        h.session.handle_packet(h.now, Packet::Ack { block: 1 });
        assert!(!h.session.all_sent_acknowledged());
        h.drain();
        // A duplicate changes nothing.
        h.session.handle_packet(h.now, Packet::Ack { block: 1 });
        assert!(!h.session.all_sent_acknowledged());
        h.session.handle_packet(h.now, Packet::Ack { block: 3 });
        assert!(h.session.all_sent_acknowledged());
        // A go-back leaves what was sent before in flight: the timer resends block 4.
        h.drain();
        h.advance(Duration::from_secs(5));
        assert!(!h.session.all_sent_acknowledged());
        // 40 bytes: blocks 1..=5 and an empty block 6; the last ACK ends the session.
        h.ack(5);
        h.session.handle_packet(h.now, Packet::Ack { block: 6 });
        assert!(h.session.is_done());
        assert!(!h.session.all_sent_acknowledged());
    }

    #[test]
    fn timer_resends_stored_window_with_backoff_then_gives_up_after_exact_retries() {
        let config = SessionConfig {
            retries: 3,
            adaptive: false,
            ..SessionConfig::default()
        };
        let mut h = Harness::new(b"windowsize\x002\x00", vec![5; 2000], config);
        h.drain();
        let first = h.ack(0);
        assert_eq!(blocks(&first), vec![1, 2]);
        // Backoff: 1 s, then 2, 4, 8 s.
        let mut waited = Vec::new();
        for _ in 0..3 {
            let Output::Wait(deadline) = h.drain().1 else {
                panic!()
            };
            waited.push(deadline - h.now);
            h.now = deadline;
            h.session.handle_timeout(h.now);
            assert_eq!(h.drain().0, first, "resends the same bytes");
        }
        assert_eq!(waited, [1, 2, 4].map(Duration::from_secs).to_vec());
        let Output::Wait(deadline) = h.drain().1 else {
            panic!()
        };
        assert_eq!(deadline - h.now, Duration::from_secs(8));
        h.now = deadline;
        h.session.handle_timeout(h.now);
        assert_eq!(h.drain(), (vec![], Output::Done(Outcome::TimedOut)));
        assert_eq!(h.session.stats().retransmits, 3);
        assert_eq!(h.session.stats().bytes_read, 1024, "source read once");
    }

    /// Fires deadlines until the session ends; returns when each datagram went out and
    /// when the session ended, in seconds from `start`.
    fn schedule(h: &mut Harness, start: Instant) -> (Vec<f64>, f64) {
        let mut sends = Vec::new();
        loop {
            let (sent, out) = h.drain();
            sends.extend(sent.iter().map(|_| (h.now - start).as_secs_f64()));
            match out {
                Output::Wait(deadline) => {
                    assert_eq!(h.session.deadline(), Some(deadline));
                    h.now = deadline;
                    h.session.handle_timeout(h.now);
                }
                Output::Done(_) => return (sends, (h.now - start).as_secs_f64()),
                Output::Transmit(_) => unreachable!(),
            }
        }
    }

    #[test]
    fn the_clients_timeout_doubles_like_ours_and_the_progress_timeout_cuts_it() {
        let config = SessionConfig {
            adaptive: false,
            ..SessionConfig::default()
        };
        // timeout 2, 5 retries: 2, 4, 8, 16, 16 s apart, and the give-up deadline at 62 s
        // comes after the 60 s without progress.
        let mut h = Harness::new(b"timeout\x002\x00", vec![1; 2000], config);
        let start = h.now;
        let (sends, end) = schedule(&mut h, start);
        assert_eq!(sends, [0.0, 2.0, 6.0, 14.0, 30.0, 46.0]);
        assert_eq!(end, 60.0);
        assert_eq!(h.session.stats().outcome, Some(Outcome::TimedOut));
        assert_eq!(h.session.stats().retransmits, 5);

        // Without the cap, the schedule runs to its end; the interval counts from the
        // last progress, and the doubling stops at 8 × the client's timeout.
        let config = SessionConfig {
            progress_timeout: Duration::from_secs(3600),
            retries: 6,
            ..config
        };
        let mut h = Harness::new(b"timeout\x002\x00", vec![1; 2000], config);
        h.drain();
        h.now += Duration::from_secs(1);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        let start = h.now;
        let (sends, end) = schedule(&mut h, start);
        assert_eq!(sends, [2.0, 6.0, 14.0, 30.0, 46.0, 62.0]);
        assert_eq!(end, 78.0);
    }

    #[test]
    fn a_spoofed_request_with_timeout_255_ends_at_the_progress_timeout() {
        for options in [
            &b"timeout\x00255\x00"[..],
            b"utimeout\x00255000000\x00blksize\x001428\x00",
        ] {
            let mut h = Harness::new(options, vec![1; 100_000], SessionConfig::default());
            let start = h.now;
            assert_eq!(h.session.deadline(), Some(start + Duration::from_secs(60)));
            let (sends, end) = schedule(&mut h, start);
            // The OACK once: its first resend would be at 255 s.
            assert_eq!(sends, [0.0]);
            assert_eq!(end, 60.0);
            assert_eq!(h.session.stats().outcome, Some(Outcome::TimedOut));
            assert_eq!(h.session.stats().retransmits, 0);
            assert!(!h.session.is_verified());
        }
        // Progress restarts the count; the end without progress sends nothing.
        let config = SessionConfig {
            progress_timeout: Duration::from_secs(10),
            ..SessionConfig::default()
        };
        let mut h = Harness::new(b"timeout\x00255\x00", vec![1; 600], config);
        h.drain();
        h.now += Duration::from_secs(9);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        assert_eq!(h.drain().1, Output::Wait(h.now + Duration::from_secs(10)));
        assert!(h.advance(Duration::from_millis(9_999)).is_empty());
        assert!(!h.session.is_done());
        assert!(h.advance(Duration::from_millis(1)).is_empty());
        assert_eq!(h.session.stats().outcome, Some(Outcome::TimedOut));
        // Everything sent, only the final ACK missing.
        let mut h = Harness::new(b"timeout\x00255\x00", vec![1; 10], config);
        h.drain();
        h.ack(0);
        h.advance(Duration::from_secs(10));
        assert_eq!(h.session.stats().outcome, Some(Outcome::FinalAckMissing));
    }

    #[test]
    fn a_source_stalled_past_the_progress_timeout_gets_error_0() {
        let ready = std::rc::Rc::new(std::cell::Cell::new(false));
        let config = SessionConfig {
            progress_timeout: Duration::from_secs(5),
            ..SessionConfig::default()
        };
        let now = Instant::now();
        let source = Gate {
            ready,
            inner: BytesSource::new(vec![9; 3]),
        };
        let mut h = Harness {
            now,
            session: Session::new(now, Options::EMPTY, Mode::Octet, Box::new(source), config),
        };
        assert_eq!(
            h.drain(),
            (vec![], Output::Wait(now + Duration::from_secs(5)))
        );
        let sent = h.advance(Duration::from_secs(5));
        assert_eq!(sent, vec![b"\x00\x05\x00\x00source not ready\x00".to_vec()]);
        assert_eq!(h.session.stats().outcome, Some(Outcome::SourceStalled));
    }

    /// Waits for the session's deadline, fires it, and returns (interval, datagrams sent).
    fn fire(h: &mut Harness) -> (Duration, Vec<Vec<u8>>) {
        let Output::Wait(deadline) = h.drain().1 else {
            panic!("not waiting")
        };
        let interval = deadline - h.now;
        h.now = deadline;
        h.session.handle_timeout(h.now);
        (interval, h.drain().0)
    }

    /// Fires the timer until the session gives up: the intervals, each expiry having
    /// resent `window` (the last sends nothing).
    fn intervals_until_done(h: &mut Harness, window: &[Vec<u8>]) -> Vec<Duration> {
        let mut intervals = Vec::new();
        loop {
            let (interval, sent) = fire(h);
            intervals.push(interval);
            if h.session.is_done() {
                assert!(sent.is_empty());
                return intervals;
            }
            assert_eq!(sent, window, "resends the stored window");
        }
    }

    #[test]
    fn one_round_trip_then_silence_costs_three_early_resends_at_most() {
        // What a forged ACK 0 in single-port mode buys (ACKs there can be forged blind):
        // one sample of 1 ms, so the early timer waits its 200 ms floor, doubling while
        // below the 1 s timeout — three early resends of the window, then the full
        // schedule with the retry budget, as before any sample.
        let mut h = Harness::new(
            b"windowsize\x008\x00",
            vec![5; 100_000],
            SessionConfig::default(),
        );
        h.drain();
        h.now += Duration::from_millis(1);
        let first = h.ack(0);
        assert_eq!(blocks(&first), (1..=8).collect::<Vec<_>>());
        let intervals: Vec<u128> = intervals_until_done(&mut h, &first)
            .iter()
            .map(Duration::as_millis)
            .collect();
        assert_eq!(
            intervals,
            [200, 400, 800, 1000, 2000, 4000, 8000, 8000, 8000]
        );
        let stats = h.session.stats();
        assert_eq!((stats.early_retransmits, stats.retransmits), (3, 5));
    }

    #[test]
    fn adaptive_retransmits_early_then_falls_back_to_the_full_schedule() {
        let mut h = Harness::new(
            b"windowsize\x002\x00",
            vec![5; 10_000],
            SessionConfig::default(),
        );
        h.drain();
        // Three round trips of 10 ms: srtt 10 ms, rttvar 5 → 3.75 → 2.8125 ms, estimate
        // 10 + 4 × 2.8125 = 21.25 ms (above 1.5 × the largest sample, 15 ms).
        let mut first = Vec::new();
        for block in [0, 2, 4] {
            h.now += Duration::from_millis(10);
            first = h.ack(block);
        }
        assert_eq!(blocks(&first), vec![5, 6]);
        assert_eq!(h.session.stats().srtt, Some(Duration::from_millis(10)));
        let intervals: Vec<u128> = intervals_until_done(&mut h, &first)
            .iter()
            .map(Duration::as_micros)
            .collect();
        // Early: 21.25 ms doubling while below the 1 s timeout; then the full schedule
        // with exactly the retry budget; then the session gives up.
        let ms = 1000;
        assert_eq!(
            intervals,
            [
                21_250,
                42_500,
                85_000,
                170_000,
                340_000,
                680_000,
                1000 * ms,
                2000 * ms,
                4000 * ms,
                8000 * ms,
                8000 * ms,
                8000 * ms
            ]
        );
        let stats = h.session.stats();
        assert_eq!((stats.early_retransmits, stats.retransmits), (6, 5));
        assert_eq!(stats.outcome, Some(Outcome::TimedOut));
    }

    #[test]
    fn early_resends_stay_backed_off_until_a_round_trip_is_measured() {
        // Three round trips of 10 ms: the early timer's estimate is 21.25 ms.
        let established = || {
            let mut h = Harness::new(b"", vec![5; 10_000], SessionConfig::default());
            h.drain();
            for block in 1..=3 {
                h.now += Duration::from_millis(10);
                assert_eq!(blocks(&h.ack(block)), vec![block + 1]);
            }
            h
        };
        let estimate = Duration::from_micros(21_250);
        // A client that falls behind (a guest starved of CPU): its ACKs come 30 ms after
        // each early resend, later than the estimate, so they answer the first sends,
        // and acknowledge only resent blocks (no round-trip sample: Karn's rule).
        // Progress used to start the early timer over at the estimate, and every block
        // went twice; now each early resend doubles it, progress or not.
        let mut h = established();
        assert_eq!(h.drain().1, Output::Wait(h.now + estimate));
        for (block, doublings) in (4..=7).zip(0..) {
            let (interval, sent) = fire(&mut h);
            assert_eq!(interval, estimate * (1 << doublings), "block {block}");
            assert_eq!(blocks(&sent), vec![block]);
            h.now += Duration::from_millis(30);
            assert_eq!(blocks(&h.ack(block)), vec![block + 1]);
        }
        assert_eq!(h.session.stats().srtt, Some(Duration::from_millis(10)));
        // Block 8 went once: its ACK, 150 ms on, measures the round trip, and the early
        // timer runs at the estimate again (the new one).
        h.now += Duration::from_millis(150);
        assert_eq!(blocks(&h.ack(8)), vec![9]);
        let new_estimate = h.session.rtt.rto(h.session.config.min_rto).unwrap();
        assert!(
            new_estimate > Duration::from_millis(100),
            "{new_estimate:?}"
        );
        assert_eq!(h.drain().1, Output::Wait(h.now + new_estimate));

        // A resend answered within the estimate was needed (the first send was lost) and
        // shows that the client keeps up: the next early timer is not backed off.
        let mut h = established();
        let (interval, sent) = fire(&mut h);
        assert_eq!((interval, blocks(&sent)), (estimate, vec![4]));
        h.now += Duration::from_millis(10);
        assert_eq!(blocks(&h.ack(4)), vec![5]);
        assert_eq!(h.drain().1, Output::Wait(h.now + estimate));

        // An answer sooner than half a round trip after the resend is not the resend's:
        // it answers the first send, which came just past the estimate, so the resend
        // was needless and the backoff stays (ending it here made every later block go
        // twice for a client whose answers came between the estimate and twice it).
        let mut h = established();
        let (interval, sent) = fire(&mut h);
        assert_eq!((interval, blocks(&sent)), (estimate, vec![4]));
        h.now += Duration::from_millis(1);
        assert_eq!(blocks(&h.ack(4)), vec![5]);
        assert_eq!(h.drain().1, Output::Wait(h.now + estimate * 2));
    }

    #[test]
    fn adaptive_timeout_never_exceeds_the_clients_timeout() {
        // The client chose 20 ms: the estimate (21.25 ms) is not below it, so only the
        // client's interval is used.
        let mut h = Harness::new(
            b"utimeout\x0020000\x00windowsize\x002\x00",
            vec![5; 10_000],
            SessionConfig::default(),
        );
        h.drain();
        for block in [0, 2, 4] {
            h.now += Duration::from_millis(10);
            h.ack(block);
        }
        let (interval, sent) = fire(&mut h);
        assert_eq!((interval, sent.len()), (Duration::from_millis(20), 2));
        assert_eq!(h.session.stats().early_retransmits, 0);
    }

    #[test]
    fn rtt_is_never_sampled_from_a_resent_packet() {
        let mut h = Harness::new(b"", vec![5; 5000], SessionConfig::default());
        h.drain();
        // DATA 1 is resent at 1 s (no estimate yet); its ACK at 1.5 s is ambiguous.
        assert_eq!(h.advance(Duration::from_secs(1)).len(), 1);
        h.now += Duration::from_millis(500);
        assert_eq!(blocks(&h.ack(1)), vec![2]);
        assert_eq!(h.session.stats().srtt, None, "Karn's rule");
        // DATA 2, 3 and 4 were sent once: their ACKs after 4 ms are samples.
        for block in [2, 3, 4] {
            h.now += Duration::from_millis(4);
            assert_eq!(blocks(&h.ack(block)), vec![block + 1]);
        }
        assert_eq!(h.session.stats().srtt, Some(Duration::from_millis(4)));
        // rttvar 2 → 1.5 → 1.125 ms: estimate 4 + 4 × 1.125 = 8.5 ms.
        assert_eq!(fire(&mut h).0, Duration::from_micros(8500));
    }

    #[test]
    fn estimate_has_a_floor_and_adaptive_can_be_turned_off() {
        for (adaptive, unsettled, want) in [(true, 200_000, 500), (false, 1_000_000, 1_000_000)] {
            let config = SessionConfig {
                adaptive,
                ..SessionConfig::default()
            };
            let mut h = Harness::new(b"tsize\x000\x00", vec![5; 2000], config);
            h.drain();
            // ACKs in no time at all; with two samples the early timer waits 200 ms.
            h.ack(0);
            h.ack(1);
            let unsettled = Duration::from_micros(unsettled);
            assert_eq!(h.drain().1, Output::Wait(h.now + unsettled));
            h.ack(2);
            assert_eq!(fire(&mut h).0, Duration::from_micros(want));
        }
    }

    #[test]
    fn final_ack_missing_is_its_own_outcome() {
        let config = SessionConfig {
            retries: 1,
            ..SessionConfig::default()
        };
        let mut h = Harness::new(b"", vec![1; 10], config);
        h.drain();
        assert_eq!(h.advance(Duration::from_secs(1)).len(), 1);
        h.advance(Duration::from_secs(2));
        assert_eq!(
            h.session.poll_output(1),
            Output::Done(Outcome::FinalAckMissing)
        );
    }

    #[test]
    fn errors_from_the_client_end_without_reply() {
        let mut h = Harness::new(b"tsize\x000\x00", vec![1; 10], SessionConfig::default());
        h.drain();
        h.session
            .handle_datagram(h.now, b"\x00\x05\x00\x08tsize probe\x00");
        assert_eq!(h.drain(), (vec![], Output::Done(Outcome::Probe)));
        assert_eq!(
            h.session.stats().peer_error,
            Some((ErrorCode::OptionNegotiation, "tsize probe".into()))
        );

        let mut h = Harness::new(b"", vec![1; 1000], SessionConfig::default());
        h.drain();
        h.session
            .handle_datagram(h.now, b"\x00\x05\x00\x00stop\x00");
        assert_eq!(
            h.drain(),
            (
                vec![],
                Output::Done(Outcome::PeerError(ErrorCode::NotDefined))
            )
        );
    }

    fn close(h: &mut Harness) -> (Vec<Vec<u8>>, Output<'static>) {
        h.session
            .handle_datagram(h.now, b"\x00\x05\x00\x00closed\x00");
        h.drain()
    }

    #[test]
    fn a_client_that_closes_after_every_byte_was_acknowledged_completed() {
        // GRUB: blksize 1024 and tsize; a file of exactly 3 × 1024 bytes ends with an
        // empty DATA 4. GRUB acknowledges DATA 3, has every byte `tsize` promised and
        // closes: when DATA 4 is lost, its ERROR 0 "closed" comes instead of ACK 4.
        let options = b"blksize\x001024\x00tsize\x000\x00";
        let mut h = Harness::new(options, vec![9; 3 * 1024], SessionConfig::default());
        h.drain();
        for block in 0..3 {
            assert_eq!(blocks(&h.ack(block)), vec![block + 1]);
        }
        assert_eq!(h.ack(3), vec![data(4, b"")]);
        assert_eq!(close(&mut h), (vec![], Output::Done(Outcome::Completed)));
        let stats = h.session.stats();
        assert_eq!(stats.outcome, Some(Outcome::Completed));
        assert_eq!(
            stats.peer_error,
            Some((ErrorCode::NotDefined, "closed".into())),
            "the client's ERROR is kept"
        );

        // Before the last full block is acknowledged, the same ERROR is a failure.
        let mut h = Harness::new(options, vec![9; 3 * 1024], SessionConfig::default());
        h.drain();
        for block in 0..2 {
            h.ack(block);
        }
        let failed = || Output::Done(Outcome::PeerError(ErrorCode::NotDefined));
        assert_eq!(close(&mut h), (vec![], failed()));
        // So it is when the last block carries data: only its ACK acknowledges it.
        let mut h = Harness::new(options, vec![9; 3 * 1024 + 5], SessionConfig::default());
        h.drain();
        for block in 0..4 {
            h.ack(block);
        }
        assert_eq!(close(&mut h), (vec![], failed()));
        // And right after the OACK nothing was acknowledged.
        let mut h = Harness::new(options, vec![9; 3 * 1024], SessionConfig::default());
        h.drain();
        assert_eq!(close(&mut h), (vec![], failed()));

        // With a window: blocks 1..=4 full and an empty 5 go out together; ACK 4 is
        // every byte.
        let options = b"blksize\x008\x00windowsize\x008\x00";
        let mut h = Harness::new(options, vec![9; 32], SessionConfig::default());
        h.drain();
        assert_eq!(blocks(&h.ack(0)), vec![1, 2, 3, 4, 5]);
        // The client lost DATA 5: a go-back resends it (and that is lost too).
        assert_eq!(blocks(&h.ack(4)), vec![5]);
        assert_eq!(close(&mut h), (vec![], Output::Done(Outcome::Completed)));
        let mut h = Harness::new(options, vec![9; 32], SessionConfig::default());
        h.drain();
        h.ack(0);
        assert!(h.ack(3).len() == 2, "a go-back from 4");
        assert_eq!(close(&mut h), (vec![], failed()));
    }

    /// A source of `data` that announces its size and then would block for ever: the end
    /// is never read.
    struct Unended {
        data: Vec<u8>,
        pos: usize,
    }

    impl ResponseData for Unended {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.data.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }

        fn size(&self) -> Option<u64> {
            Some(self.data.len() as u64)
        }
    }

    #[test]
    fn before_the_end_is_read_every_byte_is_the_announced_size() {
        let start = Instant::now();
        let source = Unended {
            data: vec![4; 2 * 512],
            pos: 0,
        };
        let mut h = Harness {
            now: start,
            session: Session::new(
                start,
                Options::parse(b"tsize\x000\x00").unwrap(),
                Mode::Octet,
                Box::new(source),
                SessionConfig::default(),
            ),
        };
        h.drain();
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        assert_eq!(blocks(&h.ack(1)), vec![2]);
        // Block 3 would block: its end is unknown, but the client has the 1024 bytes
        // announced.
        assert!(h.ack(2).is_empty());
        assert_eq!(close(&mut h), (vec![], Output::Done(Outcome::Completed)));
    }

    #[test]
    fn a_repeated_request_resends_a_lost_first_reply_clocked_within_the_retries() {
        let ms = Duration::from_millis;
        let options = b"blksize\x001024\x00tsize\x000\x00";
        let mut h = Harness::new(options, vec![1; 5000], SessionConfig::default());
        // Repeated before the first reply went out: nothing to resend.
        h.session.handle_repeated_request(h.now);
        let (sent, _) = h.drain();
        assert_eq!(sent.len(), 1, "one OACK");
        let oack = sent[0].clone();
        let start = h.now;
        // GRUB: the OACK was lost, the request comes again at 0.40 s and 0.83 s. Each
        // time the OACK goes again, as if the timer had fired: a retry spent, and the
        // interval doubled from there.
        h.now = start + ms(400);
        h.session.handle_repeated_request(h.now);
        assert_eq!(
            h.drain(),
            (vec![oack.clone()], Output::Wait(h.now + ms(2000)))
        );
        // A repeat within the go-back interval (20 ms while nothing was measured) may
        // have crossed that resend: no evidence.
        assert_eq!(UNMEASURED_GO_BACK_INTERVAL, ms(20));
        h.now += ms(19);
        h.session.handle_repeated_request(h.now);
        assert!(h.drain().0.is_empty());
        h.now = start + ms(830);
        h.session.handle_repeated_request(h.now);
        assert_eq!(
            h.drain(),
            (vec![oack.clone()], Output::Wait(h.now + ms(4000)))
        );
        let stats = h.session.stats();
        assert_eq!(
            (
                stats.repeated_requests,
                stats.repeat_resends,
                stats.retransmits
            ),
            (4, 2, 2)
        );
        // A flood of repeats, one a millisecond: one resend per interval, and no more
        // than the retry budget allows (5), so never more than the timer would send.
        let mut resent_at = Vec::new();
        for _ in 0..1000 {
            h.now += ms(1);
            h.session.handle_repeated_request(h.now);
            let (sent, _) = h.drain();
            assert!(sent.iter().all(|p| *p == oack));
            resent_at.extend(sent.iter().map(|_| (h.now - start).as_millis()));
        }
        assert_eq!(resent_at, [850, 870, 890]);
        let stats = h.session.stats();
        assert_eq!((stats.repeat_resends, stats.retransmits), (5, 5));
        assert_eq!(stats.packets_sent, 1 + 5);
        // The budget is spent: the timer ends the session (8 s after the last resend).
        let (interval, sent) = fire(&mut h);
        assert!(sent.is_empty());
        assert_eq!(interval, Duration::from_secs(8) - ms(1000 - 60));
        assert_eq!(h.session.stats().outcome, Some(Outcome::TimedOut));

        // Without options the first reply is DATA 1.
        let mut h = Harness::new(b"", vec![1; 5000], SessionConfig::default());
        assert_eq!(blocks(&h.drain().0), vec![1]);
        h.now += ms(400);
        h.session.handle_repeated_request(h.now);
        assert_eq!(blocks(&h.drain().0), vec![1]);
        let stats = h.session.stats();
        assert_eq!((stats.packets_resent, stats.retransmits), (1, 1));
        // Once the peer acknowledged something, a repeat is only counted.
        h.now += ms(10);
        assert_eq!(blocks(&h.ack(1)), vec![2]);
        h.now += ms(400);
        h.session.handle_repeated_request(h.now);
        assert!(h.drain().0.is_empty());
        let stats = h.session.stats();
        assert_eq!((stats.repeated_requests, stats.repeat_resends), (2, 1));
    }

    #[test]
    fn duplicates_before_the_early_timer_has_samples_still_recover_in_milliseconds() {
        // EDK2: windowsize 4. Two round trips of 1 ms measured (too few for the early
        // timer), then DATA 5 is lost and the client answers 6, 7 and 8 with ACK 4 at
        // once. Those duplicates come too soon to be evidence, but owe a go-back once
        // DATA 5 has been out for the estimate (1 + 4 × 0.375 = 2.5 ms), not the 1 s
        // timer.
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let options = b"blksize\x008\x00windowsize\x004\x00";
        let mut h = Harness::new(options, vec![3; 800], SessionConfig::default());
        h.drain();
        h.now += ms(1);
        assert_eq!(blocks(&h.ack(0)), vec![1, 2, 3, 4]);
        h.now += ms(1);
        assert_eq!(blocks(&h.ack(4)), vec![5, 6, 7, 8]);
        let sent = h.now;
        for _ in 0..3 {
            h.now += us(200);
            assert!(h.ack(4).is_empty());
        }
        assert_eq!(h.drain().1, Output::Wait(sent + us(2500)));
        assert_eq!(
            blocks(&h.advance(sent + us(2500) - h.now)),
            vec![5, 6, 7, 8]
        );
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (1, 3));
        assert_eq!((stats.retransmits, stats.early_retransmits), (0, 0));
        // An ACK of everything sent cancels what duplicates owe.
        h.now += ms(1);
        assert_eq!(blocks(&h.ack(8)), vec![9, 10, 11, 12]);
        h.now += us(100);
        assert!(h.ack(8).is_empty());
        h.now += ms(1);
        assert_eq!(blocks(&h.ack(12)), vec![13, 14, 15, 16]);
        let Output::Wait(next) = h.drain().1 else {
            panic!("not waiting")
        };
        assert!(next > h.now + ms(2), "nothing owed");
    }

    #[test]
    fn illegal_packets_and_garbage() {
        let mut h = Harness::new(b"", vec![1; 1000], SessionConfig::default());
        h.drain();
        h.session.handle_datagram(h.now, b"\x00");
        assert_eq!(h.drain().0, Vec::<Vec<u8>>::new());
        assert_eq!(h.session.stats().malformed, 1);
        h.session.handle_datagram(h.now, b"\x00\x03\x00\x01hi");
        let (sent, out) = h.drain();
        assert_eq!(sent[0][..4], *b"\x00\x05\x00\x04");
        assert_eq!(out, Output::Done(Outcome::IllegalOperation));
    }

    struct FailAfter(usize);

    impl ResponseData for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk on fire: /secret/path"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
    }

    /// Drains a session, keeping what each transmit says about itself:
    /// (datagrams, payload bytes, retransmission).
    fn transmits(s: &mut Session, max: usize) -> Vec<(usize, u64, Option<Retransmission>)> {
        let mut out = Vec::new();
        while let Output::Transmit(t) = s.poll_output(max) {
            out.push((t.datagrams, t.payload, t.retransmission));
        }
        out
    }

    #[test]
    fn the_first_transmit_after_a_timer_says_which_timer_fired() {
        let mut now = Instant::now();
        let options = Options::parse(b"blksize\x008\x00windowsize\x004\x00").unwrap();
        let config = SessionConfig::default();
        let source = Box::new(BytesSource::new(vec![5; 100]));
        let mut s = Session::new(now, options, Mode::Octet, source, config);
        // The OACK, then its resend after the full timeout.
        assert_eq!(transmits(&mut s, 64), vec![(1, 0, None)]);
        now += Duration::from_secs(1);
        s.handle_timeout(now);
        assert_eq!(
            transmits(&mut s, 64),
            vec![(1, 0, Some(Retransmission::Timeout))]
        );
        // A window of four blocks in one transmit, then its resend.
        s.handle_packet(now, Packet::Ack { block: 0 });
        assert_eq!(transmits(&mut s, 64), vec![(4, 32, None)]);
        now += Duration::from_secs(1);
        s.handle_timeout(now);
        assert_eq!(
            transmits(&mut s, 64),
            vec![(4, 32, Some(Retransmission::Timeout))]
        );
        // One at a time, only the first carries the mark.
        now += Duration::from_secs(2);
        s.handle_timeout(now);
        assert_eq!(
            transmits(&mut s, 1),
            vec![
                (1, 8, Some(Retransmission::Timeout)),
                (1, 8, None),
                (1, 8, None),
                (1, 8, None)
            ]
        );
        assert_eq!(s.stats().retransmits, 3);

        // Lock step with fast ACKs: three samples, then an early resend.
        let mut now = Instant::now();
        let source = Box::new(BytesSource::new(vec![5; 5000]));
        let mut s = Session::new(now, Options::EMPTY, Mode::Octet, source, config);
        for block in 1..=3 {
            assert_eq!(transmits(&mut s, 64), vec![(1, 512, None)]);
            now += Duration::from_millis(1);
            s.handle_packet(now, Packet::Ack { block });
        }
        assert_eq!(transmits(&mut s, 64), vec![(1, 512, None)]);
        now += Duration::from_millis(50);
        s.handle_timeout(now);
        assert_eq!(
            transmits(&mut s, 64),
            vec![(1, 512, Some(Retransmission::Early))]
        );
        assert_eq!((s.stats().early_retransmits, s.stats().retransmits), (1, 0));
    }

    #[test]
    fn read_error_sends_generic_error_0() {
        let now = Instant::now();
        let mut s = Session::new(
            now,
            Options::EMPTY,
            Mode::Octet,
            Box::new(FailAfter(512)),
            SessionConfig::default(),
        );
        assert!(matches!(s.poll_output(1), Output::Transmit(_)));
        s.handle_packet(now, Packet::Ack { block: 1 });
        let Output::Transmit(err) = s.poll_output(1) else {
            panic!()
        };
        assert_eq!(err.contents, b"\x00\x05\x00\x00error reading file\x00");
        assert_eq!(s.poll_output(1), Output::Done(Outcome::ReadFailed));
        assert_eq!(s.stats().errors_sent, 1);
    }

    /// Drains a session: with `runs`, up to that many datagrams per transmit (runs split
    /// into their packets), else one at a time.
    fn drain_with(
        s: &mut Session,
        runs: usize,
        used: &mut usize,
    ) -> (Vec<Vec<u8>>, Output<'static>) {
        let mut sent = Vec::new();
        loop {
            match s.poll_output(runs.max(1)) {
                Output::Transmit(run) if run.datagrams > 1 => {
                    *used += 1;
                    assert!(run.datagrams <= runs);
                    let chunks: Vec<_> = run.segments().collect();
                    assert_eq!(chunks.len(), run.datagrams);
                    assert!(chunks[..run.datagrams - 1]
                        .iter()
                        .all(|c| c.len() == run.segment_size));
                    let payload: usize = chunks.iter().map(|c| c.len() - DATA_HEADER_LEN).sum();
                    assert_eq!(run.payload, payload as u64);
                    sent.extend(chunks.into_iter().map(<[u8]>::to_vec));
                }
                Output::Transmit(one) => sent.push(one.contents.to_vec()),
                Output::Wait(t) => return (sent, Output::Wait(t)),
                Output::Done(o) => return (sent, Output::Done(o)),
            }
        }
    }

    /// Reads in pieces of a fixed size and says WouldBlock every `block_every` calls;
    /// with `vectored`, a vectored read spreads its piece over the buffers.
    struct Choppy {
        data: Vec<u8>,
        pos: usize,
        calls: usize,
        piece: usize,
        block_every: usize,
        vectored: bool,
    }

    impl Choppy {
        fn new(data: Vec<u8>, piece: usize, block_every: usize, vectored: bool) -> Choppy {
            Choppy {
                data,
                pos: 0,
                calls: 0,
                piece,
                block_every,
                vectored,
            }
        }
    }

    impl ResponseData for Choppy {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.read_vectored(&mut [IoSliceMut::new(buf)])
        }

        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.block_every > 0 && self.calls % self.block_every == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let bufs = if self.vectored { bufs } else { &mut bufs[..1] };
            let mut budget = self.piece.min(self.data.len() - self.pos);
            let mut total = 0;
            for buf in bufs {
                let n = buf.len().min(budget);
                buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
                self.pos += n;
                total += n;
                budget -= n;
            }
            Ok(total)
        }
    }

    #[test]
    fn data_runs_send_exactly_what_poll_output_sends() {
        for (size, blksize, window, runs, lose_every, piece, block_every, vectored) in [
            (100_000, 512, 16, 64, 0, 1 << 20, 0, true),
            (100_000, 512, 16, 64, 7, 1300, 0, true),
            (10_000, 8, 7, 3, 5, 300, 0, true),
            (5_000, 512, 16, 64, 0, 1 << 20, 0, true),
            (8192, 512, 16, 64, 0, 1 << 20, 0, true),
            (200_000, 512, 200, 64, 3, 1 << 20, 0, true),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let options = format!("blksize\0{blksize}\0windowsize\0{window}\0");
            let mut now = Instant::now();
            let sessions: Vec<Session> = (0..2)
                .map(|_| {
                    Session::new(
                        now,
                        Options::parse(options.as_bytes()).unwrap(),
                        Mode::Octet,
                        Box::new(Choppy::new(data.clone(), piece, block_every, vectored)),
                        SessionConfig::default(),
                    )
                })
                .collect();
            let [mut plain, mut batched]: [Session; 2] = sessions.try_into().unwrap();
            let mut step = 0;
            let mut used = 0;
            let mut woken = 0;
            loop {
                step += 1;
                assert!(step < 100_000, "no end");
                let a = drain_with(&mut plain, 0, &mut 0);
                let b = drain_with(&mut batched, runs, &mut used);
                assert_eq!(
                    a, b,
                    "size {size} blksize {blksize} window {window} piece {piece} vectored {vectored} step {step}"
                );
                if let Output::Done(_) = a.1 {
                    break;
                }
                // The client acknowledges the last DATA it got, or (every `lose_every`
                // steps) an earlier one, or wakes the source when nothing was sent.
                let last_block = a.0.iter().rev().find_map(|p| match Packet::parse(p) {
                    Ok(Packet::Data { block, .. }) => Some(block),
                    Ok(Packet::Oack(_)) => Some(0),
                    _ => None,
                });
                match last_block {
                    Some(block) => {
                        woken = 0;
                        let block = if lose_every > 0 && step % lose_every == 0 {
                            block.wrapping_sub(1)
                        } else {
                            block
                        };
                        for s in [&mut plain, &mut batched] {
                            s.handle_packet(now, Packet::Ack { block });
                        }
                    }
                    // Nothing sent: the source was not ready (wake it; a choppy source
                    // may need several wakes for one block), or, if waking does not
                    // help, only the timer can (after an old ACK).
                    None if woken < 20 => {
                        woken += 1;
                        for s in [&mut plain, &mut batched] {
                            s.handle_source_ready(now);
                        }
                        continue;
                    }
                    None => {
                        let Output::Wait(deadline) = a.1 else {
                            unreachable!()
                        };
                        now = deadline;
                        for s in [&mut plain, &mut batched] {
                            s.handle_timeout(now);
                        }
                    }
                }
            }
            assert_eq!(plain.stats(), batched.stats());
            assert_eq!(
                plain.stats().outcome,
                Some(Outcome::Completed),
                "size {size} window {window}"
            );
            assert_eq!(plain.stats().bytes_read, size as u64);
            // Runs were used wherever a window holds two full blocks.
            assert_eq!(
                used > 0,
                window > 1 && size >= 2 * blksize,
                "size {size} window {window}"
            );
        }
    }

    #[test]
    fn a_vectored_source_is_read_once_per_window() {
        let data: Vec<u8> = (0..512 * 16 * 20).map(|i| (i % 253) as u8).collect();
        let now = Instant::now();
        let options = Options::parse(b"windowsize\x0016\x00").unwrap();
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let source = Box::new(Counted(
            Choppy::new(data.clone(), usize::MAX, 0, true),
            calls.clone(),
        ));
        let mut s = Session::new(now, options, Mode::Octet, source, SessionConfig::default());
        let mut got = Vec::new();
        let mut used = 0;
        loop {
            let (sent, out) = drain_with(&mut s, 64, &mut used);
            let mut last = 0;
            for p in &sent {
                if let Ok(Packet::Data { block, data }) = Packet::parse(p) {
                    got.extend_from_slice(data);
                    last = block;
                }
            }
            if matches!(out, Output::Done(_)) {
                break;
            }
            s.handle_packet(now, Packet::Ack { block: last });
        }
        assert_eq!(got, data);
        assert_eq!(s.stats().outcome, Some(Outcome::Completed));
        // 20 windows of 16 full blocks, then the empty last block: one vectored read per
        // window and the reads that find the end.
        assert!(calls.get() <= 20 + 2, "{} source calls", calls.get());
    }

    /// Counts the calls into its source.
    struct Counted<R>(R, std::rc::Rc<std::cell::Cell<usize>>);

    impl<R: ResponseData> ResponseData for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1.set(self.1.get() + 1);
            self.0.read(buf)
        }

        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
            self.1.set(self.1.get() + 1);
            self.0.read_vectored(bufs)
        }
    }

    struct FailWith(io::ErrorKind);

    impl ResponseData for FailWith {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(self.0, "upstream said so"))
        }
    }

    #[test]
    fn late_not_found_and_permission_errors_keep_their_codes() {
        for (kind, want) in [
            (
                io::ErrorKind::NotFound,
                &b"\x00\x05\x00\x01file not found\x00"[..],
            ),
            (
                io::ErrorKind::PermissionDenied,
                &b"\x00\x05\x00\x02access violation\x00"[..],
            ),
            (
                io::ErrorKind::TimedOut,
                &b"\x00\x05\x00\x00error reading file\x00"[..],
            ),
        ] {
            let mut s = Session::new(
                Instant::now(),
                Options::EMPTY,
                Mode::Octet,
                Box::new(FailWith(kind)),
                SessionConfig::default(),
            );
            let Output::Transmit(err) = s.poll_output(1) else {
                panic!()
            };
            assert_eq!(err.contents, want, "{kind:?}");
            assert_eq!(s.poll_output(1), Output::Done(Outcome::ReadFailed));
        }
    }

    /// Returns WouldBlock until `ready` is set.
    struct Gate {
        ready: std::rc::Rc<std::cell::Cell<bool>>,
        inner: BytesSource,
    }

    impl ResponseData for Gate {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ready.get() {
                self.inner.read(buf)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    #[test]
    fn would_block_parks_until_ready_and_stalls_by_deadline() {
        let ready = std::rc::Rc::new(std::cell::Cell::new(false));
        let now = Instant::now();
        let config = SessionConfig::default();
        let mut s = Session::new(
            now,
            Options::EMPTY,
            Mode::Octet,
            Box::new(Gate {
                ready: ready.clone(),
                inner: BytesSource::new(vec![9; 3]),
            }),
            config,
        );
        assert_eq!(s.poll_output(1), Output::Wait(now + config.source_timeout));
        // Input without readiness does not re-read or send.
        s.handle_packet(now, Packet::Ack { block: 0 });
        assert_eq!(s.poll_output(1), Output::Wait(now + config.source_timeout));
        ready.set(true);
        s.handle_source_ready(now);
        let Output::Transmit(first) = s.poll_output(1) else {
            panic!("no DATA 1")
        };
        assert_eq!(first.contents, data(1, &[9; 3]));

        ready.set(false);
        let mut s = Session::new(
            now,
            Options::EMPTY,
            Mode::Octet,
            Box::new(Gate {
                ready,
                inner: BytesSource::new(vec![9; 3]),
            }),
            config,
        );
        let Output::Wait(deadline) = s.poll_output(1) else {
            panic!()
        };
        s.handle_timeout(deadline);
        let Output::Transmit(err) = s.poll_output(1) else {
            panic!()
        };
        assert_eq!(err.contents[..4], *b"\x00\x05\x00\x00");
        assert_eq!(s.poll_output(1), Output::Done(Outcome::SourceStalled));
    }

    #[test]
    fn block_numbers_wrap_to_zero() {
        // blksize 8: block 65535 holds bytes up to 524280; the next block is numbered 0.
        let size = 8 * 65536 + 3;
        let mut h = Harness::new(b"blksize\x008\x00", vec![0; size], SessionConfig::default());
        h.drain();
        let mut sent = h.ack(0);
        let mut expected = 1u16;
        let mut count = 0u32;
        while !h.session.is_done() {
            let [block] = blocks(&sent)[..] else { panic!() };
            assert_eq!(block, expected);
            expected = expected.wrapping_add(1);
            count += 1;
            sent = h.ack(block);
        }
        assert_eq!(count, 65537);
        assert_eq!(h.session.stats().outcome, Some(Outcome::Completed));
    }

    /// Serves `data` but announces `size`.
    struct Sized {
        data: BytesSource,
        size: u64,
    }

    impl ResponseData for Sized {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.data.read(buf)
        }
        fn size(&self) -> Option<u64> {
            Some(self.size)
        }
    }

    #[test]
    fn size_mismatch_is_recorded_when_the_data_ends() {
        for (mode, announced, real, want) in [
            (Mode::Octet, 5000, 1000, Some(5000)),
            (Mode::Octet, 1000, 5000, Some(1000)),
            (Mode::Octet, 0, 512, Some(0)),
            (Mode::Octet, 1024, 1024, None),
            // Netascii announces no size at all.
            (Mode::Netascii, 5000, 1000, None),
        ] {
            let source = Sized {
                data: BytesSource::new(vec![b'x'; real]),
                size: announced,
            };
            let options = Options::parse(b"tsize\x000\x00").unwrap();
            let mut h = Harness {
                now: Instant::now(),
                session: Session::new(
                    Instant::now(),
                    options,
                    mode,
                    Box::new(source),
                    SessionConfig::default(),
                ),
            };
            let mut sent = h.drain().0;
            if mode == Mode::Octet {
                // Only the OACK so far: the end is not known before it has been read.
                assert_eq!(h.session.stats().size_mismatch, None);
                sent = h.ack(0);
            }
            for _ in 0..100 {
                if h.session.is_done() {
                    break;
                }
                let [block] = blocks(&sent)[..] else { panic!() };
                sent = h.ack(block);
            }
            let stats = h.session.stats();
            assert_eq!(stats.outcome, Some(Outcome::Completed));
            assert_eq!(stats.bytes_read, real as u64);
            assert_eq!(stats.size_mismatch, want, "{mode:?} {announced} vs {real}");
        }
    }

    /// Returns `Interrupted` `interruptions` times in a row before each byte.
    struct Interrupting {
        interruptions: u32,
        left: u32,
        bytes: usize,
    }

    impl ResponseData for Interrupting {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left > 0 {
                self.left -= 1;
                return Err(io::ErrorKind::Interrupted.into());
            }
            self.left = self.interruptions;
            if self.bytes == 0 || buf.is_empty() {
                return Ok(0);
            }
            self.bytes -= 1;
            buf[0] = b'i';
            Ok(1)
        }
    }

    #[test]
    fn interrupted_is_retried_but_never_forever() {
        let config = SessionConfig {
            source_timeout: Duration::from_secs(2),
            ..SessionConfig::default()
        };
        let session = |interruptions| {
            let source = Interrupting {
                interruptions,
                left: interruptions,
                bytes: 3,
            };
            let now = Instant::now();
            Harness {
                now,
                session: Session::new(now, Options::EMPTY, Mode::Octet, Box::new(source), config),
            }
        };
        // A few interruptions in a row are retried at once.
        let mut h = session(MAX_INTERRUPTED);
        assert_eq!(h.drain().0, vec![data(1, b"iii")]);
        // Forever: the source counts as not ready, and the session ends by its deadline.
        let mut h = session(u32::MAX);
        let (sent, wait) = h.drain();
        assert!(sent.is_empty());
        assert_eq!(wait, Output::Wait(h.now + Duration::from_secs(2)));
        assert_eq!(h.advance(Duration::from_secs(2)).len(), 1, "ERROR 0");
        assert_eq!(h.session.stats().outcome, Some(Outcome::SourceStalled));
    }

    /// A blind attacker's session: blksize 1428, a window of 64 blocks (no byte cap),
    /// 10 MB to send, the OACK already acknowledged with ACK 0 at `start`.
    fn attacked(config: SessionConfig) -> (Harness, usize) {
        let config = SessionConfig {
            limits: Limits {
                max_window: 64,
                max_window_bytes: usize::MAX,
                ..Limits::default()
            },
            ..config
        };
        let mut h = Harness::new(
            b"blksize\x001428\x00windowsize\x0064\x00",
            vec![0xa5; 10_000_000],
            config,
        );
        h.drain();
        h.session.handle_ack(h.now, 0);
        let first = h.drain_gso();
        assert_eq!(first, 64 * 1428, "the first window");
        (h, 64 * 1428)
    }

    impl Harness {
        /// Drains as a GSO driver does; returns the DATA payload bytes sent.
        fn drain_gso(&mut self) -> u64 {
            let mut payload = 0;
            while let Output::Transmit(t) = self.session.poll_output(64) {
                payload += t.payload;
            }
            payload
        }
    }

    impl Session {
        fn handle_ack(&mut self, now: Instant, block: u16) {
            self.handle_packet(now, Packet::Ack { block });
        }
    }

    /// The bound of issue 15 item 1: one ACK releases at most what it newly acknowledges,
    /// plus one window when it causes a go-back-N (never more than one).
    #[track_caller]
    fn assert_released_within_bound(
        h: &Harness,
        before: &TransferStats,
        released: u64,
        window: u64,
    ) {
        let after = h.session.stats();
        let newly = (after.blocks_acked - before.blocks_acked) * 1428;
        let go_backs = after.go_back_acks - before.go_back_acks;
        assert!(go_backs <= 1);
        assert!(
            released <= newly + go_backs * window,
            "{released} bytes released by an ACK that acknowledged {newly} (go-backs {go_backs})"
        );
    }

    /// The go-back clock as an observer holds it to: a token bucket of [`GO_BACK_BURST`]
    /// go-back-Ns refilled one per [`MIN_GO_BACK_INTERVAL`], the floor of the session's
    /// interval whatever round trip it measured. Every go-back-N takes a token; one that
    /// an ACK or an early retransmission caused must find one. So in any span `d` there
    /// are at most `GO_BACK_BURST + d / MIN_GO_BACK_INTERVAL` of them.
    #[derive(Default)]
    struct GoBackBucket {
        /// The bucket's theoretical time (GCRA), as the session's own clock.
        clock: Option<Instant>,
    }

    impl GoBackBucket {
        /// Records a go-back-N at `now`; false when it came before the bucket allowed it.
        fn take(&mut self, now: Instant) -> bool {
            let tolerance = MIN_GO_BACK_INTERVAL * (GO_BACK_BURST - 1);
            let allowed = self.clock.is_none_or(|clock| now + tolerance >= clock);
            self.clock =
                Some(self.clock.map_or(now, |clock| clock.max(now)) + MIN_GO_BACK_INTERVAL);
            allowed
        }
    }

    /// Go-back-Ns of any cause so far, and how many of them the timer's full schedule
    /// made (those need no token).
    fn go_backs_of(stats: &TransferStats) -> (u64, u64) {
        let all = stats.go_back_acks + stats.retransmits + stats.early_retransmits;
        (all, stats.retransmits)
    }

    #[test]
    fn a_blind_attacker_acking_every_block_gets_one_window_per_interval_at_most() {
        // The attacker paces ACK 1, 2, 3, … every `pace` (F1 measured 3 ms): the go-backs
        // it gets are answered that fast, so the interval follows, but never below
        // MIN_GO_BACK_INTERVAL, and never more than GO_BACK_BURST at once.
        for pace_us in [0, 50, 100, 1000, 3000, 25_000] {
            let pace = Duration::from_micros(pace_us);
            let (mut h, window) = attacked(SessionConfig::default());
            let start = h.now;
            let mut bucket = GoBackBucket::default();
            // The first window's ACK 0 is no go-back.
            let mut total = window as u64;
            let acks = 2000u64;
            for block in 1..=acks {
                h.now += pace;
                // What the timers send in between: the session's own deadlines, as a
                // driver fires them (retransmissions, owed go-backs).
                while h.session.deadline().is_some_and(|at| at <= h.now) {
                    let before = go_backs_of(h.session.stats());
                    h.session.handle_timeout(h.now);
                    total += h.drain_gso();
                    let after = go_backs_of(h.session.stats());
                    assert!(after.0 - before.0 <= 1, "{pace:?}: one expiry, one go-back");
                    if after.0 > before.0 {
                        let timer = after.1 > before.1;
                        assert!(bucket.take(h.now) || timer, "{pace:?}: block {block}");
                    }
                }
                let before = h.session.stats().clone();
                h.session.handle_ack(h.now, block as u16);
                let released = h.drain_gso();
                assert_released_within_bound(&h, &before, released, window as u64);
                if h.session.stats().go_back_acks > before.go_back_acks {
                    assert!(bucket.take(h.now), "{pace:?}: ACK {block} before its token");
                }
                total += released;
            }
            let stats = h.session.stats();
            let elapsed = h.now - start;
            // For information (the README quotes it): what the attack got.
            eprintln!(
                "blind ACK every {pace:?}: {acks} ACKs, {total} bytes released, \
                 {} go-backs, {} held",
                stats.go_back_acks, stats.go_back_held
            );
            // Over the whole run: the burst, then at most one go-back per
            // MIN_GO_BACK_INTERVAL.
            let most = u64::from(GO_BACK_BURST)
                + (elapsed.as_micros() / MIN_GO_BACK_INTERVAL.as_micros()) as u64;
            let go_backs = go_backs_of(stats).0;
            assert!(go_backs <= most, "{pace:?}: {stats:?}");
            // Every one of these ACKs is inside the window.
            assert!(stats.go_back_acks + stats.go_back_held >= acks);
            assert!(
                total <= acks * 1428 + window as u64 * (1 + go_backs),
                "{pace:?}: {total} bytes for {acks} ACKs"
            );
            if pace_us == 0 {
                // All at once: one burst of go-back-Ns (a window each), then the ACKs
                // only slide the window (a block each).
                let burst = u64::from(GO_BACK_BURST);
                assert_eq!(stats.go_back_acks, burst);
                assert_eq!(total, (64 + burst * 64 + acks - burst) * 1428);
            }
        }
    }

    #[test]
    fn a_blind_attacker_acking_every_window_gets_what_it_acknowledges() {
        let (mut h, window) = attacked(SessionConfig::default());
        let mut acked = 0u64;
        for _ in 0..100 {
            acked += 64;
            h.now += Duration::from_millis(1);
            let before = h.session.stats().clone();
            h.session.handle_ack(h.now, acked as u16);
            let released = h.drain_gso();
            assert_released_within_bound(&h, &before, released, window as u64);
            assert_eq!(released, 64 * 1428, "a window for a window");
        }
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.packets_resent), (0, 0));
    }

    #[test]
    fn an_in_window_ack_goes_back_once_per_interval_and_otherwise_slides() {
        // Adaptive retransmission off: the timer stays at 1 s, while the go-back clock
        // (which does not depend on it) follows the round trip.
        let config = SessionConfig {
            adaptive: false,
            ..SessionConfig::default()
        };
        let us = Duration::from_micros;
        let mut h = Harness::new(b"blksize\x008\x00windowsize\x004\x00", vec![3; 800], config);
        h.drain();
        // Every ACK comes at once: round trips of 0, so the interval is the floor,
        // MIN_GO_BACK_INTERVAL.
        assert_eq!(blocks(&h.ack(0)), vec![1, 2, 3, 4]);
        // The client lost what followed each of these ACKs: a burst of GO_BACK_BURST
        // go-backs, one per ACK.
        assert_eq!(GO_BACK_BURST, 4);
        assert_eq!(blocks(&h.ack(1)), vec![2, 3, 4, 5]);
        assert_eq!(blocks(&h.ack(2)), vec![3, 4, 5, 6]);
        assert_eq!(blocks(&h.ack(3)), vec![4, 5, 6, 7]);
        assert_eq!(blocks(&h.ack(4)), vec![5, 6, 7, 8]);
        // The burst is spent: another in-window ACK only slides (the blocks never sent
        // before, up to the new window's end). The go-back it asked for is owed when
        // the clock allows one again, an interval after the burst.
        assert_eq!(blocks(&h.ack(5)), vec![9]);
        assert_eq!(h.session.stats().go_back_held, 1);
        assert_eq!(h.drain().1, Output::Wait(h.now + MIN_GO_BACK_INTERVAL));
        assert!(h.advance(MIN_GO_BACK_INTERVAL - us(1)).is_empty());
        assert_eq!(blocks(&h.advance(us(1))), vec![6, 7, 8, 9]);
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (5, 1));
        assert_eq!(stats.retransmits, 0, "not a retransmission");
        // Then the timer runs from that resend, and nothing more is owed.
        assert_eq!(h.drain().1, Output::Wait(h.now + Duration::from_secs(1)));
        // From then on one go-back per interval: an in-window ACK right away only
        // slides, and its go-back is owed an interval on.
        assert_eq!(blocks(&h.ack(6)), vec![10]);
        assert_eq!(h.drain().1, Output::Wait(h.now + MIN_GO_BACK_INTERVAL));
        assert_eq!(blocks(&h.advance(MIN_GO_BACK_INTERVAL)), vec![7, 8, 9, 10]);
        // A quiet while of GO_BACK_BURST intervals refills the bucket: a burst again.
        h.now += MIN_GO_BACK_INTERVAL * GO_BACK_BURST;
        for block in 7..=10 {
            assert_eq!(
                blocks(&h.ack(block)),
                (block + 1..=block + 4).collect::<Vec<_>>()
            );
        }
        assert_eq!(blocks(&h.ack(11)), vec![15]);
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (10, 3));
        // Everything sent acknowledged: nothing is owed any more, only the timer runs.
        assert_eq!(blocks(&h.ack(15)), vec![16, 17, 18, 19]);
        assert_eq!(h.drain().1, Output::Wait(h.now + Duration::from_secs(1)));
        // A timer retransmission is a go-back-N too and takes a token: after it, three
        // in-window ACKs go back, the fourth only slides.
        assert_eq!(h.advance(Duration::from_secs(1)).len(), 4);
        assert_eq!(h.session.stats().retransmits, 1);
        for block in 16..=18 {
            assert_eq!(
                blocks(&h.ack(block)),
                (block + 1..=block + 4).collect::<Vec<_>>()
            );
        }
        assert_eq!(blocks(&h.ack(19)), vec![23]);
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (13, 4));
        // Each ACK's go-back resends three blocks (and sends one new), each owed one and
        // the timer's four: 4 × 3 + 4 + 4 + 4 × 3 + 4 + 3 × 3.
        assert_eq!(stats.packets_resent, 45);
    }

    #[test]
    fn the_go_back_clock_follows_how_fast_go_backs_are_answered() {
        let ms = Duration::from_millis;
        let us = Duration::from_micros;
        let config = SessionConfig {
            adaptive: false,
            ..SessionConfig::default()
        };
        let options = b"blksize\x008\x00windowsize\x008\x00";
        let mut h = Harness::new(options, vec![3; 8000], config);
        // The OACK goes twice, so ACK 0 measures nothing (Karn's rule); then the timer
        // resends the first window, so the ACKs below, all of resent blocks, never
        // measure a round trip: only the go-backs' answers time the clock.
        h.drain();
        assert_eq!(h.advance(ms(1000)).len(), 1);
        assert_eq!(blocks(&h.ack(0)), (1..=8).collect::<Vec<_>>());
        assert_eq!(blocks(&h.advance(ms(1000))), (1..=8).collect::<Vec<_>>());
        // That go-back came before anything was measured: it moved the clock on by
        // UNMEASURED_GO_BACK_INTERVAL (20 ms). ACK 2 answers it after 1 ms, so the
        // interval is now 1 ms and the burst 3 ms of slack: this in-window ACK only
        // slides, and the go-back is owed at 20 - 3 = 17 ms.
        assert_eq!(UNMEASURED_GO_BACK_INTERVAL, ms(20));
        let go_back = h.now;
        h.now += ms(1);
        assert_eq!(blocks(&h.ack(2)), vec![9, 10]);
        assert_eq!(h.drain().1, Output::Wait(go_back + ms(17)));
        assert!(h.advance(ms(16) - us(1)).is_empty());
        assert_eq!(blocks(&h.advance(us(1))), (3..=10).collect::<Vec<_>>());
        // From then on each go-back is answered 1 ms later, and the ACK that answers it
        // goes back at once: one go-back per millisecond (20 ms apart before anything
        // was measured, or with the 20 ms floor of the past).
        for block in [4, 6, 8, 10] {
            h.now += ms(1);
            let resent = (block + 1..=block + 8).collect::<Vec<_>>();
            assert_eq!(blocks(&h.ack(block)), resent, "ACK {block}");
        }
        assert_eq!(
            h.session.stats().srtt,
            None,
            "only resent blocks were acknowledged"
        );
        // The clock is now GO_BACK_BURST intervals ahead (at 25 ms): an ACK at once
        // finds no token, and as it answered the last go-back in no time, the interval
        // shrinks to 7/8 ms: the go-back is owed at 25 - 3 × 0.875 = 22.375 ms.
        assert_eq!(blocks(&h.ack(12)), vec![19, 20]);
        assert_eq!(h.drain().1, Output::Wait(go_back + us(22_375)));
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (5, 2));
        assert_eq!((stats.retransmits, stats.early_retransmits), (2, 0));
    }

    #[test]
    fn duplicate_acks_resend_once_per_interval_never_once_per_duplicate() {
        let config = SessionConfig {
            adaptive: false,
            ..SessionConfig::default()
        };
        let ms = Duration::from_millis;
        // Adaptive retransmission off: duplicates that come too soon owe nothing, only
        // the 1 s timer runs.
        let mut h = Harness::new(b"tsize\x000\x00", vec![7; 2000], config);
        h.drain();
        h.now += ms(10);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        assert!(h.ack(0).is_empty());
        assert_eq!(h.drain().1, Output::Wait(h.now + Duration::from_secs(1)));
        // Adaptive (the default): with one sample the early timer waits 200 ms at least,
        // but duplicates owe a go-back sooner.
        let config = SessionConfig::default();
        let mut h = Harness::new(b"tsize\x000\x00", vec![7; 2000], config);
        h.drain();
        // ACK 0 after 10 ms: one round-trip sample, so the go-back clock alone would
        // allow a go-back every 10 ms. A duplicate needs more: evidence, DATA 1 out for
        // the retransmission estimate, after one sample RFC 6298's first interval,
        // srtt + 4 × srtt / 2 = 30 ms.
        h.now += ms(10);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        // A hundred duplicates while DATA 1 is fresh: nothing at once. They owe one
        // go-back, due when the evidence is complete.
        for _ in 0..100 {
            assert!(h.ack(0).is_empty());
        }
        assert_eq!(h.drain().1, Output::Wait(h.now + ms(30)));
        h.now += ms(29);
        assert!(h.ack(0).is_empty());
        // DATA 1 has been out for 30 ms: the next duplicate resends it, once.
        h.now += ms(1);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        for _ in 0..100 {
            assert!(h.ack(0).is_empty());
        }
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (1, 201));
        assert_eq!((stats.packets_resent, stats.retransmits), (1, 0));
        // The resend restarted the evidence, and doubled it (nothing was measured since):
        // the duplicates after it owe one go-back 60 ms on (long before the 1 s timer),
        // made then if nothing was acknowledged.
        assert_eq!(h.drain().1, Output::Wait(h.now + ms(60)));
        assert!(h.advance(ms(59)).is_empty());
        assert_eq!(blocks(&h.advance(ms(1))), vec![1]);
        // Then only the early timer runs: with one sample its 200 ms floor, doubled by
        // each of the two resends.
        assert_eq!(h.drain().1, Output::Wait(h.now + ms(800)));
        // Older ACKs never resend.
        assert_eq!(blocks(&h.ack(1)), vec![2]);
        h.now += Duration::from_secs(5);
        assert!(h.ack(0).is_empty());
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.retransmits), (2, 0));

        // With no sample at all (the OACK went twice, so ACK 0 measured nothing: Karn's
        // rule), the evidence is UNMEASURED_LOSS_EVIDENCE.
        let mut h = Harness::new(b"tsize\x000\x00", vec![7; 2000], config);
        h.drain();
        assert_eq!(h.advance(Duration::from_secs(1)).len(), 1);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        assert!(h.ack(0).is_empty());
        assert_eq!(UNMEASURED_LOSS_EVIDENCE, ms(200));
        assert_eq!(h.drain().1, Output::Wait(h.now + ms(200)));
        h.now += ms(200);
        assert_eq!(blocks(&h.ack(0)), vec![1]);
        assert_eq!(h.session.stats().go_back_acks, 1);

        // With an estimate (three 10 ms round trips: 21.25 ms), the evidence takes that
        // long, not one round trip: a duplicate that comes a round trip after a resend is
        // most likely the client's answer to it (a resend it did not need), and going
        // back again for it would send every later window twice.
        let mut h = Harness::new(b"", vec![7; 10_000], SessionConfig::default());
        h.drain();
        for block in 1..=3 {
            h.now += Duration::from_millis(10);
            assert_eq!(blocks(&h.ack(block)), vec![block + 1]);
        }
        h.now += Duration::from_millis(10);
        assert!(h.ack(3).is_empty(), "one round trip is no evidence");
        h.now += Duration::from_millis(11);
        assert!(h.ack(3).is_empty());
        h.now += Duration::from_millis(1);
        assert_eq!(blocks(&h.ack(3)), vec![4]);
        h.now += Duration::from_millis(10);
        assert!(h.ack(3).is_empty(), "the answer to the resend");
        // Nothing measured since that go-back: the evidence takes twice as long now.
        h.now += Duration::from_millis(32);
        assert!(h.ack(3).is_empty());
        h.now += Duration::from_millis(1);
        assert_eq!(blocks(&h.ack(3)), vec![4]);
        let stats = h.session.stats();
        assert_eq!((stats.go_back_acks, stats.go_back_held), (2, 4));
    }

    #[test]
    fn is_verified_once_the_peer_acknowledged_something() {
        let mut h = Harness::new(b"tsize\x000\x00", vec![7; 2000], SessionConfig::default());
        h.drain();
        h.ack(1);
        assert!(!h.session.is_verified(), "ACK of something never sent");
        h.ack(0);
        assert!(h.session.is_verified());
        let mut h = Harness::new(b"", vec![7; 2000], SessionConfig::default());
        h.drain();
        h.ack(0);
        assert!(
            !h.session.is_verified(),
            "ACK 0 acknowledges nothing without an OACK"
        );
        h.ack(1);
        assert!(h.session.is_verified());
    }

    #[test]
    fn ring_memory_follows_what_was_sent() {
        // blksize 65464 and windowsize 64, cut to 16 blocks by the 1 MiB default.
        let options = b"blksize\x0065464\x00windowsize\x0064\x00";
        let mut h = Harness::new(options, vec![1; 10 << 20], SessionConfig::default());
        assert_eq!(h.session.params().window, 16);
        assert_eq!(h.session.buffer_bytes(), 0, "OACK pending");
        h.drain();
        h.advance(Duration::from_secs(1));
        assert_eq!(h.session.buffer_bytes(), 0, "OACK resent, still pending");
        // ACK 0, then silence: one window, whatever the timer resends.
        h.session.handle_ack(h.now, 0);
        assert_eq!(h.drain_gso(), 16 * 65464);
        let window = 16 * (65468 + 8 + std::mem::size_of::<(Instant, bool)>());
        assert_eq!(h.session.buffer_bytes(), window);
        for _ in 0..3 {
            h.advance(Duration::from_secs(8));
        }
        assert_eq!(h.session.buffer_bytes(), window);
        // Sent one by one, a window grows by doubling, never past the window.
        let mut h = Harness::new(options, vec![1; 10 << 20], SessionConfig::default());
        h.drain();
        h.ack(0);
        assert_eq!(h.session.buffer_bytes(), window);
        // A small file takes only the slots it needs (sent one by one, the ring grows by
        // doubling); lock step takes one.
        let slot = window / 16;
        for (gso, slots) in [(true, 3), (false, 4)] {
            let mut h = Harness::new(options, vec![1; 3 * 65464 - 1], SessionConfig::default());
            h.drain();
            h.session.handle_ack(h.now, 0);
            if gso {
                assert_eq!(h.drain_gso(), 3 * 65464 - 1);
            } else {
                assert_eq!(blocks(&h.drain().0), vec![1, 2, 3]);
            }
            assert_eq!(h.session.buffer_bytes(), slot * slots, "gso {gso}");
        }
        let mut h = Harness::new(b"", vec![1; 5000], SessionConfig::default());
        h.drain();
        assert_eq!(
            h.session.buffer_bytes(),
            516 + 8 + std::mem::size_of::<(Instant, bool)>()
        );
    }

    #[test]
    fn the_peers_error_message_is_kept_cut_to_200_bytes_on_a_char_boundary() {
        for (message, want) in [
            (b"disk full".to_vec(), "disk full".to_owned()),
            ("é".repeat(150).into_bytes(), "é".repeat(100)),
            // 199 bytes, then a 2-byte character that does not fit.
            ([vec![b'a'; 199], "é".into()].concat(), "a".repeat(199)),
            // Invalid UTF-8 is replaced first (U+FFFD takes 3 bytes).
            (vec![0xff; 300], "\u{fffd}".repeat(66)),
            ([vec![b'x'; 198], vec![0xff; 5]].concat(), "x".repeat(198)),
        ] {
            let mut h = Harness::new(b"", vec![1; 1000], SessionConfig::default());
            h.drain();
            let mut error = Vec::new();
            write_error(&mut error, ErrorCode::DiskFull, "");
            error.truncate(4);
            error.extend_from_slice(&message);
            error.push(0);
            h.session.handle_datagram(h.now, &error);
            let (_, kept) = h.session.stats().peer_error.clone().unwrap();
            assert!(kept.len() <= MAX_PEER_ERROR_LEN);
            assert_eq!(kept, want);
        }
    }

    #[test]
    fn abort_sends_error_and_ends() {
        let mut h = Harness::new(b"", vec![1; 10_000], SessionConfig::default());
        h.drain();
        h.session.abort(
            h.now,
            ErrorCode::NotDefined,
            "server shutting down",
            Outcome::ShutDown,
        );
        let (sent, out) = h.drain();
        assert_eq!(
            sent,
            vec![b"\x00\x05\x00\x00server shutting down\x00".to_vec()]
        );
        assert_eq!(out, Output::Done(Outcome::ShutDown));
    }
}
