//! dyntftpd's settings: command-line flags and the `--config` file, a TOML file whose
//! top-level keys are the long flags' names. Flags override the file.

mod file;

pub(crate) use file::read_bounded;
use file::{kind, read_config_file, SETTINGS};

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

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
    /// Microseconds to poll without sleeping while sessions run; `None`: the library's
    /// default for the CPU quota.
    pub busy_poll: Option<u64>,
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
    /// The HTTP(S) repository names not found under `root` come from.
    pub upstream: Option<String>,
    /// The timeout of the repository's requests.
    pub upstream_timeout: Duration,
    /// Bytes of the repository's files kept in memory; 0 for no cache.
    pub upstream_cache: u64,
    /// Threads that fetch from the repository.
    pub upstream_workers: usize,
    /// The longest a request waits for a dynamic source before it gets ERROR 0.
    pub open_timeout: Duration,
    pub stats_interval: Duration,
    pub user: Option<String>,
    pub verbose: u32,
    pub quiet: bool,
    pub metrics_file: Option<PathBuf>,
    /// Where `/metrics` and `/healthz` are served over HTTP.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_file: Option<PathBuf>,
    /// The `--config` file's path and text (without a byte-order mark): its `rule`,
    /// `inventory` and `host` entries are the router's, which parses them itself.
    #[allow(dead_code, reason = "read by the router")]
    pub config_file: Option<(PathBuf, String)>,
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
            busy_poll: None,
            single_port: false,
            port_range: None,
            mtu_blksize: true,
            workers: 1,
            ignore_case: false,
            unique_root: false,
            lowercase: false,
            strip_prefix: Vec::new(),
            cache: DEFAULT_CACHE,
            upstream: None,
            upstream_timeout: Duration::from_secs(10),
            upstream_cache: 256 << 20,
            upstream_workers: 16,
            open_timeout: dyntftp::SessionConfig::default().open_timeout,
            stats_interval: Duration::from_secs(60),
            user: None,
            verbose: 0,
            quiet: false,
            metrics_file: None,
            metrics_listen: None,
            log_format: LogFormat::Text,
            log_file: None,
            config_file: None,
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

    /// Sets the setting `key` (a long flag's name) from `text`. On a bad value, says why:
    /// `invalid value for {name}: {shown}`, with `name` and `shown` as the user wrote them
    /// (`--timeout` and `"abc"` for a flag, `timeout` and `true` in the file).
    fn set(&mut self, key: &str, text: &str, name: &str, shown: &str) -> Result<(), String> {
        let bad = || format!("invalid value for {name}: {shown}");
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
            "busy-poll" => {
                self.busy_poll = Some(number(text, |n: &u64| *n <= 10_000).ok_or_else(bad)?)
            }
            "workers" => {
                self.workers = number(text, |n: &usize| (1..=1024).contains(n)).ok_or_else(bad)?
            }
            "cache" | "upstream-cache" => {
                let size = bytes(text).ok_or_else(|| {
                    format!(
                        "{} (expected bytes, e.g. 0, 65536, 512K, 256M or 2G)",
                        bad()
                    )
                })?;
                match key {
                    "cache" => self.cache = size,
                    _ => self.upstream_cache = size,
                }
            }
            "upstream" => {
                if !http_url(text) {
                    return Err(format!(
                        "{} (expected an http:// or https:// URL, e.g. http://repo.example/boot/)",
                        bad()
                    ));
                }
                self.upstream = Some(text.to_string());
            }
            "upstream-timeout" => {
                self.upstream_timeout = seconds(text, MIN_UPSTREAM_TIMEOUT)
                    .ok_or_else(|| format!("{} (at least {MIN_UPSTREAM_TIMEOUT:?})", bad()))?
            }
            "upstream-workers" => {
                self.upstream_workers =
                    number(text, |n: &usize| (1..=256).contains(n)).ok_or_else(bad)?
            }
            "open-timeout" => {
                self.open_timeout = seconds(text, MIN_OPEN_TIMEOUT)
                    .ok_or_else(|| format!("{} (at least {MIN_OPEN_TIMEOUT:?})", bad()))?
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
            _ if kind(key).is_some() => return Err(bad()),
            _ => return Err(format!("unknown setting {key:?}")),
        }
        Ok(())
    }

    /// Sets a flag's setting from its value on the command line.
    fn set_flag(&mut self, key: &str, text: &str) -> Result<(), String> {
        self.set(key, text, &format!("--{key}"), &format!("{text:?}"))
    }
}

