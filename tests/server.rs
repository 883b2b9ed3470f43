//! Black-box tests of the library server over loopback: our own blocking client and hand-made
//! datagrams against a [`ServerBuilder`] server on `127.0.0.1:0` / `[::1]:0`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::{
    BytesSource, ErrorCode, FsHandler, Handler, Outcome, Packet, ReadRequest, Reject, ResponseData,
    SessionStats,
};
use testkit::*;

/// Asserts two byte strings are equal without printing megabytes on failure.
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: got {} bytes, want {}; first difference at byte {first}",
            got.len(),
            want.len()
        );
    }
}

/// Downloads `name` from a fresh FsHandler server in `mode` on `bind` and checks the bytes
/// and the session's outcome.
fn download(
    mode: Mode,
    bind: SocketAddr,
    name: &str,
    transfer_mode: &str,
    options: &[(&str, &str)],
) -> Fetched {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, bind, root.path(), lift_single_port_caps);
    let client = Client::new(mode, server.addr);
    let got = client
        .fetch(server.addr, name, transfer_mode, options)
        .unwrap_or_else(|e| panic!("{name} from {}: {e:?}", server.addr));
    let want = if transfer_mode.eq_ignore_ascii_case("octet") {
        content(name)
    } else {
        to_netascii(&content(name))
    };
    assert_same(&got.data, &want, name);
    assert_eq!(got.server.ip(), server.addr.ip());
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed, "{stats:?}");
    assert_eq!(stats.peer, client.local_addr());
    assert_eq!(stats.filename, name);
    assert_eq!(stats.transfer.bytes_read, want.len() as u64);
    got
}

/// These tests exercise large blocks and windows in both modes: single-port mode's
/// default caps (blksize 1468, window 8) are lifted here and tested in `hostile.rs`.
fn lift_single_port_caps(b: Builder) -> Builder {
    b.single_port_limits(dyntftp::Limits::default())
}

/// Lengths of the DATA packets a transfer of `len` bytes must have with `blksize`.
fn expected_lens(len: usize, blksize: usize) -> Vec<usize> {
    let mut lens = vec![blksize; len / blksize];
    lens.push(len % blksize);
    lens
}

