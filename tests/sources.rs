//! Misbehaving sources over loopback: a `ResponseData` that fails midway, lies about its
//! size, panics, or never becomes ready. Each ends its own session the documented way and
//! the server goes on serving everyone else. Also `FsHandler`'s hot-file cache under a
//! flood of requests whose sessions stay alive: its memory stays within its budget.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dyntftp::{FsHandler, Handler, Outcome, ReadRequest, Reject, ResponseData, SessionStats};
use testkit::*;

/// How a [`Liar`] misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `read` fails with this kind after `after` bytes.
    ReadError { after: usize, kind: io::ErrorKind },
    /// `size()` announces this many bytes; the data is `real` bytes.
    WrongSize { announced: u64, real: usize },
    /// `read` panics after `after` bytes.
    PanicInRead { after: usize },
    /// `size()` panics.
    PanicInSize,
    /// Dropping the source panics.
    PanicInDrop,
    /// `read` returns `WouldBlock` forever after `after` bytes (never notifies).
    StallAfter { after: usize },
    /// `read` returns `Interrupted` forever after `after` bytes.
    InterruptedAfter { after: usize },
}

/// A source of `len` pseudo-random bytes (seed 7) with one fault.
struct Liar {
    data: Vec<u8>,
    pos: usize,
    fault: Fault,
    reads: Arc<AtomicU64>,
}

impl ResponseData for Liar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        match self.fault {
            Fault::ReadError { after, kind } if self.pos >= after => {
                return Err(io::Error::new(
                    kind,
                    "the source broke (expected by the test)",
                ))
            }
            Fault::PanicInRead { after } if self.pos >= after => {
                panic!("read panicked (expected by the test)")
            }
            Fault::StallAfter { after } if self.pos >= after => {
                return Err(io::ErrorKind::WouldBlock.into())
            }
            Fault::InterruptedAfter { after } if self.pos >= after => {
                return Err(io::ErrorKind::Interrupted.into())
            }
            _ => {}
        }
        let limit = match self.fault {
            Fault::ReadError { after, .. }
            | Fault::PanicInRead { after }
            | Fault::StallAfter { after }
            | Fault::InterruptedAfter { after } => after.min(self.data.len()),
            _ => self.data.len(),
        };
        let n = buf.len().min(limit - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    fn size(&self) -> Option<u64> {
        match self.fault {
            Fault::WrongSize { announced, .. } => Some(announced),
            Fault::PanicInSize => panic!("size panicked (expected by the test)"),
            _ => Some(self.data.len() as u64),
        }
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        if matches!(self.fault, Fault::PanicInDrop) && !std::thread::panicking() {
            panic!("drop panicked (expected by the test)");
        }
    }
}

/// Serves `small.txt` normally and, for any other name, the [`Liar`] whose fault the
/// filename names (see [`fault_for`]).
struct Liars {
    reads: Arc<AtomicU64>,
    /// Server-thread CPU time when the last liar was opened and when the last session
    /// finished, with the wall-clock instants.
    cpu: Arc<std::sync::Mutex<CpuMarks>>,
}

#[derive(Default, Debug, Clone, Copy)]
struct CpuMarks {
    opened: Option<(Instant, Duration)>,
    finished: Option<(Instant, Duration)>,
}

fn fault_for(name: &[u8]) -> Option<(Fault, usize)> {
    Some(match name {
        b"read-error-midway" => (
            Fault::ReadError {
                after: 3000,
                kind: io::ErrorKind::Other,
            },
            10_000,
        ),
        b"read-error-at-once" => (
            Fault::ReadError {
                after: 0,
                kind: io::ErrorKind::PermissionDenied,
            },
            10_000,
        ),
        b"read-error-at-block-boundary" => (
            Fault::ReadError {
                after: 1024,
                kind: io::ErrorKind::UnexpectedEof,
            },
            10_000,
        ),
        b"size-too-big" => (
            Fault::WrongSize {
                announced: 100_000,
                real: 5000,
            },
            5000,
        ),
        b"size-too-small" => (
            Fault::WrongSize {
                announced: 1000,
                real: 5000,
            },
            5000,
        ),
        b"size-zero-but-data" => (
            Fault::WrongSize {
                announced: 0,
                real: 1536,
            },
            1536,
        ),
        b"size-right" => (
            Fault::WrongSize {
                announced: 5000,
                real: 5000,
            },
            5000,
        ),
        b"panic-in-read-at-once" => (Fault::PanicInRead { after: 0 }, 5000),
        b"panic-in-read-midway" => (Fault::PanicInRead { after: 2048 }, 5000),
        b"panic-in-size" => (Fault::PanicInSize, 5000),
        b"panic-in-drop" => (Fault::PanicInDrop, 5000),
        b"stall-at-once" => (Fault::StallAfter { after: 0 }, 5000),
        b"stall-midway" => (Fault::StallAfter { after: 1024 }, 5000),
        b"interrupted-at-once" => (Fault::InterruptedAfter { after: 0 }, 5000),
        b"interrupted-midway" => (Fault::InterruptedAfter { after: 1024 }, 5000),
        _ => return None,
    })
}

