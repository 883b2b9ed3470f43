//! Several event loops on the same addresses ([`Workers`], SO_REUSEPORT), and the
//! [`ShutdownHandle`] that stops one loop or all of them from any thread. A loop is
//! prepared (poll, listeners, waker: all `Send`) on the building thread and run on its
//! own.

use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use log::warn;
use mio::net::UdpSocket;
use mio::{Interest, Poll, Token, Waker};

use crate::handler::Handler;
use crate::limit::SharedClientLimits;
use crate::stats::ServerStats;
use crate::sys;

use super::admission::RATE_LIMITER_CLIENTS;
use super::builder::{Error, ServerBuilder, Settings};
use super::transport::Listener;
use super::wake::PreciseWake;
use super::{Server, LISTENER_BASE, TIMER, WAKER};

impl<H: Handler + Clone + Send + 'static> ServerBuilder<H> {
    /// Builds `n` independent servers, each with its own event loop, listeners bound with
    /// SO_REUSEPORT to the same addresses, and a clone of the handler; run them with
    /// [`Workers::run`], one thread each. The kernel hands all datagrams of one client
    /// address and port to the same worker, so its retransmitted requests and (in
    /// single-port mode) its ACKs reach the worker that has its session. The only state
    /// shared on the packet path is the per-client limits (request-rate buckets and
    /// session counts, in sharded mutexes), so that a client spread over the workers
    /// meets the same limits as with one.
    ///
    /// What a handler must provide: `Clone + Send + 'static`. Each worker calls `open`
    /// and `session_finished` on its own clone; state the clones must share (a cache, a
    /// connection pool) goes behind an `Arc`. `server_stats` is called on worker 0's
    /// clone only, with the counters of every worker added up (each worker's counters
    /// join the first report worker 0 makes after them). `max_sessions` and
    /// `window_memory` are divided between the workers. Inherited sockets ([`socket`](Self::socket)) cannot be
    /// shared by several workers: give addresses to bind.
    pub fn build_workers(mut self, n: usize) -> Result<Workers<H>, Error> {
        if n == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        if n == 1 {
            self.validate()?;
            self.resolve_busy_poll(1);
            let max_sessions = self.resolved_max_sessions();
            let sockets = self.bind_all(false)?;
            return Ok(Workers {
                loops: vec![PreparedLoop::new(
                    self.handler,
                    sockets,
                    self.settings,
                    max_sessions,
                )?],
            });
        }
        if !self.sockets.is_empty() {
            return Err(Error::Config(
                "several workers need addresses to bind (SO_REUSEPORT); an inherited \
                 socket cannot be shared by them"
                    .into(),
            ));
        }
        self.validate()?;
        self.resolve_busy_poll(n);
        let total = self.resolved_max_sessions();
        let per_worker = (total / n).max(1);
        let settings = self.settings.per_worker(n);
        let (stats_tx, stats_rx) = mpsc::channel();
        let client_limits =
            SharedClientLimits::new(self.settings.request_rate, RATE_LIMITER_CLIENTS);
        let mut stats_rx = Some(stats_rx);
        let mut loops = Vec::with_capacity(n);
        // The first worker resolves port 0; the others bind exactly what it got.
        let mut addrs = self.addrs.clone();
        for worker in 0..n {
            let mut sockets = Vec::with_capacity(addrs.len());
            for addr in &addrs {
                let socket = sys::bind_listener(*addr, true).map_err(|source| Error::Bind {
                    addr: *addr,
                    source,
                })?;
                sockets.push(socket);
            }
            if worker == 0 {
                addrs = sockets
                    .iter()
                    .map(|s| s.local_addr())
                    .collect::<io::Result<_>>()?;
            }
            let mut prepared =
                PreparedLoop::new(self.handler.clone(), sockets, settings, per_worker)?;
            prepared.client_limits = Some(client_limits.clone());
            if worker == 0 {
                prepared.stats_from_workers = stats_rx.take();
            } else {
                prepared.stats_to_worker_0 = Some(stats_tx.clone());
            }
            loops.push(prepared);
        }
        Ok(Workers { loops })
    }
}

/// A server's event loop before it runs: the poll, the registered listeners and the
/// waker, but no session yet — all of it `Send`, so [`Workers`] can build it on one
/// thread and run it on another.
pub(super) struct PreparedLoop<H> {
    pub(super) poll: Poll,
    pub(super) listeners: Vec<Listener>,
    pub(super) waker: Arc<Waker>,
    pub(super) precise_wake: PreciseWake,
    pub(super) shutdown: Arc<AtomicBool>,
    pub(super) handler: H,
    pub(super) settings: Settings,
    pub(super) max_sessions: usize,
    /// Worker 0 of several: the other workers' statistics, added to its reports.
    pub(super) stats_from_workers: Option<mpsc::Receiver<ServerStats>>,
    /// Another worker: its statistics go to worker 0 instead of the handler.
    pub(super) stats_to_worker_0: Option<mpsc::Sender<ServerStats>>,
    /// One of several workers: the per-client limits they share.
    pub(super) client_limits: Option<SharedClientLimits>,
}

