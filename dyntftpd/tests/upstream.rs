//! `dyntftpd --upstream URL` against a local HTTP repository (tiny_http on 127.0.0.1) that
//! counts its GETs and can be slow, stall or die mid-body on demand: tsize on the first
//! request, a UEFI-style size probe, one GET for a crowd, 404s remembered, a stalled
//! repository that stalls no one else, a body cut short that is an ERROR, and the cache.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use dyntftp::Packet;
use testkit::*;

// ---------------------------------------------------------------------------------------
// The HTTP repository
// ---------------------------------------------------------------------------------------

/// What the repository does for a path, by its first segment:
/// `files/NAME` serves NAME (with an ETag, 304 for a matching If-None-Match);
/// `slow/NAME` the same after holding the headers back (a crowd forms meanwhile);
/// `stall/…` never answers; `die/NAME` announces NAME's length and dies halfway through;
/// `error/…` is 500; anything else is 404.
struct Repository {
    addr: SocketAddr,
    /// Every request: (path, headers with lower-case names).
    requests: Arc<Mutex<Vec<Logged>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// A request as the repository received it: its path and headers (lower-case names).
type Logged = (String, HashMap<String, String>);

/// How long `slow/` holds its headers back.
const SLOW_HEADERS: Duration = Duration::from_millis(300);

impl Repository {
    fn start(files: HashMap<&'static str, Vec<u8>>) -> Repository {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind HTTP");
        let addr = server.server_addr().to_ip().expect("an IP listener");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let files = Arc::new(files);
        let (log, stopping) = (Arc::clone(&requests), Arc::clone(&stop));
        let accept = thread::spawn(move || {
            let mut handlers = Vec::new();
            while !stopping.load(Ordering::SeqCst) {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let headers = request
                    .headers()
                    .iter()
                    .map(|h| {
                        let name = h.field.as_str().as_str().to_ascii_lowercase();
                        (name, h.value.as_str().to_owned())
                    })
                    .collect();
                log.lock()
                    .unwrap()
                    .push((request.url().to_owned(), headers));
                let (files, stopping) = (Arc::clone(&files), Arc::clone(&stopping));
                handlers.push(thread::spawn(move || answer(request, &files, &stopping)));
            }
            for handler in handlers {
                let _ = handler.join();
            }
        });
        Repository {
            addr,
            requests,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// GETs received for `path` (e.g. "/files/kernel").
    fn gets(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .count()
    }

    /// The headers of the `n`th GET of `path`.
    fn headers(&self, path: &str, n: usize) -> HashMap<String, String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .nth(n)
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| panic!("no GET #{n} of {path}"))
    }
}

impl Drop for Repository {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn answer(request: tiny_http::Request, files: &HashMap<&'static str, Vec<u8>>, stop: &AtomicBool) {
    let url = request.url().to_owned();
    let mut parts = url.trim_start_matches('/').splitn(2, '/');
    let (kind, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let etag = format!("\"{name}-v1\"");
    let header = |name: &str, value: &str| {
        tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
    };
    let data = files.get(name);
    match (kind, data) {
        ("stall", _) => {
            // Never answer: hold the request until the repository stops.
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        ("files" | "slow", Some(data)) => {
            if kind == "slow" {
                thread::sleep(SLOW_HEADERS);
            }
            let matches = request
                .headers()
                .iter()
                .any(|h| h.field.equiv("If-None-Match") && h.value.as_str() == etag);
            let response = if matches {
                tiny_http::Response::empty(304)
                    .with_header(header("ETag", &etag))
                    .boxed()
            } else {
                let body = io::Cursor::new(data.clone());
                tiny_http::Response::new(
                    200.into(),
                    vec![header("ETag", &etag)],
                    body,
                    Some(data.len()),
                    None,
                )
                // Content-Length, not chunked, whatever the size.
                .with_chunked_threshold(usize::MAX)
                .boxed()
            };
            let _ = request.respond(response);
        }
        ("die", Some(data)) => {
            // Content-Length says the whole file; the body errors halfway through.
            let half = io::Cursor::new(data[..data.len() / 2].to_vec()).chain(Dying);
            let response =
                tiny_http::Response::new(200.into(), Vec::new(), half, Some(data.len()), None)
                    .with_chunked_threshold(usize::MAX);
            let _ = request.respond(response);
        }
        ("error", _) => {
            let _ = request.respond(tiny_http::Response::empty(500));
        }
        _ => {
            let _ = request.respond(tiny_http::Response::empty(404));
        }
    }
}

/// A reader that fails: the repository's disk or process dying.
struct Dying;

impl Read for Dying {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::other("the repository died"))
    }
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// dyntftpd serving `root`, and `repository` for the other names.
fn start(mode: Mode, root: &Path, logs: &Path, repository: &Repository) -> Daemon {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let mut command = Command::new(env!("CARGO_BIN_EXE_dyntftpd"));
    command
        .args(["-l", &addr.to_string(), "-r"])
        .arg(root)
        .args(["--timeout", "0.25", "--retries", "3"])
        .args(mode.is_single_port().then_some("--single-port"))
        .args(["--upstream", &repository.url()])
        .args(["--upstream-timeout", "1", "--upstream-workers", "4"])
        // The upstream's counters at debug level, every second.
        .args(["-v", "--stats-interval", "1"]);
    let log = logs.join(format!("dyntftpd-{}.log", addr.port()));
    let mut daemon = Daemon::spawn(command, addr, &log);
    // A name under --root answers once the daemon is up.
    daemon.wait_until_answered(b"ready.txt", |reply| {
        matches!(reply, Packet::Data { block: 1, .. })
    });
    daemon
}

/// The last upstream statistics line of `daemon`'s log once it says `want`.
fn stats_line(daemon: &Daemon, want: &str) -> String {
    eventually("the upstream statistics", Duration::from_secs(10), || {
        daemon
            .log()
            .lines()
            .rev()
            .find(|line| line.contains("upstream: ") && line.contains(" GETs, "))
            .filter(|line| line.contains(want))
            .map(str::to_owned)
    })
}

struct Setup {
    repository: Repository,
    daemon: Daemon,
    _root: TempDir,
    _logs: TempDir,
}

fn setup(mode: Mode, files: &[(&'static str, Vec<u8>)]) -> Setup {
    let repository = Repository::start(files.iter().cloned().collect());
    let root = TempDir::new("upstream-root");
    root.write("ready.txt", b"ready");
    root.write("local.bin", &pseudo_random(50_000, 9));
    let logs = TempDir::new("upstream-logs");
    let daemon = start(mode, root.path(), logs.path(), &repository);
    Setup {
        repository,
        daemon,
        _root: root,
        _logs: logs,
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

both_modes!(first_request_gets_tsize_and_the_file);
fn first_request_gets_tsize_and_the_file(mode: Mode) {
    let kernel = pseudo_random(300_000, 1);
    let s = setup(mode, &[("kernel", kernel.clone())]);
    let client = Client::new(mode, s.daemon.addr);
    let got = client
        .fetch(s.daemon.addr, "files/kernel", "octet", &[("tsize", "0")])
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.daemon.log()));
    assert_eq!(
        got.oack_value("tsize"),
        Some("300000"),
        "tsize in the first OACK"
    );
    assert!(got.data == kernel, "content differs");
    assert_eq!(s.repository.gets("/files/kernel"), 1);
    let headers = s.repository.headers("/files/kernel", 0);
    let port = client.local_addr().port().to_string();
    assert_eq!(
        headers.get("x-tftp-ip").map(String::as_str),
        Some("127.0.0.1")
    );
    assert_eq!(headers.get("x-tftp-port"), Some(&port));
    assert_eq!(
        headers.get("x-tftp-file").map(String::as_str),
        Some("files/kernel")
    );
    let agent = headers.get("user-agent").cloned().unwrap_or_default();
    assert!(agent.starts_with("dyntftpd/"), "User-Agent {agent:?}");
}

#[test]
fn uefi_size_probe_then_the_read() {
    let nbp = pseudo_random(100_000, 2);
    let s = setup(Mode::OwnPort, &[("shimx64.efi", nbp.clone())]);
    let addr = s.daemon.addr;
    // EDK2's probe: tsize 0 + blksize + windowsize, and ERROR 8 after the OACK.
    let probe = Raw::new(addr);
    let options = [("tsize", "0"), ("blksize", "1468"), ("windowsize", "4")];
    probe.rrq(addr, b"slow/shimx64.efi", "octet", &options);
    let (reply, from) = probe.recv();
    match Packet::parse(&reply) {
        Ok(Packet::Oack(oack)) => {
            let tsize = oack
                .iter()
                .find(|o| o.is("tsize"))
                .map(|o| o.value.to_vec());
            assert_eq!(tsize.as_deref(), Some(&b"100000"[..]), "{oack:?}");
        }
        other => panic!(
            "expected an OACK with tsize, got {other:?}\n{}",
            s.daemon.log()
        ),
    }
    probe.send(from, &error_packet(8, "tsize probe"));
    // The read: the same options but tsize, as EDK2 sends it.
    let got = fetch(
        Mode::OwnPort,
        addr,
        "slow/shimx64.efi",
        "octet",
        &[("blksize", "1468"), ("windowsize", "4")],
    )
    .unwrap_or_else(|e| panic!("{e:?}\n{}", s.daemon.log()));
    assert!(got.data == nbp, "content differs");
    assert_eq!(
        s.repository.gets("/slow/shimx64.efi"),
        1,
        "the read came from the cache"
    );
}

#[test]
fn a_crowd_for_one_cold_file_makes_one_get() {
    const CROWD: usize = 50;
    let initrd = pseudo_random(200_000, 3);
    let s = setup(Mode::OwnPort, &[("initrd", initrd.clone())]);
    let addr = s.daemon.addr;
    let clients: Vec<_> = (0..CROWD)
        .map(|_| {
            thread::spawn(move || {
                fetch(
                    Mode::OwnPort,
                    addr,
                    "slow/initrd",
                    "octet",
                    &[("tsize", "0"), ("blksize", "1468")],
                )
            })
        })
        .collect();
    for client in clients {
        let got = client
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:?}\n{}", s.daemon.log()));
        assert_eq!(got.oack_value("tsize"), Some("200000"));
        assert!(got.data == initrd, "content differs");
    }
    assert_eq!(
        s.repository.gets("/slow/initrd"),
        1,
        "one GET for the crowd"
    );
    // The cache holds the one body, and nothing streams any more.
    let line = stats_line(
        &s.daemon,
        "200000 bytes in 1 cached bodies, 0 bytes streaming",
    );
    println!("after the crowd: {line}");
    assert!(line.contains(" 1 GETs, "), "{line}");
}

#[test]
fn not_found_is_error_1_and_remembered() {
    let s = setup(Mode::OwnPort, &[]);
    for _ in 0..2 {
        let err = fetch(Mode::OwnPort, s.daemon.addr, "files/missing", "octet", &[]).unwrap_err();
        assert_eq!(err.code(), Some(1), "{err:?}");
    }
    assert_eq!(
        s.repository.gets("/files/missing"),
        1,
        "the 404 was remembered"
    );
}

#[test]
fn a_stalled_repository_stalls_no_one_else() {
    let other = pseudo_random(20_000, 4);
    let s = setup(Mode::OwnPort, &[("other", other.clone())]);
    let addr = s.daemon.addr;
    let stalled = Raw::new(addr);
    stalled.rrq(addr, b"stall/vmlinuz", "octet", &[("tsize", "0")]);
    eventually("the stalled GET", Duration::from_secs(5), || {
        (s.repository.gets("/stall/vmlinuz") == 1).then_some(())
    });
    // Meanwhile, a file from --root and another from the repository are served.
    let local = fetch(Mode::OwnPort, addr, "local.bin", "octet", &[]).unwrap();
    assert!(local.data == pseudo_random(50_000, 9));
    let got = fetch(Mode::OwnPort, addr, "files/other", "octet", &[]).unwrap();
    assert!(got.data == other);
    // The stalled request ends with ERROR 0 (the open timeout), and nothing before it.
    let (reply, _) = stalled
        .recv_within(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no answer to the stalled request\n{}", s.daemon.log()));
    match Packet::parse(&reply) {
        Ok(Packet::Error { code, .. }) => assert_eq!(code.to_u16(), 0),
        other => panic!("expected ERROR 0, got {other:?}"),
    }
}

#[test]
fn a_repository_dying_mid_body_is_an_error_not_a_short_file() {
    let s = setup(Mode::OwnPort, &[("initrd", pseudo_random(400_000, 5))]);
    let err = fetch(
        Mode::OwnPort,
        s.daemon.addr,
        "die/initrd",
        "octet",
        &[("tsize", "0")],
    )
    .unwrap_err();
    assert_eq!(err.code(), Some(0), "{err:?}\n{}", s.daemon.log());
    // Nothing of it was kept: the next request asks the repository again.
    let err = fetch(Mode::OwnPort, s.daemon.addr, "die/initrd", "octet", &[]).unwrap_err();
    assert_eq!(err.code(), Some(0), "{err:?}");
    assert_eq!(s.repository.gets("/die/initrd"), 2);
}

#[test]
fn a_cached_file_is_served_again_without_a_get() {
    let config = b"default menu\n".to_vec();
    let s = setup(Mode::OwnPort, &[("grub.cfg", config.clone())]);
    for _ in 0..3 {
        let got = fetch(
            Mode::OwnPort,
            s.daemon.addr,
            "files/grub.cfg",
            "octet",
            &[("tsize", "0")],
        )
        .unwrap();
        assert_eq!(got.data, config);
        assert_eq!(got.oack_value("tsize"), Some("13"));
    }
    assert_eq!(s.repository.gets("/files/grub.cfg"), 1);
    stats_line(&s.daemon, "2 cache hits");
}

/// An ERROR packet as a client sends it.
fn error_packet(code: u16, message: &str) -> Vec<u8> {
    let mut packet = vec![0, 5];
    packet.extend_from_slice(&code.to_be_bytes());
    packet.extend_from_slice(message.as_bytes());
    packet.push(0);
    packet
}

#[test]
fn a_per_machine_name_sends_its_mac() {
    let s = setup(
        Mode::OwnPort,
        &[("pxelinux.cfg/01-aa-bb-cc-dd-ee-ff", b"menu".to_vec())],
    );
    let name = "files/pxelinux.cfg/01-aa-bb-cc-dd-ee-ff";
    let got = fetch(Mode::OwnPort, s.daemon.addr, name, "octet", &[]).unwrap();
    assert_eq!(got.data, b"menu");
    let headers = s.repository.headers(&format!("/{name}"), 0);
    assert_eq!(
        headers.get("x-tftp-mac").map(String::as_str),
        Some("aa:bb:cc:dd:ee:ff")
    );
}

#[test]
fn failures_do_not_flood_the_log() {
    const REQUESTS: usize = 40;
    let s = setup(Mode::OwnPort, &[]);
    let start = std::time::Instant::now();
    for i in 0..REQUESTS {
        let name = format!("error/{i}");
        let err = fetch(Mode::OwnPort, s.daemon.addr, &name, "octet", &[]).unwrap_err();
        assert_eq!(err.code(), Some(0), "{err:?}");
    }
    // One GET each (a 500 is not remembered), but at most 10 warnings per 10 s.
    let gets = (0..REQUESTS)
        .filter(|i| s.repository.gets(&format!("/error/{i}")) == 1)
        .count();
    assert_eq!(gets, REQUESTS);
    stats_line(&s.daemon, &format!("{REQUESTS} failed"));
    let warnings = s
        .daemon
        .log()
        .lines()
        .filter(|line| line.contains("[WARN]") && line.contains("upstream: GET"))
        .count();
    // The limiter's periods the requests spanned (one, unless this machine is very slow).
    let periods = start.elapsed().as_secs() as usize / 10 + 1;
    assert!(
        (1..=10 * periods).contains(&warnings) && warnings < REQUESTS,
        "{warnings} warnings in {periods} periods"
    );
}