/// A test over IPv4 and one over IPv6 (skipped where `::1` cannot be bound), each in
/// both modes: `$body` is called with the address to bind and the mode.
macro_rules! both_families {
    ($v4:ident, $v6:ident, $body:expr) => {
        both_modes!($v4, $v6);

        fn $v4(mode: Mode) {
            $body(v4(), mode);
        }

        fn $v6(mode: Mode) {
            if ipv6_or_skip(stringify!($v6)) {
                $body(v6(), mode);
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Downloads
// ---------------------------------------------------------------------------------------

both_families!(small_file_v4, small_file_v6, |bind, mode| {
    let got = download(mode, bind, "small.txt", "octet", &[]);
    assert_eq!(got.oack, None);
    assert_eq!(got.data_lens(), vec![SMALL.len()]);
});

both_families!(
    empty_file_is_one_empty_data_v4,
    empty_file_is_one_empty_data_v6,
    |bind, mode| {
        let got = download(mode, bind, "empty.bin", "octet", &[]);
        assert_eq!(
            got.packets,
            vec![Received {
                from: got.server,
                kind: Kind::Data { block: 1, len: 0 }
            }]
        );
    }
);

both_families!(
    exact_multiple_512_v4,
    exact_multiple_512_v6,
    |bind, mode| {
        let got = download(mode, bind, "512.bin", "octet", &[]);
        assert_eq!(got.data_lens(), vec![512, 0]);
    }
);

both_families!(
    exact_multiple_1024_v4,
    exact_multiple_1024_v6,
    |bind, mode| {
        let got = download(mode, bind, "1024.bin", "octet", &[]);
        assert_eq!(got.data_lens(), vec![512, 512, 0]);
    }
);

both_families!(big_file_v4, big_file_v6, |bind, mode| {
    let got = download(mode, bind, "big.bin", "octet", &[]);
    assert_eq!(got.data_lens(), expected_lens(3 << 20, 512));
});

both_families!(nested_file_v4, nested_file_v6, |bind, mode| {
    download(mode, bind, "dir/nested.bin", "octet", &[]);
});

both_families!(options_together_v4, options_together_v6, |bind, mode| {
    let got = download(
        mode,
        bind,
        "big.bin",
        "octet",
        &[("blksize", "1428"), ("tsize", "0"), ("windowsize", "16")],
    );
    assert_eq!(
        got.oack,
        Some(vec![
            ("blksize".into(), "1428".into()),
            ("tsize".into(), (3u64 << 20).to_string()),
            ("windowsize".into(), "16".into()),
        ])
    );
});

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

fn blksize(mode: Mode, size: usize) {
    let value = size.to_string();
    let got = download(mode, v4(), "big.bin", "octet", &[("blksize", &value)]);
    assert_eq!(got.oack_value("blksize"), Some(value.as_str()));
    assert_eq!(got.blksize, size);
    assert_eq!(got.data_lens(), expected_lens(3 << 20, size));
}

both_modes!(blksize_512);
fn blksize_512(mode: Mode) {
    blksize(mode, 512);
}

both_modes!(blksize_1428);
fn blksize_1428(mode: Mode) {
    blksize(mode, 1428);
}

both_modes!(blksize_8192);
fn blksize_8192(mode: Mode) {
    blksize(mode, 8192);
}

both_modes!(blksize_65464);
fn blksize_65464(mode: Mode) {
    blksize(mode, 65464);
}

both_modes!(blksize_is_clamped_to_the_server_maximum);
fn blksize_is_clamped_to_the_server_maximum(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| b.max_blksize(1428));
    let got = fetch(
        mode,
        server.addr,
        "big.bin",
        "octet",
        &[("blksize", "8192")],
    )
    .unwrap();
    assert_eq!(got.oack_value("blksize"), Some("1428"));
    assert_same(&got.data, big(), "big.bin");
    assert_eq!(server.next_session().transfer.negotiated.blksize, 1428);
}

both_modes!(tsize_is_answered_with_the_real_size);
fn tsize_is_answered_with_the_real_size(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs(mode, v4(), root.path());
    for name in ["small.txt", "empty.bin", "1024.bin", "big.bin"] {
        let want = content(name);
        let got = fetch(mode, server.addr, name, "octet", &[("tsize", "0")]).unwrap();
        assert_eq!(
            got.oack,
            Some(vec![("tsize".into(), want.len().to_string())]),
            "{name}"
        );
        assert_same(&got.data, &want, name);
        let stats = server.next_session();
        assert_eq!(stats.transfer.negotiated.tsize, Some(want.len() as u64));
        assert_eq!(stats.outcome, Outcome::Completed);
    }
}

both_modes!(tsize_is_omitted_when_the_size_is_unknown);
fn tsize_is_omitted_when_the_size_is_unknown(mode: Mode) {
    // A netascii transfer's size is not known in advance: no tsize, so no OACK at all.
    let got = download(mode, v4(), "text.txt", "netascii", &[("tsize", "0")]);
    assert_eq!(got.oack_value("tsize"), None);
}

fn windowsize(mode: Mode, window: usize) {
    let value = window.to_string();
    let got = download(mode, v4(), "big.bin", "octet", &[("windowsize", &value)]);
    assert_eq!(got.oack_value("windowsize"), Some(value.as_str()));
    assert_eq!(got.window, window);
}

both_modes!(windowsize_16);
fn windowsize_16(mode: Mode) {
    windowsize(mode, 16);
}

both_modes!(windowsize_64);
fn windowsize_64(mode: Mode) {
    windowsize(mode, 64);
}

both_modes!(windowsize_is_capped_by_the_server);
fn windowsize_is_capped_by_the_server(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| b.max_window(8));
    let got = fetch(
        mode,
        server.addr,
        "big.bin",
        "octet",
        &[("windowsize", "64")],
    )
    .unwrap();
    assert_eq!(got.oack_value("windowsize"), Some("8"));
    assert_same(&got.data, big(), "big.bin");
    assert_eq!(server.next_session().transfer.negotiated.window, 8);
}

both_modes!(unknown_and_invalid_options_are_ignored);
fn unknown_and_invalid_options_are_ignored(mode: Mode) {
    let got = download(
        mode,
        v4(),
        "1024.bin",
        "octet",
        &[("blksize", "7"), ("retries", "1000"), ("windowsize", "0")],
    );
    assert_eq!(got.oack, None, "nothing valid was requested");
    assert_eq!(got.data_lens(), vec![512, 512, 0]);
}

both_modes!(block_numbers_wrap_around);
fn block_numbers_wrap_around(mode: Mode) {
    // 8-byte blocks: more than 65535 blocks, so block numbers go 65535 → 0 → 1.
    let data = pseudo_random(65_536 * 8 + 100, 7);
    let root = TempDir::new("wrap");
    root.write("wrap.bin", &data);
    let mut server = spawn_fs(mode, v4(), root.path());
    let got = fetch(
        mode,
        server.addr,
        "wrap.bin",
        "octet",
        &[("blksize", "8"), ("windowsize", "64")],
    )
    .unwrap();
    assert_same(&got.data, &data, "wrap.bin");
    let blocks: Vec<u16> = got
        .packets
        .iter()
        .filter_map(|p| match p.kind {
            Kind::Data { block, .. } => Some(block),
            _ => None,
        })
        .collect();
    assert!(blocks.windows(2).any(|w| w == [65535, 0]), "no wrap seen");
    assert_eq!(server.next_session().outcome, Outcome::Completed);
}

// ---------------------------------------------------------------------------------------
// Netascii
// ---------------------------------------------------------------------------------------

both_modes!(netascii_translates_line_ends);
fn netascii_translates_line_ends(mode: Mode) {
    let got = download(mode, v4(), "text.txt", "netascii", &[]);
    // The raw file has 511 plain bytes then CR: the CR ends block 1, its NUL opens block 2.
    assert_eq!(got.data[511], b'\r');
    assert_eq!(got.data[512], 0);
    assert_eq!(got.data_lens()[0], 512);
}

both_modes!(netascii_mode_name_is_case_insensitive);
fn netascii_mode_name_is_case_insensitive(mode: Mode) {
    download(mode, v4(), "text.txt", "NetASCII", &[]);
    let got = download(mode, v4(), "small.txt", "OCTET", &[]);
    assert_eq!(got.data, SMALL);
}

// ---------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------

both_modes!(fifty_concurrent_clients);
fn fifty_concurrent_clients(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs(mode, v4(), root.path());
    let addr = server.addr;
    let plans: Vec<(&str, &[(&str, &str)])> = vec![
        ("big.bin", &[]),
        ("big.bin", &[("blksize", "1428"), ("windowsize", "16")]),
        ("big.bin", &[("blksize", "8192"), ("tsize", "0")]),
        ("small.txt", &[]),
        ("1024.bin", &[("blksize", "512")]),
        ("empty.bin", &[("tsize", "0")]),
        ("big.bin", &[("windowsize", "8")]),
        ("dir/nested.bin", &[("blksize", "100")]),
        ("512.bin", &[]),
        ("big.bin", &[("blksize", "65464")]),
    ];
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let (name, options) = plans[i % plans.len()];
            thread::spawn(move || {
                let client = Client::new(mode, addr);
                let got = client.fetch(addr, name, "octet", options);
                (i, name, client.local_addr(), got)
            })
        })
        .collect();
    let mut peers = Vec::new();
    for t in threads {
        let (i, name, peer, got) = t.join().expect("client thread");
        let got = got.unwrap_or_else(|e| panic!("client {i} ({name}): {e:?}"));
        assert_same(&got.data, &content(name), &format!("client {i} {name}"));
        peers.push(peer);
    }
    let sessions = server.sessions(50);
    for s in &sessions {
        assert_eq!(s.outcome, Outcome::Completed, "{s:?}");
        assert!(peers.contains(&s.peer));
    }
    let (rest, _) = server.stop();
    assert!(rest.is_empty(), "extra sessions: {rest:?}");
}

// ---------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------

both_modes!(missing_file_is_error_1);
fn missing_file_is_error_1(mode: Mode) {
    let root = standard_root();
    let server = spawn_fs(mode, v4(), root.path());
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"no-such-file.bin", "octet", &[]);
    let (code, message, from) = raw.expect_error();
    assert_eq!(code, 1, "{message}");
    assert_eq!(from.ip(), server.addr.ip());
    assert_eq!(
        from.port() == server.addr.port(),
        mode.is_single_port(),
        "ERROR from a new TID (from the listening port in single-port mode)"
    );
    let root_text = root.path().to_string_lossy();
    assert!(!message.contains(&*root_text), "leaks the root: {message}");
    // Nothing else follows.
    assert_eq!(raw.recv_within(Duration::from_millis(200)), None);
}

