//! Building a server: [`ServerBuilder`] collects the addresses and settings, checks them
//! and binds the listeners; [`Error`] is what building and running can fail with.

use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::ops::RangeInclusive;
use std::time::Duration;

use log::debug;

use crate::handler::Handler;
use crate::limit::Rate;
use crate::options::{Limits, MAX_BLKSIZE, MIN_BLKSIZE};
use crate::session::SessionConfig;
use crate::sys;

use super::admission::Policy;
use super::budget::BUDGET_FLOOR_BLKSIZE;
use super::workers::PreparedLoop;
use super::Server;

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
    pub(super) handler: H,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) sockets: Vec<StdUdpSocket>,
    pub(super) max_sessions: Option<usize>,
    /// [`busy_poll`](Self::busy_poll) as set; `None`: chosen at build from the CPU quota.
    pub(super) busy_poll: Option<Duration>,
    pub(super) settings: Settings,
}

/// What every worker of a server shares: the builder's settings but addresses, handler
/// and `max_sessions`.
#[derive(Clone, Copy)]
pub(super) struct Settings {
    pub(super) config: SessionConfig,
    pub(super) stats_interval: Duration,
    pub(super) shutdown_grace: Duration,
    pub(super) request_rate: Option<Rate>,
    pub(super) max_sessions_per_client: Option<u32>,
    pub(super) limit_loopback: bool,
    pub(super) max_unverified_per_client: Option<u32>,
    pub(super) single_port: bool,
    pub(super) udp_gso: bool,
    pub(super) busy_poll: Duration,
    /// Bytes the running sessions' windows may hold together (see
    /// [`ServerBuilder::window_memory`]).
    pub(super) window_memory: usize,
    /// What single-port sessions are granted at most, on top of `config.limits`.
    pub(super) single_port_limits: Limits,
    /// The ports session sockets bind, first and last (see
    /// [`ServerBuilder::port_range`]); `None`: any port.
    pub(super) port_range: Option<(u16, u16)>,
    /// Whether blksize is clamped to the arrival interface's MTU (see
    /// [`ServerBuilder::mtu_blksize`]).
    pub(super) mtu_blksize: bool,
}

impl Settings {
    /// The limits a new session is negotiated under before the window budget: the
    /// configured ones, and in single-port mode no more than [`single_port_limits`](
    /// ServerBuilder::single_port_limits).
    pub(super) fn session_limits(&self) -> Limits {
        let limits = self.config.limits;
        if !self.single_port {
            return limits;
        }
        let cap = self.single_port_limits;
        Limits {
            max_blksize: limits.max_blksize.min(cap.max_blksize),
            max_window: limits.max_window.min(cap.max_window),
            max_window_bytes: limits.max_window_bytes.min(cap.max_window_bytes),
        }
    }

    /// The session ports, as a range.
    pub(super) fn port_range(&self) -> Option<RangeInclusive<u16>> {
        self.port_range.map(|(low, high)| low..=high)
    }

    /// The settings of one of `workers` loops: each gets its share of the window memory
    /// (as of `max_sessions`).
    pub(super) fn per_worker(&self, workers: usize) -> Settings {
        Settings {
            window_memory: self.window_memory / workers.max(1),
            ..*self
        }
    }

    /// What admission enforces with these settings and `max_sessions`.
    pub(super) fn policy(&self, max_sessions: usize) -> Policy {
        Policy {
            single_port: self.single_port,
            max_sessions,
            max_sessions_per_client: self.max_sessions_per_client,
            max_unverified_per_client: self.max_unverified_per_client,
            unverified_grace: self.config.timeout,
            request_rate: self.request_rate,
            limit_loopback: self.limit_loopback,
        }
    }
}

/// Default cap on the sessions one client (IPv4 address or IPv6 /64) runs at once.
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: u32 = 64;

/// Default cap on the unverified sessions (no ACK yet) one client runs at once (see
/// [`ServerBuilder::max_unverified_per_client`]).
pub const DEFAULT_MAX_UNVERIFIED_PER_CLIENT: u32 = 4;

