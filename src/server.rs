//! The driver: one `mio::Poll` multiplexing the listening sockets, every session socket and
//! a [`Waker`]. This is the only module that touches mio, sockets or the clock.
//!
//! # One loop iteration ([`Server::run_once`])
//!
//! 1. Sleep in `poll` until a socket is readable, the waker fires, or the earliest deadline
//!    (timer wheel, stats report, shutdown grace) passes.
//! 2. Read the clock once.
//! 3. Drain the listeners, unless `max_sessions` are running: then the requests wait in the
//!    kernel's queue until a session ends (backpressure, as dnsmasq does). A request from
//!    a peer whose session still runs first feeds that session what is queued for it
//!    (sending nothing meanwhile); only if the session still runs is it a repeat.
//! 4. Drain every readable session socket until `WouldBlock`: datagrams from the session's
//!    peer go to its [`Session`]; datagrams from anyone else get ERROR 5 and the session
//!    goes on.
//! 5. If the waker fired, resume the sessions whose sources signalled readiness through
//!    their [`Notifier`] (a source that returned `WouldBlock` is not read again before).
//! 6. Fire due timers, report statistics when the interval is up, handle shutdown.
//!
//! After every input a session is *driven*: its output is drained, datagrams are sent, its
//! next deadline is put in the timer wheel (at most one live entry per session; an entry
//! that fires early is harmless), and a finished session is reported and removed.
//!
//! Slab keys are reused, so tokens and timer entries carry a generation: a datagram or a
//! timer meant for a dead session never reaches the one that took its slot.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, info, warn};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::handler::{Handler, Notifier, ReadRequest, ReadySink, Reject};
use crate::limit::{ClientCounts, ClientKey, LogDecision, LogLimiter, Rate, RateLimiter};
use crate::options::{Limits, MAX_BLKSIZE, MIN_BLKSIZE};
use crate::packet::{
    write_error, ErrorCode, Mode, Packet, ParseError, DATA_HEADER_LEN, MAX_DATAGRAM,
};
use crate::session::{Outcome, Output, Retransmission, Session, SessionConfig};
use crate::spin::Spinner;
use crate::stats::{ServerStats, SessionStats, SESSION_LOG_TARGET, STATS_LOG_TARGET};
use crate::sys;
use crate::timer::{TimerKey, TimerWheel};

const WAKER: Token = Token(usize::MAX);
/// Listener `i` has token `LISTENER_BASE - i`.
const LISTENER_BASE: usize = usize::MAX - 1;
/// Session tokens are `generation << 32 | slab key`, generations kept to 31 bits so they
/// never reach the listener and waker tokens.
const GENERATION_MASK: u32 = 0x7fff_ffff;

/// Errors from building or running a server.
#[non_exhaustive]
#[derive(Debug)]
pub enum Error {
    /// A listening address could not be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A setting is out of range.
    Config(String),
    /// The event loop failed.
    Io(io::Error),
    /// A worker's thread panicked (outside the user code the loop contains).
    WorkerPanicked,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Config(why) => write!(f, "invalid setting: {why}"),
            Error::Io(e) => write!(f, "event loop failed: {e}"),
            Error::WorkerPanicked => write!(f, "a worker thread panicked"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            Error::Config(_) | Error::WorkerPanicked => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// Configures and builds a [`Server`].
///
/// ```no_run
/// use dyntftp::{FsHandler, ServerBuilder};
/// use std::time::Duration;
///
/// let mut server = ServerBuilder::new(FsHandler::new("/srv/tftp")?)
///     .bind("0.0.0.0:69".parse()?)
///     .timeout(Duration::from_secs(1))
///     .retries(5)
///     .build()?;
/// server.run()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ServerBuilder<H> {
    handler: H,
    addrs: Vec<SocketAddr>,
    sockets: Vec<StdUdpSocket>,
    max_sessions: Option<usize>,
    settings: Settings,
}

/// What every worker of a server shares: the builder's settings but addresses, handler
/// and `max_sessions`.
#[derive(Clone, Copy)]
struct Settings {
    config: SessionConfig,
    stats_interval: Duration,
    shutdown_grace: Duration,
    request_rate: Option<Rate>,
    max_sessions_per_client: Option<u32>,
    limit_loopback: bool,
    single_port: bool,
    udp_gso: bool,
    busy_poll: Duration,
}

/// Default cap on the sessions one client (IPv4 address or IPv6 /64) runs at once.
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: u32 = 64;

/// Default limit of [`ServerBuilder::busy_poll`]: a lock-step client on a fast network
/// answers well within it.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

impl<H: Handler> ServerBuilder<H> {
    /// A builder serving requests through `handler`, with the defaults: timeout 1 s,
    /// 5 retries, max blksize 65464, max window 64 blocks and 1 MiB, stats every 60 s,
    /// `max_sessions` from the file-descriptor limit, 5 s shutdown grace, and the abuse
    /// limits [`Rate::DEFAULT`] and [`DEFAULT_MAX_SESSIONS_PER_CLIENT`] per client
    /// (loopback clients exempt).
    pub fn new(handler: H) -> ServerBuilder<H> {
        ServerBuilder {
            handler,
            addrs: Vec::new(),
            sockets: Vec::new(),
            max_sessions: None,
            settings: Settings {
                config: SessionConfig::default(),
                stats_interval: Duration::from_secs(60),
                shutdown_grace: Duration::from_secs(5),
                request_rate: Some(Rate::DEFAULT),
                max_sessions_per_client: Some(DEFAULT_MAX_SESSIONS_PER_CLIENT),
                limit_loopback: false,
                single_port: false,
                udp_gso: true,
                busy_poll: DEFAULT_BUSY_POLL,
            },
        }
    }

    /// Listens on `addr` (repeatable). `[::]` listens dual-stack on IPv6 and IPv4.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.addrs.push(addr);
        self
    }

    /// Listens on an already bound socket (repeatable), e.g. one inherited from systemd.
    pub fn socket(mut self, socket: StdUdpSocket) -> Self {
        self.sockets.push(socket);
        self
    }

