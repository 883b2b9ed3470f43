//! The hostile-request matrix: hand-made datagrams against the real server over loopback.
//! Every case states the answer it expects (an ERROR code, silence, or a normal transfer)
//! and is followed by a check that the server still serves a normal client.
//!
//! Silence is checked without sleeping: after the datagram that must go unanswered, the
//! same socket sends a request that must be answered (a missing file: ERROR 1), and the
//! next datagram to arrive must be that answer. The server reads its listener in order and
//! loopback delivers in order, so any answer to the first datagram would arrive first.
//!
//! What the server answers on its listening port. No answer is larger than the datagram
//! that caused it: an ERROR whose message would not fit goes with an empty message, and
//! one that would not fit even so is not sent.
//!
//! | datagram | answer |
//! |---|---|
//! | 0 to 4 bytes | silence (counted as malformed, or stray in single-port mode) |
//! | 5 bytes or more that do not parse (truncated, unknown opcode, request without terminators, empty filename or mode, option without value) | ERROR 4 "malformed" (14 bytes; from 5 to 13 bytes, ERROR 4 without a message) (counted as malformed) |
//! | DATA, ACK, OACK of 24 bytes or more | ERROR 5 "unknown transfer id" (24 bytes) (counted as malformed, or stray in single-port mode) |
//! | DATA, ACK, OACK shorter than that | silence (counted the same) |
//! | ERROR | silence (counted as malformed, or stray in single-port mode) |
//! | WRQ | ERROR 4 "no writes" |
//! | RRQ in mode `mail` or an unknown mode | ERROR 4 "bad mode" |
//! | RRQ with invalid option values | the transfer, the invalid options left out of the OACK |
//! | RRQ or WRQ longer than 1,024 bytes (`MAX_REQUEST_LEN`) | a short ERROR 4 (counted as malformed) |
//!
//! A session's own port (the normal mode) is connected to its client: the kernel drops
//! anyone else's datagrams, and an ICMP port unreachable from the client ends the session
//! (`tests/icmp.rs`).

use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use dyntftp::packet::{write_error, MAX_REQUEST_LEN};
use dyntftp::server::{STORED_OPTIONS, STORED_OPTION_BYTES};
use dyntftp::session::GO_BACK_BURST;
use dyntftp::{ErrorCode, Outcome, Packet, SessionStats};
use testkit::*;

/// A server in `mode` on a standard root with frequent statistics reports.
fn spawn(mode: Mode, root: &TempDir) -> ServerGuard {
    spawn_fs_with(mode, v4(), root.path(), |b| {
        b.stats_interval(Duration::from_millis(50))
            // Long enough that no timer fires while a case looks at the packet sequence.
            .timeout(Duration::from_secs(3))
    })
}

/// Sends a request for a missing file from `raw` and asserts that the very next datagram
/// `raw` receives is its ERROR 1: nothing that `raw` sent before was answered.
#[track_caller]
fn assert_nothing_before_probe(server: &ServerGuard, raw: &Raw, case: &str) {
    raw.rrq(server.addr, b"probe-missing-file", "octet", &[]);
    let (datagram, from) = raw.recv();
    match Packet::parse(&datagram) {
        Ok(Packet::Error {
            code: ErrorCode::FileNotFound,
            ..
        }) => {}
        other => panic!("{case}: expected silence, but got {other:?} from {from}"),
    }
}

/// A normal client still gets a normal file, and its session is reported as completed.
#[track_caller]
fn assert_still_serves(server: &mut ServerGuard, case: &str) {
    let client = Client::new(server.mode, server.addr);
    match client.fetch(server.addr, "small.txt", "octet", &[]) {
        Ok(got) => assert_eq!(got.data, SMALL, "{case}: normal fetch afterwards"),
        Err(e) => panic!("{case}: the server no longer serves a normal client: {e:?}"),
    }
    let stats = session_of(server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed, "{case}");
}

/// The next finished session of `peer`. The only other sessions a case leaves behind are
/// the `small.txt` fetches of [`assert_still_serves`], which may be reported first; any
/// other is a failure.
#[track_caller]
fn session_of(server: &mut ServerGuard, peer: SocketAddr) -> SessionStats {
    server.session_of(peer, |other| {
        assert_eq!(
            other.filename, "small.txt",
            "an unexpected session: {other:?}"
        )
    })
}

/// What a datagram sent to the listener must get.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Nothing at all.
    Silence,
    /// One ERROR with this code, from a new transfer ID, and nothing after it.
    Error(u16),
}

/// Sends `datagram` to the listener from a fresh socket and checks the answer.
#[track_caller]
fn listener_case(server: &mut ServerGuard, case: &str, datagram: &[u8], want: Answer) {
    let raw = Raw::new(server.addr);
    raw.send(server.addr, datagram);
    match want {
        Answer::Silence => assert_nothing_before_probe(server, &raw, case),
        Answer::Error(code) => {
            let (got, message, from) = raw.expect_error();
            assert_eq!(got, code, "{case}: ERROR {got} {message:?}");
            // Opcode, code, message, NUL.
            let answer_len = 2 + 2 + message.len() + 1;
            assert!(
                answer_len <= datagram.len(),
                "{case}: an answer larger than the datagram ({message:?})"
            );
            assert_eq!(from.ip(), server.addr.ip(), "{case}");
            assert_eq!(
                from.port() == server.addr.port(),
                server.mode.is_single_port(),
                "{case}: ERROR from a new TID (the listening port in single-port mode)"
            );
            // Exactly one answer.
            assert_nothing_before_probe(server, &raw, case);
        }
    }
    assert_still_serves(server, case);
}

