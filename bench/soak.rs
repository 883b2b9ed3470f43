//! Soak: a long run of sessions of mixed sizes against an in-process server, some clients
//! vanishing mid-transfer, some probing the size, some giving up with an ERROR, checking
//! that nothing accumulates.
//!
//! ```text
//! cargo bench --bench soak -- --sessions 200000
//! cargo bench --bench soak -- --sessions 20000 --workers 4 --timeout-ms 20 --retries 2
//! ```
//!
//! Run without any flag (as a plain `cargo bench` or `cargo test --all-targets` does) it
//! prints its usage and exits 0.
//!
//! The server (an `FsHandler` on a temporary root, on its own thread) and the clients
//! (`--workers` threads of blocking clients over loopback) share this process, so
//! `/proc/self/fd` and `VmRSS` cover both; both are sampled when every client and session
//! is gone: after a warm-up (1 % of the sessions, at least 1,000) and at the end, plus
//! midway figures while sessions run. What a client does depends on its number `i`:
//!
//! | `i % 100` | client |
//! |---|---|
//! | 0, 1 | vanishes after its first DATA (or OACK): the session must time out |
//! | 2 | vanishes after its third DATA, mid-transfer |
//! | 3 | asks for `tsize` and answers the OACK with ERROR 8 (a size probe) |
//! | 4 | answers DATA 1 with ERROR 0 (gives up) |
//! | others | downloads the file and checks every byte |
//!
//! Sizes cycle through 0 B to 256 KiB; options cycle through none, `blksize`, `tsize`,
//! `windowsize`.
//!
//! At the end the report checks (exit 1 when one fails): every session started was
//! reported finished, `completed + failed + probe = started`, each kind of client led to
//! the outcome it should (completed, timed_out, probe, peer_error), no session is left,
//! the file-descriptor count is back to where it was after the warm-up, and a few clients
//! that stop ACKing are sent exactly `--retries` retransmissions and then find the
//! session's port closed (the kernel answers with port unreachable). RSS is printed and
//! judged "flat" when it grew by less than 8 MiB over the warm-up figure.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::client::{write_ack, ClientError, Event, ReadTransfer, Request, Settings};
use dyntftp::{
    ErrorCode, FsHandler, Handler, Mode, Packet, ReadRequest, Reject, ResponseData, ServerBuilder,
    ServerStats,
};
use getopts::Options;
use testkit::{client::drive, sys};

#[path = "common/args.rs"]
mod args;

const SIZES: [usize; 8] = [0, 100, 512, 1500, 8000, 40_000, 100_000, 262_144];

struct Config {
    sessions: usize,
    workers: usize,
    timeout: Duration,
    retries: u32,
}

fn options() -> Options {
    let mut o = Options::new();
    o.optopt("", "sessions", "sessions to run (required)", "N");
    o.optopt("", "workers", "client threads (default 8)", "N");
    o.optopt(
        "",
        "timeout-ms",
        "server retransmission timeout (default 10)",
        "MS",
    );
    o.optopt("", "retries", "server retries (default 3)", "N");
    o.optflag("h", "help", "print this help");
    o
}

fn main() -> ExitCode {
    let args = args::args();
    let opts = options();
    let usage = opts.usage("Usage: cargo bench --bench soak -- --sessions N [options]");
    if args.is_empty() {
        println!("{usage}");
        return ExitCode::SUCCESS;
    }
    let config = match parse(&opts, &args) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("soak: {e}\n{usage}");
            return ExitCode::from(2);
        }
    };
    match run(&config) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(opts: &Options, args: &[String]) -> Result<Option<Config>, String> {
    let m = opts.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("help") {
        return Ok(None);
    }
    fn num<T: std::str::FromStr>(
        m: &getopts::Matches,
        name: &str,
        default: Option<T>,
    ) -> Result<T, String> {
        match m.opt_str(name) {
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: not a number: {v:?}")),
            None => default.ok_or(format!("--{name} is required")),
        }
    }
    let config = Config {
        sessions: num(&m, "sessions", None)?,
        workers: num(&m, "workers", Some(8))?,
        timeout: Duration::from_millis(num(&m, "timeout-ms", Some(10))?),
        retries: num(&m, "retries", Some(3))?,
    };
    if config.sessions == 0 || config.workers == 0 || config.timeout.is_zero() {
        return Err("--sessions, --workers and --timeout-ms must be at least 1".into());
    }
    Ok(Some(config))
}