    /// Base retransmission interval when the client does not choose one.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.settings.config.timeout = timeout;
        self
    }

    /// Retransmissions after the last progress before a session gives up.
    pub fn retries(mut self, retries: u32) -> Self {
        self.settings.config.retries = retries;
        self
    }

    /// Largest block size granted (8..=65464).
    pub fn max_blksize(mut self, max: u16) -> Self {
        self.settings.config.limits.max_blksize = max;
        self
    }

    /// Largest window granted, in blocks (at least 1).
    pub fn max_window(mut self, max: u16) -> Self {
        self.settings.config.limits.max_window = max;
        self
    }

    /// Largest window granted, in payload bytes.
    pub fn max_window_bytes(mut self, max: usize) -> Self {
        self.settings.config.limits.max_window_bytes = max;
        self
    }

    /// How long a source may stay not ready before its session ends.
    pub fn source_timeout(mut self, timeout: Duration) -> Self {
        self.settings.config.source_timeout = timeout;
        self
    }

    /// Most sessions at once; further requests wait in the socket queue.
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = Some(max);
        self
    }

    /// Whether sessions retransmit early when the measured round-trip time is far below
    /// the timeout (default true; see [`SessionConfig::adaptive`]).
    pub fn adaptive_timeout(mut self, adaptive: bool) -> Self {
        self.settings.config.adaptive = adaptive;
        self
    }

    /// The shortest adaptive retransmission interval (default 2 ms).
    pub fn min_rto(mut self, min: Duration) -> Self {
        self.settings.config.min_rto = min;
        self
    }

    /// The request rate each client may send to the listeners, as a token bucket;
    /// `None` for no limit. Datagrams over the rate are dropped without an answer (an
    /// answer is what a reflection attack wants) and counted in
    /// [`ServerStats::rate_limited`]. A client is an IPv4 address or an IPv6 /64.
    pub fn request_rate(mut self, rate: Option<Rate>) -> Self {
        self.settings.request_rate = rate;
        self
    }

    /// The most sessions one client may run at once; `None` for no limit. A request over
    /// the cap gets ERROR 0 and is counted in [`ServerStats::client_limited`].
    pub fn max_sessions_per_client(mut self, max: Option<u32>) -> Self {
        self.settings.max_sessions_per_client = max;
        self
    }

    /// Whether the per-client limits apply to loopback clients too (default false: local
    /// processes cannot be spoofed from the network, and benchmarks run over loopback).
    pub fn limit_loopback(mut self, limit: bool) -> Self {
        self.settings.limit_loopback = limit;
        self
    }

    /// Serves every session from the listening socket that received its request, told
    /// apart by the client's address and port, instead of from a new socket (a new port)
    /// per session: for NAT, firewalls and containers that forward only the listening
    /// port (dnsmasq's `--tftp-single-port`). The protocol is the same; the listener is
    /// then always read, so with `max_sessions` running, new requests are dropped (the
    /// client resends them) and counted in [`ServerStats::busy`].
    pub fn single_port(mut self, single: bool) -> Self {
        self.settings.single_port = single;
        self
    }

    /// Whether windows of DATA are sent with UDP generic segmentation offload, several
    /// datagrams per system call (default true; falls back to one datagram per call, for
    /// good, at the first failure, e.g. on kernels older than 4.18), in single-port mode
    /// too (with the source address as a second control message).
    pub fn udp_gso(mut self, gso: bool) -> Self {
        self.settings.udp_gso = gso;
        self
    }

    /// Adaptive busy polling: after handling events, while sessions run, the loop may
    /// poll without sleeping for up to this long before it blocks (default
    /// [`DEFAULT_BUSY_POLL`], 50 µs; zero turns it off). On a fast network a lock-step
    /// client's ACK comes within tens of microseconds, and not sleeping saves the
    /// wake-up, most of a lock-step block's cost on the server. The loop spins only while
    /// spinning finds datagrams: after a spin that found nothing it sleeps, and spins
    /// again only after waits shorter than the limit, a number that doubles with every
    /// fruitless spin (up to 64). An idle server does not spin; the time spent spinning
    /// is reported in [`ServerStats::busy_poll`].
    pub fn busy_poll(mut self, spin: Duration) -> Self {
        self.settings.busy_poll = spin;
        self
    }

    /// How often [`Handler::server_stats`] is called.
    pub fn stats_interval(mut self, interval: Duration) -> Self {
        self.settings.stats_interval = interval;
        self
    }

    /// How long running sessions may go on after a shutdown request before they are
    /// aborted.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.settings.shutdown_grace = grace;
        self
    }

    /// Checks the settings, binds the listeners and builds the server.
    pub fn build(mut self) -> Result<Server<H>, Error> {
        self.validate()?;
        let std_sockets = self.bind_all(false)?;
        let max_sessions = self.max_sessions.unwrap_or_else(default_max_sessions);
        Server::new(self.handler, std_sockets, self.settings, max_sessions)
    }

    /// Binds the addresses and takes the inherited sockets, in that order.
    fn bind_all(&mut self, reuse_port: bool) -> Result<Vec<StdUdpSocket>, Error> {
        let mut std_sockets = Vec::new();
        for addr in &self.addrs {
            let socket = sys::bind_listener(*addr, reuse_port).map_err(|source| Error::Bind {
                addr: *addr,
                source,
            })?;
            std_sockets.push(socket);
        }
        for socket in self.sockets.drain(..) {
            socket.set_nonblocking(true)?;
            if let Err(e) = sys::enable_pktinfo(&socket) {
                debug!("no destination-address reporting on an inherited socket: {e}");
            }
            std_sockets.push(socket);
        }
        Ok(std_sockets)
    }

    fn validate(&self) -> Result<(), Error> {
        let limits: Limits = self.settings.config.limits;
        if !(MIN_BLKSIZE..=MAX_BLKSIZE).contains(&limits.max_blksize) {
            return Err(Error::Config(format!(
                "max blksize must be {MIN_BLKSIZE}..={MAX_BLKSIZE}, not {}",
                limits.max_blksize
            )));
        }
        if limits.max_window == 0 {
            return Err(Error::Config("max window must be at least 1".into()));
        }
        if self.settings.config.timeout.is_zero() {
            return Err(Error::Config("timeout must be more than zero".into()));
        }
        if self.settings.stats_interval.is_zero() {
            return Err(Error::Config(
                "stats interval must be more than zero".into(),
            ));
        }
        if self.max_sessions == Some(0) {
            return Err(Error::Config("max sessions must be at least 1".into()));
        }
        if self.settings.max_sessions_per_client == Some(0) {
            return Err(Error::Config(
                "max sessions per client must be at least 1".into(),
            ));
        }
        if let Some(rate) = self.settings.request_rate {
            if !(rate.per_second >= 0.0 && rate.per_second.is_finite()) || rate.burst == 0 {
                return Err(Error::Config(format!(
                    "request rate must be a finite rate >= 0 with a burst of at least 1, \
                     not {} per second with burst {}",
                    rate.per_second, rate.burst
                )));
            }
        }
        if self.addrs.is_empty() && self.sockets.is_empty() {
            return Err(Error::Config("no address to listen on".into()));
        }
        Ok(())
    }
}

/// The most sessions by default: each holds a socket and usually an open file; some
/// descriptors are kept spare. Raises the soft descriptor limit to the hard one.
fn default_max_sessions() -> usize {
    (sys::raise_fd_limit().unwrap_or(1024).saturating_sub(64) / 2).max(1) as usize
}

impl<H: Handler + Clone + Send + 'static> ServerBuilder<H> {
    /// Builds `n` independent servers, each with its own event loop, listeners bound with
    /// SO_REUSEPORT to the same addresses, and a clone of the handler; run them with
    /// [`Workers::run`], one thread each. The kernel hands all datagrams of one client
    /// address and port to the same worker, so its retransmitted requests and (in
    /// single-port mode) its ACKs reach the worker that has its session. Nothing is
    /// shared on the packet path.
    ///
    /// What a handler must provide: `Clone + Send + 'static`. Each worker calls `open`
    /// and `session_finished` on its own clone; state the clones must share (a cache, a
    /// connection pool) goes behind an `Arc`. `server_stats` is called on worker 0's
    /// clone only, with the counters of every worker added up (each worker's counters
    /// join the first report worker 0 makes after them). `max_sessions` is divided
    /// between the workers. Inherited sockets ([`socket`](Self::socket)) cannot be
    /// shared by several workers: give addresses to bind.
    pub fn build_workers(mut self, n: usize) -> Result<Workers<H>, Error> {
        if n == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        if n == 1 {
            self.validate()?;
            let max_sessions = self.max_sessions.unwrap_or_else(default_max_sessions);
            let sockets = self.bind_all(false)?;
            return Ok(Workers {
                loops: vec![Prepared::new(
                    self.handler,
                    sockets,
                    self.settings,
                    max_sessions,
                )?],
            });
        }
        if !self.sockets.is_empty() {
            return Err(Error::Config(
                "several workers need addresses to bind (SO_REUSEPORT); an inherited \
                 socket cannot be shared by them"
                    .into(),
            ));
        }
        self.validate()?;
        let total = self.max_sessions.unwrap_or_else(default_max_sessions);
        let per_worker = (total / n).max(1);
        let (stats_tx, stats_rx) = mpsc::channel();
        let mut stats_rx = Some(stats_rx);
        let mut loops = Vec::with_capacity(n);
        // The first worker resolves port 0; the others bind exactly what it got.
        let mut addrs = self.addrs.clone();
        for worker in 0..n {
            let mut sockets = Vec::with_capacity(addrs.len());
            for addr in &addrs {
                let socket = sys::bind_listener(*addr, true).map_err(|source| Error::Bind {
                    addr: *addr,
                    source,
                })?;
                sockets.push(socket);
            }
            if worker == 0 {
                addrs = sockets
                    .iter()
                    .map(|s| s.local_addr())
                    .collect::<io::Result<_>>()?;
            }
            let mut prepared =
                Prepared::new(self.handler.clone(), sockets, self.settings, per_worker)?;
            if worker == 0 {
                prepared.stats_from_workers = stats_rx.take();
            } else {
                prepared.stats_to_worker_0 = Some(stats_tx.clone());
            }
            loops.push(prepared);
        }
        Ok(Workers { loops })
    }
}

