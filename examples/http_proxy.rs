//! Streams every requested file from an HTTP repository, like fbtftp's production server
//! streamed kernels and initrds: no copy of the files in a TFTP root.
//!
//! ```text
//! cargo run --example http_proxy -- --listen 127.0.0.1:6969 --base-url http://repo.example/boot
//! curl -o vmlinuz tftp://127.0.0.1:6969/images/vmlinuz   # GET http://repo.example/boot/images/vmlinuz
//! ```
//!
//! With `--root DIR`, names that exist under `DIR` are served from disk and only the others
//! go to HTTP (a local cache of the hottest files in front of the repository).
//!
//! # How it stays off the event loop
//!
//! `open` never talks to HTTP: it checks the name, makes a [`deferred`] source, queues a
//! job for a small pool of worker threads (`--workers`, default 16) and returns the
//! source at once. The session then waits, sending nothing, until a worker has the
//! response headers: it completes the [`Opener`] with a [`stream::channel`] source whose
//! size is the `Content-Length`, so the OACK carries `tsize` on the first request, or
//! refuses with the status's ERROR. The worker then copies the body into the channel;
//! the session sends blocks as they arrive, parks (costing nothing) when the buffer is
//! empty, and throttles the worker when the TFTP client is slower than the HTTP server.
//! A slow or stuck repository therefore never delays other sessions; headers that do not
//! come within the server's open timeout (2 s) end the session with ERROR 0, a body
//! that stops for the source timeout (30 s) too.
//!
//! # What the client sees
//!
//! | situation | client sees |
//! |---|---|
//! | HTTP 200 with `Content-Length` | the file, `tsize` in the OACK (also on the first request) |
//! | HTTP 200 without `Content-Length` | the file; no `tsize` |
//! | HTTP 404/410 | ERROR 1 "file not found", before any OACK; for `--meta-ttl` seconds (default 60) at once, without asking HTTP again |
//! | any other status, connection error | ERROR 0 "error reading file", before any OACK |
//! | body cut short or longer than `Content-Length` | ERROR 0 after the blocks already sent (never a transfer of another length than announced) |
//!
//! Each request makes its own GET: dyntftpd's `--upstream` adds one GET for a crowd
//! asking for the same file, a cache and revalidation.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::deferred::{deferred, Opener};
use dyntftp::{
    stream, ErrorCode, FsHandler, Handler, Notifier, ReadRequest, Reject, ResponseData,
    ServerBuilder, SessionStats,
};

/// Buffer per session between the HTTP body and the TFTP session.
const STREAM_CAPACITY: usize = 256 * 1024;

/// Names the repository answered 404 or 410 for, and when.
type Missing = Arc<Mutex<HashMap<String, Instant>>>;

/// One GET to run on a worker.
struct Job {
    url: String,
    key: String,
    opener: Opener,
    /// Wakes the session as the body arrives (the stream's notifier).
    notifier: Notifier,
}

struct HttpProxy {
    base_url: String,
    local: Option<FsHandler>,
    jobs: mpsc::Sender<Job>,
    missing: Missing,
    meta_ttl: Duration,
}

impl HttpProxy {
    /// Whether the repository said 404 for `key` within the TTL.
    fn known_missing(&self, key: &str) -> bool {
        let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        match missing.get(key) {
            Some(at) if at.elapsed() < self.meta_ttl => true,
            Some(_) => {
                missing.remove(key);
                false
            }
            None => false,
        }
    }
}

impl Handler for HttpProxy {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        if let Some(local) = &mut self.local {
            match local.open(req) {
                Err(reject) if reject.code == ErrorCode::FileNotFound => {}
                served => return served,
            }
        }
        // Same confinement as files: no `..` above the base, no control characters.
        let parts = dyntftp::fs::components(req.filename)?;
        let key = parts
            .iter()
            .map(|p| percent_encode(p))
            .collect::<Vec<_>>()
            .join("/");
        if self.known_missing(&key) {
            return Err(Reject::not_found());
        }
        let (opener, source) = deferred(req.notifier);
        let url = format!("{}/{key}", self.base_url);
        let job = Job {
            url,
            key,
            opener,
            notifier: req.notifier.clone(),
        };
        if self.jobs.send(job).is_err() {
            return Err(Reject::new(ErrorCode::NotDefined, "no HTTP worker"));
        }
        Ok(Box::new(source))
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        eprintln!(
            "{} {:?}: {} bytes in {:?}, {}",
            stats.peer,
            stats.filename,
            stats.transfer.bytes_read,
            stats.duration,
            stats.outcome.as_str()
        );
    }
}

/// Percent-encodes one path component (everything but RFC 3986 unreserved characters), so
/// a name can only ever add path segments below the base URL.
fn percent_encode(component: &[u8]) -> String {
    let mut out = String::with_capacity(component.len());
    for &b in component {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs jobs until the handler (and so the job queue) is gone.
fn worker(jobs: Arc<Mutex<mpsc::Receiver<Job>>>, agent: ureq::Agent, missing: Missing) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if job.opener.is_abandoned() {
            continue; // the session ended while the job was queued
        }
        let url = job.url.clone();
        if let Err(e) = fetch(job, &agent, &missing) {
            eprintln!("GET {url}: {e}");
        }
    }
}

