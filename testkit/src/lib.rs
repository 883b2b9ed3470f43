//! Test and bench support for dyntftp and dyntftpd, shared by `tests/`, `bench/` and
//! `dyntftpd/tests/` as a dev-dependency.
//!
//! - [`files`]: temporary roots with the standard test files, deterministic contents.
//! - [`server`]: a server on its own thread, its statistics forwarded over a channel; a
//!   handler that serves one buffer under every name ([`SharedBytes`]).
//! - [`client`]: the library's sans-IO read client ([`dyntftp::client::ReadTransfer`])
//!   over a blocking socket: the loop ([`drive`]), the test client built on it ([`Client`],
//!   [`fetch`]), and hand-made datagrams ([`Raw`]).
//! - [`real`]: real client programs (curl, tftp-hpa, atftp), run with a deadline.
//! - [`rng`]: the one seeded pseudo-random generator.
//! - [`sys`]: the descriptor limit, descriptor count, CPU time, resident memory.
//! - [`net`]: loopback addresses.
//! - [`netns`]: network namespaces and the processes run in them, killed and deleted on
//!   drop (the firmware netboot tests).
//! - [`pcap`]: the UDP datagrams of a packet capture (qemu's `filter-dump`).
//! - [`cgroup`]: a CPU quota for a test's processes (firmware starved of CPU).
//!
//! Every socket has a read timeout ([`WAIT`]): a broken server fails a test, never hangs
//! it.
//!
//! The black-box suites run against servers in both [`Mode`]s: each such test is a function
//! of the mode, and [`both_modes!`] makes it two tests.
//!
//! `testkit` depends on `dyntftp` and is a dev-dependency of it: fine for `tests/`,
//! `bench/` and `examples/`, but unit tests inside the library must not use it with
//! dyntftp types (they would see a second copy of the crate).

use std::time::Duration;

pub mod cgroup;
pub mod client;
pub mod daemon;
pub mod files;
pub mod net;
pub mod netns;
pub mod pcap;
pub mod real;
pub mod rng;
pub mod server;
pub mod sys;

pub use cgroup::CpuQuota;
pub use client::*;
pub use daemon::{free_udp_port, Daemon};
pub use files::*;
pub use net::*;
pub use netns::*;
pub use real::*;
pub use rng::Rng;
pub use server::*;

/// Read timeout of every test socket, and how long a test waits for any event.
pub const WAIT: Duration = Duration::from_secs(5);

/// Where a server answers from, and so what the test client expects: each session from a
/// new socket (RFC 1350's transfer IDs), or every session from the listening port
/// ([`ServerBuilder::single_port`](dyntftp::ServerBuilder::single_port)). Not to be
/// confused with [`dyntftp::Mode`], the transfer mode (octet, netascii).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each session answers from a socket of its own (a new port).
    OwnPort,
    /// Every session answers from the listening socket.
    SinglePort,
}

impl Mode {
    /// True for [`Mode::SinglePort`].
    pub fn is_single_port(self) -> bool {
        self == Mode::SinglePort
    }
}

/// Makes a test of each mode from a function `fn name(mode: Mode)`: a module `name` with
/// the tests `own_port` and `single_port`, so `cargo test name::` runs both,
/// `cargo test ::single_port` every single-port test.
///
/// Write it next to the function:
///
/// ```
/// use testkit::{both_modes, Mode};
///
/// both_modes!(serves_small);
/// fn serves_small(mode: Mode) {
///     // spawn_fs(mode, …), Client::new(mode, …), …
///     # let _ = mode;
/// }
/// # fn main() {}
/// ```
///
/// Several names may be given at once. A function left out of every `both_modes!` is never
/// called, and the `dead_code` lint says so.
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn own_port() {
                    super::$name($crate::Mode::OwnPort);
                }

                #[test]
                fn single_port() {
                    super::$name($crate::Mode::SinglePort);
                }
            }
        )+
    };
}

/// Polls `check` until it returns `Some`, for at most `wait` (every 25 ms): for what a
/// test can only observe from outside, such as a child process's log file.
pub fn eventually<T>(
    what: &str,
    wait: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}
