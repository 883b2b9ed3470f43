//! Load generator for TFTP servers: many concurrent read transfers from one thread over
//! loopback, every transfer verified byte for byte, plus a raw UDP mode that measures the
//! physical ceiling of the machine for the same datagram size.
//!
//! ```text
//! # a server to measure
//! cargo build --release
//! ./target/release/dyntftpd -l 127.0.0.1:6969 -r /tmp/lg-root &
//!
//! # one 32 MiB transfer, blksize 1428, windowsize 16, bytes compared with the local copy
//! cargo bench --bench loadgen -- --server 127.0.0.1:6969 --file big \
//!     --verify /tmp/lg-root/big --blksize 1428 --windowsize 16
//!
//! # 64 clients in flight fetching a 1 KiB file for 5 seconds
//! cargo bench --bench loadgen -- --server 127.0.0.1:6969 --file small \
//!     --verify /tmp/lg-root/small --concurrency 64 --duration 5
//!
//! # several files (NAME is compared with DIR/NAME), 1 % of DATA/OACK dropped, JSON out
//! cargo bench --bench loadgen -- --server 127.0.0.1:6969 --file a --file b \
//!     --verify-dir /tmp/lg-root --windowsize 16 --drop 1 --seed 7 --json
//!
//! # the ceiling: plain UDP datagrams of 1432 bytes (blksize 1428 + 4) for 5 seconds
//! cargo bench --bench loadgen -- --raw 1432 --raw-seconds 5
//! ```
//!
//! Run without any flag (as a plain `cargo bench` or `cargo test --all-targets` does) it
//! prints its usage and exits 0, so that it never breaks the other benchmarks.
//!
//! # TFTP mode
//!
//! One thread and one `mio` poll drive `--concurrency` clients. Each transfer gets its own
//! socket on a new ephemeral port, like a real client, sends an RRQ with the requested
//! options, answers an OACK with ACK 0 (or takes DATA 1 when the server ignores options),
//! and acknowledges every `windowsize` in-order blocks and the final short block (RFC 7440).
//! An out-of-order block makes the client acknowledge its last in-order block once (the
//! server resends from there). When its own timer (`--client-timeout`, default 1000 ms)
//! expires it resends the RRQ or that ACK (a *client retransmit*); five expiries without
//! progress (the RRQ or ACK sent five times) end the transfer with failure `timeout`.
//! Each payload is compared, as it arrives, with the expected bytes at the same offset,
//! so no transfer is buffered. `--drop PCT` ignores that share of received DATA and OACK
//! packets (seeded xorshift), leaving the recovery to the gap ACK and the timers of both
//! sides. When a requested window may exceed 32 KiB of payload, every client socket asks
//! for a 4 MiB receive buffer (`--rcvbuf` sets the size and applies it always), so that a
//! window of large blocks arriving at loopback speed is not dropped by the client's own
//! kernel buffer (with `SO_RCVBUFFORCE` when privileged; otherwise the kernel caps the
//! value at `net.core.rmem_max`). A client connects its socket to the server's transfer
//! ID once a transfer passes its first block.
//!
//! `--shared-socket` makes the clients cheaper, for loads of many short transfers where
//! a socket per transfer would make the load generator the bottleneck: one socket on
//! the IPv4 wildcard address carries every client, each transfer sends from its own
//! loopback address (127.1.0.1, 127.1.0.2, … chosen per datagram with `IP_PKTINFO`, so
//! the server still sees a distinct client per transfer, as from distinct machines),
//! replies are told apart by the address they were sent to, and datagrams move in
//! batches of up to 64 per `recvmmsg`/`sendmmsg`. It needs an IPv4 loopback server and
//! excludes `--bind`.
//!
//! `--bind 127.0.0.2` puts the clients on their own loopback address: on a machine
//! where other programs use loopback too, a late datagram of theirs sent to a port this
//! run has just reused (for 127.0.0.1) then cannot reach a client and pass for its
//! server's first reply.
//!
//! A run is bounded by `--count` transfers and/or `--duration` seconds, whichever comes
//! first (default count: one transfer per client). After the duration no transfer is
//! started and those in flight finish (and are verified), but the rates of such a run
//! count only the transfers completed within the duration. `--time-limit SECS` is a hard
//! bound: transfers still in flight then fail with reason `time limit`, and the verified
//! bytes they had received count in *delivered MB/s* (slow lossy runs stay bounded). The report gives transfers
//! ok/failed, sessions/s, payload MB/s (10^6 bytes), latency from the first RRQ to the
//! final block (p50, p90, p99, max), client retransmits, failures by reason, whether the
//! server acknowledged windowsize and blksize in its OACK (a server that ignores an option
//! leaves it out), and the load generator's own CPU time (getrusage) as a share of wall
//! time: when it nears 100 %, the load generator is the bottleneck, not the server.
//! `--json` prints the same as one JSON object, `--kv` as one line of `key=value` fields
//! whose values hold no spaces (what `bench/compare.sh` reads). Exit status: 0 when every
//! transfer verified, 1 when any failed, 2 for bad flags.
//!
//! # Raw mode
//!
//! `--raw SIZE` blasts datagrams of SIZE bytes from one loopback socket to another for
//! `--raw-seconds` (default 5) and reports received datagrams/s, received payload MB/s and
//! the loss ratio. It uses two threads, a sender and a receiver, each in a blocking loop:
//! that is the fairer ceiling (a server sends on one core while its client receives on
//! another), and no send is ever throttled by the receive side.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dyntftp::packet::{write_rrq, Packet, MAX_DATAGRAM};
use getopts::Options;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use testkit::{sys, Rng};

/// Timer expiries without progress before a transfer fails with `timeout`: the RRQ or
/// last ACK is sent at most this many times.
const MAX_TRIES: u32 = 5;

/// Largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65_507;

/// Receive buffer asked for on each client socket. The kernel default (about 208 KiB)
/// overflows when a server sends a window of large blocks at loopback speed (16 blocks of
/// 8 KiB take more than that in kernel accounting), and the drops would be the load
/// generator's, not the server's. The kernel caps the value at `net.core.rmem_max`.
const DEFAULT_RCVBUF: usize = 4 << 20;

fn main() -> ExitCode {
    // `cargo bench` appends `--bench` to the arguments of a harness-less bench.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let opts = options();
    if args.is_empty() {
        println!("{}", usage(&opts));
        return ExitCode::SUCCESS;
    }
    let mode = match parse_args(&opts, &args) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("loadgen: {message}");
            eprintln!("{}", opts.short_usage("loadgen"));
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => {
            println!("{}", usage(&opts));
            ExitCode::SUCCESS
        }
        Mode::Raw(raw) => match run_raw(&raw) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadgen: raw mode: {e}");
                ExitCode::FAILURE
            }
        },
        Mode::Tftp(config) => match run_tftp(config) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("loadgen: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

// ---------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------

enum Mode {
    Help,
    Tftp(Config),
    Raw(RawConfig),
}

/// How the report is printed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// Lines for people.
    Text,
    /// One JSON object.
    Json,
    /// One line of `key=value` fields, values without spaces (for shell scripts).
    Kv,
}

/// What a TFTP run does.
struct Config {
    server: SocketAddr,
    files: Vec<String>,
    expected: Vec<Expected>,
    concurrency: usize,
    count: Option<u64>,
    duration: Option<Duration>,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    tsize: bool,
    timeout: Option<u8>,
    client_timeout: Duration,
    drop_pct: f64,
    seed: u64,
    /// Receive buffer asked for on client sockets (the kernel caps it).
    rcvbuf: usize,
    /// `--rcvbuf` was given: apply it on every socket.
    rcvbuf_given: bool,
    /// Transfers still in flight this long after the start are abandoned.
    time_limit: Option<Duration>,
    /// Local address of the client sockets (default: the unspecified address).
    bind: Option<IpAddr>,
    /// `--shared-socket`: one socket for all clients, a loopback address per transfer.
    shared_socket: bool,
    output: Output,
}