/// A server's event loop before it runs: the poll, the registered listeners and the
/// waker, but no session yet — all of it `Send`, so [`Workers`] can build it on one
/// thread and run it on another.
struct Prepared<H> {
    poll: Poll,
    listeners: Vec<Listener>,
    waker: Arc<Waker>,
    shutdown: Arc<AtomicBool>,
    handler: H,
    settings: Settings,
    max_sessions: usize,
    stats_from_workers: Option<mpsc::Receiver<ServerStats>>,
    stats_to_worker_0: Option<mpsc::Sender<ServerStats>>,
}

impl<H> Prepared<H> {
    fn new(
        handler: H,
        std_sockets: Vec<StdUdpSocket>,
        settings: Settings,
        max_sessions: usize,
    ) -> Result<Prepared<H>, Error> {
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        for (i, socket) in std_sockets.into_iter().enumerate() {
            let local = socket.local_addr()?;
            let mut socket = UdpSocket::from_std(socket);
            poll.registry()
                .register(&mut socket, Token(LISTENER_BASE - i), Interest::READABLE)?;
            if settings.single_port {
                // Every session's ACKs and DATA share these buffers.
                let _ = sys::set_recv_buffer(&socket, SINGLE_PORT_BUFFER);
                let _ = sys::set_send_buffer(&socket, SINGLE_PORT_BUFFER);
            } else {
                // A boot storm's requests arrive in one burst: room for thousands of them
                // (a small datagram takes about 1 KiB of buffer).
                let _ = sys::set_recv_buffer(&socket, LISTENER_BUFFER);
            }
            listeners.push(Listener {
                socket,
                v6: local.is_ipv6(),
                local,
                readable: true,
            });
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        Ok(Prepared {
            poll,
            listeners,
            waker,
            shutdown: Arc::new(AtomicBool::new(false)),
            handler,
            settings,
            max_sessions,
            stats_from_workers: None,
            stats_to_worker_0: None,
        })
    }
}

/// Stops a running [`Server`] from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    /// One flag and waker per event loop (several for [`Workers`]).
    loops: Arc<[(Arc<AtomicBool>, Arc<Waker>)]>,
}

impl ShutdownHandle {
    /// Asks the server (every worker) to stop: it stops accepting requests at once, lets
    /// running sessions finish within the shutdown grace, then aborts the rest and `run`
    /// returns.
    pub fn shutdown(&self) {
        for (flag, waker) in self.loops.iter() {
            flag.store(true, Ordering::SeqCst);
            if let Err(e) = waker.wake() {
                warn!("cannot wake the event loop: {e}");
            }
        }
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let requested = self
            .loops
            .iter()
            .any(|(flag, _)| flag.load(Ordering::SeqCst));
        f.debug_struct("ShutdownHandle")
            .field("loops", &self.loops.len())
            .field("requested", &requested)
            .finish()
    }
}

/// Several servers on the same addresses, one event loop and thread each (see
/// [`ServerBuilder::build_workers`]).
pub struct Workers<H> {
    loops: Vec<Prepared<H>>,
}

impl<H: Handler + Send + 'static> Workers<H> {
    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.loops.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.loops.is_empty()
    }

    /// The addresses every worker listens on (with real ports when bound to port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.loops[0].listeners.iter().map(|l| l.local).collect()
    }

    /// The most sessions all workers run at once.
    pub fn max_sessions(&self) -> usize {
        self.loops.iter().map(|l| l.max_sessions).sum()
    }

    /// A handle that stops every worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            loops: self
                .loops
                .iter()
                .map(|l| (l.shutdown.clone(), l.waker.clone()))
                .collect(),
        }
    }

    /// Runs worker 0 on this thread and every other worker on a thread of its own, until
    /// all have shut down. Returns the first error; a worker that fails makes the others
    /// stop too.
    pub fn run(self) -> Result<(), Error> {
        let stop = self.shutdown_handle();
        let mut loops = self.loops.into_iter();
        let Some(first) = loops.next() else {
            return Ok(());
        };
        let mut threads = Vec::new();
        for (i, prepared) in loops.enumerate() {
            let stop_all = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dyntftp-worker-{}", i + 1))
                .spawn(move || {
                    let result = Server::start(prepared).run();
                    if result.is_err() {
                        stop_all.shutdown();
                    }
                    result
                })
                .map_err(Error::Io);
            match thread {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop.shutdown();
                    return Err(e);
                }
            }
        }
        let mut first = Server::start(first);
        let mut result = first.run_loop();
        if result.is_err() {
            stop.shutdown();
        }
        for thread in threads {
            let joined = thread.join().unwrap_or(Err(Error::WorkerPanicked));
            if result.is_ok() {
                result = joined;
            }
        }
        // Every other worker has made its last report: the last one covers them all.
        first.report_stats();
        result
    }
}

/// Sessions whose sources said they are ready again, filled from any thread.
struct ReadyQueue {
    pending: Mutex<Vec<(usize, u32)>>,
    waker: Arc<Waker>,
}

impl ReadySink for ReadyQueue {
    fn ready(&self, key: usize, generation: u32) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let first = pending.is_empty();
        pending.push((key, generation));
        drop(pending);
        // A non-empty queue already has a wake-up on its way.
        if first {
            if let Err(e) = self.waker.wake() {
                warn!("cannot wake the event loop: {e}");
            }
        }
    }
}

/// Socket buffer sizes asked for in single-port mode (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`).
const SINGLE_PORT_BUFFER: usize = 8 << 20;
/// Receive buffer asked for on a listener (same cap).
const LISTENER_BUFFER: usize = 8 << 20;

struct Listener {
    socket: UdpSocket,
    /// An IPv6 socket (dual-stack when bound to `[::]`): IPv4 peers are mapped.
    v6: bool,
    local: SocketAddr,
    /// True when the socket may hold datagrams not read yet (edge-triggered readiness).
    readable: bool,
}