fn rrq_bytes(filename: &[u8], mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut rrq = Vec::new();
    dyntftp::client::write_rrq(&mut rrq, filename, mode, options.iter().copied());
    rrq
}

both_modes!(malformed_and_misdirected_datagrams_on_the_listener);
fn malformed_and_misdirected_datagrams_on_the_listener(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    let mut error_datagram = Vec::new();
    write_error(&mut error_datagram, ErrorCode::NotDefined, "hello listener");
    let long_mode_missing = {
        let mut d = b"\x00\x01small.txt\x00".to_vec();
        d.extend_from_slice(&[b'o'; 1000]);
        d
    };
    use Answer::*;
    // (case, datagram, answer, counted as malformed)
    let cases: Vec<(&str, Vec<u8>, Answer, bool)> = vec![
        ("0 bytes", b"".to_vec(), Silence, true),
        ("1 byte 0x00", b"\x00".to_vec(), Silence, true),
        ("1 byte 0x01", b"\x01".to_vec(), Silence, true),
        ("1 byte 0xff", b"\xff".to_vec(), Silence, true),
        (
            "2 bytes: bare RRQ opcode",
            b"\x00\x01".to_vec(),
            Silence,
            true,
        ),
        (
            "2 bytes: bare ACK opcode",
            b"\x00\x04".to_vec(),
            Silence,
            true,
        ),
        ("2 bytes: opcode 0", b"\x00\x00".to_vec(), Silence, true),
        (
            "3 bytes: truncated ACK",
            b"\x00\x04\x00".to_vec(),
            Silence,
            true,
        ),
        (
            "3 bytes: RRQ 'a' unterminated",
            b"\x00\x01a".to_vec(),
            Silence,
            true,
        ),
        (
            "3 bytes: ERROR without code",
            b"\x00\x05\x00".to_vec(),
            Silence,
            true,
        ),
        (
            "unknown opcode 0",
            b"\x00\x00file\x00octet\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "unknown opcode 7",
            b"\x00\x07file\x00octet\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "unknown opcode 9",
            b"\x00\x09whatever\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "unknown opcode 256",
            b"\x01\x00file\x00octet\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "unknown opcode 0xffff",
            b"\xff\xff\xff\xff".to_vec(),
            Silence,
            true,
        ),
        (
            "DATA to the listener",
            b"\x00\x03\x00\x01payload".to_vec(),
            Silence,
            true,
        ),
        (
            "empty DATA to the listener",
            b"\x00\x03\x00\x01".to_vec(),
            Silence,
            true,
        ),
        (
            "ACK 0 to the listener",
            b"\x00\x04\x00\x00".to_vec(),
            Silence,
            true,
        ),
        (
            "ACK 1 to the listener",
            b"\x00\x04\x00\x01".to_vec(),
            Silence,
            true,
        ),
        (
            "ACK with trailing bytes",
            b"\x00\x04\x00\x01xx".to_vec(),
            Error(4),
            true,
        ),
        (
            "OACK to the listener",
            b"\x00\x06blksize\x00512\x00".to_vec(),
            Silence,
            true,
        ),
        (
            "empty OACK to the listener",
            b"\x00\x06".to_vec(),
            Silence,
            true,
        ),
        (
            "DATA of 24 bytes to the listener",
            [&b"\x00\x03\x00\x01"[..], &[b'x'; 20]].concat(),
            Error(5),
            true,
        ),
        (
            "DATA of 23 bytes to the listener",
            [&b"\x00\x03\x00\x01"[..], &[b'x'; 19]].concat(),
            Silence,
            true,
        ),
        (
            "long OACK to the listener",
            b"\x00\x06blksize\x00512\x00windowsize\x004\x00".to_vec(),
            Error(5),
            true,
        ),
        ("ERROR to the listener", error_datagram, Silence, true),
        (
            "ERROR without message NUL",
            b"\x00\x05\x00\x00oops".to_vec(),
            Silence,
            true,
        ),
        (
            "RRQ without filename terminator",
            b"\x00\x01small.txt".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ without mode",
            b"\x00\x01small.txt\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ without mode terminator",
            b"\x00\x01small.txt\x00octet".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ with a long unterminated mode",
            long_mode_missing,
            Error(4),
            true,
        ),
        (
            "RRQ with empty filename",
            b"\x00\x01\x00octet\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ with empty mode",
            b"\x00\x01small.txt\x00\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ with nothing but NULs",
            b"\x00\x01\x00\x00\x00\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ option without value at the end",
            b"\x00\x01small.txt\x00octet\x00blksize\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ option value without terminator",
            b"\x00\x01small.txt\x00octet\x00blksize\x001024".to_vec(),
            Error(4),
            true,
        ),
        (
            "RRQ with an empty option name",
            b"\x00\x01small.txt\x00octet\x00\x00512\x00".to_vec(),
            Error(4),
            true,
        ),
        (
            "WRQ",
            b"\x00\x02upload.bin\x00octet\x00".to_vec(),
            Error(4),
            false,
        ),
        (
            "mode mail",
            rrq_bytes(b"small.txt", "mail", &[]),
            Error(4),
            false,
        ),
        (
            "mode MAIL",
            rrq_bytes(b"small.txt", "MAIL", &[]),
            Error(4),
            false,
        ),
        (
            "unknown mode",
            rrq_bytes(b"small.txt", "binary", &[]),
            Error(4),
            false,
        ),
        (
            "mode DEL",
            rrq_bytes(b"small.txt", "\u{7f}", &[]),
            Error(4),
            false,
        ),
        (
            "mode 'octet ' (trailing space)",
            rrq_bytes(b"small.txt", "octet ", &[]),
            Error(4),
            false,
        ),
    ];
    let mut malformed = 0;
    for (case, datagram, answer, counted) in &cases {
        listener_case(&mut server, case, datagram, *answer);
        malformed += u64::from(*counted);
    }
    let total = sum_reports(&server.reports_until_next());
    if mode.is_single_port() {
        // There, DATA, ACK, OACK and ERROR from a peer without a session are strays.
        assert_eq!(
            total.malformed + total.stray_datagrams,
            malformed,
            "datagrams counted as malformed or stray"
        );
    } else {
        assert_eq!(total.malformed, malformed, "datagrams counted as malformed");
    }
    assert_eq!(total.write_requests, 1);
    assert!(!root.path().join("upload.bin").exists());
    assert_eq!(total.panics, 0);
}