/// An `http://` or `https://` URL with a host: printable ASCII, no spaces.
fn http_url(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"));
    rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && text.bytes().all(|b| b.is_ascii_graphic())
}

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

/// A byte count, with an optional K, M or G suffix (powers of 1024), at most
/// `i64::MAX` (the largest TOML integer, so that `--check-config` can print it).
pub(crate) fn bytes(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&text[..i], 1 << 20),
        (i, 'G' | 'g') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .ok()?
        .checked_mul(unit)
        .filter(|b| i64::try_from(*b).is_ok())
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

/// The default `--cache`: room for a kernel and an initrd, which every client of a boot
/// storm reads, served from memory instead of one `pread` per block.
pub const DEFAULT_CACHE: u64 = 128 << 20;

/// The shortest `--upstream-timeout`: as `--timeout`, more than zero.
pub const MIN_UPSTREAM_TIMEOUT: Duration = MIN_TIMEOUT;

/// The shortest `--open-timeout`: a dynamic source gets at least this long to open.
pub const MIN_OPEN_TIMEOUT: Duration = Duration::from_millis(100);

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
        "adaptive busy polling: while transfers run and datagrams keep coming within USECS, poll that long without sleeping before blocking (faster lock-step transfers for CPU time; 0..10000, 0: off; default 50, or 0 when the cgroup's CPU quota is below one CPU per worker)",
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
        "keep up to BYTES of served files in memory, reloaded when a file changes (suffix K, M or G; default 128M; 0: off)",
        "BYTES",
    );
    opts.optopt(
        "",
        "upstream",
        "names not found under --root come from this HTTP(S) repository, an http:// or https:// URL (default: none)",
        "URL",
    );
    opts.optopt(
        "",
        "upstream-timeout",
        "timeout in seconds of a request to the --upstream repository (default 10, at least 0.01)",
        "SECS",
    );
    opts.optopt(
        "",
        "upstream-cache",
        "keep up to BYTES of the --upstream repository's files in memory (suffix K, M or G; default 256M; 0: no cache)",
        "BYTES",
    );
    opts.optopt(
        "",
        "upstream-workers",
        "threads fetching from the --upstream repository, 1..256 (default 16)",
        "N",
    );
    opts.optopt(
        "",
        "open-timeout",
        "longest time in seconds a request waits for a dynamic source (the repository) to open before it gets ERROR 0; nothing is sent meanwhile (default 2, at least 0.1; never longer than --progress-timeout)",
        "SECS",
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
        "c",
        "config",
        "read settings from FILE, a TOML file whose keys are the long flags' names (a regular file of at most 1 MiB); flags override it",
        "FILE",
    );
    opts.optflag(
        "",
        "check-config",
        "check the flags and the configuration file as start-up does, print the resulting settings and the router's rules, and exit",
    );
    opts.optopt(
        "",
        "dry-run",
        "print which rule would answer a request for NAME and what it would answer (the file, the rendered template, the URL), then exit without serving",
        "NAME",
    );
    opts.optopt(
        "",
        "dry-run-client",
        "the client address of the --dry-run request (default 127.0.0.1)",
        "IP",
    );
    opts.optopt(
        "",
        "dry-run-local",
        "the address the --dry-run request reaches (default: the first --listen address, else 127.0.0.1)",
        "IP",
    );
    opts.optopt(
        "",
        "dry-run-mac",
        "the client MAC of the --dry-run request (default: from NAME's per-machine forms, e.g. pxelinux.cfg/01-aa-bb-cc-dd-ee-ff)",
        "MAC",
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
    /// Print this text and exit 0 (help, version).
    Print(String),
    /// `--check-config`: print these settings and the router's rules, exit 0.
    Check(Box<Config>),
    /// `--dry-run`: print what would answer this request, exit 0.
    DryRun(Box<Config>, DryRunRequest),
}

