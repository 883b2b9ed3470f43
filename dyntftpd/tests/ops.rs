//! Operating dyntftpd: systemd socket activation and readiness notification, the metrics
//! file, JSON and text log files, the configuration file, the man page, the systemd units
//! and the README's operations section.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_dyntftpd");
/// The repository root (this crate is its `dyntftpd/` directory).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------
// A dyntftpd started the way systemd starts it
// ---------------------------------------------------------------------------------------

/// How the child learns about its inherited socket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ListenPid {
    /// LISTEN_PID is the child's own pid, as systemd sets it.
    Child,
    /// LISTEN_PID names another process: the sockets are not meant for the child.
    Other,
}

/// Where NOTIFY_SOCKET points.
enum Notify {
    Path(PathBuf),
    Abstract(String),
}

/// A dyntftpd child with an inherited UDP socket on fd 3 and a notification socket.
struct Daemon {
    child: Child,
    /// The inherited socket's address.
    addr: SocketAddr,
    notify: UnixDatagram,
    /// Holds the notification socket's path.
    _dir: TempDir,
}

impl Daemon {
    /// Starts `dyntftpd ARGS` with a UDP socket bound to 127.0.0.1:0 passed as fd 3, with
    /// LISTEN_FDS=1 and LISTEN_PID set as `pid` says, and NOTIFY_SOCKET set.
    fn start(args: &[&str], pid: ListenPid, abstract_notify: bool) -> Daemon {
        let dir = TempDir::new("notify");
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let where_ = if abstract_notify {
            Notify::Abstract(format!(
                "dyntftpd-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ))
        } else {
            Notify::Path(dir.path().join("notify.sock"))
        };
        let (notify, env_value) = match &where_ {
            Notify::Path(path) => (
                UnixDatagram::bind(path).expect("bind notify socket"),
                path.display().to_string(),
            ),
            Notify::Abstract(name) => (
                UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap())
                    .expect("bind abstract notify socket"),
                format!("@{name}"),
            ),
        };
        notify.set_read_timeout(Some(WAIT)).unwrap();
        let listener = UdpSocket::bind("127.0.0.1:0").expect("bind listener");
        let addr = listener.local_addr().unwrap();
        let fd = listener.as_raw_fd();
        let mut command = Command::new(BIN);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        pass_socket(&mut command, fd, pid, Some(&env_value));
        let child = command.spawn().expect("dyntftpd starts");
        drop(listener);
        Daemon {
            child,
            addr,
            notify,
            _dir: dir,
        }
    }

    /// The next notification (a `KEY=value` per line).
    fn notification(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .expect("a notification from dyntftpd");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Waits for READY=1 and returns the STATUS= text sent with it.
    fn ready(&self) -> String {
        let message = self.notification();
        assert!(
            message.lines().any(|l| l == "READY=1"),
            "first notification: {message:?}"
        );
        message
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .unwrap_or_default()
            .to_string()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill with the pid of our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits (bounded) for the child to exit.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "dyntftpd did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, STOPPING=1, exit status 0.
    fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let message = self.notification();
        assert!(
            message.lines().any(|l| l == "STOPPING=1"),
            "after SIGTERM: {message:?}"
        );
        let status = self.wait();
        assert_eq!(status.code(), Some(0), "{status:?}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Makes `command` start its program the way systemd does: `fd` becomes descriptor 3,
/// `LISTEN_FDS=1`, `LISTEN_PID` as `pid` says, and `NOTIFY_SOCKET` when given.
///
/// The variables are set with setenv between fork and exec because LISTEN_PID must be the
/// child's pid; for that, `command` must not have its environment changed otherwise (std
/// then passes a copy of it to exec).
fn pass_socket(command: &mut Command, fd: i32, pid: ListenPid, notify: Option<&str>) {
    let notify = notify.map(|n| std::ffi::CString::new(n).expect("no NUL"));
    // SAFETY: between fork and exec the closure only calls dup2, fcntl, getpid and
    // setenv, and formats the pid into a stack buffer.
    unsafe {
        command.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself would leave close-on-exec set.
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            let pid = match pid {
                ListenPid::Child => libc::getpid() as u32,
                ListenPid::Other => 1,
            };
            let mut digits = [0u8; 16];
            let mut start = digits.len() - 1; // the last byte stays NUL
            let mut n = pid;
            loop {
                start -= 1;
                digits[start] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            let mut rc = libc::setenv(c"LISTEN_PID".as_ptr(), digits[start..].as_ptr().cast(), 1);
            rc |= libc::setenv(c"LISTEN_FDS".as_ptr(), c"1".as_ptr(), 1);
            if let Some(notify) = &notify {
                rc |= libc::setenv(c"NOTIFY_SOCKET".as_ptr(), notify.as_ptr(), 1);
            }
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Polls `check` until it returns Some, for at most [`WAIT`].
fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    testkit::eventually(what, WAIT, check)
}

fn root_arg(root: &TempDir) -> &str {
    root.path().to_str().expect("UTF-8 temp path")
}

// ---------------------------------------------------------------------------------------
// 1. systemd
// ---------------------------------------------------------------------------------------

#[test]
fn socket_activation_serves_the_inherited_socket_and_notifies() {
    let root = standard_root();
    let mut daemon = Daemon::start(&["-r", root_arg(&root)], ListenPid::Child, false);
    let status = daemon.ready();
    // Only the inherited socket: no default [::]:69 listener besides it.
    assert_eq!(
        status,
        format!("serving {} on {}", root.path().display(), daemon.addr)
    );
    let got = Client::new(Mode::OwnPort, daemon.addr)
        .fetch(
            daemon.addr,
            "dir/nested.bin",
            "octet",
            &[("blksize", "1024")],
        )
        .expect("download over the inherited socket");
    assert_eq!(got.data, content("dir/nested.bin"));
    daemon.stop();
}

#[test]
fn abstract_notify_socket_gets_ready_and_stopping() {
    let root = standard_root();
    let mut daemon = Daemon::start(&["-r", root_arg(&root), "-q"], ListenPid::Child, true);
    daemon.ready();
    let got = Client::new(Mode::OwnPort, daemon.addr)
        .fetch(daemon.addr, "small.txt", "octet", &[])
        .expect("download");
    assert_eq!(got.data, SMALL);
    daemon.stop();
}

#[test]
fn sockets_for_another_pid_are_left_alone() {
    let root = standard_root();
    let mut daemon = Daemon::start(
        &["-r", root_arg(&root), "-l", "127.0.0.1:0", "-q"],
        ListenPid::Other,
        false,
    );
    let status = daemon.ready();
    let serving: Vec<&str> = status
        .rsplit(" on ")
        .next()
        .unwrap_or_default()
        .split(", ")
        .collect();
    assert_eq!(serving.len(), 1, "{status}");
    assert_ne!(serving[0], daemon.addr.to_string(), "{status}");
    daemon.stop();
}

/// The same through systemd's own tool, where it is installed.
#[test]
fn systemd_socket_activate_starts_dyntftpd() {
    let tool = "systemd-socket-activate";
    if Command::new(tool).arg("--version").output().is_err() {
        assert!(
            !require_clients(),
            "DYNTFTP_REQUIRE_CLIENTS=1 but: {tool} is not installed (apt-get install systemd)"
        );
        eprintln!("SKIPPED: {tool} is not installed (apt-get install systemd)");
        return;
    }
    let root = standard_root();
    let dir = TempDir::new("activate");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    // A port free a moment ago; the tool binds it itself.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(tool)
        .args(["--datagram", "-l", &addr.to_string()])
        .arg(format!("-ENOTIFY_SOCKET={}", notify_path.display()))
        .args([BIN, "-r", root_arg(&root), "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate starts");
    // The tool says when it listens, then starts dyntftpd (in its own process: the same
    // pid) on the first datagram.
    let stderr = child.stderr.take().unwrap();
    let (lines, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let _ = lines.send(line.unwrap_or_default());
        }
    });
    let mut daemon = Daemon {
        child,
        addr,
        notify,
        _dir: dir,
    };
    let line = listening.recv_timeout(WAIT).expect("the tool listens");
    assert!(line.starts_with(&format!("Listening on {addr}")), "{line}");
    let got = Client::new(Mode::OwnPort, addr)
        .fetch(addr, "512.bin", "octet", &[])
        .expect("download");
    assert_eq!(got.data, content("512.bin"));
    let ready = daemon.notification();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.ends_with(&format!(" on {addr}")), "{ready:?}");
    daemon.stop();
}

#[test]
fn a_stream_socket_is_refused_with_a_reason() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = listener.as_raw_fd();
    let mut command = Command::new(BIN);
    command.args(["-r", "."]).stdin(Stdio::null());
    pass_socket(&mut command, fd, ListenPid::Child, None);
    let out = command.output().expect("dyntftpd runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("inherited descriptor 3: not a datagram socket"),
        "{err}"
    );
}

#[test]
fn second_signal_exits_at_once_with_status_1() {
    let root = standard_root();
    let mut daemon = Daemon::start(&["-r", root_arg(&root), "-q"], ListenPid::Child, false);
    daemon.ready();
    // A session that never ACKs keeps the server in its shutdown grace period.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rrq = Vec::new();
    dyntftp::client::write_rrq(&mut rrq, b"big.bin", "octet", []);
    client.send_to(&rrq, daemon.addr).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 600];
    client.recv_from(&mut buf).expect("first DATA");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.notification().contains("STOPPING=1"));
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait();
    assert_eq!((status.code(), status.signal()), (Some(1), None));
}

/// `systemd-analyze verify` accepts the units (with ExecStart pointed at the test build).
#[test]
fn systemd_units_verify() {
    let service = repo_file("systemd/dyntftpd.service");
    let socket = repo_file("systemd/dyntftpd.socket");
    for needle in [
        "Type=notify",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "ExecStart=/usr/local/bin/dyntftpd ",
    ] {
        assert!(service.contains(needle), "dyntftpd.service lacks {needle}");
    }
    assert!(socket.contains("ListenDatagram="), "{socket}");
    // The service's command line is accepted as it stands.
    let exec = service
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=/usr/local/bin/dyntftpd "))
        .unwrap();
    let out = Command::new(BIN)
        .args(exec.split_whitespace())
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{exec}: {:?}", out);

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            !require_clients(),
            "DYNTFTP_REQUIRE_CLIENTS=1 but: systemd-analyze is not installed; units not verified"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed; units not verified");
        return;
    }
    let dir = TempDir::new("units");
    dir.write(
        "dyntftpd.service",
        service.replace("/usr/local/bin/dyntftpd", BIN).as_bytes(),
    );
    dir.write("dyntftpd.socket", socket.as_bytes());
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("dyntftpd.socket"))
        .arg(dir.path().join("dyntftpd.service"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Complaints about the host's own units are not ours.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("dyntftpd")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Metrics
// ---------------------------------------------------------------------------------------

/// A Prometheus text file, checked while parsed: every sample belongs to the family that
/// the `# HELP` and `# TYPE` lines before it announced. Series (name with labels) → value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut family: Option<(String, String)> = None;
    let mut helped = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped = rest.split(' ').next().unwrap().to_string();
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert_eq!(name, helped, "TYPE without HELP: {line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            family = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let name = series.split('{').next().unwrap();
        let (fam, kind) = family.as_ref().expect("sample before TYPE");
        let base = if kind == "histogram" {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
        } else {
            name
        };
        assert_eq!(base, fam, "{line}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "{line}"
        );
    }
    samples
}

#[test]
fn metrics_file_counts_a_known_workload() {
    let root = TempDir::new("metrics-root");
    let file = pseudo_random(1000, 7);
    root.write("a.bin", &file);
    let out = TempDir::new("metrics-out");
    let prom = out.path().join("dyntftpd.prom");
    let prom_arg = prom.to_str().unwrap().to_string();
    let mut daemon = Daemon::start(
        &[
            "-r",
            root_arg(&root),
            "-q",
            "--stats-interval",
            "1",
            "--metrics-file",
            &prom_arg,
        ],
        ListenPid::Child,
        false,
    );
    daemon.ready();
    // Written at start, every series at zero.
    let first = parse_prometheus(&std::fs::read_to_string(&prom).expect("metrics at start"));
    assert_eq!(first["dyntftp_requests_total"], 0.0);
    assert_eq!(first["dyntftp_sessions_total{outcome=\"completed\"}"], 0.0);

    let client = Client::new(Mode::OwnPort, daemon.addr);
    for _ in 0..3 {
        let got = client.fetch(daemon.addr, "a.bin", "octet", &[]).unwrap();
        assert_eq!(got.data, file);
    }
    for _ in 0..2 {
        let err = client
            .fetch(daemon.addr, "missing.bin", "octet", &[])
            .unwrap_err();
        assert_eq!(err.code(), Some(1), "{err:?}");
    }
    let m = eventually("the metrics of 5 requests and 3 sessions", || {
        let text = std::fs::read_to_string(&prom).ok()?;
        let m = parse_prometheus(&text);
        let done = m["dyntftp_requests_total"] == 5.0
            && m["dyntftp_session_duration_seconds_count"] == 3.0;
        done.then_some(m)
    });
    daemon.stop();

    assert_eq!(m["dyntftp_requests_rejected_total{code=\"1\"}"], 2.0);
    assert_eq!(m["dyntftp_requests_rejected_total{code=\"2\"}"], 0.0);
    assert_eq!(m["dyntftp_sessions_started_total"], 3.0);
    assert_eq!(m["dyntftp_sessions_total{outcome=\"completed\"}"], 3.0);
    let finished: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("dyntftp_sessions_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(finished, 3.0);
    assert_eq!(m["dyntftp_sessions_active"], 0.0);
    // 1000 bytes = one 512-byte and one 488-byte block per download.
    let retransmits = m["dyntftp_retransmits_total"];
    if retransmits == 0.0 {
        assert_eq!(m["dyntftp_bytes_sent_total"], 3000.0);
        assert_eq!(m["dyntftp_datagrams_sent_total"], 3.0 * 2.0 + 2.0);
    } else {
        assert!(m["dyntftp_bytes_sent_total"] > 3000.0);
    }
    // The histogram: cumulative buckets ending in +Inf = count.
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("dyntftp_session_duration_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            Some((le, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 5);
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 3.0));
    assert!(m["dyntftp_session_duration_seconds_sum"] >= 0.0);
    // Atomic replacement leaves no temporary file behind.
    let names: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("dyntftpd.prom")]);
}