both_modes!(hostile_filenames);
fn hostile_filenames(mode: Mode) {
    let root = standard_root();
    // A file whose name is not UTF-8.
    let non_utf8: &[u8] = b"caf\xe9-\xff\xfe.bin";
    std::fs::write(
        root.path().join(std::ffi::OsStr::from_bytes(non_utf8)),
        b"latin-1 name",
    )
    .unwrap();
    let mut server = spawn(mode, &root);

    // Names as long as a request may carry (MAX_REQUEST_LEN): no such file (ERROR 1).
    let raw = Raw::new(server.addr);
    let longest = vec![b'a'; MAX_REQUEST_LEN - 2 - 1 - 6];
    raw.send(server.addr, &rrq_bytes(&longest, "octet", &[]));
    let (code, message, _) = raw.expect_error();
    assert_eq!(code, 1, "{}-byte name: {message}", longest.len());
    assert!(message.len() < 100, "the answer does not echo the name");
    assert_still_serves(&mut server, "longest name");
    let deep: Vec<u8> = b"d/".repeat(longest.len() / 2);
    raw.send(server.addr, &rrq_bytes(&deep, "octet", &[]));
    assert_eq!(raw.expect_error().0, 1, "deepest path");

    // Longer requests, up to the largest a UDP datagram can carry (65,507 bytes over
    // IPv4), are refused with a short ERROR 4 before anything looks at the name.
    let mut huge = vec![b'x'; 65_507 - 2 - 1 - 6];
    huge[0] = b'y';
    for (case, name) in [
        ("one byte too long", &longest[..longest.len()]),
        ("60,000-byte name", &huge[..60_000]),
        ("60,000-byte deep path", &b"d/".repeat(30_000)[..]),
        ("largest datagram", &huge[..]),
    ] {
        let mut request = rrq_bytes(name, "octet", &[]);
        if case == "one byte too long" {
            request.push(0);
        }
        raw.send(server.addr, &request);
        let (datagram, _) = raw.recv();
        let Ok(Packet::Error { code, .. }) = Packet::parse(&datagram) else {
            panic!("{case}: not an ERROR: {datagram:?}");
        };
        assert_eq!(code, ErrorCode::IllegalOperation, "{case}");
        assert!(
            datagram.len() <= 64,
            "{case}: a short answer ({datagram:?})"
        );
        assert_still_serves(&mut server, case);
    }
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(
        total.malformed, 4,
        "the refused requests count as malformed"
    );

    // Non-UTF-8 bytes: passed through as bytes (Linux names are bytes).
    let client = Client::new(mode, server.addr);
    let got = client
        .fetch_with(server.addr, non_utf8, "octet", &[], &mut |_| {})
        .expect("non-UTF-8 name that exists");
    assert_eq!(got.data, b"latin-1 name");
    let stats = session_of(&mut server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.filename, String::from_utf8_lossy(non_utf8));
    raw.send(
        server.addr,
        &rrq_bytes(b"\xc3\x28\xa0\xa1-missing", "octet", &[]),
    );
    assert_eq!(
        raw.expect_error().0,
        1,
        "non-UTF-8 name that does not exist"
    );

    // Control characters and the root itself: access violation.
    for name in [
        &b"small.txt\x01"[..],
        b"\x1b[31mred",
        b"tab\there",
        b"del\x7f",
        b"/",
        b".",
        b"./",
        b"\\",
    ] {
        raw.send(server.addr, &rrq_bytes(name, "octet", &[]));
        let (code, message, _) = raw.expect_error();
        assert_eq!(code, 2, "{:?}: {message}", name.escape_ascii().to_string());
    }
    assert_still_serves(&mut server, "control characters");
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.panics, 0);
}