impl Handler for Liars {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        if req.filename == b"small.txt" {
            return Ok(Box::new(dyntftp::BytesSource::new(SMALL.to_vec())));
        }
        let Some((fault, len)) = fault_for(req.filename) else {
            return Err(Reject::not_found());
        };
        let len = match fault {
            Fault::WrongSize { real, .. } => real,
            _ => len,
        };
        self.cpu.lock().unwrap().opened = Some((Instant::now(), sys::thread_cpu()));
        Ok(Box::new(Liar {
            data: pseudo_random(len, 7),
            pos: 0,
            fault,
            reads: self.reads.clone(),
        }))
    }

    fn session_finished(&mut self, _stats: &SessionStats) {
        self.cpu.lock().unwrap().finished = Some((Instant::now(), sys::thread_cpu()));
    }
}

struct Liarsrv {
    server: ServerGuard,
    reads: Arc<AtomicU64>,
    cpu: Arc<std::sync::Mutex<CpuMarks>>,
}

fn spawn_liars(mode: Mode, configure: impl FnOnce(Builder) -> Builder + Send + 'static) -> Liarsrv {
    let reads = Arc::new(AtomicU64::new(0));
    let cpu = Arc::new(std::sync::Mutex::new(CpuMarks::default()));
    let (r, c) = (reads.clone(), cpu.clone());
    let server = spawn_server(
        mode,
        v4(),
        move || Box::new(Liars { reads: r, cpu: c }),
        move |b| configure(b.stats_interval(Duration::from_millis(50))),
    );
    Liarsrv { server, reads, cpu }
}

/// The next finished session of `peer`. The only other sessions a case leaves behind are
/// the `small.txt` fetches of [`assert_still_serves`], which may be reported first; any
/// other is a failure.
#[track_caller]
fn session_of(server: &mut ServerGuard, peer: SocketAddr) -> SessionStats {
    server.session_of(peer, |other| {
        assert_eq!(
            other.filename, "small.txt",
            "an unexpected session: {other:?}"
        )
    })
}

#[track_caller]
fn assert_still_serves(server: &mut ServerGuard, case: &str) {
    let client = Client::new(server.mode, server.addr);
    let got = client
        .fetch(server.addr, "small.txt", "octet", &[])
        .unwrap_or_else(|e| panic!("{case}: no longer serving: {e:?}"));
    assert_eq!(got.data, SMALL, "{case}");
    assert_eq!(
        session_of(server, client.local_addr()).outcome,
        Outcome::Completed,
        "{case}"
    );
}

both_modes!(read_error_midway_is_error_0_and_recorded);
fn read_error_midway_is_error_0_and_recorded(mode: Mode) {
    let mut s = spawn_liars(mode, |b| b);
    // A PermissionDenied error keeps its meaning (ERROR 2); any other is ERROR 0.
    for (name, bytes_before, code) in [
        ("read-error-midway", 3000usize, 0),
        ("read-error-at-once", 0, 2),
        ("read-error-at-block-boundary", 1024, 0),
    ] {
        let client = Client::new(mode, s.server.addr);
        let mut received = 0;
        let err = client
            .fetch_with(s.server.addr, name.as_bytes(), "octet", &[], &mut |p| {
                received = p.bytes
            })
            .unwrap_err();
        assert_eq!(err.code(), Some(code), "{name}: {err:?}");
        // Every full block before the failure was delivered.
        assert_eq!(received, bytes_before / 512 * 512, "{name}");
        let stats = session_of(&mut s.server, client.local_addr());
        assert_eq!(stats.outcome, Outcome::ReadFailed, "{name}");
        assert!(!stats.outcome.is_success());
        assert_eq!(
            stats
                .transfer
                .error_sent
                .as_ref()
                .map(|(code, _)| code.to_u16()),
            Some(code),
            "{name}"
        );
        assert_eq!(stats.transfer.errors_sent, 1);
        // Counted in whole blocks: the part of a block read before the error is not.
        assert_eq!(
            stats.transfer.bytes_read as usize,
            bytes_before / 512 * 512,
            "{name}"
        );
        assert_eq!(
            stats.transfer.size_mismatch, None,
            "a failure is not a mismatch"
        );
        assert_still_serves(&mut s.server, name);
    }
    let total = sum_reports(&s.server.reports_until_next());
    assert_eq!(total.sessions_finished.get("read_failed"), Some(&3));
    assert_eq!(total.sessions_failed(), 3);
}

