//! dyntftp: a framework for dynamic TFTP servers (RFC 1350, 2347, 2348, 2349 and 7440;
//! read requests only), on one single-threaded `mio` event loop.
//!
//! You plug in a [`Handler`] that decides, per request, where the bytes come from — a
//! file, a configuration generated for that client, a stream — and receives per-session
//! and server-wide statistics. The server multiplexes every session on one thread: each
//! session is a small state machine kept in a slab, retransmissions are driven by a timer
//! wheel, and no process or thread is started per client.
//!
//! ```no_run
//! use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData, ServerBuilder};
//!
//! struct Hello;
//!
//! impl Handler for Hello {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         let text = format!("hello {}\n", req.peer.ip());
//!         Ok(Box::new(BytesSource::new(text.into_bytes())))
//!     }
//! }
//!
//! let mut server = ServerBuilder::new(Hello).bind("127.0.0.1:6969".parse()?).build()?;
//! server.run()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! To serve a directory, use [`FsHandler`], which confines every request to its root.
//!
//! # Layout
//!
//! ```text
//!  UDP datagrams ─▶ server   the driver: mio Poll, sockets, slab, timer wheel, clock
//!                      │ parse ▲ bytes to send
//!                      ▼       │
//!                  packet    wire format: borrowed views, encode/parse, never panics
//!                      │
//!                      ▼
//!                  options   RFC 2347/2348/2349/7440 negotiation under server limits
//!                      │
//!                      ▼
//!                  session   one read transfer as a pure state machine (no I/O, no clock)
//!                      │ read blocks
//!                      ▼
//!                  response  ResponseData trait + file/bytes/reader sources, netascii
//!                  handler   Handler trait: per-request factory + stats hooks
//!                  fs        FsHandler: a root directory, confined with openat2
//!                  timer     hashed timer wheel keyed by session (no clock reads)
//!                  stats     TransferStats, SessionStats, ServerStats
//! ```
//!
//! Only [`server`] touches mio, sockets or the clock. Everything below it takes
//! `now: Instant` as a parameter and returns what to do, so a [`Session`] can be driven by
//! a virtual clock and a simulated lossy network (see `tests/sim.rs`).

pub mod fs;
pub mod handler;
pub mod options;
pub mod packet;
pub mod remap;
pub mod response;
pub mod server;
pub mod session;
pub mod stats;
pub mod stream;
mod sys;
pub mod timer;

pub use fs::{CacheStats, FsHandler};
pub use handler::{Handler, Notifier, ReadRequest, Reject};
pub use options::{Limits, Negotiated};
pub use packet::{ErrorCode, Mode, Packet, ParseError};
pub use remap::{Remap, Rules};
pub use response::{BytesSource, FileSource, Netascii, ReaderSource, ResponseData};
pub use server::{Error, Server, ServerBuilder, ShutdownHandle};
pub use session::{Outcome, Output, Session, SessionConfig};
pub use stats::{ServerStats, SessionStats, TransferStats};
pub use stream::{StreamSource, StreamWriter};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
