//! The worker pool: a bounded job queue and `workers` threads, each running one GET at a
//! time with ureq, completing the waiting sessions when the headers arrive and filling the
//! shared body after.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::{ErrorCode, ReadRequest, Reject};
use log::debug;

use super::shared::{AppendError, Body, Validators};
use super::url::header_value;
use super::{bump, Core, Waiter, STREAM_WINDOW};

/// Bytes read from the HTTP body at a time (one chunk of the shared body).
const READ_CHUNK: usize = 64 * 1024;
/// How often a windowed body's worker looks again while its slowest reader holds it back.
const WINDOW_POLL: Duration = Duration::from_millis(200);

/// One GET to run.
pub(crate) struct Job {
    pub url: String,
    pub headers: RequestHeaders,
    /// The cached body to revalidate (conditional GET), if any.
    pub stale: Option<Arc<Body>>,
}

/// The `X-TFTP-*` headers of the request that started a GET.
pub(crate) struct RequestHeaders {
    ip: String,
    port: String,
    file: String,
    mac: Option<String>,
}

impl RequestHeaders {
    pub fn of(request: &ReadRequest<'_>) -> RequestHeaders {
        RequestHeaders {
            ip: request.peer.ip().to_string(),
            port: request.peer.port().to_string(),
            file: header_value(request.filename),
            mac: request.mac().map(|mac| mac.to_string()),
        }
    }
}

/// A bounded queue of jobs; closed when the [`Workers`] are dropped.
pub(crate) struct JobQueue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    capacity: usize,
    closed: AtomicBool,
}

impl JobQueue {
    pub fn new(capacity: usize) -> JobQueue {
        JobQueue {
            jobs: Mutex::new(VecDeque::with_capacity(capacity)),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `job` unless the queue is full.
    pub fn try_push(&self, job: Job) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= self.capacity {
            return false;
        }
        jobs.push_back(job);
        self.ready.notify_one();
        true
    }

    /// The next job; `None` once closed.
    fn pop(&self) -> Option<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(job) = jobs.pop_front() {
                return Some(job);
            }
            jobs = self.ready.wait(jobs).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        let _jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        self.closed.store(true, Ordering::SeqCst);
        self.ready.notify_all();
    }
}

/// The worker threads; dropping this closes the queue (each thread ends after its GET).
pub(crate) struct Workers {
    core: Arc<Core>,
}

impl Workers {
    pub fn start(core: Arc<Core>) -> io::Result<Workers> {
        let timeout = Some(core.settings.timeout);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            // Statuses become TFTP errors here, not ureq errors.
            .http_status_as_error(false)
            .user_agent(concat!("dyntftpd/", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(timeout)
            .timeout_connect(timeout)
            .timeout_send_request(timeout)
            .timeout_recv_response(timeout)
            .timeout_per_read(timeout)
            .build()
            .into();
        let workers = Workers {
            core: Arc::clone(&core),
        };
        for i in 0..core.settings.workers {
            let (core, agent) = (Arc::clone(&core), agent.clone());
            thread::Builder::new()
                .name(format!("upstream-{i}"))
                .spawn(move || {
                    while let Some(job) = core.queue.pop() {
                        run(&core, &agent, job);
                    }
                })?;
        }
        Ok(workers)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.core.queue.close();
    }
}

/// How a GET ended, for the counters and the log.
enum Outcome {
    Served,
    Revalidated,
    NotFound,
    Failed(String),
}

/// Runs one job: the GET, the waiters' completion, the body.
fn run(core: &Core, agent: &ureq::Agent, job: Job) {
    bump(&core.counters.gets);
    debug!(
        "upstream: GET {}{}",
        job.url,
        if job.stale.is_some() {
            " (revalidating)"
        } else {
            ""
        }
    );
    // A panic (in ureq, say) must not leave the URL's waiters, and every later request
    // for it, joined to a GET that will never end.
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fetch(core, agent, &job)))
            .unwrap_or_else(|_| {
                refuse_all(
                    core,
                    &job.url,
                    Reject::new(ErrorCode::NotDefined, "error reading file"),
                    Outcome::Failed("the worker panicked".into()),
                )
            });
    match outcome {
        Outcome::Served => {}
        Outcome::Revalidated => bump(&core.counters.revalidations),
        Outcome::NotFound => bump(&core.counters.not_found),
        Outcome::Failed(why) => {
            bump(&core.counters.failures);
            core.warn(format_args!("GET {}: {why}", job.url));
        }
    }
}