// ---------------------------------------------------------------------------------------
// The server and what it reports
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Reports {
    totals: ServerStats,
    reports: u64,
    last_active: u64,
}

struct Recorder {
    fs: FsHandler,
    reports: Arc<Mutex<Reports>>,
}

impl Handler for Recorder {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.fs.open(req)
    }

    fn server_stats(&mut self, stats: &ServerStats) {
        let mut r = self.reports.lock().unwrap();
        r.totals.merge(stats);
        r.reports += 1;
        r.last_active = stats.active_sessions;
    }
}

/// Waits until a report after this call shows no active session (bounded).
fn wait_idle(reports: &Arc<Mutex<Reports>>, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let seen = reports.lock().unwrap().reports;
    loop {
        {
            let r = reports.lock().unwrap();
            if r.reports >= seen + 2 && r.last_active == 0 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("sessions still active after {within:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    VanishEarly,
    VanishMidway,
    Probe,
    GiveUp,
}

fn kind(i: usize) -> Kind {
    match i % 100 {
        0 | 1 => Kind::VanishEarly,
        2 => Kind::VanishMidway,
        3 => Kind::Probe,
        4 => Kind::GiveUp,
        _ => Kind::Normal,
    }
}

fn options_for(i: usize) -> Vec<(&'static str, &'static str)> {
    match kind(i) {
        Kind::Probe => vec![("tsize", "0")],
        _ => match (i / 100) % 4 {
            0 => vec![],
            1 => vec![("blksize", "1428")],
            2 => vec![("tsize", "0")],
            _ => vec![("blksize", "1024"), ("windowsize", "8")],
        },
    }
}

fn content(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 131 + size) as u8).collect()
}

/// Runs client `i`: Ok when it did what its kind says. A client that vanished returns its
/// socket, so that the caller keeps its port from being reused by the next client while
/// the abandoned session still retransmits to it (a new request from a port whose session
/// runs is taken for a repeat).
fn client(i: usize, server: SocketAddr, files: &[Vec<u8>]) -> Result<Option<UdpSocket>, String> {
    client_io(i, server, files).map_err(|e| format!("client {i} ({:?}): {e}", kind(i)))?
}

/// The clients' settings: a client that gets no reply for 6 s gives up.
const CLIENT: Settings = Settings {
    timeout: Duration::from_secs(1),
    retries: 5,
    linger: 0,
    keep_payload: true,
};

fn client_io(
    i: usize,
    server: SocketAddr,
    files: &[Vec<u8>],
) -> io::Result<Result<Option<UdpSocket>, String>> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(CLIENT.timeout))?;
    let size_index = (i / 7) % SIZES.len();
    let size = SIZES[size_index];
    let want = &files[size_index];
    let kind = kind(i);
    let request = options_for(i).into_iter().fold(
        Request::new(format!("f{size}"), Mode::Octet),
        |r, (name, value)| r.option(name, value),
    );
    let mut transfer = ReadTransfer::new(Instant::now(), server, &request, CLIENT);
    let mut buf = vec![0u8; 65_536];
    let mut datas = 0;
    let mut vanished = false;
    drive(&socket, &mut transfer, &mut buf, |transfer, event| {
        match (kind, event) {
            (Kind::VanishEarly, _) => vanished = true,
            (Kind::Probe, Event::Oack(_)) => {
                transfer.abort(ErrorCode::OptionNegotiation, "size only");
            }
            (_, Event::Data(_)) => {
                datas += 1;
                match kind {
                    Kind::VanishMidway if datas == 3 => vanished = true,
                    Kind::GiveUp => transfer.abort(ErrorCode::NotDefined, "giving up"),
                    _ => {}
                }
            }
            _ => {}
        }
        if vanished {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    if vanished {
        return Ok(Ok(Some(socket)));
    }
    Ok(match transfer.outcome() {
        // A vanish-midway client of a short file just completes.
        Some(Ok(_)) if transfer.data() == want.as_slice() => Ok(None),
        Some(Ok(len)) => Err(format!("{len} bytes that differ from the file")),
        Some(Err(ClientError::Aborted(_))) if matches!(kind, Kind::Probe | Kind::GiveUp) => {
            Ok(None)
        }
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the transfer did not end".into()),
    })
}

/// A client that never ACKs DATA 1: counts the retransmissions it gets, then checks that
/// the session's port is closed. Returns the retransmissions seen, or why it failed.
fn unanswered(server: SocketAddr, quiet: Duration) -> Result<u32, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(quiet))
        .map_err(|e| e.to_string())?;
    let rrq = Request::new("f1500", Mode::Octet);
    socket
        .send_to(rrq.as_bytes(), server)
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let (_, tid) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no DATA 1: {e}"))?;
    let mut resent = 0;
    while let Ok((len, from)) = socket.recv_from(&mut buf) {
        if from != tid
            || !matches!(
                Packet::parse(&buf[..len]),
                Ok(Packet::Data { block: 1, .. })
            )
        {
            return Err("unexpected datagram".into());
        }
        resent += 1;
    }
    // Released: its port is closed, so the kernel answers port unreachable.
    socket.connect(tid).map_err(|e| e.to_string())?;
    let mut ack = Vec::new();
    write_ack(&mut ack, 1);
    socket.send(&ack).map_err(|e| e.to_string())?;
    match socket.recv(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(resent),
        Err(e) => Err(format!("session port still open? {e}")),
        Ok(_) => Err("the session answered after its retries".into()),
    }
}

