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
//! `open` never talks to HTTP: it checks the name, creates a [`stream::channel`], queues a
//! job for a small pool of worker threads (`--workers`, default 16) and returns the
//! channel's source at once. A worker issues the GET and copies the body into the channel;
//! the session sends blocks as they arrive, parks (costing nothing) when the buffer is
//! empty, and throttles the worker when the TFTP client is slower than the HTTP server.
//! A slow or stuck repository therefore never delays other sessions; a session whose
//! bytes do not come within the server's source timeout (30 s) ends with ERROR 0.
//!
//! # What the client sees, and the trade-off
//!
//! The OACK (and so `tsize`) is built when `open` returns, before any HTTP response
//! exists. Waiting there for the response headers would block every other session, so
//! this server does not. Instead it remembers, per name and for `--meta-ttl` seconds
//! (default 60), what the last GET said:
//!
//! | situation | client sees |
//! |---|---|
//! | first request for a name, HTTP 200 | the file; no `tsize` in the OACK (the size is not known yet) |
//! | later requests within the TTL, HTTP 200 | the file, with `tsize` from the last `Content-Length` |
//! | HTTP 404/410, first time | the transfer starts (an OACK if options were asked), then ERROR 1 "file not found" |
//! | HTTP 404/410 known within the TTL | ERROR 1 "file not found" at once |
//! | any other HTTP status, connection error, body cut short | ERROR 0 "error reading file" after the blocks already sent |
//! | the file changed size upstream since `tsize` was answered | ERROR 0 (never a transfer of another length than announced) |
//!
//! PXE firmware usually probes `tsize` first and asks again, so the second request of a
//! boot gets `tsize`. A library feature that would answer it on the first request — a
//! *deferred open*, where the handler returns "pending" and the session's OACK waits for
//! the producer's headers — is not needed for this trade-off and is not in dyntftp yet.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::{
    stream, ErrorCode, FsHandler, Handler, ReadRequest, Reject, ResponseData, ServerBuilder,
    SessionStats, StreamWriter,
};

/// Buffer per session between the HTTP body and the TFTP session.
const STREAM_CAPACITY: usize = 256 * 1024;

/// What the last GET of a name said.
#[derive(Clone, Copy, Debug)]
enum Meta {
    Size(u64),
    Missing,
}

type MetaCache = Arc<Mutex<HashMap<String, (Meta, Instant)>>>;

/// One GET to run on a worker.
struct Job {
    url: String,
    key: String,
    writer: StreamWriter,
    /// The size given as `tsize`, if any: the body must have exactly this length.
    announced: Option<u64>,
}

struct HttpProxy {
    base_url: String,
    local: Option<FsHandler>,
    jobs: mpsc::Sender<Job>,
    meta: MetaCache,
    meta_ttl: Duration,
}

impl HttpProxy {
    fn cached(&self, key: &str) -> Option<Meta> {
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        match meta.get(key) {
            Some((m, at)) if at.elapsed() < self.meta_ttl => Some(*m),
            Some(_) => {
                meta.remove(key);
                None
            }
            None => None,
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
        let announced = match self.cached(&key) {
            Some(Meta::Missing) => return Err(Reject::not_found()),
            Some(Meta::Size(size)) => Some(size),
            None => None,
        };
        let (writer, source) = stream::channel(req.notifier, STREAM_CAPACITY);
        if let Some(size) = announced {
            // Before `open` returns: this answers tsize.
            writer.set_size(size);
        }
        let url = format!("{}/{key}", self.base_url);
        let job = Job {
            url,
            key,
            writer,
            announced,
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
fn worker(jobs: Arc<Mutex<mpsc::Receiver<Job>>>, agent: ureq::Agent, meta: MetaCache) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if job.writer.is_closed() {
            continue; // the client left while the job was queued
        }
        let url = job.url.clone();
        if let Err(e) = fetch(job, &agent, &meta) {
            eprintln!("GET {url}: {e}");
        }
    }
}

/// GETs `job.url` into its stream. Every early return drops or fails the writer, which
/// ends the session with ERROR 0 — never with a short success.
fn fetch(job: Job, agent: &ureq::Agent, meta: &MetaCache) -> io::Result<()> {
    let Job {
        url,
        key,
        mut writer,
        announced,
    } = job;
    let remember = |m: Option<Meta>| {
        let mut cache = meta.lock().unwrap_or_else(|e| e.into_inner());
        match m {
            Some(m) => cache.insert(key.clone(), (m, Instant::now())),
            None => cache.remove(&key),
        };
    };
    let response = match agent.get(&url).call() {
        Ok(response) => response,
        Err(e) => {
            let e = io::Error::other(e);
            let message = e.to_string();
            writer.fail(e);
            return Err(io::Error::other(message));
        }
    };
    let status = response.status().as_u16();
    if status == 404 || status == 410 {
        remember(Some(Meta::Missing));
        writer.fail(io::Error::new(io::ErrorKind::NotFound, "HTTP not found"));
        return Err(io::Error::other(format!("HTTP {status}")));
    }
    if !(200..300).contains(&status) {
        remember(None);
        writer.fail(io::Error::other(format!("HTTP {status}")));
        return Err(io::Error::other(format!("HTTP {status}")));
    }
    let length = response.body().content_length();
    remember(length.map(Meta::Size));
    match (announced, length) {
        (Some(told), Some(actual)) if told != actual => {
            let e = format!("size changed upstream: tsize said {told}, now {actual}");
            writer.fail(io::Error::other(e.clone()));
            return Err(io::Error::other(e));
        }
        // Enforced by the stream: a body cut short fails instead of ending early.
        (None, Some(actual)) => writer.set_size(actual),
        _ => {}
    }
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
        "seconds to remember sizes and 404s (default 60)",
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
    let meta = MetaCache::default();
    let (jobs_tx, jobs_rx) = mpsc::channel();
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    for i in 0..workers.max(1) {
        let (jobs, agent, meta) = (Arc::clone(&jobs_rx), agent.clone(), Arc::clone(&meta));
        thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || worker(jobs, agent, meta))
            .unwrap_or_else(|e| fail(&format!("cannot start a worker: {e}")));
    }
    let handler = HttpProxy {
        base_url: base_url.trim_end_matches('/').to_string(),
        local,
        jobs: jobs_tx,
        meta,
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
