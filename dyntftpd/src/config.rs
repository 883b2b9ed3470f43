//! dyntftpd's settings: command-line flags and the `--config` file, which takes the same
//! settings as `key = value` lines. Flags override the file.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use dyntftp::server::DEFAULT_BUSY_POLL;
use dyntftp::{Handler, Limits, Rate, ReadRequest, Reject, ResponseData, ServerBuilder};
use getopts::{Matches, Options};
use log::LevelFilter;

/// How log records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Everything dyntftpd needs to run.
#[derive(Debug)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub root: PathBuf,
    pub timeout: Duration,
    pub retries: u32,
    pub max_blksize: u16,
    pub max_window: u16,
    pub max_sessions: Option<usize>,
    /// Requests per second per client; 0 for no limit.
    pub rate_limit: f64,
    pub rate_burst: u32,
    /// Concurrent sessions per client; 0 for no limit.
    pub max_per_client: u32,
    /// Unverified (never acknowledged) concurrent sessions per client; 0 for no limit.
    pub max_unverified_per_client: u32,
    /// Whether the per-client limits apply to loopback clients too.
    pub limit_loopback: bool,
    /// The longest a session may go without progress.
    pub progress_timeout: Duration,
    /// Bytes the windows of all sessions may hold together.
    pub window_memory: u64,
    /// Largest blksize and windowsize granted in single-port mode.
    pub single_port_max_blksize: u16,
    pub single_port_max_window: u16,
    pub adaptive_timeout: bool,
    pub udp_gso: bool,
    /// Microseconds to poll without sleeping while sessions run.
    pub busy_poll: u64,
    pub single_port: bool,
    /// The ports session sockets bind, first and last; `None`: any.
    pub port_range: Option<(u16, u16)>,
    /// Whether blksize is clamped to the arrival interface's MTU.
    pub mtu_blksize: bool,
    pub workers: usize,
    pub ignore_case: bool,
    pub unique_root: bool,
    pub lowercase: bool,
    pub strip_prefix: Vec<String>,
    /// Bytes of served files kept in memory; 0 for no cache.
    pub cache: u64,
    pub stats_interval: Duration,
    pub user: Option<String>,
    pub verbose: u32,
    pub quiet: bool,
    pub metrics_file: Option<PathBuf>,
    /// Where `/metrics` and `/healthz` are served over HTTP.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_file: Option<PathBuf>,
    /// The HTTP repository names not found under `root` come from.
    pub upstream: Option<String>,
    /// Its connect, headers and per-read timeout.
    pub upstream_timeout: Duration,
    /// Bytes of its bodies kept in memory; 0 for none.
    pub upstream_cache: u64,
    /// Its worker threads.
    pub upstream_workers: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: Vec::new(),
            root: PathBuf::from("."),
            timeout: Duration::from_secs(1),
            retries: 5,
            max_blksize: 65464,
            max_window: 64,
            max_sessions: None,
            rate_limit: dyntftp::Rate::DEFAULT.per_second,
            rate_burst: dyntftp::Rate::DEFAULT.burst,
            max_per_client: dyntftp::server::DEFAULT_MAX_SESSIONS_PER_CLIENT,
            max_unverified_per_client: dyntftp::server::DEFAULT_MAX_UNVERIFIED_PER_CLIENT,
            limit_loopback: false,
            progress_timeout: dyntftp::SessionConfig::default().progress_timeout,
            window_memory: dyntftp::server::DEFAULT_WINDOW_MEMORY as u64,
            single_port_max_blksize: dyntftp::server::SINGLE_PORT_LIMITS.max_blksize,
            single_port_max_window: dyntftp::server::SINGLE_PORT_LIMITS.max_window,
            adaptive_timeout: true,
            udp_gso: true,
            busy_poll: DEFAULT_BUSY_POLL.as_micros() as u64,
            single_port: false,
            port_range: None,
            mtu_blksize: true,
            workers: 1,
            ignore_case: false,
            unique_root: false,
            lowercase: false,
            strip_prefix: Vec::new(),
            cache: 0,
            stats_interval: Duration::from_secs(60),
            user: None,
            verbose: 0,
            quiet: false,
            metrics_file: None,
            metrics_listen: None,
            log_format: LogFormat::Text,
            log_file: None,
            upstream: None,
            upstream_timeout: Duration::from_secs(10),
            upstream_cache: 256 << 20,
            upstream_workers: 16,
        }
    }
}

impl Config {
    /// The log level `--quiet` and `--verbose` select.
    pub fn log_level(&self) -> LevelFilter {
        match (self.quiet, self.verbose) {
            (true, _) => LevelFilter::Warn,
            (false, 0) => LevelFilter::Info,
            (false, 1) => LevelFilter::Debug,
            (false, _) => LevelFilter::Trace,
        }
    }

