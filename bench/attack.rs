//! What a hostile peer costs: an in-process server with dyntftpd's default limits (applied
//! to loopback too, as they would be to a remote attacker) against scripted attackers
//! over loopback. Prints the figures the README's robustness section quotes.
//!
//! ```text
//! cargo bench --bench attack -- --run            # every case, about a minute and a half
//! cargo bench --bench attack -- --run --memory   # one group: --amplification, --memory, --full
//! ```
//!
//! Run without `--run` (as a plain `cargo bench` or `cargo test --all-targets` does) it
//! prints its usage and exits 0.
//!
//! - **Amplification, blind attacker.** The attacker spoofs the victim's address: it sends
//!   from the victim's own socket but never reads it, on a fixed schedule, to the only
//!   port it can know (the listener). It asks for an 8 MiB file with `blksize 65464
//!   windowsize 64`, sends ACK 0, then 120 ACKs 1 ms apart, numbered either 1, 2, 3, … or
//!   64, 128, 192, …, and stops. Two more patterns find single-port mode's worst case:
//!   1, 2, 3, … 25 ms apart (longer than the server's shortest resend interval, 20 ms),
//!   and 8, 16, 24, … (whole windows of the mode's documented cap), and three short ones:
//!   ACK 0, or ACK 0 and 8, or ACK 0, 8 and 16, then silence (the session resends its last
//!   window on its timers). The victim counts every datagram until the session ends
//!   (retransmissions included). *× wire* counts 28 bytes of IPv4 and UDP headers per
//!   datagram on both sides. Also the classic case: one RRQ without options, never
//!   answered.
//! - **Memory.** Resident memory of the process per held session, 200 sessions per case,
//!   each from its own address (so no per-client cap applies): a never-answered request
//!   asking for the largest window; a request stuffed with junk options to 65 KB; a client
//!   that ACKs the OACK (in the normal mode, at the session's port: a verified peer) and
//!   then goes silent.
//! - **Life without progress.** How long a never-answered request with `timeout 255`
//!   holds its slot.
//! - **Full table.** `max_sessions` is filled with never-answered requests (`timeout 255`)
//!   from other addresses; then a legitimate client asks for a small file: what it gets,
//!   and after how long. And the targeted lockout: 64 never-answered requests from the
//!   victim's own address (other ports), then the victim's real request.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dyntftp::client::{write_ack, write_rrq, ReadTransfer, Request, Settings};
use dyntftp::{
    BytesSource, Handler, Mode, Packet, Rate, ReadRequest, Reject, ResponseData, ServerBuilder,
    SessionStats, ShutdownHandle,
};
use testkit::{client::drive, pseudo_random, sys};

#[path = "common/args.rs"]
mod args;

/// The file the attacker asks for.
const BIG: usize = 8 << 20;
/// Wire overhead per datagram on both sides: IPv4 and UDP headers.
const HEADERS: u64 = 28;
/// Sessions per memory case.
const HELD: usize = 200;
/// How long any one case may take.
const CAP: Duration = Duration::from_secs(120);

/// Serves the same bytes under every name and reports finished sessions over a channel.
struct Bytes {
    big: Arc<[u8]>,
    small: Arc<[u8]>,
    finished: Sender<SessionStats>,
}

impl Handler for Bytes {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let bytes = if request.filename_lossy() == "small" {
            &self.small
        } else {
            &self.big
        };
        Ok(Box::new(BytesSource::new(bytes.clone())))
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        let _ = self.finished.send(stats.clone());
    }
}