/// GETs `job.url`: completes the opener from the response headers, then copies the body
/// into the stream. A failure before the headers refuses the request; every later early
/// return fails or drops the writer, which ends the session with ERROR 0 — never with a
/// short success.
fn fetch(job: Job, agent: &ureq::Agent, missing: &Missing) -> io::Result<()> {
    let Job {
        url,
        key,
        opener,
        notifier,
    } = job;
    let read_error = || Reject::new(ErrorCode::NotDefined, "error reading file");
    let response = match agent.get(&url).call() {
        Ok(response) => response,
        Err(e) => {
            opener.refuse(read_error());
            return Err(io::Error::other(e));
        }
    };
    let status = response.status().as_u16();
    if status == 404 || status == 410 {
        let mut missing = missing.lock().unwrap_or_else(|e| e.into_inner());
        missing.insert(key, Instant::now());
        opener.refuse(Reject::not_found());
        return Err(io::Error::other(format!("HTTP {status}")));
    }
    if !(200..300).contains(&status) {
        opener.refuse(read_error());
        return Err(io::Error::other(format!("HTTP {status}")));
    }
    let (mut writer, source) = stream::channel(&notifier, STREAM_CAPACITY);
    if let Some(length) = response.body().content_length() {
        // Before the source opens: this answers tsize, and the stream enforces it (a
        // body cut short fails instead of ending early).
        writer.set_size(length);
    }
    opener.open(Box::new(source));
    let mut body = response.into_body().into_reader();
    match io::copy(&mut body, &mut writer) {
        Ok(_) => {
            writer.finish();
            Ok(())
        }
        // The session ended first (client gone): nothing to report to it.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => {
            let message = e.to_string();
            writer.fail(e);
            Err(io::Error::other(message))
        }
    }
}

fn usage(opts: &getopts::Options) -> String {
    opts.usage("Usage: http_proxy --base-url URL [--listen ADDR:PORT] [options]")
}

fn main() {
    let mut opts = getopts::Options::new();
    opts.optopt(
        "l",
        "listen",
        "address to listen on (default 127.0.0.1:6969)",
        "ADDR:PORT",
    );
    opts.optopt(
        "b",
        "base-url",
        "HTTP URL the file names are appended to",
        "URL",
    );
    opts.optopt(
        "r",
        "root",
        "serve names that exist under DIR from disk",
        "DIR",
    );
    opts.optopt("", "workers", "HTTP worker threads (default 16)", "N");
    opts.optopt(
        "",
        "meta-ttl",
        "seconds to remember 404s (default 60)",
        "SECS",
    );
    opts.optflag("h", "help", "print this help");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let matches = match opts.parse(&args) {
        Ok(m) => m,
        Err(e) => fail(&format!("{e}\n{}", usage(&opts))),
    };
    if matches.opt_present("help") {
        println!("{}", usage(&opts));
        return;
    }
    let Some(base_url) = matches.opt_str("base-url") else {
        fail(&format!("--base-url is required\n{}", usage(&opts)));
    };
    if !base_url.starts_with("http://") {
        fail("--base-url must be an http:// URL (this example is built without TLS)");
    }
    let listen: SocketAddr = parse_or_fail(&matches, "listen", "127.0.0.1:6969".parse().unwrap());
    let workers: usize = parse_or_fail(&matches, "workers", 16);
    let meta_ttl = Duration::from_secs(parse_or_fail(&matches, "meta-ttl", 60));
    let local = matches
        .opt_str("root")
        .map(|root| FsHandler::new(&root).unwrap_or_else(|e| fail(&e.to_string())));

    let agent: ureq::Agent = ureq::Agent::config_builder()
        // Statuses are mapped to TFTP errors here, not turned into ureq errors.
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_recv_response(Some(Duration::from_secs(20)))
        .build()
        .into();
    let missing = Missing::default();
    let (jobs_tx, jobs_rx) = mpsc::channel();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    for i in 0..workers.max(1) {
        let (jobs, agent, missing) = (Arc::clone(&jobs_rx), agent.clone(), Arc::clone(&missing));
        thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || worker(jobs, agent, missing))
            .unwrap_or_else(|e| fail(&format!("cannot start a worker: {e}")));
    }
    let handler = HttpProxy {
        base_url: base_url.trim_end_matches('/').to_string(),
        local,
        jobs: jobs_tx,
        missing,
        meta_ttl,
    };
    let mut server = match ServerBuilder::new(handler).bind(listen).build() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("http_proxy: {e}");
            std::process::exit(1);
        }
    };
    // The first line on stdout says where we listen (tests read it to learn the port).
    println!("listening on {}", server.local_addr());
    let _ = io::stdout().flush();
    if let Err(e) = server.run() {
        eprintln!("http_proxy: {e}");
        std::process::exit(1);
    }
}

fn parse_or_fail<T: std::str::FromStr>(matches: &getopts::Matches, name: &str, default: T) -> T {
    match matches.opt_str(name) {
        None => default,
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| fail(&format!("--{name}: invalid value {v:?}"))),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("http_proxy: {message}");
    std::process::exit(2);
}
