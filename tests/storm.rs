//! A boot storm in miniature, as a correctness test (no timing assertions): 1,000 clients
//! start at once against one server loop and each fetches a 64 KiB file, in lock step and
//! with windowsize 16. Each client is the library's `ReadTransfer`; all of them share one
//! thread and one mio poll over their 1,000 sockets. Every transfer must complete with the
//! exact bytes, from a port of its session's own, every session must be reported, and
//! nothing may be left running. The 10,000-client version with figures is
//! `bench/storm.sh`.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dyntftp::client::{ReadTransfer, Request, Settings};
use dyntftp::Outcome;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use testkit::*;

const CLIENTS: usize = 1000;
const SIZE: usize = 64 * 1024;
/// The whole storm must be over within this (a bound, not a speed assertion: on a loaded
/// machine it takes a few seconds).
const LIMIT: Duration = Duration::from_secs(120);

/// The clients' settings: a client resends its request or its last ACK after 1 s without
/// news, and gives up only after a minute of it (the storm's own limit comes first).
const CLIENT: Settings = Settings {
    timeout: Duration::from_secs(1),
    retries: 60,
    linger: 2,
    keep_payload: true,
};

/// One client: its non-blocking socket, registered with the poll, and its transfer.
struct StormClient {
    socket: UdpSocket,
    transfer: ReadTransfer,
    done: bool,
}

impl StormClient {
    /// Sends what the transfer has to send, if anything (a send that fails is a lost
    /// datagram: the timers repair it).
    fn transmit(&mut self) {
        if let Some(transmit) = self.transfer.poll_transmit() {
            let _ = self.socket.send_to(transmit.contents, transmit.destination);
        }
    }

    /// Marks the client done when its transfer just ended; panics if it failed.
    fn just_ended(&mut self, i: usize) -> bool {
        match self.transfer.outcome() {
            None => false,
            Some(_) if self.done => false,
            Some(Ok(_)) => {
                self.done = true;
                true
            }
            Some(Err(e)) => panic!("client {i}: {e} ({:?})", self.transfer),
        }
    }
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
    let request = match window {
        1 => Request::new("kernel", dyntftp::Mode::Octet),
        _ => Request::new("kernel", dyntftp::Mode::Octet).windowsize(window),
    };
    let now = Instant::now();
    let mut clients: Vec<StormClient> = (0..clients)
        .map(|i| {
            let mut socket = UdpSocket::bind(v4()).unwrap();
            poll.registry()
                .register(&mut socket, Token(i), Interest::READABLE)
                .unwrap();
            StormClient {
                socket,
                transfer: ReadTransfer::new(now, server.addr, &request, CLIENT),
                done: false,
            }
        })
        .collect();
    // Everyone asks at once.
    for client in &mut clients {
        client.transmit();
    }
    let started = Instant::now();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 65_536];
    let mut remaining = clients.len();
    while remaining > 0 {
        assert!(
            started.elapsed() < LIMIT,
            "{remaining} of {} transfers unfinished after {LIMIT:?}",
            clients.len()
        );
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        let now = Instant::now();
        for event in events.iter() {
            let i = event.token().0;
            let client = &mut clients[i];
            loop {
                let (len, from) = match client.socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("client receive: {e}"),
                };
                // The transfer takes the first reply from the server's address as the
                // session's TID and ignores anything else (a stray from another program
                // that sent to a port which is ours now). After the end it still answers
                // a resent final block.
                client.transfer.handle_datagram(now, from, &buf[..len]);
                client.transmit();
            }
            if client.just_ended(i) {
                remaining -= 1;
            }
        }
        // The clients' own retransmissions: the request or the last ACK.
        for (i, client) in clients.iter_mut().enumerate() {
            if client
                .transfer
                .deadline()
                .is_some_and(|deadline| now >= deadline)
            {
                client.transfer.handle_timeout(now);
                client.transmit();
                if client.just_ended(i) {
                    remaining -= 1;
                }
            }
        }
    }
    for (i, client) in clients.iter().enumerate() {
        let (received, tid) = (client.transfer.data(), client.transfer.peer());
        if *received != *expected {
            let first = received
                .iter()
                .zip(expected.iter())
                .position(|(a, b)| a != b);
            panic!(
                "client {i}: content differs: {} bytes received, {} expected, first difference at {first:?}, server {tid:?}",
                received.len(),
                expected.len(),
            );
        }
        // Each session answered from a port of its own.
        let tid = tid.expect("the server answered");
        assert!(
            tid.ip() == server.addr.ip() && tid.port() != server.addr.port(),
            "client {i}: served from {tid}, the listener is {}",
            server.addr
        );
    }
    let clients = clients.len();
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
