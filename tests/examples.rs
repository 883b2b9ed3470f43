//! The examples, run as their own processes and fetched from with real clients (curl; our
//! own client where a real one cannot show what is checked, such as the OACK).
//!
//! The example binaries are built by `cargo build --example` from the test itself (cheap
//! when they are up to date), into the same target directory and profile as this test.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use testkit::*;

/// How long a client process may run before it is killed and the test fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Example processes
// ---------------------------------------------------------------------------------------

/// Builds the examples once per test binary and returns the directory holding them.
fn examples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // This test runs as <target>/<profile>/deps/examples-<hash>.
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--example", "http_proxy"])
            .args(["--example", "grub_config"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => panic!("no profile directory in {}", exe.display()),
        }
        let status = cmd.status().expect("run cargo build --example");
        assert!(status.success(), "cargo build --example failed: {status}");
        profile_dir.join("examples")
    })
}

/// An example process; killed (by its own PID) and reaped on drop.
struct Example {
    child: Child,
    addr: SocketAddr,
}

impl Example {
    /// Starts example `name` with `args` and waits for its "listening on ADDR" line.
    fn start(name: &str, args: &[&str]) -> Example {
        let path = examples_dir().join(name);
        let mut child = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the example never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not print its address");
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{name}: unexpected first line {line:?}"));
        Example { child, addr }
    }