impl Config {
    /// Whether client sockets get a larger receive buffer: when `--rcvbuf` was given, or
    /// when a window asked for may exceed the kernel default (a window of more than 32 KiB
    /// of payload). Otherwise the extra `setsockopt` per transfer is skipped.
    fn rcvbuf_needed(&self) -> bool {
        let blksize = self.blksize.map_or(512, usize::from);
        let window = self.windowsize.map_or(1, usize::from);
        self.rcvbuf_given || blksize.saturating_mul(window) > 32 * 1024
    }
}

/// What a transfer must deliver.
enum Expected {
    /// Exactly these bytes.
    Bytes(Arc<[u8]>),
    /// This many bytes (contents unchecked).
    Size(u64),
}

impl Expected {
    fn len(&self) -> u64 {
        match self {
            Expected::Bytes(bytes) => bytes.len() as u64,
            Expected::Size(size) => *size,
        }
    }
}

struct RawConfig {
    size: usize,
    seconds: Duration,
    output: Output,
}

/// Flags taking a value: name, value hint, help.
const VALUE_FLAGS: &[(&str, &str, &str)] = &[
    (
        "server",
        "ADDR:PORT",
        "server address (required unless --raw)",
    ),
    ("verify", "PATH", "local file with the expected bytes"),
    (
        "verify-dir",
        "DIR",
        "expected bytes of NAME are in DIR/NAME",
    ),
    ("expect-size", "N", "check only the size of every transfer"),
    ("concurrency", "N", "clients in flight at once (default 1)"),
    ("count", "N", "total transfers (default: --concurrency)"),
    (
        "duration",
        "SECS",
        "start no transfer after this many seconds",
    ),
    ("blksize", "N", "request this blksize (RFC 2348)"),
    ("windowsize", "N", "request this windowsize (RFC 7440)"),
    ("timeout", "SECS", "request this server timeout (RFC 2349)"),
    (
        "client-timeout",
        "MS",
        "client retransmit timer (default 1000)",
    ),
    ("drop", "PCT", "ignore this share of received DATA/OACK"),
    ("seed", "N", "seed of the drop generator (default 1)"),
    (
        "rcvbuf",
        "BYTES",
        "client socket receive buffer (default 4 MiB when a window may exceed 32 KiB)",
    ),
    (
        "bind",
        "ADDR",
        "client source address, e.g. 127.0.0.2 (default: any)",
    ),
    (
        "time-limit",
        "SECS",
        "abandon transfers still running after SECS",
    ),
    ("raw", "SIZE", "raw mode: blast UDP datagrams of SIZE bytes"),
    ("raw-seconds", "S", "raw mode duration (default 5)"),
];

fn options() -> Options {
    let mut o = Options::new();
    o.optmulti("", "file", "file to fetch; repeat to cycle", "NAME");
    for (name, hint, help) in VALUE_FLAGS {
        o.optopt("", name, help, hint);
    }
    o.optflag("", "tsize", "request tsize and check it (RFC 2349)");
    o.optflag(
        "",
        "shared-socket",
        "one client socket, each transfer from its own 127.x.y.z address, batched \
         sends and receives (IPv4 loopback servers only)",
    );
    o.optflag("", "json", "print one JSON object instead of text");
    o.optflag("", "kv", "print one line of key=value fields instead");
    o.optflag("h", "help", "print this help");
    o
}

fn usage(opts: &Options) -> String {
    opts.usage(
        "Usage: cargo bench --bench loadgen -- --server ADDR:PORT --file NAME \
         (--verify PATH | --verify-dir DIR | --expect-size N) [options]\n       \
         cargo bench --bench loadgen -- --raw SIZE [--raw-seconds S]\n\n\
         Drives concurrent TFTP read transfers from one thread and verifies every byte; \
         --raw measures plain UDP on loopback.",
    )
}

/// Parses flag `name`'s value, if present, and checks it with `valid`.
fn parse_opt<T: std::str::FromStr>(
    m: &getopts::Matches,
    name: &str,
    valid: impl Fn(&T) -> bool,
) -> Result<Option<T>, String> {
    let Some(text) = m.opt_str(name) else {
        return Ok(None);
    };
    match text.parse::<T>() {
        Ok(v) if valid(&v) => Ok(Some(v)),
        _ => Err(format!("invalid value for --{name}: {text:?}")),
    }
}

fn parse_args(opts: &Options, args: &[String]) -> Result<Mode, String> {
    let m = opts.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("h") {
        return Ok(Mode::Help);
    }
    if !m.free.is_empty() {
        return Err(format!("unexpected argument {:?}", m.free[0]));
    }
    let output = match (m.opt_present("json"), m.opt_present("kv")) {
        (true, true) => return Err("give only one of --json, --kv".into()),
        (true, false) => Output::Json,
        (false, true) => Output::Kv,
        (false, false) => Output::Text,
    };
    if let Some(size) = parse_opt(&m, "raw", |n: &usize| (1..=MAX_UDP_PAYLOAD).contains(n))? {
        let seconds = parse_opt(&m, "raw-seconds", |s: &f64| *s > 0.0 && *s <= 3600.0)?;
        return Ok(Mode::Raw(RawConfig {
            size,
            seconds: Duration::from_secs_f64(seconds.unwrap_or(5.0)),
            output,
        }));
    }

    let server_text = m.opt_str("server").ok_or("--server is required")?;
    let server = server_text
        .to_socket_addrs()
        .map_err(|e| format!("--server {server_text}: {e}"))?
        .next()
        .ok_or_else(|| format!("--server {server_text}: no address"))?;
    let files = m.opt_strs("file");
    if files.is_empty() {
        return Err("at least one --file is required".into());
    }
    if files.iter().any(|f| f.is_empty() || f.contains('\0')) {
        return Err("--file names must be non-empty and contain no NUL".into());
    }

    let expected = match (
        m.opt_str("verify"),
        m.opt_str("verify-dir"),
        parse_opt(&m, "expect-size", |_: &u64| true)?,
    ) {
        (Some(path), None, None) => {
            if files.len() > 1 {
                return Err("--verify takes one --file; use --verify-dir for several".into());
            }
            vec![Expected::Bytes(read_expected(PathBuf::from(path))?)]
        }
        (None, Some(dir), None) => files
            .iter()
            .map(|f| read_expected(PathBuf::from(&dir).join(f)).map(Expected::Bytes))
            .collect::<Result<_, _>>()?,
        (None, None, Some(size)) => files.iter().map(|_| Expected::Size(size)).collect(),
        (None, None, None) => {
            return Err(
                "every transfer is verified: give --verify, --verify-dir or \
                        --expect-size"
                    .into(),
            )
        }
        _ => return Err("give only one of --verify, --verify-dir, --expect-size".into()),
    };

    let concurrency =
        parse_opt(&m, "concurrency", |n: &usize| (1..=1_000_000).contains(n))?.unwrap_or(1);
    let count = parse_opt(&m, "count", |n: &u64| *n >= 1)?;
    let duration = parse_opt(&m, "duration", |s: &f64| *s > 0.0 && *s <= 86_400.0)?
        .map(Duration::from_secs_f64);
    let rcvbuf = parse_opt(&m, "rcvbuf", |n: &usize| (1..=1 << 30).contains(n))?;
    let count = match (count, duration) {
        (None, None) => Some(concurrency as u64),
        (count, _) => count,
    };
    let bind = parse_opt(&m, "bind", |_: &IpAddr| true)?;
    let shared_socket = m.opt_present("shared-socket");
    if shared_socket {
        if bind.is_some() {
            return Err("--shared-socket picks the client addresses: drop --bind".into());
        }
        if !matches!(server.ip(), IpAddr::V4(ip) if ip.is_loopback()) {
            return Err(format!(
                "--shared-socket needs an IPv4 loopback server, not {server}"
            ));
        }
    }
    Ok(Mode::Tftp(Config {
        server,
        files,
        expected,
        concurrency,
        count,
        duration,
        blksize: parse_opt(&m, "blksize", |n: &u16| (8..=65_464).contains(n))?,
        windowsize: parse_opt(&m, "windowsize", |n: &u16| *n >= 1)?,
        tsize: m.opt_present("tsize"),
        timeout: parse_opt(&m, "timeout", |n: &u8| *n >= 1)?,
        client_timeout: Duration::from_millis(
            parse_opt(&m, "client-timeout", |n: &u64| (1..=3_600_000).contains(n))?.unwrap_or(1000),
        ),
        drop_pct: parse_opt(&m, "drop", |p: &f64| (0.0..=100.0).contains(p))?.unwrap_or(0.0),
        seed: parse_opt(&m, "seed", |_: &u64| true)?.unwrap_or(1),
        rcvbuf: rcvbuf.unwrap_or(DEFAULT_RCVBUF),
        rcvbuf_given: rcvbuf.is_some(),
        time_limit: parse_opt(&m, "time-limit", |s: &f64| *s > 0.0 && *s <= 86_400.0)?
            .map(Duration::from_secs_f64),
        bind,
        shared_socket,
        output,
    }))
}

