//! ICMP errors end sessions: a session's own socket is connected to its client, so an ICMP
//! port unreachable (the client's port is closed: it went away, or the request was
//! spoofed) comes back as `ECONNREFUSED`, and the session ends at once instead of
//! retransmitting into the void (F11: 6 sends before).
//!
//! A test binary of its own: the kernel limits the ICMP errors it sends per second for
//! the whole network namespace, and tests that flood closed ports (`hostile.rs`) would
//! use that allowance up, so that the one error this test needs might not be sent.

use std::net::UdpSocket;
use std::time::Duration;

use dyntftp::client::write_rrq;
use dyntftp::{Outcome, ServerStats};
use testkit::*;

/// The normal mode only: a single-port session shares the unconnected listener, which
/// hears no ICMP errors.
#[test]
fn a_closed_client_port_ends_the_session_after_one_send() {
    let root = standard_root();
    // Retransmissions 3 s apart: a session that did not hear the ICMP error would send
    // again before the 5 s a test waits for its end.
    let mut server = spawn_fs_with(Mode::OwnPort, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(3))
            .stats_interval(Duration::from_millis(50))
    });
    // Without options (DATA 1 first) and with (the OACK first).
    for options in [&[][..], &[("tsize", "0")][..]] {
        // A client socket connected to the listener: the session answers from a port of
        // its own, which the kernel does not deliver to this socket, so it answers with
        // port unreachable however fast the session is (a socket closed after its
        // request might still be open when the first reply came).
        let client = UdpSocket::bind(v4()).expect("bind");
        client.connect(server.addr).expect("connect");
        let peer = client.local_addr().expect("local address");
        let mut rrq = Vec::new();
        write_rrq(&mut rrq, b"small.txt", "octet", options.iter().copied());
        client.send(&rrq).expect("send the request");
        let stats = server.session_of(peer, |other| panic!("another session: {other:?}"));
        assert_eq!(stats.outcome, Outcome::PeerUnreachable, "{options:?}");
        assert_eq!(stats.transfer.outcome, Some(Outcome::PeerUnreachable));
        assert_eq!(stats.transfer.packets_sent, 1, "{options:?}: one send");
        assert_eq!(
            stats.transfer.errors_sent, 0,
            "{options:?}: no ERROR after it"
        );
    }
    let total: ServerStats = sum_reports(&server.reports_until_next());
    assert_eq!(total.sessions_finished.get("peer_unreachable"), Some(&2));
    assert_eq!(total.retransmits, 0);
    // A client that stays is served as before.
    let client = Client::new(Mode::OwnPort, server.addr);
    let got = client
        .fetch(server.addr, "small.txt", "octet", &[])
        .expect("fetch");
    assert_eq!(got.data, SMALL);
    let stats = server.session_of(client.local_addr(), |_| {});
    assert_eq!(stats.outcome, Outcome::Completed);
}

/// The kernel reports an ICMP error before the datagrams queued ahead of it: a client
/// that acknowledged the last block and closed its port while a resend crossed its ACK
/// completed its transfer, and the session says so. The loop runs on this thread
/// (`run_once`), so the resend, the ICMP error it causes and the ACK queued after it are
/// all in place before the server reads the socket.
#[test]
fn a_final_ack_queued_behind_an_icmp_error_still_completes_the_session() {
    let root = standard_root();
    let mut server = dyntftp::ServerBuilder::new(KeptSessions::new(root.path()))
        .bind(v4())
        .timeout(Duration::from_millis(20))
        .adaptive_timeout(false)
        .busy_poll(Duration::ZERO)
        .build()
        .unwrap();
    let raw = Raw::new(server.local_addr());
    let client = raw.local_addr();
    // SMALL is one block: DATA 1 is the last.
    raw.rrq(server.local_addr(), b"small.txt", "octet", &[]);
    server.run_once(Some(WAIT)).unwrap();
    let (block, data, session) = raw.expect_data();
    assert_eq!((block, data.as_slice()), (1, SMALL));
    // The client goes away before acknowledging; the timer resends DATA 1 to its closed
    // port, and the kernel answers with an ICMP port unreachable.
    drop(raw);
    std::thread::sleep(Duration::from_millis(30));
    server.run_once(Some(Duration::ZERO)).unwrap();
    // Its ACK (from the same address and port) arrives after that error.
    let late = std::net::UdpSocket::bind(client).expect("rebind the client's port");
    late.send_to(&[0, 4, 0, 1], session).unwrap();
    for _ in 0..10 {
        server.run_once(Some(Duration::from_millis(100))).unwrap();
        if !server.handler().sessions.is_empty() {
            break;
        }
    }
    let stats = &server.handler().sessions[0];
    assert_eq!(stats.outcome, Outcome::Completed, "{stats:?}");
    assert_eq!(stats.transfer.retransmits, 1);
}