/// Socket buffer sizes asked for in single-port mode (the kernel caps them at
/// `net.core.rmem_max` / `wmem_max`).
const SINGLE_PORT_BUFFER: usize = 8 << 20;
/// Receive buffer asked for on a listener (same cap).
const LISTENER_BUFFER: usize = 8 << 20;

impl<H> PreparedLoop<H> {
    /// The loop for bound listeners (non-blocking, destination reporting on).
    pub(super) fn new(
        handler: H,
        std_sockets: Vec<StdUdpSocket>,
        settings: Settings,
        max_sessions: usize,
    ) -> Result<PreparedLoop<H>, Error> {
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        for (i, socket) in std_sockets.into_iter().enumerate() {
            let local = socket.local_addr()?;
            let mut socket = UdpSocket::from_std(socket);
            poll.registry()
                .register(&mut socket, Token(LISTENER_BASE - i), Interest::READABLE)?;
            if settings.single_port {
                // Every session's ACKs and DATA share these buffers.
                let _ = sys::set_recv_buffer(&socket, SINGLE_PORT_BUFFER);
                let _ = sys::set_send_buffer(&socket, SINGLE_PORT_BUFFER);
            } else {
                // A boot storm's requests arrive in one burst: room for thousands of them
                // (a small datagram takes about 1 KiB of buffer).
                let _ = sys::set_recv_buffer(&socket, LISTENER_BUFFER);
            }
            listeners.push(Listener {
                socket,
                v6: local.is_ipv6(),
                local,
                readable: true,
            });
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let precise_wake = PreciseWake::new(poll.registry(), TIMER)?;
        Ok(PreparedLoop {
            poll,
            listeners,
            waker,
            precise_wake,
            shutdown: Arc::new(AtomicBool::new(false)),
            handler,
            settings,
            max_sessions,
            stats_from_workers: None,
            stats_to_worker_0: None,
            client_limits: None,
        })
    }
}

/// Stops a running [`Server`] from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    /// One flag and waker per event loop (several for [`Workers`]).
    pub(super) loops: Arc<[(Arc<AtomicBool>, Arc<Waker>)]>,
}

impl ShutdownHandle {
    /// Asks the server (every worker) to stop: it stops accepting requests at once, lets
    /// running sessions finish within the shutdown grace, then aborts the rest and `run`
    /// returns.
    pub fn shutdown(&self) {
        for (flag, waker) in self.loops.iter() {
            flag.store(true, Ordering::SeqCst);
            if let Err(e) = waker.wake() {
                warn!("cannot wake the event loop: {e}");
            }
        }
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let requested = self
            .loops
            .iter()
            .any(|(flag, _)| flag.load(Ordering::SeqCst));
        f.debug_struct("ShutdownHandle")
            .field("loops", &self.loops.len())
            .field("requested", &requested)
            .finish()
    }
}

/// Several servers on the same addresses, one event loop and thread each (see
/// [`ServerBuilder::build_workers`]).
pub struct Workers<H> {
    loops: Vec<PreparedLoop<H>>,
}

impl<H: Handler + Send + 'static> Workers<H> {
    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.loops.len()
    }

    /// Always false: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.loops.is_empty()
    }

    /// The addresses every worker listens on (with real ports when bound to port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.loops[0].listeners.iter().map(|l| l.local).collect()
    }

    /// The most sessions all workers run at once.
    pub fn max_sessions(&self) -> usize {
        self.loops.iter().map(|l| l.max_sessions).sum()
    }

    /// A handle that stops every worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            loops: self
                .loops
                .iter()
                .map(|l| (l.shutdown.clone(), l.waker.clone()))
                .collect(),
        }
    }

    /// Runs worker 0 on this thread and every other worker on a thread of its own, until
    /// all have shut down. Returns the first error; a worker that fails makes the others
    /// stop too.
    pub fn run(self) -> Result<(), Error> {
        let stop = self.shutdown_handle();
        let mut loops = self.loops.into_iter();
        let Some(first) = loops.next() else {
            return Ok(());
        };
        let mut threads = Vec::new();
        for (i, prepared) in loops.enumerate() {
            let stop_all = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dyntftp-worker-{}", i + 1))
                .spawn(move || {
                    let result = Server::start(prepared).run();
                    if result.is_err() {
                        stop_all.shutdown();
                    }
                    result
                })
                .map_err(Error::Io);
            match thread {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop.shutdown();
                    return Err(e);
                }
            }
        }
        let mut first = Server::start(first);
        let mut result = first.run_loop();
        if result.is_err() {
            stop.shutdown();
        }
        for thread in threads {
            let joined = thread.join().unwrap_or(Err(Error::WorkerPanicked));
            if result.is_ok() {
                result = joined;
            }
        }
        // Every other worker has made its last report: the last one covers them all.
        first.report_stats();
        result
    }
}