fn read_expected(path: PathBuf) -> Result<Arc<[u8]>, String> {
    std::fs::read(&path)
        .map(Arc::from)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// TFTP mode
// ---------------------------------------------------------------------------------------

/// How a client slot's current transfer reaches the network.
enum Link {
    /// No transfer in flight.
    Idle,
    /// The transfer's own socket (the default).
    Own(UdpSocket),
    /// `--shared-socket`: the loopback address the transfer uses on the shared socket.
    Shared(Ipv4Addr),
}

/// One client slot. A slot runs one transfer at a time, each on a fresh socket (or a
/// fresh loopback address of the shared socket).
struct Client {
    link: Link,
    /// Unique number of the current transfer; stale timer entries carry an older one.
    transfer: u64,
    /// Index into `Config::files`.
    file: usize,
    /// The server's transfer ID, locked by the first accepted packet.
    peer: Option<SocketAddr>,
    /// The socket is connected to `peer`.
    connected: bool,
    /// Whether any OACK or DATA was accepted (else a timeout resends the RRQ).
    responded: bool,
    oack_seen: bool,
    blksize: usize,
    window: u64,
    /// Next expected block, unwrapped (the wire carries it modulo 65536).
    next: u64,
    /// Bytes received and verified so far.
    offset: u64,
    /// In-order blocks since the last ACK.
    since_ack: u64,
    /// An out-of-order block was answered since the last in-order block.
    gap_acked: bool,
    started: Instant,
    deadline: Instant,
    /// Timer periods without progress, counting the current one.
    tries: u32,
}

impl Client {
    fn idle(now: Instant) -> Client {
        Client {
            link: Link::Idle,
            transfer: 0,
            file: 0,
            peer: None,
            connected: false,
            responded: false,
            oack_seen: false,
            blksize: 512,
            window: 1,
            next: 1,
            offset: 0,
            since_ack: 0,
            gap_acked: false,
            started: now,
            deadline: now,
            tries: 0,
        }
    }

    /// Locks the server's transfer ID. Datagrams from anyone else are then counted as
    /// foreign and ignored.
    fn lock_peer(&mut self, peer: SocketAddr) {
        self.peer = Some(peer);
    }

    /// Connects the socket to the locked peer, as real clients do: the kernel then drops
    /// datagrams from anyone else, and sends skip the route lookup. Done once the transfer
    /// is longer than one block, so that a one-block transfer (the small-file load) does
    /// not pay a `connect` it would not use.
    fn connect_peer(&mut self) {
        if let (Link::Own(socket), Some(peer), false) = (&self.link, self.peer, self.connected) {
            self.connected = socket.connect(peer).is_ok();
        }
    }

    /// Sends `datagram` to the server's TID (or its request port before the first reply),
    /// or queues it in `out` for the shared socket's next batch. A full socket buffer
    /// loses the datagram, as the network would; the timers recover.
    fn send(&self, datagram: &[u8], server: SocketAddr, out: &mut Outbox) -> Result<(), String> {
        let socket = match &self.link {
            Link::Idle => return Ok(()),
            Link::Own(socket) => socket,
            Link::Shared(from) => {
                out.queue(datagram, *from, self.peer.unwrap_or(server));
                return Ok(());
            }
        };
        let sent = if self.connected {
            socket.send(datagram)
        } else {
            socket.send_to(datagram, self.peer.unwrap_or(server))
        };
        match sent {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("send: {e}")),
        }
    }
}

/// Counters of a TFTP run.
#[derive(Default)]
struct Stats {
    ok: u64,
    failed: u64,
    payload_bytes: u64,
    /// Transfers (and their bytes) completed within `--duration`: the rates of a run
    /// that stopped on its duration are measured over that window, without the tail of
    /// transfers that were still in flight.
    ok_in_window: u64,
    bytes_in_window: u64,
    latencies_us: Vec<u64>,
    retransmits: u64,
    gap_acks: u64,
    dropped: u64,
    foreign: u64,
    /// Datagrams of shared-socket clients the kernel refused to send (no buffer space).
    send_drops: u64,
    failures: BTreeMap<String, u64>,
    ws_acked: u64,
    ws_not_acked: u64,
    bs_acked: u64,
    bs_not_acked: u64,
    /// Verified payload bytes of transfers that failed (or were cut by `--time-limit`).
    partial_bytes: u64,
    negotiated_blksize: Option<usize>,
    negotiated_windowsize: Option<u64>,
}

/// What a datagram or timeout did to a transfer.
enum Step {
    Continue,
    Done(Result<(), String>),
}

struct Loadgen {
    config: Config,
    /// The RRQ of each file, built once.
    rrqs: Vec<Vec<u8>>,
    poll: Poll,
    clients: Vec<Client>,
    /// Deadlines as (when, slot, transfer). Lazy: a transfer has at most one entry, which
    /// may be earlier than its deadline (then it is re-pushed) but never later.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    stats: Stats,
    rng: Rng,
    /// Datagrams on their way out (queued for the shared socket's next batch).
    out: Outbox,
    /// `--shared-socket`: the one socket of every client.
    shared: Option<SharedSocket>,
    /// Receive buffer of the per-transfer sockets.
    buf: Vec<u8>,
    started: u64,
    in_flight: usize,
    next_transfer: u64,
    start_time: Instant,
    end_time: Option<Instant>,
    /// When `--time-limit` abandons the transfers still in flight.
    limit_time: Option<Instant>,
    last_done: Instant,
}

fn run_tftp(config: Config) -> io::Result<bool> {
    // One socket per client; sockets that cannot be opened count as failures.
    sys::raise_fd_limit((config.concurrency as u64).saturating_add(64));
    let options = requested_options(&config);
    let rrqs = config
        .files
        .iter()
        .map(|f| {
            let mut rrq = Vec::new();
            write_rrq(
                &mut rrq,
                f.as_bytes(),
                "octet",
                options.iter().map(|(n, v)| (*n, v.as_str())),
            );
            rrq
        })
        .collect();
    let cpu_before = cpu_times();
    let now = Instant::now();
    let poll = Poll::new()?;
    let shared = if config.shared_socket {
        Some(SharedSocket::open(&poll, config.rcvbuf.max(SHARED_RCVBUF))?)
    } else {
        None
    };
    let mut lg = Loadgen {
        rrqs,
        poll,
        clients: (0..config.concurrency).map(|_| Client::idle(now)).collect(),
        timers: BinaryHeap::new(),
        stats: Stats::default(),
        rng: Rng::new(config.seed),
        out: Outbox::default(),
        shared,
        buf: vec![0; MAX_DATAGRAM],
        started: 0,
        in_flight: 0,
        next_transfer: 1,
        start_time: now,
        end_time: config.duration.map(|d| now + d),
        limit_time: config.time_limit.map(|d| now + d),
        last_done: now,
        config,
    };
    lg.run()?;
    let wall = lg.last_done - lg.start_time;
    let cpu = cpu_times() - cpu_before;
    let pass = lg.stats.failed == 0 && lg.stats.ok > 0;
    let report = lg.report(wall, cpu, pass);
    print!("{report}");
    Ok(pass)
}