both_modes!(wrong_size_transfers_the_real_data_and_records_the_mismatch);
fn wrong_size_transfers_the_real_data_and_records_the_mismatch(mode: Mode) {
    let mut s = spawn_liars(mode, |b| b);
    for (name, announced, real, mismatch) in [
        ("size-too-big", 100_000u64, 5000usize, true),
        ("size-too-small", 1000, 5000, true),
        ("size-zero-but-data", 0, 1536, true),
        ("size-right", 5000, 5000, false),
    ] {
        for options in [&[("tsize", "0")][..], &[]] {
            let case = format!("{name} {options:?}");
            let client = Client::new(mode, s.server.addr);
            let got = client
                .fetch(s.server.addr, name, "octet", options)
                .unwrap_or_else(|e| panic!("{case}: {e:?}"));
            assert!(got.data == pseudo_random(real, 7), "{case}: the real data");
            if !options.is_empty() {
                // The client was told the announced size: that is what the source said.
                assert_eq!(
                    got.oack_value("tsize"),
                    Some(announced.to_string().as_str()),
                    "{case}"
                );
            }
            let stats = session_of(&mut s.server, client.local_addr());
            assert_eq!(stats.outcome, Outcome::Completed, "{case}");
            assert_eq!(stats.transfer.bytes_read, real as u64, "{case}");
            assert_eq!(
                stats.transfer.size_mismatch,
                mismatch.then_some(announced),
                "{case}"
            );
        }
    }
    // Netascii announces no size, so it never mismatches.
    let client = Client::new(mode, s.server.addr);
    let got = client
        .fetch(s.server.addr, "size-too-big", "netascii", &[("tsize", "0")])
        .unwrap();
    assert_eq!(got.oack, None, "no tsize is answered in netascii");
    let stats = session_of(&mut s.server, client.local_addr());
    assert_eq!(stats.transfer.size_mismatch, None);
    assert_still_serves(&mut s.server, "wrong sizes");
}

both_modes!(panicking_sources_end_their_session_only);
fn panicking_sources_end_their_session_only(mode: Mode) {
    let mut s = spawn_liars(mode, |b| b);
    for (name, outcome, bytes) in [
        ("panic-in-read-at-once", Some(Outcome::Panicked), 0),
        ("panic-in-read-midway", Some(Outcome::Panicked), 2048),
        // Session::new asks the size: the request is refused, no session starts.
        ("panic-in-size", None, 0),
    ] {
        let client = Client::new(mode, s.server.addr);
        let mut received = 0;
        let err = client
            .fetch_with(s.server.addr, name.as_bytes(), "octet", &[], &mut |p| {
                received = p.bytes
            })
            .unwrap_err();
        assert_eq!(err.code(), Some(0), "{name}: {err:?}");
        assert_eq!(received, bytes, "{name}");
        if let Some(outcome) = outcome {
            let stats = session_of(&mut s.server, client.local_addr());
            assert_eq!(stats.outcome, outcome, "{name}");
            assert_eq!(stats.transfer.bytes_read as usize, bytes, "{name}");
        }
        assert_still_serves(&mut s.server, name);
    }
    let total = sum_reports(&s.server.reports_until_next());
    assert_eq!(total.panics, 3);
    assert_eq!(total.sessions_finished.get("panicked"), Some(&2));
}

both_modes!(source_that_panics_when_dropped_does_not_take_the_server_down);
fn source_that_panics_when_dropped_does_not_take_the_server_down(mode: Mode) {
    let mut s = spawn_liars(mode, |b| b);
    let client = Client::new(mode, s.server.addr);
    let got = client
        .fetch(s.server.addr, "panic-in-drop", "octet", &[])
        .expect("the data itself is fine");
    assert!(got.data == pseudo_random(5000, 7));
    let stats = session_of(&mut s.server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_still_serves(&mut s.server, "panic in drop");
    let total = sum_reports(&s.server.reports_until_next());
    assert_eq!(total.panics, 1, "the panic is caught and counted");
}

/// Requests `name` from a source that never becomes ready and checks that the session
/// ends with SourceStalled after the source timeout, without spinning the loop.
fn stalled(mode: Mode, name: &str, bytes_before: usize) {
    let source_timeout = Duration::from_millis(1500);
    let mut s = spawn_liars(mode, move |b| {
        b.source_timeout(source_timeout)
            .timeout(Duration::from_millis(200))
    });
    let client = Client::new(mode, s.server.addr);
    let started = Instant::now();
    let mut received = 0;
    let err = client
        .fetch_with(s.server.addr, name.as_bytes(), "octet", &[], &mut |p| {
            received = p.bytes
        })
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.code(), Some(0), "{name}: {err:?}");
    assert_eq!(received, bytes_before, "{name}");
    let stats = session_of(&mut s.server, client.local_addr());
    assert_eq!(stats.outcome, Outcome::SourceStalled, "{name}");
    assert!(
        waited >= source_timeout,
        "{name}: ended after {waited:?}, before the source timeout"
    );
    let marks = *s.cpu.lock().unwrap();
    let (opened_at, cpu_opened) = marks.opened.expect("opened");
    let (finished_at, cpu_finished) = marks.finished.expect("finished");
    let wall = finished_at - opened_at;
    let cpu = cpu_finished - cpu_opened;
    let reads = s.reads.load(Ordering::Relaxed);
    eprintln!("{name}: stalled session lasted {wall:?}, server thread CPU {cpu:?}, {reads} reads");
    // A loop that spins on the stalled source would use the whole interval.
    assert!(
        cpu < wall / 10,
        "{name}: the server thread used {cpu:?} of CPU in {wall:?}: it spins"
    );
    // The source is asked again once per retransmission timeout at most, not in a loop.
    assert!(
        reads < 50,
        "{name}: the stalled source was read {reads} times"
    );
    assert_still_serves(&mut s.server, name);
}

