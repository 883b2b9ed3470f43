//! `dyntftpd`: serves a directory over TFTP (read requests only) with the dyntftp event loop.

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use dyntftp::{FsHandler, ServerBuilder};
use getopts::Options;
use log::{error, info, LevelFilter};

/// Exit code for a bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit code for a failure to start or run.
const EXIT_FAILURE: u8 = 1;

struct Config {
    listen: Vec<SocketAddr>,
    root: PathBuf,
    timeout: Duration,
    retries: u32,
    max_blksize: u16,
    max_window: u16,
    max_sessions: Option<usize>,
    stats_interval: Duration,
    user: Option<String>,
    log_level: LevelFilter,
}

fn options() -> Options {
    let mut opts = Options::new();
    opts.optmulti(
        "l",
        "listen",
        "address and port to listen on (repeatable; default [::]:69, dual-stack, or 0.0.0.0:69 without IPv6)",
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
        "base retransmission timeout in seconds, fractions allowed (default 1)",
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
        "stats-interval",
        "seconds between server statistics log lines (default 60)",
        "SECS",
    );
    opts.optopt(
        "u",
        "user",
        "drop privileges to this user after binding",
        "NAME",
    );
    opts.optflagmulti("v", "verbose", "more logging: -v debug, -vv trace");
    opts.optflag("q", "quiet", "log warnings and errors only");
    opts.optflag("h", "help", "print this help and exit");
    opts.optflag("V", "version", "print the version and exit");
    opts
}

fn usage(opts: &Options) -> String {
    opts.usage("Usage: dyntftpd [options]\n\nServes the files under a directory over TFTP (RFC 1350, 2347, 2348, 2349, 7440), read requests only.")
}

/// Parses `value` of flag `name`, or says why not.
fn parse<T: FromStr>(
    name: &str,
    value: Option<String>,
    check: impl Fn(&T) -> bool,
) -> Result<Option<T>, String> {
    match value {
        None => Ok(None),
        Some(text) => match text.parse::<T>() {
            Ok(v) if check(&v) => Ok(Some(v)),
            _ => Err(format!("invalid value for --{name}: {text:?}")),
        },
    }
}

fn seconds(name: &str, value: Option<String>, default: f64) -> Result<Duration, String> {
    let secs = parse::<f64>(name, value, |s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)?;
    Ok(Duration::from_secs_f64(secs.unwrap_or(default)))
}