/// Where a session sends from and receives on.
enum Transport {
    /// Its own socket, on a new port (its transfer ID).
    Own(UdpSocket),
    /// A listener, in single-port mode; `source` is the address the client sent its
    /// request to (with its interface), used as the source of every reply.
    Shared {
        listener: usize,
        source: Option<(IpAddr, u32)>,
    },
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

/// Sends `datagrams` to `peer` over `transport`: one datagram, or with `segment` several
/// of that size back to back in one UDP GSO send.
fn send(
    listeners: &[Listener],
    transport: &Transport,
    datagrams: &[u8],
    peer: SocketAddr,
    segment: Option<u16>,
) -> io::Result<usize> {
    match (transport, segment) {
        (Transport::Own(socket), None) => socket.send_to(datagrams, peer),
        (Transport::Own(socket), Some(segment)) => {
            sys::send_segments(socket, datagrams, segment, peer)
        }
        (Transport::Shared { listener, source }, segment) => {
            let listener = &listeners[*listener];
            sys::send_from(
                &listener.socket,
                listener.v6,
                datagrams,
                peer,
                *source,
                segment,
            )
        }
    }
}

/// One running session and what the driver knows about it.
struct Entry {
    generation: u32,
    transport: Transport,
    peer: SocketAddr,
    local: SocketAddr,
    session: Session,
    /// The live timer wheel entry, if any, and its deadline.
    timer: Option<(Instant, TimerKey)>,
    filename: String,
    mode: Mode,
    requested: Vec<(String, String)>,
    start_time: SystemTime,
}

/// A TFTP server: listeners, sessions and the handler, on one thread.
pub struct Server<H> {
    poll: Poll,
    events: Events,
    listeners: Vec<Listener>,
    waker: Arc<Waker>,
    /// Sources that signalled readiness through their [`Notifier`].
    ready_queue: Arc<ReadyQueue>,
    /// The queue's contents, taken out under the lock and handled after.
    resumed: Vec<(usize, u32)>,
    /// The waker fired in the last poll.
    woken: bool,
    shutdown: Arc<AtomicBool>,
    handler: H,
    /// The builder's settings (what every worker shares).
    settings: Settings,
    max_sessions: usize,
    sessions: Slab<Entry>,
    by_peer: HashMap<SocketAddr, usize>,
    wheel: TimerWheel<(usize, u32)>,
    next_generation: u32,
    /// Receive buffer for session sockets, large enough for any datagram.
    buf: Vec<u8>,
    /// Receive buffer for the listeners (separate: a request may make the driver read a
    /// session socket while the request is still borrowed).
    request_buf: Vec<u8>,
    /// Encoding buffer for ERROR packets.
    scratch: Vec<u8>,
    /// Tokens that were ready in the last poll.
    ready: Vec<Token>,
    now: Instant,
    stats: ServerStats,
    stats_since: Instant,
    /// Set once shutdown started: when remaining sessions are aborted.
    grace_deadline: Option<Instant>,
    rate_limiter: Option<RateLimiter>,
    per_client: ClientCounts,
    logs: LogLimits,
    /// In single-port mode, the listener and destination of the datagram being handled
    /// (replies to it go out the same way).
    arrival: Option<(usize, Option<(IpAddr, u32)>)>,
    /// Requests waiting for a session slot (single-port mode) or for file descriptors.
    pending: VecDeque<Pending>,
    /// Descriptors ran out: no new request is taken before this (or a session's end).
    descriptors_paused_until: Option<Instant>,
    /// Send runs of DATA with UDP GSO (turned off for good at the first failure).
    gso: bool,
    /// Whether to poll without sleeping before a wait, and for how long.
    spinner: Spinner,
    /// Worker 0 of several: the other workers' statistics, added to its reports.
    stats_from_workers: Option<mpsc::Receiver<ServerStats>>,
    /// Another worker: its statistics go to worker 0 instead of the handler.
    stats_to_worker_0: Option<mpsc::Sender<ServerStats>>,
}

/// How long new requests wait after descriptors ran out, when no session ends sooner.
const DESCRIPTOR_RETRY: Duration = Duration::from_secs(1);

/// Whether an error means the process or system is out of file descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A request kept in single-port mode until a session slot frees.
struct Pending {
    peer: SocketAddr,
    local: SocketAddr,
    arrival: Option<(usize, Option<(IpAddr, u32)>)>,
    datagram: Vec<u8>,
}

/// The most bytes and datagrams one UDP GSO send may carry (Linux: 64 KiB minus
/// headers, and `UDP_MAX_SEGMENTS`).
const GSO_MAX_BYTES: usize = 65_000;
const GSO_MAX_SEGMENTS: usize = 64;

/// Requests kept at most while `max_sessions` run in single-port mode.
const PENDING_REQUESTS: usize = 1024;

/// Clients whose request rate is tracked at once; beyond, new clients wait for old
/// buckets to refill (see [`RateLimiter`]).
const RATE_LIMITER_CLIENTS: usize = 65_536;

/// One limiter per kind of warning, so a flood of one kind cannot hide the others.
struct LogLimits {
    rate_limited: LogLimiter,
    client_limited: LogLimiter,
    sockets: LogLimiter,
    panics: LogLimiter,
}

impl Default for LogLimits {
    fn default() -> LogLimits {
        // Ten lines per kind per minute at most: enough to see what happens.
        let limiter = || LogLimiter::new(Duration::from_secs(60), 10);
        LogLimits {
            rate_limited: limiter(),
            client_limited: limiter(),
            sockets: limiter(),
            panics: limiter(),
        }
    }
}

/// Logs a line at `level` unless `limiter` holds it back, saying first how many lines
/// it held back since the last one.
fn log_limited(
    limiter: &mut LogLimiter,
    now: Instant,
    level: log::Level,
    args: fmt::Arguments<'_>,
) {
    if let LogDecision::Log { suppressed } = limiter.check(now) {
        if suppressed > 0 {
            log::log!(level, "({suppressed} similar messages suppressed)");
        }
        log::log!(level, "{args}");
    }
}

impl<H: Handler> Server<H> {
    /// A server on bound listeners (non-blocking, destination reporting on).
    fn new(
        handler: H,
        std_sockets: Vec<StdUdpSocket>,
        settings: Settings,
        max_sessions: usize,
    ) -> Result<Server<H>, Error> {
        Ok(Server::start(Prepared::new(
            handler,
            std_sockets,
            settings,
            max_sessions,
        )?))
    }