both_modes!(write_request_is_error_4_mentioning_write);
fn write_request_is_error_4_mentioning_write(mode: Mode) {
    let root = standard_root();
    let server = spawn_fs(mode, v4(), root.path());
    let raw = Raw::new(server.addr);
    raw.wrq(server.addr, b"upload.bin", "octet");
    let (code, message, _) = raw.expect_error();
    assert_eq!(code, 4, "{message}");
    assert!(message.to_lowercase().contains("write"), "{message}");
    assert!(!root.path().join("upload.bin").exists());
}

both_modes!(traversal_attempts_are_refused);
fn traversal_attempts_are_refused(mode: Mode) {
    let outer = TempDir::new("traversal");
    outer.write("secret.txt", b"TOP SECRET");
    let root = outer.subdir("root");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::write(root.join("a/inside.txt"), b"inside").unwrap();
    std::os::unix::fs::symlink("../secret.txt", root.join("uplink")).unwrap();
    std::os::unix::fs::symlink(outer.path().join("secret.txt"), root.join("abslink")).unwrap();
    let server = spawn_fs(mode, v4(), &root);
    let secret_path = outer.path().join("secret.txt");
    let secret = secret_path.to_string_lossy().into_owned();
    let attempts = [
        "../secret.txt",
        "/etc/passwd",
        "a/../../secret.txt",
        "..\\secret.txt",
        "a/../../../../../../../../etc/passwd",
        "/../secret.txt",
        "./../secret.txt",
        secret.as_str(),
        "uplink",
        "abslink",
        "a/..",
        "a",
        "bad\x01name",
    ];
    for name in attempts {
        match fetch(mode, server.addr, name, "octet", &[]) {
            Err(ClientError::Error { code, message, .. }) => {
                assert!(code == 1 || code == 2, "{name:?}: ERROR {code} {message}");
                assert!(!message.contains("SECRET") && !message.contains(secret.as_str()));
            }
            other => panic!("{name:?}: expected ERROR 1 or 2, got {other:?}"),
        }
    }
    // Inside the root, `..` that stays beneath it is fine.
    let got = fetch(mode, server.addr, "a/../a/inside.txt", "octet", &[]).unwrap();
    assert_eq!(got.data, b"inside");
}

both_modes!(mail_mode_is_error_4);
fn mail_mode_is_error_4(mode: Mode) {
    let root = standard_root();
    let server = spawn_fs(mode, v4(), root.path());
    for transfer_mode in ["mail", "MAIL", "bogus"] {
        match fetch(mode, server.addr, "small.txt", transfer_mode, &[]) {
            Err(e) => assert_eq!(e.code(), Some(4), "{transfer_mode}: {e:?}"),
            Ok(_) => panic!("{transfer_mode}: served"),
        }
    }
}

both_modes!(garbage_to_the_listener_does_not_disturb_the_server);
fn garbage_to_the_listener_does_not_disturb_the_server(mode: Mode) {
    let root = standard_root();
    let server = spawn_fs(mode, v4(), root.path());
    let raw = Raw::new(server.addr);
    for datagram in [
        &b""[..],
        b"\x00",
        b"\x00\x01",
        b"\x00\x01file",
        b"\x00\x01file\x00octet",
        b"\x00\x09whatever\x00",
        b"\x00\x04\x00\x01", // an ACK to the listener
        b"\x00\x05\x00\x01oops\x00",
    ] {
        raw.send(server.addr, datagram);
    }
    // Whatever the answers, a normal request is still served.
    let got = fetch(mode, server.addr, "small.txt", "octet", &[]).unwrap();
    assert_eq!(got.data, SMALL);
}

// ---------------------------------------------------------------------------------------
// Transfer IDs
// ---------------------------------------------------------------------------------------

both_modes!(stray_tid_is_dropped_or_gets_error_5_and_the_transfer_goes_on);
fn stray_tid_is_dropped_or_gets_error_5_and_the_transfer_goes_on(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.stats_interval(Duration::from_millis(50))
    });
    let client = Client::new(mode, server.addr);
    let stray = Raw::new(server.addr);
    let listener = server.addr;
    let mut answers = Vec::new();
    let got = client
        .fetch_with(server.addr, b"big.bin", "octet", &[], &mut |p| {
            if p.block == 5 {
                // The server waits for ACK 5 from the client; a stranger sends it first
                // (too short for an answer), then a DATA as large as the ERROR 5, then a
                // request for a missing file: what comes before its ERROR 1 answered the
                // first two.
                stray.ack(p.server, 5);
                stray.send(p.server, &[&b"\x00\x03\x00\x01"[..], &[b'x'; 20]].concat());
                stray.rrq(listener, b"missing-probe", "octet", &[]);
                loop {
                    let (code, message, from) = stray.expect_error();
                    if code == 1 {
                        break;
                    }
                    answers.push((code, message, from));
                }
            }
        })
        .unwrap();
    // The normal mode's session socket is connected to the client: the kernel drops the
    // strays. In single-port mode the listener answers the DATA (ERROR 5, from its port).
    if mode.is_single_port() {
        assert_eq!(answers.len(), 1, "{answers:?}");
        for (code, message, from) in &answers {
            assert_eq!(*code, 5, "{message}");
            assert_eq!(*from, got.server, "ERROR 5 comes from the session's port");
        }
    } else {
        assert!(answers.is_empty(), "{answers:?}");
    }
    assert_same(&got.data, big(), "big.bin");
    assert_eq!(got.out_of_order, 0);
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(
        stats.transfer.duplicate_acks, 0,
        "the stray ACK must not count as the client's"
    );
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.stray_datagrams, 2 * u64::from(mode.is_single_port()));
    // The stranger hears nothing more.
    assert_eq!(stray.recv_within(Duration::from_millis(100)), None);
}

both_modes!(repeated_rrq_from_the_same_port_starts_one_session);
fn repeated_rrq_from_the_same_port_starts_one_session(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.stats_interval(Duration::from_millis(50))
    });
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"1024.bin", "octet", &[]);
    raw.rrq(server.addr, b"1024.bin", "octet", &[]);
    let (block, first, tid) = raw.expect_data();
    assert_eq!(block, 1);
    let mut data = first;
    // Lock-step to the end; every datagram must come from the one session.
    for want in 2..=3u16 {
        raw.ack(tid, want - 1);
        let (block, payload, from) = raw.expect_data();
        assert_eq!(from, tid, "a second session answered");
        assert_eq!(block, want);
        data.extend_from_slice(&payload);
    }
    raw.ack(tid, 3);
    assert_same(&data, &content("1024.bin"), "1024.bin");
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed);
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.requests, 2);
    assert_eq!(total.sessions_started, 1);
    assert_eq!(total.duplicate_requests, 1);
    // No DATA 1 from another port, ever.
    assert_eq!(raw.recv_within(Duration::from_millis(200)), None);
    let (rest, _) = server.stop();
    assert!(rest.is_empty(), "{rest:?}");
}