/// A server on its own thread.
struct Server {
    addr: SocketAddr,
    handle: ShutdownHandle,
    finished: Receiver<SessionStats>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// dyntftpd's default limits, applied to loopback; `configure` adjusts.
    fn start(
        single_port: bool,
        configure: impl FnOnce(ServerBuilder<Bytes>) -> ServerBuilder<Bytes> + Send + 'static,
    ) -> Server {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (finished_tx, finished) = mpsc::channel();
        let thread = thread::spawn(move || {
            let handler = Bytes {
                big: pseudo_random(BIG, 7).into(),
                small: pseudo_random(1024, 8).into(),
                finished: finished_tx,
            };
            let builder = ServerBuilder::new(handler)
                .bind("127.0.0.1:0".parse().unwrap())
                .single_port(single_port)
                .request_rate(Some(Rate::DEFAULT))
                .max_sessions_per_client(Some(dyntftp::server::DEFAULT_MAX_SESSIONS_PER_CLIENT))
                .limit_loopback(true)
                .shutdown_grace(Duration::from_millis(100));
            let mut server = configure(builder).build().expect("build server");
            ready_tx
                .send((server.local_addr(), server.shutdown_handle()))
                .unwrap();
            server.run().expect("server run");
        });
        let (addr, handle) = ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Server {
            addr,
            handle,
            finished,
            thread: Some(thread),
        }
    }

    /// The next finished session, if one ends within `wait`.
    fn next_finished(&self, wait: Duration) -> Option<SessionStats> {
        self.finished.recv_timeout(wait).ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mode_name(single_port: bool) -> &'static str {
    if single_port {
        "single-port"
    } else {
        "normal"
    }
}

fn rrq(filename: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut datagram = Vec::new();
    write_rrq(
        &mut datagram,
        filename.as_bytes(),
        "octet",
        options.iter().copied(),
    );
    datagram
}

fn ack(block: u16) -> Vec<u8> {
    let mut datagram = Vec::new();
    write_ack(&mut datagram, block);
    datagram
}

fn bind(ip: Ipv4Addr) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0)).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
}