    /// The server for a prepared loop (on the thread that will run it).
    fn start(prepared: Prepared<H>) -> Server<H> {
        let Prepared {
            poll,
            listeners,
            waker,
            shutdown,
            handler,
            settings,
            max_sessions,
            stats_from_workers,
            stats_to_worker_0,
        } = prepared;
        let now = Instant::now();
        Server {
            poll,
            events: Events::with_capacity(1024),
            listeners,
            ready_queue: Arc::new(ReadyQueue {
                pending: Mutex::new(Vec::new()),
                waker: waker.clone(),
            }),
            resumed: Vec::new(),
            woken: false,
            waker,
            shutdown,
            handler,
            settings,
            max_sessions,
            sessions: Slab::new(),
            by_peer: HashMap::new(),
            wheel: TimerWheel::with_origin(now),
            next_generation: 0,
            buf: vec![0; MAX_DATAGRAM],
            request_buf: vec![0; MAX_DATAGRAM],
            scratch: Vec::new(),
            ready: Vec::new(),
            now,
            stats: ServerStats::default(),
            stats_since: now,
            grace_deadline: None,
            rate_limiter: settings
                .request_rate
                .map(|rate| RateLimiter::new(rate, RATE_LIMITER_CLIENTS)),
            per_client: ClientCounts::default(),
            logs: LogLimits::default(),
            arrival: None,
            pending: VecDeque::new(),
            descriptors_paused_until: None,
            gso: settings.udp_gso,
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
        self.sessions.len()
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
        if self.grace_deadline.is_some() && self.sessions.is_empty() {
            return Ok(false);
        }
        let mut timeout = self.poll_timeout(max_wait);
        let spin = self.spin_for_events(timeout)?;
        if spin == Spin::Found {
            self.now = Instant::now();
        } else {
            let before = self.now;
            if spin == Spin::Missed {
                // The spin used some of the time to the next deadline.
                timeout = self.poll_timeout(max_wait);
            }
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            self.now = Instant::now();
            if !self.events.is_empty() {
                // From the end of the previous wait: includes the handling since, which
                // only makes a wait look longer (less spinning).
                self.spinner.blocked(self.now - before);
            }
        }
        self.ready.clear();
        self.woken = false;
        for event in self.events.iter() {
            match event.token() {
                WAKER => self.woken = true,
                Token(t) if t > LISTENER_BASE - self.listeners.len() => {
                    self.listeners[LISTENER_BASE - t].readable = true;
                }
                token => self.ready.push(token),
            }
        }
        if self.shutdown.load(Ordering::SeqCst) && self.grace_deadline.is_none() {
            self.begin_shutdown()?;
        }
        // Requests first: a request that repeats a running session's must be judged on
        // what that session had received before it, not on what a fast client sent since.
        if self.grace_deadline.is_none() || self.settings.single_port {
            self.read_listeners();
        }
        for i in 0..self.ready.len() {
            self.on_session_readable(self.ready[i].0, true);
        }
        if self.woken {
            self.resume_ready_sources();
        }
        while let Some((key, generation)) = self.wheel.poll(self.now) {
            self.on_timer(key, generation);
        }
        if self
            .descriptors_paused_until
            .is_some_and(|until| self.now >= until)
        {
            self.descriptors_paused_until = None;
        }
        if !self.pending.is_empty() {
            self.start_pending();
        }
        if let Some(limiter) = self.rate_limiter.as_mut() {
            limiter.prune(self.now);
        }
        if self.now >= self.stats_since + self.settings.stats_interval {
            self.report_stats();
        }
        if let Some(deadline) = self.grace_deadline {
            if self.now >= deadline {
                self.abort_all();
            }
        }
        Ok(!(self.grace_deadline.is_some() && self.sessions.is_empty()))
    }

    /// With sessions running and the [`Spinner`] for it, polls without sleeping for up
    /// to its budget (never past `timeout`).
    fn spin_for_events(&mut self, timeout: Option<Duration>) -> Result<Spin, Error> {
        let budget = self.spinner.budget();
        if budget.is_zero() || self.sessions.is_empty() || timeout == Some(Duration::ZERO) {
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
        let accepting = self.grace_deadline.is_none()
            && (self.settings.single_port
                || (self.sessions.len() < self.max_sessions
                    && self.descriptors_paused_until.is_none()));
        if accepting && self.listeners.iter().any(|l| l.readable) {
            // Requests are queued (readiness is edge-triggered: no event will come).
            return Some(Duration::ZERO);
        }
        let mut wake = self.stats_since + self.settings.stats_interval;
        if let Some(until) = self.descriptors_paused_until {
            wake = wake.min(until);
        }
        if let Some(deadline) = self.wheel.next_deadline() {
            wake = wake.min(deadline);
        }
        if let Some(deadline) = self.grace_deadline {
            wake = wake.min(deadline);
        }
        // The clock moved since `self.now` was read; that only makes the wait shorter.
        let until = wake.saturating_duration_since(Instant::now());
        Some(max_wait.map_or(until, |max| max.min(until)))
    }

    fn begin_shutdown(&mut self) -> Result<(), Error> {
        info!(
            "shutting down: no new requests; {} session(s) get {:?} to finish",
            self.sessions.len(),
            self.settings.shutdown_grace
        );
        // In single-port mode the listeners carry the running sessions' ACKs: they stay
        // open, and requests are dropped instead.
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
        let keys: Vec<usize> = self.sessions.iter().map(|(key, _)| key).collect();
        for key in keys {
            let entry = &mut self.sessions[key];
            entry.session.abort(
                self.now,
                ErrorCode::NotDefined,
                "server shutting down",
                Outcome::ShutDown,
            );
            self.drive(key);
        }
    }

    /// Reads requests from every readable listener while there is room for sessions.
    fn read_listeners(&mut self) {
        for i in 0..self.listeners.len() {
            while self.listeners[i].readable
                && (self.settings.single_port
                    || (self.sessions.len() < self.max_sessions
                        && self.descriptors_paused_until.is_none()))
            {
                match sys::recv_with_destination(&self.listeners[i].socket, &mut self.request_buf) {
                    Ok(received) => self.on_request(i, received),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.listeners[i].readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // ICMP errors and the like: nothing to do with this datagram.
                        debug!("listener {}: receive failed: {e}", self.listeners[i].local);
                    }
                }
            }
        }
    }

    fn on_request(&mut self, listener: usize, received: sys::Received) {
        let peer = received.peer;
        let listener_local = self.listeners[listener].local;
        let local = match received.destination {
            Some((ip, ifindex)) => socket_addr_with_scope(ip, listener_local.port(), ifindex),
            None => SocketAddr::new(sys::unmap(listener_local.ip()), listener_local.port()),
        };
        if received.truncated {
            self.stats.malformed += 1;
            debug!("{peer}: datagram longer than 65535 bytes, ignored");
            return;
        }
        // Temporarily take the buffer so the packet can borrow it while `self` changes.
        let buf = std::mem::take(&mut self.request_buf);
        if self.settings.single_port {
            self.arrival = Some((listener, received.destination));
            self.on_single_port_datagram(peer, local, &buf[..received.len]);
            self.arrival = None;
        } else if self.within_rate(peer) {
            self.on_listener_datagram(peer, local, &buf[..received.len]);
        }
        self.request_buf = buf;
    }

    /// Single-port mode: a datagram from a peer with a session is that session's, unless
    /// it is a request; a non-request from anyone else is a stray (ERROR 5, as a session
    /// socket would answer it); requests are handled as a listener does, queued while
    /// `max_sessions` run.
    fn on_single_port_datagram(&mut self, peer: SocketAddr, local: SocketAddr, datagram: &[u8]) {
        let parsed = Packet::parse(datagram);
        let request = matches!(parsed, Ok(Packet::Rrq(_) | Packet::Wrq(_)));
        let session = self.by_peer.get(&peer).copied();
        if let (Some(key), false) = (session, request) {
            let session = &mut self.sessions[key].session;
            match parsed {
                Ok(packet) => session.handle_packet(self.now, packet),
                // Counted as malformed by the session.
                Err(_) => session.handle_datagram(self.now, datagram),
            }
            self.drive(key);
            return;
        }
        if self.grace_deadline.is_some() && session.is_none() {
            // Shutting down: nothing new.
            return;
        }
        if !self.within_rate(peer) {
            return;
        }
        match parsed {
            Ok(Packet::Error { .. }) if session.is_none() => {
                // Never answer an ERROR.
                self.stats.stray_datagrams += 1;
            }
            Ok(Packet::Data { .. } | Packet::Ack { .. } | Packet::Oack(_)) => {
                self.stats.stray_datagrams += 1;
                debug!("{peer}: datagram for no session, ERROR 5");
                self.send_unknown_tid(peer);
            }
            Ok(Packet::Rrq(_))
                if session.is_none()
                    && (self.sessions.len() >= self.max_sessions
                        || self.descriptors_paused_until.is_some()) =>
            {
                self.queue_request(peer, local, datagram);
            }
            parsed => self.on_listener_packet(peer, local, parsed, datagram),
        }
    }

    /// Single-port mode: answers a stray datagram with ERROR 5 from the port it came to.
    fn send_unknown_tid(&mut self, peer: SocketAddr) {
        let Some((listener, source)) = self.arrival else {
            return;
        };
        answer_stray(
            &self.listeners,
            &Transport::Shared { listener, source },
            &mut self.scratch,
            &mut self.stats,
            peer,
        );
    }

    /// Single-port mode with `max_sessions` running: keeps a request until a session ends
    /// (the listener cannot be left unread, as it is in the normal mode, since it carries
    /// the running sessions' ACKs). One request per peer; beyond [`PENDING_REQUESTS`],
    /// requests are dropped and the client resends them.
    fn queue_request(&mut self, peer: SocketAddr, local: SocketAddr, datagram: &[u8]) {
        if self.pending.iter().any(|p| p.peer == peer) {
            self.stats.requests += 1;
            self.stats.duplicate_requests += 1;
            return;
        }
        if self.pending.len() >= PENDING_REQUESTS {
            self.stats.busy += 1;
            return;
        }
        self.pending.push_back(Pending {
            peer,
            local,
            arrival: self.arrival,
            datagram: datagram.to_vec(),
        });
    }

    /// Descriptors ran out: keeps the request (first in line) and stops taking new ones
    /// until a session ends or [`DESCRIPTOR_RETRY`] passes, instead of refusing requests
    /// a moment later there would be room for. Logged once per episode.
    fn pause_for_descriptors(&mut self, peer: SocketAddr, local: SocketAddr, datagram: &[u8]) {
        if self.descriptors_paused_until.is_none() {
            self.stats.descriptor_pauses += 1;
            log_limited(
                &mut self.logs.sockets,
                self.now,
                log::Level::Warn,
                format_args!(
                    "out of file descriptors with {} sessions running: new requests wait \
                     until one ends (raise the limit, or lower --max-sessions)",
                    self.sessions.len()
                ),
            );
        }
        self.descriptors_paused_until = Some(self.now + DESCRIPTOR_RETRY);
        if self.pending.len() < PENDING_REQUESTS {
            self.pending.push_front(Pending {
                peer,
                local,
                arrival: self.arrival,
                datagram: datagram.to_vec(),
            });
        } else {
            self.stats.busy += 1;
        }
    }

    /// Starts queued requests while there is room.
    fn start_pending(&mut self) {
        while self.sessions.len() < self.max_sessions
            && self.grace_deadline.is_none()
            && self.descriptors_paused_until.is_none()
        {
            let Some(pending) = self.pending.pop_front() else {
                return;
            };
            self.arrival = pending.arrival;
            self.on_listener_datagram(pending.peer, pending.local, &pending.datagram);
            self.arrival = None;
        }
    }

    /// Handles a datagram sent to a listener.
    fn on_listener_datagram(&mut self, peer: SocketAddr, local: SocketAddr, datagram: &[u8]) {
        self.on_listener_packet(peer, local, Packet::parse(datagram), datagram);
    }

    /// Handles a datagram sent to a listener, parsed as `parsed`.
    fn on_listener_packet(
        &mut self,
        peer: SocketAddr,
        local: SocketAddr,
        parsed: Result<Packet<'_>, ParseError>,
        datagram: &[u8],
    ) {
        match parsed {
            Ok(Packet::Rrq(request)) => self.on_rrq(peer, local, request, datagram),
            Ok(Packet::Wrq(_)) => {
                self.stats.write_requests += 1;
                self.reject(
                    peer,
                    local,
                    &Reject::new(
                        ErrorCode::IllegalOperation,
                        "write requests are not supported",
                    ),
                );
            }
            Ok(Packet::Error { .. }) => {
                // Never answer an ERROR.
                self.stats.malformed += 1;
                debug!("{peer}: ERROR sent to the listener, ignored");
            }
            Ok(other) => {
                self.stats.malformed += 1;
                debug!("{peer}: {:?} sent to the listener", other.opcode());
                self.reject(
                    peer,
                    local,
                    &Reject::new(ErrorCode::UnknownTransferId, "unknown transfer id"),
                );
            }
            Err(e) => {
                self.stats.malformed += 1;
                debug!("{peer}: malformed request: {e}");
                // A request too short to have an opcode gets silence; a broken
                // request gets told what was wrong.
                if datagram.len() >= 2 {
                    self.reject(
                        peer,
                        local,
                        &Reject::new(
                            ErrorCode::IllegalOperation,
                            format!("malformed request: {e}"),
                        ),
                    );
                }
            }
        }
    }

    /// Whether the peer's client may send one more datagram to a listener now.
    fn within_rate(&mut self, peer: SocketAddr) -> bool {
        let Some(limiter) = self.rate_limiter.as_mut() else {
            return true;
        };
        if peer.ip().is_loopback() && !self.settings.limit_loopback {
            return true;
        }
        if limiter.allow(ClientKey::from(peer.ip()), self.now) {
            return true;
        }
        self.stats.rate_limited += 1;
        log_limited(
            &mut self.logs.rate_limited,
            self.now,
            log::Level::Warn,
            format_args!("{peer}: over the request rate limit, dropped"),
        );
        false
    }

    /// The per-client key a session counts under, when the per-client cap applies.
    fn capped_client(&self, peer: SocketAddr) -> Option<ClientKey> {
        self.settings.max_sessions_per_client?;
        if peer.ip().is_loopback() && !self.settings.limit_loopback {
            return None;
        }
        Some(ClientKey::from(peer.ip()))
    }

    fn on_rrq(
        &mut self,
        peer: SocketAddr,
        local: SocketAddr,
        request: crate::packet::Request<'_>,
        datagram: &[u8],
    ) {
        self.stats.requests += 1;
        if let Some(&key) = self.by_peer.get(&peer) {
            // A client that reuses its port may send its next request right after the
            // last ACK of the previous transfer, and the listener can be read before that
            // ACK. Feed the session what is queued for it, sending nothing meanwhile: all
            // of it answers packets sent before this request was read, so the session
            // ends only if the client had acknowledged everything.
            let generation = self.sessions[key].generation;
            self.on_session_readable(session_token(key, generation).0, false);
        }
        if self.by_peer.contains_key(&peer) {
            self.stats.duplicate_requests += 1;
            debug!("{peer}: repeated request while its session runs, ignored");
            return;
        }
        let client = self.capped_client(peer);
        if let (Some(client), Some(max)) = (client, self.settings.max_sessions_per_client) {
            if self.per_client.get(client) >= max {
                self.stats.client_limited += 1;
                log_limited(
                    &mut self.logs.client_limited,
                    self.now,
                    log::Level::Warn,
                    format_args!("{peer}: already {max} sessions from this client, refused"),
                );
                return self.reject(
                    peer,
                    local,
                    &Reject::new(
                        ErrorCode::NotDefined,
                        "too many transfers from your address",
                    ),
                );
            }
        }
        let mode = match request.mode() {
            Some(mode @ (Mode::Octet | Mode::Netascii)) => mode,
            Some(Mode::Mail) => {
                return self.reject(
                    peer,
                    local,
                    &Reject::new(ErrorCode::IllegalOperation, "mail mode is not supported"),
                )
            }
            None => {
                return self.reject(
                    peer,
                    local,
                    &Reject::new(ErrorCode::IllegalOperation, "unknown transfer mode"),
                )
            }
        };
        // The session's socket comes first: when descriptors run out, the request waits
        // (see `pause_for_descriptors`) before the handler has done anything.
        let socket = match self.arrival {
            Some((listener, source)) => Ok(Transport::Shared { listener, source }),
            None => sys::bind_ephemeral(SocketAddr::new(local.ip(), 0).with_scope_of(local))
                .map(|socket| Transport::Own(UdpSocket::from_std(socket))),
        };
        let mut transport = match socket {
            Ok(transport) => transport,
            Err(e) if out_of_descriptors(&e) => {
                self.stats.requests -= 1;
                return self.pause_for_descriptors(peer, local, datagram);
            }
            Err(e) => {
                log_limited(
                    &mut self.logs.sockets,
                    self.now,
                    log::Level::Warn,
                    format_args!(
                        "{peer}: cannot open a session socket on {}: {e}",
                        local.ip()
                    ),
                );
                self.stats.send_errors += 1;
                return;
            }
        };
        // The session's slot and generation are fixed before `open`, so the source can be
        // given a notifier for it. A refused request only wastes a generation.
        let key = self.sessions.vacant_key();
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        let notifier = Notifier::new(self.ready_queue.clone(), key, generation);
        let read_request = ReadRequest {
            peer,
            local,
            filename: request.filename,
            mode,
            options: request.options,
            notifier: &notifier,
        };
        let filename = read_request.filename_lossy().into_owned();
        let handler = &mut self.handler;
        let opened = catch_unwind(AssertUnwindSafe(|| handler.open(&read_request)));
        let source = match opened {
            Ok(Ok(source)) => source,
            Ok(Err(reject)) if reject.retry_later => {
                // The handler is short of a resource that running sessions hold (its own
                // file descriptors): the request waits as if the server had none.
                drop(transport);
                self.stats.requests -= 1;
                return self.pause_for_descriptors(peer, local, datagram);
            }
            Ok(Err(reject)) => {
                debug!("{peer}: {filename:?} refused: {reject}");
                return self.reject(peer, local, &reject);
            }
            Err(_) => {
                self.stats.panics += 1;
                log_limited(
                    &mut self.logs.panics,
                    self.now,
                    log::Level::Error,
                    format_args!("{peer}: the handler panicked opening {filename:?}"),
                );
                return self.reject(
                    peer,
                    local,
                    &Reject::new(ErrorCode::NotDefined, "internal error"),
                );
            }
        };
        let config = self.settings.config;
        let now = self.now;
        let created = catch_unwind(AssertUnwindSafe(|| {
            Session::new(now, request.options, mode, source, &config)
        }));
        let Ok(session) = created else {
            self.stats.panics += 1;
            log_limited(
                &mut self.logs.panics,
                self.now,
                log::Level::Error,
                format_args!("{peer}: the source of {filename:?} panicked"),
            );
            return self.reject(
                peer,
                local,
                &Reject::new(ErrorCode::NotDefined, "internal error"),
            );
        };
        let vacant = self.sessions.vacant_entry();
        debug_assert_eq!(vacant.key(), key);
        let registered = match &mut transport {
            Transport::Own(socket) => self.poll.registry().register(
                socket,
                session_token(key, generation),
                Interest::READABLE,
            ),
            Transport::Shared { .. } => Ok(()),
        };
        if let Err(e) = registered {
            log_limited(
                &mut self.logs.sockets,
                self.now,
                log::Level::Warn,
                format_args!("{peer}: cannot register a session socket: {e}"),
            );
            return self.drop_source(session, peer, &filename);
        }
        let window_bytes =
            session.params().window as usize * (session.params().blksize as usize + 32);
        if let (true, Transport::Own(socket)) = (window_bytes > 200_000, &transport) {
            // Let a whole window sit in the socket buffer (the default is ~200 KiB).
            let _ = sys::set_send_buffer(socket, window_bytes * 2);
        }
        vacant.insert(Entry {
            generation,
            transport,
            peer,
            local,
            session,
            timer: None,
            filename,
            mode,
            requested: request
                .options
                .iter()
                .map(|o| {
                    (
                        String::from_utf8_lossy(o.name).into_owned(),
                        String::from_utf8_lossy(o.value).into_owned(),
                    )
                })
                .collect(),
            start_time: SystemTime::now(),
        });
        self.by_peer.insert(peer, key);
        if let Some(client) = client {
            self.per_client.add(client);
        }
        self.stats.sessions_started += 1;
        self.drive(key);
    }

    /// Sends an ERROR for a refused request from a fresh socket bound to the address the
    /// client sent to, as a session would.
    fn reject(&mut self, peer: SocketAddr, local: SocketAddr, reject: &Reject) {
        *self.stats.rejected.entry(reject.code.to_u16()).or_default() += 1;
        self.scratch.clear();
        write_error(&mut self.scratch, reject.code, &reject.message);
        let sent = match self.arrival {
            // Single-port mode: from the port the request came to.
            Some((listener, source)) => {
                let listener = &self.listeners[listener];
                sys::send_from(
                    &listener.socket,
                    listener.v6,
                    &self.scratch,
                    peer,
                    source,
                    None,
                )
            }
            None => sys::bind_ephemeral(SocketAddr::new(local.ip(), 0).with_scope_of(local))
                .and_then(|socket| socket.send_to(&self.scratch, peer)),
        };
        match sent {
            Ok(_) => self.stats.datagrams_sent += 1,
            Err(e) => {
                self.stats.send_errors += 1;
                debug!("{peer}: cannot send ERROR: {e}");
            }
        }
    }

    /// Reads a session socket until it is empty. With `drive_each`, the session's output
    /// is sent after every datagram; without, only once at the end, so that nothing read
    /// can be an answer to something sent during the call.
    fn on_session_readable(&mut self, token: usize, drive_each: bool) {
        let key = token & 0xffff_ffff;
        let generation = (token >> 32) as u32;
        loop {
            let Some(entry) = self.sessions.get_mut(key) else {
                return;
            };
            if entry.generation != generation {
                return;
            }
            let Transport::Own(socket) = &entry.transport else {
                return;
            };
            let (len, from) = match socket.recv_from(&mut self.buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !drive_each {
                        self.drive(key);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("{}: session receive failed: {e}", entry.peer);
                    continue;
                }
            };
            let from = sys::unmap_socket(from);
            if from != entry.peer {
                self.stats.stray_datagrams += 1;
                debug!("{from}: datagram for {}'s session, ERROR 5", entry.peer);
                // Never answer an ERROR, not even a stray one.
                if !matches!(Packet::parse(&self.buf[..len]), Ok(Packet::Error { .. })) {
                    answer_stray(
                        &self.listeners,
                        &entry.transport,
                        &mut self.scratch,
                        &mut self.stats,
                        from,
                    );
                }
                continue;
            }
            entry.session.handle_datagram(self.now, &self.buf[..len]);
            if drive_each || entry.session.is_done() {
                self.drive(key);
            }
        }
    }

    /// Resumes the sessions whose sources notified readiness.
    fn resume_ready_sources(&mut self) {
        {
            let mut pending = self
                .ready_queue
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *pending, &mut self.resumed);
        }
        let mut resumed = std::mem::take(&mut self.resumed);
        for &(key, generation) in &resumed {
            let Some(entry) = self.sessions.get_mut(key) else {
                continue;
            };
            if entry.generation != generation || entry.session.is_done() {
                continue;
            }
            entry.session.handle_source_ready(self.now);
            self.drive(key);
        }
        resumed.clear();
        self.resumed = resumed;
    }

