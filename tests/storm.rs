//! A boot storm in miniature, as a correctness test (no timing assertions): 1,000 clients
//! start at once against one server loop and each fetches a 64 KiB file, in lock step and
//! with windowsize 16. Every transfer must complete with the exact bytes, every session
//! must be reported, and nothing may be left running. The 10,000-client version with
//! figures is `bench/storm.sh`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dyntftp::client::{write_ack, write_rrq};
use dyntftp::{Outcome, Packet};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use testkit::*;

const CLIENTS: usize = 1000;
const SIZE: usize = 64 * 1024;
/// The whole storm must be over within this (a bound, not a speed assertion: on a loaded
/// machine it takes a few seconds).
const LIMIT: Duration = Duration::from_secs(120);

struct Transfer {
    socket: UdpSocket,
    received: Vec<u8>,
    next: u16,
    done: bool,
    last_sent: Instant,
    rrq: Vec<u8>,
    server: Option<SocketAddr>,
    last_ack: Vec<u8>,
}

fn storm(window: u16) {
    // Client sockets, server sockets and spare descriptors.
    let limit = sys::raise_fd_limit(3 * CLIENTS as u64 + 256);
    let clients = CLIENTS.min((limit.saturating_sub(256) / 2) as usize);
    if clients < CLIENTS {
        eprintln!("descriptor limit {limit}: {clients} clients instead of {CLIENTS}");
    }
    let data: Arc<[u8]> = pseudo_random(SIZE, u64::from(window)).into();
    let expected = data.clone();
    let mut server = spawn_server(
        Mode::OwnPort,
        v4(),
        move || Box::new(SharedBytes(data)),
        move |b| {
            b.max_sessions(clients + 10)
                .timeout(Duration::from_millis(500))
                .retries(10)
                .stats_interval(Duration::from_millis(100))
        },
    );
    let mut poll = Poll::new().unwrap();
    let mut transfers = Vec::with_capacity(clients);
    let options: Vec<(&str, String)> = if window > 1 {
        vec![("windowsize", window.to_string())]
    } else {
        Vec::new()
    };
    for i in 0..clients {
        let mut socket = UdpSocket::bind(v4()).unwrap();
        poll.registry()
            .register(&mut socket, Token(i), Interest::READABLE)
            .unwrap();
        let mut rrq = Vec::new();
        write_rrq(
            &mut rrq,
            b"kernel",
            "octet",
            options.iter().map(|(n, v)| (*n, v.as_str())),
        );
        transfers.push(Transfer {
            socket,
            received: Vec::with_capacity(SIZE),
            next: 1,
            done: false,
            last_sent: Instant::now(),
            rrq,
            server: None,
            last_ack: Vec::new(),
        });
    }
    // Everyone asks at once.
    for t in &mut transfers {
        t.socket.send_to(&t.rrq, server.addr).unwrap();
        t.last_sent = Instant::now();
    }
    let started = Instant::now();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 65_536];
    let mut remaining = clients;
    while remaining > 0 {
        assert!(
            started.elapsed() < LIMIT,
            "{remaining} of {clients} transfers unfinished after {LIMIT:?}"
        );
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for event in events.iter() {
            let t = &mut transfers[event.token().0];
            loop {
                let (len, from) = match t.socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client receive: {e}"),
                };
                // Only the session's TID counts once known (anything else is a stray from
                // another program that sent to a port which is ours now).
                if t.done || t.server.is_some_and(|tid| tid != from) {
                    continue;
                }
                let reply = match Packet::parse(&buf[..len]) {
                    Ok(Packet::Oack(_)) => Some(0),
                    Ok(Packet::Data { block, data }) if block == t.next => {
                        t.received.extend_from_slice(data);
                        t.next = t.next.wrapping_add(1);
                        let last = data.len() < 512;
                        if last {
                            t.done = true;
                            remaining -= 1;
                        }
                        (last || block % window == 0).then_some(block)
                    }
                    // Out of order or repeated: acknowledge what we have, once.
                    Ok(Packet::Data { .. }) => Some(t.next.wrapping_sub(1)),
                    other => panic!("client got {other:?}"),
                };
                t.server = Some(from);
                if let Some(block) = reply {
                    t.last_ack.clear();
                    write_ack(&mut t.last_ack, block);
                    let _ = t.socket.send_to(&t.last_ack, from);
                    t.last_sent = Instant::now();
                }
            }
        }
        // A client's own retransmission: its request or its last ACK, after 1 s of silence.
        let now = Instant::now();
        for t in transfers.iter_mut().filter(|t| !t.done) {
            if now.duration_since(t.last_sent) >= Duration::from_secs(1) {
                match t.server {
                    None => drop(t.socket.send_to(&t.rrq, server.addr)),
                    Some(to) => drop(t.socket.send_to(&t.last_ack, to)),
                }
                t.last_sent = now;
            }
        }
    }
    for (i, t) in transfers.iter().enumerate() {
        if t.received != *expected {
            let first = t
                .received
                .iter()
                .zip(expected.iter())
                .position(|(a, b)| a != b);
            panic!(
                "client {i}: content differs: {} bytes received, {} expected, first difference at {first:?}, server {:?}",
                t.received.len(),
                expected.len(),
                t.server
            );
        }
    }
    let sessions = server.sessions(clients);
    let mut outcomes: HashMap<Outcome, usize> = HashMap::new();
    for s in &sessions {
        *outcomes.entry(s.outcome).or_default() += 1;
    }
    assert_eq!(
        outcomes.get(&Outcome::Completed),
        Some(&clients),
        "{outcomes:?}"
    );
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.sessions_started, clients as u64);
    eprintln!(
        "{clients} clients, windowsize {window}: done in {:?} (for information)",
        started.elapsed()
    );
}

#[test]
fn a_thousand_clients_in_lock_step() {
    storm(1);
}

#[test]
fn a_thousand_clients_with_windowsize_16() {
    storm(16);
}
