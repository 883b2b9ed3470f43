//! The scrape endpoint: dyntftpd started with `--metrics-listen`, scraped over HTTP after
//! a transfer; `promtool check metrics` (where installed) checks the text.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_dyntftpd");
/// How long a condition may take to come true.
const WAIT: Duration = Duration::from_secs(20);
/// Read and write timeout of every test socket.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `check` until it returns Some, for at most [`WAIT`].
fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    testkit::eventually(what, WAIT, check)
}

/// A dyntftpd child logging to a file; killed (by its PID) and reaped on drop.
struct Daemon {
    child: Child,
    /// The TFTP address.
    tftp: SocketAddr,
    /// The scrape endpoint's address.
    http: SocketAddr,
}

impl Daemon {
    /// Starts dyntftpd serving `root` on 127.0.0.1 with a scrape endpoint on a free
    /// 127.0.0.1 port, and reads both addresses back from its log.
    fn start(root: &Path, log: &Path) -> Daemon {
        let child = Command::new(BIN)
            .args(["-l", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--stats-interval", "1", "--log-file"])
            .arg(log)
            .arg("-r")
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dyntftpd starts");
        let mut daemon = Daemon {
            child,
            tftp: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let (tftp, http) = eventually("both addresses in the log", || {
            let text = std::fs::read_to_string(log).ok()?;
            // "serving ROOT on ADDR (max …" and "serving /metrics and /healthz on http://ADDR".
            let after = |line_has: &str, marker: &str| -> Option<SocketAddr> {
                let line = text.lines().find(|l| l.contains(line_has))?;
                let rest = &line[line.rfind(marker)? + marker.len()..];
                rest.split([' ', ',']).next()?.parse().ok()
            };
            Some((after(" (max ", " on ")?, after("/healthz", " on http://")?))
        });
        daemon.tftp = tftp;
        daemon.http = http;
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status code, headers (lower-case names), body.
struct Response {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as it is and reads the response until the server closes.
fn exchange(addr: SocketAddr, request: &str) -> Response {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    assert!(status.starts_with("HTTP/1.1 "), "{status}");
    let code = status[9..12].parse().expect("status code");
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header");
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let response = Response {
        code,
        headers,
        body: body.to_string(),
    };
    let length: usize = response
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .expect("Content-Length");
    // A reply to HEAD has the GET reply's length and no body.
    let expected = if request.starts_with("HEAD ") {
        0
    } else {
        length
    };
    assert_eq!(
        response.body.len(),
        expected,
        "{request:?}: Content-Length {length}"
    );
    response
}

fn get(addr: SocketAddr, path: &str) -> Response {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: scrape-test\r\n\r\n"),
    )
}

/// The value of the sample `series` (name with labels) in a Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The metric families (`# TYPE` names) of a Prometheus text.
fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| Some(l.strip_prefix("# TYPE ")?.split(' ').next()?.to_string()))
        .collect()
}

#[test]
fn metrics_endpoint_counts_a_transfer_and_serves_healthz() {
    let root = TempDir::new("scrape-root");
    let file = pseudo_random(3000, 16);
    root.write("f.bin", &file);
    let logs = TempDir::new("scrape-log");
    let log = logs.path().join("dyntftpd.log");
    let daemon = Daemon::start(root.path(), &log);

    // Before the first stats report: every family, at zero.
    let first = get(daemon.http, "/metrics");
    assert_eq!(first.code, 200);
    assert_eq!(
        first.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let completed = "dyntftp_sessions_total{outcome=\"completed\"}";
    assert_eq!(sample(&first.body, completed), Some(0.0), "{}", first.body);
    // The same families as the textfile the library renders.
    assert_eq!(
        families(&first.body),
        families(&dyntftp::Metrics::new().render())
    );

    let client = Client::new(Mode::OwnPort, daemon.tftp);
    let got = client.fetch(daemon.tftp, "f.bin", "octet", &[]).unwrap();
    assert_eq!(got.data, file);

    // The snapshot is the last stats report's (--stats-interval 1).
    let text = eventually("the transfer in /metrics", || {
        let body = get(daemon.http, "/metrics").body;
        (sample(&body, completed) == Some(1.0)).then_some(body)
    });
    assert_eq!(sample(&text, "dyntftp_requests_total"), Some(1.0));
    assert_eq!(
        sample(&text, "dyntftp_session_duration_seconds_count"),
        Some(1.0)
    );

    let health = get(daemon.http, "/healthz");
    assert_eq!((health.code, health.body.as_str()), (200, "ok\n"));
    assert_eq!(get(daemon.http, "/").code, 404);
    assert_eq!(get(daemon.http, "/metrics/extra").code, 404);
    let post = exchange(
        daemon.http,
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(post.code, 405);
    assert_eq!(exchange(daemon.http, "NOT HTTP\r\n\r\n").code, 400);
    let head = exchange(daemon.http, "HEAD /healthz HTTP/1.0\r\n\r\n");
    assert_eq!((head.code, head.header("content-length")), (200, Some("3")));

    promtool_check(&text);
}

/// Runs `promtool check metrics` on `text` when promtool is installed; skips loudly
/// otherwise (fails instead under `DYNTFTP_REQUIRE_CLIENTS=1`).
fn promtool_check(text: &str) {
    let Some(promtool) = client_or_skip(
        "promtool",
        "metrics_endpoint_counts_a_transfer_and_serves_healthz (promtool check metrics)",
    ) else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    // promtool reads stdin to its end and exits; the deadline is its own runtime's.
    let out = child.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One connection at a time, each cut off at its deadline: a scraper that connects and
/// sends nothing holds the endpoint only until then; the next scrape is answered after it.
#[test]
fn a_stalled_scraper_is_cut_off() {
    let root = TempDir::new("scrape-stall-root");
    let logs = TempDir::new("scrape-stall-log");
    let daemon = Daemon::start(root.path(), &logs.path().join("dyntftpd.log"));
    let mut stalled = TcpStream::connect_timeout(&daemon.http, IO_TIMEOUT).expect("connect");
    stalled.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stalled
        .write_all(b"GET /metrics HTTP/1.1\r\n")
        .expect("send");
    // Waits behind the stalled connection, then is answered.
    let health = get(daemon.http, "/healthz");
    assert_eq!((health.code, health.body.as_str()), (200, "ok\n"));
    // The stalled one was closed without a reply.
    let mut rest = Vec::new();
    let closed = stalled.read_to_end(&mut rest);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "{closed:?} {rest:?}"
    );
}