fn parse_args(args: &[String]) -> Result<Result<Config, String>, String> {
    let opts = options();
    let m = opts.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("h") {
        return Ok(Err(usage(&opts)));
    }
    if m.opt_present("V") {
        return Ok(Err(format!("dyntftpd {}", env!("CARGO_PKG_VERSION"))));
    }
    if let Some(extra) = m.free.first() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    let mut listen = Vec::new();
    for text in m.opt_strs("l") {
        let addr = text
            .parse::<SocketAddr>()
            .map_err(|_| format!("invalid value for --listen: {text:?} (expected ADDR:PORT, e.g. 0.0.0.0:69 or [::]:69)"))?;
        listen.push(addr);
    }
    let log_level = match (m.opt_present("q"), m.opt_count("v")) {
        (true, 0) => LevelFilter::Warn,
        (true, _) => return Err("--quiet and --verbose exclude each other".into()),
        (false, 0) => LevelFilter::Info,
        (false, 1) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    };
    Ok(Ok(Config {
        listen,
        root: m
            .opt_str("r")
            .map_or_else(|| PathBuf::from("."), PathBuf::from),
        timeout: seconds("timeout", m.opt_str("timeout"), 1.0)?,
        retries: parse("retries", m.opt_str("retries"), |n: &u32| *n <= 1000)?.unwrap_or(5),
        max_blksize: parse("max-blksize", m.opt_str("max-blksize"), |n: &u16| {
            (8..=65464).contains(n)
        })?
        .unwrap_or(65464),
        max_window: parse("max-window", m.opt_str("max-window"), |n: &u16| *n >= 1)?.unwrap_or(64),
        max_sessions: parse("max-sessions", m.opt_str("max-sessions"), |n: &usize| {
            *n >= 1
        })?,
        stats_interval: seconds("stats-interval", m.opt_str("stats-interval"), 60.0)?,
        user: m.opt_str("u"),
        log_level,
    }))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_args(&args) {
        Ok(Ok(config)) => config,
        Ok(Err(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            eprintln!("{}", options().short_usage("dyntftpd"));
            eprintln!("Try 'dyntftpd --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let _ = simplelog::TermLogger::init(
        config.log_level,
        simplelog::ConfigBuilder::new()
            .set_time_format_rfc3339()
            .set_target_level(LevelFilter::Off)
            .set_thread_level(LevelFilter::Off)
            .build(),
        simplelog::TerminalMode::Stderr,
        simplelog::ColorChoice::Never,
    );
    match serve(config) {
        Ok(code) => code,
        Err(why) => {
            error!("{why}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn serve(config: Config) -> Result<ExitCode, String> {
    // Block the shutdown signals before any thread starts, so only the signal thread
    // receives them.
    let signals = block_signals()?;
    let handler = FsHandler::new(&config.root)
        .map_err(|e| format!("cannot serve {}: {e}", config.root.display()))?;
    let mut builder = ServerBuilder::new(handler)
        .timeout(config.timeout)
        .retries(config.retries)
        .max_blksize(config.max_blksize)
        .max_window(config.max_window)
        .stats_interval(config.stats_interval);
    if let Some(max) = config.max_sessions {
        builder = builder.max_sessions(max);
    }
    let listen = if config.listen.is_empty() {
        // Dual-stack by default, IPv4 only where the host has no IPv6.
        let ipv6 = std::net::UdpSocket::bind("[::]:0").is_ok();
        vec![if ipv6 {
            SocketAddr::from(([0u16; 8], 69))
        } else {
            SocketAddr::from(([0u8; 4], 69))
        }]
    } else {
        config.listen.clone()
    };
    let builder = listen.iter().fold(builder, |b, addr| b.bind(*addr));
    let mut server = builder.build().map_err(|e| e.to_string())?;
    if let Some(user) = &config.user {
        drop_privileges(user)?;
    }
    info!(
        "serving {} on {} (max {} sessions)",
        config.root.display(),
        server
            .local_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        server.max_sessions()
    );
    let handle = server.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signals(signals, handle))
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    server.run().map_err(|e| e.to_string())?;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started later).
fn block_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: sigset_t is initialised by sigemptyset before use; pthread_sigmask only
    // reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(format!("cannot block signals: error {rc}"));
        }
        Ok(set)
    }
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once with status 1.
fn wait_for_signals(set: libc::sigset_t, handle: dyntftp::ShutdownHandle) {
    let mut first = true;
    loop {
        let mut signal = 0;
        // SAFETY: `set` is an initialised signal set and `signal` a valid out-pointer.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        if rc != 0 {
            continue;
        }
        if first {
            info!("signal {signal}: finishing running sessions (send it again to exit now)");
            handle.shutdown();
            first = false;
        } else {
            error!("second signal {signal}: exiting now");
            std::process::exit(EXIT_FAILURE as i32);
        }
    }
}

/// Switches to `user`'s uid, gid and groups.
fn drop_privileges(user: &str) -> Result<(), String> {
    let name = CString::new(user).map_err(|_| format!("invalid user name {user:?}"))?;
    // SAFETY: getpwnam returns a pointer to static storage or null; it is read at once on
    // this thread, before any other call that could overwrite it.
    let (uid, gid) = unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() {
            return Err(format!("no such user {user:?}"));
        }
        ((*pw).pw_uid, (*pw).pw_gid)
    };
    // SAFETY: plain syscalls with valid arguments; each result is checked.
    unsafe {
        if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
            return Err(format!(
                "cannot switch to user {user:?}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    info!("running as {user} (uid {uid}, gid {gid})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults() {
        let Ok(Ok(c)) = parse_args(&[]) else { panic!() };
        assert!(c.listen.is_empty());
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!((c.retries, c.max_blksize, c.max_window), (5, 65464, 64));
        assert_eq!(c.log_level, LevelFilter::Info);
    }

    #[test]
    fn flags_are_parsed() {
        let Ok(Ok(c)) = parse_args(&args(&[
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
            "-vv",
        ])) else {
            panic!()
        };
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.root, PathBuf::from("/srv"));
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!((c.retries, c.max_blksize, c.max_window), (3, 1468, 16));
        assert_eq!(c.max_sessions, Some(10));
        assert_eq!(c.user.as_deref(), Some("nobody"));
        assert_eq!(c.log_level, LevelFilter::Trace);
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
            (&["--bogus"], "bogus"),
            (&["extra"], "unexpected argument"),
            (&["-q", "-v"], "exclude"),
        ] {
            let err = parse_args(&args(bad)).err().unwrap_or_default();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }

    #[test]
    fn help_and_version_are_not_errors() {
        assert!(matches!(parse_args(&args(&["-h"])), Ok(Err(t)) if t.contains("--listen")));
        assert!(matches!(parse_args(&args(&["-V"])), Ok(Err(t)) if t.starts_with("dyntftpd ")));
    }
}
