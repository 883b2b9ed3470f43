//! Loss resilience over real sockets: transfers of mixed sizes through a lossy UDP relay
//! that drops, duplicates, reorders and delays datagrams in both directions, driven by a
//! seeded deterministic RNG. Every transfer must end with byte-identical data, every
//! session must end completed (or with only the final ACK missing, which a client that
//! already has everything cannot fix), and no session may retransmit beyond its retry
//! budget. The client is the library's `ReadTransfer` over a blocking socket (testkit's
//! `drive_with`), with its own timer; after the end the test keeps listening a while to
//! answer a resent final block.
//!
//! By default 100 transfers run (CI); `DYNTFTP_LOSSY_FULL=1` runs 1,000.
//! `DYNTFTP_LOSSY_SEED=N` changes the seed. The relay's decisions are deterministic for
//! a given sequence of datagrams; which datagrams exist depends on timing, so runs differ
//! in detail, not in what they must achieve.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::client::{ClientStats, Event, ReadTransfer, Request, Settings};
use dyntftp::{Outcome, Packet, SessionStats};
use testkit::*;

/// Probability that a datagram is dropped, in each direction.
const LOSS: f64 = 0.20;
/// Probability that a delivered datagram is delivered twice.
const DUPLICATE: f64 = 0.05;
/// Probability that a datagram is held back (which reorders it behind later ones).
const DELAY: f64 = 0.20;
/// Longest hold-back.
const MAX_DELAY: Duration = Duration::from_millis(4);

/// Server retransmission timeout and retry budget.
const SERVER_TIMEOUT: Duration = Duration::from_millis(20);
const SERVER_RETRIES: u32 = 12;
/// The client resends its request or last ACK after this long without progress.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(30);
/// After its final ACK, the client answers retransmissions until the server has been
/// quiet this long (longer than the server's longest retransmission interval, 8 × 20 ms).
const DALLY: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, Default)]
struct LinkStats {
    offered: u64,
    dropped: u64,
    duplicated: u64,
    delayed: u64,
}

impl LinkStats {
    fn add(&mut self, other: &LinkStats) {
        self.offered += other.offered;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.delayed += other.delayed;
    }
}

/// One direction of the relay.
struct Link {
    rng: Rng,
    stats: LinkStats,
}

impl Link {
    /// The delays after which copies of a datagram are delivered (none: dropped).
    fn decide(&mut self) -> Vec<Duration> {
        self.stats.offered += 1;
        if self.rng.unit() < LOSS {
            self.stats.dropped += 1;
            return Vec::new();
        }
        let copies = if self.rng.unit() < DUPLICATE {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| {
                if self.rng.unit() < DELAY {
                    self.stats.delayed += 1;
                    MAX_DELAY.mul_f64(self.rng.unit())
                } else {
                    Duration::ZERO
                }
            })
            .collect()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// To the client, from the relay's "server TID" socket.
    Client,
    /// To the server's listener, from the relay's back socket.
    Listener,
    /// To the server's session, from the relay's back socket.
    Session,
}

/// A lossy relay for one transfer. The client sends its request to `listen`; the relay
/// forwards it to the server from `back`; the session's datagrams reach the client from
/// `tid` (a port other than `listen`, as a server TID must be), and the client's answers
/// to `tid` go to the session.
struct Relay {
    listen: SocketAddr,
    tid: SocketAddr,
    back: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<(LinkStats, LinkStats)>>,
}

impl Relay {
    fn start(server: SocketAddr, seed: u64) -> Relay {
        let bind = || {
            let s = UdpSocket::bind(v4()).expect("bind relay socket");
            s.set_nonblocking(true).expect("nonblocking");
            s
        };
        let (listen, tid, back) = (bind(), bind(), bind());
        let addrs = (
            listen.local_addr().unwrap(),
            tid.local_addr().unwrap(),
            back.local_addr().unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || relay_loop(server, [listen, tid, back], seed, &stop))
        };
        Relay {
            listen: addrs.0,
            tid: addrs.1,
            back: addrs.2,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the relay and returns the statistics of (client → server, server → client).
    fn finish(mut self) -> (LinkStats, LinkStats) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("relay thread")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn relay_loop(
    server: SocketAddr,
    sockets: [UdpSocket; 3],
    seed: u64,
    stop: &AtomicBool,
) -> (LinkStats, LinkStats) {
    let [_, tid, back] = &sockets;
    let mut up = Link {
        rng: Rng::new(seed ^ 0x5555),
        stats: LinkStats::default(),
    };
    let mut down = Link {
        rng: Rng::new(seed ^ 0xaaaa),
        stats: LinkStats::default(),
    };
    let mut client: Option<SocketAddr> = None;
    let mut session: Option<SocketAddr> = None;
    // (due, sequence, side, datagram)
    let mut pending: Vec<(Instant, u64, Side, Vec<u8>)> = Vec::new();
    let mut sequence = 0u64;
    let mut buf = vec![0u8; 65_536];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let now = Instant::now();
        // Deliver what is due, in due order.
        pending.sort_by_key(|p| (p.0, p.1));
        while pending.first().is_some_and(|p| p.0 <= now) {
            let (_, _, side, datagram) = pending.remove(0);
            let sent = match side {
                Side::Client => client.map(|c| tid.send_to(&datagram, c)),
                // A late request once the session answered would start a second session
                // after the first ended; a real network could do that, but here it would
                // only blur the accounting, so it is dropped.
                Side::Listener if session.is_none() => Some(back.send_to(&datagram, server)),
                Side::Listener => None,
                Side::Session => session.map(|s| back.send_to(&datagram, s)),
            };
            if let Some(Err(e)) = sent {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "relay send: {e}");
            }
        }
        let wait = pending
            .iter()
            .map(|p| p.0.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_millis(5))
            .min(Duration::from_millis(5));
        let mut fds = sockets.each_ref().map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of 3 pollfd structures for the duration of the
        // call.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().max(1) as libc::c_int,
            )
        };
        if ready <= 0 {
            continue;
        }
        for (i, socket) in sockets.iter().enumerate() {
            loop {
                let (len, from) = match socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => panic!("relay receive: {e}"),
                };
                let datagram = buf[..len].to_vec();
                let (side, link) = match i {
                    // The client's request.
                    0 => {
                        client = Some(from);
                        (Side::Listener, &mut up)
                    }
                    // The client's answers to the session.
                    1 if Some(from) == client => (Side::Session, &mut up),
                    // The session's datagrams (the first sender is the session).
                    2 if from != server && session.is_none_or(|s| s == from) => {
                        session = Some(from);
                        (Side::Client, &mut down)
                    }
                    _ => continue,
                };
                let now = Instant::now();
                for delay in link.decide() {
                    sequence += 1;
                    pending.push((now + delay, sequence, side, datagram.clone()));
                }
            }
        }
    }
    (up.stats, down.stats)
}

