//! dyntftpd's HTTP repository source: names served from `URL + name`, with the OACK held
//! (a deferred open) until the response headers say the size or the refusal.
//!
//! [`Upstream::open`] runs on the event loop and never waits on the network. In order:
//!
//! 1. A URL that answered 404/410 within the last [`NOT_FOUND_TTL`] → ERROR 1 at once,
//!    without a GET.
//! 2. A cached body validated within the last [`MAX_AGE`] → served from memory at once.
//!    A body still arriving (a GET in flight past its headers) → the session joins it and
//!    reads it as it grows.
//! 3. Otherwise the request joins the GET in flight for its URL, or starts one: a job for
//!    the bounded worker pool (`workers` threads, a queue of [`QUEUE_PER_WORKER`] jobs per
//!    worker; full → ERROR 0 at once). An older cached body is revalidated with
//!    `If-None-Match` / `If-Modified-Since` (304 → served from memory, no body transfer).
//!    The session waits (sends nothing) until the worker has the response headers: then
//!    every joined session gets the body with `tsize` from Content-Length, or ERROR 1 for
//!    404/410, or ERROR 0 for anything else (other statuses, connection errors, timeouts).
//!
//! # Bounds
//!
//! - GETs: one per URL at a time, whatever the number of requests (single flight); a
//!   spoofed request costs at most one GET, none for a cached or negative-cached URL.
//! - Threads: `workers`. Queue: `workers × QUEUE_PER_WORKER` jobs; URLs in flight: at most
//!   workers + queue.
//! - Memory: cached and in-flight cached bodies ≤ `cache_bytes` (a body in use is never
//!   evicted; a body that does not fit is not kept), plus, per GET whose body is not kept
//!   (larger than the room, or no Content-Length), a window of [`STREAM_WINDOW`] bytes past
//!   its slowest reader plus one read of 64 KiB: ≤ `cache_bytes + workers × (STREAM_WINDOW
//!   + 64 KiB)` in all. Sessions hold no copy: they read the shared bodies.
//! - Log: a debug line per GET; warnings at most [`WARN_BURST`] per [`WARN_PERIOD`].
//! - Time: connecting ≤ `timeout`, the response headers ≤ `timeout` after the request, and
//!   no read of the body waits more than `timeout`: a stalled repository fails the body.

mod cache;
mod fetch;
mod shared;
pub(crate) mod url;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dyntftp::backend::{Joined, SingleFlight, TtlCache};
use dyntftp::deferred::{deferred, Opener};
use dyntftp::{ErrorCode, LogDecision, LogLimiter, Notifier, ReadRequest, Reject, ResponseData};

use cache::Cache;
use fetch::{Job, JobQueue, RequestHeaders, Workers};
use shared::Body;

pub use url::join;

/// How long a cached body is served without asking the repository again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// How long a 404/410 is remembered.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(10);
/// Most URLs remembered as not found (oldest forgotten first).
pub const NOT_FOUND_CAPACITY: usize = 4096;
/// Jobs queued per worker thread before new URLs are refused.
pub const QUEUE_PER_WORKER: usize = 4;
/// Bytes a body that is not cached keeps past its slowest reader.
pub const STREAM_WINDOW: u64 = 1 << 20;
/// Warning lines let through per [`WARN_PERIOD`].
pub const WARN_BURST: u32 = 10;
/// See [`WARN_BURST`].
pub const WARN_PERIOD: Duration = Duration::from_secs(10);

/// How the upstream fetches and what it keeps.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Connect, response-headers and per-read body timeout.
    pub timeout: Duration,
    /// Worker threads issuing GETs (at least 1).
    pub workers: usize,
    /// Bytes of bodies kept in memory; 0: none.
    pub cache_bytes: u64,
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamStats {
    /// GETs issued (conditional ones included).
    pub gets: u64,
    /// Requests that joined a GET already in flight.
    pub joined: u64,
    /// Requests served from the cache without a GET.
    pub cache_hits: u64,
    /// Conditional GETs answered 304 (the cached body reused).
    pub revalidations: u64,
    /// GETs answered 404 or 410.
    pub not_found: u64,
    /// Requests refused from the negative cache, without a GET.
    pub negative_hits: u64,
    /// GETs that failed: other statuses, connection errors, timeouts, bad bodies.
    pub failures: u64,
    /// Requests refused because the job queue was full.
    pub busy: u64,
    /// Bytes of bodies in the cache now.
    pub cached_bytes: u64,
    /// Bodies in the cache now.
    pub cached_entries: u64,
    /// Bytes held now by the bodies streaming uncached (each at most a window).
    pub streaming_bytes: u64,
}

