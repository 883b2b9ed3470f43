//! `dyntftpd`: serves a directory over TFTP (read requests only) with the dyntftp event loop.

mod config;
mod logging;
mod router;
mod scrape;
mod systemd;
mod upstream;

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use dyntftp::{
    Handler, Metrics, ReadRequest, Reject, ResponseData, ServerBuilder, ServerStats, SessionStats,
};
use log::{debug, error, info, warn};

use config::{Command, Config, DryRunRequest};
use logging::JsonSink;
use router::{Defaults, DryRun, Router, RouterConfig};
use scrape::Snapshot;
use systemd::ServiceManager;

/// Exit code for a bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit code for a failure to start or run.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let config = match config::utf8_args(std::env::args_os().skip(1))
        .and_then(|args| config::parse_args(&args))
    {
        Ok(Command::Serve(config)) => *config,
        Ok(Command::Check(config)) => return check_config(&config),
        Ok(Command::DryRun(config, request)) => return dry_run(&config, &request),
        Ok(Command::Print(text)) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            eprintln!("{}", config::options().short_usage("dyntftpd"));
            eprintln!("Try 'dyntftpd --help' for more information.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let routes = match RouterConfig::read(&defaults(&config), config_file(&config)) {
        Ok(routes) => routes,
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let json = match logging::init(
        config.log_format,
        config.log_level(),
        config.log_file.as_deref(),
    ) {
        Ok(json) => json,
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match serve(config, routes, json) {
        Ok(code) => code,
        Err(why) => {
            error!("{why}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// What the router starts from: the `root` directory and the remapping settings.
fn defaults(config: &Config) -> Defaults {
    Defaults {
        root: config.root.clone(),
        ignore_case: config.ignore_case,
        unique_root: config.unique_root,
        lowercase: config.lowercase,
        strip_prefix: config.strip_prefix.clone(),
        cache: config.cache,
    }
}

/// The configuration file's path and text, for the router's tables.
fn config_file(config: &Config) -> Option<(&std::path::Path, &str)> {
    config
        .config_file
        .as_ref()
        .map(|(path, text)| (path.as_path(), text.as_str()))
}

/// `--check-config`: the settings, then the rules (as comments); a bad rule exits 2.
fn check_config(config: &Config) -> ExitCode {
    let checked = config.to_toml().and_then(|settings| {
        let routes = RouterConfig::read(&defaults(config), config_file(config))?;
        Ok(settings + &routes.describe(&config.root, config.upstream.as_deref()))
    });
    match checked {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `--dry-run`: which rule answers the request and what it answers; nothing is served.
fn dry_run(config: &Config, request: &DryRunRequest) -> ExitCode {
    let defaults = defaults(config);
    let routes = match RouterConfig::read(&defaults, config_file(config)) {
        Ok(routes) => routes,
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Nothing is fetched: the dry run only shows the URL.
    match Router::new(routes, &defaults, config.upstream.as_deref(), None) {
        Ok(router) => {
            print!(
                "{}",
                router.dry_run(&DryRun {
                    name: request.name.clone(),
                    client: request.client,
                    local: request.local,
                    mac: request.mac,
                })
            );
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("dyntftpd: {why}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Serves files through the [`Router`] and turns the statistics callbacks into JSON log
/// records, the metrics file and the scrape endpoint's snapshot. Cloned once per worker;
/// only worker 0's clone receives the (added-up) server statistics, so only it writes the
/// metrics file and publishes the snapshot.
#[derive(Clone)]
struct Ops {
    files: Router,
    json: Option<Arc<JsonSink>>,
    metrics: Metrics,
    metrics_file: Option<PathBuf>,
    scrape: Option<Snapshot>,
    /// The HTTP client of `http` rules and `--upstream`, for its statistics.
    upstream: Option<upstream::Upstream>,
}

impl Ops {
    fn publish_metrics(&self) {
        if let Some(path) = &self.metrics_file {
            if let Err(e) = self.metrics.write_file(path) {
                warn!("cannot write the metrics file {}: {e}", path.display());
            }
        }
        if let Some(snapshot) = &self.scrape {
            snapshot.publish(self.metrics.render());
        }
    }
}

impl Handler for Ops {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.files.open(request)
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        self.files.session_finished(stats);
        if let Some(json) = &self.json {
            json.session(stats);
        }
    }

    fn server_stats(&mut self, stats: &ServerStats) {
        self.files.server_stats(stats);
        if let Some(json) = &self.json {
            json.stats(stats);
        }
        self.metrics.add(stats);
        self.publish_metrics();
        if let Some(upstream) = &self.upstream {
            debug!("upstream: {}", upstream.stats());
        }
    }
}

fn serve(
    config: Config,
    routes: RouterConfig,
    json: Option<Arc<JsonSink>>,
) -> Result<ExitCode, String> {
    // Both change the environment: before any thread starts.
    let inherited = systemd::listen_fds()?;
    let service_manager = ServiceManager::from_env().unwrap_or_else(|why| {
        warn!("{why}: the service manager will not be notified");
        None
    });
    // Block the shutdown signals before any thread starts, so only the signal thread
    // receives them.
    let signals = block_signals()?;
    let (rules, hosts) = (routes.rules.len(), routes.inventory.len());
    // The HTTP client's workers run only when something uses them.
    let upstream = match config.upstream.is_some() || routes.uses_http() {
        true => {
            let settings = upstream::UpstreamSettings {
                timeout: config.upstream_timeout,
                workers: config.upstream_workers,
                cache_bytes: config.upstream_cache,
            };
            let source = upstream::Upstream::start(settings)
                .map_err(|e| format!("cannot start the upstream workers: {e}"))?;
            Some(source)
        }
        false => None,
    };
    let files = Router::new(
        routes,
        &defaults(&config),
        config.upstream.as_deref(),
        upstream.clone(),
    )?;
    if rules > 0 || hosts > 0 {
        info!("router: {rules} rules, {hosts} hosts in the inventory");
    }
    // Every series at zero until the first stats report.
    let scrape = config
        .metrics_listen
        .map(|_| Snapshot::new(Metrics::new().render()));
    let handler = Ops {
        upstream,
        files,
        json,
        metrics: Metrics::new(),
        metrics_file: config.metrics_file.clone(),
        scrape: scrape.clone(),
    };
    let builder = config.configure(ServerBuilder::new(handler));
    let listen = if config.listen.is_empty() && inherited.is_empty() {
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
    if !inherited.is_empty() {
        info!("socket activation: {} inherited socket(s)", inherited.len());
    }
    let builder = inherited.into_iter().fold(builder, |b, s| b.socket(s));
    let builder = listen.iter().fold(builder, |b, addr| b.bind(*addr));
    let server = builder
        .build_workers(config.workers)
        .map_err(|e| e.to_string())?;
    // Bound before privileges are dropped (the port may be below 1024), served after.
    let scrape_listener = config.metrics_listen.map(scrape::bind).transpose()?;
    if let Some(user) = &config.user {
        drop_privileges(user)?;
    }
    if let (Some(listener), Some(snapshot)) = (scrape_listener, scrape) {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        scrape::spawn(listener, snapshot)?;
        info!("serving /metrics and /healthz on http://{addr}");
    }
    // The file exists, with every series at zero, from the start; written only now, as
    // the service user, so that it is that user's file (never root's, through a link a
    // local user planted in the directory).
    if let Some(path) = &config.metrics_file {
        if let Err(e) = Metrics::new().write_file(path) {
            warn!("cannot write the metrics file {}: {e}", path.display());
        }
    }
    let addrs = server
        .local_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    info!(
        "serving {} on {addrs} (max {} sessions{})",
        config.root.display(),
        server.max_sessions(),
        if server.len() > 1 {
            format!(", {} workers", server.len())
        } else {
            String::new()
        }
    );
    if let Some(service_manager) = &service_manager {
        let status = format!(
            "READY=1\nSTATUS=serving {} on {addrs}",
            config.root.display()
        );
        if let Err(e) = service_manager.notify(&status) {
            warn!("cannot notify the service manager: {e}");
        }
    }
    let handle = server.shutdown_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signals(signals, handle, service_manager))
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
fn wait_for_signals(
    set: libc::sigset_t,
    handle: dyntftp::ShutdownHandle,
    service_manager: Option<ServiceManager>,
) {
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
            if let Some(service_manager) = &service_manager {
                if let Err(e) = service_manager.notify("STOPPING=1") {
                    warn!("cannot notify the service manager: {e}");
                }
            }
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
