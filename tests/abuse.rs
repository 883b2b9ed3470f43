//! Abuse limits over loopback: the per-client request rate, the per-client session cap,
//! the retry budget of an unanswered first packet (what a spoofed request costs), the rate
//! limit on warnings, and what unacknowledged (possibly spoofed) sessions give way to: a
//! different request from their address and port, their client's newer requests, a full
//! server's newcomers. Loopback is exempt by default, so these servers opt in with
//! `limit_loopback(true)`; 127.0.0.1 and 127.0.0.2 are two different clients.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use dyntftp::{Outcome, Packet, Rate};
use testkit::*;

/// How long silence is awaited where silence is the expected answer.
const SILENCE: Duration = Duration::from_millis(300);

fn raw_on(ip: [u8; 4]) -> Raw {
    let socket = UdpSocket::bind(SocketAddr::from((ip, 0))).expect("bind");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    Raw { socket }
}

fn is_data_1(datagram: &[u8]) -> bool {
    matches!(Packet::parse(datagram), Ok(Packet::Data { block: 1, .. }))
}

/// Fetches the one-block `small.txt` with `raw` and waits for its session to be reported,
/// which orders every datagram sent to the listener before it ahead of the next report.
fn fetch_small(server: &mut ServerGuard, raw: &Raw) {
    raw.rrq(server.addr, b"small.txt", "octet", &[]);
    let (block, data, tid) = raw.expect_data();
    assert_eq!((block, &data[..]), (1, SMALL));
    raw.ack(tid, 1);
    loop {
        let finished = server.next_session();
        if finished.peer == raw.local_addr() {
            assert_eq!(finished.outcome, Outcome::Completed);
            return;
        }
    }
}

both_modes!(requests_over_the_rate_are_dropped_unanswered);
fn requests_over_the_rate_are_dropped_unanswered(mode: Mode) {
    if !loopback_127_0_0_2("requests_over_the_rate_are_dropped_unanswered") {
        return;
    }
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.limit_loopback(true)
            .request_rate(Some(Rate {
                per_second: 0.0,
                burst: 5,
            }))
            .stats_interval(Duration::from_millis(50))
    });
    let clients: Vec<Raw> = (0..20).map(|_| raw_on([127, 0, 0, 1])).collect();
    for raw in &clients {
        raw.rrq(server.addr, b"small.txt", "octet", &[]);
    }
    let mut answered = 0;
    // One silence period for all of them.
    let deadline = Instant::now() + SILENCE;
    for raw in &clients {
        let left = deadline.saturating_duration_since(Instant::now());
        if let Some((datagram, _)) = raw.recv_within(left) {
            assert!(is_data_1(&datagram), "{datagram:?}");
            answered += 1;
        }
    }
    assert_eq!(answered, 5, "the burst, then nothing (the rate is zero)");
    // Another client has its own bucket.
    fetch_small(&mut server, &raw_on([127, 0, 0, 2]));
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.rate_limited, 15);
    assert_eq!(total.requests, 6, "dropped datagrams are not even parsed");
}

both_modes!(loopback_clients_are_exempt_by_default);
fn loopback_clients_are_exempt_by_default(mode: Mode) {
    let root = standard_root();
    let server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.request_rate(Some(Rate {
            per_second: 0.0,
            burst: 1,
        }))
        .max_sessions_per_client(Some(1))
    });
    let clients: Vec<Raw> = (0..5).map(|_| Raw::new(server.addr)).collect();
    for raw in &clients {
        raw.rrq(server.addr, b"big.bin", "octet", &[]);
    }
    for raw in &clients {
        assert!(is_data_1(&raw.recv().0));
    }
}

both_modes!(sessions_per_client_are_capped);
fn sessions_per_client_are_capped(mode: Mode) {
    if !loopback_127_0_0_2("sessions_per_client_are_capped") {
        return;
    }
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.limit_loopback(true)
            .request_rate(None)
            .max_sessions_per_client(Some(2))
            .stats_interval(Duration::from_millis(50))
    });
    // Two verified sessions (their client acknowledged block 1), left waiting for the
    // ACK of block 2.
    let first = raw_on([127, 0, 0, 1]);
    let second = raw_on([127, 0, 0, 1]);
    let session_tid = verified_session(&server, &first);
    verified_session(&server, &second);
    // The third from the same client is refused with a reason.
    let third = raw_on([127, 0, 0, 1]);
    third.rrq(server.addr, b"big.bin", "octet", &[]);
    let (code, message, _) = third.expect_error();
    assert_eq!(code, 0);
    assert!(message.contains("too many"), "{message}");
    // Another client is not affected.
    let other = raw_on([127, 0, 0, 2]);
    other.rrq(server.addr, b"small.txt", "octet", &[]);
    assert_eq!(other.expect_data().0, 1);
    // When one of the two ends, the client may start another.
    let mut error = Vec::new();
    dyntftp::packet::write_error(&mut error, dyntftp::ErrorCode::NotDefined, "cancelled");
    first.send(session_tid, &error);
    loop {
        let finished = server.next_session();
        if finished.peer == first.local_addr() {
            assert!(matches!(finished.outcome, Outcome::PeerError(_)));
            break;
        }
    }
    let fourth = raw_on([127, 0, 0, 1]);
    fourth.rrq(server.addr, b"big.bin", "octet", &[]);
    assert_eq!(fourth.expect_data().0, 1);
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.client_limited, 1);
    assert_eq!(total.rejected.get(&0), Some(&1));
}