/// The HTTP repository source; clones share one worker pool and cache.
#[derive(Clone)]
pub struct Upstream {
    core: Arc<Core>,
    _workers: Arc<Workers>,
}

/// A request waiting for a GET's response headers.
pub(crate) struct Waiter {
    opener: Opener,
    notifier: Notifier,
}

/// What the event loop and the workers share.
pub(crate) struct Core {
    settings: UpstreamSettings,
    /// How long a cached body is served without revalidation ([`MAX_AGE`]).
    max_age: Duration,
    /// The cache and the bodies streaming uncached. Locked before `flights`.
    bodies: Mutex<Bodies>,
    flights: SingleFlight<String, Waiter>,
    not_found: Mutex<TtlCache<String, ()>>,
    queue: JobQueue,
    counters: Counters,
    warnings: Mutex<LogLimiter>,
}

pub(crate) struct Bodies {
    cache: Cache<Arc<Body>>,
    /// Bodies not kept (no room, no Content-Length) while their GET runs: requests join
    /// them until their first bytes are dropped.
    streaming: HashMap<String, Arc<Body>>,
}

#[derive(Default)]
struct Counters {
    gets: AtomicU64,
    joined: AtomicU64,
    cache_hits: AtomicU64,
    revalidations: AtomicU64,
    not_found: AtomicU64,
    negative_hits: AtomicU64,
    failures: AtomicU64,
    busy: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// ERROR 0 for a full job queue.
fn busy() -> Reject {
    Reject::new(ErrorCode::NotDefined, "upstream busy")
}

impl Upstream {
    /// Starts the worker pool.
    pub fn start(settings: UpstreamSettings) -> io::Result<Upstream> {
        Upstream::start_with(settings, MAX_AGE)
    }

    fn start_with(settings: UpstreamSettings, max_age: Duration) -> io::Result<Upstream> {
        let workers = settings.workers.max(1);
        let queue_len = workers * QUEUE_PER_WORKER;
        let core = Arc::new(Core {
            max_age,
            bodies: Mutex::new(Bodies {
                cache: Cache::new(settings.cache_bytes),
                streaming: HashMap::new(),
            }),
            flights: SingleFlight::new(workers + queue_len),
            not_found: Mutex::new(TtlCache::new(NOT_FOUND_CAPACITY, NOT_FOUND_TTL)),
            queue: JobQueue::new(queue_len),
            counters: Counters::default(),
            warnings: Mutex::new(LogLimiter::new(WARN_PERIOD, WARN_BURST)),
            settings: UpstreamSettings {
                workers,
                ..settings
            },
        });
        let workers = Workers::start(Arc::clone(&core))?;
        Ok(Upstream {
            core,
            _workers: Arc::new(workers),
        })
    }

