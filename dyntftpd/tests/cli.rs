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
        (
            &["--log-format", "xml"],
            "invalid value for --log-format: \"xml\"",
        ),
        (
            &["--config", "/nonexistent/dyntftpd.toml"],
            "cannot read /nonexistent/dyntftpd.toml",
        ),
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

/// The first line of standard error, which must be `dyntftpd: ` and a reason, for a run
/// that exited with status 2.
fn usage_error(args: &[&str]) -> String {
    let out = dyntftpd(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains("Usage: dyntftpd"), "{args:?}: {err}");
    let first = err.lines().next().unwrap_or_default().to_string();
    assert!(first.starts_with("dyntftpd: "), "{args:?}: {err}");
    first
}

#[test]
fn an_argument_that_is_not_utf8_exits_2_without_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    for bad in [&b"/tmp/\xff"[..], b"\xfe\xff", b"caf\xe9"] {
        let out = Command::new(env!("CARGO_BIN_EXE_dyntftpd"))
            .args(["-l", "127.0.0.1:0", "--root"])
            .arg(std::ffi::OsStr::from_bytes(bad))
            .stdin(Stdio::null())
            .output()
            .expect("dyntftpd runs");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(
            err.starts_with("dyntftpd: argument ") && err.contains("is not valid UTF-8"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn check_config_refuses_what_start_up_refuses() {
    for args in [
        &["--timeout", "1e-300"][..],
        &["--timeout", "1e-9"],
        &["--timeout", "0.001"],
        &["--stats-interval", "1e-9"],
        &["--stats-interval", "0.5"],
        &["--max-blksize", "7"],
        &["--rate-burst", "0"],
    ] {
        let checked = usage_error(&[args, &["--check-config"]].concat());
        // Start-up would bind 127.0.0.1:0 and serve the current directory.
        let started = usage_error(&[args, &["-l", "127.0.0.1:0", "-r", "."]].concat());
        assert_eq!(checked, started, "{args:?}");
    }
    assert!(usage_error(&["--timeout", "1e-300", "--check-config"]).contains("at least 10ms"));
    assert!(usage_error(&["--stats-interval", "0.5", "--check-config"]).contains("at least 1s"));
    // The floors themselves are accepted.
    let out = dyntftpd(&[
        "--timeout",
        "0.01",
        "--stats-interval",
        "1",
        "--check-config",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn config_must_be_a_small_regular_file() {
    // Fails at once instead of reading forever.
    assert!(usage_error(&["--config", "/dev/zero"]).contains("not a regular file"));
    assert!(usage_error(&["--config", "/"]).contains("not a regular file"));
    let dir = testkit::TempDir::new("cli-config");
    let big = dir.write("big.toml", &vec![b'#'; 2 << 20]);
    let first = usage_error(&["--config", big.to_str().unwrap()]);
    assert!(first.contains("more than the 1048576"), "{first}");
    // A FIFO would block a plain open until a writer came.
    let fifo = dir.path().join("fifo.toml");
    match Command::new("mkfifo").arg(&fifo).status() {
        Ok(status) if status.success() => {
            let first = usage_error(&["--config", fifo.to_str().unwrap(), "--check-config"]);
            assert!(first.contains("not a regular file"), "{first}");
        }
        _ => eprintln!("SKIPPED: mkfifo did not run; the FIFO case is not tested"),
    }
}

#[test]
fn a_config_file_may_start_with_a_byte_order_mark() {
    let dir = testkit::TempDir::new("cli-bom");
    let path = dir.write(
        "bom.toml",
        "\u{feff}retries = 9\nlimit-loopback = true\n".as_bytes(),
    );
    let out = dyntftpd(&["--config", path.to_str().unwrap(), "--check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("retries = 9\n") && text.contains("limit-loopback = true\n"),
        "{text}"
    );
}

/// Runs `dyntftpd --config FILE ARGS`, FILE holding `text`; returns the exit status,
/// standard output and standard error.
fn with_config(text: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = testkit::TempDir::new("cli-toml");
    let path = dir.write("dyntftpd.toml", text.as_bytes());
    let out = dyntftpd(&[&["--config", path.to_str().unwrap()][..], args].concat());
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr(&out).replace(path.to_str().unwrap(), "FILE"),
    )
}

#[test]
fn config_errors_name_the_file_line_and_column_and_exit_2() {
    for (text, first) in [
        (
            "root = \"/srv\"\n# two\nfoo = 1\n",
            "dyntftpd: FILE: line 3, column 1: unknown key \"foo\"",
        ),
        (
            "\n  workers = 0\n",
            "dyntftpd: FILE: line 2, column 13: invalid value for workers: 0",
        ),
        (
            "upstream-workers = 300\n",
            "dyntftpd: FILE: line 1, column 20: invalid value for upstream-workers: 300",
        ),
        (
            "upstream = \"ftp://repo/\"\n",
            "dyntftpd: FILE: line 1, column 12: invalid value for upstream: \"ftp://repo/\" \
             (expected an http:// or https:// URL, e.g. http://repo.example/boot/)",
        ),
        (
            "listen = [\"127.0.0.1:69\", 69]\n",
            "dyntftpd: FILE: line 1, column 10: invalid value for listen: [\"127.0.0.1:69\", 69] \
             (expected a string or an array of strings)",
        ),
    ] {
        let (code, _, err) = with_config(text, &["--check-config"]);
        assert_eq!(code, Some(2), "{text:?}: {err}");
        assert_eq!(err.lines().next(), Some(first), "{text:?}");
        assert!(err.contains("Usage: dyntftpd"), "{err}");
    }
    // The same mistake as a flag: the same reason.
    let first = usage_error(&["--upstream-workers", "300"]);
    assert_eq!(
        first,
        "dyntftpd: invalid value for --upstream-workers: \"300\""
    );
}

#[test]
fn a_config_file_in_the_old_format_is_told_about_toml() {
    let (code, _, err) = with_config(
        "# dyntftpd.conf of an earlier version\nretries = 3\nroot = /srv/tftp\n",
        &["--check-config"],
    );
    assert_eq!(code, Some(2), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("dyntftpd: FILE: line 3, column 8: ")
            && first.ends_with(
                "(the configuration file is TOML, no longer `key = value` lines: \
                 strings are quoted, e.g. root = \"/srv/tftp\")"
            ),
        "{first}"
    );
}

#[test]
fn check_config_prints_toml_that_reads_back_the_same() {
    let (code, printed, err) = with_config(
        "listen = \"127.0.0.1:6969\"\nstrip-prefix = \"/tftpboot/\"\nudp-gso = \"off\"\n\
         cache = \"1M\"\nupstream = \"http://repo/boot/\"\n\n[[rule]]\nempty = true\n",
        &["--check-config", "--open-timeout", "0.5"],
    );
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "listen = [\"127.0.0.1:6969\"]\n",
        "strip-prefix = [\"/tftpboot/\"]\n",
        "udp-gso = false\n",
        "cache = 1048576\n",
        "upstream = \"http://repo/boot/\"\n",
        "open-timeout = 0.5\n",
    ] {
        assert!(printed.contains(line), "{line:?} in {printed}");
    }
    // The rules follow as comments (the router's list): the settings read back the same.
    assert!(
        printed.contains("\n# rule \"rule-1\": any -> empty = true\n"),
        "{printed}"
    );
    let settings = |text: &str| -> String {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let (code, again, err) = with_config(&printed, &["--check-config"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(settings(&again), settings(&printed));
}

#[test]
fn the_example_configuration_file_lists_every_setting() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dyntftpd.toml")).unwrap();
    // As shipped, every setting is commented out: the defaults.
    let (code, as_shipped, err) = with_config(&example, &["--check-config"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        as_shipped,
        String::from_utf8_lossy(&dyntftpd(&["--check-config"]).stdout)
    );
    // Uncommented, it is valid and sets every setting: --check-config prints every
    // setting there is once all the optional ones are set.
    let uncommented: String = example
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(setting) if setting.contains(" = ") => format!("{setting}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let (code, printed, err) = with_config(&uncommented, &["--check-config"]);
    assert_eq!(code, Some(0), "{err}\n{uncommented}");
    let keys = |text: &str| -> Vec<String> {
        let mut keys: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, _)| k.trim().to_string())
            .filter(|k| !k.starts_with('#'))
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&uncommented), keys(&printed));
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
        "--limit-loopback",
        "--metrics-file",
        "--log-format",
        "--log-file",
        "--config",
        "--check-config",
        "--verbose",
        "--quiet",
        "--version",
    ] {
        assert!(text.contains(flag), "help lacks {flag}");
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    // getopts ends the line of a long flag without a description on it with a space,
    // which editors strip: compare without trailing spaces.
    let trimmed = |text: &str| -> String {
        text.lines()
            .map(|l| format!("{}\n", l.trim_end()))
            .collect()
    };
    assert!(
        trimmed(&readme).contains(trimmed(&text).trim_end()),
        "README's usage block differs from --help"
    );
    let out = dyntftpd(&["-V"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("dyntftpd {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Sends `rrq` from a fresh socket and returns the reply's first 4 bytes, or None.
fn ask(port: u16, filename: &str) -> Option<[u8; 4]> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut rrq = Vec::new();
    dyntftp::client::write_rrq(&mut rrq, filename.as_bytes(), "octet", []);
    socket.send_to(&rrq, ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 600];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    buf[..n].first_chunk::<4>().copied()
}

#[test]
fn user_flag_drops_root_before_serving() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: dropping privileges needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join(format!("dyntftp-cli-user-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("public"), b"for everyone").unwrap();
    std::fs::set_permissions(root.join("public"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(root.join("private"), b"root only").unwrap();
    std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dyntftpd"))
        .args(["-l", &format!("127.0.0.1:{port}"), "-r"])
        .arg(&root)
        .args(["-u", "nobody", "-q"])
        .stdin(Stdio::null())
        .spawn()
        .expect("dyntftpd starts");
    // Ready once it answers a request for a missing file (bounded number of tries).
    let ready = (0..40).any(|_| ask(port, "missing") == Some([0, 5, 0, 1]));
    let public = ask(port, "public");
    let private = ask(port, "private");
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    assert!(ready, "dyntftpd did not answer");
    assert_eq!(
        public,
        Some([0, 3, 0, 1]),
        "a world-readable file is served"
    );
    // As root the 0600 file would be readable; as nobody it is an access violation.
    assert_eq!(
        private,
        Some([0, 5, 0, 2]),
        "the 0600 file must be refused after -u nobody"
    );
}