    fn on_timer(&mut self, key: usize, generation: u32) {
        let Some(entry) = self.sessions.get_mut(key) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        entry.timer = None;
        entry.session.handle_timeout(self.now);
        self.drive(key);
    }

    /// Drains a session's output: sends, re-arms its timer, or finishes it.
    fn drive(&mut self, key: usize) {
        loop {
            let entry = &mut self.sessions[key];
            let Entry {
                session,
                transport,
                peer,
                ..
            } = entry;
            let max_datagrams = if self.gso {
                let segment = session.params().blksize as usize + DATA_HEADER_LEN;
                (GSO_MAX_BYTES / segment).clamp(1, GSO_MAX_SEGMENTS)
            } else {
                1
            };
            // Moving the borrow into the closure makes it FnOnce, so the output may borrow the
            // session beyond the call.
            let output = catch_unwind(AssertUnwindSafe(move || {
                let session = session;
                session.poll_output(max_datagrams)
            }));
            match output {
                Ok(Output::Transmit(transmit)) => {
                    match transmit.retransmission {
                        Some(Retransmission::Timeout) => self.stats.retransmits += 1,
                        Some(Retransmission::Early) => self.stats.early_retransmits += 1,
                        None => {}
                    }
                    if transmit.datagrams == 1 {
                        let sent = send(&self.listeners, transport, transmit.contents, *peer, None);
                        count_send(&mut self.stats, sent, 1, transmit.payload, *peer);
                        continue;
                    }
                    let segment = Some(transmit.segment_size as u16);
                    match send(
                        &self.listeners,
                        transport,
                        transmit.contents,
                        *peer,
                        segment,
                    ) {
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                            // No GSO here: never again, and these packets one by one.
                            info!(
                                "UDP segmentation offload unavailable ({e}); sending one \
                                 datagram per call"
                            );
                            self.gso = false;
                            for datagram in transmit.datagrams() {
                                let sent = send(&self.listeners, transport, datagram, *peer, None);
                                let payload = (datagram.len() - DATA_HEADER_LEN) as u64;
                                count_send(&mut self.stats, sent, 1, payload, *peer);
                            }
                        }
                        sent => {
                            let datagrams = transmit.datagrams as u64;
                            count_send(&mut self.stats, sent, datagrams, transmit.payload, *peer);
                        }
                    }
                }
                Ok(Output::Wait(deadline)) => {
                    match entry.timer {
                        Some((armed, _)) if armed <= deadline => {}
                        previous => {
                            if let Some((_, stale)) = previous {
                                self.wheel.cancel(stale);
                            }
                            let timer = self.wheel.insert(deadline, (key, entry.generation));
                            entry.timer = Some((deadline, timer));
                        }
                    }
                    return;
                }
                Ok(Output::Done(outcome)) => return self.finish(key, outcome),
                Err(_) => self.source_panicked(key),
            }
        }
    }