/// The options every RRQ carries, in wire order.
fn requested_options(config: &Config) -> Vec<(&'static str, String)> {
    let mut options = Vec::new();
    if let Some(b) = config.blksize {
        options.push(("blksize", b.to_string()));
    }
    if let Some(w) = config.windowsize {
        options.push(("windowsize", w.to_string()));
    }
    if config.tsize {
        options.push(("tsize", "0".to_string()));
    }
    if let Some(t) = config.timeout {
        options.push(("timeout", t.to_string()));
    }
    options
}

impl Loadgen {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        for id in 0..self.clients.len() {
            self.refill(id, Instant::now());
        }
        self.flush()?;
        while self.in_flight > 0 {
            let now = Instant::now();
            if self.limit_time.is_some_and(|limit| now >= limit) {
                self.abandon_all(now);
                break;
            }
            let next = match (self.timers.peek(), self.limit_time) {
                (Some(Reverse((when, _, _))), Some(limit)) => Some((*when).min(limit)),
                (Some(Reverse((when, _, _))), None) => Some(*when),
                (None, limit) => limit,
            };
            let timeout = next.map(|when| when.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    SHARED_TOKEN => self.on_shared_readable()?,
                    Token(id) => self.on_readable(id),
                }
            }
            self.fire_timers(Instant::now());
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what the shared socket's clients queued (nothing to do without one).
    fn flush(&mut self) -> io::Result<()> {
        match &self.shared {
            Some(shared) => {
                self.stats.send_drops += self.out.send_all(&shared.socket)?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Whether another transfer may start.
    fn may_start(&self, now: Instant) -> bool {
        self.config.count.is_none_or(|c| self.started < c)
            && self.end_time.is_none_or(|end| now < end)
            && self.limit_time.is_none_or(|limit| now < limit)
    }

    /// Ends every transfer in flight with failure `time limit` (`--time-limit`).
    fn abandon_all(&mut self, now: Instant) {
        for id in 0..self.clients.len() {
            self.finish(id, Err("time limit".into()), now);
        }
    }

    /// Starts the next transfer in slot `id` if the bounds allow. A transfer that cannot
    /// even start (no socket) counts as failed, and the next one is tried.
    fn refill(&mut self, id: usize, now: Instant) {
        while self.may_start(now) {
            self.started += 1;
            match self.start(id, now) {
                Ok(()) => return,
                Err(reason) => self.record(Err(reason), now, 0, now),
            }
        }
    }

    fn start(&mut self, id: usize, now: Instant) -> Result<(), String> {
        let server = self.config.server;
        let link = match &mut self.shared {
            Some(shared) => Link::Shared(shared.claim(id)),
            None => {
                let unspecified = match server.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let local = self.config.bind.unwrap_or(unspecified);
                let mut socket =
                    UdpSocket::bind(SocketAddr::new(local, 0)).map_err(|e| format!("bind: {e}"))?;
                if self.config.rcvbuf_needed() {
                    set_rcvbuf(&socket, self.config.rcvbuf);
                }
                self.poll
                    .registry()
                    .register(&mut socket, Token(id), Interest::READABLE)
                    .map_err(|e| format!("register: {e}"))?;
                Link::Own(socket)
            }
        };
        let file = (self.started - 1) as usize % self.config.files.len();
        let transfer = self.next_transfer;
        self.next_transfer += 1;
        let client = &mut self.clients[id];
        *client = Client::idle(now);
        client.link = link;
        client.transfer = transfer;
        client.file = file;
        client.tries = 1;
        client.deadline = now + self.config.client_timeout;
        if let Err(e) = client.send(&self.rrqs[file], server, &mut self.out) {
            client.link = Link::Idle;
            return Err(e);
        }
        self.timers.push(Reverse((client.deadline, id, transfer)));
        self.in_flight += 1;
        Ok(())
    }

    /// Drains slot `id`'s socket. Spurious events are harmless.
    fn on_readable(&mut self, id: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Link::Own(socket) = &self.clients[id].link {
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error queued on the socket (e.g. the server's port closed).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    self.finish(id, Err(format!("recv: {e}")), Instant::now());
                    break;
                }
            };
            let now = Instant::now();
            if let Step::Done(result) = self.on_datagram(id, &buf[..len], from, now) {
                self.finish(id, result, now);
                break;
            }
        }
        self.buf = buf;
    }

    /// Drains the shared socket a batch at a time, each datagram to the client whose
    /// address it was sent to, and sends the batch's answers before reading the next.
    fn on_shared_readable(&mut self) -> io::Result<()> {
        let mut batch = match &mut self.shared {
            Some(shared) => std::mem::take(&mut shared.batch),
            None => return Ok(()),
        };
        let result = loop {
            let Some(shared) = &self.shared else {
                break Ok(());
            };
            let received = batch.recv(&shared.socket);
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            let now = Instant::now();
            for i in 0..n {
                let (data, from, to) = batch.datagram(i);
                let by_addr = self.shared.as_ref().map(|shared| &shared.by_addr);
                let Some(id) = to.and_then(|to| by_addr?.get(&to).copied()) else {
                    // For a transfer that has ended (or for nobody).
                    self.stats.foreign += 1;
                    continue;
                };
                if let Step::Done(result) = self.on_datagram(id, data, from, now) {
                    self.finish(id, result, now);
                }
            }
            if let Err(e) = self.flush() {
                break Err(e);
            }
        };
        if let Some(shared) = &mut self.shared {
            shared.batch = batch;
        }
        result
    }

    fn on_datagram(&mut self, id: usize, data: &[u8], from: SocketAddr, now: Instant) -> Step {
        let server = self.config.server;
        let c = &mut self.clients[id];
        if c.peer.is_some_and(|peer| peer != from) {
            self.stats.foreign += 1;
            return Step::Continue;
        }
        let packet = match Packet::parse(data) {
            Ok(packet) => packet,
            Err(e) => return Step::Done(Err(format!("malformed packet: {e}"))),
        };
        let is_payload = matches!(packet, Packet::Data { .. } | Packet::Oack(_));
        if is_payload
            && self.config.drop_pct > 0.0
            && self.rng.unit() * 100.0 < self.config.drop_pct
        {
            self.stats.dropped += 1;
            return Step::Continue;
        }
        let expected = &self.config.expected[c.file];
        match packet {
            Packet::Error { code, message } => Step::Done(Err(format!(
                "error {}: {}",
                code.to_u16(),
                String::from_utf8_lossy(message)
            ))),
            Packet::Oack(options) => {
                if c.next > 1 {
                    return Step::Continue; // a late duplicate; the transfer has moved on
                }
                if !c.oack_seen {
                    if let Err(e) = check_oack(&self.config, expected, options, c) {
                        return Step::Done(Err(e));
                    }
                    c.oack_seen = true;
                    c.responded = true;
                    c.lock_peer(from);
                    if self.config.windowsize.is_some() {
                        if options.iter().any(|o| o.is("windowsize")) {
                            self.stats.ws_acked += 1;
                        } else {
                            self.stats.ws_not_acked += 1;
                        }
                    }
                    if self.config.blksize.is_some() {
                        if options.iter().any(|o| o.is("blksize")) {
                            self.stats.bs_acked += 1;
                        } else {
                            self.stats.bs_not_acked += 1;
                        }
                    }
                    self.stats.negotiated_blksize = Some(c.blksize);
                    self.stats.negotiated_windowsize = Some(c.window);
                } else {
                    // The server resent its OACK: our ACK 0 was lost or is late.
                    self.stats.retransmits += 1;
                }
                c.tries = 1;
                c.deadline = now + self.config.client_timeout;
                send_ack(c, &mut self.out, 0, server)
            }
            Packet::Data { block, data } => {
                if !c.responded {
                    // DATA 1 without an OACK: the server ignored every option.
                    c.responded = true;
                    c.lock_peer(from);
                    if self.config.windowsize.is_some() {
                        self.stats.ws_not_acked += 1;
                    }
                    if self.config.blksize.is_some() {
                        self.stats.bs_not_acked += 1;
                    }
                    self.stats.negotiated_blksize = Some(512);
                    self.stats.negotiated_windowsize = Some(1);
                }
                if block != c.next as u16 {
                    // A gap or an old duplicate: ask once for a resend from the last
                    // in-order block, then wait for it.
                    if c.gap_acked {
                        return Step::Continue;
                    }
                    c.gap_acked = true;
                    c.since_ack = 0;
                    self.stats.gap_acks += 1;
                    return send_ack(c, &mut self.out, (c.next - 1) as u16, server);
                }
                if data.len() > c.blksize {
                    return Step::Done(Err("oversize block".into()));
                }
                let end = c.offset + data.len() as u64;
                let matches = match expected {
                    Expected::Bytes(bytes) => {
                        bytes.get(c.offset as usize..end as usize) == Some(data)
                    }
                    Expected::Size(size) => end <= *size,
                };
                if !matches {
                    return Step::Done(Err(if end > expected.len() {
                        "size mismatch".into()
                    } else {
                        "data mismatch".into()
                    }));
                }
                c.offset = end;
                c.next += 1;
                if c.next == 3 {
                    c.connect_peer();
                }
                c.since_ack += 1;
                c.gap_acked = false;
                c.tries = 1;
                c.deadline = now + self.config.client_timeout;
                if data.len() < c.blksize {
                    if let Step::Done(Err(e)) = send_ack(c, &mut self.out, block, server) {
                        return Step::Done(Err(e));
                    }
                    if c.offset != expected.len() {
                        return Step::Done(Err("size mismatch".into()));
                    }
                    return Step::Done(Ok(()));
                }
                if c.since_ack >= c.window {
                    c.since_ack = 0;
                    return send_ack(c, &mut self.out, block, server);
                }
                Step::Continue
            }
            Packet::Ack { .. } | Packet::Rrq(_) | Packet::Wrq(_) => {
                Step::Done(Err("unexpected packet".into()))
            }
        }
    }

    /// Pops expired timers. A stale entry (older transfer, or a deadline that moved later)
    /// is dropped or re-pushed at the current deadline.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((when, id, transfer))) = self.timers.peek() {
            if when > now {
                return;
            }
            self.timers.pop();
            let c = &mut self.clients[id];
            if matches!(c.link, Link::Idle) || c.transfer != transfer {
                continue;
            }
            if c.deadline > now {
                self.timers.push(Reverse((c.deadline, id, transfer)));
                continue;
            }
            if c.tries >= MAX_TRIES {
                self.finish(id, Err("timeout".into()), now);
                continue;
            }
            c.tries += 1;
            c.since_ack = 0;
            c.gap_acked = false;
            c.deadline = now + self.config.client_timeout;
            self.stats.retransmits += 1;
            let sent = if c.responded {
                let block = (c.next - 1) as u16;
                send_ack(c, &mut self.out, block, self.config.server)
            } else {
                match c.send(&self.rrqs[c.file], self.config.server, &mut self.out) {
                    Ok(()) => Step::Continue,
                    Err(e) => Step::Done(Err(e)),
                }
            };
            if let Step::Done(result) = sent {
                self.finish(id, result, now);
                continue;
            }
            self.timers.push(Reverse((c.deadline, id, transfer)));
        }
    }

