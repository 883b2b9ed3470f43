//! A server on its own thread, with its statistics forwarded over a channel,
//! [`SharedBytes`], a handler for tests and benches that need no files, and
//! [`KeptSessions`], for a server driven by `run_once` on the test's thread.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dyntftp::{
    BytesSource, FsHandler, Handler, ReadRequest, Reject, ResponseData, ServerBuilder, ServerStats,
    SessionStats, ShutdownHandle,
};

use crate::{Mode, WAIT};

/// Serves files from a root and keeps every finished session, for a server driven by
/// `run_once` on the test thread (no channel needed: read `server.handler().sessions`).
pub struct KeptSessions {
    files: FsHandler,
    /// The finished sessions, in the order they ended.
    pub sessions: Vec<SessionStats>,
}

impl KeptSessions {
    /// Serves `root` (which must exist).
    pub fn new(root: &Path) -> KeptSessions {
        KeptSessions {
            files: FsHandler::new(root).expect("the test's root"),
            sessions: Vec::new(),
        }
    }
}

impl Handler for KeptSessions {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.files.open(request)
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        self.sessions.push(stats.clone());
    }
}

/// What the forwarding handler reports, in the order the server produced it.
#[derive(Debug)]
pub enum Event {
    /// A finished session.
    Session(Box<SessionStats>),
    /// A statistics report.
    Server(Box<ServerStats>),
}

/// Wraps a handler and forwards both statistics callbacks over a channel.
pub struct Forward {
    inner: Box<dyn Handler>,
    events: Sender<Event>,
}

impl Handler for Forward {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.inner.open(request)
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        self.inner.session_finished(stats);
        let _ = self.events.send(Event::Session(Box::new(stats.clone())));
    }

    fn server_stats(&mut self, stats: &ServerStats) {
        self.inner.server_stats(stats);
        let _ = self.events.send(Event::Server(Box::new(stats.clone())));
    }
}

/// A handler that serves the same bytes under every name, without copying them: each
/// session gets a [`BytesSource`] on a clone of the `Arc`.
pub struct SharedBytes(pub Arc<[u8]>);

impl Handler for SharedBytes {
    fn open(&mut self, _: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        Ok(Box::new(BytesSource::new(self.0.clone())))
    }
}

/// The builder a test's `configure` closure adjusts.
pub type Builder = ServerBuilder<Forward>;

/// A server running on its own thread. Dropping it shuts the server down and joins it.
pub struct ServerGuard {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Where it answers from.
    pub mode: Mode,
    /// Stops it.
    pub handle: ShutdownHandle,
    events: Receiver<Event>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// Events received while waiting for the other kind.
    sessions: Vec<SessionStats>,
    reports: Vec<ServerStats>,
}

/// Starts a server in `mode` bound to `bind` whose handler `make` builds on the server
/// thread (so it need not be `Send`). `configure` adjusts the builder after the test
/// defaults (shutdown grace 300 ms; adaptive retransmission off, so that the fixed timer
/// schedule makes the exact packet sequences these tests assert independent of how fast
/// the test client runs — tests of adaptive retransmission turn it back on).
pub fn spawn_server<M, C>(mode: Mode, bind: SocketAddr, make: M, configure: C) -> ServerGuard
where
    M: FnOnce() -> Box<dyn Handler> + Send + 'static,
    C: FnOnce(Builder) -> Builder + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let (events_tx, events_rx) = mpsc::channel();
    let thread = thread::Builder::new()
        .name(format!("server-{bind}"))
        .spawn(move || {
            let handler = Forward {
                inner: make(),
                events: events_tx,
            };
            let builder = ServerBuilder::new(handler)
                .bind(bind)
                .shutdown_grace(Duration::from_millis(300))
                .adaptive_timeout(false)
                .single_port(mode.is_single_port());
            match configure(builder).build() {
                Ok(mut server) => {
                    let _ = ready_tx.send(Ok((server.local_addr(), server.shutdown_handle())));
                    server.run().map_err(|e| e.to_string())
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    Err(e.to_string())
                }
            }
        })
        .expect("spawn server thread");
    let (addr, handle) = match ready_rx.recv_timeout(WAIT) {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => panic!("server failed to build on {bind}: {e}"),
        Err(e) => panic!("server on {bind} did not start: {e}"),
    };
    ServerGuard {
        addr,
        mode,
        handle,
        events: events_rx,
        thread: Some(thread),
        sessions: Vec::new(),
        reports: Vec::new(),
    }
}