    /// User code panicked while the session read its source: it ends with ERROR 0.
    fn source_panicked(&mut self, key: usize) {
        let now = self.now;
        let entry = &mut self.sessions[key];
        self.stats.panics += 1;
        log_limited(
            &mut self.logs.panics,
            now,
            log::Level::Error,
            format_args!(
                "{}: the source of {:?} panicked",
                entry.peer, entry.filename
            ),
        );
        entry.session.abort(
            now,
            ErrorCode::NotDefined,
            "internal error",
            Outcome::Panicked,
        );
    }

    fn finish(&mut self, key: usize, outcome: Outcome) {
        let entry = self.sessions.remove(key);
        // Its descriptors are free again.
        self.descriptors_paused_until = None;
        if let Some((_, timer)) = entry.timer {
            self.wheel.cancel(timer);
        }
        // The session's own socket is closed when `entry` drops, which also takes it out
        // of the epoll set (the descriptor is never shared): no deregistration call, one
        // system call fewer per session.
        self.by_peer.remove(&entry.peer);
        if let Some(client) = self.capped_client(entry.peer) {
            self.per_client.remove(client);
        }
        *self
            .stats
            .sessions_finished
            .entry(outcome.as_str())
            .or_default() += 1;
        let transfer = entry.session.stats().clone();
        self.drop_source(entry.session, entry.peer, &entry.filename);
        let stats = SessionStats {
            peer: entry.peer,
            local: entry.local,
            filename: entry.filename,
            mode: entry.mode,
            requested: entry.requested,
            start_time: entry.start_time,
            duration: transfer.duration(self.now),
            outcome,
            transfer,
        };
        self.stats.session_durations.record(stats.duration);
        info!(
            target: SESSION_LOG_TARGET,
            "{} {:?} {}: {} bytes in {:.3} s ({:.1} MB/s), outcome {}{}, {} retransmits",
            stats.peer,
            stats.filename,
            stats.mode,
            stats.transfer.bytes_read,
            stats.duration.as_secs_f64(),
            stats.rate() / 1e6,
            outcome.as_str(),
            stats
                .error()
                .map(|(code, msg)| format!(" (ERROR {code}: {msg})"))
                .unwrap_or_default(),
            stats.transfer.retransmits,
        );
        let handler = &mut self.handler;
        if catch_unwind(AssertUnwindSafe(|| handler.session_finished(&stats))).is_err() {
            self.stats.panics += 1;
            log_limited(
                &mut self.logs.panics,
                self.now,
                log::Level::Error,
                format_args!("the handler panicked in session_finished"),
            );
        }
    }