    /// The settings as a configuration file (what `--check-config` prints).
    pub fn to_file_text(&self) -> String {
        let mut out = String::new();
        for addr in &self.listen {
            let _ = writeln!(out, "listen = {addr}");
        }
        let _ = writeln!(out, "root = {}", self.root.display());
        let _ = writeln!(out, "timeout = {}", self.timeout.as_secs_f64());
        let _ = writeln!(out, "retries = {}", self.retries);
        let _ = writeln!(out, "max-blksize = {}", self.max_blksize);
        let _ = writeln!(out, "max-window = {}", self.max_window);
        if let Some(max) = self.max_sessions {
            let _ = writeln!(out, "max-sessions = {max}");
        }
        let _ = writeln!(out, "rate-limit = {}", self.rate_limit);
        let _ = writeln!(out, "rate-burst = {}", self.rate_burst);
        let _ = writeln!(out, "max-per-client = {}", self.max_per_client);
        let _ = writeln!(
            out,
            "max-unverified-per-client = {}",
            self.max_unverified_per_client
        );
        let _ = writeln!(out, "limit-loopback = {}", self.limit_loopback);
        let _ = writeln!(
            out,
            "progress-timeout = {}",
            self.progress_timeout.as_secs_f64()
        );
        let _ = writeln!(out, "window-memory = {}", self.window_memory);
        let _ = writeln!(
            out,
            "single-port-max-blksize = {}",
            self.single_port_max_blksize
        );
        let _ = writeln!(
            out,
            "single-port-max-window = {}",
            self.single_port_max_window
        );
        let _ = writeln!(
            out,
            "adaptive-timeout = {}",
            if self.adaptive_timeout { "on" } else { "off" }
        );
        let _ = writeln!(out, "udp-gso = {}", if self.udp_gso { "on" } else { "off" });
        let _ = writeln!(out, "busy-poll = {}", self.busy_poll);
        let _ = writeln!(out, "single-port = {}", self.single_port);
        if let Some((low, high)) = self.port_range {
            let _ = writeln!(out, "port-range = {low}:{high}");
        }
        let _ = writeln!(out, "mtu-blksize = {}", on_off(self.mtu_blksize));
        let _ = writeln!(out, "workers = {}", self.workers);
        let _ = writeln!(out, "ignore-case = {}", self.ignore_case);
        let _ = writeln!(out, "unique-root = {}", self.unique_root);
        let _ = writeln!(out, "lowercase = {}", self.lowercase);
        for prefix in &self.strip_prefix {
            let _ = writeln!(out, "strip-prefix = {prefix}");
        }
        let _ = writeln!(out, "cache = {}", self.cache);
        let _ = writeln!(
            out,
            "stats-interval = {}",
            self.stats_interval.as_secs_f64()
        );
        if let Some(user) = &self.user {
            let _ = writeln!(out, "user = {user}");
        }
        let _ = writeln!(out, "verbose = {}", self.verbose);
        let _ = writeln!(out, "quiet = {}", self.quiet);
        if let Some(path) = &self.metrics_file {
            let _ = writeln!(out, "metrics-file = {}", path.display());
        }
        if let Some(addr) = &self.metrics_listen {
            let _ = writeln!(out, "metrics-listen = {addr}");
        }
        let _ = writeln!(out, "log-format = {}", self.log_format.as_str());
        if let Some(path) = &self.log_file {
            let _ = writeln!(out, "log-file = {}", path.display());
        }
        if let Some(url) = &self.upstream {
            let _ = writeln!(out, "upstream = {url}");
        }
        let _ = writeln!(
            out,
            "upstream-timeout = {}",
            self.upstream_timeout.as_secs_f64()
        );
        let _ = writeln!(out, "upstream-cache = {}", self.upstream_cache);
        let _ = writeln!(out, "upstream-workers = {}", self.upstream_workers);
        out
    }

    /// Sets the setting `key` (a long flag name) from `text`. On a bad value, says why:
    /// `invalid value for {prefix}{key}: "{text}"`.
    fn set(&mut self, key: &str, text: &str, prefix: &str) -> Result<(), String> {
        let bad = || format!("invalid value for {prefix}{key}: {text:?}");
        match key {
            "listen" => {
                let addr = text.parse::<SocketAddr>().map_err(|_| {
                    format!("{} (expected ADDR:PORT, e.g. 0.0.0.0:69 or [::]:69)", bad())
                })?;
                self.listen.push(addr);
            }
            "root" if !text.is_empty() => self.root = PathBuf::from(text),
            "timeout" => {
                self.timeout = seconds(text, MIN_TIMEOUT)
                    .ok_or_else(|| format!("{} (at least {MIN_TIMEOUT:?})", bad()))?
            }
            "retries" => self.retries = number(text, |n: &u32| *n <= 1000).ok_or_else(bad)?,
            "max-blksize" => {
                self.max_blksize =
                    number(text, |n: &u16| (8..=65464).contains(n)).ok_or_else(bad)?
            }
            "max-window" => self.max_window = number(text, |n: &u16| *n >= 1).ok_or_else(bad)?,
            "max-sessions" => {
                self.max_sessions = Some(number(text, |n: &usize| *n >= 1).ok_or_else(bad)?)
            }
            "rate-limit" => {
                self.rate_limit = number(text, |r: &f64| r.is_finite() && (0.0..=1e6).contains(r))
                    .ok_or_else(bad)?
            }
            "rate-burst" => {
                self.rate_burst =
                    number(text, |n: &u32| (1..=1_000_000).contains(n)).ok_or_else(bad)?
            }
            "max-per-client" => {
                self.max_per_client = number(text, |_: &u32| true).ok_or_else(bad)?
            }
            "max-unverified-per-client" => {
                self.max_unverified_per_client = number(text, |_: &u32| true).ok_or_else(bad)?
            }
            "progress-timeout" => {
                self.progress_timeout = seconds(text, MIN_PROGRESS_TIMEOUT)
                    .ok_or_else(|| format!("{} (at least {MIN_PROGRESS_TIMEOUT:?})", bad()))?
            }
            "window-memory" => {
                self.window_memory =
                    bytes(text)
                        .filter(|b| *b >= MIN_WINDOW_MEMORY)
                        .ok_or_else(|| {
                            format!("{} (expected bytes, at least 64K, e.g. 64M or 1G)", bad())
                        })?
            }
            "single-port-max-blksize" => {
                self.single_port_max_blksize =
                    number(text, |n: &u16| (8..=65464).contains(n)).ok_or_else(bad)?
            }
            "single-port-max-window" => {
                self.single_port_max_window = number(text, |n: &u16| *n >= 1).ok_or_else(bad)?
            }
            "adaptive-timeout" | "udp-gso" | "mtu-blksize" => {
                let on = match text {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("{} (expected on or off)", bad())),
                };
                match key {
                    "udp-gso" => self.udp_gso = on,
                    "mtu-blksize" => self.mtu_blksize = on,
                    _ => self.adaptive_timeout = on,
                }
            }
            "port-range" => {
                self.port_range = Some(port_range(text).ok_or_else(|| {
                    format!(
                        "{} (expected LOW:HIGH with 1 <= LOW <= HIGH <= 65535)",
                        bad()
                    )
                })?)
            }
            "single-port" | "ignore-case" | "unique-root" | "lowercase" | "limit-loopback" => {
                let on = match text {
                    "true" => true,
                    "false" => false,
                    _ => return Err(format!("{} (expected true or false)", bad())),
                };
                match key {
                    "single-port" => self.single_port = on,
                    "ignore-case" => self.ignore_case = on,
                    "unique-root" => self.unique_root = on,
                    "limit-loopback" => self.limit_loopback = on,
                    _ => self.lowercase = on,
                }
            }
            "strip-prefix" if !text.is_empty() => self.strip_prefix.push(text.to_string()),
            "busy-poll" => self.busy_poll = number(text, |n: &u64| *n <= 10_000).ok_or_else(bad)?,
            "workers" => {
                self.workers = number(text, |n: &usize| (1..=1024).contains(n)).ok_or_else(bad)?
            }
            "cache" => {
                self.cache = bytes(text).ok_or_else(|| {
                    format!(
                        "{} (expected bytes, e.g. 0, 65536, 512K, 256M or 2G)",
                        bad()
                    )
                })?
            }
            "stats-interval" => {
                self.stats_interval = seconds(text, MIN_STATS_INTERVAL)
                    .ok_or_else(|| format!("{} (at least {MIN_STATS_INTERVAL:?})", bad()))?
            }
            "user" if !text.is_empty() => self.user = Some(text.to_string()),
            "verbose" => self.verbose = number(text, |n: &u32| *n <= 2).ok_or_else(bad)?,
            "quiet" => {
                self.quiet = match text {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad()),
                }
            }
            "metrics-file" if !text.is_empty() && !text.ends_with('/') => {
                self.metrics_file = Some(PathBuf::from(text))
            }
            "metrics-listen" => {
                self.metrics_listen = Some(text.parse::<SocketAddr>().map_err(|_| {
                    format!(
                        "{} (expected ADDR:PORT, e.g. 127.0.0.1:9169 or [::]:9169)",
                        bad()
                    )
                })?)
            }
            "log-format" => {
                self.log_format = match text {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(format!("{} (expected text or json)", bad())),
                }
            }
            "log-file" if !text.is_empty() => self.log_file = Some(PathBuf::from(text)),
            "upstream" if text.starts_with("http://") || text.starts_with("https://") => {
                self.upstream = Some(text.to_string())
            }
            "upstream-timeout" => {
                self.upstream_timeout = seconds(text, MIN_TIMEOUT)
                    .ok_or_else(|| format!("{} (at least {MIN_TIMEOUT:?})", bad()))?
            }
            "upstream-cache" => {
                self.upstream_cache = bytes(text).ok_or_else(|| {
                    format!("{} (expected bytes, e.g. 0, 512K, 256M or 2G)", bad())
                })?
            }
            "upstream-workers" => {
                self.upstream_workers =
                    number(text, |n: &usize| (1..=1024).contains(n)).ok_or_else(bad)?
            }
            _ if FILE_KEYS.contains(&key) => return Err(bad()),
            _ => return Err(format!("unknown setting {key:?}")),
        }
        Ok(())
    }

    /// Applies a configuration file's text; errors name `path` and the line.
    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), String> {
        let mut seen: Vec<(&str, usize)> = Vec::new();
        // Editors on some systems start a UTF-8 file with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let at = |why: String| format!("{}:{line}: {why}", path.display());
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(at(format!("expected `key = value`, found {trimmed:?}")));
            };
            let key = key.trim();
            let value = value.trim();
            let value = match value.strip_prefix('"') {
                Some(rest) => rest
                    .strip_suffix('"')
                    .ok_or_else(|| at(format!("unterminated quote in {value:?}")))?,
                None => value,
            };
            if !FILE_KEYS.contains(&key) {
                return Err(at(format!("unknown setting {key:?}")));
            }
            if key != "listen" && key != "strip-prefix" {
                if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
                    return Err(at(format!("{key} is already set on line {first}")));
                }
                seen.push((key, line));
            }
            self.set(key, value, "").map_err(at)?;
        }
        Ok(())
    }
}