/// An [`FsHandler`] server on `root`, with the test defaults.
pub fn spawn_fs(mode: Mode, bind: SocketAddr, root: &Path) -> ServerGuard {
    spawn_fs_with(mode, bind, root, |b| b)
}

/// An [`FsHandler`] server on `root`, configured by `configure`.
pub fn spawn_fs_with<C>(mode: Mode, bind: SocketAddr, root: &Path, configure: C) -> ServerGuard
where
    C: FnOnce(Builder) -> Builder + Send + 'static,
{
    let root = root.to_path_buf();
    spawn_server(
        mode,
        bind,
        move || Box::new(FsHandler::new(root).expect("FsHandler::new")),
        configure,
    )
}

impl ServerGuard {
    /// The port it listens on (for a wildcard listener, to pair with an address of your
    /// choice).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn recv_event(&self, deadline: Instant, what: &str) -> Event {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(left) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("server thread ended while waiting for {what}")
            }
        }
    }

    /// The next finished session (waits up to [`WAIT`]).
    pub fn next_session(&mut self) -> SessionStats {
        if !self.sessions.is_empty() {
            return self.sessions.remove(0);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.recv_event(deadline, "a finished session") {
                Event::Session(s) => return *s,
                Event::Server(r) => self.reports.push(*r),
            }
        }
    }

    /// The next `n` finished sessions.
    pub fn sessions(&mut self, n: usize) -> Vec<SessionStats> {
        (0..n).map(|_| self.next_session()).collect()
    }

    /// The next finished session of `peer`. The sessions of other peers reported before it
    /// are passed over, each after a call of `others`, which asserts what the test expects
    /// of them.
    #[track_caller]
    pub fn session_of(
        &mut self,
        peer: SocketAddr,
        mut others: impl FnMut(&SessionStats),
    ) -> SessionStats {
        for _ in 0..1000 {
            let stats = self.next_session();
            if stats.peer == peer {
                return stats;
            }
            others(&stats);
        }
        panic!("no session of {peer}");
    }

    /// Waits for the next server statistics report produced *after* every event already
    /// received, and returns every report received so far (that one included), in order.
    pub fn reports_until_next(&mut self) -> Vec<ServerStats> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.recv_event(deadline, "a server stats report") {
                Event::Session(s) => self.sessions.push(*s),
                Event::Server(r) => {
                    self.reports.push(*r);
                    return std::mem::take(&mut self.reports);
                }
            }
        }
    }

    /// Asks the server to shut down (returns at once).
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// Waits (bounded) for the server thread to return and gives run()'s result.
    pub fn join(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                // Leave it detached; the test fails.
                return Err("server thread did not stop within 10 s".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err("server thread panicked".into()),
        }
    }

    /// Shuts down, joins, and returns every event not consumed yet.
    pub fn stop(mut self) -> (Vec<SessionStats>, Vec<ServerStats>) {
        self.shutdown();
        let result = self.join();
        assert_eq!(result, Ok(()), "server run() result");
        let mut sessions = std::mem::take(&mut self.sessions);
        let mut reports = std::mem::take(&mut self.reports);
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Session(s) => sessions.push(*s),
                Event::Server(r) => reports.push(*r),
            }
        }
        (sessions, reports)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.handle.shutdown();
        let result = self.join();
        if !thread::panicking() {
            if let Err(e) = result {
                panic!("server shutdown: {e}");
            }
        }
    }
}

/// Sums counters of several reports (gauges and intervals are not summed).
pub fn sum_reports(reports: &[ServerStats]) -> ServerStats {
    let mut total = ServerStats::default();
    for r in reports {
        total.merge(r);
    }
    total.interval = Duration::ZERO;
    total.active_sessions = 0;
    total
}
