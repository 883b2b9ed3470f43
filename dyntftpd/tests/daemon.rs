//! The `dyntftpd` binary serving over loopback: our own client and curl against it, name
//! rewriting, per-client roots, case-insensitive lookup with the cache, two workers, and a
//! clean exit on SIGTERM. Each test runs twice, with and without `--single-port`.
//!
//! curl is skipped with a loud `SKIPPED:` line where it is not installed, unless
//! `DYNTFTP_REQUIRE_CLIENTS=1`, which turns a missing client into a failure.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::Packet;
use testkit::*;

/// Starts dyntftpd in `mode` on a free 127.0.0.1 port serving `root`, and waits until
/// it answers.
fn start(mode: Mode, root: &Path, logs: &Path) -> Daemon {
    start_with(mode, root, logs, &[])
}

/// [`start`] with extra flags.
fn start_with(mode: Mode, root: &Path, logs: &Path, flags: &[&str]) -> Daemon {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let mut command = Command::new(env!("CARGO_BIN_EXE_dyntftpd"));
    command
        .args(["-l", &addr.to_string(), "-r"])
        .arg(root)
        .args(["--timeout", "0.25", "--retries", "3"])
        .args(mode.is_single_port().then_some("--single-port"))
        .args(flags);
    let log = logs.join(format!("dyntftpd-{}.log", addr.port()));
    let mut daemon = Daemon::spawn(command, addr, &log);
    daemon.wait_until_answered(
        b"readiness-probe-missing",
        |reply| matches!(reply, Packet::Error { code, .. } if code.to_u16() == 1),
    );
    daemon
}

fn daemon_root() -> TempDir {
    let root = TempDir::new("daemon-root");
    for (name, data) in client_files() {
        root.write(name, &data);
    }
    root
}

both_modes!(dyntftpd_serves_files);
fn dyntftpd_serves_files(mode: Mode) {
    let root = daemon_root();
    let out = TempDir::new("daemon-out");
    let daemon = start(mode, root.path(), out.path());
    for (name, want) in client_files() {
        for options in [&[][..], &[("blksize", "1428"), ("windowsize", "16")]] {
            let got = fetch(mode, daemon.addr, name, "octet", options)
                .unwrap_or_else(|e| panic!("{name} {options:?}: {e:?}\n{}", daemon.log()));
            assert!(got.data == want, "{name} {options:?}: content differs");
        }
    }
    // And a real client, when there is one.
    if let Some(curl) = client_or_skip("curl", "dyntftpd_serves_files (curl part)") {
        let target = out.path().join("curl-big.bin");
        let target_arg = target.to_string_lossy().into_owned();
        let url = format!("tftp://{}/big.bin", daemon.addr);
        let result = run(
            &curl,
            &["-s", "-S", "--max-time", "20", "-o", &target_arg, &url],
            out.path(),
        );
        assert!(result.status.success(), "{}", result.describe());
        assert!(fs::read(&target).unwrap() == big(), "curl big.bin differs");
    }
    // Dropping the daemon kills it by PID and reaps it.
}

both_modes!(dyntftpd_rewrites_names_and_serves_per_client_roots);
fn dyntftpd_rewrites_names_and_serves_per_client_roots(mode: Mode) {
    let root = TempDir::new("daemon-remap");
    root.write("boot/pxelinux.0", b"loader");
    root.write("host.cfg", b"shared config");
    root.write("127.0.0.1/host.cfg", b"config of 127.0.0.1");
    let out = TempDir::new("daemon-out");
    let daemon = start_with(
        mode,
        root.path(),
        out.path(),
        &[
            "--strip-prefix",
            "/tftpboot",
            "--lowercase",
            "--unique-root",
        ],
    );
    for name in [
        "/tftpboot/boot/pxelinux.0",
        "/TFTPBOOT/Boot/PXELINUX.0",
        "\\tftpboot\\boot\\pxelinux.0",
        "boot/pxelinux.0",
    ] {
        let got = fetch(mode, daemon.addr, name, "octet", &[])
            .unwrap_or_else(|e| panic!("{name}: {e:?}\n{}", daemon.log()));
        assert_eq!(got.data, b"loader", "{name}");
    }
    // The client's own directory comes first.
    let got = fetch(mode, daemon.addr, "host.cfg", "octet", &[]).unwrap();
    assert_eq!(got.data, b"config of 127.0.0.1");
    // A prefix is stripped only as a whole directory.
    let err = fetch(
        mode,
        daemon.addr,
        "/tftpbootx/boot/pxelinux.0",
        "octet",
        &[],
    )
    .unwrap_err();
    assert_eq!(err.code(), Some(1), "{err:?}");
}