both_modes!(clients_reusing_their_port_are_served_when_the_next_request_follows_the_last_ack);
fn clients_reusing_their_port_are_served_when_the_next_request_follows_the_last_ack(mode: Mode) {
    // A client that keeps its port sends the next RRQ right after the final ACK of the
    // previous transfer. On a busy server the RRQ may be read before that ACK: it must
    // still start a new session, not be taken for a repeat of the old one (which leaves
    // the client waiting for its own timeout). Raw sends no retransmissions, so an
    // ignored request fails by the socket timeout. Many clients keep the loop busy.
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 50;
    let root = standard_root();
    let server = spawn_fs(mode, v4(), root.path());
    let addr = server.addr;
    let want = content("small.txt");
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let want = want.clone();
            std::thread::spawn(move || {
                let raw = Raw::new(addr);
                raw.rrq(addr, b"small.txt", "octet", &[]);
                for round in 0..ROUNDS {
                    // (The new session may get the old one's port back: no TID check.)
                    let (block, data, tid) = raw.expect_data();
                    assert_eq!((block, &data), (1, &want), "round {round}");
                    raw.ack(tid, 1);
                    if round + 1 < ROUNDS {
                        raw.rrq(addr, b"small.txt", "octet", &[]);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("client thread");
    }
    let (sessions, _) = server.stop();
    assert_eq!(sessions.len(), CLIENTS * ROUNDS);
    assert!(sessions.iter().all(|s| s.outcome == Outcome::Completed));
}

#[test]
fn each_session_answers_from_a_new_port_and_a_late_ack_disturbs_none() {
    // The server keeps ended sessions' sockets for the next sessions (without their
    // ports): a client that keeps its port must still see a new transfer ID each time,
    // and its late ACK to the last one must reach neither the next session nor a refusal.
    const ROUNDS: usize = 20;
    let root = standard_root();
    let server = spawn_fs(Mode::OwnPort, v4(), root.path());
    let client = Client::new(Mode::OwnPort, server.addr);
    let mut tids = Vec::new();
    for round in 0..ROUNDS {
        let fetched = client
            .fetch(server.addr, "small.txt", "octet", &[])
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(fetched.data, SMALL, "round {round}");
        client
            .socket
            .send_to(&[0, 4, 0, 1], fetched.server)
            .expect("late ACK");
        tids.push(fetched.server.port());
        if round % 5 == 0 {
            let raw = Raw::new(server.addr);
            raw.rrq(server.addr, b"no-such-file", "octet", &[]);
            let (code, _, from) = raw.expect_error();
            assert_eq!(code, 1, "round {round}");
            assert_ne!(from.port(), server.addr.port());
        }
    }
    let distinct: std::collections::BTreeSet<u16> = tids.iter().copied().collect();
    // Random ports: two alike among twenty is already rare.
    assert!(distinct.len() >= ROUNDS - 2, "transfer IDs {tids:?}");
    let (sessions, _) = server.stop();
    assert_eq!(sessions.len(), ROUNDS);
    assert!(sessions.iter().all(|s| s.outcome == Outcome::Completed));
}

// ---------------------------------------------------------------------------------------
// Panics in user code
// ---------------------------------------------------------------------------------------

/// Serves files, except "boom" (open panics) and "explode.bin" (read panics after two
/// blocks).
struct Booby {
    fs: FsHandler,
}

struct Exploding {
    blocks: usize,
}

impl ResponseData for Exploding {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.blocks == 0 {
            panic!("the source exploded (expected by the test)");
        }
        self.blocks -= 1;
        let n = buf.len().min(512);
        buf[..n].fill(b'z');
        Ok(n)
    }
}

impl Handler for Booby {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        match req.filename {
            b"boom" => panic!("open panicked (expected by the test)"),
            b"explode.bin" => Ok(Box::new(Exploding { blocks: 2 })),
            b"generated" => Ok(Box::new(BytesSource::new(
                format!("hello {}\n", req.peer).into_bytes(),
            ))),
            _ => self.fs.open(req),
        }
    }
}

fn spawn_booby(mode: Mode, root: &TempDir) -> ServerGuard {
    let path = root.path().to_path_buf();
    spawn_server(
        mode,
        v4(),
        move || {
            Box::new(Booby {
                fs: FsHandler::new(path).unwrap(),
            })
        },
        |b| b.stats_interval(Duration::from_millis(50)),
    )
}

both_modes!(handler_open_panic_is_error_0_and_the_server_goes_on);
fn handler_open_panic_is_error_0_and_the_server_goes_on(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_booby(mode, &root);
    let err = fetch(mode, server.addr, "boom", "octet", &[]).unwrap_err();
    assert_eq!(err.code(), Some(0), "{err:?}");
    let got = fetch(mode, server.addr, "small.txt", "octet", &[]).unwrap();
    assert_eq!(got.data, SMALL);
    let client = Client::new(mode, server.addr);
    let got = client
        .fetch(server.addr, "generated", "octet", &[])
        .unwrap();
    assert_eq!(
        got.data,
        format!("hello {}\n", client.local_addr()).as_bytes()
    );
    let sessions = server.sessions(2);
    assert!(sessions.iter().all(|s| s.outcome == Outcome::Completed));
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.panics, 1);
    assert_eq!(
        total.sessions_started, 2,
        "a panicking open starts no session"
    );
}

both_modes!(source_read_panic_is_error_0_and_outcome_panicked);
fn source_read_panic_is_error_0_and_outcome_panicked(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_booby(mode, &root);
    let client = Client::new(mode, server.addr);
    let err = client
        .fetch(server.addr, "explode.bin", "octet", &[])
        .unwrap_err();
    assert_eq!(err.code(), Some(0), "{err:?}");
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Panicked);
    assert_eq!(stats.filename, "explode.bin");
    assert_eq!(stats.peer, client.local_addr());
    assert_eq!(stats.transfer.bytes_read, 1024);
    assert_eq!(
        stats.transfer.error_sent.as_ref().map(|(c, _)| *c),
        Some(ErrorCode::NotDefined)
    );
    // Still serving.
    let got = fetch(
        mode,
        server.addr,
        "big.bin",
        "octet",
        &[("blksize", "8192")],
    )
    .unwrap();
    assert_same(&got.data, big(), "big.bin");
    assert_eq!(server.next_session().outcome, Outcome::Completed);
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.panics, 1);
}

// ---------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------

