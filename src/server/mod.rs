//! The driver: one `mio::Poll` multiplexing the listening sockets, every session socket and
//! a [`Waker`], on one thread. Together with `sys` (the system calls) it is the only part
//! of the library that touches sockets or reads the clock.
//!
//! # The parts
//!
//! - this file: [`Server`] and its loop — poll (after a busy-poll spin), dispatch, timers,
//!   shutdown — and the I/O half of starting a session;
//! - `admission`: what to do with each datagram that reaches a listener (rate and
//!   per-client limits, repeats, single-port routing, the queue of waiting requests):
//!   socket-free, unit-tested with explicit times;
//! - `table`: the running sessions by `SessionId` (slot and generation), their timers, and
//!   the queue through which sources say they are ready again;
//! - `transport`: how datagrams leave (a session's own socket, in the port range if any,
//!   or a listener with an explicit source address; UDP GSO);
//! - `mtu`: the largest block that fits the arrival interface's MTU, and a cache of MTUs;
//! - `wake`: a `timerfd` that ends waits shorter than the poll's milliseconds on time;
//! - `report`: finished sessions, periodic statistics, rate-limited warnings, the guard
//!   around user code;
//! - `builder` and `workers`: [`ServerBuilder`], and [`Workers`] (several loops on one
//!   address).
//!
//! # One loop iteration ([`Server::run_once`])
//!
//! 1. While sessions run, spin for up to the busy-poll budget polling without sleeping
//!    (see [`ServerBuilder::busy_poll`]); if nothing came, sleep in `poll` until a socket
//!    is readable, the waker fires, or the earliest deadline (timer wheel, statistics
//!    report, descriptor pause, shutdown grace) passes — a near one by the `timerfd`, since
//!    the poll's timeout is rounded up to whole milliseconds.
//! 2. Read the clock once.
//! 3. Drain the listeners (always, but in the normal mode once shutting down). Each
//!    datagram gets a verdict from admission, which the loop carries out. With
//!    `max_sessions` running, a request takes the slot of the oldest session that never
//!    got an ACK, or waits in admission's queue, a few seconds at most.
//! 4. Read every readable session socket until `WouldBlock`, or until a datagram leaves
//!    everything the session sent acknowledged (what is still queued then is older; it is
//!    read at the next arrival, or before the session's timer acts): datagrams from the
//!    session's peer go to its [`Session`] (admission hears when its first ACK makes it
//!    verified).
//!    The socket is connected to the peer, so the kernel drops anyone else's datagrams;
//!    one that got through would get ERROR 5 (if no larger than what it sent) and the
//!    session goes on. An ICMP error from the peer (`ECONNREFUSED`) ends the session at
//!    once with [`Outcome::PeerUnreachable`].
//! 5. If the waker fired, resume the sessions whose sources signalled readiness through
//!    their [`Notifier`] (a source that returned `WouldBlock` is not read again before).
//! 6. Fire due timers (a session's socket is read before its timer acts); start waiting
//!    requests while there is room; report statistics when the interval is up; end the
//!    grace period of a shutdown.
//! 7. Send what single-port sessions queued for the listeners (`sendmmsg`).
//!
//! After every input a session is *driven*: its output is drained and sent (a window as
//! one GSO send when it can), its next deadline is put in the timer wheel (at most one live
//! entry per session; an entry that fires early is harmless), and a finished session is
//! reported and removed.
//!
//! A session starts under the configured limits, capped in single-port mode
//! ([`ServerBuilder::single_port_limits`]), cut to the MTU of the interface its request
//! arrived on ([`ServerBuilder::mtu_blksize`]) and to the window memory left
//! ([`ServerBuilder::window_memory`]); what it keeps of its request is bounded (3 KiB at
//! most, see `table`).

mod admission;
mod budget;
mod builder;
mod mtu;
mod quota;
mod report;
mod table;
mod transport;
mod wake;
mod workers;

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::family::{too_large_without_rollover, ClientFamily};
use crate::handler::{Handler, Notifier, ReadRequest, Reject, SessionNotes};
use crate::limit::LogLimiter;
use crate::options::{negotiate, Limits};
use crate::packet::{ErrorCode, Mode, Packet, Request, MAX_DATAGRAM};
use crate::session::{Outcome, Output, Retransmission, Session, SessionConfig};
use crate::spin::Spinner;
use crate::stats::{LogText, ServerStats, SessionLogLimiter};
use crate::sys;

pub(crate) use self::table::SessionId;
pub use budget::BUDGET_FLOOR_BLKSIZE;
pub use builder::{
    Error, ServerBuilder, DEFAULT_BUSY_POLL, DEFAULT_MAX_SESSIONS_PER_CLIENT,
    DEFAULT_MAX_UNVERIFIED_PER_CLIENT, DEFAULT_WINDOW_MEMORY, MAX_DEFAULT_SESSIONS, SESSION_MEMORY,
    SINGLE_PORT_LIMITS,
};
pub use table::{STORED_FILENAME_BYTES, STORED_OPTIONS, STORED_OPTION_BYTES};
pub use workers::{ShutdownHandle, Workers};

