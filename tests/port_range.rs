//! `ServerBuilder::port_range`: every session socket (and every refusal's) binds a port of
//! the range, in turn; when all are in use, new requests wait for one instead of failing.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::ops::RangeInclusive;
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::Outcome;
use testkit::*;

/// `count` consecutive ports that are free on 127.0.0.1 now, below the kernel's ephemeral
/// range (32768 and up by default), so that no socket bound to port 0 takes one later.
fn free_ports(count: u16) -> RangeInclusive<u16> {
    let mut rng = Rng::new(u64::from(std::process::id()) ^ (u64::from(count) << 32));
    for _ in 0..200 {
        let low = rng.between(20_000, u64::from(32_000 - count)) as u16;
        let high = low + count - 1;
        let held: Result<Vec<UdpSocket>, _> = (low..=high)
            .map(|port| UdpSocket::bind(("127.0.0.1", port)))
            .collect();
        if held.is_ok() {
            return low..=high;
        }
    }
    panic!("no {count} consecutive free ports between 20000 and 32000");
}

#[test]
fn every_session_and_refusal_answers_from_a_port_of_the_range() {
    let ports = free_ports(4);
    let range = ports.clone();
    let root = standard_root();
    let server = spawn_fs_with(Mode::OwnPort, v4(), root.path(), move |b| {
        b.port_range(range)
    });
    // One after the other: each session starts after the port the previous one took,
    // so eight of them go round the range twice.
    let mut used = Vec::new();
    for i in 0..8 {
        let fetched = Client::new(Mode::OwnPort, server.addr)
            .fetch(server.addr, "small.txt", "octet", &[])
            .unwrap_or_else(|e| panic!("fetch {i}: {e:?}"));
        assert_eq!(fetched.data, SMALL);
        assert!(ports.contains(&fetched.server.port()), "{fetched:?}");
        used.push(fetched.server.port());
    }
    let all: BTreeSet<u16> = ports.clone().collect();
    assert_eq!(
        used.iter().copied().collect::<BTreeSet<_>>(),
        all,
        "{used:?}"
    );
    assert_eq!(used[..4], used[4..], "in turn: {used:?}");
    // At once: four sessions, four different ports of the range.
    let addr = server.addr;
    let fetchers: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                Client::new(Mode::OwnPort, addr)
                    .fetch(addr, "big.bin", "octet", &[("blksize", "1428")])
                    .map(|f| f.server.port())
            })
        })
        .collect();
    let concurrent: BTreeSet<u16> = fetchers
        .into_iter()
        .map(|f| f.join().expect("fetcher panicked").expect("fetch"))
        .collect();
    assert!(
        concurrent.is_subset(&all),
        "{concurrent:?} not in {ports:?}"
    );
    // A refused request's ERROR comes from the range too.
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"no-such-file", "octet", &[]);
    let (code, _, from) = raw.expect_error();
    assert_eq!(code, 1);
    assert!(ports.contains(&from.port()), "ERROR from {from}");
}

#[test]
fn a_full_range_makes_the_next_request_wait_for_a_port() {
    // Three ports, one of them held by another socket (as another program might): the
    // server may run three sessions but finds only two ports.
    let ports = free_ports(3);
    let range = ports.clone();
    let _other = UdpSocket::bind(("127.0.0.1", *ports.end())).expect("hold a port");
    let root = standard_root();
    // A long timeout: nothing is resent while the test holds sessions open.
    let mut server = spawn_fs_with(Mode::OwnPort, v4(), root.path(), move |b| {
        b.port_range(range)
            .timeout(Duration::from_secs(30))
            .stats_interval(Duration::from_millis(50))
    });
    let clients: Vec<Raw> = (0..3).map(|_| Raw::new(server.addr)).collect();
    for raw in &clients {
        raw.rrq(server.addr, b"small.txt", "octet", &[]);
    }
    // The first two take both ports and hold them: neither acknowledges yet.
    let mut tids = Vec::new();
    for raw in &clients[..2] {
        let (block, data, tid) = raw.expect_data();
        assert_eq!((block, data.as_slice()), (1, SMALL));
        assert!(ports.contains(&tid.port()), "{tid}");
        tids.push(tid);
    }
    assert_ne!(tids[0], tids[1]);
    // The third found no free port: the server says so in its statistics.
    let deadline = Instant::now() + WAIT;
    let mut reports = Vec::new();
    while sum_reports(&reports).port_pauses == 0 {
        assert!(Instant::now() < deadline, "no port pause reported");
        reports.extend(server.reports_until_next());
    }
    // The first finishes: its port is free, and the third is served from it.
    clients[0].ack(tids[0], 1);
    let (block, data, tid) = clients[2].expect_data();
    assert_eq!((block, data.as_slice()), (1, SMALL));
    assert_eq!(tid, tids[0], "the third session took the freed port");
    clients[1].ack(tids[1], 1);
    clients[2].ack(tid, 1);
    let sessions = server.sessions(3);
    assert!(
        sessions.iter().all(|s| s.outcome == Outcome::Completed),
        "{sessions:?}"
    );
    reports.extend(server.stop().1);
    let total = sum_reports(&reports);
    assert_eq!(total.sessions_started, 3);
    assert!(total.rejected.is_empty(), "{:?}", total.rejected);
    assert_eq!((total.busy, total.descriptor_pauses), (0, 0));
}

#[test]
fn a_range_held_by_unacknowledged_requests_gives_their_slots_away() {
    // Two ports, both taken by requests that are never acknowledged (what spoofed ones
    // look like): max_sessions is the range's size, so a third request takes the oldest
    // one's slot once it has had its retransmission timeout, instead of waiting for a
    // port that will not free for the whole retry schedule.
    let ports = free_ports(2);
    let range = ports.clone();
    let root = standard_root();
    let mut server = spawn_fs_with(Mode::OwnPort, v4(), root.path(), move |b| {
        b.port_range(range)
            .timeout(Duration::from_millis(200))
            .stats_interval(Duration::from_millis(50))
    });
    let silent: Vec<Raw> = (0..2).map(|_| Raw::new(server.addr)).collect();
    for raw in &silent {
        raw.rrq(server.addr, b"small.txt", "octet", &[]);
        let (_, _, tid) = raw.expect_data();
        assert!(ports.contains(&tid.port()), "{tid}");
    }
    let client = Client::new(Mode::OwnPort, server.addr);
    let got = client
        .fetch(server.addr, "small.txt", "octet", &[])
        .expect("served from a port of the range");
    assert_eq!(got.data, SMALL);
    assert!(ports.contains(&got.server.port()), "{}", got.server);
    let sessions = server.sessions(2);
    let outcomes: Vec<Outcome> = sessions.iter().map(|s| s.outcome).collect();
    assert!(outcomes.contains(&Outcome::Evicted), "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Completed), "{outcomes:?}");
    let total = sum_reports(&server.stop().1);
    assert_eq!(total.port_pauses, 0, "no request waited for a port");
}