/// Fetches `1024.bin` with `options` and returns the OACK (None when there was none) after
/// checking the data and that the transfer used `blksize`.
#[track_caller]
fn fetch_with_options(
    server: &mut ServerGuard,
    options: &[(&str, &str)],
    blksize: usize,
) -> Option<Vec<(String, String)>> {
    let case = format!("{options:?}");
    let client = Client::new(server.mode, server.addr);
    let got = client
        .fetch(server.addr, "1024.bin", "octet", options)
        .unwrap_or_else(|e| panic!("{case}: {e:?}"));
    assert_eq!(got.data, content("1024.bin"), "{case}");
    assert_eq!(got.blksize, blksize, "{case}");
    let want_lens: Vec<usize> = {
        let mut lens = vec![blksize; 1024 / blksize];
        lens.push(1024 % blksize);
        lens
    };
    assert_eq!(got.data_lens(), want_lens, "{case}: DATA lengths");
    let stats = session_of(server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed, "{case}");
    got.oack
}

both_modes!(invalid_option_values_are_ignored);
fn invalid_option_values_are_ignored(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    let ignored: &[(&str, &str)] = &[
        ("blksize", "0"),
        ("blksize", "7"),
        ("blksize", "65465"),
        ("blksize", "-1"),
        ("blksize", "abc"),
        ("blksize", "99999999999999999999"),
        ("blksize", "18446744073709551617"),
        ("blksize", " 1024"),
        ("blksize", "1024 "),
        ("blksize", "+1024"),
        ("blksize", "0x400"),
        ("blksize", ""),
        ("timeout", "0"),
        ("timeout", "256"),
        ("timeout", "1.5"),
        ("timeout", "-1"),
        ("utimeout", "9999"),
        ("utimeout", "255000001"),
        ("windowsize", "0"),
        ("windowsize", "70000"),
        ("windowsize", "65536"),
        ("windowsize", "-3"),
        ("tsize", "-5"),
        ("tsize", "abc"),
        ("tsize", ""),
        ("retries", "1000"),
        ("multicast", ""),
        ("rollover", "0"),
    ];
    for &(name, value) in ignored {
        let oack = fetch_with_options(&mut server, &[(name, value)], 512);
        assert_eq!(oack, None, "{name}={value:?} must be ignored, so no OACK");
    }
    // An invalid value next to a valid option: only the valid one is acknowledged.
    let oack = fetch_with_options(&mut server, &[("blksize", "abc"), ("tsize", "0")], 512);
    assert_eq!(oack, Some(vec![("tsize".into(), "1024".into())]));
    let oack = fetch_with_options(
        &mut server,
        &[("windowsize", "70000"), ("blksize", "256")],
        256,
    );
    assert_eq!(oack, Some(vec![("blksize".into(), "256".into())]));
    // The same option twice: the first occurrence counts, valid or not.
    let oack = fetch_with_options(&mut server, &[("blksize", "256"), ("blksize", "128")], 256);
    assert_eq!(oack, Some(vec![("blksize".into(), "256".into())]));
    let oack = fetch_with_options(&mut server, &[("blksize", "abc"), ("BLKSIZE", "128")], 512);
    assert_eq!(oack, None);
    let oack = fetch_with_options(&mut server, &[("tsize", "0"), ("tsize", "0")], 512);
    assert_eq!(oack, Some(vec![("tsize".into(), "1024".into())]));
    assert_still_serves(&mut server, "invalid options");
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.panics, 0);
    assert_eq!(total.malformed, 0);
}

both_modes!(options_up_to_the_request_cap);
fn options_up_to_the_request_cap(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    // As many unknown options as a request may carry, then tsize: only tsize is
    // acknowledged, and the session keeps the first 16 options, each cut to 64 bytes.
    let long = "v".repeat(100);
    let names: Vec<String> = (0..200).map(|i| format!("x{i}")).collect();
    let mut options: Vec<(&str, &str)> = vec![("x-long", long.as_str())];
    let fits = |options: &[(&str, &str)]| {
        // Room left for `tsize NUL 0 NUL`.
        rrq_bytes(b"1024.bin", "octet", options).len() + "tsize".len() + "0".len() + 2
            <= MAX_REQUEST_LEN
    };
    for name in &names {
        options.push((name.as_str(), "1"));
        if !fits(&options) {
            options.pop();
            break;
        }
    }
    options.push(("tsize", "0"));
    assert!(options.len() > 100, "{} options", options.len());
    let client = Client::new(mode, server.addr);
    let got = client
        .fetch(server.addr, "1024.bin", "octet", &options)
        .expect("a request at the cap is served");
    assert_eq!(got.oack, Some(vec![("tsize".into(), "1024".into())]));
    let stats = session_of(&mut server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.requested.len(), STORED_OPTIONS);
    assert_eq!(stats.requested[0].0, "x-long");
    assert_eq!(stats.requested[0].1.len(), STORED_OPTION_BYTES);
    assert!(stats.requested[0].1.ends_with('…'));
    assert_eq!(stats.requested[1], ("x0".into(), "1".into()));

    // A thousand options do not fit in a request: ERROR 4, and no session.
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"1024.bin", "octet", &many);
    assert_eq!(raw.expect_error().0, 4);
    // The first occurrence of a repeated option still counts.
    let sizes: Vec<String> = (0..60).map(|i| (8 + i).to_string()).collect();
    let options: Vec<(&str, &str)> = sizes.iter().map(|v| ("blksize", v.as_str())).collect();
    let oack = fetch_with_options(&mut server, &options, 8);
    assert_eq!(oack, Some(vec![("blksize".into(), "8".into())]));
    assert_still_serves(&mut server, "options up to the cap");
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.sessions_started, 3);
}