/// The uid of `user`, from `id -u`.
fn uid_of(user: &str) -> Option<u32> {
    let out = Command::new("id").args(["-u", user]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// A dyntftpd on a free 127.0.0.1 port with `args`, its standard error in a file;
/// killed (by its own PID) and reaped on drop.
struct Plain {
    child: Child,
}

impl Plain {
    fn start(args: &[&str]) -> Plain {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(BIN)
            .args(["-l", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dyntftpd starts");
        Plain { child }
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Started as root with `--user nobody`, dyntftpd writes its first metrics file after
/// dropping privileges: the file belongs to nobody. A link planted at the metrics path,
/// to a root-only file, is replaced, never written through.
#[test]
fn metrics_are_written_as_the_service_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: metrics_are_written_as_the_service_user needs root");
        return;
    }
    let Some(nobody) = uid_of("nobody") else {
        eprintln!("SKIPPED: metrics_are_written_as_the_service_user: no user nobody");
        return;
    };
    let root = standard_root();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secrets = TempDir::new("metrics-victim");
    let victim = secrets.write("shadow", b"IMPORTANT ROOT DATA\n");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let dir = TempDir::new("metrics-user");
    std::os::unix::fs::chown(dir.path(), Some(nobody), None).unwrap();
    let prom = dir.path().join("dyntftpd.prom");
    std::os::unix::fs::symlink(&victim, &prom).unwrap();
    let _daemon = Plain::start(&[
        "-r",
        root_arg(&root),
        "-u",
        "nobody",
        "--metrics-file",
        prom.to_str().unwrap(),
    ]);
    let metadata = eventually("the metrics file", || {
        let m = std::fs::symlink_metadata(&prom).ok()?;
        m.file_type().is_file().then_some(m)
    });
    assert_eq!(metadata.uid(), nobody, "written as nobody, not root");
    assert_eq!(metadata.mode() & 0o777, 0o644);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("dyntftp_requests_total 0\n"), "{text}");
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "IMPORTANT ROOT DATA\n"
    );
    let victim_meta = std::fs::metadata(&victim).unwrap();
    assert_eq!((victim_meta.uid(), victim_meta.mode() & 0o777), (0, 0o600));
}

// ---------------------------------------------------------------------------------------
// 3. Logs
// ---------------------------------------------------------------------------------------

/// A symbolic link, a FIFO or a directory at the `--log-file` path is refused with a
/// reason and exit status 1; what a link points to is never created or written.
#[test]
fn the_log_file_is_never_followed_through_a_link() {
    let dir = TempDir::new("log-link");
    let victim = dir.write("victim", b"IMPORTANT\n");
    let link = dir.path().join("dyntftpd.log");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let dangling = dir.path().join("dangling.log");
    std::os::unix::fs::symlink(dir.path().join("created-through-link"), &dangling).unwrap();
    let fifo = dir.path().join("fifo.log");
    let have_fifo = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success());
    let mut cases = vec![
        (link.clone(), "symbolic link"),
        (dangling, "symbolic link"),
        (dir.path().to_path_buf(), "cannot open the log file"),
    ];
    if have_fifo {
        cases.push((fifo, "not a regular file"));
    } else {
        eprintln!("SKIPPED: mkfifo did not run; the FIFO case is not tested");
    }
    for (path, why) in cases {
        let out = Command::new(BIN)
            .args(["-l", "127.0.0.1:0", "-r", "."])
            .arg("--log-file")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path:?}: {err}");
        assert!(
            err.starts_with("dyntftpd: cannot open the log file") && err.contains(why),
            "{path:?}: {err}"
        );
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"IMPORTANT\n");
    assert!(!dir.path().join("created-through-link").exists());
}