    /// Ends slot `id`'s transfer, closes its socket and starts the next one.
    fn finish(&mut self, id: usize, result: Result<(), String>, now: Instant) {
        let c = &mut self.clients[id];
        // Closing the socket removes it from the epoll set: no deregister syscall needed
        // (a stale event for the slot only finds the next socket empty).
        match std::mem::replace(&mut c.link, Link::Idle) {
            Link::Idle => return,
            Link::Own(_) => {}
            Link::Shared(addr) => {
                if let Some(shared) = &mut self.shared {
                    shared.by_addr.remove(&addr);
                }
            }
        }
        self.in_flight -= 1;
        let (started, bytes) = (c.started, c.offset);
        self.record(result, started, bytes, now);
        self.refill(id, now);
    }

    /// Counts a finished transfer that moved `bytes` of payload.
    fn record(&mut self, result: Result<(), String>, started: Instant, bytes: u64, now: Instant) {
        match result {
            Ok(()) => {
                self.stats.ok += 1;
                self.stats.payload_bytes += bytes;
                if self.end_time.is_none_or(|end| now <= end) {
                    self.stats.ok_in_window += 1;
                    self.stats.bytes_in_window += bytes;
                }
                let us = (now - started).as_micros();
                self.stats
                    .latencies_us
                    .push(us.try_into().unwrap_or(u64::MAX));
            }
            Err(reason) => {
                self.stats.failed += 1;
                self.stats.partial_bytes += bytes;
                *self.stats.failures.entry(reason).or_default() += 1;
            }
        }
        self.last_done = now;
    }