use admission::{Admission, Verdict};
use builder::Settings;
use mtu::MtuCache;
use report::UserCode;
use table::{ReadyQueue, RequestInfo, SessionEntry, SessionTable};
use transport::{Arrival, Listener, Opened, ReplyPath, Sender, SessionSockets, Transport};
use wake::PreciseWake;
use workers::PreparedLoop;

const WAKER: Token = Token(usize::MAX);
/// The [`PreciseWake`] timer's token.
const TIMER: Token = Token(usize::MAX - 1);
/// Listener `i` has token `LISTENER_BASE - i`.
const LISTENER_BASE: usize = usize::MAX - 2;

/// A session socket's default send buffer is about this large; a window larger than it
/// gets a bigger one, so that a whole window fits.
const DEFAULT_SEND_BUFFER: usize = 200_000;
/// Per-datagram overhead counted when sizing a session's send buffer.
const DATAGRAM_OVERHEAD: usize = 32;

/// How far [`Server::read_session`] reads a session's own socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadUntil {
    /// Until it is empty: before a timeout acts, what the peer sent and a readiness left
    /// queued is heard (an ERROR ends the session rather than the timeout); and to the end
    /// once the peer is unreachable.
    Empty,
    /// Until it is empty or a datagram leaves everything the session sent acknowledged.
    /// The peer sends nothing new before it receives what the session sends next, so
    /// what is still queued then is older (a duplicate, an ERROR sent after that ACK) and
    /// can wait: for the next datagram's arrival (epoll reports every arrival, drained or
    /// not), which reads it first, or for the session's timer, which reads the socket
    /// before it acts. In lock step this spares the receive that would only find the
    /// socket empty, one system call in three per block.
    Answered,
}

/// How a spin before a wait ended (see [`Server::spin_for_events`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Spin {
    /// No spin: the spinner said no, nothing runs, or the wait is zero anyway.
    Skipped,
    /// Events came.
    Found,
    /// Nothing came for the whole budget.
    Missed,
}

/// How reading a session's own socket went (see [`Server::receive`]).
enum Received {
    /// A datagram from the peer went to the session; `answered`: it left everything the
    /// session sent acknowledged, and the peer is reachable (see [`ReadUntil::Answered`]).
    Fed { answered: bool },
    /// A datagram from someone else was answered with ERROR 5.
    Stray,
    /// Nothing more to read.
    Empty,
    /// The session is gone, or has no socket of its own.
    Gone,
}

/// Datagrams one receive call takes from a listener: in single-port mode every ACK of
/// every session comes there, and a storm queues many between two polls. In single-port
/// mode the loop reads its clock again after each batch (see [`Server::refresh_clock`]).
const LISTENER_BATCH: usize = 16;

/// The datagrams of one `recvmmsg` on a listener.
struct ListenerRx {
    /// One buffer per datagram, each large enough for any datagram (memory is only
    /// touched as far as datagrams reach: one page each for ACKs).
    bufs: Vec<Vec<u8>>,
    got: [Option<sys::Received>; LISTENER_BATCH],
}

impl ListenerRx {
    fn new() -> ListenerRx {
        ListenerRx {
            bufs: (0..LISTENER_BATCH).map(|_| vec![0; MAX_DATAGRAM]).collect(),
            got: [None; LISTENER_BATCH],
        }
    }
}

/// A TFTP server: listeners, sessions and the handler, on one thread.
pub struct Server<H> {
    poll: Poll,
    events: Events,
    listeners: Vec<Listener>,
    waker: Arc<Waker>,
    /// Sources that signalled readiness through their [`Notifier`].
    source_ready: Arc<ReadyQueue>,
    /// Sessions taken out of `source_ready`, handled after the lock is released.
    resumed: Vec<SessionId>,
    /// The waker fired in the last poll.
    woken: bool,
    /// Wakes the loop on time for deadlines closer than a millisecond or so.
    precise_wake: PreciseWake,
    shutdown: Arc<AtomicBool>,
    handler: H,
    /// The builder's settings (what every worker shares).
    settings: Settings,
    max_sessions: usize,
    table: SessionTable,
    admission: Admission,
    sender: Sender,
    /// Opens the sessions' sockets (in the port range, if any).
    sockets: SessionSockets,
    /// The interfaces' MTUs, for MTU-sized blocks.
    mtu: MtuCache,
    user_code: UserCode,
    /// Receive buffer for session sockets, large enough for any datagram.
    buf: Vec<u8>,
    /// The batch read from a listener (separate from the session buffer: a request may
    /// make the driver read a session socket while the request is still borrowed).
    listener_rx: ListenerRx,
    /// Session sockets readable in the last poll.
    readable_sessions: Vec<SessionId>,
    now: Instant,
    stats: ServerStats,
    stats_since: Instant,
    /// Set once shutdown started: when remaining sessions are aborted.
    grace_deadline: Option<Instant>,
    /// Rate-limited warnings about session sockets.
    socket_log: LogLimiter,
    /// The rate limit on session lines.
    session_log: SessionLogLimiter,
    /// Whether to poll without sleeping before a wait, and for how long.
    spinner: Spinner,
    /// Worker 0 of several: the other workers' statistics, added to its reports.
    stats_from_workers: Option<mpsc::Receiver<ServerStats>>,
    /// Another worker: its statistics go to worker 0 instead of the handler.
    stats_to_worker_0: Option<mpsc::Sender<ServerStats>>,
}

