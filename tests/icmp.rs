//! ICMP errors end sessions: a session's own socket is connected to its client, so an ICMP
//! port unreachable (the client's port is closed: it went away, or the request was
//! spoofed) comes back as `ECONNREFUSED`, and the session ends at once instead of
//! retransmitting into the void (F11: 6 sends before).
//!
//! A test binary of its own: the kernel limits the ICMP errors it sends per second for
//! the whole network namespace, and tests that flood closed ports (`hostile.rs`) would
//! use that allowance up, so that the one error this test needs might not be sent.

use std::time::Duration;

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
        let raw = Raw::new(server.addr);
        let peer = raw.local_addr();
        raw.rrq(server.addr, b"small.txt", "octet", options);
        drop(raw);
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