/// Default limit of [`ServerBuilder::busy_poll`]: a lock-step client on a fast network
/// answers well within it.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// The default busy-polling limit for `loops` event loops under a CPU quota of `quota`
/// CPUs (`None`: no quota): none when the quota is below one CPU per loop.
fn busy_poll_under(quota: Option<f64>, loops: usize) -> Duration {
    match quota {
        Some(cpus) if cpus < loops as f64 => {
            log::info!(
                "busy polling off: the cgroup's CPU quota is {cpus:.2} CPUs for {loops} \
                 event loop(s)"
            );
            Duration::ZERO
        }
        _ => DEFAULT_BUSY_POLL,
    }
}

/// Default of [`ServerBuilder::window_memory`]: 256 MiB, room for 256 windows of the
/// largest size granted by default (1 MiB), or about 2,700 full windows of the largest
/// clients ask for in practice (64 × 1468 bytes); a boot storm of EDK2 clients (window 4 ×
/// 1468) takes 6 MB per thousand.
pub const DEFAULT_WINDOW_MEMORY: usize = 256 << 20;

/// What a session costs at least, besides its window, counted to derive the default
/// `max_sessions` from [`ServerBuilder::window_memory`]: its state, what it keeps of its
/// request (3 KiB at most), its socket in the kernel and a spent budget's one-block
/// window, rounded up. With `window_memory / SESSION_MEMORY` sessions at most, what
/// sessions hold besides their windows is at most the window budget again.
pub const SESSION_MEMORY: usize = 16 << 10;

/// The most sessions by default, whatever the descriptor limit and the window budget
/// allow: below Linux's default ephemeral port range (32768–60999, 28,232 ports), from
/// which every session of the normal mode takes a port.
pub const MAX_DEFAULT_SESSIONS: usize = 16_384;

/// The limits single-port sessions are granted by default (see
/// [`ServerBuilder::single_port_limits`]): blocks of at most 1468 bytes (a 1500-byte MTU
/// minus the IPv4, UDP and TFTP headers, as dnsmasq clamps to the MTU) and windows of at
/// most 8 blocks, so that one spoofed ACK can make the server send at most 8 × 1472
/// bytes.
pub const SINGLE_PORT_LIMITS: Limits = Limits {
    max_blksize: BUDGET_FLOOR_BLKSIZE,
    max_window: 8,
    max_window_bytes: 8 * BUDGET_FLOOR_BLKSIZE as usize,
};

