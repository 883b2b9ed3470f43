//! The command line: flags, their checks, and what a run is asked to do.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use getopts::Options;

/// Largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65_507;

/// Receive buffer asked for on each client socket. The kernel default (about 208 KiB)
/// overflows when a server sends a window of large blocks at loopback speed (16 blocks of
/// 8 KiB take more than that in kernel accounting), and the drops would be the load
/// generator's, not the server's. The kernel caps the value at `net.core.rmem_max`.
const DEFAULT_RCVBUF: usize = 4 << 20;

pub enum Mode {
    Help,
    Tftp(Config),
    Raw(RawConfig),
}

/// How the report is printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Lines for people.
    Text,
    /// One JSON object.
    Json,
    /// One line of `key=value` fields, values without spaces (for shell scripts).
    Kv,
}

/// What a TFTP run does.
pub struct Config {
    pub server: SocketAddr,
    pub files: Vec<String>,
    pub expected: Vec<Expected>,
    pub concurrency: usize,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    pub tsize: bool,
    pub timeout: Option<u8>,
    pub client_timeout: Duration,
    pub drop_pct: f64,
    pub seed: u64,
    /// Receive buffer asked for on client sockets (the kernel caps it).
    pub rcvbuf: usize,
    /// `--rcvbuf` was given: apply it on every socket.
    rcvbuf_given: bool,
    /// Transfers still in flight this long after the start are abandoned.
    pub time_limit: Option<Duration>,
    /// Local address of the client sockets (default: the unspecified address).
    pub bind: Option<IpAddr>,
    /// `--shared-socket`: one socket for all clients, a loopback address per transfer.
    pub shared_socket: bool,
    pub output: Output,
}

impl Config {
    /// Whether client sockets get a larger receive buffer: when `--rcvbuf` was given, or
    /// when a window asked for may exceed the kernel default (a window of more than 32 KiB
    /// of payload). Otherwise the extra `setsockopt` per transfer is skipped.
    pub fn rcvbuf_needed(&self) -> bool {
        let blksize = self.blksize.map_or(512, usize::from);
        let window = self.windowsize.map_or(1, usize::from);
        self.rcvbuf_given || blksize.saturating_mul(window) > 32 * 1024
    }
}

/// What a transfer must deliver.
pub enum Expected {
    /// Exactly these bytes.
    Bytes(Arc<[u8]>),
    /// This many bytes (contents unchecked).
    Size(u64),
}

impl Expected {
    pub fn len(&self) -> u64 {
        match self {
            Expected::Bytes(bytes) => bytes.len() as u64,
            Expected::Size(size) => *size,
        }
    }
}

pub struct RawConfig {
    pub size: usize,
    pub seconds: Duration,
    pub output: Output,
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

pub fn options() -> Options {
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

pub fn usage(opts: &Options) -> String {
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

pub fn parse_args(opts: &Options, args: &[String]) -> Result<Mode, String> {
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