both_modes!(a_stuffed_65_kb_request_is_refused_with_a_short_error);
/// The F2 request: `timeout 255` and then 65 KB of `a\0\0` options, sent to the listener,
/// gets a short ERROR 4 and starts nothing.
fn a_stuffed_65_kb_request_is_refused_with_a_short_error(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    let mut stuffed = rrq_bytes(b"small.txt", "octet", &[("timeout", "255")]);
    while stuffed.len() + 3 <= 65_507 {
        stuffed.extend_from_slice(b"a\0\0");
    }
    let raw = Raw::new(server.addr);
    raw.send(server.addr, &stuffed);
    let (datagram, from) = raw.recv();
    assert!(
        matches!(
            Packet::parse(&datagram),
            Ok(Packet::Error {
                code: ErrorCode::IllegalOperation,
                ..
            })
        ),
        "{datagram:?}"
    );
    assert!(datagram.len() <= 64, "{} bytes", datagram.len());
    assert_eq!(from.ip(), server.addr.ip());
    assert_nothing_before_probe(&server, &raw, "stuffed request");
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.sessions_started, 0, "no session for it");
    assert_eq!(total.malformed, 1);
    assert_still_serves(&mut server, "stuffed request");
}

/// Starts a transfer of `name` with `raw`, returning the session's TID after DATA 1 (or
/// after the OACK when options are given, which is acknowledged with ACK 0 only when
/// `ack_oack`).
fn start(server: &ServerGuard, raw: &Raw, name: &[u8], options: &[(&str, &str)]) -> SocketAddr {
    raw.rrq(server.addr, name, "octet", options);
    let (datagram, tid) = raw.recv();
    if options.is_empty() {
        assert!(
            matches!(Packet::parse(&datagram), Ok(Packet::Data { block: 1, .. })),
            "expected DATA 1"
        );
    } else {
        assert!(
            matches!(Packet::parse(&datagram), Ok(Packet::Oack(_))),
            "expected an OACK"
        );
    }
    tid
}

both_modes!(ack_for_a_block_not_yet_sent_is_ignored);
fn ack_for_a_block_not_yet_sent_is_ignored(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    let raw = Raw::new(server.addr);
    let tid = start(&server, &raw, b"1024.bin", &[]);
    // Blocks 5, 2 and 65535 were never sent: no answer, no progress.
    for block in [5, 2, 65535, 3] {
        raw.ack(tid, block);
    }
    raw.ack(tid, 1);
    // The next datagram answers ACK 1, and nothing answered the others.
    let (block, data, from) = raw.expect_data();
    assert_eq!((block, from), (2, tid));
    assert_eq!(data, &content("1024.bin")[512..]);
    raw.ack(tid, 2);
    assert_eq!(raw.expect_data().0, 3);
    raw.ack(tid, 3);
    let stats = session_of(&mut server, raw.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.transfer.unexpected_acks, 4);
    assert_eq!(stats.transfer.packets_resent, 0);
    assert_still_serves(&mut server, "ACK for a block not yet sent");
}

both_modes!(ack_0_repeated_100_times_causes_no_resend);
/// A duplicate ACK may resend the next block once per retransmission interval, and only
/// once that block has been out for an interval (issue 15, item 11): here the interval is
/// at least 2 s and the duplicates all come well within it, so none may cause a send.
fn ack_0_repeated_100_times_causes_no_resend(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_secs(3))
            .min_rto(Duration::from_secs(2))
    });
    // After an OACK: the first ACK 0 starts the transfer, 99 more are duplicates.
    let raw = Raw::new(server.addr);
    let tid = start(&server, &raw, b"1024.bin", &[("tsize", "0")]);
    for _ in 0..100 {
        raw.ack(tid, 0);
    }
    assert_eq!(raw.expect_data().0, 1);
    raw.ack(tid, 1);
    // Had any of the 99 duplicates caused a send, DATA 1 again would come first.
    assert_eq!(raw.expect_data().0, 2);
    raw.ack(tid, 2);
    assert_eq!(raw.expect_data().0, 3);
    raw.ack(tid, 3);
    let stats = session_of(&mut server, raw.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.transfer.duplicate_acks, 99);
    assert_eq!(stats.transfer.packets_resent, 0);
    assert_eq!(stats.transfer.packets_sent, 4, "OACK and 3 DATA");
    // Each duplicate asked for a resend of DATA 1 and was held.
    assert_eq!(stats.transfer.go_back_acks, 0);
    assert_eq!(stats.transfer.go_back_held, 99);

    // Without an OACK: ACK 0 acknowledges nothing; 100 of them change nothing.
    let raw = Raw::new(server.addr);
    let tid = start(&server, &raw, b"1024.bin", &[]);
    for _ in 0..100 {
        raw.ack(tid, 0);
    }
    raw.ack(tid, 1);
    assert_eq!(raw.expect_data().0, 2);
    raw.ack(tid, 2);
    assert_eq!(raw.expect_data().0, 3);
    raw.ack(tid, 3);
    let stats = session_of(&mut server, raw.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.transfer.duplicate_acks, 100);
    assert_eq!(stats.transfer.packets_resent, 0);
    assert_eq!(
        (stats.transfer.go_back_acks, stats.transfer.go_back_held),
        (0, 100)
    );
    assert_still_serves(&mut server, "ACK 0 × 100");
}