/// The request `--dry-run` tries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunRequest {
    /// The name, as a client would send it.
    pub name: String,
    /// The client (port 0).
    pub client: SocketAddr,
    /// The address it reaches.
    pub local: SocketAddr,
    /// The client's MAC, when given.
    pub mac: Option<dyntftp::mac::MacAddr>,
}

/// The `--dry-run` flags, when `--dry-run` is given.
fn dry_run_request(m: &Matches, config: &Config) -> Result<Option<DryRunRequest>, String> {
    let Some(name) = m.opt_str("dry-run") else {
        for flag in ["dry-run-client", "dry-run-local", "dry-run-mac"] {
            if m.opt_present(flag) {
                return Err(format!("--{flag} needs --dry-run"));
            }
        }
        return Ok(None);
    };
    let ip = |flag: &str, default: std::net::IpAddr| match m.opt_str(flag) {
        None => Ok(default),
        Some(text) => text
            .parse::<std::net::IpAddr>()
            .map_err(|_| format!("invalid value for --{flag}: {text:?} (expected an IP address)")),
    };
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let listen = config.listen.first().copied();
    let local_default = listen
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(loopback);
    let local = SocketAddr::new(
        ip("dry-run-local", local_default)?,
        listen.map_or(69, |a| a.port()),
    );
    let mac = match m.opt_str("dry-run-mac") {
        None => None,
        Some(text) => Some(dyntftp::mac::MacAddr::parse(&text).ok_or_else(|| {
            format!("invalid value for --dry-run-mac: {text:?} (expected aa:bb:cc:dd:ee:ff)")
        })?),
    };
    Ok(Some(DryRunRequest {
        name,
        client: SocketAddr::new(ip("dry-run-client", loopback)?, 0),
        local,
        mac,
    }))
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
        // Editors on some systems start a UTF-8 file with a byte-order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text).to_string();
        config.apply_file(&path, &text)?;
        config.config_file = Some((path, text));
    }
    apply_flags(&mut config, &m)?;
    config.validate()?;
    let dry_run = dry_run_request(&m, &config)?;
    if m.opt_present("check-config") {
        if dry_run.is_some() {
            return Err("--check-config and --dry-run exclude each other".into());
        }
        return Ok(Command::Check(Box::new(config)));
    }
    if let Some(request) = dry_run {
        return Ok(Command::DryRun(Box::new(config), request));
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
            .open_timeout(self.open_timeout)
            .window_memory(usize::try_from(self.window_memory).unwrap_or(usize::MAX))
            .single_port_limits(Limits {
                max_blksize: self.single_port_max_blksize,
                max_window: self.single_port_max_window,
                max_window_bytes: self.single_port_max_window as usize
                    * self.single_port_max_blksize as usize,
            })
            .adaptive_timeout(self.adaptive_timeout)
            .udp_gso(self.udp_gso)
            .single_port(self.single_port)
            .mtu_blksize(self.mtu_blksize)
            .stats_interval(self.stats_interval);
        if let Some(spin) = self.busy_poll {
            builder = builder.busy_poll(Duration::from_micros(spin));
        }
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
    for (key, _) in SETTINGS {
        match key {
            "verbose" | "quiet" => continue,
            // Flags without a value.
            "single-port" | "ignore-case" | "unique-root" | "lowercase" | "limit-loopback" => {
                if m.opt_present(key) {
                    config.set_flag(key, "true")?;
                }
                continue;
            }
            "strip-prefix" if m.opt_present(key) => config.strip_prefix.clear(),
            "listen" if m.opt_present(key) => config.listen.clear(),
            _ => {}
        }
        for value in m.opt_strs(key) {
            config.set_flag(key, &value)?;
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
                .join(format!("dyntftpd-config-{tag}-{}.toml", std::process::id()));
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
        let file = File::new("scrape", "metrics-listen = \"127.0.0.1:9169\"\n");
        let c = config(&["--config", file.arg()]);
        assert_eq!(c.metrics_listen, "127.0.0.1:9169".parse().ok());
        let check = parse_args(&args(&["--check-config", "--config", file.arg()]));
        assert!(
            matches!(check, Ok(Command::Check(c)) if c.to_toml().unwrap().contains("metrics-listen = \"127.0.0.1:9169\"\n"))
        );
        for bad in ["9169", "localhost:9169", ""] {
            let err = parse_args(&args(&["--metrics-listen", bad]))
                .err()
                .unwrap_or_default();
            assert!(err.contains("--metrics-listen"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn dry_run_flags() {
        let Ok(Command::DryRun(_, request)) = parse_args(&args(&[
            "-l",
            "10.0.0.1:6969",
            "--dry-run",
            "pxelinux.0",
            "--dry-run-client",
            "10.0.0.5",
            "--dry-run-mac",
            "AA-BB-CC-DD-EE-01",
        ])) else {
            panic!()
        };
        assert_eq!(request.name, "pxelinux.0");
        assert_eq!(request.client, "10.0.0.5:0".parse().unwrap());
        assert_eq!(request.local, "10.0.0.1:6969".parse().unwrap());
        assert_eq!(request.mac.unwrap().to_string(), "aa:bb:cc:dd:ee:01");
        let Ok(Command::DryRun(_, request)) = parse_args(&args(&["--dry-run", "x"])) else {
            panic!()
        };
        assert_eq!(request.client, "127.0.0.1:0".parse().unwrap());
        assert_eq!(request.local, "127.0.0.1:69".parse().unwrap());
        assert_eq!(request.mac, None);
        for (list, why) in [
            (
                &["--dry-run-client", "10.0.0.5"][..],
                "--dry-run-client needs --dry-run",
            ),
            (
                &["--dry-run", "x", "--dry-run-client", "h"],
                "invalid value for --dry-run-client",
            ),
            (
                &["--dry-run", "x", "--dry-run-mac", "aa:bb"],
                "invalid value for --dry-run-mac",
            ),
            (&["--dry-run", "x", "--check-config"], "exclude each other"),
        ] {
            let err = parse_args(&args(list)).err().unwrap_or_default();
            assert!(err.contains(why), "{list:?}: {err}");
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
            matches!(parse_args(&args(&["--check-config", "--retries", "9"])), Ok(Command::Check(c)) if c.to_toml().unwrap().contains("retries = 9\n"))
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
            "rate-limit = 2.5\nrate-burst = 10\nmax-per-client = 0\nadaptive-timeout = \"off\"\n",
        );
        let c = config(&["--config", file.arg(), "--rate-burst", "20"]);
        assert_eq!((c.rate_limit, c.rate_burst, c.max_per_client), (2.5, 20, 0));
        assert!(!c.adaptive_timeout);
        assert!(!c.single_port);
        assert!(config(&["--single-port"]).single_port);
        assert_eq!(c.workers, 1);
        assert!(c.udp_gso);
        assert_eq!(c.busy_poll, None);
        assert_eq!(config(&["--busy-poll", "0"]).busy_poll, Some(0));
        assert_eq!(config(&["--busy-poll", "50"]).busy_poll, Some(50));
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
        let file = File::new("single-bad", "single-port = \"yes\"\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(
            err.contains(": line 1, column 15: invalid value for single-port: \"yes\""),
            "{err}"
        );
        let text = c.to_toml().unwrap();
        for line in [
            "rate-limit = 2.5\n",
            "rate-burst = 20\n",
            "max-per-client = 0\n",
            "adaptive-timeout = false\n",
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
        assert_eq!(c.cache, DEFAULT_CACHE);
        assert_eq!(config(&["--cache", "0"]).cache, 0);
        let file = File::new(
            "remap",
            "strip-prefix = [\"/tftpboot\", \"boot\"]\nignore-case = true\ncache = \"2M\"\n",
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
        for bad in [
            "",
            "K",
            "-1",
            "1.5M",
            "99999999999G",
            "1T",
            "9223372036854775808",
        ] {
            let err = parse_args(&args(&["--cache", bad]))
                .err()
                .unwrap_or_default();
            assert!(err.contains("invalid value for --cache"), "{bad:?}: {err}");
        }
        let file = File::new("remap-bad", "lowercase = \"yes\"\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(
            err.contains(": line 1, column 13: invalid value for lowercase"),
            "{err}"
        );
        // One prefix may be a plain string.
        let file = File::new("remap-one", "strip-prefix = \"/tftpboot/\"\n");
        assert_eq!(config(&["-c", file.arg()]).strip_prefix, ["/tftpboot/"]);
    }

    #[test]
    fn the_file_sets_everything_and_flags_override_it() {
        let file = File::new(
            "all",
            "# dyntftpd settings\n\
             \n\
             listen = [\"127.0.0.1:6969\", \"[::1]:6969\"]\n\
             root = \"/srv/tftp boot\"\n\
             timeout = 2.5\n\
             retries = 7\n\
             max-blksize = 1428\n\
             max-window = 8\n\
             max-sessions = 100\n\
             stats-interval = 30\n\
             user = 'tftp'\n\
             \x20 verbose = 1  # a comment\n\
             quiet = false\n\
             metrics-file = \"/var/lib/m.prom\"\n\
             log-format = \"json\"\n\
             log-file = \"/var/log/dyntftpd.log\"\n",
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
            "listen = \"127.0.0.1:69\"\nmax-sessions = 4\nquiet = true\n",
        );
        let Ok(Command::Check(config)) = parse_args(&args(&["-c", file.arg(), "--check-config"]))
        else {
            panic!()
        };
        let text = config.to_toml().unwrap();
        let again = File::new("roundtrip2", &text);
        let Ok(Command::Check(config)) = parse_args(&args(&["-c", again.arg(), "--check-config"]))
        else {
            panic!()
        };
        let text2 = config.to_toml().unwrap();
        assert_eq!(text, text2);
        assert!(text.contains("max-sessions = 4\n") && text.contains("quiet = true\n"));
        assert!(text.contains("listen = [\"127.0.0.1:69\"]\n"), "{text}");
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
        let file = File::new("hardening", &c.to_toml().unwrap());
        let again = config(&["--config", file.arg()]);
        assert_eq!(again.to_toml(), c.to_toml());
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
        let text = c.to_toml().unwrap();
        assert!(
            text.contains("port-range = \"50000:50999\"\n")
                && text.contains("mtu-blksize = false\n"),
            "{text}"
        );
        let file = File::new("ports", &text);
        let again = config(&["--config", file.arg()]);
        assert_eq!(again.to_toml().unwrap(), text);
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
        assert!(c.to_toml().unwrap().contains("limit-loopback = true\n"));
        let file = File::new("loopback-bad", "limit-loopback = \"on\"\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(
            err.contains(": line 1, column 18: invalid value for limit-loopback: \"on\" (expected true or false)"),
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
        // The open timeout reaches the library too.
        let mut c = config(&[]);
        c.open_timeout = Duration::ZERO;
        let err = c.validate().unwrap_err();
        assert!(err.contains("open timeout must be more than zero"), "{err}");
    }

    #[test]
    fn a_byte_order_mark_is_accepted() {
        let file = File::new("bom", "\u{feff}retries = 9\n");
        let c = config(&["--config", file.arg()]);
        assert_eq!(c.retries, 9);
        // The router gets the text without it.
        assert_eq!(
            c.config_file,
            Some((file.0.clone(), "retries = 9\n".to_string()))
        );
        // Only at the very start.
        let file = File::new("bom-late", "retries = 9\n\u{feff}timeout = 2\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(
            err.starts_with(&format!("{}: line 2, column 1: ", file.arg())),
            "{err}"
        );
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
    fn file_errors_name_the_file_line_and_column() {
        for (text, place, needle) in [
            (
                "retries = 3\n\nfoo = 1\n",
                "3, column 1",
                "unknown key \"foo\"",
            ),
            (
                "\n\nmax-blksize = 7\n",
                "3, column 15",
                "invalid value for max-blksize: 7",
            ),
            ("root\n", "1, column 5", "expected"),
            ("timeout = 1\ntimeout = 2\n", "2, column 1", "duplicate key"),
            (
                "listen = \"nowhere\"\n",
                "1, column 10",
                "invalid value for listen: \"nowhere\" (expected ADDR:PORT",
            ),
            (
                "listen = [\"127.0.0.1:69\", \"nowhere\"]\n",
                "1, column 10",
                "invalid value for listen: \"nowhere\"",
            ),
            (
                "quiet = \"maybe\"\n",
                "1, column 9",
                "invalid value for quiet: \"maybe\" (expected true or false)",
            ),
            ("root = \"/srv\n", "1, column", "invalid basic string"),
            (
                "config = \"/etc/x\"\n",
                "1, column 1",
                "unknown key \"config\"",
            ),
            (
                "retries = 1.5\n",
                "1, column 11",
                "invalid value for retries: 1.5 (expected an integer)",
            ),
            (
                "retries = -1\n",
                "1, column 11",
                "invalid value for retries: -1",
            ),
            (
                "timeout = \"2\"\n",
                "1, column 11",
                "invalid value for timeout: \"2\" (expected a number)",
            ),
            (
                "[upstream]\ntimeout = 5\n",
                "1, column 1",
                "invalid value for upstream: ",
            ),
            ("[listen]\n", "1, column 1", "invalid value for listen"),
            (
                "cache = 1.5\n",
                "1, column 9",
                "(expected an integer or a string such as \"64M\")",
            ),
            (
                "strip-prefix = [[\"a\"]]\n",
                "1, column 16",
                "(expected a string or an array of strings)",
            ),
            // Unicode before the mistake: the column counts characters.
            (
                "root = \"/srv/é\" \nverbose = 3\n",
                "2, column 11",
                "invalid value for verbose: 3",
            ),
            ("user = \"é\"; x = 1\n", "1, column 11", "expected"),
        ] {
            let file = File::new("bad", text);
            let err = parse_args(&args(&["--config", file.arg()]))
                .err()
                .unwrap_or_default();
            assert!(
                err.starts_with(&format!("{}: line {place}", file.arg())),
                "{text:?}: {err}"
            );
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
        let file = File::new("both", "quiet = true\nverbose = 2\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(err.contains("exclude each other"), "{err}");
    }

    #[test]
    fn an_unknown_key_error_has_the_documented_shape() {
        let file = File::new("unknown", "root = \"/srv\"\n# two\nfoo = 1\n");
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert_eq!(
            err,
            format!("{}: line 3, column 1: unknown key \"foo\"", file.arg())
        );
    }

    #[test]
    fn a_file_in_the_old_format_is_told_about_toml() {
        for (text, fix) in [
            ("root = /srv/tftp\n", "root = \"/srv/tftp\""),
            ("# old\nretries = 3\ncache = 2M\n", "cache = \"2M\""),
            ("listen = 127.0.0.1:69\n", "listen = [\"127.0.0.1:69\"]"),
            ("adaptive-timeout = off\n", "adaptive-timeout = \"off\""),
            ("log-file = C:\\log\n", "log-file = 'C:\\log'"),
        ] {
            let file = File::new("old", text);
            let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
            assert!(
                err.contains("the configuration file is TOML"),
                "{text:?}: {err}"
            );
            assert!(err.contains(&format!("e.g. {fix})")), "{text:?}: {err}");
            // The suggestion itself reads.
            let fixed = File::new("old-fixed", &format!("{fix}\n"));
            assert!(
                parse_args(&args(&["--config", fixed.arg()])).is_ok(),
                "{fix}"
            );
        }
        // Other TOML mistakes get no such hint: not a setting, a quoted value, a number.
        for text in [
            "[[rule]\n",
            "root = \"/srv\n",
            "timeout = 1.5.3\n",
            "bogus = x\n",
        ] {
            let file = File::new("not-old", text);
            let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
            assert!(!err.contains("is TOML"), "{text:?}: {err}");
        }
        // The old format repeated listen and strip-prefix lines.
        let file = File::new(
            "old-repeated",
            "strip-prefix = \"/a\"\nstrip-prefix = \"/b\"\n",
        );
        let err = parse_args(&args(&["--config", file.arg()])).err().unwrap();
        assert!(
            err.contains("line 2, column 1: duplicate key (strip-prefix takes several values as one array, e.g. strip-prefix = [\"a\", \"b\"])"),
            "{err}"
        );
    }

    #[test]
    fn file_values_go_through_the_flags_checks() {
        // (key, the value in the file, the same value as a flag): both refused, for the
        // same reason.
        for (key, in_file, as_flag) in [
            ("timeout", "0.001", "0.001"),
            ("timeout", "nan", "NaN"),
            ("timeout", "100000", "100000"),
            ("progress-timeout", "0.5", "0.5"),
            ("stats-interval", "0", "0"),
            ("max-blksize", "65465", "65465"),
            ("max-window", "0", "0"),
            ("max-sessions", "0", "0"),
            ("retries", "1001", "1001"),
            ("rate-limit", "-1", "-1"),
            ("rate-burst", "0", "0"),
            ("max-per-client", "-1", "-1"),
            ("window-memory", "\"1K\"", "1K"),
            ("window-memory", "1024", "1024"),
            ("single-port-max-blksize", "7", "7"),
            ("single-port-max-window", "0", "0"),
            ("adaptive-timeout", "\"maybe\"", "maybe"),
            ("udp-gso", "\"yes\"", "yes"),
            ("busy-poll", "10001", "10001"),
            ("port-range", "\"10:9\"", "10:9"),
            ("mtu-blksize", "\"1\"", "1"),
            ("workers", "1025", "1025"),
            ("cache", "\"1T\"", "1T"),
            ("cache", "-1", "-1"),
            ("upstream", "\"ftp://repo/\"", "ftp://repo/"),
            ("upstream", "\"http://\"", "http://"),
            ("upstream", "\"http:///path\"", "http:///path"),
            ("upstream", "\"http://repo/a b\"", "http://repo/a b"),
            ("upstream-timeout", "0", "0"),
            ("upstream-cache", "\"2X\"", "2X"),
            ("upstream-workers", "0", "0"),
            ("upstream-workers", "257", "257"),
            ("open-timeout", "0.05", "0.05"),
            ("metrics-listen", "\"9169\"", "9169"),
            ("log-format", "\"yaml\"", "yaml"),
            ("metrics-file", "\"/var/lib/\"", "/var/lib/"),
            ("root", "\"\"", ""),
        ] {
            let file = File::new("same", &format!("{key} = {in_file}\n"));
            let from_file = parse_args(&args(&["--config", file.arg()]))
                .err()
                .unwrap_or_default();
            let flag = format!("--{key}");
            let from_flag = parse_args(&args(&[&flag, as_flag]))
                .err()
                .unwrap_or_default();
            let file_why = from_file
                .split_once(&format!("invalid value for {key}: {in_file}"))
                .map(|(_, why)| why);
            let flag_why = from_flag
                .split_once(&format!("invalid value for {flag}: {as_flag:?}"))
                .map(|(_, why)| why);
            assert!(
                file_why.is_some() && file_why == flag_why,
                "{key}: {from_file} | {from_flag}"
            );
        }
        // -v counts; the file's verbose is 0, 1 or 2.
        let file = File::new("verbose", "verbose = 3\n");
        let err = parse_args(&args(&["-c", file.arg()])).err().unwrap();
        assert!(err.ends_with("invalid value for verbose: 3"), "{err}");
    }

    #[test]
    fn upstream_and_open_timeout_settings() {
        let c = config(&[]);
        assert_eq!(c.upstream, None);
        assert_eq!(c.upstream_timeout, Duration::from_secs(10));
        assert_eq!(c.upstream_cache, 256 << 20);
        assert_eq!(c.upstream_workers, 16);
        assert_eq!(c.open_timeout, Duration::from_secs(2));
        let file = File::new(
            "upstream",
            "upstream = \"https://repo.example/boot/\"\nupstream-timeout = 2.5\n\
             upstream-cache = \"64M\"\nupstream-workers = 4\nopen-timeout = 0.1\n",
        );
        let c = config(&["-c", file.arg()]);
        assert_eq!(c.upstream.as_deref(), Some("https://repo.example/boot/"));
        assert_eq!(c.upstream_timeout, Duration::from_millis(2500));
        assert_eq!(c.upstream_cache, 64 << 20);
        assert_eq!(c.upstream_workers, 4);
        assert_eq!(c.open_timeout, Duration::from_millis(100));
        // Flags override the file.
        let c = config(&[
            "-c",
            file.arg(),
            "--upstream",
            "HTTP://other:8080",
            "--upstream-cache",
            "0",
            "--upstream-workers",
            "256",
            "--open-timeout",
            "3",
            "--upstream-timeout",
            "0.01",
        ]);
        assert_eq!(c.upstream.as_deref(), Some("HTTP://other:8080"));
        assert_eq!((c.upstream_cache, c.upstream_workers), (0, 256));
        assert_eq!(c.open_timeout, Duration::from_secs(3));
        assert_eq!(c.upstream_timeout, Duration::from_millis(10));
        let text = c.to_toml().unwrap();
        for line in [
            "upstream = \"HTTP://other:8080\"\n",
            "upstream-cache = 0\n",
            "upstream-workers = 256\n",
            "open-timeout = 3.0\n",
            "upstream-timeout = 0.01\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        let err = parse_args(&args(&["--open-timeout", "0.09"]))
            .err()
            .unwrap();
        assert!(err.contains("(at least 100ms)"), "{err}");
    }

    #[test]
    fn every_setting_is_printed_and_reads_back() {
        // Every setting away from its default, every optional one present.
        let c = config(&[
            "-l",
            "127.0.0.1:6969",
            "-l",
            "[::1]:6969",
            "-r",
            "/srv/tftp \"boot\"",
            "--timeout",
            "0.3",
            "--retries",
            "9",
            "--max-blksize",
            "1400",
            "--max-window",
            "4",
            "--max-sessions",
            "77",
            "--rate-limit",
            "0.5",
            "--rate-burst",
            "3",
            "--max-per-client",
            "0",
            "--max-unverified-per-client",
            "1",
            "--limit-loopback",
            "--progress-timeout",
            "12.5",
            "--window-memory",
            "1G",
            "--single-port-max-blksize",
            "512",
            "--single-port-max-window",
            "2",
            "--adaptive-timeout",
            "off",
            "--udp-gso",
            "off",
            "--busy-poll",
            "0",
            "--port-range",
            "7000:7100",
            "--mtu-blksize",
            "off",
            "--workers",
            "3",
            "--ignore-case",
            "--unique-root",
            "--lowercase",
            "--strip-prefix",
            "/tftpboot/",
            "--strip-prefix",
            "boot\\",
            "--cache",
            "9223372036854775807",
            "--upstream",
            "http://repo/{x}?a=\"b\"",
            "--upstream-timeout",
            "1e-2",
            "--upstream-cache",
            "1K",
            "--upstream-workers",
            "1",
            "--open-timeout",
            "86400",
            "--stats-interval",
            "1.25",
            "-u",
            "tftp",
            "--metrics-file",
            "/run/m.prom",
            "--metrics-listen",
            "[::1]:9169",
            "--log-format",
            "json",
            "--log-file",
            "/var/log/dyntftpd.log",
            "-vv",
        ]);
        let text = c.to_toml().unwrap();
        let printed: toml::Table = toml::from_str(&text).unwrap();
        let keys: Vec<&str> = printed.keys().map(String::as_str).collect();
        let mut all: Vec<&str> = SETTINGS.iter().map(|(k, _)| *k).collect();
        all.sort_unstable();
        assert_eq!(keys, all, "every setting, once");
        let file = File::new("everything", &text);
        let again = config(&["-c", file.arg()]);
        assert_eq!(again.to_toml().unwrap(), text);
        // Field by field, not only through the printer.
        let mut again = again;
        again.config_file = None;
        assert_eq!(format!("{again:?}"), format!("{c:?}"));
        // Only the settings: the default file is empty of optional keys.
        let default = config(&[]).to_toml().unwrap();
        for key in ["listen", "max-sessions", "port-range", "upstream =", "user"] {
            assert!(!default.contains(key), "{key} in {default}");
        }
    }

    #[test]
    fn the_routers_keys_are_accepted_and_the_file_is_kept() {
        let text = "root = \"/srv\"\ninventory = \"/etc/dyntftpd/hosts.toml\"\n\n\
                    [[rule]]\nfilename = \"grub/*\"\nbogus = 1\n\n[[rule]]\nempty = true\n\n\
                    [host.\"aa:bb:cc:dd:ee:ff\"]\nname = \"node1\"\n";
        let file = File::new("router", text);
        let c = config(&["-c", file.arg()]);
        assert_eq!(c.root, PathBuf::from("/srv"));
        assert_eq!(c.config_file, Some((file.0.clone(), text.to_string())));
        assert_eq!(config(&[]).config_file, None);
        // The settings still come before the tables: a setting after one is inside it.
        let file = File::new("router-late", "[[rule]]\nempty = true\n");
        assert!(parse_args(&args(&["-c", file.arg()])).is_ok());
    }
}