/// The settings a configuration file may hold: every flag but these four.
pub const FILE_KEYS: [&str; 40] = [
    "listen",
    "root",
    "timeout",
    "retries",
    "max-blksize",
    "max-window",
    "max-sessions",
    "rate-limit",
    "rate-burst",
    "max-per-client",
    "max-unverified-per-client",
    "limit-loopback",
    "progress-timeout",
    "window-memory",
    "single-port-max-blksize",
    "single-port-max-window",
    "adaptive-timeout",
    "udp-gso",
    "busy-poll",
    "single-port",
    "port-range",
    "mtu-blksize",
    "workers",
    "ignore-case",
    "unique-root",
    "lowercase",
    "strip-prefix",
    "cache",
    "stats-interval",
    "user",
    "verbose",
    "quiet",
    "metrics-file",
    "metrics-listen",
    "log-format",
    "log-file",
    "upstream",
    "upstream-timeout",
    "upstream-cache",
    "upstream-workers",
];

/// `LOW:HIGH`, two ports with 1 <= LOW <= HIGH.
fn port_range(text: &str) -> Option<(u16, u16)> {
    let (low, high) = text.split_once(':')?;
    let (low, high) = (low.parse::<u16>().ok()?, high.parse::<u16>().ok()?);
    (1..=high).contains(&low).then_some((low, high))
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn number<T: FromStr>(text: &str, check: impl Fn(&T) -> bool) -> Option<T> {
    text.parse::<T>().ok().filter(check)
}

/// A byte count, with an optional K, M or G suffix (powers of 1024).
fn bytes(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&text[..i], 1 << 20),
        (i, 'G' | 'g') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// Seconds from `min` to a day, fractions allowed.
fn seconds(text: &str, min: Duration) -> Option<Duration> {
    number(text, |s: &f64| {
        s.is_finite() && *s >= min.as_secs_f64() && *s <= 86_400.0
    })
    .map(Duration::from_secs_f64)
}

/// The shortest `--timeout`: below it, retransmissions would come as fast as the timer
/// fires.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);

/// The shortest `--stats-interval`: each report rewrites the metrics file.
pub const MIN_STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest `--progress-timeout`: a client's round trip and a few retransmissions.
pub const MIN_PROGRESS_TIMEOUT: Duration = Duration::from_secs(1);

/// The smallest `--window-memory`: a few windows of the usual sizes.
pub const MIN_WINDOW_MEMORY: u64 = 64 << 10;

/// The largest configuration file read: far more than any real one, so that
/// `--config /dev/zero` or a runaway file fails at once.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

pub fn options() -> Options {
    let mut opts = Options::new();
    opts.optmulti(
        "l",
        "listen",
        "address and port to listen on (repeatable; default [::]:69, dual-stack, or 0.0.0.0:69 without IPv6; none by default under systemd socket activation)",
        "ADDR:PORT",
    );
    opts.optopt(
        "r",
        "root",
        "directory to serve (default: current directory)",
        "DIR",
    );
    opts.optopt(
        "",
        "timeout",
        "base retransmission timeout in seconds, fractions allowed (default 1, at least 0.01)",
        "SECS",
    );
    opts.optopt(
        "",
        "retries",
        "retransmissions before a session gives up (default 5)",
        "N",
    );
    opts.optopt(
        "",
        "max-blksize",
        "largest block size granted, 8..65464 (default 65464)",
        "N",
    );
    opts.optopt(
        "",
        "max-window",
        "largest windowsize granted in blocks, 1..65535 (default 64)",
        "N",
    );
    opts.optopt(
        "",
        "max-sessions",
        "most concurrent sessions (default: from the file-descriptor limit)",
        "N",
    );
    opts.optopt(
        "",
        "rate-limit",
        "requests per second each client (IPv4 address or IPv6 /64) may send; over it, requests are dropped unanswered; 0 for no limit (default 100; loopback is exempt unless --limit-loopback)",
        "N",
    );
    opts.optopt(
        "",
        "rate-burst",
        "requests a client may send at once after a quiet spell (default 200)",
        "N",
    );
    opts.optopt(
        "",
        "max-per-client",
        "most concurrent sessions per client; more get ERROR 0; 0 for no limit (default 64; loopback is exempt unless --limit-loopback)",
        "N",
    );
    opts.optopt(
        "",
        "max-unverified-per-client",
        "most concurrent sessions per client that never got an ACK (a spoofed request's kind); a new request at the cap replaces that client's oldest such session; 0 for no limit (default 4)",
        "N",
    );
    opts.optopt(
        "",
        "progress-timeout",
        "longest time in seconds a session may go without progress, whatever timeout the client asks for (default 60, at least 1)",
        "SECS",
    );
    opts.optopt(
        "",
        "window-memory",
        "bytes all sessions' windows may hold together; beyond, new sessions get smaller windows (default 256M, at least 64K)",
        "BYTES",
    );
    opts.optopt(
        "",
        "single-port-max-blksize",
        "largest block size granted in --single-port mode, where ACKs can be forged blind (default 1468; raise only where spoofed sources are filtered, BCP 38)",
        "N",
    );
    opts.optopt(
        "",
        "single-port-max-window",
        "largest windowsize granted in --single-port mode (default 8; see --single-port-max-blksize)",
        "N",
    );
    opts.optflag(
        "",
        "limit-loopback",
        "apply --rate-limit and --max-per-client to loopback clients too: behind a local relay or port forward, every client looks like 127.0.0.1",
    );
    opts.optopt(
        "",
        "adaptive-timeout",
        "on (default): retransmit after a few measured round trips when that is well below the timeout; off: always wait the timeout",
        "on|off",
    );
    opts.optopt(
        "",
        "udp-gso",
        "on (default): send each window's DATA with UDP segmentation offload, many datagrams per system call (automatic fallback); off: one per call",
        "on|off",
    );
    opts.optopt(
        "",
        "busy-poll",
        "adaptive busy polling: while transfers run and datagrams keep coming within USECS, poll that long without sleeping before blocking (faster lock-step transfers for CPU time; 0..10000, default 50, 0: off)",
        "USECS",
    );
    opts.optflag(
        "",
        "single-port",
        "serve every transfer from the listening port instead of a new port per transfer (for NAT, firewalls and containers that forward only port 69)",
    );
    opts.optopt(
        "",
        "port-range",
        "bind each transfer's port in LOW:HIGH, e.g. 50000:50999 (for firewalls); with every port in use, new requests wait for one; not with --single-port (default: any free port)",
        "LOW:HIGH",
    );
    opts.optopt(
        "",
        "mtu-blksize",
        "on (default): grant no blksize larger than one unfragmented datagram on the interface the request came in on (MTU less 32 bytes for IPv4, 52 for IPv6; at least 512); off: up to --max-blksize",
        "on|off",
    );
    opts.optopt(
        "",
        "workers",
        "event loops, one thread each, sharing the listening address through SO_REUSEPORT (default 1; at most one per core helps)",
        "N",
    );
    opts.optmulti(
        "",
        "strip-prefix",
        "remove this leading directory from requested names before lookup (repeatable), e.g. /tftpboot",
        "PREFIX",
    );
    opts.optflag(
        "",
        "lowercase",
        "lower-case requested names (ASCII) before lookup",
    );
    opts.optflag(
        "",
        "ignore-case",
        "when a name does not exist, look it up ignoring ASCII case (never through a symlink)",
    );
    opts.optflag(
        "",
        "unique-root",
        "serve ROOT/<client IP>/NAME when it exists, else ROOT/NAME",
    );
    opts.optopt(
        "",
        "cache",
        "keep up to BYTES of served files in memory, reloaded when a file changes (suffix K, M or G; default 0: off)",
        "BYTES",
    );
    opts.optopt(
        "",
        "stats-interval",
        "seconds between server statistics reports (default 60, at least 1)",
        "SECS",
    );
    opts.optopt(
        "u",
        "user",
        "drop privileges to this user after binding",
        "NAME",
    );
    opts.optopt(
        "",
        "metrics-file",
        "write Prometheus metrics to PATH every stats interval (atomically, for node_exporter's textfile collector)",
        "PATH",
    );
    opts.optopt(
        "",
        "metrics-listen",
        "serve GET /metrics (Prometheus text, refreshed every stats interval) and GET /healthz over HTTP on ADDR:PORT",
        "ADDR:PORT",
    );
    opts.optopt(
        "",
        "log-format",
        "text (default) or json: one JSON object per line, per finished session and per stats report",
        "FORMAT",
    );
    opts.optopt(
        "",
        "log-file",
        "append the log to PATH instead of standard error",
        "PATH",
    );
    opts.optopt(
        "",
        "upstream",
        "serve names not found under the root from this HTTP(S) repository: URL + name (one GET per name at a time, tsize from Content-Length)",
        "URL",
    );
    opts.optopt(
        "",
        "upstream-timeout",
        "seconds the repository may take to connect, to answer, and between body reads (default 10)",
        "SECS",
    );
    opts.optopt(
        "",
        "upstream-cache",
        "keep up to BYTES of repository files in memory, revalidated after 60 s (suffix K, M or G; default 256M, 0: off)",
        "BYTES",
    );
    opts.optopt(
        "",
        "upstream-workers",
        "threads fetching from the repository, 1..1024 (default 16; 4 queued requests each)",
        "N",
    );
    opts.optopt(
        "c",
        "config",
        "read settings from FILE (key = value lines, keys named like the long flags; a regular file of at most 1 MiB); flags override it",
        "FILE",
    );
    opts.optflag(
        "",
        "check-config",
        "check the flags and the configuration file as start-up does, print the resulting settings and exit",
    );
    opts.optflagmulti("v", "verbose", "more logging: -v debug, -vv trace");
    opts.optflag("q", "quiet", "log warnings and errors only");
    opts.optflag("h", "help", "print this help and exit");
    opts.optflag("V", "version", "print the version and exit");
    opts
}

pub fn usage(opts: &Options) -> String {
    opts.usage("Usage: dyntftpd [options]\n\nServes the files under a directory over TFTP (RFC 1350, 2347, 2348, 2349, 7440), read requests only.")
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Serve with these settings.
    Serve(Box<Config>),
    /// Print this text and exit 0 (help, version, `--check-config`).
    Print(String),
}

/// Reads the command line (and the file `--config` names). An error is a usage error.
pub fn parse_args(args: &[String]) -> Result<Command, String> {
    let opts = options();
    let m = opts.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("h") {
        return Ok(Command::Print(usage(&opts)));
    }
    if m.opt_present("V") {
        return Ok(Command::Print(format!(
            "dyntftpd {}",
            env!("CARGO_PKG_VERSION")
        )));
    }
    if let Some(extra) = m.free.first() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    let mut config = Config::default();
    if let Some(path) = m.opt_str("config") {
        let path = PathBuf::from(path);
        let text = read_config_file(&path)?;
        config.apply_file(&path, &text)?;
    }
    apply_flags(&mut config, &m)?;
    config.validate()?;
    if m.opt_present("check-config") {
        return Ok(Command::Print(config.to_file_text()));
    }
    Ok(Command::Serve(Box::new(config)))
}

/// The command line as UTF-8 strings; an argument that is not UTF-8 is a usage error.
pub fn utf8_args(args: impl IntoIterator<Item = OsString>) -> Result<Vec<String>, String> {
    args.into_iter()
        .map(|arg| {
            arg.into_string().map_err(|arg| {
                format!(
                    "argument {:?} is not valid UTF-8 (dyntftpd takes UTF-8 paths and names)",
                    arg.to_string_lossy()
                )
            })
        })
        .collect()
}

/// Reads a configuration file: a regular file (not a device, FIFO or directory, which
/// could block or never end) of at most [`MAX_CONFIG_BYTES`], in UTF-8.
fn read_config_file(path: &Path) -> Result<String, String> {
    let cannot = |why: String| format!("cannot read {}: {why}", path.display());
    // Non-blocking: opening a FIFO without a writer would wait forever.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| cannot(e.to_string()))?;
    let metadata = file.metadata().map_err(|e| cannot(e.to_string()))?;
    if !metadata.is_file() {
        return Err(cannot("not a regular file".into()));
    }
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(cannot(format!(
            "{} bytes, more than the {MAX_CONFIG_BYTES} a configuration file may have",
            metadata.len()
        )));
    }
    let mut text = String::new();
    // Bounded again, in case the file grows while it is read.
    File::take(file, MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| cannot(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(cannot("the file grew past the size limit".into()));
    }
    Ok(text)
}

impl Config {
    /// Passes these settings to `builder`: what start-up serves with, and what
    /// [`validate`](Config::validate) checks.
    pub fn configure<H: Handler>(&self, builder: ServerBuilder<H>) -> ServerBuilder<H> {
        let mut builder = builder
            .timeout(self.timeout)
            .retries(self.retries)
            .max_blksize(self.max_blksize)
            .max_window(self.max_window)
            .request_rate((self.rate_limit > 0.0).then_some(Rate {
                per_second: self.rate_limit,
                burst: self.rate_burst,
            }))
            .max_sessions_per_client((self.max_per_client > 0).then_some(self.max_per_client))
            .max_unverified_per_client(
                (self.max_unverified_per_client > 0).then_some(self.max_unverified_per_client),
            )
            .limit_loopback(self.limit_loopback)
            .progress_timeout(self.progress_timeout)
            .window_memory(usize::try_from(self.window_memory).unwrap_or(usize::MAX))
            .single_port_limits(Limits {
                max_blksize: self.single_port_max_blksize,
                max_window: self.single_port_max_window,
                max_window_bytes: self.single_port_max_window as usize
                    * self.single_port_max_blksize as usize,
            })
            .adaptive_timeout(self.adaptive_timeout)
            .udp_gso(self.udp_gso)
            .busy_poll(Duration::from_micros(self.busy_poll))
            .single_port(self.single_port)
            .mtu_blksize(self.mtu_blksize)
            .stats_interval(self.stats_interval);
        if let Some(max) = self.max_sessions {
            builder = builder.max_sessions(max);
        }
        if let Some((low, high)) = self.port_range {
            builder = builder.port_range(low..=high);
        }
        builder
    }

    /// Checks the settings the way start-up does, with the server library's own checks,
    /// without binding or opening anything: `--check-config` and start-up refuse the same.
    pub fn validate(&self) -> Result<(), String> {
        // Start-up listens on a default address (or inherited sockets) when none is
        // given; any address stands for it here.
        let placeholder = SocketAddr::from(([0u8; 4], 69));
        let builder = self.configure(ServerBuilder::new(NoFiles));
        let builder = match self.listen.is_empty() {
            true => builder.bind(placeholder),
            false => self.listen.iter().fold(builder, |b, addr| b.bind(*addr)),
        };
        builder.validate().map_err(|e| e.to_string())
    }
}

/// The handler [`Config::validate`] builds with: it never serves.
struct NoFiles;

impl Handler for NoFiles {
    fn open(&mut self, _: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        Err(Reject::not_found())
    }
}

/// Applies the command-line flags over the settings from the file.
fn apply_flags(config: &mut Config, m: &Matches) -> Result<(), String> {
    for key in FILE_KEYS {
        match key {
            "verbose" | "quiet" => continue,
            // Flags without a value.
            "single-port" | "ignore-case" | "unique-root" | "lowercase" | "limit-loopback" => {
                if m.opt_present(key) {
                    config.set(key, "true", "--")?;
                }
                continue;
            }
            "strip-prefix" if m.opt_present(key) => config.strip_prefix.clear(),
            "listen" if m.opt_present(key) => config.listen.clear(),
            _ => {}
        }
        for value in m.opt_strs(key) {
            config.set(key, &value, "--")?;
        }
    }
    let (quiet, verbose) = (m.opt_present("q"), m.opt_count("v"));
    if quiet && verbose > 0 {
        return Err("--quiet and --verbose exclude each other".into());
    }
    if quiet || verbose > 0 {
        config.quiet = quiet;
        config.verbose = verbose.min(2) as u32;
    }
    if config.quiet && config.verbose > 0 {
        return Err("quiet and verbose exclude each other".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn config(list: &[&str]) -> Config {
        match parse_args(&args(list)) {
            Ok(Command::Serve(c)) => *c,
            other => panic!("{list:?}: {other:?}"),
        }
    }

    /// A configuration file with `text`, removed on drop.
    struct File(PathBuf);

    impl File {
        fn new(tag: &str, text: &str) -> File {
            let path = std::env::temp_dir()
                .join(format!("dyntftpd-config-{tag}-{}.conf", std::process::id()));
            std::fs::write(&path, text).unwrap();
            File(path)
        }

        fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for File {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn defaults() {
        let c = config(&[]);
        assert!(c.listen.is_empty());
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!((c.retries, c.max_blksize, c.max_window), (5, 65464, 64));
        assert_eq!(c.log_level(), LevelFilter::Info);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.metrics_file.is_none() && c.log_file.is_none());
    }

    #[test]
    fn flags_are_parsed() {
        let c = config(&[
            "-l",
            "127.0.0.1:6969",
            "--listen",
            "[::1]:6969",
            "-r",
            "/srv",
            "--timeout",
            "0.5",
            "--retries",
            "3",
            "--max-blksize",
            "1468",
            "--max-window",
            "16",
            "--max-sessions",
            "10",
            "--stats-interval",
            "5",
            "-u",
            "nobody",
            "--metrics-file",
            "/run/m.prom",
            "--log-format",
            "json",
            "--log-file",
            "/var/log/d.log",
            "-vv",
        ]);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.root, PathBuf::from("/srv"));
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!((c.retries, c.max_blksize, c.max_window), (3, 1468, 16));
        assert_eq!(c.max_sessions, Some(10));
        assert_eq!(c.stats_interval, Duration::from_secs(5));
        assert_eq!(c.user.as_deref(), Some("nobody"));
        assert_eq!(c.metrics_file, Some(PathBuf::from("/run/m.prom")));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/d.log")));
        assert_eq!(c.log_level(), LevelFilter::Trace);
    }

    #[test]
    fn bad_values_say_which_flag() {
        for (bad, needle) in [
            (&["--max-blksize", "7"][..], "--max-blksize"),
            (&["--max-blksize", "65465"], "--max-blksize"),
            (&["--timeout", "0"], "--timeout"),
            (&["--timeout", "abc"], "--timeout"),
            (&["--max-window", "0"], "--max-window"),
            (&["-l", "localhost"], "--listen"),
            (&["--log-format", "xml"], "--log-format"),
            (&["--metrics-file", ""], "--metrics-file"),
            (&["--bogus"], "bogus"),
            (&["extra"], "unexpected argument"),
            (&["-q", "-v"], "exclude"),
            (&["--config", "/nonexistent/dyntftpd.conf"], "cannot read"),
        ] {
            let err = parse_args(&args(bad)).err().unwrap_or_default();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn metrics_listen_from_flag_and_file() {
        assert_eq!(config(&[]).metrics_listen, None);
        let c = config(&["--metrics-listen", "[::1]:9169"]);
        assert_eq!(c.metrics_listen, "[::1]:9169".parse().ok());
        let file = File::new("scrape", "metrics-listen = 127.0.0.1:9169\n");
        let c = config(&["--config", file.arg()]);
        assert_eq!(c.metrics_listen, "127.0.0.1:9169".parse().ok());
        let check = parse_args(&args(&["--check-config", "--config", file.arg()]));
        assert!(
            matches!(check, Ok(Command::Print(t)) if t.contains("metrics-listen = 127.0.0.1:9169\n"))
        );
        for bad in ["9169", "localhost:9169", ""] {
            let err = parse_args(&args(&["--metrics-listen", bad]))
                .err()
                .unwrap_or_default();
            assert!(err.contains("--metrics-listen"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn help_version_and_check_are_not_errors() {
        assert!(
            matches!(parse_args(&args(&["-h"])), Ok(Command::Print(t)) if t.contains("--listen"))
        );
        assert!(
            matches!(parse_args(&args(&["-V"])), Ok(Command::Print(t)) if t.starts_with("dyntftpd "))
        );
        assert!(
            matches!(parse_args(&args(&["--check-config", "--retries", "9"])), Ok(Command::Print(t)) if t.contains("retries = 9\n"))
        );
    }

    #[test]
    fn abuse_limits_and_adaptive_timeout_from_flags_and_file() {
        let c = config(&[]);
        assert_eq!(
            (c.rate_limit, c.rate_burst, c.max_per_client),
            (100.0, 200, 64)
        );
        assert!(c.adaptive_timeout);
        let file = File::new(
            "limits",
            "rate-limit = 2.5\nrate-burst = 10\nmax-per-client = 0\nadaptive-timeout = off\n",
        );
        let c = config(&["--config", file.arg(), "--rate-burst", "20"]);
        assert_eq!((c.rate_limit, c.rate_burst, c.max_per_client), (2.5, 20, 0));
        assert!(!c.adaptive_timeout);
        assert!(!c.single_port);
        assert!(config(&["--single-port"]).single_port);
        assert_eq!(c.workers, 1);
        assert!(c.udp_gso);
        assert_eq!(c.busy_poll, 50);
        assert_eq!(config(&["--busy-poll", "0"]).busy_poll, 0);
        assert_eq!(config(&["--busy-poll", "50"]).busy_poll, 50);
        assert!(parse_args(&args(&["--busy-poll", "20000"])).is_err());
        assert!(!config(&["--udp-gso", "off"]).udp_gso);
        assert_eq!(config(&["--workers", "2"]).workers, 2);
        for bad in ["0", "1025", "two"] {
            let err = parse_args(&args(&["--workers", bad]))
                .err()
                .unwrap_or_default();
            assert!(
                err.contains("invalid value for --workers"),
                "{bad:?}: {err}"
            );
        }
        let file = File::new("single", "single-port = true\n");
        assert!(config(&["--config", file.arg()]).single_port);
        let file = File::new("single-bad", "single-port = yes\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(err.contains(":1: invalid value for single-port"), "{err}");
        let text = c.to_file_text();
        for line in [
            "rate-limit = 2.5\n",
            "rate-burst = 20\n",
            "max-per-client = 0\n",
            "adaptive-timeout = off\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        for bad in [
            &["--rate-limit", "-1"][..],
            &["--rate-limit", "inf"],
            &["--rate-burst", "0"],
            &["--max-per-client", "x"],
            &["--adaptive-timeout", "maybe"],
        ] {
            let err = parse_args(&args(bad)).err().unwrap_or_default();
            assert!(
                err.contains(&format!("invalid value for {}", bad[0])),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn remapping_and_cache_settings() {
        let c = config(&[]);
        assert!(!c.ignore_case && !c.unique_root && !c.lowercase);
        assert!(c.strip_prefix.is_empty());
        assert_eq!(c.cache, 0);
        let file = File::new(
            "remap",
            "strip-prefix = /tftpboot\nstrip-prefix = boot\nignore-case = true\ncache = 2M\n",
        );
        let c = config(&["--config", file.arg(), "--unique-root", "--lowercase"]);
        assert_eq!(c.strip_prefix, ["/tftpboot", "boot"]);
        assert!(c.ignore_case && c.unique_root && c.lowercase);
        assert_eq!(c.cache, 2 << 20);
        // Flags replace the file's prefixes, as --listen replaces its addresses.
        let c = config(&["--config", file.arg(), "--strip-prefix", "x"]);
        assert_eq!(c.strip_prefix, ["x"]);
        assert_eq!(config(&["--cache", "512K"]).cache, 512 << 10);
        assert_eq!(config(&["--cache", "1g"]).cache, 1 << 30);
        assert_eq!(config(&["--cache", "4096"]).cache, 4096);
        for bad in ["", "K", "-1", "1.5M", "99999999999G", "1T"] {
            let err = parse_args(&args(&["--cache", bad]))
                .err()
                .unwrap_or_default();
            assert!(err.contains("invalid value for --cache"), "{bad:?}: {err}");
        }
        let file = File::new("remap-bad", "lowercase = yes\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(err.contains(":1: invalid value for lowercase"), "{err}");
    }

    #[test]
    fn the_file_sets_everything_and_flags_override_it() {
        let file = File::new(
            "all",
            "# dyntftpd settings\n\
             \n\
             listen = 127.0.0.1:6969\n\
             listen = [::1]:6969\n\
             root = \"/srv/tftp boot\"\n\
             timeout = 2.5\n\
             retries = 7\n\
             max-blksize = 1428\n\
             max-window = 8\n\
             max-sessions = 100\n\
             stats-interval = 30\n\
             user = tftp\n\
             \x20 verbose = 1  \n\
             quiet = false\n\
             metrics-file = /var/lib/m.prom\n\
             log-format = json\n\
             log-file = /var/log/dyntftpd.log\n",
        );
        let c = config(&["--config", file.arg()]);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.root, PathBuf::from("/srv/tftp boot"));
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!((c.retries, c.max_blksize, c.max_window), (7, 1428, 8));
        assert_eq!(c.max_sessions, Some(100));
        assert_eq!(c.stats_interval, Duration::from_secs(30));
        assert_eq!(c.user.as_deref(), Some("tftp"));
        assert_eq!(c.log_level(), LevelFilter::Debug);
        assert_eq!(c.metrics_file, Some(PathBuf::from("/var/lib/m.prom")));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/dyntftpd.log")));

        let c = config(&[
            "-c",
            file.arg(),
            "-l",
            "127.0.0.2:69",
            "--retries",
            "1",
            "--log-format",
            "text",
            "-q",
        ]);
        assert_eq!(c.listen, vec!["127.0.0.2:69".parse().unwrap()]);
        assert_eq!(c.retries, 1);
        assert_eq!(c.max_blksize, 1428, "not overridden");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_level(), LevelFilter::Warn);
    }

    #[test]
    fn check_config_output_reads_back_the_same() {
        let file = File::new(
            "roundtrip",
            "listen = 127.0.0.1:69\nmax-sessions = 4\nquiet = true\n",
        );
        let Ok(Command::Print(text)) = parse_args(&args(&["-c", file.arg(), "--check-config"]))
        else {
            panic!()
        };
        let again = File::new("roundtrip2", &text);
        let Ok(Command::Print(text2)) = parse_args(&args(&["-c", again.arg(), "--check-config"]))
        else {
            panic!()
        };
        assert_eq!(text, text2);
        assert!(text.contains("max-sessions = 4\n") && text.contains("quiet = true\n"));
    }

    #[test]
    fn hardening_settings_from_flags_and_the_file_reach_the_library() {
        let c = config(&[]);
        assert_eq!(c.max_unverified_per_client, 4);
        assert_eq!(c.progress_timeout, Duration::from_secs(60));
        assert_eq!(c.window_memory, 256 << 20);
        assert_eq!(
            (c.single_port_max_blksize, c.single_port_max_window),
            (1468, 8)
        );
        let c = config(&[
            "--max-unverified-per-client",
            "2",
            "--progress-timeout",
            "30",
            "--window-memory",
            "64M",
            "--single-port-max-blksize",
            "65464",
            "--single-port-max-window",
            "64",
        ]);
        assert_eq!(c.max_unverified_per_client, 2);
        assert_eq!(c.progress_timeout, Duration::from_secs(30));
        assert_eq!(c.window_memory, 64 << 20);
        assert_eq!(
            (c.single_port_max_blksize, c.single_port_max_window),
            (65464, 64)
        );
        c.validate().expect("valid");
        // What --check-config prints reads back as the same settings.
        let file = File::new("hardening", &c.to_file_text());
        let again = config(&["--config", file.arg()]);
        assert_eq!(again.to_file_text(), c.to_file_text());
        for (flag, value) in [
            ("--progress-timeout", "0.5"),
            ("--window-memory", "1K"),
            ("--single-port-max-blksize", "7"),
            ("--single-port-max-window", "0"),
            ("--max-unverified-per-client", "-1"),
        ] {
            let err = parse_args(&args(&[flag, value])).err().unwrap();
            assert!(err.contains("invalid value for"), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn port_range_and_mtu_blksize_from_flags_and_the_file() {
        let c = config(&[]);
        assert_eq!((c.port_range, c.mtu_blksize), (None, true));
        let c = config(&["--port-range", "50000:50999", "--mtu-blksize", "off"]);
        assert_eq!((c.port_range, c.mtu_blksize), (Some((50000, 50999)), false));
        assert_eq!(
            config(&["--port-range", "69:69"]).port_range,
            Some((69, 69))
        );
        let text = c.to_file_text();
        assert!(
            text.contains("port-range = 50000:50999\n") && text.contains("mtu-blksize = off\n"),
            "{text}"
        );
        let file = File::new("ports", &text);
        let again = config(&["--config", file.arg()]);
        assert_eq!(again.to_file_text(), text);
        // The flag overrides the file.
        let c = config(&["--config", file.arg(), "--port-range", "7000:7001"]);
        assert_eq!(c.port_range, Some((7000, 7001)));
        for bad in [
            "0:10",
            "10:9",
            "1:65536",
            "50000",
            "50000-50999",
            ":",
            "a:b",
            "-1:5",
        ] {
            let err = parse_args(&args(&["--port-range", bad]))
                .err()
                .unwrap_or_default();
            assert!(
                err.contains("invalid value for --port-range") && err.contains("LOW:HIGH"),
                "{bad:?}: {err}"
            );
        }
        let err = parse_args(&args(&["--mtu-blksize", "yes"])).err().unwrap();
        assert!(err.contains("expected on or off"), "{err}");
        // Single-port mode has no session sockets: refused, also by --check-config.
        for check in [false, true] {
            let mut list = vec!["--single-port", "--port-range", "50000:50999"];
            if check {
                list.push("--check-config");
            }
            let err = parse_args(&args(&list)).err().unwrap_or_default();
            assert!(err.contains("single-port mode"), "{list:?}: {err}");
        }
    }

    #[test]
    fn limit_loopback_from_the_flag_and_the_file() {
        assert!(!config(&[]).limit_loopback);
        assert!(config(&["--limit-loopback"]).limit_loopback);
        let file = File::new("loopback", "limit-loopback = true\n");
        let c = config(&["--config", file.arg()]);
        assert!(c.limit_loopback);
        assert!(c.to_file_text().contains("limit-loopback = true\n"));
        let file = File::new("loopback-bad", "limit-loopback = on\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(
            err.contains(":1: invalid value for limit-loopback"),
            "{err}"
        );
    }

    #[test]
    fn intervals_have_floors() {
        assert_eq!(
            config(&["--timeout", "0.01"]).timeout,
            Duration::from_millis(10)
        );
        assert_eq!(
            config(&["--stats-interval", "1"]).stats_interval,
            Duration::from_secs(1)
        );
        for (flag, value, floor) in [
            ("--timeout", "0.009", "at least 10ms"),
            ("--timeout", "1e-300", "at least 10ms"),
            ("--timeout", "1e-9", "at least 10ms"),
            ("--stats-interval", "0.5", "at least 1s"),
            ("--stats-interval", "1e-9", "at least 1s"),
        ] {
            for check in [false, true] {
                let mut list = vec![flag, value];
                if check {
                    list.push("--check-config");
                }
                let err = parse_args(&args(&list)).err().unwrap_or_default();
                assert!(
                    err.contains(&format!("invalid value for {flag}")) && err.contains(floor),
                    "{list:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn check_config_runs_the_server_library_checks() {
        let mut c = config(&[]);
        assert_eq!(c.validate(), Ok(()));
        // A value the file syntax cannot produce, to see that the library's own check
        // runs: it is what start-up runs too.
        c.timeout = Duration::ZERO;
        let err = c.validate().unwrap_err();
        assert!(err.contains("timeout must be more than zero"), "{err}");
    }

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let file = File::new("bom", "\u{feff}retries = 9\n");
        assert_eq!(config(&["--config", file.arg()]).retries, 9);
        // Only at the very start.
        let file = File::new("bom-late", "retries = 9\n\u{feff}timeout = 2\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(err.contains(":2: unknown setting"), "{err}");
    }

    #[test]
    fn only_small_regular_configuration_files_are_read() {
        for (path, why) in [
            ("/dev/zero", "not a regular file"),
            ("/dev/null", "not a regular file"),
            ("/", "not a regular file"),
        ] {
            let err = parse_args(&args(&["--config", path])).err().unwrap();
            assert!(
                err.contains("cannot read") && err.contains(why),
                "{path}: {err}"
            );
        }
        let big = File::new("big", &"# comment\n".repeat(110_000));
        let err = parse_args(&args(&["--config", big.arg()])).err().unwrap();
        assert!(err.contains("more than the 1048576"), "{err}");
        let fits = File::new("fits", &"#".repeat(MAX_CONFIG_BYTES as usize));
        assert!(parse_args(&args(&["--config", fits.arg()])).is_ok());
    }

    #[test]
    fn arguments_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStringExt;
        let good = utf8_args([OsString::from("-r"), OsString::from("/tmp/é")]).unwrap();
        assert_eq!(good, ["-r", "/tmp/é"]);
        let bad = utf8_args([
            OsString::from("-r"),
            OsString::from_vec(b"/tmp/\xff".to_vec()),
        ])
        .unwrap_err();
        assert!(
            bad.contains("not valid UTF-8") && bad.contains("/tmp/\u{fffd}"),
            "{bad}"
        );
    }

    #[test]
    fn file_errors_name_the_file_and_line() {
        for (text, line, needle) in [
            ("retries = 3\nbogus = 1\n", 2, "unknown setting \"bogus\""),
            (
                "\n\nmax-blksize = 7\n",
                3,
                "invalid value for max-blksize: \"7\"",
            ),
            ("root\n", 1, "expected `key = value`"),
            ("timeout = 1\ntimeout = 2\n", 2, "already set on line 1"),
            ("listen = nowhere\n", 1, "invalid value for listen"),
            ("quiet = maybe\n", 1, "invalid value for quiet"),
            ("root = \"/srv\n", 1, "unterminated quote"),
            ("config = /etc/x\n", 1, "unknown setting \"config\""),
            ("quiet = true\nverbose = 2\n", 0, "exclude each other"),
        ] {
            let file = File::new("bad", text);
            let err = parse_args(&args(&["--config", file.arg()]))
                .err()
                .unwrap_or_default();
            let place = format!("{}:{line}: ", file.arg());
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(line == 0 || err.starts_with(&place), "{text:?}: {err}");
        }
    }
}
