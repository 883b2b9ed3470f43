//! Running out of file descriptors: requests wait instead of failing. Its own test binary,
//! with a single test, because it lowers the process's descriptor limit.

mod common;

use std::time::Duration;

use common::*;
use dyntftp::{Outcome, Packet};

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64)
}

fn set_soft_limit(soft: u64) -> u64 {
    // SAFETY: rlimit is a plain C struct; getrlimit/setrlimit only read/write it.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let old = limit.rlim_cur;
        limit.rlim_cur = soft.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        old
    }
}

#[test]
fn requests_wait_for_descriptors_instead_of_failing() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("SKIPPED: no /proc/self/fd to count descriptors");
        return;
    }
    let root = standard_root();
    // max_sessions set: the server does not size it from (or raise) the limit.
    let mut server = spawn_fs_with(v4(), root.path(), |b| {
        b.max_sessions(1000)
            .timeout(Duration::from_secs(30))
            .stats_interval(Duration::from_millis(50))
    });
    // Every client socket exists before the limit drops.
    let clients: Vec<Raw> = (0..20).map(|_| Raw::new(server.addr)).collect();
    // Room for a few sessions (a socket and a file each), not for twenty.
    let old = set_soft_limit(open_descriptors() + 7);
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
    set_soft_limit(old);
    let sessions = server.sessions(20);
    assert!(sessions.iter().all(|s| s.outcome == Outcome::Completed));
    let total = sum_reports(&server.reports_until_next());
    assert!(total.descriptor_pauses >= 1, "{total:?}");
    assert_eq!(total.sessions_started, 20);
    assert!(total.rejected.is_empty(), "{:?}", total.rejected);
}