#[test]
fn json_log_has_one_object_per_session_and_per_report() {
    let root = TempDir::new("json-root");
    // A name with a quote, a backslash (a path separator to the server) and a byte that
    // is not UTF-8.
    let odd: &[u8] = b"we\"ird\\name-\xff.bin";
    let on_disk: &[u8] = b"we\"ird/name-\xff.bin";
    let path = root
        .path()
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(on_disk));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"odd").unwrap();
    root.write("plain.txt", SMALL);
    let (mut daemon, _logs, log) = json_log_daemon(&root, &["-v"]);
    let client = Client::new(Mode::OwnPort, daemon.addr);
    let got = client
        .fetch_with(
            daemon.addr,
            odd,
            "octet",
            &[("blksize", "1024"), ("tsize", "0")],
            &mut |_| {},
        )
        .expect("odd name");
    assert_eq!(got.data, b"odd");
    let got = client
        .fetch(daemon.addr, "plain.txt", "netascii", &[])
        .unwrap();
    assert_eq!(got.data, to_netascii(SMALL));
    // A control character in the name: refused, and logged at debug level.
    let err = client
        .fetch(daemon.addr, "bad\u{1}name\n", "octet", &[])
        .unwrap_err();
    assert_eq!(err.code(), Some(2));
    eventually("2 session records and a report of 3 requests", || {
        let records = json_records(&std::fs::read_to_string(&log).ok()?);
        let sessions = records.iter().filter(|r| r["type"] == "session").count();
        let reported: u64 = records
            .iter()
            .filter(|r| r["type"] == "stats")
            .filter_map(|r| r["requests"].as_u64())
            .sum();
        (sessions == 2 && reported == 3).then_some(())
    });
    daemon.stop();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.ends_with('\n'),
        "the last record is whole once stopped"
    );
    let records = json_records(&text);
    for r in &records {
        assert!(r.is_object(), "{r}");
        let time = r["time"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
        assert!(["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&r["level"].as_str().unwrap()));
        assert!(
            ["log", "session", "stats"].contains(&r["type"].as_str().unwrap()),
            "{r}"
        );
    }
    let sessions: Vec<_> = records.iter().filter(|r| r["type"] == "session").collect();
    assert_eq!(sessions.len(), 2, "{text}");
    let s = sessions[0];
    assert_eq!(s["filename"], "we\"ird\\name-\u{fffd}.bin");
    assert_eq!(s["mode"], "octet");
    assert_eq!(s["outcome"], "completed");
    assert_eq!(s["peer"], client.local_addr().to_string());
    assert_eq!(s["local"], daemon.addr.to_string());
    assert_eq!(
        s["requested"],
        serde_json::json!([["blksize", "1024"], ["tsize", "0"]])
    );
    assert!(s["duration"].as_f64().unwrap() >= 0.0);
    assert!(s["start_time"].as_str().unwrap().ends_with('Z'));
    assert!(s["error"].is_null());
    let t = &s["transfer"];
    assert_eq!(t["negotiated"]["blksize"], 1024);
    assert_eq!(t["negotiated"]["tsize"], 3);
    assert_eq!(t["negotiated"]["acked"]["blksize"], 1024);
    assert_eq!(t["bytes_read"], 3);
    assert!(t["peer_error"].is_null() && t["error_sent"].is_null());
    for field in [
        "packets_sent",
        "bytes_sent",
        "packets_resent",
        "bytes_resent",
        "errors_sent",
        "acks",
        "blocks_acked",
        "duplicate_acks",
        "unexpected_acks",
        "retransmits",
        "early_retransmits",
        "malformed",
    ] {
        assert!(t[field].is_u64(), "transfer.{field} missing: {s}");
    }
    // The file is as long as its source said, and the round-trip time is a number of
    // seconds once an ACK was timed (null otherwise).
    assert!(t["size_mismatch"].is_null(), "{s}");
    let srtt = t
        .get("srtt")
        .unwrap_or_else(|| panic!("transfer.srtt missing: {s}"));
    assert!(srtt.is_number() || srtt.is_null(), "{s}");
    assert_eq!(sessions[1]["mode"], "netascii");
    // The stats reports add up to the workload.
    let stats: Vec<_> = records.iter().filter(|r| r["type"] == "stats").collect();
    for r in &stats {
        for field in [
            "requests",
            "write_requests",
            "duplicate_requests",
            "sessions_started",
            "sessions_failed",
            "malformed",
            "stray_datagrams",
            "datagrams_sent",
            "bytes_sent",
            "retransmits",
            "early_retransmits",
            "send_would_block",
            "send_errors",
            "panics",
            "rate_limited",
            "client_limited",
            "busy",
            "descriptor_pauses",
            "port_pauses",
            "active_sessions",
        ] {
            assert!(r[field].is_u64(), "stats.{field} missing: {r}");
        }
        for field in ["interval", "busy_poll"] {
            assert!(r[field].is_number(), "stats.{field} missing: {r}");
        }
        for field in ["rejected", "sessions_finished", "session_durations"] {
            assert!(r[field].is_object(), "stats.{field} missing: {r}");
        }
    }
    let sum = |field: &str| -> u64 { stats.iter().filter_map(|r| r[field].as_u64()).sum() };
    assert_eq!(sum("requests"), 3);
    assert_eq!(sum("sessions_started"), 2);
    let rejected: u64 = stats
        .iter()
        .filter_map(|r| r["rejected"]["2"].as_u64())
        .sum();
    assert_eq!(rejected, 1);
    let durations: u64 = stats
        .iter()
        .filter_map(|r| r["session_durations"]["count"].as_u64())
        .sum();
    assert_eq!(durations, 2);
    // Ordinary messages are "log" objects; the text session/report lines are not repeated.
    let messages: Vec<&str> = records
        .iter()
        .filter(|r| r["type"] == "log")
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert!(messages.iter().any(|m| m.starts_with("serving ")), "{text}");
    assert!(messages.iter().any(|m| m.contains("refused")), "{text}");
    assert!(
        !messages
            .iter()
            .any(|m| m.contains(", outcome ") || m.starts_with("stats: ")),
        "{text}"
    );
    // The raw line keeps the control characters escaped.
    assert!(!text.contains('\u{1}'));
}

/// A flood of sessions that fail before any ACK (each client answers DATA 1 with an
/// ERROR, as a blind attacker's sessions end unacknowledged) writes a bounded number of
/// JSON session records, and a `"log"` record with the number held back.
#[test]
fn json_session_records_of_a_flood_are_bounded_and_counted() {
    let root = standard_root();
    let (mut daemon, _logs, log) = json_log_daemon(&root, &[]);
    let started = Instant::now();
    let n = 300;
    for _ in 0..n {
        let raw = Raw::new(daemon.addr);
        raw.rrq(daemon.addr, b"small.txt", "octet", &[]);
        let (_, _, tid) = raw.expect_data();
        raw.send(tid, b"\x00\x05\x00\x00flood\x00");
    }
    let elapsed = started.elapsed();
    let (sessions, held_back) = eventually("every session written or counted", || {
        let records = json_records(&std::fs::read_to_string(&log).ok()?);
        let sessions = records.iter().filter(|r| r["type"] == "session").count();
        let held_back: u64 = records
            .iter()
            .filter(|r| r["type"] == "log")
            .filter_map(|r| r["held_back"].as_u64())
            .sum();
        (sessions + held_back as usize == n).then_some((sessions, held_back))
    });
    daemon.stop();
    // 100 records per 10 s of sessions that failed before any ACK, per period begun.
    let periods = elapsed.as_secs() as usize / 10 + 2;
    assert!(sessions <= 100 * periods, "{sessions} in {elapsed:?}");
    assert!(
        held_back as usize >= n - 100 * periods,
        "{held_back} held back"
    );
}

/// The JSON records of a log file's complete lines: while the daemon runs, the last line
/// may be half written when the test reads the file.
fn json_records(text: &str) -> Vec<serde_json::Value> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A ready daemon serving `root` with `extra` flags, logging JSON to a file (returned with
/// the directory that holds it) and reporting statistics every second.
fn json_log_daemon(root: &TempDir, extra: &[&str]) -> (Daemon, TempDir, std::path::PathBuf) {
    let logs = TempDir::new("json-log");
    let log = logs.path().join("dyntftpd.log");
    let log_arg = log.to_str().unwrap().to_string();
    let mut args = vec!["-r", root_arg(root)];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--log-format", "json", "--log-file", &log_arg]);
    args.extend_from_slice(&["--stats-interval", "1"]);
    let daemon = Daemon::start(&args, ListenPid::Child, false);
    daemon.ready();
    (daemon, logs, log)
}

#[test]
fn text_log_goes_to_the_log_file() {
    let root = standard_root();
    let logs = TempDir::new("text-log");
    let log = logs.path().join("dyntftpd.log");
    std::fs::write(&log, "earlier line\n").unwrap();
    let log_arg = log.to_str().unwrap().to_string();
    let mut daemon = Daemon::start(
        &["-r", root_arg(&root), "--log-file", &log_arg],
        ListenPid::Child,
        false,
    );
    daemon.ready();
    Client::new(Mode::OwnPort, daemon.addr)
        .fetch(daemon.addr, "small.txt", "octet", &[])
        .unwrap();
    let text = eventually("the session line", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("outcome completed").then_some(text)
    });
    daemon.stop();
    assert!(text.starts_with("earlier line\n"), "appended: {text}");
    assert!(text.contains("\"small.txt\" octet: "), "{text}");
    assert!(text.lines().all(|l| !l.starts_with('{')), "{text}");
}

// ---------------------------------------------------------------------------------------
// 4. Configuration file
// ---------------------------------------------------------------------------------------

#[test]
fn config_file_settings_apply_and_flags_override_them() {
    let root = standard_root();
    let out = TempDir::new("config");
    let prom = out.path().join("m.prom");
    let log = out.path().join("d.log");
    // Debug quoting is a TOML basic string for these plain ASCII paths.
    let conf = out.write(
        "dyntftpd.toml",
        format!(
            "# settings\nroot = {:?}\nmax-blksize = 600\nstats-interval = 1\n\
             metrics-file = {:?}\nlog-format = \"json\"\nlog-file = {:?}\nquiet = true\n",
            root.path().display().to_string(),
            prom.display().to_string(),
            log.display().to_string()
        )
        .as_bytes(),
    );
    let conf_arg = conf.to_str().unwrap().to_string();
    let mut daemon = Daemon::start(
        &["--config", &conf_arg, "--max-blksize", "700", "-v"],
        ListenPid::Child,
        false,
    );
    daemon.ready();
    let got = Client::new(Mode::OwnPort, daemon.addr)
        .fetch(daemon.addr, "1024.bin", "octet", &[("blksize", "1400")])
        .unwrap();
    // The flag's 700, not the file's 600.
    assert_eq!(got.oack_value("blksize"), Some("700"));
    eventually("metrics from the file's metrics-file", || {
        let m = parse_prometheus(&std::fs::read_to_string(&prom).ok()?);
        (m["dyntftp_sessions_started_total"] == 1.0).then_some(())
    });
    daemon.stop();
    // -v overrides the file's quiet: debug messages are there, as JSON.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "{text}"
    );
    assert!(text.lines().all(|l| l.starts_with('{')), "{text}");
}

#[test]
fn config_file_errors_name_file_and_line_and_exit_2() {
    let dir = TempDir::new("config-bad");
    for (text, want) in [
        (
            "root = \"/srv\"\nmax-window = 0\n",
            ": line 2, column 14: invalid value for max-window: 0",
        ),
        (
            "# ok\n\nlisten-on = \"1.2.3.4:69\"\n",
            ": line 3, column 1: unknown key \"listen-on\"",
        ),
        (
            "log-format = \"yaml\"\n",
            ": line 1, column 14: invalid value for log-format: \"yaml\" (expected text or json)",
        ),
        (
            "timeout = \"2\"\n",
            ": line 1, column 11: invalid value for timeout: \"2\" (expected a number)",
        ),
    ] {
        let conf = dir.write("dyntftpd.toml", text.as_bytes());
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            format!("dyntftpd: {}{want}", conf.display()),
            "{text:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. Man page
// ---------------------------------------------------------------------------------------

/// The long flags (`--name`) a text mentions.
fn long_flags(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let after = &rest[at + 2..];
        let end = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(after.len());
        let name = after[..end].trim_end_matches('-');
        if !name.is_empty()
            && rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !c.is_ascii_alphanumeric())
        {
            flags.insert(name.to_string());
        }
        rest = &after[end..];
    }
    flags
}

fn help_text() -> String {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn man_page_and_help_name_the_same_flags() {
    let help = long_flags(&help_text());
    assert!(
        help.contains("metrics-file") && help.contains("config"),
        "{help:?}"
    );
    // In roff a hyphen-minus is written `\-`.
    let page = repo_file("man/dyntftpd.8").replace("\\-", "-");
    let options_section = page
        .split(".SH OPTIONS")
        .nth(1)
        .and_then(|s| s.split("\n.SH ").next())
        .expect("an OPTIONS section");
    assert_eq!(
        long_flags(options_section),
        help,
        "OPTIONS section vs --help"
    );
    // Its command-line examples (in .EX/.EE blocks) are accepted (those naming a
    // configuration file would need it).
    let mut in_example = false;
    let mut examples = 0;
    for line in page.lines() {
        match line {
            ".EX" => in_example = true,
            ".EE" => in_example = false,
            _ => {}
        }
        let Some(example) = line.trim_start().strip_prefix("dyntftpd ") else {
            continue;
        };
        if !in_example || example.contains("--config") {
            continue;
        }
        examples += 1;
        let args: Vec<&str> = example.split_whitespace().filter(|a| *a != "\\e").collect();
        let out = Command::new(BIN)
            .args(&args)
            .arg("--check-config")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "man page example {example:?}: {out:?}"
        );
    }
    assert!(examples >= 3, "{examples} examples");
    // So is its example configuration file (the example that starts with its path).
    let conf = page
        .split(".EX\n# /etc/dyntftpd/dyntftpd.toml\n")
        .nth(1)
        .and_then(|s| s.split("\n.EE").next())
        .expect("an example configuration file");
    assert!(conf.lines().count() >= 5, "{conf}");
    let dir = TempDir::new("man-conf");
    let path = dir.write("dyntftpd.toml", conf.as_bytes());
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{conf}: {out:?}");
}

#[test]
fn man_page_renders_without_warnings() {
    let Ok(out) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(Path::new(REPO).join("man/dyntftpd.8"))
        .output()
    else {
        assert!(
            !require_clients(),
            "DYNTFTP_REQUIRE_CLIENTS=1 but: groff is not installed; man page not rendered"
        );
        eprintln!("SKIPPED: groff is not installed; man page not rendered");
        return;
    };
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "groff warnings");
}