    fn report(&mut self, wall: Duration, cpu: Cpu, pass: bool) -> String {
        let s = &mut self.stats;
        let c = &self.config;
        s.latencies_us.sort_unstable();
        let pct = |p: f64| percentile_ms(&s.latencies_us, p);
        let secs = wall.as_secs_f64().max(1e-9);
        let (rate_secs, rate_ok, rate_bytes) = match c.duration {
            Some(d) if wall > d => (d.as_secs_f64(), s.ok_in_window, s.bytes_in_window),
            _ => (secs, s.ok, s.payload_bytes),
        };
        let sessions_per_s = rate_ok as f64 / rate_secs;
        let mb_per_s = rate_bytes as f64 / rate_secs / 1e6;
        let cpu_pct = cpu.total() / secs * 100.0;
        // Everything verified, including the part of failed transfers, over the whole run.
        let delivered_mb_per_s = (s.payload_bytes + s.partial_bytes) as f64 / secs / 1e6;
        let ws_acked = Acked::new(c.windowsize.is_some(), s.ws_acked, s.ws_not_acked);
        let bs_acked = Acked::new(c.blksize.is_some(), s.bs_acked, s.bs_not_acked);
        let verification = match c.expected.first() {
            Some(Expected::Size(_)) => "size",
            _ => "bytes",
        };
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let sockets = if c.shared_socket { "shared" } else { "own" };
        let mut out = String::new();
        if c.output == Output::Kv {
            // Failure reasons become `reason:count` pairs, spaces and commas replaced.
            let failures: Vec<String> = s
                .failures
                .iter()
                .map(|(reason, n)| format!("{}:{n}", kv_token(reason)))
                .collect();
            let num = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "mode=tftp ok={} failed={} elapsed_s={:.6} sessions_per_s={:.3} \
                 payload_mb_per_s={:.3} delivered_mb_per_s={delivered_mb_per_s:.3} \
                 p50_ms={} p90_ms={} p99_ms={} max_ms={} client_retransmits={} gap_acks={} \
                 dropped={} send_drops={} partial_bytes={} windowsize_acknowledged={} \
                 blksize_acknowledged={} negotiated_blksize={} negotiated_windowsize={} \
                 cpu_s={:.3} cpu_pct={cpu_pct:.1} client_sockets={} failures={} pass={pass}",
                s.ok,
                s.failed,
                wall.as_secs_f64(),
                sessions_per_s,
                mb_per_s,
                num(pct(50.0).map(fixed3)),
                num(pct(90.0).map(fixed3)),
                num(pct(99.0).map(fixed3)),
                num(pct(100.0).map(fixed3)),
                s.retransmits,
                s.gap_acks,
                s.dropped,
                s.send_drops,
                s.partial_bytes,
                ws_acked.token(),
                bs_acked.token(),
                num(s.negotiated_blksize.map(|n| n.to_string())),
                num(s.negotiated_windowsize.map(|n| n.to_string())),
                cpu.total(),
                sockets,
                if failures.is_empty() {
                    "-".to_string()
                } else {
                    failures.join(",")
                },
            );
            return out;
        }
        if c.output == Output::Json {
            let mut failures = Json::object();
            for (reason, n) in &s.failures {
                failures = failures.raw(reason, n);
            }
            let files: Vec<String> = c.files.iter().map(|f| json_str(f)).collect();
            let latency = Json::object()
                .opt("p50", pct(50.0).map(fixed3))
                .opt("p90", pct(90.0).map(fixed3))
                .opt("p99", pct(99.0).map(fixed3))
                .opt("max", pct(100.0).map(fixed3));
            let json = Json::object()
                .str("mode", "tftp")
                .str("server", &c.server.to_string())
                .raw("files", format!("[{}]", files.join(",")))
                .str("verification", verification)
                .raw("concurrency", c.concurrency)
                .opt("count", c.count)
                .opt("duration_s", c.duration.map(|d| fixed3(d.as_secs_f64())))
                .opt("blksize", c.blksize)
                .opt("windowsize", c.windowsize)
                .raw("tsize", c.tsize)
                .opt("timeout", c.timeout)
                .raw("client_timeout_ms", c.client_timeout.as_millis())
                .raw("drop_pct", c.drop_pct)
                .raw("seed", c.seed)
                .raw("rcvbuf", c.rcvbuf)
                .str("client_sockets", sockets)
                .opt(
                    "time_limit_s",
                    c.time_limit.map(|d| fixed3(d.as_secs_f64())),
                )
                .raw("transfers_ok", s.ok)
                .raw("transfers_failed", s.failed)
                .raw("elapsed_s", format!("{:.6}", wall.as_secs_f64()))
                .raw("rate_window_s", format!("{rate_secs:.6}"))
                .raw("sessions_per_s", fixed3(sessions_per_s))
                .raw("payload_bytes", s.payload_bytes)
                .raw("payload_mb_per_s", fixed3(mb_per_s))
                .raw("delivered_mb_per_s", fixed3(delivered_mb_per_s))
                .raw("partial_bytes", s.partial_bytes)
                .raw("latency_ms", latency.end())
                .raw("client_retransmits", s.retransmits)
                .raw("gap_acks", s.gap_acks)
                .raw("dropped_packets", s.dropped)
                .raw("foreign_packets", s.foreign)
                .raw("send_drops", s.send_drops)
                .raw("failures", failures.end())
                .str("windowsize_acknowledged", &ws_acked.text())
                .str("blksize_acknowledged", &bs_acked.text())
                .opt("negotiated_blksize", s.negotiated_blksize)
                .opt("negotiated_windowsize", s.negotiated_windowsize)
                .cpu(cpu, cpu_pct)
                .raw("pass", pass);
            return json.end() + "\n";
        }
        let _ = writeln!(
            out,
            "config: server {} files {} verify {verification} concurrency {} count {} \
             duration {} blksize {} windowsize {} tsize {} timeout {} client-timeout {} ms \
             drop {}% seed {} rcvbuf {} time-limit {} client sockets {sockets}",
            c.server,
            c.files.join(","),
            c.concurrency,
            opt(c.count.map(|n| n.to_string())),
            opt(c.duration.map(|d| format!("{}s", d.as_secs_f64()))),
            opt(c.blksize.map(|n| n.to_string())),
            opt(c.windowsize.map(|n| n.to_string())),
            if c.tsize { "yes" } else { "no" },
            opt(c.timeout.map(|n| format!("{n}s"))),
            c.client_timeout.as_millis(),
            c.drop_pct,
            c.seed,
            c.rcvbuf,
            opt(c.time_limit.map(|d| format!("{}s", d.as_secs_f64()))),
        );
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(out, "transfers ok/failed: {}/{}", s.ok, s.failed);
        let _ = write!(out, "elapsed: {:.4} s", wall.as_secs_f64());
        if rate_secs < secs {
            let _ = write!(
                out,
                " (rates: transfers done within the {rate_secs} s duration)"
            );
        }
        out.push('\n');
        let _ = writeln!(out, "sessions/s: {sessions_per_s:.1}");
        let _ = writeln!(out, "payload MB/s: {mb_per_s:.2}");
        if s.partial_bytes > 0 {
            let _ = writeln!(
                out,
                "delivered MB/s (with the verified part of failed transfers): \
                 {delivered_mb_per_s:.2}"
            );
        }
        let _ = writeln!(
            out,
            "latency ms p50/p90/p99/max: {}/{}/{}/{}",
            ms(pct(50.0)),
            ms(pct(90.0)),
            ms(pct(99.0)),
            ms(pct(100.0))
        );
        let _ = writeln!(
            out,
            "client retransmits: {} (gap acks {}, dropped packets {}, foreign packets {}, \
             send drops {})",
            s.retransmits, s.gap_acks, s.dropped, s.foreign, s.send_drops
        );
        if s.failures.is_empty() {
            let _ = writeln!(out, "failures: none");
        } else {
            let _ = writeln!(out, "failures:");
            for (reason, n) in &s.failures {
                let _ = writeln!(out, "  {n:>8}  {reason}");
            }
        }
        let _ = writeln!(out, "windowsize acknowledged: {}", ws_acked.text());
        let _ = writeln!(out, "blksize acknowledged: {}", bs_acked.text());
        let _ = writeln!(
            out,
            "negotiated: blksize {} windowsize {}",
            opt(s.negotiated_blksize.map(|n| n.to_string())),
            opt(s.negotiated_windowsize.map(|n| n.to_string()))
        );
        let _ = writeln!(
            out,
            "loadgen cpu: {:.3} s (user {:.3} s, sys {:.3} s) = {cpu_pct:.1}% of wall",
            cpu.total(),
            cpu.user,
            cpu.sys
        );
        let _ = writeln!(out, "result: {}", if pass { "PASS" } else { "FAIL" });
        out
    }
}

/// Whether the server acknowledged a requested option in its OACK, over all transfers.
enum Acked {
    NotRequested,
    /// No transfer got an OACK or DATA 1.
    Unknown,
    Yes,
    No,
    Partial {
        yes: u64,
        no: u64,
    },
}

impl Acked {
    fn new(requested: bool, yes: u64, no: u64) -> Acked {
        match (requested, yes, no) {
            (false, _, _) => Acked::NotRequested,
            (true, 0, 0) => Acked::Unknown,
            (true, _, 0) => Acked::Yes,
            (true, 0, _) => Acked::No,
            (true, yes, no) => Acked::Partial { yes, no },
        }
    }

    fn text(&self) -> String {
        match self {
            Acked::NotRequested => "not requested".into(),
            Acked::Unknown => "unknown (no reply)".into(),
            Acked::Yes => "yes".into(),
            Acked::No => "no".into(),
            Acked::Partial { yes, no } => format!("partial ({yes} of {})", yes + no),
        }
    }

    /// The same as one word, for `--kv`.
    fn token(&self) -> &'static str {
        match self {
            Acked::NotRequested => "not-requested",
            Acked::Unknown => "unknown",
            Acked::Yes => "yes",
            Acked::No => "no",
            Acked::Partial { .. } => "partial",
        }
    }
}

/// `text` as one `--kv` value: whitespace, `=`, `,` and `:` become `_`.
fn kv_token(text: &str) -> String {
    text.chars()
        .map(|ch| {
            if ch.is_whitespace() || ch.is_control() || matches!(ch, '=' | ',' | ':') {
                '_'
            } else {
                ch
            }
        })
        .collect()
}

/// Asks for a receive buffer of `bytes` on `socket`: past `net.core.rmem_max` when
/// privileged (`SO_RCVBUFFORCE`), else capped at it. Best effort: a refusal leaves the
/// default.
fn set_rcvbuf(socket: &UdpSocket, bytes: usize) {
    if set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
        let _ = set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
    }
}