both_modes!(source_stalled_from_the_start_ends_by_its_deadline_without_spinning);
fn source_stalled_from_the_start_ends_by_its_deadline_without_spinning(mode: Mode) {
    stalled(mode, "stall-at-once", 0);
}

both_modes!(source_stalled_midway_ends_by_its_deadline_without_spinning);
fn source_stalled_midway_ends_by_its_deadline_without_spinning(mode: Mode) {
    stalled(mode, "stall-midway", 1024);
}

both_modes!(source_interrupted_forever_stalls_instead_of_hanging_the_loop);
/// `Interrupted` means "try again", but a source that says it forever must not hold the
/// loop: after a few tries in a row it counts as not ready.
fn source_interrupted_forever_stalls_instead_of_hanging_the_loop(mode: Mode) {
    stalled(mode, "interrupted-at-once", 0);
}

both_modes!(source_interrupted_forever_midway_stalls_instead_of_hanging_the_loop);
fn source_interrupted_forever_midway_stalls_instead_of_hanging_the_loop(mode: Mode) {
    stalled(mode, "interrupted-midway", 1024);
}

both_modes!(cache_stays_within_its_budget_while_sessions_hold_copies);
/// The review's F3 scenario, scaled down (a 64 KiB budget, two 40 KiB files): requests
/// alternate between the files and none is ever acknowledged, so every session keeps its
/// copy. The cache shares one copy of the first file and serves the second from disk;
/// the bytes alive never exceed the budget, and every transfer is right.
fn cache_stays_within_its_budget_while_sessions_hold_copies(mode: Mode) {
    const BUDGET: u64 = 64 << 10;
    let dir = TempDir::new("cache-budget");
    let a = pseudo_random(40 << 10, 21);
    let b = pseudo_random(40 << 10, 22);
    dir.write("a", &a);
    dir.write("b", &b);
    // Clones share the cache: this one reads the server's counters.
    let files = FsHandler::new(dir.path()).unwrap().cache(BUDGET);
    let in_server = files.clone();
    let server = spawn_server(
        mode,
        v4(),
        move || Box::new(in_server),
        |b| {
            b.timeout(Duration::from_secs(30))
                .request_rate(None)
                .max_sessions_per_client(None)
        },
    );
    let mut silent = Vec::new();
    for i in 0..10 {
        let (name, want) = if i % 2 == 0 { ("a", &a) } else { ("b", &b) };
        let raw = Raw::new(server.addr);
        raw.rrq(server.addr, name.as_bytes(), "octet", &[]);
        let (block, data, _) = raw.expect_data();
        assert_eq!(
            (block, &data[..]),
            (1, &want[..512]),
            "request {i} for {name}"
        );
        // Never acknowledged: the session stays alive with its copy.
        silent.push(raw);
        let stats = files.cache_stats();
        assert!(stats.bytes_in_use <= BUDGET, "{stats:?}");
    }
    for (name, want) in [("a", &a), ("b", &b)] {
        let got = Client::new(mode, server.addr)
            .fetch(server.addr, name, "octet", &[])
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(&got.data, want, "{name}");
    }
    let stats = files.cache_stats();
    assert!(stats.peak_bytes_in_use <= BUDGET, "{stats:?}");
    assert_eq!(stats.loads, 1, "one copy of a, shared: {stats:?}");
    assert_eq!(stats.hits, 5, "{stats:?}");
    assert_eq!(stats.over_budget, 6, "b, from disk: {stats:?}");
    assert_eq!(stats.bytes_in_use, 40 << 10, "{stats:?}");
}