both_modes!(dyntftpd_looks_names_up_ignoring_case_and_caches_files);
fn dyntftpd_looks_names_up_ignoring_case_and_caches_files(mode: Mode) {
    let root = TempDir::new("daemon-case");
    root.write("Boot/PxeLinux.0", &pseudo_random(100_000, 5));
    let out = TempDir::new("daemon-out");
    let daemon = start_with(
        mode,
        root.path(),
        out.path(),
        &["--ignore-case", "--cache", "1M"],
    );
    for _ in 0..3 {
        let got = fetch(mode, daemon.addr, "boot/pxelinux.0", "octet", &[])
            .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
        assert!(got.data == pseudo_random(100_000, 5), "content differs");
    }
    // Without --ignore-case the same name is not found.
    let strict = start(mode, root.path(), out.path());
    let err = fetch(mode, strict.addr, "boot/pxelinux.0", "octet", &[]).unwrap_err();
    assert_eq!(err.code(), Some(1), "{err:?}");
}

both_modes!(dyntftpd_with_two_workers_serves_and_stops);
fn dyntftpd_with_two_workers_serves_and_stops(mode: Mode) {
    let root = daemon_root();
    let out = TempDir::new("daemon-out");
    let mut daemon = start_with(mode, root.path(), out.path(), &["--workers", "2"]);
    // Twenty clients on twenty ports: both loops take some.
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let addr = daemon.addr;
            thread::spawn(move || {
                let got = fetch(mode, addr, "mult.bin", "octet", &[("blksize", "1428")])
                    .unwrap_or_else(|e| panic!("client {i}: {e:?}"));
                assert!(got.data == pseudo_random(MULT_LEN, 11), "client {i}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(daemon.log().contains("2 workers"), "{}", daemon.log());
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.log());
}

both_modes!(dyntftpd_exits_0_on_sigterm);
fn dyntftpd_exits_0_on_sigterm(mode: Mode) {
    let root = daemon_root();
    let out = TempDir::new("daemon-out");
    let mut daemon = start(mode, root.path(), out.path());
    let got = fetch(mode, daemon.addr, "small.txt", "octet", &[]).unwrap();
    assert_eq!(got.data, SMALL);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}\n{}", daemon.log());
}

/// Fetches DATA 1 of `big.bin` with a fresh socket and acknowledges it, so that the
/// session is verified and goes on (waiting for the ACK of DATA 2) while the caller asks
/// again. Returns the socket, which keeps the session's client port.
fn hold_a_verified_session(addr: SocketAddr) -> Raw {
    let raw = Raw::new(addr);
    raw.rrq(addr, b"big.bin", "octet", &[]);
    let (block, _, tid) = raw.expect_data();
    assert_eq!(block, 1);
    raw.ack(tid, 1);
    assert_eq!(raw.expect_data().0, 2, "the session goes on");
    raw
}

both_modes!(dyntftpd_limit_loopback_applies_the_per_client_cap_to_loopback);
fn dyntftpd_limit_loopback_applies_the_per_client_cap_to_loopback(mode: Mode) {
    let root = daemon_root();
    let out = TempDir::new("daemon-out");
    let limited = start_with(
        mode,
        root.path(),
        out.path(),
        &["--max-per-client", "1", "--limit-loopback"],
    );
    let _held = hold_a_verified_session(limited.addr);
    let second = Raw::new(limited.addr);
    second.rrq(limited.addr, b"small.txt", "octet", &[]);
    let (code, message, _) = second.expect_error();
    assert_eq!(code, 0, "{message}");
    assert!(message.contains("too many"), "{message}");

    // Without the flag, loopback is exempt: the same second request is served.
    let exempt = start_with(mode, root.path(), out.path(), &["--max-per-client", "1"]);
    let _held = hold_a_verified_session(exempt.addr);
    let second = Raw::new(exempt.addr);
    second.rrq(exempt.addr, b"small.txt", "octet", &[]);
    let (block, data, _) = second.expect_data();
    assert_eq!((block, &data[..]), (1, SMALL));
}

/// The review's log-injection payload: forged log lines, terminal escapes (CSI colour,
/// OSC title with BEL) and bytes that are not UTF-8.
const FORGED: &[u8] = b"bye\n2026-01-01T00:00:00.000000000Z [WARN] forged: accepted root login \
    from 203.0.113.9\n\x1b[31mred\x1b[0m \x1b]0;title\x07 \xff\xfe end";

/// Sends an ERROR with `message` (raw bytes) to `to`.
fn send_error(raw: &Raw, to: SocketAddr, message: &[u8]) {
    let mut error = vec![0, 5, 0, 0];
    error.extend_from_slice(message);
    error.push(0);
    raw.send(to, &error);
}

/// Waits (bounded) until the log holds `needle`.
fn wait_for_log(daemon: &Daemon, needle: &str) -> String {
    for _ in 0..500 {
        let log = daemon.log();
        if log.contains(needle) {
            return log;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("{needle:?} never logged:\n{}", daemon.log());
}

both_modes!(dyntftpd_logs_a_forged_error_message_as_one_escaped_line);
fn dyntftpd_logs_a_forged_error_message_as_one_escaped_line(mode: Mode) {
    let root = daemon_root();
    let out = TempDir::new("daemon-out");
    let daemon = start(mode, root.path(), out.path());
    let raw = Raw::new(daemon.addr);
    raw.rrq(daemon.addr, b"small.txt", "octet", &[]);
    let (_, _, tid) = raw.expect_data();
    send_error(&raw, tid, FORGED);
    let log = wait_for_log(&daemon, "outcome peer_error");
    let bytes = fs::read(&daemon.log_path).unwrap();
    assert!(
        !bytes.iter().any(|b| b.is_ascii_control() && *b != b'\n'),
        "a control byte in the log:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00.000000000Z")),
        "a forged line:\n{log}"
    );
    let session_lines: Vec<&str> = log.lines().filter(|l| l.contains("small.txt")).collect();
    assert_eq!(session_lines.len(), 1, "{log}");
    let line = session_lines[0];
    assert!(line.contains("outcome peer_error"), "{line}");
    assert!(
        line.contains(
            "(ERROR 0 (not defined): \"bye\\n2026-01-01T00:00:00.000000000Z [WARN] forged: \
             accepted root login from 203.0.113.9\\n\\u{1b}[31mred\\u{1b}[0m \
             \\u{1b}]0;title\\u{7} \\u{fffd}\\u{fffd} end\")"
        ),
        "{line}"
    );
    assert_eq!(log.matches("forged").count(), 1, "{log}");
}

both_modes!(dyntftpd_bounds_the_session_lines_of_a_flood);
fn dyntftpd_bounds_the_session_lines_of_a_flood(mode: Mode) {
    let root = daemon_root();
    let out = TempDir::new("daemon-out");
    let daemon = start_with(mode, root.path(), out.path(), &["--stats-interval", "1"]);
    // Sessions that fail before any ACK, as spoofed requests do: each client aborts at
    // once with an ERROR instead of an ACK, so no session waits for a timeout.
    let started = Instant::now();
    let n: usize = 400;
    for _ in 0..n {
        // A new client port each time: an old one's session may not have ended yet.
        let raw = Raw::new(daemon.addr);
        raw.rrq(daemon.addr, b"small.txt", "octet", &[]);
        let (_, _, tid) = raw.expect_data();
        send_error(&raw, tid, b"flood");
    }
    let elapsed = started.elapsed();
    // Every session is accounted for: written, or counted in a held-back line (said at
    // the next statistics report at the latest).
    let mut written = 0;
    let mut held_back = 0;
    for _ in 0..500 {
        let log = daemon.log();
        written = log
            .lines()
            .filter(|l| l.contains("outcome peer_error"))
            .count();
        held_back = log
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once("] ")?;
                rest.split_once(" session lines held back")?
                    .0
                    .parse::<usize>()
                    .ok()
            })
            .sum::<usize>();
        if written + held_back >= n {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(written + held_back, n, "{}", daemon.log());
    // 100 lines per 10 s of sessions that failed before any ACK, per period begun.
    let periods = elapsed.as_secs() as usize / 10 + 2;
    assert!(written <= 100 * periods, "{written} lines in {elapsed:?}");
    assert!(held_back >= n - 100 * periods, "{held_back} held back");
}