both_modes!(blind_acks_release_one_window_per_interval_at_most);
/// Issue 15, F1: ACK 1, 2, 3, … sent blind and back to back (what a spoofing attacker does
/// in single-port mode) each slide the window by one block; together they cause at most
/// one go-back-N (a window resent) per ACK, and over the attack no more than the go-back
/// clock's burst plus one per `MIN_GO_BACK_INTERVAL`, on the server's own clock.
fn blind_acks_release_one_window_per_interval_at_most(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.stats_interval(Duration::from_millis(50))
            .timeout(Duration::from_secs(3))
            // A fallback end should the ERROR below be lost with ACKs that overflowed the
            // receive buffer (then the time bound below is loose, not wrong).
            .progress_timeout(Duration::from_millis(300))
    });
    let raw = Raw::new(server.addr);
    let options = [("blksize", "1428"), ("windowsize", "64")];
    let tid = start(&server, &raw, b"big.bin", &options);
    raw.ack(tid, 0);
    let acks = 150;
    for block in 1..=acks {
        raw.ack(tid, block);
    }
    // The ERROR right behind the ACKs ends the session once the server has handled them:
    // the session's duration is then the attack's, which the bound on go-backs needs.
    let mut error = Vec::new();
    write_error(&mut error, ErrorCode::NotDefined, "done");
    raw.send(tid, &error);
    let stats = session_of(&mut server, raw.local_addr());
    let t = &stats.transfer;
    match stats.outcome {
        Outcome::PeerError(ErrorCode::NotDefined) => {}
        // The ERROR was lost with ACKs that overflowed the receive buffer.
        Outcome::TimedOut => eprintln!("the ERROR was lost: the time bound is loose"),
        other => panic!("ended with {other:?}"),
    }
    // Single-port mode caps the window (its ACKs can be forged blind).
    let granted = if mode.is_single_port() { 8 } else { 64 };
    assert_eq!(t.negotiated.window, granted);
    assert!(t.blocks_acked > 0 && t.blocks_acked <= u64::from(acks));
    let go_backs = t.go_back_acks + t.retransmits + t.early_retransmits;
    let floor = dyntftp::session::MIN_GO_BACK_INTERVAL.as_micros() as u64;
    let most = u64::from(GO_BACK_BURST) + stats.duration.as_micros() as u64 / floor;
    assert!(
        go_backs <= most,
        "{go_backs} go-backs in {:?}",
        stats.duration
    );
    assert!(
        t.go_back_acks <= u64::from(acks),
        "more than one go-back per ACK"
    );
    let window = u64::from(granted) * 1428;
    assert!(
        t.bytes_sent <= t.blocks_acked * 1428 + window * (1 + go_backs),
        "{} bytes sent for {acks} ACKs and {go_backs} go-backs",
        t.bytes_sent
    );
    assert_still_serves(&mut server, "blind ACKs");
}

both_modes!(error_from_the_client_mid_transfer_ends_the_session_without_a_reply);
fn error_from_the_client_mid_transfer_ends_the_session_without_a_reply(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    for code in [
        ErrorCode::NotDefined,
        ErrorCode::DiskFull,
        ErrorCode::Unknown(4242),
    ] {
        let raw = Raw::new(server.addr);
        let tid = start(&server, &raw, b"big.bin", &[]);
        raw.ack(tid, 1);
        assert_eq!(raw.expect_data().0, 2);
        let mut error = Vec::new();
        write_error(&mut error, code, "client gives up");
        raw.send(tid, &error);
        let stats = session_of(&mut server, raw.local_addr());
        assert_eq!(stats.outcome, Outcome::PeerError(code));
        assert_eq!(stats.transfer.errors_sent, 0);
        // The session is gone; an ACK to its port reaches no one, and nothing answered
        // the ERROR. (In single-port mode its port is the listener's, where a datagram
        // from a peer without a session is a stray, too short for an ERROR 5.)
        raw.ack(tid, 2);
        assert_nothing_before_probe(&server, &raw, "ERROR mid-transfer");
    }
    assert_still_serves(&mut server, "ERROR mid-transfer");
}