impl<H: Handler> Server<H> {
    /// The server for a prepared loop (on the thread that will run it).
    fn start(prepared: PreparedLoop<H>) -> Server<H> {
        let PreparedLoop {
            poll,
            listeners,
            waker,
            precise_wake,
            shutdown,
            handler,
            settings,
            max_sessions,
            stats_from_workers,
            stats_to_worker_0,
            client_limits,
        } = prepared;
        let now = Instant::now();
        Server {
            poll,
            events: Events::with_capacity(1024),
            listeners,
            source_ready: Arc::new(ReadyQueue::new(waker.clone())),
            resumed: Vec::new(),
            woken: false,
            waker,
            precise_wake,
            shutdown,
            handler,
            settings,
            max_sessions,
            table: SessionTable::with_window_memory(now, settings.window_memory),
            admission: Admission::new(settings.policy(max_sessions), client_limits),
            sender: Sender::new(settings.udp_gso),
            sockets: SessionSockets::new(
                settings.single_port,
                settings.port_range(),
                RandomState::new().build_hasher().finish(),
                max_sessions,
            ),
            mtu: MtuCache::new(),
            user_code: UserCode::new(),
            buf: vec![0; MAX_DATAGRAM],
            listener_rx: ListenerRx::new(),
            readable_sessions: Vec::new(),
            now,
            stats: ServerStats::default(),
            stats_since: now,
            grace_deadline: None,
            socket_log: LogLimiter::new(Duration::from_secs(60), 10),
            session_log: SessionLogLimiter::new(),
            spinner: Spinner::new(settings.busy_poll),
            stats_from_workers,
            stats_to_worker_0,
        }
    }