both_modes!(shutdown_aborts_running_sessions_after_the_grace_period);
fn shutdown_aborts_running_sessions_after_the_grace_period(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.shutdown_grace(Duration::from_millis(200))
    });
    let handle = server.handle.clone();
    let mut client = Client::new(mode, server.addr);
    client.pace = Some(Duration::from_millis(20));
    let mut shutdown_at = None;
    let err = client
        .fetch_with(server.addr, b"big.bin", "octet", &[], &mut |p| {
            if p.block == 3 {
                handle.shutdown();
                shutdown_at = Some(Instant::now());
            }
        })
        .unwrap_err();
    let ClientError::Error { code, message, .. } = &err else {
        panic!("expected ERROR 0, got {err:?}");
    };
    assert_eq!(*code, 0, "{message}");
    let shutdown_at = shutdown_at.expect("hook ran");
    assert!(
        shutdown_at.elapsed() >= Duration::from_millis(150),
        "aborted before the grace period"
    );
    assert_eq!(server.join(), Ok(()), "run() returns after shutdown");
    let (sessions, _) = server.stop();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].outcome, Outcome::ShutDown);
    assert!(sessions[0].transfer.bytes_read < big().len() as u64);
}

both_modes!(shutdown_lets_short_sessions_finish);
fn shutdown_lets_short_sessions_finish(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.shutdown_grace(Duration::from_secs(5))
    });
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"1024.bin", "octet", &[]);
    let (_, _, tid) = raw.expect_data();
    server.shutdown();
    // New requests are no longer served (the listener is closed or ignored).
    let late = Raw::new(server.addr);
    // The running session finishes normally within the grace period.
    for block in 1..=3u16 {
        raw.ack(tid, block);
        if block < 3 {
            let (got, _, _) = raw.expect_data();
            assert_eq!(got, block + 1);
        }
    }
    assert_eq!(server.join(), Ok(()));
    late.rrq(server.addr, b"small.txt", "octet", &[]);
    match late.recv_within(Duration::from_millis(200)) {
        None => {}
        Some((d, _)) => assert!(!matches!(
            dyntftp::Packet::parse(&d),
            Ok(dyntftp::Packet::Data { .. })
        )),
    }
    let (sessions, _) = server.stop();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].outcome, Outcome::Completed);
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

both_modes!(statistics_per_session_and_per_server);
fn statistics_per_session_and_per_server(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        lift_single_port_caps(b).stats_interval(Duration::from_millis(100))
    });
    type Plan = (
        &'static str,
        &'static [(&'static str, &'static str)],
        u16,
        u16,
    );
    let plans: [Plan; 5] = [
        ("small.txt", &[], 512, 1),
        ("empty.bin", &[("tsize", "0")], 512, 1),
        ("1024.bin", &[("blksize", "1428"), ("tsize", "0")], 1428, 1),
        (
            "big.bin",
            &[("blksize", "8192"), ("windowsize", "8")],
            8192,
            8,
        ),
        ("dir/nested.bin", &[("windowsize", "4")], 512, 4),
    ];
    let mut peers = Vec::new();
    for (name, options, _, _) in plans {
        let client = Client::new(mode, server.addr);
        let got = client.fetch(server.addr, name, "octet", options).unwrap();
        assert_same(&got.data, &content(name), name);
        peers.push(client.local_addr());
    }
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"missing.bin", "octet", &[]);
    assert_eq!(raw.expect_error().0, 1);
    raw.wrq(server.addr, b"small.txt", "octet");
    assert_eq!(raw.expect_error().0, 4);

    let sessions: Vec<SessionStats> = server.sessions(plans.len());
    for ((name, options, blksize, window), peer) in plans.iter().zip(&peers) {
        let matching: Vec<&SessionStats> =
            sessions.iter().filter(|s| s.filename == *name).collect();
        assert_eq!(matching.len(), 1, "{name}: {matching:?}");
        let s = matching[0];
        let size = content(name).len() as u64;
        assert_eq!(s.peer, *peer, "{name}");
        assert_eq!(s.local, server.addr, "{name}");
        assert_eq!(s.mode, dyntftp::Mode::Octet);
        assert_eq!(s.outcome, Outcome::Completed, "{name}");
        assert_eq!(s.transfer.outcome, Some(Outcome::Completed));
        assert_eq!(s.transfer.bytes_read, size, "{name}");
        assert_eq!(s.transfer.negotiated.blksize, *blksize, "{name}");
        assert_eq!(s.transfer.negotiated.window, *window, "{name}");
        let tsize_requested = options.iter().any(|(n, _)| *n == "tsize");
        assert_eq!(
            s.transfer.negotiated.tsize,
            tsize_requested.then_some(size),
            "{name}"
        );
        let requested: Vec<(String, String)> = options
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(s.requested, requested, "{name}");
        let blocks = size / u64::from(*blksize) + 1;
        assert_eq!(s.transfer.blocks_acked, blocks, "{name}");
        assert!(s.transfer.bytes_sent >= size, "{name}");
        assert_eq!(s.transfer.peer_error, None);
        assert_eq!(s.transfer.error_sent, None);
        assert!(s.duration <= Duration::from_secs(30));
    }

    let reports = server.reports_until_next();
    assert!(reports.iter().all(|r| r.interval > Duration::ZERO));
    let total = sum_reports(&reports);
    assert_eq!(total.requests, plans.len() as u64 + 1, "{total:?}");
    assert_eq!(total.sessions_started, plans.len() as u64, "{total:?}");
    assert_eq!(total.rejected.get(&1), Some(&1), "{total:?}");
    assert_eq!(total.rejected.get(&4), Some(&1), "{total:?}");
    assert_eq!(total.write_requests, 1, "{total:?}");
    assert_eq!(
        total.sessions_finished.get("completed"),
        Some(&(plans.len() as u64)),
        "{total:?}"
    );
    assert_eq!(total.panics, 0);
    assert_eq!(total.stray_datagrams, 0);
    let payload: u64 = plans.iter().map(|p| content(p.0).len() as u64).sum();
    assert!(total.bytes_sent >= payload, "{total:?}");
    assert_eq!(reports.last().unwrap().active_sessions, 0);

    // Exactly one SessionStats per started session: nothing more arrives.
    let (rest, _) = server.stop();
    assert!(rest.is_empty(), "duplicate session stats: {rest:?}");
}

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