/// Starts a `big.bin` session from `raw` and acknowledges block 1, which makes it
/// verified; returns the session's address once block 2 came.
fn verified_session(server: &ServerGuard, raw: &Raw) -> SocketAddr {
    raw.rrq(server.addr, b"big.bin", "octet", &[]);
    let (block, _, tid) = raw.expect_data();
    assert_eq!(block, 1);
    raw.ack(tid, 1);
    assert_eq!(raw.expect_data().0, 2);
    tid
}

/// What a spoofed request costs: the first packet and exactly `retries` resends, then
/// the session ends.
fn unanswered_first_packet(mode: Mode, options: &[(&str, &str)], want_oack: bool) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_millis(40)).retries(3)
    });
    let victim = Raw::new(server.addr);
    victim.rrq(server.addr, b"big.bin", "octet", options);
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::TimedOut);
    assert_eq!(stats.transfer.retransmits, 3);
    // Everything was sent before the session ended: it is all queued now.
    let mut received = Vec::new();
    while let Some((datagram, _)) = victim.recv_within(Duration::from_millis(50)) {
        received.push(datagram);
    }
    assert_eq!(received.len(), 4, "first packet + 3 retries");
    for datagram in &received {
        match Packet::parse(datagram) {
            Ok(Packet::Oack(_)) => assert!(want_oack),
            Ok(Packet::Data { block: 1, .. }) => assert!(!want_oack),
            other => panic!("unexpected {other:?}"),
        }
    }
}

both_modes!(an_unanswered_first_data_is_resent_exactly_the_retry_budget);
fn an_unanswered_first_data_is_resent_exactly_the_retry_budget(mode: Mode) {
    unanswered_first_packet(mode, &[], false);
}

both_modes!(an_unanswered_oack_is_resent_exactly_the_retry_budget);
fn an_unanswered_oack_is_resent_exactly_the_retry_budget(mode: Mode) {
    unanswered_first_packet(mode, &[("blksize", "1428"), ("windowsize", "16")], true);
}

both_modes!(a_spoofed_request_with_timeout_255_ends_at_the_progress_timeout);
/// A request that asks for the longest `timeout` (255 s, so its first resend would come
/// after 255 s and its retries after 1,530 s) ends when the progress timeout says, having
/// cost one packet.
fn a_spoofed_request_with_timeout_255_ends_at_the_progress_timeout(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.progress_timeout(Duration::from_millis(200))
    });
    let victim = Raw::new(server.addr);
    victim.rrq(server.addr, b"big.bin", "octet", &[("timeout", "255")]);
    let stats = server.next_session();
    assert_eq!(stats.peer, victim.local_addr());
    assert_eq!(stats.outcome, Outcome::TimedOut);
    assert_eq!(
        (stats.transfer.retransmits, stats.transfer.packets_sent),
        (0, 1)
    );
    // The one OACK, and nothing after it.
    let (first, _) = victim.recv();
    assert!(matches!(Packet::parse(&first), Ok(Packet::Oack(_))));
    assert!(victim.recv_within(SILENCE).is_none());
}

#[test]
fn a_progress_timeout_of_zero_is_refused() {
    let root = standard_root();
    let handler = dyntftp::FsHandler::new(root.path()).expect("handler");
    let built = dyntftp::ServerBuilder::new(handler)
        .bind(v4())
        .progress_timeout(Duration::ZERO)
        .build();
    match built {
        Err(dyntftp::Error::Config(message)) => assert!(message.contains("progress timeout")),
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a zero progress timeout was accepted"),
    }
}

/// Warnings captured from the server threads of this test binary.
struct Capture {
    lines: Mutex<Vec<String>>,
}

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            self.lines.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

fn captured() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
        }));
        log::set_logger(capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Warn);
        capture
    })
}