    /// The address of the first listener (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0].local
    }

    /// The addresses of all listeners.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.local).collect()
    }

    /// A handle that stops the server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            loops: Arc::new([(self.shutdown.clone(), self.waker.clone())]),
        }
    }

    /// Sessions running now.
    pub fn active_sessions(&self) -> usize {
        self.table.len()
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// The most sessions run at once.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Runs until shut down (see [`ShutdownHandle`]) and every session has ended, then
    /// makes a last statistics report covering the time since the previous one.
    pub fn run(&mut self) -> Result<(), Error> {
        self.run_loop()?;
        self.report_stats();
        Ok(())
    }

    fn run_loop(&mut self) -> Result<(), Error> {
        while self.run_once(None)? {}
        Ok(())
    }

    /// Runs one loop iteration, waiting at most `max_wait` (or until the next deadline)
    /// for something to happen. Returns false once the server has shut down and every
    /// session has ended.
    pub fn run_once(&mut self, max_wait: Option<Duration>) -> Result<bool, Error> {
        if self.grace_deadline.is_some() && self.table.is_empty() {
            return Ok(false);
        }
        self.wait_for_events(max_wait)?;
        self.readable_sessions.clear();
        self.woken = false;
        for event in self.events.iter() {
            match event.token() {
                WAKER => self.woken = true,
                TIMER => self.precise_wake.expired()?,
                Token(t) if t > LISTENER_BASE - self.listeners.len() => {
                    self.listeners[LISTENER_BASE - t].readable = true;
                }
                token => self.readable_sessions.push(SessionId::from_token(token)),
            }
        }
        if self.shutdown.load(Ordering::SeqCst) && self.grace_deadline.is_none() {
            self.begin_shutdown()?;
        }
        // Requests first: a request that repeats a running session's must be judged on
        // what that session had received before it, not on what a fast client sent since.
        self.read_listeners();
        let readable = std::mem::take(&mut self.readable_sessions);
        for &id in &readable {
            self.on_session_readable(id);
        }
        self.readable_sessions = readable;
        if self.woken {
            self.resume_ready_sources();
        }
        while let Some(id) = self.table.expired(self.now) {
            // The wheel fires early timers too (a session re-arms only for an earlier
            // deadline); the socket is read only before a timeout that acts.
            let due = self.table.get_mut(id).and_then(|e| e.session.deadline());
            if due.is_some_and(|due| due <= self.now) {
                self.read_session(id, ReadUntil::Empty);
            }
            if let Some(entry) = self.table.get_mut(id) {
                entry.session.handle_timeout(self.now);
                self.drive(id);
            }
        }
        self.admission.tick(self.now);
        self.start_waiting();
        if self.now >= self.stats_since + self.settings.stats_interval {
            self.report_stats();
        }
        if self
            .grace_deadline
            .is_some_and(|deadline| self.now >= deadline)
        {
            self.abort_all();
        }
        self.sender.flush(&self.listeners, &mut self.stats);
        debug_assert_eq!(self.admission.running(), self.table.len());
        Ok(!(self.grace_deadline.is_some() && self.table.is_empty()))
    }

    /// Reads the clock again within an iteration, in single-port mode after each batch
    /// read from a listener. Sessions stamp what they send with the loop's clock, and in
    /// a storm one iteration handles hundreds of ACKs (and a CPU quota may stall it
    /// halfway): with the time the iteration began, the DATA sent at its end would look
    /// milliseconds older than it is, its early retransmission would fire before its ACK
    /// could come, and the duplicate ACK that resend draws would pass for evidence of a
    /// loss (a capped single-port storm of 256 clients sent 4–13 % more datagrams than
    /// blocks; none since). The timers then run at the later time too, which is right
    /// there: the listener was read until empty, so no ACK that came in the meantime is
    /// left unread. Not so in the default mode, where the session sockets that became
    /// readable after the poll are not read before the next one: a later clock would fire
    /// their timers with their ACKs waiting (tried: 19 times the early resends), so the
    /// default mode keeps the poll's time.
    fn refresh_clock(&mut self) {
        self.now = Instant::now();
    }

    /// Steps 1 and 2 of the loop: spin, else poll, then read the clock.
    fn wait_for_events(&mut self, max_wait: Option<Duration>) -> Result<(), Error> {
        let mut timeout = self.poll_timeout(max_wait);
        let spin = self.spin_for_events(timeout)?;
        if spin == Spin::Found {
            self.now = Instant::now();
            return Ok(());
        }
        let before = self.now;
        if spin == Spin::Missed {
            // The spin used some of the time to the next deadline.
            timeout = self.poll_timeout(max_wait);
        }
        if let Some(wait) = timeout {
            let now = Instant::now();
            self.precise_wake.before_wait(now, now + wait)?;
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        self.now = Instant::now();
        if !self.events.is_empty() {
            // From the end of the previous wait: includes the handling since, which only
            // makes a wait look longer (less spinning).
            self.spinner.blocked(self.now - before);
        }
        Ok(())
    }

    /// With sessions running and the [`Spinner`] for it, polls without sleeping for up
    /// to its budget (never past `timeout`).
    fn spin_for_events(&mut self, timeout: Option<Duration>) -> Result<Spin, Error> {
        let budget = self.spinner.budget();
        if budget.is_zero() || self.table.is_empty() || timeout == Some(Duration::ZERO) {
            return Ok(Spin::Skipped);
        }
        let start = Instant::now();
        let until = start + timeout.map_or(budget, |t| t.min(budget));
        let mut empty_polls = 0;
        loop {
            match self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            if !self.events.is_empty() {
                self.spinner.found(empty_polls);
                if empty_polls > 0 {
                    self.stats.busy_poll += start.elapsed();
                }
                return Ok(Spin::Found);
            }
            let now = Instant::now();
            if now >= until {
                self.spinner.missed();
                self.stats.busy_poll += now - start;
                return Ok(Spin::Missed);
            }
            empty_polls += 1;
            std::hint::spin_loop();
        }
    }

    fn poll_timeout(&self, max_wait: Option<Duration>) -> Option<Duration> {
        if self.admission.reads_listeners() && self.listeners.iter().any(|l| l.readable) {
            // Requests are queued (readiness is edge-triggered: no event will come).
            return Some(Duration::ZERO);
        }
        let wake = [
            self.admission.wake_at(),
            self.table.next_deadline(),
            self.grace_deadline,
        ]
        .into_iter()
        .flatten()
        .fold(
            self.stats_since + self.settings.stats_interval,
            Instant::min,
        );
        // The clock moved since `self.now` was read; that only makes the wait shorter.
        let until = wake.saturating_duration_since(Instant::now());
        Some(max_wait.map_or(until, |max| max.min(until)))
    }

    fn begin_shutdown(&mut self) -> Result<(), Error> {
        info!(
            "shutting down: no new requests; {} session(s) get {:?} to finish",
            self.table.len(),
            self.settings.shutdown_grace
        );
        self.admission.begin_shutdown();
        // In single-port mode the listeners carry the running sessions' ACKs: they stay
        // open, and admission drops new requests instead.
        if !self.settings.single_port {
            for listener in &mut self.listeners {
                self.poll.registry().deregister(&mut listener.socket)?;
            }
        }
        self.grace_deadline = Some(self.now + self.settings.shutdown_grace);
        if self.settings.shutdown_grace.is_zero() {
            self.abort_all();
        }
        Ok(())
    }

    fn abort_all(&mut self) {
        for id in self.table.ids() {
            if let Some(entry) = self.table.get_mut(id) {
                entry.session.abort(
                    self.now,
                    ErrorCode::NotDefined,
                    "server shutting down",
                    Outcome::ShutDown,
                );
                self.drive(id);
            }
        }
    }

    /// Reads requests (and, in single-port mode, every datagram) from every readable
    /// listener while admission takes them, [`LISTENER_BATCH`] per receive call: a batch
    /// that comes back short says the listener is empty.
    fn read_listeners(&mut self) {
        for i in 0..self.listeners.len() {
            while self.listeners[i].readable && self.admission.reads_listeners() {
                let listener = &self.listeners[i];
                let rx = &mut self.listener_rx;
                match sys::recv_batch_with_destination(&listener.socket, &mut rx.bufs, &mut rx.got)
                {
                    Ok(count) => {
                        if count < LISTENER_BATCH {
                            self.listeners[i].readable = false;
                        }
                        for slot in 0..count {
                            if let Some(received) = self.listener_rx.got[slot] {
                                self.on_listener_datagram(i, slot, received);
                            }
                        }
                        if self.settings.single_port {
                            self.refresh_clock();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.listeners[i].readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // ICMP errors and the like: nothing to do with this datagram.
                        debug!("listener {}: receive failed: {e}", listener.local);
                    }
                }
            }
        }
    }

    /// Judges the datagram in slot `slot` of the listener batch.
    fn on_listener_datagram(&mut self, listener: usize, slot: usize, received: sys::Received) {
        let arrival = Arrival {
            peer: received.peer,
            local: transport::destination(self.listeners[listener].local, received.destination),
            reply: ReplyPath {
                listener,
                source: received.destination,
            },
        };
        if received.truncated {
            self.stats.malformed += 1;
            debug!(
                "{}: datagram longer than 65535 bytes, ignored",
                arrival.peer
            );
            return;
        }
        // Taken out so that the verdict can borrow it while `self` changes.
        let buf = std::mem::take(&mut self.listener_rx.bufs[slot]);
        let datagram = &buf[..received.len];
        let verdict = self
            .admission
            .on_datagram(self.now, &arrival, datagram, &mut self.stats);
        self.carry_out(&arrival, datagram, verdict);
        self.listener_rx.bufs[slot] = buf;
    }

    /// Starts waiting requests while there is room.
    fn start_waiting(&mut self) {
        while let Some(waiting) = self.admission.next_waiting(self.now, &mut self.stats) {
            let verdict = self
                .admission
                .on_waiting(self.now, &waiting, &mut self.stats);
            self.carry_out(&waiting.arrival, &waiting.datagram, verdict);
        }
    }

    /// Does what admission decided about `datagram`.
    fn carry_out(&mut self, arrival: &Arrival, datagram: &[u8], verdict: Verdict<'_>) {
        match verdict {
            Verdict::Start(request, mode) => self.start_session(arrival, datagram, request, mode),
            Verdict::Replace(id, request, mode) => {
                // Ended without a word: it never showed that its peer receives.
                self.finish(id, Outcome::Evicted);
                self.start_session(arrival, datagram, request, mode);
            }
            Verdict::ToSession(id, parsed) => {
                if let Some(entry) = self.table.get_mut(id) {
                    let (verified, acks) =
                        (entry.session.is_verified(), entry.session.stats().acks);
                    match parsed {
                        Ok(packet) => entry.session.handle_packet(self.now, packet),
                        // Counted as malformed by the session.
                        Err(_) => entry.session.handle_datagram(self.now, datagram),
                    }
                    if entry.session.stats().acks == acks {
                        self.admission.charge_no_progress(self.now, arrival.peer);
                    } else if !verified {
                        self.admission.session_verified(arrival.peer);
                    }
                    self.drive(id);
                }
            }
            Verdict::CatchUp(id, request) => {
                self.catch_up(id);
                let verdict = self.admission.after_catch_up(
                    self.now,
                    arrival,
                    datagram,
                    request,
                    &mut self.stats,
                );
                self.carry_out(arrival, datagram, verdict);
            }
            Verdict::Repeated(id) => {
                if let Some(entry) = self.table.get_mut(id) {
                    entry.session.handle_repeated_request(self.now);
                    self.drive(id);
                }
            }
            Verdict::Refuse(reject) => self.refuse(arrival, datagram.len(), &reject),
            Verdict::Stray => {
                let transport = Transport::Shared(arrival.reply);
                self.sender.answer_stray(
                    &self.listeners,
                    &transport,
                    arrival.peer,
                    &mut self.stats,
                );
            }
            Verdict::Queued | Verdict::Ignore => {}
        }
    }

    /// Answers a request of `request_len` bytes with `reject`, no larger than the
    /// request (see [`admission::fit_answer`]).
    fn refuse(&mut self, arrival: &Arrival, request_len: usize, reject: &Reject) {
        let Some(reject) = admission::fit_answer(reject, request_len) else {
            debug!("{}: no answer larger than the request", arrival.peer);
            return;
        };
        self.sender.refuse(
            &self.listeners,
            &mut self.sockets,
            self.table.len(),
            arrival,
            &reject,
            &mut self.stats,
        );
    }

    /// Starts a session for an admitted request: its transport, the handler's source,
    /// the [`Session`], its registration. Out of descriptors, the request goes back to
    /// admission to wait; refused by the handler, the client gets the ERROR.
    fn start_session(
        &mut self,
        arrival: &Arrival,
        datagram: &[u8],
        request: Request<'_>,
        mode: Mode,
    ) {
        let peer = arrival.peer;
        // The session's socket comes first: when descriptors or ports run out, the
        // request waits before the handler has done anything.
        let opened = match self.sockets.open(arrival.reply, arrival.local, peer) {
            Ok(opened) => opened,
            Err(e) if out_of_descriptors(&e) => {
                self.sockets.release_spares();
                return self.admission.wait_for_descriptors(
                    self.now,
                    arrival,
                    datagram,
                    &mut self.stats,
                );
            }
            Err(e) if transport::out_of_ports(&e) => {
                return self
                    .admission
                    .wait_for_ports(self.now, arrival, datagram, &mut self.stats);
            }
            Err(e) => {
                report::log_limited(
                    &mut self.socket_log,
                    self.now,
                    log::Level::Warn,
                    format_args!(
                        "{peer}: cannot open a session socket on {}: {e}",
                        arrival.local.ip()
                    ),
                );
                self.stats.send_errors += 1;
                return;
            }
        };
        let Opened {
            mut transport,
            registered,
        } = opened;
        let id = self.table.next_id();
        let notifier = Notifier::new(self.source_ready.clone(), id);
        let notes = SessionNotes::default();
        let read_request = ReadRequest {
            peer,
            local: arrival.local,
            filename: request.filename,
            mode,
            options: request.options,
            notifier: &notifier,
            notes: &notes,
            now: self.now,
        };
        // What the session keeps of the request (bounded), also for the log lines here.
        let mut info = RequestInfo::new(
            peer,
            arrival.local,
            request.filename,
            mode,
            request.options,
            std::time::SystemTime::now(),
        );
        let filename = &info.filename;
        let family = info.family;
        let handler = &mut self.handler;
        let opened = self.user_code.run(
            &mut self.stats,
            self.now,
            |f| write!(f, "{peer}: the handler opening {filename:?}"),
            || handler.open(&read_request),
        );
        info.label = notes.label();
        info.mac = notes.mac();
        let source = match opened {
            Some(Ok(source)) => source,
            Some(Err(reject)) if reject.retry_later => {
                // The handler is short of a resource that running sessions hold (its own
                // file descriptors): the request waits as if the server had none.
                drop(transport);
                self.sockets.release_spares();
                return self.admission.wait_for_descriptors(
                    self.now,
                    arrival,
                    datagram,
                    &mut self.stats,
                );
            }
            Some(Err(reject)) => {
                debug!("{peer}: {} refused: {reject}", LogText::new(&filename));
                self.sockets
                    .recycle(transport, arrival.local, registered, self.table.len());
                return self.refuse(arrival, datagram.len(), &reject);
            }
            None => {
                self.sockets
                    .recycle(transport, arrival.local, registered, self.table.len());
                return self.refuse(arrival, datagram.len(), &internal_error());
            }
        };
        // In single-port mode capped, cut to the arrival interface's MTU, then to the
        // window memory left.
        let mut config = self.settings.config;
        let limits = self.session_limits(arrival);
        config.limits = self.table.window_limits(limits);
        config.block_rollover = family.wraps_block_numbers();
        // Only a client that cannot roll block numbers over needs the size here; the
        // source's `size` is user code, so it runs under the panic guard.
        let size = if family.wraps_block_numbers() {
            None
        } else {
            let source = &source;
            self.user_code
                .run(
                    &mut self.stats,
                    self.now,
                    |f| write!(f, "{peer}: the size of {filename:?}"),
                    || source.size(),
                )
                .flatten()
        };
        if let Some(reject) = too_large_for(family, &request, mode, size, &config) {
            debug!("{peer}: {} refused: {reject}", LogText::new(filename));
            let what = |f: &mut fmt::Formatter<'_>| {
                write!(f, "{peer}: dropping the source of {filename:?}")
            };
            self.user_code.drop(&mut self.stats, self.now, what, source);
            self.sockets
                .recycle(transport, arrival.local, registered, self.table.len());
            return self.refuse(arrival, datagram.len(), &reject);
        }
        let now = self.now;
        let created = self.user_code.run(
            &mut self.stats,
            self.now,
            |f| write!(f, "{peer}: the source of {filename:?}"),
            || Session::new(now, request.options, mode, source, config),
        );
        let Some(session) = created else {
            self.sockets
                .recycle(transport, arrival.local, registered, self.table.len());
            return self.refuse(arrival, datagram.len(), &internal_error());
        };
        if let Err(e) = self.register(&mut transport, registered, id, &session) {
            report::log_limited(
                &mut self.socket_log,
                self.now,
                log::Level::Warn,
                format_args!("{peer}: cannot register a session socket: {e}"),
            );
            let what = |f: &mut fmt::Formatter<'_>| {
                write!(f, "{peer}: dropping the source of {filename:?}")
            };
            return self.user_code.drop(&mut self.stats, now, what, session);
        }
        self.table
            .insert(id, SessionEntry::new(id, transport, session, info));
        self.admission.session_started(self.now, peer, id, &request);
        self.stats.sessions_started += 1;
        *self
            .stats
            .sessions_by_family
            .entry(family.as_str())
            .or_default() += 1;
        self.drive(id);
    }

    /// The limits a session for a request that came as `arrival` is negotiated under,
    /// before the window budget: the settings' (see [`Settings::session_limits`]), with
    /// blksize cut to the MTU of the interface the request arrived on (see
    /// [`ServerBuilder::mtu_blksize`]).
    fn session_limits(&mut self, arrival: &Arrival) -> Limits {
        let mut limits = self.settings.session_limits();
        let Some((_, ifindex)) = arrival.reply.source else {
            return limits;
        };
        if !self.settings.mtu_blksize {
            return limits;
        }
        let listener = &self.listeners[arrival.reply.listener].socket;
        let ipv6 = arrival.peer.is_ipv6();
        let by_mtu = self.mtu.max_blksize(self.now, ifindex, ipv6, |ifindex| {
            sys::interface_mtu(listener, ifindex)
        });
        if let Some(max) = by_mtu {
            limits.max_blksize = limits.max_blksize.min(max);
        }
        limits
    }

    /// Registers a session's own socket with the poll (a reused socket the poll knows
    /// moves to the session's token), with room in its send buffer for a whole window.
    /// Nothing to do for a listener.
    fn register(
        &mut self,
        transport: &mut Transport,
        registered: bool,
        id: SessionId,
        session: &Session,
    ) -> io::Result<()> {
        let Transport::Own(socket) = transport else {
            return Ok(());
        };
        let registry = self.poll.registry();
        if registered {
            registry.reregister(socket, id.token(), Interest::READABLE)?;
        } else {
            registry.register(socket, id.token(), Interest::READABLE)?;
        }
        let params = session.params();
        let window_bytes = params.window as usize * (params.blksize as usize + DATAGRAM_OVERHEAD);
        if window_bytes > DEFAULT_SEND_BUFFER {
            // Best effort: a smaller buffer only drops sends, which retransmission recovers.
            let _ = sys::set_send_buffer(socket, window_bytes * 2);
        }
        Ok(())
    }

    /// Reads a readable session socket until [`ReadUntil::Answered`].
    fn on_session_readable(&mut self, id: SessionId) {
        self.read_session(id, ReadUntil::Answered);
    }

    /// Reads the session's own socket as far as `until` says, driving the session after
    /// every datagram.
    fn read_session(&mut self, id: SessionId, until: ReadUntil) {
        loop {
            match self.receive(id) {
                Received::Fed { answered } => {
                    self.drive(id);
                    if answered && until == ReadUntil::Answered {
                        return;
                    }
                }
                Received::Stray => {}
                Received::Empty | Received::Gone => return,
            }
        }
    }

    /// Feeds the session what its socket holds without sending anything until the socket
    /// is empty, so that nothing read can answer something sent meanwhile (see
    /// [`Verdict::CatchUp`]); a session that ends on the way ends at once.
    fn catch_up(&mut self, id: SessionId) {
        loop {
            match self.receive(id) {
                Received::Fed { .. } | Received::Stray => {
                    if self.table.get_mut(id).is_some_and(|e| e.session.is_done()) {
                        return self.drive(id);
                    }
                }
                Received::Empty => return self.drive(id),
                Received::Gone => return,
            }
        }
    }

    /// Reads one datagram from the session's own socket and hands it to the session; a
    /// datagram from anyone else is answered with ERROR 5 (never an ERROR, though, nor a
    /// datagram shorter than the answer; the socket is connected to the peer, so the kernel
    /// lets none through in practice). When the kernel reports the peer unreachable (an
    /// ICMP error), the session ends with [`Outcome::PeerUnreachable`], sending nothing
    /// more, once the datagrams queued before the error are read: the kernel reports the
    /// error first, and a client that sent its final ACK and closed its port (a resend
    /// crossed the ACK) completed its transfer.
    #[inline(always)]
    fn receive(&mut self, id: SessionId) -> Received {
        loop {
            let Some(entry) = self.table.get_mut(id) else {
                return Received::Gone;
            };
            let Transport::Own(socket) = &entry.transport else {
                return Received::Gone;
            };
            let (len, from) = match socket.recv_from(&mut self.buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if entry.peer_unreachable && !entry.session.is_done() {
                        debug!("{}: unreachable, session ended", entry.request.peer);
                        entry.session.end(self.now, Outcome::PeerUnreachable);
                        return Received::Fed { answered: false };
                    }
                    return Received::Empty;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if transport::peer_unreachable(&e) => {
                    debug!("{}: unreachable ({e})", entry.request.peer);
                    entry.peer_unreachable = true;
                    continue;
                }
                Err(e) => {
                    debug!("{}: session receive failed: {e}", entry.request.peer);
                    continue;
                }
            };
            let from = sys::unmap_socket(from);
            if from == entry.request.peer {
                let verified = entry.session.is_verified();
                entry.session.handle_datagram(self.now, &self.buf[..len]);
                let answered = !entry.peer_unreachable && entry.session.all_sent_acknowledged();
                if !verified && entry.session.is_verified() {
                    self.admission.session_verified(from);
                }
                return Received::Fed { answered };
            }
            self.stats.stray_datagrams += 1;
            debug!(
                "{from}: datagram for {}'s session, ERROR 5",
                entry.request.peer
            );
            // Never an answer to an ERROR, nor one larger than what came.
            if len >= admission::STRAY_ANSWER_LEN
                && !matches!(Packet::parse(&self.buf[..len]), Ok(Packet::Error { .. }))
            {
                self.sender
                    .answer_stray(&self.listeners, &entry.transport, from, &mut self.stats);
            }
            return Received::Stray;
        }
    }

    /// Resumes the sessions whose sources notified readiness.
    fn resume_ready_sources(&mut self) {
        let mut resumed = std::mem::take(&mut self.resumed);
        self.source_ready.take(&mut resumed);
        for &id in &resumed {
            let Some(entry) = self.table.get_mut(id) else {
                continue;
            };
            if entry.session.is_done() {
                continue;
            }
            entry.session.handle_source_ready(self.now);
            self.drive(id);
        }
        resumed.clear();
        self.resumed = resumed;
    }

    /// Drains a session's output: sends, re-arms its timer, or finishes it.
    fn drive(&mut self, id: SessionId) {
        loop {
            let Some(entry) = self.table.get_mut(id) else {
                return;
            };
            let SessionEntry {
                session,
                transport,
                request,
                ..
            } = entry;
            let max_datagrams = self.sender.max_datagrams(session.params().blksize);
            let output = self.user_code.run(
                &mut self.stats,
                self.now,
                |f| write!(f, "{}: the source of {:?}", request.peer, request.filename),
                // Moving the borrow into the closure makes it FnOnce, so the output may
                // borrow the session beyond the call.
                move || {
                    let session = session;
                    session.poll_output(max_datagrams)
                },
            );
            match output {
                Some(Output::Transmit(transmit)) => {
                    match transmit.retransmission {
                        Some(Retransmission::Timeout) => self.stats.retransmits += 1,
                        Some(Retransmission::Early) => self.stats.early_retransmits += 1,
                        None => {}
                    }
                    let peer = request.peer;
                    let reachable = self.sender.transmit(
                        &self.listeners,
                        transport,
                        peer,
                        &transmit,
                        &mut self.stats,
                    );
                    if !reachable {
                        debug!("{peer}: unreachable");
                        if let Some(entry) = self.table.get_mut(id) {
                            if matches!(entry.transport, Transport::Own(_)) {
                                // What the peer sent before it went away may still end the
                                // transfer; the session ends once that is read.
                                entry.peer_unreachable = true;
                                return self.read_session(id, ReadUntil::Empty);
                            }
                            entry.session.end(self.now, Outcome::PeerUnreachable);
                        }
                    }
                }
                Some(Output::Wait(deadline)) => return self.table.arm(id, deadline),
                Some(Output::Done(outcome)) => return self.finish(id, outcome),
                None => {
                    // User code panicked while the session read its source.
                    entry.session.abort(
                        self.now,
                        ErrorCode::NotDefined,
                        "internal error",
                        Outcome::Panicked,
                    );
                }
            }
        }
    }
}

/// Whether an error means the process or system is out of file descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What a client is told when user code failed on its request.
/// The refusal for a file larger than `family` can read: a client that cannot roll block
/// numbers over (the Raspberry Pi EEPROM) would fail at block 65,536, so it gets ERROR 3 at
/// once. `None` for every other client, a size not known, or a netascii transfer (its size
/// on the wire is not the file's).
fn too_large_for(
    family: ClientFamily,
    request: &Request<'_>,
    mode: Mode,
    size: Option<u64>,
    config: &SessionConfig,
) -> Option<Reject> {
    if family.wraps_block_numbers() || mode == Mode::Netascii {
        return None;
    }
    let blksize = negotiate(request.options, &config.limits, size).blksize;
    too_large_without_rollover(size?, blksize).then(|| {
        Reject::new(
            ErrorCode::DiskFull,
            "file too large for this client (no block rollover)",
        )
    })
}

fn internal_error() -> Reject {
    Reject::new(ErrorCode::NotDefined, "internal error")
}
