//! dyntftp: a framework for dynamic TFTP servers (RFC 1350, 2347, 2348, 2349 and 7440;
//! read requests only), on one single-threaded `mio` event loop.
//!
//! You plug in a [`Handler`] that decides, per request, where the bytes come from — a
//! file, a configuration generated for that client, a stream — and receives per-session
//! and server-wide statistics. The server multiplexes every session on one thread: each
//! session is a small state machine kept in a slab, retransmissions are driven by a timer
//! wheel, and no process or thread is started per client.
//!
//! # 1. Serve a directory
//!
//! [`FsHandler`] serves the regular files under a root, confined to it (no `..`, absolute
//! path or symlink escape). Options add per-client roots, case-insensitive lookup and an
//! in-memory cache of hot files:
//!
//! ```no_run
//! use dyntftp::{FsHandler, ServerBuilder};
//!
//! let files = FsHandler::new("/srv/tftp")?.ignore_case(true).unique_root(true);
//! let mut server = ServerBuilder::new(files).bind("0.0.0.0:69".parse()?).build()?;
//! server.run()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! To rewrite names first (tftpd-hpa's `--map-file`), wrap any handler in a
//! [`Remap`] (see [`remap`]).
//!
//! # 2. Write a handler
//!
//! A [`Handler`] decides, per request, where the bytes come from, and receives each
//! session's [`SessionStats`] and periodic [`ServerStats`]. It runs on the event-loop
//! thread, so its methods take `&mut self` and need no locks:
//!
//! ```
//! use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData, SessionStats};
//!
//! struct Hello {
//!     served: u64,
//! }
//!
//! impl Handler for Hello {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         if req.filename != b"hello.txt" {
//!             return Err(Reject::not_found()); // ERROR 1 to the client
//!         }
//!         // Rendered for this client; BytesSource knows its size, so tsize is answered.
//!         let text = format!("hello {}, this is {}\n", req.peer.ip(), req.local.ip());
//!         Ok(Box::new(BytesSource::new(text.into_bytes())))
//!     }
//!
//!     fn session_finished(&mut self, stats: &SessionStats) {
//!         self.served += 1;
//!         println!("{} {:?}: {}", stats.peer, stats.filename, stats.outcome.as_str());
//!     }
//! }
//! # let _ = Hello { served: 0 };
//! ```
//!
//! Then `ServerBuilder::new(Hello { served: 0 }).bind(addr).build()?.run()`, or call
//! [`Server::run_once`] from your own loop. Ready sources: [`FileSource`], [`BytesSource`]
//! (shared bytes), [`ReaderSource`] (any `io::Read`), [`StreamSource`]; netascii is
//! applied by the server.
//!
//! # 3. Stream from elsewhere without blocking the loop
//!
//! One thread serves every session, so `open` and `read` must never wait for a network
//! or a slow disk. A source that has no data yet returns
//! [`io::ErrorKind::WouldBlock`](std::io::ErrorKind::WouldBlock) and wakes its session
//! with the request's [`Notifier`] when it has; [`stream::channel`] packages that: a
//! producer thread writes into a bounded buffer (blocking when the client is slower), the
//! session sends what arrives, and a failed or abandoned producer ends the transfer with
//! ERROR 0, never a truncated success:
//!
//! ```
//! use std::io::Write;
//! use dyntftp::{stream, Handler, ReadRequest, Reject, ResponseData};
//!
//! struct Upstream;
//!
//! impl Handler for Upstream {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         let (mut writer, source) = stream::channel(req.notifier, 256 * 1024);
//!         let name = req.filename_lossy().into_owned();
//!         std::thread::spawn(move || {
//!             // e.g. an HTTP GET; here, generated lines.
//!             for i in 0..10_000 {
//!                 if writeln!(writer, "{name} line {i}").is_err() {
//!                     return; // the session ended: stop producing
//!                 }
//!             }
//!             writer.finish();
//!         });
//!         Ok(Box::new(source))
//!     }
//! }
//! # let _ = Upstream;
//! ```
//!
//! A source whose size a backend must tell first (UEFI firmware needs `tsize` in the
//! first OACK) is a [`deferred::Deferred`] one: the session holds its first answer until
//! the [`deferred::Opener`] completes from another thread, with the source or a refusal.
//!
//! `examples/http_proxy.rs` does this for real, streaming each file from an HTTP
//! repository on a pool of worker threads; `examples/grub_config.rs` renders boot
//! configurations per client; `examples/static_files.rs` is fbtftp's README server.
//!
//! # Layout
//!
//! ```text
//!  UDP datagrams ─▶ server   the driver: one mio Poll loop, the clock, sockets
//!                   ├ admission what each datagram to a listener gets: limits, repeats,
//!                   │           single-port routing, waiting requests (socket-free)
//!                   ├ table     running sessions by SessionId, their timers
//!                   ├ transport how datagrams leave: own socket or listener, UDP GSO
//!                   ├ report    session and server statistics, logs, panic guard
//!                   └ builder, workers   ServerBuilder; several loops on one address
//!                      │ parse ▲ bytes to send
//!                      ▼       │
//!                  packet    wire format: borrowed views, encode/parse, never panics
//!                      │
//!                      ▼
//!                  options   RFC 2347/2348/2349/7440 negotiation under server limits
//!                      │
//!                      ▼
//!                  session   one read transfer as a pure state machine (no I/O, no clock)
//!                   └ rtt       the round-trip estimate and the early retransmission interval
//!                      │ read blocks
//!                      ▼
//!                  response  ResponseData trait + file/bytes/reader sources, netascii
//!                  stream    ResponseData fed from another thread (bounded, notifying)
//!                  deferred  a source opened later from another thread (the OACK waits)
//!                  handler   Handler trait: per-request factory + stats hooks
//!                  remap     Remap: rewrite names before a handler sees them
//!                  backend   SingleFlight, TtlCache: one backend call per key, 404s and sizes
//!                            remembered (socket-free, clock-free)
//!                  mac       MacAddr: from per-machine file names, the neighbour table
//!                  fs        FsHandler: a root directory, confined with openat2
//!                   ├ resolve   names to open files beneath the root: the two resolvers, case
//!                   └ cache     hot files held in memory, shared by the sessions sending them
//!                  stats     TransferStats, SessionStats, ServerStats
//!                  metrics   Metrics: ServerStats totals in the Prometheus text format
//!                  client    ReadTransfer: the client side of a read, a pure state machine
//!                            (tests, the simulator, load generators)
//!
//!  internal to the crate:
//!                  timer     hashed timer wheel keyed by session (no clock reads)
//!                  limit     per-client request rate and session counts; log-line limits
//!                  spin      adaptive busy polling: when to poll instead of sleeping
//!                  sys       the system calls std lacks (sockets, openat2, fd limit,
//!                            netlink neighbours): all unsafe
//! ```
//!
//! [`server`] is the driver: the only module that uses mio or reads the clock. Everything
//! below it takes `now: Instant` as a parameter and returns what to do, so a [`Session`]
//! can be driven by a virtual clock and a simulated lossy network (see `tests/sim.rs`),
//! against the sans-IO client in [`client`].
//! The system calls std does not offer (socket options, PKTINFO and GSO sends, `openat2`
//! and directory listings, the descriptor limit, the netlink neighbour dump) are in `sys`,
//! behind safe functions that `server`, `fs` and `mac` call: it is the only module with
//! `unsafe`.

pub mod backend;
pub mod client;
pub mod deferred;
pub mod family;
pub mod fs;
pub mod handler;
mod limit;
pub mod mac;
pub mod metrics;
pub mod options;
pub mod packet;
pub mod remap;
pub mod response;
pub mod server;
pub mod session;
mod spin;
pub mod stats;
pub mod stream;
mod sys;
mod timer;

pub use family::ClientFamily;
pub use fs::{CacheStats, FsHandler};
pub use handler::{Handler, Notifier, ReadRequest, Reject, SessionNotes};
pub use limit::{LogDecision, LogLimiter, Rate};
pub use mac::MacAddr;
pub use metrics::Metrics;
pub use options::{Limits, Negotiated};
pub use packet::{ErrorCode, Mode, Packet, ParseError};
pub use remap::{Remap, Rules};
pub use response::{BytesSource, FileSource, Netascii, ReaderSource, ResponseData};
pub use server::{Error, Server, ServerBuilder, ShutdownHandle, Workers};
pub use session::{Outcome, Output, Session, SessionConfig};
pub use stats::{DurationHistogram, ServerStats, SessionStats, TransferStats};
pub use stream::{StreamSource, StreamWriter};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