/// Sets an integer socket option (values beyond `c_int` are capped).
fn set_int_option(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is open for the duration of the call, and `value` is a valid
    // `c_int` whose size is passed as the option length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks an OACK against what was requested and applies it to `c`.
fn check_oack(
    config: &Config,
    expected: &Expected,
    options: dyntftp::packet::Options<'_>,
    c: &mut Client,
) -> Result<(), String> {
    let number = |value: &[u8]| -> Option<u64> { std::str::from_utf8(value).ok()?.parse().ok() };
    for o in options.iter() {
        let value = number(o.value);
        let name = String::from_utf8_lossy(o.name).to_ascii_lowercase();
        match (name.as_str(), value) {
            ("blksize", Some(v)) if config.blksize.is_some_and(|b| (8..=b as u64).contains(&v)) => {
                c.blksize = v as usize;
            }
            ("windowsize", Some(v))
                if config
                    .windowsize
                    .is_some_and(|w| (1..=w as u64).contains(&v)) =>
            {
                c.window = v;
            }
            ("tsize", Some(v)) if config.tsize => {
                if v != expected.len() {
                    return Err("tsize mismatch".into());
                }
            }
            ("timeout", Some(v)) if config.timeout.is_some_and(|t| t as u64 == v) => {}
            _ => {
                return Err(format!(
                    "bad oack: {name}={}",
                    String::from_utf8_lossy(o.value)
                ))
            }
        }
    }
    Ok(())
}

fn send_ack(c: &Client, out: &mut Outbox, block: u16, server: SocketAddr) -> Step {
    // Opcode 4 (ACK) and the block number: no buffer to borrow beside `out`.
    let [hi, lo] = block.to_be_bytes();
    match c.send(&[0, 4, hi, lo], server, out) {
        Ok(()) => Step::Continue,
        Err(e) => Step::Done(Err(e)),
    }
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    Some(sorted_us[index] as f64 / 1000.0)
}

/// A JSON object written by hand: fields in order, values already encoded.
struct Json(String);

impl Json {
    fn object() -> Json {
        Json(String::from("{"))
    }

    /// Adds a field whose value is already valid JSON (a number, `true`, an object…).
    fn raw(mut self, name: &str, value: impl std::fmt::Display) -> Json {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "{}:{value}", json_str(name));
        self
    }

    fn str(self, name: &str, value: &str) -> Json {
        self.raw(name, json_str(value))
    }

    /// Adds a field that is `null` when absent.
    fn opt(self, name: &str, value: Option<impl std::fmt::Display>) -> Json {
        match value {
            Some(v) => self.raw(name, v),
            None => self.raw(name, "null"),
        }
    }

    fn cpu(self, cpu: Cpu, pct: f64) -> Json {
        self.raw("cpu_user_s", fixed3(cpu.user))
            .raw("cpu_sys_s", fixed3(cpu.sys))
            .raw("cpu_s", fixed3(cpu.total()))
            .raw("cpu_pct", format!("{pct:.1}"))
    }

    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn fixed3(v: f64) -> String {
    format!("{v:.3}")
}

fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------
// The shared socket (`--shared-socket`)
// ---------------------------------------------------------------------------------------

/// Poll token of the shared socket (client slots use their index).
const SHARED_TOKEN: Token = Token(usize::MAX);

/// Receive buffer asked for on the shared socket (at least): it holds every client's
/// replies.
const SHARED_RCVBUF: usize = 16 << 20;

/// Datagrams one `recvmmsg` or `sendmmsg` moves at most.
const BATCH: usize = 64;

/// First and last loopback addresses handed to transfers: 127.1.0.1 to 127.254.255.254,
/// skipping every address that ends in .0 or .255.
const SHARED_FIRST: u32 = 0x7F01_0001;
const SHARED_LAST: u32 = 0x7FFE_FFFE;

/// One socket on the IPv4 wildcard address carries every client: each transfer sends
/// from its own loopback address (chosen per datagram with `IP_PKTINFO`), so the server
/// sees a distinct client per transfer, as it would from distinct machines, and the
/// replies are told apart by the address they were sent to. Datagrams move in batches
/// (`recvmmsg`, `sendmmsg`): a client that costs few system calls per transfer.
struct SharedSocket {
    socket: UdpSocket,
    /// Client slots by the address of their current transfer.
    by_addr: HashMap<Ipv4Addr, usize>,
    /// The next address to hand out.
    next_addr: u32,
    batch: RxBatch,
}

impl SharedSocket {
    fn open(poll: &Poll, rcvbuf: usize) -> io::Result<SharedSocket> {
        let mut socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        set_rcvbuf(&socket, rcvbuf);
        set_int_option(&socket, libc::SOL_SOCKET, libc::SO_SNDBUF, SHARED_RCVBUF)?;
        set_int_option(&socket, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        poll.registry()
            .register(&mut socket, SHARED_TOKEN, Interest::READABLE)?;
        Ok(SharedSocket {
            socket,
            by_addr: HashMap::new(),
            next_addr: SHARED_FIRST,
            batch: RxBatch::new(),
        })
    }

    /// A loopback address no running transfer uses, now slot `id`'s. Addresses are used
    /// in turn (16 million of them), so a late datagram for an ended transfer finds no
    /// client rather than the next transfer.
    fn claim(&mut self, id: usize) -> Ipv4Addr {
        loop {
            let addr = self.next_addr;
            self.next_addr = if addr >= SHARED_LAST {
                SHARED_FIRST
            } else {
                addr + 1
            };
            let ip = Ipv4Addr::from(addr);
            if matches!(addr & 0xFF, 0 | 0xFF) || self.by_addr.contains_key(&ip) {
                continue;
            }
            self.by_addr.insert(ip, id);
            return ip;
        }
    }
}

/// Space for one control message carrying an `in_pktinfo` (aligned for `cmsghdr`).
type PktinfoCmsg = [u64; 4];

/// Buffers of one `recvmmsg` call. The default is empty (taken out of the shared socket
/// while its datagrams are handled); [`RxBatch::new`] allocates.
#[derive(Default)]
struct RxBatch {
    /// `BATCH` datagrams of up to `MAX_DATAGRAM` bytes, back to back.
    bufs: Vec<u8>,
    m: Mmsg,
}

impl RxBatch {
    fn new() -> RxBatch {
        RxBatch {
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            m: Mmsg {
                // SAFETY: `sockaddr_in` is plain data for which all-zero bytes are valid.
                names: vec![unsafe { std::mem::zeroed() }; BATCH],
                controls: vec![[0; 4]; BATCH],
                iovs: Vec::with_capacity(BATCH),
                headers: Vec::with_capacity(BATCH),
            },
        }
    }

    /// Receives up to `BATCH` datagrams without blocking; `WouldBlock` when none.
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.m.iovs.clear();
        for chunk in self.bufs.chunks_exact_mut(MAX_DATAGRAM) {
            self.m.iovs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            });
        }
        self.m.fill_headers(std::mem::size_of::<PktinfoCmsg>());
        // SAFETY: every header points into `names`, `iovs`, `controls` and `bufs`, which
        // are neither moved nor resized until the call returns; the lengths given are
        // those of the buffers.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.m.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last batch: its bytes, its source and the address it was sent
    /// to (from `IP_PKTINFO`).
    fn datagram(&self, i: usize) -> (&[u8], SocketAddr, Option<Ipv4Addr>) {
        let hdr = &self.m.headers[i];
        let len = (hdr.msg_len as usize).min(MAX_DATAGRAM);
        let data = &self.bufs[i * MAX_DATAGRAM..][..len];
        let name = &self.m.names[i];
        let from = SocketAddr::from((
            Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
            u16::from_be(name.sin_port),
        ));
        let mut to = None;
        // SAFETY: the header's control fields describe `controls[i]`, as filled in by the
        // kernel; CMSG_FIRSTHDR/NXTHDR stay within `msg_controllen`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&hdr.msg_hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                    let info: libc::in_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    to = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
                }
                cmsg = libc::CMSG_NXTHDR(&hdr.msg_hdr, cmsg);
            }
        }
        (data, from, to)
    }
}