/// Fetches through a wildcard listener at `target` (same port) and checks every reply comes
/// from `target`'s address.
fn via_wildcard(server: &mut ServerGuard, target: SocketAddr) {
    let client = Client::new(server.mode, target);
    let got = client
        .fetch(target, "small.txt", "octet", &[])
        .unwrap_or_else(|e| panic!("via {target}: {e:?}"));
    assert_eq!(got.data, SMALL);
    assert_eq!(got.server.ip(), target.ip());
    let stats = server.next_session();
    assert_eq!(stats.local, target);
    assert_eq!(stats.peer, client.local_addr());
    // Refusals come from the same address.
    let raw = Raw::new(target);
    raw.rrq(target, b"missing", "octet", &[]);
    let (code, _, from) = raw.expect_error();
    assert_eq!(code, 1);
    assert_eq!(from.ip(), target.ip());
}

both_modes!(reply_source_is_the_address_the_client_sent_to);
fn reply_source_is_the_address_the_client_sent_to(mode: Mode) {
    if !loopback_127_0_0_2("reply_source_is_the_address_the_client_sent_to") {
        return;
    }
    let root = standard_root();
    let mut server = spawn_fs(
        mode,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        root.path(),
    );
    let port = server.port();
    via_wildcard(&mut server, SocketAddr::from(([127, 0, 0, 2], port)));
    via_wildcard(&mut server, SocketAddr::from(([127, 0, 0, 1], port)));
}

both_modes!(reply_source_on_a_dual_stack_listener);
fn reply_source_on_a_dual_stack_listener(mode: Mode) {
    if !ipv6_or_skip("reply_source_on_a_dual_stack_listener")
        || !loopback_127_0_0_2("reply_source_on_a_dual_stack_listener")
    {
        return;
    }
    let root = standard_root();
    let mut server = spawn_fs(mode, "[::]:0".parse().unwrap(), root.path());
    let port = server.port();
    via_wildcard(&mut server, SocketAddr::from(([127, 0, 0, 2], port)));
    via_wildcard(
        &mut server,
        SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), port),
    );
}

// ---------------------------------------------------------------------------------------
// max_sessions
// ---------------------------------------------------------------------------------------

both_modes!(max_sessions_queues_requests_until_a_session_finishes);
fn max_sessions_queues_requests_until_a_session_finishes(mode: Mode) {
    let root = standard_root();
    // A long timeout: unverified sessions keep their slots for one timeout.
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.max_sessions(2).timeout(Duration::from_secs(5))
    });
    let (a, b, c) = (
        Raw::new(server.addr),
        Raw::new(server.addr),
        Raw::new(server.addr),
    );
    a.rrq(server.addr, b"small.txt", "octet", &[]);
    let (_, _, a_tid) = a.expect_data();
    b.rrq(server.addr, b"big.bin", "octet", &[]);
    let (_, _, _) = b.expect_data();
    // Two sessions hold their slots (neither ACKs, but neither has had a timeout to do
    // so yet): the third request waits.
    c.rrq(server.addr, b"small.txt", "octet", &[]);
    assert_eq!(
        c.recv_within(Duration::from_millis(300)),
        None,
        "served beyond max_sessions"
    );
    // A finishes: its slot goes to C.
    a.ack(a_tid, 1);
    let (block, data, c_tid) = c.expect_data();
    assert_eq!((block, data.as_slice()), (1, SMALL));
    c.ack(c_tid, 1);
    let first = server.next_session();
    assert_eq!(first.peer, a.local_addr());
    assert_eq!(first.outcome, Outcome::Completed);
    let second = server.next_session();
    assert_eq!(second.peer, c.local_addr());
    assert_eq!(second.outcome, Outcome::Completed);
    // B never ACKed: the shutdown grace ends it.
    let (rest, _) = server.stop();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].peer, b.local_addr());
    assert_eq!(rest[0].outcome, Outcome::ShutDown);
}

both_modes!(max_sessions_frees_a_slot_when_a_session_times_out);
fn max_sessions_frees_a_slot_when_a_session_times_out(mode: Mode) {
    let root = standard_root();
    // Sessions that get no ACK end 100 + 200 + 400 ms after the last progress.
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.max_sessions(2)
            .timeout(Duration::from_millis(100))
            .retries(2)
    });
    let (a, b, c) = (
        Raw::new(server.addr),
        Raw::new(server.addr),
        Raw::new(server.addr),
    );
    // A and B acknowledge block 1, so they are verified: they keep their slots until
    // they time out.
    for raw in [&a, &b] {
        raw.rrq(server.addr, b"big.bin", "octet", &[]);
        let (_, _, tid) = raw.expect_data();
        raw.ack(tid, 1);
        assert_eq!(raw.expect_data().0, 2);
    }
    c.rrq(server.addr, b"small.txt", "octet", &[]);
    assert_eq!(
        c.recv_within(Duration::from_millis(150)),
        None,
        "served beyond max_sessions"
    );
    let (block, data, c_tid) = c.expect_data();
    assert_eq!((block, data.as_slice()), (1, SMALL));
    c.ack(c_tid, 1);
    // The slot was freed by a timed-out session, reported before C's session started.
    let first = server.next_session();
    assert!(
        first.peer == a.local_addr() || first.peer == b.local_addr(),
        "{first:?}"
    );
    assert_eq!(first.outcome, Outcome::TimedOut);
    assert_eq!(first.transfer.retransmits, 2);
}

// ---------------------------------------------------------------------------------------
// Protocol details, with hand-made datagrams
// ---------------------------------------------------------------------------------------

/// Sends an ERROR packet.
fn send_error(raw: &Raw, to: SocketAddr, code: ErrorCode, message: &str) {
    let mut datagram = Vec::new();
    dyntftp::packet::write_error(&mut datagram, code, message);
    raw.send(to, &datagram);
}

both_modes!(duplicate_ack_never_triggers_a_send);
fn duplicate_ack_never_triggers_a_send(mode: Mode) {
    let root = standard_root();
    // A long timeout: nothing may come but what an ACK causes. A duplicate that comes
    // once the next block has been out for the retransmission estimate is evidence of its
    // loss and may resend it; on a loaded machine this thread can be late by more than a
    // loopback estimate (500 µs at least), so the estimate is held at 3 s.
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(3))
            .min_rto(Duration::from_secs(3))
    });
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"1024.bin", "octet", &[]);
    let (block, _, tid) = raw.expect_data();
    assert_eq!(block, 1);
    raw.ack(tid, 1);
    assert_eq!(raw.expect_data().0, 2);
    // Sorcerer's Apprentice: the old ACK again must not cause a second DATA 2.
    raw.ack(tid, 1);
    assert_eq!(raw.recv_within(Duration::from_millis(300)), None);
    raw.ack(tid, 2);
    assert_eq!(raw.expect_data().0, 3);
    raw.ack(tid, 3);
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.transfer.duplicate_acks, 1);
    assert_eq!(stats.transfer.packets_resent, 0);
}

