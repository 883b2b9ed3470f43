//! Several workers (`ServerBuilder::build_workers`): event loops on their own threads with
//! SO_REUSEPORT listeners on one address. Every client is served, a client's repeated
//! request reaches the worker that has its session, the statistics of all workers reach
//! worker 0's handler added up, and one handle stops them all.

use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use dyntftp::{
    FsHandler, Handler, Outcome, Packet, ReadRequest, Reject, ResponseData, ServerBuilder,
    ServerStats, SessionStats, ShutdownHandle,
};
use testkit::*;

/// Serves files and reports, with the name of the thread each callback ran on.
#[derive(Clone)]
struct Recorder {
    files: FsHandler,
    sessions: Sender<(String, SessionStats)>,
    reports: Sender<(String, ServerStats)>,
}

fn thread_name() -> String {
    thread::current().name().unwrap_or("unnamed").to_string()
}

impl Handler for Recorder {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.files.open(request)
    }
    fn session_finished(&mut self, stats: &SessionStats) {
        let _ = self.sessions.send((thread_name(), stats.clone()));
    }
    fn server_stats(&mut self, stats: &ServerStats) {
        let _ = self.reports.send((thread_name(), stats.clone()));
    }
}

struct Pool {
    addr: SocketAddr,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), String>>>,
    sessions: Receiver<(String, SessionStats)>,
    reports: Receiver<(String, ServerStats)>,
}

impl Pool {
    fn start(root: &TempDir, workers: usize, mode: Mode) -> Pool {
        Pool::start_with(root, workers, mode, |b| b)
    }

    fn start_with(
        root: &TempDir,
        workers: usize,
        mode: Mode,
        configure: impl FnOnce(ServerBuilder<Recorder>) -> ServerBuilder<Recorder>,
    ) -> Pool {
        let (sessions_tx, sessions) = mpsc::channel();
        let (reports_tx, reports) = mpsc::channel();
        let handler = Recorder {
            files: FsHandler::new(root.path()).unwrap(),
            sessions: sessions_tx,
            reports: reports_tx,
        };
        let pool = configure(ServerBuilder::new(handler))
            .bind(v4())
            .single_port(mode.is_single_port())
            .stats_interval(Duration::from_millis(50))
            .shutdown_grace(Duration::from_millis(300))
            .build_workers(workers)
            .expect("build workers");
        assert_eq!(pool.len(), workers);
        let addr = pool.local_addrs()[0];
        let handle = pool.shutdown_handle();
        let thread = thread::Builder::new()
            .name("worker-0".into())
            .spawn(move || pool.run().map_err(|e| e.to_string()))
            .unwrap();
        Pool {
            addr,
            handle,
            thread: Some(thread),
            sessions,
            reports,
        }
    }

    fn session(&self) -> (String, SessionStats) {
        self.sessions
            .recv_timeout(WAIT)
            .expect("a finished session")
    }