/// Counts what arrives at a socket until stopped.
struct Counter {
    stop: Arc<AtomicBool>,
    datagrams: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Counter {
    fn start(socket: &UdpSocket) -> Counter {
        let socket = socket.try_clone().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let datagrams = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, datagrams, bytes) = (stop.clone(), datagrams.clone(), bytes.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(len) = socket.recv(&mut buf) {
                        datagrams.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(len as u64, Ordering::Relaxed);
                    }
                }
            })
        };
        Counter {
            stop,
            datagrams,
            bytes,
            thread,
        }
    }

    /// Stops after the socket stayed quiet a little, and gives (datagrams, bytes).
    fn finish(self) -> (u64, u64) {
        let mut last = self.datagrams.load(Ordering::Relaxed);
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = self.datagrams.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        (
            self.datagrams.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// One blind attack: its line of the table.
struct Attack {
    name: String,
    sent: (u64, u64),
    received: (u64, u64),
    outcome: String,
    lasted: Duration,
}

/// ACK numbering of a blind attacker.
#[derive(Clone, Copy)]
enum Acks {
    /// No ACK at all: the classic reflection of one request.
    None,
    /// 1, 2, 3, … 120, this many milliseconds apart.
    EveryBlock(u64),
    /// n, 2n, 3n, … 1 ms apart, this many after ACK 0: whole windows (64 is the window
    /// asked for; 8 is single-port mode's cap, which an attacker can read in the
    /// documentation). A short run then silence makes the session resend its last window
    /// on its timers.
    EveryWindow(u16, u16),
}

fn blind(single_port: bool, acks: Acks) -> Attack {
    let server = Server::start(single_port, |b| b);
    let victim = bind(Ipv4Addr::LOCALHOST);
    let counter = Counter::start(&victim);
    let mut sent = (0u64, 0u64);
    let mut send = |datagram: &[u8]| {
        victim.send_to(datagram, server.addr).unwrap();
        sent.0 += 1;
        sent.1 += datagram.len() as u64;
    };
    let start = Instant::now();
    match acks {
        Acks::None => send(&rrq("small", &[])),
        Acks::EveryBlock(_) | Acks::EveryWindow(..) => {
            send(&rrq("big", &[("blksize", "65464"), ("windowsize", "64")]));
            thread::sleep(Duration::from_millis(2));
            send(&ack(0));
            let count = match acks {
                Acks::EveryWindow(_, count) => count,
                _ => 120,
            };
            for k in 1..=count {
                let pace = match acks {
                    Acks::EveryBlock(ms) => ms,
                    _ => 1,
                };
                thread::sleep(Duration::from_millis(pace));
                let block = match acks {
                    Acks::EveryWindow(n, _) => k.wrapping_mul(n),
                    _ => k,
                };
                send(&ack(block));
            }
        }
    }
    let finished = server.next_finished(CAP);
    let lasted = start.elapsed();
    let received = counter.finish();
    let name = match acks {
        Acks::None => format!(
            "{}, RRQ without options, never answered",
            mode_name(single_port)
        ),
        Acks::EveryBlock(ms) => format!(
            "{}, RRQ + ACK 0, 1, 2, … 120, {ms} ms apart",
            mode_name(single_port)
        ),
        Acks::EveryWindow(_, 0) => format!("{}, RRQ + ACK 0, then silence", mode_name(single_port)),
        Acks::EveryWindow(n, count) if count < 120 => format!(
            "{}, RRQ + ACK 0, {n}, … ×{count}, 1 ms apart, then silence",
            mode_name(single_port)
        ),
        Acks::EveryWindow(n, count) => format!(
            "{}, RRQ + ACK 0, {n}, {}, … ×{count}, 1 ms apart",
            mode_name(single_port),
            2 * n
        ),
    };
    Attack {
        name,
        sent,
        received,
        outcome: finished
            .map(|s| s.outcome.as_str().to_owned())
            .unwrap_or_else(|| "still running".into()),
        lasted,
    }
}

fn amplification() {
    println!("## Amplification: blind attacker (spoofed source, never reads)\n");
    println!("| case | attacker datagrams / bytes | victim datagrams / bytes | × payload | × wire | session outcome | session lasted |");
    println!("|---|--:|--:|--:|--:|---|--:|");
    let cases: Vec<JoinHandle<Attack>> = [false, true]
        .into_iter()
        .flat_map(|single| {
            [
                Acks::None,
                Acks::EveryBlock(1),
                Acks::EveryBlock(25),
                Acks::EveryWindow(64, 120),
                Acks::EveryWindow(8, 120),
                Acks::EveryWindow(8, 0),
                Acks::EveryWindow(8, 1),
                Acks::EveryWindow(8, 2),
            ]
            .map(move |acks| thread::spawn(move || blind(single, acks)))
        })
        .collect();
    for case in cases {
        let a = case.join().expect("attack thread");
        let payload = a.received.1 as f64 / a.sent.1.max(1) as f64;
        let wire = (a.received.1 + HEADERS * a.received.0) as f64
            / (a.sent.1 + HEADERS * a.sent.0).max(1) as f64;
        println!(
            "| {} | {} / {} | {} / {} | {:.1} | {:.1} | {} | {:.1} s |",
            a.name,
            a.sent.0,
            a.sent.1,
            a.received.0,
            a.received.1,
            payload,
            wire,
            a.outcome,
            a.lasted.as_secs_f64()
        );
    }
    println!();
}

/// Resident memory per session for `HELD` sessions started by `hold`, which gets the
/// server, a client number and its socket, and returns once its session is in place.
fn per_session(single_port: bool, hold: impl Fn(&Server, &UdpSocket) -> bool) -> (f64, usize) {
    let server = Server::start(single_port, |b| b.limit_loopback(false));
    let sockets: Vec<UdpSocket> = (0..HELD)
        .map(|i| {
            bind(Ipv4Addr::new(
                127,
                0,
                10 + (i / 250) as u8,
                1 + (i % 250) as u8,
            ))
        })
        .collect();
    // Warm up the allocator and the server with one session that ends.
    let warm = bind(Ipv4Addr::new(127, 0, 9, 1));
    fetch(&server, &warm, "small");
    let before = sys::rss_kib();
    let held = sockets.iter().filter(|s| hold(&server, s)).count();
    let after = sys::rss_kib();
    let per = (after.saturating_sub(before)) as f64 / held.max(1) as f64;
    (per, held)
}

/// Waits for the session's first datagram (OACK or DATA); false when none came.
fn answered(socket: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65_536];
    socket
        .recv_from(&mut buf)
        .ok()
        .map(|(len, from)| (buf[..len].to_vec(), from))
}

/// What one client of a memory case does; true when its session is in place.
type Hold = Box<dyn Fn(&Server, &UdpSocket) -> bool>;

/// The memory cases: a name, and what each of the `HELD` clients does.
fn memory_case(case: usize) -> (&'static str, Hold) {
    let big_ask = rrq(
        "big",
        &[
            ("blksize", "65464"),
            ("windowsize", "64"),
            ("timeout", "255"),
            ("tsize", "0"),
        ],
    );
    match case {
        0 => (
            "unverified: blksize 65464 windowsize 64 timeout 255, never answered",
            Box::new(move |server, socket| {
                socket.send_to(&big_ask, server.addr).unwrap();
                answered(socket).is_some()
            }),
        ),
        1 => {
            let mut stuffed = rrq("big", &[("timeout", "255")]);
            while stuffed.len() + 3 <= 65_500 {
                stuffed.extend_from_slice(b"a\0\0");
            }
            (
                "unverified: 65 KB request stuffed with junk options",
                Box::new(move |server, socket| {
                    socket.send_to(&stuffed, server.addr).unwrap();
                    // Held when the OACK came; refused (ERROR) or silent otherwise.
                    matches!(answered(socket), Some((d, _))
                        if matches!(Packet::parse(&d), Ok(Packet::Oack { .. })))
                }),
            )
        }
        _ => (
            "verified: the first request, ACK 0, then silence",
            Box::new(move |server, socket| {
                socket.send_to(&big_ask, server.addr).unwrap();
                let Some((_, from)) = answered(socket) else {
                    return false;
                };
                socket.send_to(&ack(0), from).unwrap();
                answered(socket).is_some()
            }),
        ),
    }
}

const MEMORY_CASES: usize = 3;

/// Runs memory case `case` in this process (a fresh one, so that memory freed by an
/// earlier case cannot be reused and hide what this one takes) and prints
/// "KIB_PER_SESSION HELD".
fn hold(case: usize, single_port: bool) {
    let (_, hold) = memory_case(case);
    let (per, held) = per_session(single_port, hold);
    println!("{per:.1} {held}");
}

fn memory() {
    println!("## Memory per held session ({HELD} sessions, resident KiB of the process)\n");
    println!("| case | normal | single-port |");
    println!("|---|--:|--:|");
    let exe = std::env::current_exe().expect("current exe");
    for case in 0..MEMORY_CASES {
        let cells: Vec<String> = [false, true]
            .into_iter()
            .map(|single| {
                let output = std::process::Command::new(&exe)
                    .args(["--run", "--hold", &case.to_string()])
                    .args(single.then_some("--single-port"))
                    .output()
                    .expect("run a memory case");
                let text = String::from_utf8_lossy(&output.stdout);
                match text.split_whitespace().collect::<Vec<_>>()[..] {
                    [per, held] => format!("{per} KiB ({held} held)"),
                    _ => format!("failed: {}", String::from_utf8_lossy(&output.stderr).trim()),
                }
            })
            .collect();
        println!("| {} | {} | {} |", memory_case(case).0, cells[0], cells[1]);
    }
    println!();
}

/// Fetches `name` as a patient client (1 s timeout, 5 retries): the outcome and how long.
fn fetch(server: &Server, socket: &UdpSocket, name: &str) -> (String, Duration) {
    let settings = Settings {
        timeout: Duration::from_secs(1),
        retries: 5,
        linger: 0,
        keep_payload: false,
    };
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let request = Request::new(name, Mode::Octet);
    let mut transfer = ReadTransfer::new(start, server.addr, &request, settings);
    let mut buf = vec![0u8; 65_536];
    let result = drive(socket, &mut transfer, &mut buf, |_, _| {
        ControlFlow::Continue(())
    });
    let what = match (result, transfer.outcome()) {
        (Err(e), _) => format!("a socket error ({e})"),
        (Ok(()), Some(Ok(bytes))) => format!("the whole file ({bytes} bytes)"),
        (Ok(()), Some(Err(e))) => format!("a failure ({e})"),
        (Ok(()), None) => "nothing (stopped)".into(),
    };
    (what, start.elapsed())
}

fn full_table() {
    println!("## Life without progress, and a full table\n");
    for single in [false, true] {
        let mode = mode_name(single);
        // Life of a never-answered `timeout 255` request.
        let server = Server::start(single, |b| b);
        let socket = bind(Ipv4Addr::new(127, 0, 20, 1));
        let start = Instant::now();
        socket
            .send_to(&rrq("small", &[("timeout", "255")]), server.addr)
            .unwrap();
        let ended = server.next_finished(CAP);
        println!(
            "- {mode}: a never-answered request with `timeout 255` held its slot {:.1} s (outcome {})",
            start.elapsed().as_secs_f64(),
            ended.map_or("still running".into(), |s| s.outcome.as_str().to_owned())
        );
        drop(server);

        // A table of 64 filled by never-answered requests from other addresses.
        let server = Server::start(single, |b| b.max_sessions(64));
        let held: Vec<UdpSocket> = (0..64u8)
            .map(|i| {
                let s = bind(Ipv4Addr::new(127, 0, 21, 1 + i));
                s.send_to(&rrq("small", &[("timeout", "255")]), server.addr)
                    .unwrap();
                s
            })
            .collect();
        for s in &held {
            let _ = answered(s);
        }
        let legit = bind(Ipv4Addr::new(127, 0, 22, 1));
        let (what, took) = fetch(&server, &legit, "small");
        println!(
            "- {mode}: max-sessions 64 held by 64 never-answered requests; a legitimate client got {what} after {:.2} s",
            took.as_secs_f64()
        );
        drop(server);

        // Targeted lockout: 64 requests from the victim's own address.
        let server = Server::start(single, |b| b);
        let victim_ip = Ipv4Addr::new(127, 0, 23, 1);
        let spoofed: Vec<UdpSocket> = (0..64)
            .map(|_| {
                let s = bind(victim_ip);
                s.send_to(&rrq("small", &[("timeout", "255")]), server.addr)
                    .unwrap();
                s
            })
            .collect();
        for s in &spoofed {
            let _ = answered(s);
        }
        let victim = bind(victim_ip);
        let (what, took) = fetch(&server, &victim, "small");
        println!(
            "- {mode}: after 64 never-answered requests from the victim's address, the victim got {what} after {:.2} s",
            took.as_secs_f64()
        );
    }
    println!();
}

fn main() -> ExitCode {
    let args = args::args();
    if !args.iter().any(|a| a == "--run") {
        println!(
            "usage: cargo bench --bench attack -- --run [--amplification] [--memory] [--full]"
        );
        return ExitCode::SUCCESS;
    }
    let only: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--run")
        .collect();
    let wants = |group: &str| only.is_empty() || only.contains(&group);
    sys::raise_fd_limit(8192);
    if let Some(at) = only.iter().position(|a| *a == "--hold") {
        let case = only.get(at + 1).and_then(|c| c.parse().ok()).unwrap_or(0);
        hold(case, only.contains(&"--single-port"));
        return ExitCode::SUCCESS;
    }
    if wants("--amplification") {
        amplification();
    }
    if wants("--memory") {
        memory();
    }
    if wants("--full") {
        full_table();
    }
    ExitCode::SUCCESS
}