both_modes!(a_flood_writes_a_bounded_number_of_warnings);
fn a_flood_writes_a_bounded_number_of_warnings(mode: Mode) {
    if !loopback_127_0_0_2("a_flood_writes_a_bounded_number_of_warnings") {
        return;
    }
    let capture = captured();
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.limit_loopback(true)
            .request_rate(Some(Rate {
                per_second: 0.0,
                burst: 1,
            }))
            .stats_interval(Duration::from_millis(50))
    });
    let flood = Raw::new(server.addr);
    let port = flood.local_addr().port();
    let mut rrq = Vec::new();
    dyntftp::client::write_rrq(&mut rrq, b"small.txt", "octet", []);
    // In batches small enough for the listener's receive buffer, each followed by a
    // request from another client (its own bucket) whose session orders the counters.
    for batch in 0..10u8 {
        for _ in 0..50 {
            flood.send(server.addr, &rrq);
        }
        fetch_small(&mut server, &raw_on([127, 0, 0, 2 + batch]));
    }
    let total = sum_reports(&server.reports_until_next());
    assert_eq!((total.requests, total.rate_limited), (1 + 10, 499));
    let mine = format!(":{port}: over the request rate limit");
    let lines = capture.lines.lock().unwrap();
    let warnings = lines.iter().filter(|l| l.contains(&mine)).count();
    assert_eq!(warnings, 10, "one burst of the log limiter, then silence");
}

/// The next finished sessions up to `peer`'s, which must have completed: how many of the
/// others were evicted.
fn evicted_before(server: &mut ServerGuard, peer: SocketAddr) -> usize {
    let mut evicted = 0;
    loop {
        let finished = server.next_session();
        if finished.peer == peer {
            assert_eq!(finished.outcome, Outcome::Completed);
            return evicted;
        }
        assert_eq!(finished.outcome, Outcome::Evicted, "{finished:?}");
        evicted += 1;
    }
}

/// Receives until DATA 1 carrying `small.txt`, skipping anything else; returns its TID.
fn small_data_1(raw: &Raw) -> SocketAddr {
    loop {
        let (datagram, from) = raw.recv();
        if let Ok(Packet::Data { block: 1, data }) = Packet::parse(&datagram) {
            if data == SMALL {
                return from;
            }
        }
    }
}

both_modes!(a_different_request_from_the_same_port_replaces_an_unacknowledged_session);
fn a_different_request_from_the_same_port_replaces_an_unacknowledged_session(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs(mode, v4(), root.path());
    let victim = Raw::new(server.addr);
    // What a spoofer would send in the victim's name (same address and port), first.
    victim.rrq(server.addr, b"big.bin", "octet", &[]);
    // The victim's own request names another file: it replaces the session.
    victim.rrq(server.addr, b"small.txt", "octet", &[]);
    let tid = small_data_1(&victim);
    victim.ack(tid, 1);
    let first = server.next_session();
    assert_eq!(first.filename, "big.bin");
    assert_eq!(first.outcome, Outcome::Evicted);
    assert_eq!(first.transfer.retransmits, 0);
    let second = server.next_session();
    assert_eq!(
        (second.filename.as_str(), second.outcome),
        ("small.txt", Outcome::Completed)
    );
    // An identical request is a repeat: one session, one DATA 1 (the next one would come
    // after a timeout of 1 s).
    victim.rrq(server.addr, b"big.bin", "octet", &[]);
    victim.rrq(server.addr, b"big.bin", "octet", &[]);
    let (block, _, tid) = victim.expect_data();
    assert_eq!(block, 1);
    assert_eq!(
        victim.recv_within(SILENCE),
        None,
        "one DATA 1 for the two copies"
    );
    let mut error = Vec::new();
    dyntftp::packet::write_error(&mut error, dyntftp::ErrorCode::NotDefined, "enough");
    victim.send(tid, &error);
    let third = server.next_session();
    assert_eq!(third.filename, "big.bin");
    assert!(matches!(third.outcome, Outcome::PeerError(_)), "{third:?}");
}

both_modes!(spoofed_requests_from_a_clients_address_cannot_lock_it_out);
fn spoofed_requests_from_a_clients_address_cannot_lock_it_out(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.limit_loopback(true)
            .request_rate(None)
            .max_sessions_per_client(Some(4))
            .max_unverified_per_client(Some(4))
    });
    // 64 requests from the client's address that are never acknowledged, as spoofed
    // ones would be: each at the cap of 4 unverified sessions ends the oldest.
    let spoofed: Vec<Raw> = (0..64).map(|_| raw_on([127, 0, 0, 1])).collect();
    for raw in &spoofed {
        raw.rrq(server.addr, b"big.bin", "octet", &[]);
    }
    let client = raw_on([127, 0, 0, 1]);
    fetch_small_quietly(&client, &server);
    assert_eq!(evicted_before(&mut server, client.local_addr()), 64 - 4 + 1);
}