    /// Reads reports until their counters, added up into `total`, satisfy `done` (at most
    /// [`WAIT`]).
    fn reports_until(&self, total: &mut ServerStats, done: impl Fn(&ServerStats) -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        while !done(total) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let (_, report) = self
                .reports
                .recv_timeout(left)
                .expect("a report before the counters were reached");
            total.merge(&report);
        }
    }

    /// Stops every worker (bounded wait) and returns every report made.
    fn stop(mut self) -> Vec<(String, ServerStats)> {
        self.handle.shutdown();
        let thread = self.thread.take().unwrap();
        for _ in 0..1000 {
            if thread.is_finished() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert!(thread.is_finished(), "workers did not stop within 10 s");
        assert_eq!(thread.join().unwrap(), Ok(()));
        self.reports.try_iter().collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

fn serve_many(mode: Mode) {
    let root = standard_root();
    let pool = Pool::start(&root, 2, mode);
    // Forty clients, each on its own port: the kernel spreads them over the workers.
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let addr = pool.addr;
            thread::spawn(move || {
                let name = if i % 2 == 0 { "big.bin" } else { "small.txt" };
                let got = Client::new(mode, addr)
                    .fetch(addr, name, "octet", &[("blksize", "1428")])
                    .unwrap_or_else(|e| panic!("client {i}: {e:?}"));
                assert!(got.data == content(name), "client {i}: {name} differs");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut threads = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let (thread, stats) = pool.session();
        assert_eq!(stats.outcome, Outcome::Completed);
        *threads.entry(thread).or_insert(0) += 1;
    }
    // Both loops served (all forty on one would take a 1 in 2^39 hash).
    assert_eq!(threads.len(), 2, "{threads:?}");
    let reports = pool.stop();
    // Only worker 0 reports, with everyone's counters.
    assert!(reports.iter().all(|(t, _)| t == "worker-0"), "{reports:?}");
    let mut total = ServerStats::default();
    for (_, r) in &reports {
        total.merge(r);
    }
    assert_eq!(total.sessions_started, 40);
    assert_eq!(total.sessions_finished.get("completed"), Some(&40));
}

#[test]
fn two_workers_serve_every_client() {
    serve_many(Mode::OwnPort);
}

#[test]
fn two_workers_in_single_port_mode() {
    serve_many(Mode::SinglePort);
}

#[test]
fn a_repeated_request_reaches_the_worker_with_the_session() {
    let root = standard_root();
    let pool = Pool::start(&root, 2, Mode::OwnPort);
    let clients: Vec<Raw> = (0..20).map(|_| Raw::new(pool.addr)).collect();
    for raw in &clients {
        raw.rrq(pool.addr, b"small.txt", "octet", &[]);
        raw.rrq(pool.addr, b"small.txt", "octet", &[]);
    }
    // Every repeat judged before any ACK: a repeat read after its client's ACK (a slow
    // worker reads the listener after the test answered) would rightly start a new
    // transfer, as for a client that reuses its port for its next request.
    let mut total = ServerStats::default();
    pool.reports_until(&mut total, |t| t.duplicate_requests >= 20);
    for raw in &clients {
        let (block, data, tid) = raw.expect_data();
        assert_eq!((block, data.as_slice()), (1, SMALL));
        raw.ack(tid, 1);
        // One session per client: nothing comes from another port. (A repeat that its
        // worker reads later than the go-back interval after DATA 1 left, as on a
        // loaded machine, makes the session resend DATA 1: from the same port.)
        while let Some((_, from)) = raw.recv_within(Duration::from_millis(20)) {
            assert_eq!(from, tid, "a second session answered");
        }
    }
    for _ in 0..20 {
        assert_eq!(pool.session().1.outcome, Outcome::Completed);
    }
    for (_, r) in pool.stop() {
        total.merge(&r);
    }
    assert_eq!(total.sessions_started, 20);
    assert_eq!(total.duplicate_requests, 20);
}

#[test]
fn workers_need_addresses_and_at_least_one_worker() {
    let root = standard_root();
    let (tx, _rx) = mpsc::channel();
    let (rtx, _rrx) = mpsc::channel();
    let handler = Recorder {
        files: FsHandler::new(root.path()).unwrap(),
        sessions: tx,
        reports: rtx,
    };
    let err = ServerBuilder::new(handler.clone())
        .bind(v4())
        .build_workers(0)
        .err()
        .unwrap();
    assert!(err.to_string().contains("at least 1"), "{err}");
    let inherited = std::net::UdpSocket::bind(v4()).unwrap();
    let err = ServerBuilder::new(handler)
        .socket(inherited)
        .build_workers(2)
        .err()
        .unwrap();
    assert!(err.to_string().contains("inherited"), "{err}");
}

both_modes!(per_client_limits_hold_across_workers);
fn per_client_limits_hold_across_workers(mode: Mode) {
    let root = standard_root();
    let pool = Pool::start_with(&root, 4, mode, |b| {
        b.limit_loopback(true)
            .request_rate(None)
            .max_sessions_per_client(Some(4))
    });
    // Forty ports of one address, spread over the four workers by the kernel: each
    // acknowledges block 1 (a verified session) and holds it.
    let mut granted = 0;
    let mut refused = 0;
    let clients: Vec<Raw> = (0..40).map(|_| Raw::new(pool.addr)).collect();
    for raw in &clients {
        raw.rrq(pool.addr, b"big.bin", "octet", &[]);
        let (datagram, tid) = raw.recv();
        match Packet::parse(&datagram) {
            Ok(Packet::Data { block: 1, .. }) => {
                raw.ack(tid, 1);
                assert_eq!(raw.expect_data().0, 2);
                granted += 1;
            }
            Ok(Packet::Error { code, .. }) => {
                assert_eq!(code, dyntftp::ErrorCode::NotDefined);
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((granted, refused), (4, 36));
    let reports = pool.stop();
    let limited: u64 = reports.iter().map(|(_, r)| r.client_limited).sum();
    assert_eq!(limited, 36);
}