    fn url(&self, name: &str) -> String {
        format!("tftp://{}/{name}", self.addr)
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

/// Starts `curl -s -S -o out URL` (plus `extra`), output in `dir`.
fn spawn_curl(curl: &Path, url: &str, out: &Path, extra: &[&str]) -> Child {
    Command::new(curl)
        .args(["-s", "-S", "--max-time", "60", "-o"])
        .arg(out)
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run curl")
}

/// Waits for a client process, killing it after [`CLIENT_DEADLINE`].
fn wait_bounded(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {CLIENT_DEADLINE:?}; killed");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Fetches `url` with curl into `out`; returns the exit status and the time taken.
fn curl_fetch(curl: &Path, url: &str, out: &Path, extra: &[&str]) -> (ExitStatus, Duration) {
    let start = Instant::now();
    let mut child = spawn_curl(curl, url, out, extra);
    let status = wait_bounded(&mut child, url);
    (status, start.elapsed())
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server
// ---------------------------------------------------------------------------------------

/// A deliberately slow body: sent in `piece`-byte pieces with a short pause between them;
/// the last `hold` bytes wait for `release`. `started` is signalled after the first piece.
struct Slow {
    piece: usize,
    pause: Duration,
    hold: usize,
    started: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

enum Route {
    /// 200 with Content-Length.
    Body(Vec<u8>),
    /// 200 with Content-Length, sent slowly.
    Slow(Vec<u8>, Mutex<Slow>),
    /// 200 without Content-Length (the body ends when the connection closes).
    Unsized(Vec<u8>),
    /// Any other status, empty body.
    Status(u16),
}

/// Serves `routes` on 127.0.0.1; unknown paths get 404. Records every path requested.
struct HttpServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    fn start(routes: HashMap<&'static str, Route>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind HTTP");
        let addr = listener.local_addr().unwrap();
        let routes = Arc::new(routes);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (routes, log) = (Arc::clone(&routes), Arc::clone(&log));
                thread::spawn(move || {
                    let _ = serve(conn, &routes, &log);
                });
            }
        });
        HttpServer {
            addr,
            requests,
            stop,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}/repo", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    mut conn: TcpStream,
    routes: &HashMap<&'static str, Route>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(WAIT))?;
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 || head.len() > 16_384 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push(path.clone());
    let name = path.strip_prefix("/repo/").unwrap_or("");
    let ok = |len: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    match routes.get(name) {
        None => conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
        Some(Route::Status(code)) => conn.write_all(
            format!("HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?,
        Some(Route::Body(data)) => {
            conn.write_all(ok(data.len()).as_bytes())?;
            conn.write_all(data)?;
        }
        Some(Route::Unsized(data)) => {
            conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            conn.write_all(data)?;
        }
        Some(Route::Slow(data, slow)) => {
            let slow = slow.lock().unwrap();
            conn.write_all(ok(data.len()).as_bytes())?;
            let (early, held) = data.split_at(data.len() - slow.hold);
            for (i, piece) in early.chunks(slow.piece).enumerate() {
                conn.write_all(piece)?;
                if i == 0 {
                    let _ = slow.started.send(());
                }
                thread::sleep(slow.pause);
            }
            // Bounded: a test that never releases fails on its own deadlines.
            let _ = slow.release.recv_timeout(Duration::from_secs(60));
            conn.write_all(held)?;
        }
    }
    conn.flush()?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// http_proxy
// ---------------------------------------------------------------------------------------

/// The local download must complete while the HTTP transfer is provably still running:
/// the test HTTP server holds back the end of the slow body until the local download has
/// finished. If the slow source blocked the loop, the local download could not complete
/// (curl would time out) and the test would fail; no timing is asserted. The times are
/// printed as figures.
#[test]
fn http_proxy_streams_a_slow_source_without_slowing_a_local_transfer() {
    let test = "http_proxy_streams_a_slow_source_without_slowing_a_local_transfer";
    let Some(curl) = client_or_skip("curl", test) else {
        return;
    };
    let root = TempDir::new("proxy-root");
    let out = TempDir::new("proxy-out");
    let local = big(); // 3 MiB
    root.write("local.bin", local);
    let slow_data = pseudo_random(1 << 20, 71);
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let http = HttpServer::start(HashMap::from([(
        "slow.bin",
        Route::Slow(
            slow_data.clone(),
            Mutex::new(Slow {
                piece: 8192,
                pause: Duration::from_millis(2),
                hold: 64 * 1024,
                started: started_tx,
                release: release_rx,
            }),
        ),
    )]));
    let proxy = Example::start(
        "http_proxy",
        &[
            "--listen",
            "127.0.0.1:0",
            "--base-url",
            &http.base_url(),
            "--root",
            root.path().to_str().unwrap(),
        ],
    );
    let blksize = ["--tftp-blksize", "1428"];

    // Idle server: the local file alone.
    let idle_out = out.path().join("local-idle");
    let (status, idle) = curl_fetch(&curl, &proxy.url("local.bin"), &idle_out, &blksize);
    assert!(status.success(), "idle local download: {status}");
    assert!(
        fs::read(&idle_out).unwrap() == local,
        "idle local.bin differs"
    );

    // Start the slow HTTP-backed transfer and wait until its body is flowing.
    let slow_out = out.path().join("slow");
    let mut slow = spawn_curl(&curl, &proxy.url("slow.bin"), &slow_out, &blksize);
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the proxy requested slow.bin over HTTP");

    // The local download, entirely while the slow one waits for its held-back end.
    let busy_out = out.path().join("local-busy");
    let (status, busy) = curl_fetch(&curl, &proxy.url("local.bin"), &busy_out, &blksize);
    assert!(
        status.success(),
        "local download during the slow one: {status}"
    );
    assert!(
        fs::read(&busy_out).unwrap() == local,
        "busy local.bin differs"
    );
    assert!(
        slow.try_wait().unwrap().is_none(),
        "the slow transfer ended before its source was complete"
    );

    release.send(()).unwrap();
    let status = wait_bounded(&mut slow, "curl slow.bin");
    assert!(status.success(), "slow download: {status}");
    assert!(
        fs::read(&slow_out).unwrap() == slow_data,
        "slow.bin differs"
    );
    assert_eq!(
        http.requests(),
        ["/repo/slow.bin"],
        "local.bin never went to HTTP"
    );
    eprintln!(
        "FIGURES local 3 MiB over curl, blksize 1428: idle server {:.1} ms, \
         during a stalled HTTP-backed transfer {:.1} ms",
        idle.as_secs_f64() * 1e3,
        busy.as_secs_f64() * 1e3
    );
}

#[test]
fn http_proxy_maps_http_answers_to_tftp() {
    let Some(curl) = client_or_skip("curl", "http_proxy_maps_http_answers_to_tftp") else {
        return;
    };
    let out = TempDir::new("proxy-map");
    let sized = pseudo_random(100_000, 72);
    let no_length = pseudo_random(30_000, 73);
    let http = HttpServer::start(HashMap::from([
        ("sized.bin", Route::Body(sized.clone())),
        ("dir/with%20space.bin", Route::Body(b"spaced".to_vec())),
        ("unsized.bin", Route::Unsized(no_length.clone())),
        ("broken.bin", Route::Status(500)),
    ]));
    let proxy = Example::start(
        "http_proxy",
        &["--listen", "127.0.0.1:0", "--base-url", &http.base_url()],
    );
    let addr = proxy.addr;

    // The first request for a name already gets tsize: the OACK waits for the headers.
    let first = fetch(Mode::OwnPort, addr, "sized.bin", "octet", &[("tsize", "0")]).unwrap();
    assert!(first.data == sized);
    assert_eq!(first.oack_value("tsize"), Some("100000"));
    let second = fetch(Mode::OwnPort, addr, "sized.bin", "octet", &[("tsize", "0")]).unwrap();
    assert_eq!(second.oack_value("tsize"), Some("100000"));
    assert!(second.data == sized);
    // And a real client gets the same bytes (with tsize answered).
    let got = out.path().join("sized");
    let (status, _) = curl_fetch(&curl, &proxy.url("sized.bin"), &got, &[]);
    assert!(status.success(), "curl sized.bin: {status}");
    assert!(fs::read(&got).unwrap() == sized);

    // No Content-Length: streamed until the connection closes, never a tsize.
    let got = out.path().join("unsized");
    let (status, _) = curl_fetch(&curl, &proxy.url("unsized.bin"), &got, &[]);
    assert!(status.success(), "curl unsized.bin: {status}");
    assert!(fs::read(&got).unwrap() == no_length);
    let again = fetch(
        Mode::OwnPort,
        addr,
        "unsized.bin",
        "octet",
        &[("tsize", "0")],
    )
    .unwrap();
    assert_eq!(again.oack, None);

    // Names are confined and percent-encoded; backslashes separate.
    let spaced = fetch(Mode::OwnPort, addr, "\\dir\\with space.bin", "octet", &[]).unwrap();
    assert_eq!(spaced.data, b"spaced");
    let escape = fetch(Mode::OwnPort, addr, "../secret", "octet", &[]).unwrap_err();
    assert_eq!(escape.code(), Some(2), "{escape:?}");

    // 404: ERROR 1 either way, before any OACK; the first time once the GET answered,
    // within the TTL at open time, without asking HTTP again.
    for (round, want) in [(1, (1, "file not found")), (2, (1, "file not found"))] {
        match fetch(
            Mode::OwnPort,
            addr,
            "missing.bin",
            "octet",
            &[("tsize", "0")],
        )
        .unwrap_err()
        {
            ClientError::Error { code, message, .. } => {
                assert_eq!((code, message.as_str()), want, "round {round}")
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    let status = curl_fetch(&curl, &proxy.url("missing.bin"), &out.path().join("m"), &[]).0;
    assert!(!status.success(), "curl must fail on a missing file");
    // Any other status: ERROR 0, and asked again next time.
    for _ in 0..2 {
        let err = fetch(Mode::OwnPort, addr, "broken.bin", "octet", &[]).unwrap_err();
        assert_eq!(err.code(), Some(0), "{err:?}");
    }

    let requests = http.requests();
    let count = |p: &str| requests.iter().filter(|r| *r == p).count();
    assert_eq!(count("/repo/sized.bin"), 3);
    assert_eq!(count("/repo/dir/with%20space.bin"), 1);
    assert_eq!(count("/repo/missing.bin"), 1, "{requests:?}");
    assert_eq!(count("/repo/broken.bin"), 2);
    assert!(!requests
        .iter()
        .any(|r| r.contains("..") || r.contains("secret")));
}

// ---------------------------------------------------------------------------------------
// grub_config
// ---------------------------------------------------------------------------------------

/// A client bound to `ip` (any loopback address), so tests can be "another machine".
fn client_from(ip: &str) -> Client {
    let socket = std::net::UdpSocket::bind((ip, 0)).expect("bind client");
    socket.set_read_timeout(Some(WAIT)).unwrap();
    Client {
        socket,
        pace: None,
        mode: Mode::OwnPort,
    }
}

/// The server listens on 127.0.0.3, so the client's address (127.0.0.1 or 127.0.0.2) and
/// the server's address in the rendered config differ.
#[test]
fn grub_config_renders_per_client_with_exact_tsize() {
    let Some(curl) = client_or_skip("curl", "grub_config_renders_per_client_with_exact_tsize")
    else {
        return;
    };
    let out = TempDir::new("grub");
    let example = Example::start(
        "grub_config",
        &["--listen", "127.0.0.3:0", "--host", "127.0.0.1=node17"],
    );
    let addr = example.addr;

    // A real client: the content names it (as a known host) and the server it reached.
    for name in ["grub.cfg", "pxelinux.cfg/default", "pxelinux.cfg/7F000001"] {
        let got = out.path().join(name.replace('/', "_"));
        let (status, _) = curl_fetch(&curl, &example.url(name), &got, &[]);
        assert!(status.success(), "curl {name}: {status}");
        let text = fs::read_to_string(&got).unwrap();
        assert!(
            text.contains("ip=127.0.0.1 hostname=node17"),
            "{name}:\n{text}"
        );
        assert!(text.contains("127.0.0.3"), "{name}: server address\n{text}");
        assert!(text.contains("node17"), "{name}:\n{text}");
    }

    // Our client, from two addresses: tsize in the OACK is the exact rendered length.
    let mut seen = Vec::new();
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let client = client_from(ip);
        let got = client
            .fetch(
                addr,
                "grub.cfg",
                "octet",
                &[("tsize", "0"), ("blksize", "1024")],
            )
            .unwrap();
        let text = String::from_utf8(got.data.clone()).unwrap();
        assert_eq!(
            got.oack_value("tsize"),
            Some(got.data.len().to_string().as_str())
        );
        assert!(text.contains(&format!("ip={ip} ")), "{ip}:\n{text}");
        seen.push(text);
    }
    assert!(seen[0].contains("node17"));
    assert!(seen[1].contains("auto-install") && !seen[1].contains("node17"));

    // PXELINUX's search order: its own hex address is served, others' and MAC names not.
    let other = client_from("127.0.0.2");
    for name in [
        "pxelinux.cfg/7F000001",
        "pxelinux.cfg/01-52-54-00-12-34-56",
        "pxelinux.cfg/7F",
    ] {
        let err = other.fetch(addr, name, "octet", &[]).unwrap_err();
        assert_eq!(err.code(), Some(1), "{name}: {err:?}");
    }
    let own = other
        .fetch(addr, "pxelinux.cfg/7F000002", "octet", &[])
        .unwrap();
    assert!(String::from_utf8(own.data)
        .unwrap()
        .contains("ip=127.0.0.2 auto-install"));
}