    /// Opens `url` for `request` without blocking: a source served from memory, a
    /// deferred source completed when the response headers arrive, or a refusal (ERROR 1
    /// for a URL known not to exist, ERROR 0 when the queue is full).
    pub fn open(
        &self,
        url: &str,
        request: &ReadRequest<'_>,
    ) -> Result<Box<dyn ResponseData>, Reject> {
        let core = &self.core;
        let now = Instant::now();
        if core.known_missing(url, now) {
            bump(&core.counters.negative_hits);
            return Err(Reject::not_found());
        }
        let mut bodies = core.lock_bodies();
        let mut stale = None;
        if let Some((body, validated)) = bodies.cache.get(url) {
            let fresh = now.saturating_duration_since(validated) < core.max_age;
            if !body.is_complete() || fresh {
                // Fresh, or still arriving (and so just validated): read it from memory.
                if let Some(reader) = body.reader(request.notifier) {
                    let counter = if body.is_complete() {
                        &core.counters.cache_hits
                    } else {
                        &core.counters.joined
                    };
                    bump(counter);
                    return Ok(Box::new(reader));
                }
            } else if body.validators().any() {
                stale = Some(body);
            }
        } else if let Some(reader) = bodies
            .streaming
            .get(url)
            .and_then(|body| body.reader(request.notifier))
        {
            bump(&core.counters.joined);
            return Ok(Box::new(reader));
        }
        let (opener, source) = deferred(request.notifier);
        let waiter = Waiter {
            opener,
            notifier: request.notifier.clone(),
        };
        match core.flights.join(url.to_owned(), waiter) {
            Joined::Follow => {
                bump(&core.counters.joined);
                Ok(Box::new(source))
            }
            Joined::Full(_) => {
                bump(&core.counters.busy);
                Err(busy())
            }
            Joined::Lead => {
                let job = Job {
                    url: url.to_owned(),
                    headers: RequestHeaders::of(request),
                    stale,
                };
                if core.queue.try_push(job) {
                    return Ok(Box::new(source));
                }
                let waiters = core.flights.finish(&url.to_owned());
                drop(bodies);
                bump(&core.counters.busy);
                // Only this request can have joined (under the same lock).
                drop(waiters);
                Err(busy())
            }
        }
    }

    /// Counters since start, and the cache's size now.
    pub fn stats(&self) -> UpstreamStats {
        let c = &self.core.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut bodies = self.core.lock_bodies();
        UpstreamStats {
            gets: load(&c.gets),
            joined: load(&c.joined),
            cache_hits: load(&c.cache_hits),
            revalidations: load(&c.revalidations),
            not_found: load(&c.not_found),
            negative_hits: load(&c.negative_hits),
            failures: load(&c.failures),
            busy: load(&c.busy),
            cached_bytes: bodies.cache.used(),
            cached_entries: bodies.cache.len() as u64,
            streaming_bytes: bodies.streaming.values().map(|b| b.resident()).sum(),
        }
    }
}

impl Core {
    fn lock_bodies(&self) -> MutexGuard<'_, Bodies> {
        self.bodies.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known_missing(&self, url: &str, now: Instant) -> bool {
        let mut missing = self.not_found.lock().unwrap_or_else(|e| e.into_inner());
        missing.get(&url.to_owned(), now).is_some()
    }

