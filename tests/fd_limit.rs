//! Running out of file descriptors: requests wait instead of failing; and the default
//! `max_sessions`, which follows the descriptor limit and the window memory. Its own test
//! binary, with a single test, because it lowers (then raises) the process's descriptor
//! limit.

use std::time::Duration;

use dyntftp::server::{MAX_DEFAULT_SESSIONS, SESSION_MEMORY};
use dyntftp::{FsHandler, Outcome, Packet, ServerBuilder};
use testkit::*;

#[test]
fn requests_wait_for_descriptors_instead_of_failing() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("SKIPPED: no /proc/self/fd to count descriptors");
        return;
    }
    let root = standard_root();
    // max_sessions set: the server does not size it from (or raise) the limit.
    let mut server = spawn_fs_with(Mode::OwnPort, v4(), root.path(), |b| {
        b.max_sessions(1000)
            .timeout(Duration::from_secs(30))
            .stats_interval(Duration::from_millis(50))
    });
    // Every client socket exists before the limit drops.
    let clients: Vec<Raw> = (0..20).map(|_| Raw::new(server.addr)).collect();
    // Room for a few sessions (a socket and a file each), not for twenty.
    let old = sys::set_fd_soft_limit(sys::open_fds() as u64 + 7);
    for raw in &clients {
        raw.rrq(server.addr, b"small.txt", "octet", &[]);
    }
    // In request order, each client gets its data once an earlier one has finished:
    // nobody is refused.
    for (i, raw) in clients.iter().enumerate() {
        let (datagram, tid) = raw.recv();
        match Packet::parse(&datagram) {
            Ok(Packet::Data { block: 1, data }) => assert_eq!(data, SMALL, "client {i}"),
            other => panic!("client {i}: {other:?}"),
        }
        raw.ack(tid, 1);
    }
    sys::set_fd_soft_limit(old);
    let sessions = server.sessions(20);
    assert!(sessions.iter().all(|s| s.outcome == Outcome::Completed));
    let total = sum_reports(&server.reports_until_next());
    assert!(total.descriptor_pauses >= 1, "{total:?}");
    assert_eq!(total.sessions_started, 20);
    assert!(total.rejected.is_empty(), "{:?}", total.rejected);
    drop(server);

    // Without max_sessions the server raises the soft limit to the hard one and runs at
    // most half of it (a socket and a file each, 64 spare), at most window memory / 16 KiB
    // (the least a session costs besides its window), and at most 16,384.
    let hard = sys::raise_fd_limit(u64::MAX);
    let by_descriptors = (hard.saturating_sub(64) / 2) as usize;
    for window_memory in [1 << 20, 64 << 20, 256 << 20, 1 << 30] {
        let server = ServerBuilder::new(FsHandler::new(root.path()).unwrap())
            .bind(v4())
            .window_memory(window_memory)
            .build()
            .unwrap();
        let want = by_descriptors
            .min(window_memory / SESSION_MEMORY)
            .clamp(1, MAX_DEFAULT_SESSIONS);
        assert_eq!(
            server.max_sessions(),
            want,
            "{window_memory} bytes of windows"
        );
    }
}