    /// Drops a source (or the session holding it): its `Drop` is user code and may panic
    /// too, which must end nothing but that source.
    fn drop_source<T>(&mut self, source: T, peer: SocketAddr, filename: &str) {
        if catch_unwind(AssertUnwindSafe(move || drop(source))).is_err() {
            self.stats.panics += 1;
            log_limited(
                &mut self.logs.panics,
                self.now,
                log::Level::Error,
                format_args!("{peer}: the source of {filename:?} panicked when dropped"),
            );
        }
    }

    fn report_stats(&mut self) {
        let mut stats = std::mem::take(&mut self.stats);
        stats.interval = self.now.saturating_duration_since(self.stats_since);
        stats.active_sessions = self.sessions.len() as u64;
        self.stats_since = self.now;
        if let Some(worker_0) = &self.stats_to_worker_0 {
            // Worker 0 reports for everyone.
            let _ = worker_0.send(stats);
            return;
        }
        if let Some(workers) = &self.stats_from_workers {
            while let Ok(other) = workers.try_recv() {
                stats.merge(&other);
            }
        }
        info!(
            target: STATS_LOG_TARGET,
            "stats: {} requests, {} sessions started, {} finished ({} failed), {} active, \
             {} datagrams / {} bytes sent, {} retransmits, {} malformed, {} stray",
            stats.requests,
            stats.sessions_started,
            stats.sessions_finished.values().sum::<u64>(),
            stats.sessions_failed(),
            stats.active_sessions,
            stats.datagrams_sent,
            stats.bytes_sent,
            stats.retransmits,
            stats.malformed,
            stats.stray_datagrams,
        );
        let handler = &mut self.handler;
        if catch_unwind(AssertUnwindSafe(|| handler.server_stats(&stats))).is_err() {
            self.stats.panics += 1;
            log_limited(
                &mut self.logs.panics,
                self.now,
                log::Level::Error,
                format_args!("the handler panicked in server_stats"),
            );
        }
    }
}

/// Answers a datagram from a stranger with ERROR 5 "unknown transfer id", from the
/// session's (or, in single-port mode, the listener's) address and port.
fn answer_stray(
    listeners: &[Listener],
    transport: &Transport,
    scratch: &mut Vec<u8>,
    stats: &mut ServerStats,
    to: SocketAddr,
) {
    scratch.clear();
    write_error(scratch, ErrorCode::UnknownTransferId, "unknown transfer id");
    let sent = send(listeners, transport, scratch, to, None);
    count_send(stats, sent, 1, 0, to);
}

/// Counts one send of `packets` datagrams carrying `payload` DATA bytes. A send dropped
/// for a full buffer is recovered by the retransmission timer.
fn count_send(
    stats: &mut ServerStats,
    sent: io::Result<usize>,
    packets: u64,
    payload: u64,
    peer: SocketAddr,
) {
    match sent {
        Ok(_) => {
            stats.datagrams_sent += packets;
            stats.bytes_sent += payload;
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => stats.send_would_block += packets,
        Err(e) => {
            stats.send_errors += packets;
            debug!("{peer}: send failed: {e}");
        }
    }
}

fn session_token(key: usize, generation: u32) -> Token {
    Token(((generation as usize) << 32) | key)
}

/// A socket address for `ip`, carrying the interface as scope for IPv6 link-local
/// addresses (which need it to be bound).
fn socket_addr_with_scope(ip: IpAddr, port: u16, ifindex: u32) -> SocketAddr {
    match ip {
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, port, 0, ifindex))
        }
        other => SocketAddr::new(other, port),
    }
}

/// Copies the IPv6 scope of one address onto another.
trait WithScope {
    fn with_scope_of(self, other: SocketAddr) -> SocketAddr;
}

impl WithScope for SocketAddr {
    fn with_scope_of(self, other: SocketAddr) -> SocketAddr {
        match (self, other) {
            (SocketAddr::V6(mut mine), SocketAddr::V6(theirs)) => {
                mine.set_scope_id(theirs.scope_id());
                SocketAddr::V6(mine)
            }
            (mine, _) => mine,
        }
    }
}