/// Fetches `small.txt` without waiting for its report.
fn fetch_small_quietly(raw: &Raw, server: &ServerGuard) {
    raw.rrq(server.addr, b"small.txt", "octet", &[]);
    let (block, data, tid) = raw.expect_data();
    assert_eq!((block, &data[..]), (1, SMALL));
    raw.ack(tid, 1);
}

both_modes!(a_full_server_gives_an_unacknowledged_slot_to_a_new_request);
fn a_full_server_gives_an_unacknowledged_slot_to_a_new_request(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        // Unverified sessions give way after one timeout; they would live much longer.
        b.max_sessions(2)
            .timeout(Duration::from_millis(100))
            .retries(20)
    });
    let holders = [Raw::new(server.addr), Raw::new(server.addr)];
    for raw in &holders {
        raw.rrq(server.addr, b"big.bin", "octet", &[]);
        assert_eq!(raw.expect_data().0, 1);
    }
    // Both slots are held by sessions that never got an ACK: the newcomer is served
    // (waiting at most one timeout), and the older of the two gave way.
    let newcomer = Raw::new(server.addr);
    fetch_small_quietly(&newcomer, &server);
    let first = server.next_session();
    assert_eq!(first.peer, holders[0].local_addr());
    assert_eq!(first.outcome, Outcome::Evicted);
    assert_eq!(evicted_before(&mut server, newcomer.local_addr()), 0);
    // Verified sessions keep their slots: with two of them, a request waits.
    let verified: Vec<Raw> = (0..2).map(|_| Raw::new(server.addr)).collect();
    let mut tids = Vec::new();
    for raw in &verified {
        raw.rrq(server.addr, b"big.bin", "octet", &[]);
        let (_, _, tid) = raw.expect_data();
        raw.ack(tid, 1);
        assert_eq!(raw.expect_data().0, 2);
        tids.push(tid);
    }
    let evicted = server.next_session();
    assert_eq!(evicted.peer, holders[1].local_addr());
    assert_eq!(evicted.outcome, Outcome::Evicted);
    let late = Raw::new(server.addr);
    late.rrq(server.addr, b"small.txt", "octet", &[]);
    assert_eq!(late.recv_within(SILENCE), None, "no slot gives way");
    // One of them ends: the waiting request gets its slot.
    let mut error = Vec::new();
    dyntftp::packet::write_error(&mut error, dyntftp::ErrorCode::NotDefined, "done");
    verified[0].send(tids[0], &error);
    let (block, data, tid) = late.expect_data();
    assert_eq!((block, &data[..]), (1, SMALL));
    late.ack(tid, 1);
}

#[test]
fn single_port_datagrams_that_make_no_progress_spend_the_request_rate() {
    if !loopback_127_0_0_2("single_port_datagrams_that_make_no_progress_spend_the_request_rate") {
        return;
    }
    let root = standard_root();
    let mut server = spawn_fs_with(Mode::SinglePort, v4(), root.path(), |b| {
        b.limit_loopback(true)
            .request_rate(Some(Rate {
                per_second: 0.0,
                burst: 8,
            }))
            .stats_interval(Duration::from_millis(50))
    });
    // Progress ACKs are free: one token for the request, none for ten ACKs.
    let client = raw_on([127, 0, 0, 1]);
    client.rrq(server.addr, b"big.bin", "octet", &[]);
    for block in 1..=10u16 {
        let (got, _, tid) = client.expect_data();
        assert_eq!(got, block);
        client.ack(tid, block);
    }
    assert_eq!(client.expect_data().0, 11);
    // Duplicate ACKs and junk to the session are not: six of them and one more request
    // spend the other seven tokens.
    for _ in 0..3 {
        client.ack(server.addr, 10);
        client.send(server.addr, b"\xde\xad");
    }
    let second = raw_on([127, 0, 0, 1]);
    second.rrq(server.addr, b"small.txt", "octet", &[]);
    assert_eq!(second.expect_data().0, 1);
    let third = raw_on([127, 0, 0, 1]);
    third.rrq(server.addr, b"small.txt", "octet", &[]);
    assert_eq!(third.recv_within(SILENCE), None, "over the rate");
    // Another client orders the counters.
    fetch_small(&mut server, &raw_on([127, 0, 0, 2]));
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.rate_limited, 1);
}