impl<H: Handler> ServerBuilder<H> {
    /// A builder serving requests through `handler`, with the defaults: timeout 1 s,
    /// 5 retries, max blksize 65464, max window 64 blocks and 1 MiB
    /// ([`SINGLE_PORT_LIMITS`] in single-port mode), [`DEFAULT_WINDOW_MEMORY`] for all
    /// windows together, stats every 60 s, `max_sessions` from the file-descriptor limit
    /// and the window memory, 5 s shutdown grace, and the abuse limits [`Rate::DEFAULT`]
    /// and [`DEFAULT_MAX_SESSIONS_PER_CLIENT`] per client (loopback clients exempt),
    /// session sockets on any free port, blksize clamped to the interface's MTU.
    pub fn new(handler: H) -> ServerBuilder<H> {
        ServerBuilder {
            handler,
            addrs: Vec::new(),
            sockets: Vec::new(),
            max_sessions: None,
            busy_poll: None,
            settings: Settings {
                config: SessionConfig::default(),
                stats_interval: Duration::from_secs(60),
                shutdown_grace: Duration::from_secs(5),
                request_rate: Some(Rate::DEFAULT),
                max_sessions_per_client: Some(DEFAULT_MAX_SESSIONS_PER_CLIENT),
                limit_loopback: false,
                max_unverified_per_client: Some(DEFAULT_MAX_UNVERIFIED_PER_CLIENT),
                single_port: false,
                udp_gso: true,
                busy_poll: DEFAULT_BUSY_POLL,
                window_memory: DEFAULT_WINDOW_MEMORY,
                single_port_limits: SINGLE_PORT_LIMITS,
                port_range: None,
                mtu_blksize: true,
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

    /// Most sessions at once. With all running, a request takes the slot of the oldest
    /// session that has had no ACK for a retransmission timeout; when there is none, it
    /// waits (a few seconds at most) for a slot. By default the least of: half the
    /// file-descriptor limit (less 64 spare; a session holds a socket and usually a file),
    /// [`window_memory`](Self::window_memory) / [`SESSION_MEMORY`] (16,384 with the default
    /// budget), and [`MAX_DEFAULT_SESSIONS`].
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = Some(max);
        self
    }

    /// Bytes the windows of all running sessions may hold together (default
    /// [`DEFAULT_WINDOW_MEMORY`], 256 MiB; divided between [`Workers`](super::Workers)).
    /// Each session reserves its window's most, `(4 + blksize) × window` bytes, while it
    /// runs. Once the sum nears the budget, new sessions get smaller windows, down to one
    /// block; when not even one block of the largest size allowed fits, one block of at
    /// most 1468 bytes. Nobody is refused for it: the transfers are only slower.
    pub fn window_memory(mut self, bytes: usize) -> Self {
        self.settings.window_memory = bytes;
        self
    }

    /// The most a session is granted in [single-port mode](Self::single_port), on top of
    /// the other limits (default [`SINGLE_PORT_LIMITS`]: blksize 1468, window 8 blocks and
    /// 11,744 bytes). There, the server's port is known and a session is found by the
    /// client's address and port alone, which a blind attacker can spoof: every ACK it
    /// forges in the window makes the server send part of a window to the victim. The cap
    /// bounds what one forged ACK can release. Raise it (e.g. to [`Limits::default()`])
    /// only where source addresses cannot be spoofed (BCP 38 filtering on the way in).
    pub fn single_port_limits(mut self, limits: Limits) -> Self {
        self.settings.single_port_limits = limits;
        self
    }

    /// Whether sessions retransmit early when the measured round-trip time is far below
    /// the timeout (default true; see [`SessionConfig::adaptive`]).
    pub fn adaptive_timeout(mut self, adaptive: bool) -> Self {
        self.settings.config.adaptive = adaptive;
        self
    }

    /// The shortest adaptive retransmission interval (default 500 µs).
    pub fn min_rto(mut self, min: Duration) -> Self {
        self.settings.config.min_rto = min;
        self
    }

    /// The longest a session may go without progress before it ends, whatever the
    /// client's `timeout` (default 60 s; must be more than zero; see
    /// [`SessionConfig::progress_timeout`]).
    pub fn progress_timeout(mut self, timeout: Duration) -> Self {
        self.settings.config.progress_timeout = timeout;
        self
    }

    /// How long a session waits for a [`Deferred`](crate::deferred::Deferred) source to
    /// open before its client gets ERROR 0 (default 2 s, below the 4 s after which EDK2
    /// firmware repeats a request; must be more than zero; see
    /// [`SessionConfig::open_timeout`]).
    pub fn open_timeout(mut self, timeout: Duration) -> Self {
        self.settings.config.open_timeout = timeout;
        self
    }

    /// The request rate each client may send to the listeners, as a token bucket;
    /// `None` for no limit. Datagrams over the rate are dropped without an answer (an
    /// answer is what a reflection attack wants) and counted in
    /// [`ServerStats::rate_limited`](crate::stats::ServerStats::rate_limited). A client is an IPv4 address or an IPv6 /64.
    pub fn request_rate(mut self, rate: Option<Rate>) -> Self {
        self.settings.request_rate = rate;
        self
    }

    /// The most verified sessions (sessions whose client has ACKed data) one client may
    /// run at once; `None` for no limit. A request over the cap gets ERROR 0 and is
    /// counted in [`ServerStats::client_limited`](crate::stats::ServerStats::client_limited).
    /// Sessions without an ACK yet count under
    /// [`max_unverified_per_client`](Self::max_unverified_per_client) instead. With
    /// several workers the count is shared.
    pub fn max_sessions_per_client(mut self, max: Option<u32>) -> Self {
        self.settings.max_sessions_per_client = max;
        self
    }

    /// The most unverified sessions (no ACK from the client yet: the request may have
    /// been spoofed) one client may run at once; `None` for no limit. Default
    /// [`DEFAULT_MAX_UNVERIFIED_PER_CLIENT`] (4). A request at the cap does not get
    /// refused: the client's oldest unverified session ends (outcome `evicted`) and the
    /// new one starts, so spoofed requests from a client's address cannot lock it out.
    pub fn max_unverified_per_client(mut self, max: Option<u32>) -> Self {
        self.settings.max_unverified_per_client = max;
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
    /// port (dnsmasq's `--tftp-single-port`). The protocol is the same. Datagrams from a
    /// client to its session that make no progress (duplicate ACKs, junk) count against
    /// its request rate.
    pub fn single_port(mut self, single: bool) -> Self {
        self.settings.single_port = single;
        self
    }

    /// The ports the sessions' own sockets bind, e.g. `50000..=50999` (default: any
    /// free port the kernel picks, from its ephemeral range): for firewalls that let
    /// only these through (tftpd-hpa's `--port-range`, dnsmasq's `--tftp-port-range`).
    /// Each session takes the port after the one the previous session took (the first
    /// one at random), skipping ports in use. When every port of the range is in use,
    /// new requests wait, as when file descriptors run out, until a session ends (or a
    /// second passes); this is counted in
    /// [`ServerStats::port_pauses`](crate::stats::ServerStats::port_pauses) and logged.
    /// `max_sessions` is at most the range's size. The range must not be empty nor include
    /// port 0; it cannot be combined with
    /// [`single_port`](Self::single_port), which opens no session sockets. Several
    /// [`Workers`](super::Workers) share the range (each skips the others' ports).
    /// Ports below 1024 need the privilege to bind them after privileges are dropped.
    pub fn port_range(mut self, ports: RangeInclusive<u16>) -> Self {
        self.settings.port_range = Some((*ports.start(), *ports.end()));
        self
    }

    /// Whether the granted blksize is clamped to what fits one unfragmented datagram on
    /// the interface the request arrived on (default true): its MTU less the IP, UDP and
    /// TFTP headers (IPv4: MTU − 32, 1468 on Ethernet; IPv6: MTU − 52, 1448), never below
    /// 512. Firmware often cannot reassemble IP fragments; dnsmasq clamps the same way.
    /// Loopback's MTU (65536) allows every block size. The MTU is looked up by interface
    /// (SIOCGIFMTU) and cached for a few seconds; where the kernel does not report the
    /// interface (a socket without destination-address reporting), nothing is clamped.
    /// It applies in single-port mode too, on top of its own limits.
    pub fn mtu_blksize(mut self, clamp: bool) -> Self {
        self.settings.mtu_blksize = clamp;
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
    /// [`DEFAULT_BUSY_POLL`], 50 µs — or zero when the process's cgroup has a CPU quota of
    /// less than one CPU per loop, see below; zero turns it off). On a fast network a lock-step
    /// client's ACK comes within tens of microseconds, and not sleeping saves the
    /// wake-up, most of a lock-step block's cost on the server. The loop spins only while
    /// spinning finds datagrams: after a spin that found nothing it sleeps, and spins
    /// again only after waits shorter than the limit, a number that doubles with every
    /// fruitless spin (up to 64). An idle server does not spin; the time spent spinning
    /// is reported in [`ServerStats::busy_poll`](crate::stats::ServerStats::busy_poll).
    ///
    /// Left unset, the default depends on the CPU quota of the process's cgroup (v2
    /// `cpu.max`, v1 `cpu.cfs_quota_us`, the group's or an ancestor's, read at build): under
    /// a quota of less than one CPU per event loop (a container's CPU limit, `CPUQuota=`)
    /// the time spent spinning is taken from the transfers (with the server capped at 30 %
    /// of a CPU, most lock-step storm cases cost up to 10 % more CPU per datagram with
    /// spinning), so busy polling is off there.
    pub fn busy_poll(mut self, spin: Duration) -> Self {
        self.busy_poll = Some(spin);
        self
    }

    /// The busy-polling limit for `loops` event loops: as set, or the default for the CPU
    /// quota (see [`busy_poll`](Self::busy_poll)).
    pub(super) fn resolve_busy_poll(&mut self, loops: usize) {
        self.settings.busy_poll = self
            .busy_poll
            .unwrap_or_else(|| busy_poll_under(super::quota::cpu_quota(), loops));
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
        self.resolve_busy_poll(1);
        let std_sockets = self.bind_all(false)?;
        let max_sessions = self.resolved_max_sessions();
        let prepared = PreparedLoop::new(self.handler, std_sockets, self.settings, max_sessions)?;
        Ok(Server::start(prepared))
    }

    /// Binds the addresses and takes the inherited sockets, in that order.
    pub(super) fn bind_all(&mut self, reuse_port: bool) -> Result<Vec<StdUdpSocket>, Error> {
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

    /// `max_sessions`, or the default (see [`max_sessions`](Self::max_sessions)).
    /// With a [`port_range`](Self::port_range), never more than the range holds: each
    /// session holds one of its ports, so that a range taken by requests that are never
    /// acknowledged (spoofed ones) frees a slot the way a full server does, by giving the
    /// oldest one's slot to the next request, instead of making every request wait.
    pub(super) fn resolved_max_sessions(&self) -> usize {
        let max = self
            .max_sessions
            .unwrap_or_else(|| default_max_sessions(self.settings.window_memory));
        match self.settings.port_range {
            Some((low, high)) => max.min(usize::from(high - low) + 1),
            None => max,
        }
    }

    /// Checks the settings as [`build`](Self::build) does, without binding anything: what
    /// a configuration checker runs to refuse exactly what start-up would refuse.
    pub fn validate(&self) -> Result<(), Error> {
        for (what, limits) in [
            ("", self.settings.config.limits),
            ("single-port ", self.settings.single_port_limits),
        ] {
            if !(MIN_BLKSIZE..=MAX_BLKSIZE).contains(&limits.max_blksize) {
                return Err(Error::Config(format!(
                    "{what}max blksize must be {MIN_BLKSIZE}..={MAX_BLKSIZE}, not {}",
                    limits.max_blksize
                )));
            }
            if limits.max_window == 0 {
                return Err(Error::Config(format!(
                    "{what}max window must be at least 1"
                )));
            }
        }
        if self.settings.config.timeout.is_zero() {
            return Err(Error::Config("timeout must be more than zero".into()));
        }
        if self.settings.config.progress_timeout.is_zero() {
            return Err(Error::Config(
                "progress timeout must be more than zero".into(),
            ));
        }
        if self.settings.config.open_timeout.is_zero() {
            return Err(Error::Config("open timeout must be more than zero".into()));
        }
        if self.settings.stats_interval.is_zero() {
            return Err(Error::Config(
                "stats interval must be more than zero".into(),
            ));
        }
        if self.max_sessions == Some(0) {
            return Err(Error::Config("max sessions must be at least 1".into()));
        }
        if self.settings.max_unverified_per_client == Some(0) {
            return Err(Error::Config(
                "max unverified sessions per client must be at least 1".into(),
            ));
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
        if let Some((low, high)) = self.settings.port_range {
            if low == 0 || low > high {
                return Err(Error::Config(format!(
                    "port range must be LOW..=HIGH with 1 <= LOW <= HIGH, not {low}..={high}"
                )));
            }
            if self.settings.single_port {
                return Err(Error::Config(
                    "a port range has no effect in single-port mode, which serves every \
                     session from the listening port"
                        .into(),
                ));
            }
        }
        if self.addrs.is_empty() && self.sockets.is_empty() {
            return Err(Error::Config("no address to listen on".into()));
        }
        Ok(())
    }
}

/// The most sessions by default (see [`ServerBuilder::max_sessions`]) with a window
/// budget of `window_memory`. Raises the soft descriptor limit to the hard one.
pub(super) fn default_max_sessions(window_memory: usize) -> usize {
    let fd_limit = sys::raise_fd_limit().unwrap_or(1024);
    max_sessions_for(fd_limit, window_memory)
}

/// The default `max_sessions` under a descriptor limit of `fd_limit` and a window budget
/// of `window_memory`: each session holds a socket and usually an open file (64
/// descriptors kept spare), and [`SESSION_MEMORY`] besides its window; never more than
/// [`MAX_DEFAULT_SESSIONS`], never less than 1.
fn max_sessions_for(fd_limit: u64, window_memory: usize) -> usize {
    let by_descriptors = usize::try_from(fd_limit.saturating_sub(64) / 2).unwrap_or(usize::MAX);
    let by_memory = window_memory / SESSION_MEMORY;
    by_descriptors.min(by_memory).clamp(1, MAX_DEFAULT_SESSIONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::ReadRequest;
    use crate::handler::Reject;
    use crate::response::ResponseData;

    #[test]
    fn default_max_sessions_is_the_least_of_descriptors_memory_and_the_ceiling() {
        let budget = DEFAULT_WINDOW_MEMORY;
        // This machine's 20,000 descriptors; the shipped unit's 65,536; systemd's hard
        // default of 524,288; the usual soft 1,024.
        assert_eq!(max_sessions_for(20_000, budget), 9_968);
        assert_eq!(max_sessions_for(65_536, budget), 16_384);
        assert_eq!(max_sessions_for(524_288, budget), 16_384);
        assert_eq!(max_sessions_for(1_024, budget), 480);
        // Memory: 64 MiB of windows allow 4,096 sessions; 1 GiB would allow 65,536, but
        // the ceiling holds.
        assert_eq!(max_sessions_for(524_288, 64 << 20), 4_096);
        assert_eq!(max_sessions_for(524_288, 1 << 30), MAX_DEFAULT_SESSIONS);
        // Never zero.
        assert_eq!(max_sessions_for(10, budget), 1);
        assert_eq!(max_sessions_for(524_288, 0), 1);
    }

    struct Nothing;

    impl Handler for Nothing {
        fn open(&mut self, _: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
            Err(Reject::new(crate::packet::ErrorCode::FileNotFound, "no"))
        }
    }

    #[test]
    fn single_port_mode_caps_the_limits_and_the_normal_mode_does_not() {
        let builder = ServerBuilder::new(Nothing);
        assert_eq!(builder.settings.session_limits(), Limits::default());
        let builder = builder.single_port(true);
        assert_eq!(builder.settings.session_limits(), SINGLE_PORT_LIMITS);
        // The cap never raises a lower limit, and an operator can lift it.
        let builder = builder.max_window(4).single_port_limits(Limits::default());
        let limits = builder.settings.session_limits();
        assert_eq!((limits.max_blksize, limits.max_window), (65464, 4));
        let bad = ServerBuilder::new(Nothing)
            .bind("127.0.0.1:0".parse().unwrap())
            .single_port_limits(Limits {
                max_window: 0,
                ..SINGLE_PORT_LIMITS
            });
        assert!(matches!(bad.validate(), Err(Error::Config(_))));
    }

    #[test]
    fn port_ranges_must_hold_a_port_and_not_come_with_single_port() {
        let with = |range: RangeInclusive<u16>, single: bool| {
            ServerBuilder::new(Nothing)
                .bind("127.0.0.1:0".parse().unwrap())
                .single_port(single)
                .port_range(range)
                .validate()
        };
        assert!(with(50000..=50999, false).is_ok());
        assert!(with(1..=1, false).is_ok());
        assert!(with(1..=u16::MAX, false).is_ok());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 51000..=50000;
        for (range, single, why) in [
            (0..=10, false, "1 <= LOW"),
            (reversed, false, "LOW <= HIGH"),
            (50000..=50999, true, "single-port"),
        ] {
            match with(range.clone(), single) {
                Err(Error::Config(text)) => assert!(text.contains(why), "{range:?}: {text}"),
                other => panic!("{range:?}: {other:?}"),
            }
        }
        let settings = ServerBuilder::new(Nothing).settings;
        assert_eq!(settings.port_range(), None);
        assert!(settings.mtu_blksize);
        let settings = ServerBuilder::new(Nothing)
            .port_range(7..=9)
            .mtu_blksize(false)
            .settings;
        assert_eq!(settings.port_range(), Some(7..=9));
        assert!(!settings.mtu_blksize);
    }

    #[test]
    fn workers_share_the_window_memory() {
        let settings = ServerBuilder::new(Nothing).window_memory(1000).settings;
        assert_eq!(settings.per_worker(4).window_memory, 250);
        assert_eq!(settings.per_worker(1).window_memory, 1000);
    }

    #[test]
    fn busy_polling_is_off_by_default_under_a_quota_below_a_cpu_per_loop() {
        assert_eq!(busy_poll_under(None, 1), DEFAULT_BUSY_POLL);
        assert_eq!(busy_poll_under(Some(0.3), 1), Duration::ZERO);
        assert_eq!(busy_poll_under(Some(1.0), 1), DEFAULT_BUSY_POLL);
        assert_eq!(busy_poll_under(Some(1.5), 2), Duration::ZERO);
        assert_eq!(busy_poll_under(Some(4.0), 2), DEFAULT_BUSY_POLL);
        // Set explicitly, it stays whatever the quota.
        let mut builder = ServerBuilder::new(Nothing).busy_poll(Duration::from_micros(20));
        builder.resolve_busy_poll(1);
        assert_eq!(builder.settings.busy_poll, Duration::from_micros(20));
    }
}