// ---------------------------------------------------------------------------------------
// 6. README's operations section
// ---------------------------------------------------------------------------------------

#[test]
fn readme_operations_section_matches_the_repository() {
    let readme = repo_file("README.md");
    let ops = readme
        .split("\n## Operations\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an Operations section");
    for needle in [
        "cargo install --path dyntftpd --root /usr/local",
        "cp systemd/dyntftpd.service systemd/dyntftpd.socket /etc/systemd/system/",
        "systemctl enable --now dyntftpd.socket",
        "--metrics-file",
        "--log-format json",
        "--log-file",
        "--config",
    ] {
        assert!(ops.contains(needle), "Operations section lacks {needle:?}");
    }
    // Every repository file it names exists.
    for word in ops.split(|c: char| c.is_whitespace() || c == '`') {
        if word.starts_with("systemd/") || word.starts_with("man/") {
            assert!(Path::new(REPO).join(word).exists(), "{word} does not exist");
        }
    }
    // The root directory it creates is the one the unit serves.
    let service = repo_file("systemd/dyntftpd.service");
    assert!(ops.contains("mkdir -p /srv/tftp") && service.contains("--root /srv/tftp"));
    // Its example configuration file is valid.
    let conf = ops
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("an example configuration file");
    let dir = TempDir::new("readme-conf");
    let path = dir.write("dyntftpd.toml", conf.as_bytes());
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