/// The arrays behind one `recvmmsg` or `sendmmsg` call: an address, a control buffer,
/// one `iovec` and a header per datagram.
#[derive(Default)]
struct Mmsg {
    names: Vec<libc::sockaddr_in>,
    controls: Vec<PktinfoCmsg>,
    iovs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Mmsg {
    /// Sets `headers` to one `mmsghdr` per entry of `names`, `iovs` and `controls` (of
    /// equal lengths), each with one buffer and `control_len` bytes of control data. The
    /// headers point into the other arrays: those must not change until the system call.
    fn fill_headers(&mut self, control_len: usize) {
        self.headers.clear();
        let entries = self
            .names
            .iter_mut()
            .zip(&mut self.iovs)
            .zip(&mut self.controls);
        for ((name, iov), control) in entries {
            // SAFETY: `msghdr` is plain data for which all-zero bytes are valid.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = (name as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = control_len;
            self.headers.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
    }
}

/// Datagrams queued by shared-socket clients, sent in batches.
#[derive(Default)]
struct Outbox {
    /// Destination, source address and the range of the datagram in `bytes`.
    queued: Vec<(SocketAddrV4, Ipv4Addr, std::ops::Range<usize>)>,
    bytes: Vec<u8>,
    m: Mmsg,
}

impl Outbox {
    /// Queues `datagram` from `from` (a loopback address) to `to`. Only IPv4 servers reach
    /// here (checked with the flags).
    fn queue(&mut self, datagram: &[u8], from: Ipv4Addr, to: SocketAddr) {
        let SocketAddr::V4(to) = to else {
            return;
        };
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.queued.push((to, from, start..self.bytes.len()));
    }

    /// Sends everything queued, `BATCH` datagrams per `sendmmsg`. A datagram the kernel
    /// refuses for want of buffer space is lost, as on a real link (the timers recover):
    /// returns how many were. Other errors end the run.
    fn send_all(&mut self, socket: &UdpSocket) -> io::Result<u64> {
        use std::os::fd::AsRawFd;
        let mut lost = 0;
        let mut next = 0;
        while next < self.queued.len() {
            let chunk = &self.queued[next..self.queued.len().min(next + BATCH)];
            self.m.names.clear();
            self.m.controls.clear();
            self.m.iovs.clear();
            for (to, from, range) in chunk {
                // SAFETY: `sockaddr_in` is plain data for which all-zero bytes are valid.
                let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                name.sin_family = libc::AF_INET as libc::sa_family_t;
                name.sin_port = to.port().to_be();
                name.sin_addr.s_addr = u32::from(*to.ip()).to_be();
                self.m.names.push(name);
                let mut control: PktinfoCmsg = [0; 4];
                // SAFETY: `control` is aligned for `cmsghdr` and large enough for one
                // header and an `in_pktinfo` (CMSG_SPACE(12) = 32 bytes on Linux).
                unsafe {
                    let cmsg = control.as_mut_ptr().cast::<libc::cmsghdr>();
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    (*cmsg).cmsg_len =
                        libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(*from).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                }
                self.m.controls.push(control);
                self.m.iovs.push(libc::iovec {
                    iov_base: self.bytes[range.clone()].as_ptr() as *mut libc::c_void,
                    iov_len: range.len(),
                });
            }
            // SAFETY: pure arithmetic on a length.
            let control_len =
                unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) };
            self.m.fill_headers(control_len as usize);
            // SAFETY: every header points into `names`, `iovs`, `controls` and `bytes`,
            // which are neither moved nor resized until the call returns; the datagram
            // bytes are only read.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.m.headers.as_mut_ptr(),
                    self.m.headers.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        // The first datagram of the chunk is lost; go on after it.
                        lost += 1;
                        next += 1;
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            } else {
                next += sent as usize;
            }
        }
        self.queued.clear();
        self.bytes.clear();
        Ok(lost)
    }
}

// ---------------------------------------------------------------------------------------
// Raw mode
// ---------------------------------------------------------------------------------------

fn run_raw(config: &RawConfig) -> io::Result<()> {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(receiver.local_addr()?)?;
    receiver.connect(sender.local_addr()?)?;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_times();
    let start = Instant::now();

    let size = config.size;
    let recv_stop = stop.clone();
    let recv_thread = std::thread::spawn(move || -> io::Result<u64> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut received = 0u64;
        loop {
            match receiver.recv(&mut buf) {
                Ok(n) if n == size => received += 1,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Quiet for 200 ms after the sender stopped: everything is in.
                    if recv_stop.load(Ordering::Relaxed) {
                        return Ok(received);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });

    let payload = vec![0xA5u8; size];
    let mut sent = 0u64;
    let mut send_errors = 0u64;
    let until = start + config.seconds;
    // Sending runs on this thread; the clock is read every 256 datagrams.
    'blast: loop {
        for _ in 0..256 {
            match sender.send(&payload) {
                Ok(_) => sent += 1,
                // ENOBUFS and the like: the datagram is lost, as on a real link.
                Err(_) => send_errors += 1,
            }
        }
        if Instant::now() >= until {
            break 'blast;
        }
    }
    let send_time = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let received = recv_thread
        .join()
        .map_err(|_| io::Error::other("receiver thread panicked"))??;
    let cpu = cpu_times() - cpu_before;

    let secs = send_time.as_secs_f64();
    let per_s = received as f64 / secs;
    let mb_per_s = received as f64 * size as f64 / secs / 1e6;
    let sent_per_s = sent as f64 / secs;
    let loss = if sent == 0 {
        0.0
    } else {
        1.0 - received as f64 / sent as f64
    };
    let cpu_pct = cpu.total() / secs * 100.0;
    if config.output == Output::Kv {
        println!(
            "mode=raw size={size} seconds={secs:.3} sent={sent} send_errors={send_errors} \
             received={received} sent_per_s={sent_per_s:.1} datagrams_per_s={per_s:.1} \
             payload_mb_per_s={mb_per_s:.3} loss_ratio={loss:.6} cpu_s={:.3} \
             cpu_pct={cpu_pct:.1}",
            cpu.total()
        );
    } else if config.output == Output::Json {
        let json = Json::object()
            .str("mode", "raw")
            .raw("size", size)
            .raw("seconds", fixed3(secs))
            .raw("threads", 2)
            .raw("sent", sent)
            .raw("send_errors", send_errors)
            .raw("received", received)
            .raw("sent_per_s", format!("{sent_per_s:.1}"))
            .raw("datagrams_per_s", format!("{per_s:.1}"))
            .raw("payload_mb_per_s", fixed3(mb_per_s))
            .raw("loss_ratio", format!("{loss:.6}"))
            .cpu(cpu, cpu_pct);
        println!("{}", json.end());
    } else {
        println!(
            "config: raw UDP over loopback, {size}-byte datagrams, {secs:.2} s, \
             sender and receiver threads"
        );
        println!("sent: {sent} ({sent_per_s:.0}/s, {send_errors} send errors)");
        println!("received datagrams/s: {per_s:.0}");
        println!("received payload MB/s: {mb_per_s:.2}");
        println!("loss ratio: {:.2}%", loss * 100.0);
        println!(
            "loadgen cpu: {:.3} s (user {:.3} s, sys {:.3} s) = {cpu_pct:.1}% of wall (2 threads)",
            cpu.total(),
            cpu.user,
            cpu.sys
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Process resources
// ---------------------------------------------------------------------------------------

/// CPU time of this process, in seconds.
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.sys
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, rhs: Cpu) -> Cpu {
        Cpu {
            user: self.user - rhs.user,
            sys: self.sys - rhs.sys,
        }
    }
}

fn cpu_times() -> Cpu {
    let seconds = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    // SAFETY: `rusage` is plain data for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` that outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Cpu {
            user: 0.0,
            sys: 0.0,
        };
    }
    Cpu {
        user: seconds(usage.ru_utime),
        sys: seconds(usage.ru_stime),
    }
}
