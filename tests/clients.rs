//! Interoperability with real TFTP clients run as black boxes: curl (`tftp://`), tftp-hpa's
//! `tftp` and atftp, against the library server in-process. (The `dyntftpd` binary's own
//! tests are in `dyntftpd/tests/daemon.rs`.)
//!
//! A client that is not installed is skipped with a loud `SKIPPED:` line, unless
//! `DYNTFTP_REQUIRE_CLIENTS=1`, which turns a missing client into a failure.

use std::fs;
use std::path::Path;
use std::time::Duration;

use dyntftp::{Outcome, SessionStats};
use testkit::*;

/// A root with the client files, an output directory, and a server in `mode` on
/// 127.0.0.1:0.
struct Bed {
    // Fields drop in order: the server stops before its root is removed.
    server: ServerGuard,
    out: TempDir,
    _root: TempDir,
}

fn bed(mode: Mode) -> Bed {
    let root = standard_root();
    for (name, data) in client_files() {
        root.write(name, &data);
    }
    let out = TempDir::new("client-out");
    // Short retransmission settings: a client that never sends its final ACK shows up as
    // FinalAckMissing within a couple of seconds rather than half a minute.
    // Adaptive retransmission on, as dyntftpd runs it.
    // Large blocks and windows in both modes: single-port mode's default caps are lifted
    // (they are tested in hostile.rs).
    let server = spawn_fs_with(mode, v4(), root.path(), |b| {
        b.timeout(Duration::from_millis(250))
            .retries(3)
            .adaptive_timeout(true)
            .single_port_limits(dyntftp::Limits::default())
    });
    Bed {
        server,
        out,
        _root: root,
    }
}

/// Checks a client's output file and the server's record of the session.
fn check(
    bed: &mut Bed,
    client: &str,
    name: &str,
    want: &[u8],
    out: &Path,
    run: &Run,
    blksize: Option<u16>,
) -> SessionStats {
    assert!(
        run.status.success(),
        "{client} {name}: failed\n{}",
        run.describe()
    );
    let got = match fs::read(out) {
        Ok(got) => got,
        // curl creates no output file for an empty transfer.
        Err(_) if want.is_empty() && client.starts_with("curl") => Vec::new(),
        Err(e) => panic!("{client} {name}: no output file ({e})\n{}", run.describe()),
    };
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{client} {name}: got {} bytes, want {}; first difference at {first:?}",
            got.len(),
            want.len()
        );
    }
    let stats = bed.server.next_session();
    assert_eq!(stats.filename, name, "{client}");
    assert_eq!(
        stats.outcome,
        Outcome::Completed,
        "{client} {name}: {stats:?}"
    );
    if let Some(blksize) = blksize {
        assert_eq!(
            stats.transfer.negotiated.blksize, blksize,
            "{client} {name}"
        );
    }
    stats
}

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

fn curl(mode: Mode, test: &str, blksize: Option<u16>) {
    let Some(curl) = client_or_skip("curl", test) else {
        return;
    };
    let mut bed = bed(mode);
    let port = bed.server.port();
    for (name, want) in client_files() {
        let out = bed.out.path().join(format!("curl-{name}"));
        let url = format!("tftp://127.0.0.1:{port}/{name}");
        let out_arg = out.to_string_lossy().into_owned();
        let size = blksize.map(|b| b.to_string());
        let mut args = vec!["-s", "-S", "--max-time", "20", "-o", &out_arg];
        let mut expect_blksize = blksize;
        if want.is_empty() {
            // curl (7.88 at least) always asks for tsize and then refuses the correct
            // answer "tsize 0" ("invalid tsize -:0:- value in OACK packet", exit 71), so
            // an empty file can only be fetched without options.
            args.push("--tftp-no-options");
            expect_blksize = Some(512);
        } else if let Some(size) = &size {
            args.extend(["--tftp-blksize", size]);
        }
        args.push(&url);
        let result = run(&curl, &args, bed.out.path());
        check(&mut bed, "curl", name, &want, &out, &result, expect_blksize);
    }
}

both_modes!(curl_default);
fn curl_default(mode: Mode) {
    curl(mode, "curl_default", None);
}