both_modes!(packets_out_of_place_from_the_peer);
fn packets_out_of_place_from_the_peer(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    // Garbage from the peer is ignored; the transfer goes on.
    let raw = Raw::new(server.addr);
    let tid = start(&server, &raw, b"1024.bin", &[]);
    for junk in [
        &b""[..],
        b"\x00",
        b"\x00\x04\x00",
        b"\x00\x09zz",
        b"\x00\x04\x00\x01xx",
    ] {
        raw.send(tid, junk);
    }
    raw.ack(tid, 1);
    assert_eq!(raw.expect_data().0, 2);
    raw.ack(tid, 2);
    assert_eq!(raw.expect_data().0, 3);
    raw.ack(tid, 3);
    let stats = session_of(&mut server, raw.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.transfer.malformed, 5);

    // DATA, a request or an OACK from the peer have no place in a read transfer: ERROR 4.
    // In single-port mode requests from the peer reach the listener's logic instead (a
    // repeated RRQ must not end the transfer there: it is what a client whose first DATA
    // was lost sends; a different one replaces an unacknowledged session, see
    // tests/abuse.rs), so only DATA and OACK end the session.
    let mut cases = vec![
        ("DATA", b"\x00\x03\x00\x01xyz".to_vec()),
        ("OACK", b"\x00\x06blksize\x00512\x00".to_vec()),
    ];
    if !mode.is_single_port() {
        cases.push(("RRQ", rrq_bytes(b"small.txt", "octet", &[])));
        cases.push(("WRQ", b"\x00\x02small.txt\x00octet\x00".to_vec()));
    } else {
        let raw = Raw::new(server.addr);
        let tid = start(&server, &raw, b"1024.bin", &[]);
        raw.send(tid, &rrq_bytes(b"1024.bin", "octet", &[]));
        raw.ack(tid, 1);
        assert_eq!(raw.expect_data().0, 2, "a repeated request is ignored");
        raw.ack(tid, 2);
        assert_eq!(raw.expect_data().0, 3);
        raw.ack(tid, 3);
        let stats = session_of(&mut server, raw.local_addr());
        assert_eq!(stats.outcome, Outcome::Completed);
    }
    for (case, datagram) in cases {
        let raw = Raw::new(server.addr);
        let tid = start(&server, &raw, b"1024.bin", &[]);
        raw.send(tid, &datagram);
        let (code, message, from) = raw.expect_error();
        assert_eq!((code, from), (4, tid), "{case}: {message}");
        let stats = session_of(&mut server, raw.local_addr());
        assert_eq!(stats.outcome, Outcome::IllegalOperation, "{case}");
        assert_nothing_before_probe(&server, &raw, case);
    }
    assert_still_serves(&mut server, "packets out of place");
}

both_modes!(stray_tids_flooding_a_session_are_dropped_or_answered_and_the_session_completes);
/// Strangers flood a session's port during a transfer. In the normal mode the session's
/// socket is connected to its client, so the kernel drops their datagrams (and answers
/// them with ICMP port unreachable); in single-port mode the port is the listener's,
/// which answers each one that is not an ERROR with at most one short ERROR (5, or 4 for
/// a datagram that is no packet at all).
fn stray_tids_flooding_a_session_are_dropped_or_answered_and_the_session_completes(mode: Mode) {
    let root = standard_root();
    let mut server = spawn(mode, &root);
    let client = Client::new(mode, server.addr);
    let strays: Vec<Raw> = (0..5).map(|_| Raw::new(server.addr)).collect();
    let listener = server.addr;
    let mut flooded = 0u64;
    let mut answered = 0u64;
    let got = client
        .fetch_with(
            server.addr,
            b"big.bin",
            "octet",
            &[("blksize", "1024")],
            &mut |p| {
                if p.block % 50 != 7 || p.block > 500 {
                    return;
                }
                let mut stray_error = Vec::new();
                write_error(&mut stray_error, ErrorCode::NotDefined, "stray error");
                for stray in &strays {
                    // The ACK the client is about to send, DATA, ACK 0, garbage, an ERROR.
                    let block = (p.block as u16).to_be_bytes();
                    let ack = [0, 4, block[0], block[1]];
                    let data = [&b"\x00\x03\x00\x07"[..], &[b'z'; 100]].concat();
                    let datagrams: [&[u8]; 5] =
                        [&ack, &data, b"\x00\x04\x00\x00", b"\xde\xad", &stray_error];
                    for datagram in datagrams {
                        stray.send(p.server, datagram);
                        flooded += 1;
                    }
                    // What came back before the answer to a probe: nothing in the normal
                    // mode (the kernel drops strays to a connected socket); in single-port
                    // mode one ERROR 5, from the session's port, for the DATA: the others
                    // are shorter than the answer would be, or an ERROR.
                    stray.rrq(listener, b"probe-missing-file", "octet", &[]);
                    let mut answers = 0;
                    loop {
                        let (datagram, from) = stray.recv();
                        let Ok(Packet::Error { code, message }) = Packet::parse(&datagram) else {
                            panic!("a stray got {datagram:?} from {from}");
                        };
                        if code == ErrorCode::FileNotFound {
                            break;
                        }
                        let message = String::from_utf8_lossy(message);
                        assert!(mode.is_single_port(), "normal mode: {code} {message}");
                        assert_eq!(from, p.server, "{code} {message}");
                        assert!(
                            matches!(
                                code,
                                ErrorCode::UnknownTransferId | ErrorCode::IllegalOperation
                            ),
                            "{code} {message}"
                        );
                        answers += 1;
                    }
                    let expected = u64::from(mode.is_single_port());
                    assert_eq!(answers, expected, "answers to 4 datagrams and an ERROR");
                    answered += answers;
                }
            },
        )
        .expect("the flooded transfer completes");
    assert_eq!(got.data.len(), big().len());
    assert!(got.data == big(), "byte-identical");
    assert_eq!(got.out_of_order, 0, "the strays' ACKs moved nothing");
    let stats = session_of(&mut server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.transfer.duplicate_acks, 0);
    assert_eq!(stats.transfer.unexpected_acks, 0);
    assert_eq!(stats.transfer.packets_resent, 0);
    assert_eq!(stats.transfer.malformed, 0, "nothing reached the session");
    let total = sum_reports(&server.reports_until_next());
    if mode.is_single_port() {
        // Each datagram was looked at by the listener's admission: a stray, or malformed
        // (the unparseable fifth).
        assert_eq!(total.stray_datagrams + total.malformed, flooded);
    } else {
        // The kernel dropped them all before the server saw any.
        assert_eq!(total.stray_datagrams, 0);
        assert_eq!(answered, 0);
    }
    if mode.is_single_port() {
        assert_eq!(answered, flooded / 5);
    }
    // Nothing more for the strays.
    for stray in &strays {
        assert_nothing_before_probe(&server, stray, "stray after the flood");
    }
    assert!(flooded >= 5 * 5 * 9, "{flooded} datagrams flooded");
    assert_still_serves(&mut server, "stray flood");
}