/// The client: it resends its request or its last ACK after `CLIENT_TIMEOUT` without
/// progress, gives up after 60 such resends in a row, and answers every resent final block
/// for as long as it dallies after the end.
const CLIENT: Settings = Settings {
    timeout: CLIENT_TIMEOUT,
    retries: 60,
    linger: u32::MAX,
    keep_payload: true,
};

/// Hears only the relay's "server TID" socket. Anything else is a stray from some other
/// program on this machine that sent to a port which is ours now: ignored, also before
/// the first reply (the transfer alone would take any port of the relay's address then).
struct FromRelay(SocketAddr);

impl Observer for FromRelay {
    fn received(&mut self, _: &ReadTransfer, from: SocketAddr, _: &[u8]) -> Verdict {
        if from == self.0 {
            Verdict::Deliver
        } else {
            Verdict::Ignore
        }
    }

    fn event(&mut self, _: &mut ReadTransfer, _: Event<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// Downloads `name` through `relay` with the library's client over a blocking socket
/// (testkit's `drive_with`), then dallies: answers the server's resent final block until
/// it has been quiet for `DALLY`.
fn lossy_fetch(
    relay: &Relay,
    name: &str,
    blksize: Option<u16>,
    window: Option<u16>,
) -> Result<(Vec<u8>, ClientStats), String> {
    let socket = UdpSocket::bind(v4()).map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut request = Request::new(name, dyntftp::Mode::Octet);
    if let Some(blksize) = blksize {
        request = request.blksize(blksize);
    }
    if let Some(window) = window {
        request = request.windowsize(window);
    }
    let mut transfer = ReadTransfer::new(Instant::now(), relay.listen, &request, CLIENT);
    let mut buf = vec![0u8; 65_536];
    drive_with(&socket, &mut transfer, &mut buf, &mut FromRelay(relay.tid))
        .map_err(|e| e.to_string())?;
    match transfer.outcome() {
        Some(Ok(_)) => {}
        Some(Err(dyntftp::client::ClientError::Server { code, message })) => {
            return Err(format!("ERROR {} {message}", code.to_u16()))
        }
        Some(Err(e)) => return Err(format!("{e} ({} bytes so far)", transfer.bytes())),
        None => return Err(format!("no end ({} bytes so far)", transfer.bytes())),
    }
    // Our final ACK may be lost: the transfer answers the resent last block again.
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < DALLY {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) if from == relay.tid => {
                quiet_since = Instant::now();
                transfer.handle_datagram(quiet_since, from, &buf[..len]);
                if let Some(transmit) = transfer.poll_transmit() {
                    socket
                        .send_to(transmit.contents, transmit.destination)
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let stats = *transfer.stats();
    Ok((transfer.into_data(), stats))
}

const SIZES: [usize; 10] = [0, 1, 511, 512, 513, 1024, 4000, 8192, 20_000, 50_000];

/// The parameters of transfer `i`: file size, blksize option, windowsize option.
fn plan(i: usize) -> (usize, Option<u16>, Option<u16>) {
    let size = SIZES[i % SIZES.len()];
    // Windows of 16 half the time, else lock-step: negotiated or plain RFC 1350.
    let window = match i % 4 {
        0 | 2 => Some(16),
        1 => Some(1),
        _ => None,
    };
    let blksize = match (i / 4) % 3 {
        0 => None,
        1 => Some(1024),
        _ => Some(1428),
    };
    (size, blksize, window)
}

struct Done {
    index: usize,
    started: std::time::SystemTime,
    peer: SocketAddr,
    up: LinkStats,
    down: LinkStats,
    client: ClientStats,
}

#[test]
fn transfers_survive_a_lossy_network() {
    let full = std::env::var("DYNTFTP_LOSSY_FULL").is_ok_and(|v| v == "1");
    let transfers = if full { 1000 } else { 100 };
    let workers = if full { 16 } else { 10 };
    let seed: u64 = std::env::var("DYNTFTP_LOSSY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1055);
    let root = TempDir::new("lossy");
    for &size in &SIZES {
        root.write(&format!("f{size}.bin"), &pseudo_random(size, size as u64));
    }
    let mut server = spawn_fs_with(Mode::OwnPort, v4(), root.path(), |b| {
        b.timeout(SERVER_TIMEOUT)
            .retries(SERVER_RETRIES)
            .stats_interval(Duration::from_millis(100))
    });
    let server_addr = server.addr;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (next, results, failures) = (next.clone(), results.clone(), failures.clone());
            thread::spawn(move || loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= transfers {
                    return;
                }
                let (size, blksize, window) = plan(index);
                let transfer_seed = seed.wrapping_mul(1_000_003).wrapping_add(index as u64);
                let started = std::time::SystemTime::now();
                let relay = Relay::start(server_addr, transfer_seed);
                let peer = relay.back;
                let name = format!("f{size}.bin");
                let got = lossy_fetch(&relay, &name, blksize, window);
                let (up, down) = relay.finish();
                match got {
                    Ok((data, client)) if data == pseudo_random(size, size as u64) => {
                        results.lock().unwrap().push(Done {
                            index,
                            started,
                            peer,
                            up,
                            down,
                            client,
                        })
                    }
                    Ok((data, _)) => failures.lock().unwrap().push(format!(
                        "transfer {index} (seed {transfer_seed}): {name} {blksize:?}/{window:?}: \
                         {} bytes that differ from the file",
                        data.len()
                    )),
                    Err(e) => failures.lock().unwrap().push(format!(
                        "transfer {index} (seed {transfer_seed}): {name} {blksize:?}/{window:?}: {e}"
                    )),
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker");
    }
    let elapsed = started.elapsed();
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failed transfers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let done = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(done.len(), transfers);

    // Every transfer had exactly one session, which ended well within its retry budget.
    // Relay ports are reused over a long run, so a session belongs to the last transfer
    // whose relay had its address and started before it.
    let mut sessions: BTreeMap<usize, SessionStats> = BTreeMap::new();
    for _ in 0..transfers {
        let s = server.next_session();
        let owner = done
            .iter()
            .filter(|d| d.peer == s.peer && d.started <= s.start_time)
            .max_by_key(|d| d.started)
            .unwrap_or_else(|| panic!("a session of no transfer: {s:?}"));
        let index = owner.index;
        assert!(
            sessions.insert(index, s).is_none(),
            "two sessions for transfer {index}"
        );
    }
    let (mut outcomes, mut retransmits, mut max_retransmits) = (BTreeMap::new(), 0, 0);
    let (mut up, mut down) = (LinkStats::default(), LinkStats::default());
    let mut client = ClientStats::default();
    for d in &done {
        let s = sessions
            .get(&d.index)
            .unwrap_or_else(|| panic!("no session for transfer {}", d.index));
        let (size, _, _) = plan(d.index);
        assert!(
            matches!(s.outcome, Outcome::Completed | Outcome::FinalAckMissing),
            "transfer {}: {:?}",
            d.index,
            s.outcome
        );
        assert_eq!(s.transfer.bytes_read, size as u64, "transfer {}", d.index);
        // Retries start over at each progress (an ACK that moves the window): no more
        // than the budget between two of them.
        let budget = u64::from(SERVER_RETRIES) * (s.transfer.acks + 1);
        assert!(
            s.transfer.retransmits <= budget,
            "transfer {}: {} retransmits for {} ACKs",
            d.index,
            s.transfer.retransmits,
            s.transfer.acks
        );
        *outcomes.entry(s.outcome.as_str()).or_insert(0) += 1;
        retransmits += s.transfer.retransmits;
        max_retransmits = max_retransmits.max(s.transfer.retransmits);
        up.add(&d.up);
        down.add(&d.down);
        client.timer_resends += d.client.timer_resends;
        client.gap_acks += d.client.gap_acks;
        client.repeat_acks += d.client.repeat_acks;
        client.linger_acks += d.client.linger_acks;
        client.duplicates += d.client.duplicates;
    }
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.sessions_started, transfers as u64);
    assert_eq!(total.panics, 0);
    // The network really was that bad.
    let loss = (up.dropped + down.dropped) as f64 / (up.offered + down.offered) as f64;
    assert!((0.17..0.23).contains(&loss), "measured loss {loss:.3}");
    assert!(up.duplicated > 0 && down.duplicated > 0 && up.delayed > 0 && down.delayed > 0);
    eprintln!(
        "lossy: {transfers} transfers in {elapsed:.1?} with {workers} clients at once; \
         outcomes {outcomes:?}; loss {:.1} %; client→server {up:?}; server→client {down:?}; \
         server retransmits {retransmits} (max {max_retransmits} in one session, budget \
         {SERVER_RETRIES} per progress); client: {} timer resends, {} gap ACKs, {} repeat \
         ACKs, {} final ACKs again, {} duplicates dropped",
        loss * 100.0,
        client.timer_resends,
        client.gap_acks,
        client.repeat_acks,
        client.linger_acks,
        client.duplicates,
    );
}

both_modes!(a_repeated_request_brings_a_lost_first_reply_again);
/// Issue 16, item 2: GRUB repeats its request when the OACK was lost. The driver hands the
/// repeat to the running session, which resends its OACK (a retry spent). The server's
/// timer is 30 s here, so a second OACK within the test can only come from a repeat; the
/// client repeats every 50 ms (its socket's read timeout, not a sleep) until it does.
fn a_repeated_request_brings_a_lost_first_reply_again(mode: Mode) {
    let root = TempDir::new("repeat");
    let file = pseudo_random(3000, 16);
    root.write("grub.efi", &file);
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(30))
    });
    let raw = Raw::new(server.addr);
    let options = [("blksize", "1024"), ("tsize", "0")];
    raw.rrq(server.addr, b"grub.efi", "octet", &options);
    // The first OACK "is lost": the client never answers it.
    let (first, tid) = raw.recv();
    assert!(matches!(Packet::parse(&first), Ok(Packet::Oack(_))));
    let mut repeats = 0;
    let again = loop {
        assert!(
            repeats < 100,
            "no OACK again after {repeats} repeated requests"
        );
        raw.rrq(server.addr, b"grub.efi", "octet", &options);
        repeats += 1;
        if let Some((datagram, from)) = raw.recv_within(Duration::from_millis(50)) {
            assert_eq!(from, tid, "from the session");
            break datagram;
        }
    };
    assert_eq!(again, first, "the same OACK");
    // Then the transfer runs as usual (one OACK per repeat at most, never one each: the
    // repeats sent meanwhile may bring one more before ACK 0).
    raw.ack(tid, 0);
    let mut received = Vec::new();
    let mut block = 1;
    // 3000 bytes: blocks 1 and 2 full, block 3 short.
    while block <= 3 {
        let (datagram, _) = raw.recv();
        match Packet::parse(&datagram) {
            // A repeat that crossed the second OACK may have brought a third.
            Ok(Packet::Oack(_)) => continue,
            Ok(Packet::Data { block: got, data }) if got == block => {
                received.extend_from_slice(data);
                raw.ack(tid, block);
                block += 1;
            }
            Ok(Packet::Data { .. }) => continue,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(received, file);
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed);
    let t = &stats.transfer;
    assert!(t.repeated_requests >= 1 && t.repeat_resends >= 1, "{t:?}");
    assert!(t.repeat_resends <= 2, "{t:?}");
    assert_eq!(t.retransmits, t.repeat_resends, "not the 30 s timer: {t:?}");
}