fn run(config: &Config) -> Result<bool, String> {
    let root = std::env::temp_dir().join(format!("dyntftp-soak-{}", std::process::id()));
    fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let files: Arc<Vec<Vec<u8>>> = Arc::new(SIZES.iter().map(|&s| content(s)).collect());
    for (size, data) in SIZES.iter().zip(files.iter()) {
        fs::write(root.join(format!("f{size}")), data).map_err(|e| e.to_string())?;
    }
    let reports = Arc::new(Mutex::new(Reports::default()));
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_thread = {
        let (root, reports) = (root.clone(), reports.clone());
        let (timeout, retries) = (config.timeout, config.retries);
        thread::spawn(move || -> Result<(), String> {
            let handler = Recorder {
                fs: FsHandler::new(&root).map_err(|e| e.to_string())?,
                reports,
            };
            let mut server = ServerBuilder::new(handler)
                .bind("127.0.0.1:0".parse().unwrap())
                .timeout(timeout)
                .retries(retries)
                .adaptive_timeout(false)
                .stats_interval(Duration::from_millis(100))
                .shutdown_grace(Duration::from_millis(100))
                .build()
                .map_err(|e| e.to_string())?;
            ready_tx
                .send((server.local_addr(), server.shutdown_handle()))
                .map_err(|e| e.to_string())?;
            server.run().map_err(|e| e.to_string())
        })
    };
    let (addr, shutdown) = ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|e| format!("server did not start: {e}"))?;
    let settle = Duration::from_secs(30);
    let warmup = (config.sessions / 100).max(1000).min(config.sessions);
    let run_clients =
        |from: usize, to: usize, mid: Option<&dyn Fn()>| -> (Vec<String>, BTreeMap<Kind, u64>) {
            let next = Arc::new(AtomicUsize::new(from));
            let failures = Arc::new(Mutex::new(Vec::new()));
            let per_kind = Arc::new(Mutex::new(BTreeMap::new()));
            let hold = config.timeout * 40;
            let handles: Vec<_> = (0..config.workers)
                .map(|_| {
                    let (next, failures, per_kind, files) = (
                        next.clone(),
                        failures.clone(),
                        per_kind.clone(),
                        files.clone(),
                    );
                    thread::spawn(move || {
                        let mut held: std::collections::VecDeque<(Instant, UdpSocket)> =
                            Default::default();
                        loop {
                            while held.front().is_some_and(|(t, _)| t.elapsed() > hold) {
                                held.pop_front();
                            }
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= to {
                                return;
                            }
                            match client(i, addr, &files) {
                                Ok(socket) => {
                                    *per_kind.lock().unwrap().entry(kind(i)).or_insert(0) += 1;
                                    if let Some(socket) = socket {
                                        held.push_back((Instant::now(), socket));
                                    }
                                }
                                Err(e) => failures.lock().unwrap().push(e),
                            }
                        }
                    })
                })
                .collect();
            if let Some(mid) = mid {
                while next.load(Ordering::Relaxed) < from + (to - from) / 2 {
                    thread::sleep(Duration::from_millis(10));
                }
                mid();
            }
            for h in handles {
                h.join().expect("client thread");
            }
            let per_kind = std::mem::take(&mut *per_kind.lock().unwrap());
            let failures = std::mem::take(&mut *failures.lock().unwrap());
            (failures, per_kind)
        };

    let t0 = Instant::now();
    let (fd_boot, rss_boot) = (sys::open_fds(), sys::rss_kib());
    let (warm_failures, warm_kinds) = run_clients(0, warmup, None);
    wait_idle(&reports, settle)?;
    let (fd_start, rss_start) = (sys::open_fds(), sys::rss_kib());
    let t1 = Instant::now();
    let mid_sample = Mutex::new((0, 0));
    let (failures, kinds) = run_clients(
        warmup,
        config.sessions,
        Some(&|| *mid_sample.lock().unwrap() = (sys::open_fds(), sys::rss_kib())),
    );
    let elapsed = t1.elapsed();
    wait_idle(&reports, settle)?;
    let (fd_end, rss_end) = (sys::open_fds(), sys::rss_kib());
    // A few clients that stop ACKing: exactly `retries` retransmissions, then released.
    let quiet = config.timeout * 8 * 3;
    let unanswered: Vec<Result<u32, String>> = (0..5).map(|_| unanswered(addr, quiet)).collect();
    wait_idle(&reports, settle)?;
    shutdown.shutdown();
    server_thread
        .join()
        .map_err(|_| "server thread panicked".to_string())??;
    let _ = fs::remove_dir_all(&root);

    let r = reports.lock().unwrap();
    let t = &r.totals;
    let finished: u64 = t.sessions_finished.values().sum();
    let get = |name: &str| t.sessions_finished.get(name).copied().unwrap_or(0);
    let (completed, probe) = (get("completed") + get("final_ack_missing"), get("probe"));
    let failed = t.sessions_failed();
    let mut all_kinds = warm_kinds.clone();
    for (k, n) in &kinds {
        *all_kinds.entry(*k).or_insert(0) += n;
    }
    let n = |k: Kind| all_kinds.get(&k).copied().unwrap_or(0);
    let client_failures: Vec<String> = warm_failures.into_iter().chain(failures).collect();
    let (mid_fd, mid_rss) = *mid_sample.lock().unwrap();

    println!(
        "soak: {} sessions ({} warm-up) with {} client threads, server timeout {:?} × {} retries",
        config.sessions, warmup, config.workers, config.timeout, config.retries
    );
    println!(
        "  measured part: {} sessions in {:.1} s ({:.0} sessions/s); whole run {:.1} s",
        config.sessions - warmup,
        elapsed.as_secs_f64(),
        (config.sessions - warmup) as f64 / elapsed.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!("  open fds: {fd_boot} at boot, {fd_start} after warm-up, {mid_fd} midway (sessions running), {fd_end} at the end");
    println!(
        "  RSS: {} KiB at boot, {} KiB after warm-up, {} KiB midway, {} KiB at the end ({:+} KiB)",
        rss_boot,
        rss_start,
        mid_rss,
        rss_end,
        rss_end as i64 - rss_start as i64
    );
    println!(
        "  server: started {}, finished {} = completed {} + failed {} + probe {}; outcomes {:?}",
        t.sessions_started, finished, completed, failed, probe, t.sessions_finished
    );
    println!(
        "  server: {} requests, {} datagrams, {} MB, {} retransmits, {} send errors, {} panics, {} repeated requests",
        t.requests, t.datagrams_sent, t.bytes_sent / 1_000_000, t.retransmits, t.send_errors, t.panics, t.duplicate_requests
    );
    println!("  clients: {all_kinds:?}, {} failed", client_failures.len());
    for failure in client_failures.iter().take(10) {
        println!("    {failure}");
    }
    println!("  clients that stop ACKing: {unanswered:?}");

    let mut ok = true;
    let mut check = |cond: bool, what: String| {
        println!("  {} {what}", if cond { "ok  " } else { "FAIL" });
        ok &= cond;
    };
    let sessions = config.sessions as u64;
    let unanswered_n = unanswered.len() as u64;
    check(
        client_failures.is_empty(),
        format!("{} client failures", client_failures.len()),
    );
    check(
        t.sessions_started == sessions + unanswered_n,
        format!(
            "started {} = {} sessions + {} unanswered",
            t.sessions_started, sessions, unanswered_n
        ),
    );
    check(
        finished == t.sessions_started,
        format!("finished {finished} = started {}", t.sessions_started),
    );
    check(
        completed + failed + probe == t.sessions_started,
        format!(
            "completed + failed + probe = {} = started",
            completed + failed + probe
        ),
    );
    // Vanish-midway clients of files shorter than 3 blocks complete normally. A vanished
    // client's closed port may answer a resend with ICMP port unreachable, which ends
    // its session at once.
    let short_midway = short_midway(config.sessions);
    let vanished = n(Kind::VanishEarly) + n(Kind::VanishMidway) + unanswered_n - short_midway;
    check(
        get("timed_out") + get("final_ack_missing") + get("peer_unreachable") == vanished,
        format!(
            "timed out {} + final ACK missing {} + peer unreachable {} = vanished clients {vanished}",
            get("timed_out"),
            get("final_ack_missing"),
            get("peer_unreachable")
        ),
    );
    check(
        probe == n(Kind::Probe),
        format!("probes {probe} = probing clients {}", n(Kind::Probe)),
    );
    // A client that gives up on an empty file had every byte there was: its session
    // completed.
    let gave_up_complete = get("completed").saturating_sub(n(Kind::Normal) + short_midway);
    check(
        get("peer_error") + gave_up_complete == n(Kind::GiveUp),
        format!(
            "peer errors {} + completed before giving up {gave_up_complete} = clients giving up {}",
            get("peer_error"),
            n(Kind::GiveUp)
        ),
    );
    check(r.last_active == 0, "no session left".into());
    check(
        fd_end == fd_start,
        format!("fds flat: {fd_start} → {fd_end}"),
    );
    check(
        unanswered.iter().all(|u| *u == Ok(config.retries)),
        format!(
            "each unanswered client got exactly {} retransmissions, then found the port closed",
            config.retries
        ),
    );
    let grew = rss_end.saturating_sub(rss_start);
    println!(
        "  {} RSS grew {grew} KiB after warm-up",
        if grew < 8192 { "flat" } else { "GREW" }
    );
    Ok(ok)
}

/// Vanish-midway clients (i % 100 == 2) of files of at most 2 blocks, which complete.
fn short_midway(sessions: usize) -> u64 {
    (0..sessions)
        .filter(|&i| kind(i) == Kind::VanishMidway)
        .filter(|&i| {
            let size = SIZES[(i / 7) % SIZES.len()];
            let blksize = match options_for(i).first() {
                Some(("blksize", b)) => b.parse().unwrap(),
                _ => 512,
            };
            size / blksize < 2
        })
        .count() as u64
}