both_modes!(single_port_mode_caps_blksize_and_window);
/// Single-port mode caps blksize and window by default (a spoofed ACK there releases at
/// most 8 blocks of 1468 bytes); the normal mode grants what the general limits allow;
/// an operator can lift the cap.
fn single_port_mode_caps_blksize_and_window(mode: Mode) {
    let root = standard_root();
    let ask = [("blksize", "65464"), ("windowsize", "64")];
    let granted = |server: &mut ServerGuard| {
        let client = Client::new(server.mode, server.addr);
        // A one-block file: what is negotiated shows, without a 1 MiB window of 64 KiB
        // datagrams to a test socket.
        let got = client
            .fetch(server.addr, "1024.bin", "octet", &ask)
            .expect("fetch");
        assert_eq!(got.data, content("1024.bin"));
        let stats = session_of(server, client.local_addr());
        assert_eq!(stats.outcome, Outcome::Completed);
        let n = stats.transfer.negotiated;
        (n.blksize, n.window)
    };
    let mut server = spawn(mode, &root);
    let want = if mode.is_single_port() {
        (1468, 8)
    } else {
        // 1 MiB / 65464: 16 blocks.
        (65464, 16)
    };
    assert_eq!(granted(&mut server), want);
    drop(server);
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.single_port_limits(dyntftp::Limits::default())
    });
    assert_eq!(granted(&mut server), (65464, 16), "the cap lifted");
}

both_modes!(a_spent_window_budget_shrinks_the_next_sessions_window);
/// With a window memory budget of 12 blocks of 1024 bytes, a second session that starts
/// while the first holds its window is granted what is left; when the first ends, its
/// share comes back.
fn a_spent_window_budget_shrinks_the_next_sessions_window(mode: Mode) {
    let root = standard_root();
    let mut server = spawn_fs_with(mode, v4(), root.path(), |b| {
        // Set: the default max_sessions would follow the tiny budget (one session).
        b.window_memory(12 * 1028)
            .max_sessions(8)
            .timeout(Duration::from_secs(3))
            .stats_interval(Duration::from_millis(50))
    });
    let ask = [("blksize", "1024"), ("windowsize", "16")];
    let listener = server.addr;
    let oack_window = |raw: &Raw| -> (u16, SocketAddr) {
        raw.rrq(listener, b"big.bin", "octet", &ask);
        let (datagram, tid) = raw.recv();
        let Ok(Packet::Oack(options)) = Packet::parse(&datagram) else {
            panic!("expected an OACK: {datagram:?}");
        };
        let window = options
            .iter()
            .find(|o| o.is("windowsize"))
            .map(|o| String::from_utf8_lossy(o.value).parse().unwrap())
            .expect("windowsize acknowledged");
        (window, tid)
    };
    // The first session takes 12 blocks (8 in single-port mode, its cap), the second what
    // is left: one block (4).
    let (first_want, second_want) = if mode.is_single_port() {
        (8, 4)
    } else {
        (12, 1)
    };
    let first = Raw::new(server.addr);
    let (window, first_tid) = oack_window(&first);
    assert_eq!(window, first_want);
    let second = Raw::new(server.addr);
    let (window, _) = oack_window(&second);
    assert_eq!(window, second_want, "the second session gets what is left");
    // The first ends (its client gives up): a third session gets its share back.
    let mut error = Vec::new();
    write_error(&mut error, ErrorCode::NotDefined, "bye");
    first.send(first_tid, &error);
    let stats = session_of(&mut server, first.local_addr());
    assert_eq!(stats.transfer.negotiated.window, first_want);
    let third = Raw::new(server.addr);
    let (window, _) = oack_window(&third);
    let left_after_second = 12 - second_want.min(12);
    assert_eq!(window, first_want.min(left_after_second));
}
