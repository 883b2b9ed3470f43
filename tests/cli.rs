//! The dyntftpd command line: exit codes and messages for bad input, help and version.

use std::process::{Command, Output, Stdio};

fn dyntftpd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dyntftpd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("dyntftpd runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_flags_and_values_exit_2_with_reason_and_usage() {
    for (args, reason) in [
        (&["--bogus"][..], "Unrecognized option: 'bogus'"),
        (
            &["--max-blksize", "7"],
            "invalid value for --max-blksize: \"7\"",
        ),
        (&["--timeout", "-1"], "invalid value for --timeout"),
        (&["--retries", "many"], "invalid value for --retries"),
        (
            &["-l", "127.0.0.1"],
            "invalid value for --listen: \"127.0.0.1\"",
        ),
        (&["stray-argument"], "unexpected argument"),
    ] {
        let out = dyntftpd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("dyntftpd: ") && first.contains(reason),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("Usage: dyntftpd"),
            "{args:?}: usage missing: {err}"
        );
    }
}

#[test]
fn bind_failure_names_the_address_and_exits_1() {
    // An address this host does not have: bind fails without any traffic.
    let out = dyntftpd(&["-l", "192.0.2.1:6969", "-r", "."]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot listen on 192.0.2.1:6969"), "{err}");

    // A port already taken.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = dyntftpd(&["-l", &addr, "-r", "."]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("cannot listen on {addr}")));
}

#[test]
fn missing_root_exits_1() {
    let out = dyntftpd(&["-l", "127.0.0.1:0", "-r", "/nonexistent/tftp/root"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot serve /nonexistent/tftp/root"));
}

#[test]
fn unknown_user_exits_1() {
    let out = dyntftpd(&["-l", "127.0.0.1:0", "-r", ".", "-u", "no-such-user-dyntftp"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no such user"));
}

#[test]
fn help_and_version_exit_0() {
    let out = dyntftpd(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--root",
        "--timeout",
        "--retries",
        "--max-blksize",
        "--max-window",
        "--max-sessions",
        "--stats-interval",
        "--user",
        "--verbose",
        "--quiet",
        "--version",
    ] {
        assert!(text.contains(flag), "help lacks {flag}");
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(text.trim_end()),
        "README's usage block differs from --help"
    );
    let out = dyntftpd(&["-V"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("dyntftpd {}", env!("CARGO_PKG_VERSION"))
    );
}