    /// Logs a warning unless the global limit is reached.
    fn warn(&self, message: std::fmt::Arguments<'_>) {
        let verdict = self
            .warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(Instant::now());
        match verdict {
            LogDecision::Log { suppressed: 0 } => log::warn!("upstream: {message}"),
            LogDecision::Log { suppressed } => {
                log::warn!("upstream: {message} ({suppressed} similar warnings suppressed)")
            }
            LogDecision::Suppress => {}
        }
    }
}

impl std::fmt::Display for UpstreamStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} GETs, {} joined, {} cache hits, {} revalidated, {} not found, \
             {} negative hits, {} failed, {} busy, {} bytes in {} cached bodies, \
             {} bytes streaming",
            self.gets,
            self.joined,
            self.cache_hits,
            self.revalidations,
            self.not_found,
            self.negative_hits,
            self.failures,
            self.busy,
            self.cached_bytes,
            self.cached_entries,
            self.streaming_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    //! In-process, against a loopback repository (tiny_http): what the daemon tests cannot
    //! reach without waiting [`MAX_AGE`] — revalidation — and the uncached window.

    use super::*;
    use std::net::SocketAddr;
    use std::task::Poll;
    use std::thread::{self, JoinHandle};

    use dyntftp::handler::SessionNotes;
    use dyntftp::packet::Options;
    use dyntftp::Mode;

    const SETTINGS: UpstreamSettings = UpstreamSettings {
        timeout: Duration::from_secs(5),
        workers: 2,
        cache_bytes: 1 << 20,
    };

    /// Answers `count` GETs with `body` (ETag "v1"; 304 for If-None-Match "v1") and
    /// returns the If-None-Match header of each.
    fn repository(body: Vec<u8>, count: usize) -> (String, JoinHandle<Vec<Option<String>>>) {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/file", server.server_addr().to_ip().unwrap());
        let answers = thread::spawn(move || {
            (0..count)
                .map(|_| {
                    let request = server
                        .recv_timeout(Duration::from_secs(10))
                        .unwrap()
                        .expect("a GET within 10 s");
                    let tag = request
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv("If-None-Match"))
                        .map(|h| h.value.to_string());
                    let etag = tiny_http::Header::from_bytes("ETag", "\"v1\"").unwrap();
                    let response = if tag.as_deref() == Some("\"v1\"") {
                        tiny_http::Response::empty(304).with_header(etag).boxed()
                    } else {
                        tiny_http::Response::from_data(body.clone())
                            .with_header(etag)
                            .with_chunked_threshold(usize::MAX)
                            .boxed()
                    };
                    request.respond(response).unwrap();
                    tag
                })
                .collect()
        });
        (url, answers)
    }

    /// A request for `file` from 127.0.0.1:4000, as the loop would pass it.
    fn request<'a>(notifier: &'a Notifier, notes: &'a SessionNotes) -> ReadRequest<'a> {
        let peer = SocketAddr::from(([127, 0, 0, 1], 4000));
        ReadRequest {
            peer,
            local: peer,
            filename: b"file",
            mode: Mode::Octet,
            options: Options::EMPTY,
            notifier,
            notes,
            now: std::time::Instant::now(),
        }
    }

    /// Opens `url` as a session would and reads it whole (polling, bounded).
    fn fetch(upstream: &Upstream, url: &str) -> Result<Vec<u8>, Reject> {
        let (notifier, notes) = (Notifier::detached(), SessionNotes::default());
        let request = request(&notifier, &notes);
        let mut source = upstream.open(url, &request)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut data = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            assert!(Instant::now() < deadline, "no end within 10 s");
            match source.poll_open() {
                Poll::Pending => {}
                Poll::Ready(Err(reject)) => return Err(reject),
                Poll::Ready(Ok(())) => match source.read(&mut buf) {
                    Ok(0) => return Ok(data),
                    Ok(n) => {
                        data.extend_from_slice(&buf[..n]);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Reject::new(ErrorCode::NotDefined, e.to_string())),
                },
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_old_cached_body_is_revalidated_and_reused_on_304() {
        let (url, answers) = repository(b"hello".to_vec(), 2);
        // Every cached body is old at once: each request revalidates.
        let upstream = Upstream::start_with(SETTINGS, Duration::ZERO).unwrap();
        assert_eq!(fetch(&upstream, &url).unwrap(), b"hello");
        assert_eq!(fetch(&upstream, &url).unwrap(), b"hello");
        assert_eq!(answers.join().unwrap(), [None, Some("\"v1\"".into())]);
        let stats = upstream.stats();
        assert_eq!(
            (stats.gets, stats.revalidations, stats.cache_hits),
            (2, 1, 0)
        );
        assert_eq!((stats.cached_bytes, stats.cached_entries), (5, 1));
    }

    #[test]
    fn a_fresh_cached_body_is_served_without_a_get() {
        let (url, answers) = repository(b"hello".to_vec(), 1);
        let upstream = Upstream::start(SETTINGS).unwrap();
        for _ in 0..3 {
            assert_eq!(fetch(&upstream, &url).unwrap(), b"hello");
        }
        assert_eq!(answers.join().unwrap(), [None]);
        let stats = upstream.stats();
        assert_eq!((stats.gets, stats.cache_hits), (1, 2));
    }

    #[test]
    fn a_body_larger_than_the_cache_streams_and_is_not_kept() {
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (url, answers) = repository(body.clone(), 2);
        let settings = UpstreamSettings {
            cache_bytes: 1000,
            ..SETTINGS
        };
        let upstream = Upstream::start(settings).unwrap();
        for _ in 0..2 {
            assert!(fetch(&upstream, &url).unwrap() == body);
        }
        assert_eq!(answers.join().unwrap(), [None, None]);
        let stats = upstream.stats();
        assert_eq!(
            (stats.gets, stats.cached_bytes, stats.streaming_bytes),
            (2, 0, 0)
        );
    }

    #[test]
    fn requests_joined_to_an_uncached_body_share_one_get_within_the_window() {
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}/big", server.server_addr().to_ip().unwrap());
        let settings = UpstreamSettings {
            cache_bytes: 0,
            ..SETTINGS
        };
        let upstream = Upstream::start(settings).unwrap();
        let (notifier, notes) = (Notifier::detached(), SessionNotes::default());
        let peer = SocketAddr::from(([127, 0, 0, 1], 4000));
        let request = ReadRequest {
            peer,
            local: peer,
            filename: b"big",
            mode: Mode::Octet,
            options: Options::EMPTY,
            notifier: &notifier,
            notes: &notes,
            now: std::time::Instant::now(),
        };
        // Both requests wait for the headers the repository holds back.
        let mut sources: Vec<_> = (0..2)
            .map(|_| upstream.open(&url, &request).unwrap())
            .collect();
        let get = server
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("one GET");
        let body: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let answer = {
            let body = body.clone();
            thread::spawn(move || {
                let response =
                    tiny_http::Response::from_data(body).with_chunked_threshold(usize::MAX);
                let _ = get.respond(response);
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = [Vec::new(), Vec::new()];
        let mut done = [false, false];
        let mut buf = vec![0u8; 1468];
        while !done.iter().all(|d| *d) {
            assert!(Instant::now() < deadline, "no end within 20 s");
            for (i, source) in sources.iter_mut().enumerate() {
                if done[i] || source.poll_open().is_pending() {
                    continue;
                }
                // The second reader takes one block per turn of the first's four: the
                // window past the slowest holds the rest back.
                for _ in 0..(if i == 0 { 4 } else { 1 }) {
                    match source.read(&mut buf) {
                        Ok(0) => done[i] = true,
                        Ok(n) => got[i].extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                    if done[i] {
                        break;
                    }
                }
            }
            let streaming = upstream.stats().streaming_bytes;
            assert!(
                streaming <= STREAM_WINDOW + 64 * 1024,
                "{streaming} bytes held"
            );
        }
        answer.join().unwrap();
        assert!(got[0] == body && got[1] == body, "content differs");
        assert!(server.try_recv().unwrap().is_none(), "a second GET");
        let stats = upstream.stats();
        assert_eq!((stats.gets, stats.joined, stats.cached_bytes), (1, 1, 0));
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        // One worker, held by a GET that gets no answer; its queue of 4 fills; the next
        // new URL is refused without waiting.
        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let base = format!("http://{}", server.server_addr().to_ip().unwrap());
        let settings = UpstreamSettings {
            workers: 1,
            timeout: Duration::from_secs(2),
            ..SETTINGS
        };
        let upstream = Upstream::start(settings).unwrap();
        let (notifier, notes) = (Notifier::detached(), SessionNotes::default());
        let request = request(&notifier, &notes);
        let mut held = Vec::new();
        let first = upstream.open(&format!("{base}/0"), &request).unwrap();
        held.push(first);
        // The worker has taken the first job once the repository sees its GET, left
        // unanswered (held here: a dropped request would be answered 500).
        let _first_get = server
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("the first GET");
        for i in 1..=QUEUE_PER_WORKER {
            held.push(upstream.open(&format!("{base}/{i}"), &request).unwrap());
        }
        let Err(refused) = upstream.open(&format!("{base}/full"), &request) else {
            panic!("a request past the queue was accepted");
        };
        assert_eq!(refused.code, ErrorCode::NotDefined);
        // A request for a URL already in flight still joins it.
        held.push(upstream.open(&format!("{base}/1"), &request).unwrap());
        let stats = upstream.stats();
        assert_eq!((stats.busy, stats.joined), (1, 1));
    }
}