/// A session reads its socket until an ACK leaves everything it sent acknowledged, and no
/// further (what is queued behind that ACK was sent before the next DATA; in lock step
/// this spares a receive that finds nothing). What is left is read before the session's
/// timer acts. The loop runs on this thread (`run_once`), so the ACK and an ERROR right
/// behind it are both queued before the server reads. The normal mode only: in
/// single-port mode the listener is read until empty.
#[test]
fn what_is_queued_behind_an_ack_of_everything_sent_is_read_before_the_timer_acts() {
    let root = standard_root();
    let mut server = dyntftp::ServerBuilder::new(KeptSessions::new(root.path()))
        .bind(v4())
        .timeout(Duration::from_millis(50))
        .busy_poll(Duration::ZERO)
        .build()
        .unwrap();
    let raw = Raw::new(server.local_addr());
    raw.rrq(server.local_addr(), b"big.bin", "octet", &[]);
    server.run_once(Some(WAIT)).unwrap();
    let (block, _, session) = raw.expect_data();
    assert_eq!(block, 1);
    raw.ack(session, 1);
    send_error(
        &raw,
        session,
        ErrorCode::NotDefined,
        "cancelled by the test",
    );
    server.run_once(Some(WAIT)).unwrap();
    // ACK 1 was read and answered; the ERROR behind it waits.
    assert_eq!(raw.expect_data().0, 2);
    assert_eq!(server.active_sessions(), 1);
    // The timer (an early one, or the 50 ms) reads it first: nothing is resent.
    for _ in 0..10 {
        server.run_once(Some(Duration::from_millis(100))).unwrap();
        if !server.handler().sessions.is_empty() {
            break;
        }
    }
    let stats = &server.handler().sessions[0];
    assert_eq!(stats.outcome, Outcome::PeerError(ErrorCode::NotDefined));
    assert_eq!(
        (stats.transfer.retransmits, stats.transfer.early_retransmits),
        (0, 0)
    );
    assert_eq!(stats.transfer.packets_sent, 2);
    assert_eq!(raw.recv_within(Duration::from_millis(100)), None);
}

both_modes!(ack_inside_the_window_resends_from_there);
fn ack_inside_the_window_resends_from_there(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(3))
    });
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"big.bin", "octet", &[("windowsize", "4")]);
    let (oack, tid) = raw.recv();
    assert_eq!(
        Packet::parse(&oack).map(|p| p.opcode()),
        Ok(dyntftp::packet::Opcode::Oack)
    );
    raw.ack(tid, 0);
    let blocks = |n: usize| -> Vec<u16> { (0..n).map(|_| raw.expect_data().0).collect() };
    assert_eq!(blocks(4), [1, 2, 3, 4]);
    // "I have 1 and 2": the server goes on from 3.
    raw.ack(tid, 2);
    assert_eq!(blocks(4), [3, 4, 5, 6]);
    raw.ack(tid, 6);
    let more = blocks(4);
    assert_eq!(more, [7, 8, 9, 10]);
    // The client gives up: the session ends without a reply.
    send_error(&raw, tid, ErrorCode::NotDefined, "cancelled by the test");
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::PeerError(ErrorCode::NotDefined));
    assert_eq!(
        stats.transfer.peer_error,
        Some((ErrorCode::NotDefined, "cancelled by the test".to_string()))
    );
    assert_eq!(stats.transfer.errors_sent, 0);
    assert_eq!(raw.recv_within(Duration::from_millis(200)), None);
}

both_modes!(error_8_after_the_oack_is_a_size_probe);
fn error_8_after_the_oack_is_a_size_probe(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs(mode, v4(), root.path());
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"big.bin", "octet", &[("tsize", "0")]);
    let (oack, tid) = raw.recv();
    match Packet::parse(&oack) {
        Ok(Packet::Oack(options)) => {
            let tsize = options.iter().find(|o| o.is("tsize")).expect("tsize");
            assert_eq!(tsize.value, (3u64 << 20).to_string().as_bytes());
        }
        other => panic!("expected OACK, got {other:?}"),
    }
    send_error(
        &raw,
        tid,
        ErrorCode::OptionNegotiation,
        "just wanted the size",
    );
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Probe);
    assert!(stats.outcome.is_success());
    assert_eq!(raw.recv_within(Duration::from_millis(200)), None);
}

both_modes!(retransmits_exactly_the_configured_number_of_times);
fn retransmits_exactly_the_configured_number_of_times(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_millis(50)).retries(2)
    });
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"small.txt", "octet", &[]);
    // A repeated request (a client retrying its RRQ) must not double the traffic.
    raw.rrq(server.addr, b"small.txt", "octet", &[]);
    // Never ACK: once the session has ended, every DATA it sent is in our socket buffer.
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::FinalAckMissing);
    assert_eq!(stats.transfer.retransmits, 2);
    let mut received = 0;
    while let Some((datagram, _)) = raw.recv_within(Duration::from_millis(50)) {
        assert!(matches!(
            Packet::parse(&datagram),
            Ok(Packet::Data { block: 1, .. })
        ));
        received += 1;
    }
    assert_eq!(received, 3, "DATA 1 once plus two retransmissions");
    let (rest, _) = server.stop();
    assert!(rest.is_empty(), "{rest:?}");
}

// ---------------------------------------------------------------------------------------
// Sources that are not always ready
// ---------------------------------------------------------------------------------------

/// A source fed chunk by chunk from a producer thread: `read` returns `WouldBlock` when
/// it has nothing, and reports each such moment on `blocked` so the producer delivers the
/// next chunk only then (and notifies). Nothing here depends on timing.
struct Fed {
    chunks: mpsc::Receiver<Option<Vec<u8>>>,
    blocked: mpsc::Sender<()>,
    current: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl ResponseData for Fed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.current.len() {
                let n = buf.len().min(self.current.len() - self.pos);
                buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.ended {
                return Ok(0);
            }
            match self.chunks.try_recv() {
                Ok(Some(chunk)) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Ok(None) | Err(mpsc::TryRecvError::Disconnected) => self.ended = true,
                Err(mpsc::TryRecvError::Empty) => {
                    let _ = self.blocked.send(());
                    return Err(io::ErrorKind::WouldBlock.into());
                }
            }
        }
    }
}

/// Serves `fed` by starting, per request, a producer thread that hands out `data` in
/// chunks of `chunk` bytes, one chunk each time the source blocks, and notifies.
struct FedHandler {
    data: Vec<u8>,
    chunk: usize,
    notify: bool,
}