fn fetch(core: &Core, agent: &ureq::Agent, job: &Job) -> Outcome {
    let url = job.url.as_str();
    let mut request = agent
        .get(url)
        .header("X-TFTP-IP", &job.headers.ip)
        .header("X-TFTP-Port", &job.headers.port)
        .header("X-TFTP-File", &job.headers.file);
    if let Some(mac) = &job.headers.mac {
        request = request.header("X-TFTP-MAC", mac);
    }
    if let Some(stale) = &job.stale {
        let validators = stale.validators();
        if let Some(etag) = &validators.etag {
            request = request.header("If-None-Match", etag);
        }
        if let Some(date) = &validators.last_modified {
            request = request.header("If-Modified-Since", date);
        }
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(e) => {
            return refuse_all(
                core,
                url,
                Reject::new(ErrorCode::NotDefined, "error reading file"),
                Outcome::Failed(e.to_string()),
            )
        }
    };
    let status = response.status().as_u16();
    match (status, &job.stale) {
        (304, Some(stale)) => {
            let waiters = {
                let mut bodies = core.lock_bodies();
                bodies.cache.revalidated(url, Instant::now());
                core.flights.finish(&url.to_owned())
            };
            attach(waiters, stale);
            Outcome::Revalidated
        }
        (404 | 410, _) => {
            core.not_found
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(url.to_owned(), (), Instant::now());
            core.lock_bodies().cache.remove(url);
            refuse_all(core, url, Reject::not_found(), Outcome::NotFound)
        }
        (200, _) => serve(core, url, response),
        _ => refuse_all(
            core,
            url,
            Reject::new(ErrorCode::NotDefined, "error reading file"),
            Outcome::Failed(format!("HTTP {status}")),
        ),
    }
}

/// Refuses every waiter of `url` with `reject`.
fn refuse_all(core: &Core, url: &str, reject: Reject, outcome: Outcome) -> Outcome {
    let waiters = {
        let _bodies = core.lock_bodies();
        core.flights.finish(&url.to_owned())
    };
    for waiter in waiters {
        waiter.opener.refuse(reject.clone());
    }
    outcome
}

/// Gives each waiter a reader of `body` (ERROR 0 if the body failed meanwhile).
fn attach(waiters: Vec<Waiter>, body: &Arc<Body>) {
    for waiter in waiters {
        if waiter.opener.is_abandoned() {
            continue;
        }
        match body.reader(&waiter.notifier) {
            Some(reader) => waiter.opener.open(Box::new(reader)),
            None => waiter
                .opener
                .refuse(Reject::new(ErrorCode::NotDefined, "error reading file")),
        }
    }
}

/// A 200: the body is kept in the cache if it fits (else streamed through a window), the
/// waiters get their readers, then the body is read in.
fn serve(core: &Core, url: &str, response: ureq::http::Response<ureq::Body>) -> Outcome {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let validators = Validators {
        etag: header("etag"),
        last_modified: header("last-modified"),
    };
    let size = response.body().content_length();
    let (body, waiters) = {
        let mut bodies = core.lock_bodies();
        let kept = size.and_then(|size| {
            let body = Arc::new(Body::new(Some(size), true, 0, validators.clone()));
            bodies
                .cache
                .admit(url, Arc::clone(&body), size, Instant::now())
                .then_some(body)
        });
        let body = kept.unwrap_or_else(|| {
            let body = Arc::new(Body::new(size, false, STREAM_WINDOW, validators));
            bodies.streaming.insert(url.to_owned(), Arc::clone(&body));
            body
        });
        (body, core.flights.finish(&url.to_owned()))
    };
    attach(waiters, &body);
    let result = {
        // Its readers get an error, not a wait, should the worker panic meanwhile.
        let _unwinding = FailOnUnwind(&body);
        read_body(response.into_body(), &body)
    };
    let mut bodies = core.lock_bodies();
    if bodies
        .streaming
        .get(url)
        .is_some_and(|b| Arc::ptr_eq(b, &body))
    {
        bodies.streaming.remove(url);
    }
    match result {
        Ok(()) => Outcome::Served,
        Err(why) => {
            bodies
                .cache
                .remove_if(url, |cached| Arc::ptr_eq(cached, &body));
            match why {
                Some(why) => Outcome::Failed(why),
                None => Outcome::Served,
            }
        }
    }
}

/// Fails a body when dropped during a panic.
struct FailOnUnwind<'a>(&'a Body);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.fail("the worker panicked".into());
        }
    }
}

/// Reads the HTTP body into `body`. `Err(None)`: stopped because nobody reads it any more.
fn read_body(http: ureq::Body, body: &Body) -> Result<(), Option<String>> {
    let mut reader = http.into_reader();
    loop {
        let mut chunk = vec![0u8; READ_CHUNK];
        match reader.read(&mut chunk) {
            Ok(0) => {
                body.finish();
                return if body.is_complete() {
                    Ok(())
                } else {
                    Err(Some("body shorter than its Content-Length".into()))
                };
            }
            Ok(n) => {
                chunk.truncate(n);
                match body.append(chunk, WINDOW_POLL) {
                    Ok(()) => {}
                    Err(AppendError::TooLong) => {
                        return Err(Some("body longer than its Content-Length".into()))
                    }
                    Err(AppendError::NoReaders) => {
                        body.fail("no readers".into());
                        return Err(None);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let why = e.to_string();
                body.fail(why.clone());
                return Err(Some(why));
            }
        }
    }
}