both_modes!(curl_blksize_1428);
fn curl_blksize_1428(mode: Mode) {
    curl(mode, "curl_blksize_1428", Some(1428));
}

both_modes!(curl_blksize_65464);
fn curl_blksize_65464(mode: Mode) {
    curl(mode, "curl_blksize_65464", Some(65464));
}

// ---------------------------------------------------------------------------------------
// tftp-hpa
// ---------------------------------------------------------------------------------------

both_modes!(tftp_hpa_binary);
/// tftp-hpa 5.2 has no blksize on its command line (nor a `blksize` command): plain
/// RFC 1350 transfers only.
fn tftp_hpa_binary(mode: Mode) {
    let Some(tftp) = client_or_skip("tftp", "tftp_hpa_binary") else {
        return;
    };
    let mut bed = bed(mode);
    let port = bed.server.port().to_string();
    for (name, want) in client_files() {
        let out = bed.out.path().join(format!("tftp-{name}"));
        let out_arg = out.to_string_lossy().into_owned();
        let result = run(
            &tftp,
            &[
                "-m",
                "binary",
                "127.0.0.1",
                &port,
                "-c",
                "get",
                name,
                &out_arg,
            ],
            bed.out.path(),
        );
        // tftp-hpa 5.2 may exit 0 after an error: the content check catches that.
        check(&mut bed, "tftp", name, &want, &out, &result, Some(512));
    }
}

both_modes!(tftp_hpa_netascii_round_trip);
fn tftp_hpa_netascii_round_trip(mode: Mode) {
    let Some(tftp) = client_or_skip("tftp", "tftp_hpa_netascii_round_trip") else {
        return;
    };
    let mut bed = bed(mode);
    let port = bed.server.port().to_string();
    let out = bed.out.path().join("text.txt");
    let out_arg = out.to_string_lossy().into_owned();
    let result = run(
        &tftp,
        &[
            "-m",
            "netascii",
            "127.0.0.1",
            &port,
            "-c",
            "get",
            "text.txt",
            &out_arg,
        ],
        bed.out.path(),
    );
    // The client turns CR LF back into LF and CR NUL back into CR: the original text.
    check(&mut bed, "tftp", "text.txt", &text(), &out, &result, None);
}

// ---------------------------------------------------------------------------------------
// atftp
// ---------------------------------------------------------------------------------------

fn atftp(mode: Mode, test: &str, options: &[&str], blksize: Option<u16>, window: u16) {
    let Some(atftp) = client_or_skip("atftp", test) else {
        return;
    };
    let mut bed = bed(mode);
    let port = bed.server.port().to_string();
    for (name, want) in client_files() {
        let out = bed.out.path().join(format!("atftp-{name}"));
        let out_arg = out.to_string_lossy().into_owned();
        let mut args = Vec::new();
        for option in options {
            args.extend(["--option", option]);
        }
        args.extend(["-g", "-r", name, "-l", &out_arg, "127.0.0.1", &port]);
        let result = run(&atftp, &args, bed.out.path());
        let stats = check(&mut bed, "atftp", name, &want, &out, &result, blksize);
        assert_eq!(stats.transfer.negotiated.window, window, "atftp {name}");
        if options.contains(&"tsize 0") {
            assert_eq!(
                stats.transfer.negotiated.tsize,
                Some(want.len() as u64),
                "atftp {name}"
            );
        }
    }
}

both_modes!(atftp_default);
fn atftp_default(mode: Mode) {
    atftp(mode, "atftp_default", &[], Some(512), 1);
}

both_modes!(atftp_blksize_1428_tsize_windowsize_16);
fn atftp_blksize_1428_tsize_windowsize_16(mode: Mode) {
    atftp(
        mode,
        "atftp_blksize_1428_tsize_windowsize_16",
        &["blksize 1428", "tsize 0", "windowsize 16"],
        Some(1428),
        16,
    );
}

both_modes!(atftp_blksize_65464);
fn atftp_blksize_65464(mode: Mode) {
    atftp(
        mode,
        "atftp_blksize_65464",
        &["blksize 65464"],
        Some(65464),
        1,
    );
}