impl Handler for FedHandler {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let (chunks_tx, chunks_rx) = mpsc::channel();
        let (blocked_tx, blocked_rx) = mpsc::channel::<()>();
        let notifier = request.notifier.clone();
        let data = self.data.clone();
        let chunk = self.chunk;
        let notify = self.notify;
        thread::spawn(move || {
            for piece in data.chunks(chunk) {
                // Bounded: the source reports every block within the test's wait.
                if blocked_rx.recv_timeout(WAIT).is_err() {
                    return;
                }
                if chunks_tx.send(Some(piece.to_vec())).is_err() {
                    return;
                }
                if notify {
                    notifier.notify();
                }
            }
            if blocked_rx.recv_timeout(WAIT).is_ok() {
                let _ = chunks_tx.send(None);
                if notify {
                    notifier.notify();
                }
            }
        });
        Ok(Box::new(Fed {
            chunks: chunks_rx,
            blocked: blocked_tx,
            current: Vec::new(),
            pos: 0,
            ended: false,
        }))
    }
}

fn spawn_fed(
    mode: Mode,
    data: Vec<u8>,
    chunk: usize,
    notify: bool,
    source_timeout: Duration,
) -> ServerGuard {
    spawn_server(
        mode,
        v4(),
        move || {
            Box::new(FedHandler {
                data,
                chunk,
                notify,
            })
        },
        // Retransmission timers far beyond the test's wait: only a notification can
        // resume a parked session in time.
        move |b| {
            b.timeout(Duration::from_secs(60))
                .source_timeout(source_timeout)
        },
    )
}

both_modes!(a_parked_session_resumes_when_its_source_notifies);
fn a_parked_session_resumes_when_its_source_notifies(mode: Mode) {
    let data = pseudo_random(300_000, 41);
    // Chunks that do not line up with blocks: reads end mid-block and resume.
    let mut server = spawn_fed(mode, data.clone(), 7_000, true, Duration::from_secs(60));
    for options in [&[][..], &[("blksize", "1428"), ("windowsize", "16")][..]] {
        let got = fetch(mode, server.addr, "streamed", "octet", options).unwrap();
        assert_same(&got.data, &data, "streamed");
        let stats = server.next_session();
        assert_eq!(stats.outcome, Outcome::Completed);
        assert_eq!(stats.transfer.retransmits, 0, "resumed by the timer");
    }
}

both_modes!(a_source_that_never_becomes_ready_ends_the_session_as_stalled);
fn a_source_that_never_becomes_ready_ends_the_session_as_stalled(mode: Mode) {
    // Without notifications nothing resumes the source: with nothing in flight after
    // OACK/ACK 0, the session waits for the source timeout and ends as stalled.
    let mut server = spawn_fed(mode, vec![7; 5000], 1000, false, Duration::from_millis(300));
    let err = fetch(mode, server.addr, "stuck", "octet", &[("tsize", "0")]).unwrap_err();
    assert_eq!(err.code(), Some(0), "{err:?}");
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::SourceStalled);
    assert_eq!(stats.transfer.bytes_read, 0);
    // The server goes on serving (and stalling) the next request.
    let again = fetch(mode, server.addr, "stuck", "octet", &[("tsize", "0")]).unwrap_err();
    assert_eq!(again.code(), Some(0));
    assert_eq!(server.next_session().outcome, Outcome::SourceStalled);
}

// ---------------------------------------------------------------------------------------
// Adaptive retransmission
// ---------------------------------------------------------------------------------------

both_modes!(a_lost_window_is_resent_after_a_few_round_trips_not_the_timeout);
fn a_lost_window_is_resent_after_a_few_round_trips_not_the_timeout(mode: Mode) {
    let root = standard_root();
    // A 60 s timeout: within the test's wait only an early retransmission can come.
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(60)).adaptive_timeout(true)
    });
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"big.bin", "octet", &[("windowsize", "4")]);
    let (oack, tid) = raw.recv();
    assert!(matches!(Packet::parse(&oack), Ok(Packet::Oack(_))));
    // Three round trips measured (ACK 0, 4, 8), then the third window is "lost".
    for last in [0, 4, 8] {
        raw.ack(tid, last);
        let window: Vec<u16> = (0..4).map(|_| raw.expect_data().0).collect();
        assert_eq!(window, [last + 1, last + 2, last + 3, last + 4]);
    }
    // No ACK: the window comes again, early.
    let again: Vec<u16> = (0..4).map(|_| raw.expect_data().0).collect();
    assert_eq!(again, [9, 10, 11, 12]);
    send_error(&raw, tid, ErrorCode::NotDefined, "enough");
    let stats = server.next_session();
    assert!(
        stats.transfer.early_retransmits >= 1,
        "{:?}",
        stats.transfer
    );
    assert_eq!(
        stats.transfer.retransmits, 0,
        "the full timeout never ran out"
    );
    assert!(stats.transfer.srtt.is_some());
}

both_modes!(an_unacknowledged_first_packet_waits_the_full_timeout);
fn an_unacknowledged_first_packet_waits_the_full_timeout(mode: Mode) {
    // No round trip measured yet (a spoofed request looks like this): no early resend.
    let root = standard_root();
    let _server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(60)).adaptive_timeout(true)
    });
    let raw = Raw::new(_server.addr);
    raw.rrq(_server.addr, b"big.bin", "octet", &[]);
    assert_eq!(raw.expect_data().0, 1);
    assert_eq!(raw.recv_within(Duration::from_millis(300)), None);
}

both_modes!(busy_polling_off_never_spins);
fn busy_polling_off_never_spins(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.busy_poll(Duration::ZERO)
            .stats_interval(Duration::from_millis(50))
    });
    for options in [&[][..], &[("blksize", "1428"), ("windowsize", "16")][..]] {
        let got = fetch(mode, server.addr, "big.bin", "octet", options).unwrap();
        assert_same(&got.data, big(), "big.bin");
        assert_eq!(server.next_session().outcome, Outcome::Completed);
    }
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.busy_poll, Duration::ZERO);
}

both_modes!(busy_polling_serves_the_same_bytes);
fn busy_polling_serves_the_same_bytes(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.busy_poll(Duration::from_micros(200))
    });
    for options in [&[][..], &[("blksize", "1428"), ("windowsize", "16")][..]] {
        let got = fetch(mode, server.addr, "big.bin", "octet", options).unwrap();
        assert_same(&got.data, big(), "big.bin");
        assert_eq!(server.next_session().outcome, Outcome::Completed);
    }
}
