//! What the server says about itself: each finished session's [`SessionStats`] (to the
//! handler and as one log line), the periodic [`ServerStats`] report (merged across
//! workers), rate-limited warnings, and the guard that keeps a panic in user code from
//! taking the loop down.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use log::info;

use crate::handler::Handler;
use crate::limit::{LogDecision, LogLimiter};
use crate::session::Outcome;
use crate::stats::{ServerStats, SessionStats, SESSION_LOG_TARGET, STATS_LOG_TARGET};

use super::table::SessionId;
use super::Server;

/// Logs a line at `level` unless `limiter` holds it back, saying first how many lines
/// it held back since the last one.
pub(super) fn log_limited(
    limiter: &mut LogLimiter,
    now: Instant,
    level: log::Level,
    args: fmt::Arguments<'_>,
) {
    if let LogDecision::Log { suppressed } = limiter.check(now) {
        if suppressed > 0 {
            log::log!(level, "({suppressed} similar messages suppressed)");
        }
        log::log!(level, "{args}");
    }
}

/// Runs user code (the handler, a source) so that a panic in it ends nothing but what it
/// was doing: the panic is counted in [`ServerStats::panics`] and logged, rate-limited.
pub(super) struct UserCode {
    log: LogLimiter,
}

/// Writes what panicked, for the log line; called only when something did, so that the
/// loop formats nothing on its way.
pub(super) trait Describe: Fn(&mut fmt::Formatter<'_>) -> fmt::Result {}

impl<F: Fn(&mut fmt::Formatter<'_>) -> fmt::Result> Describe for F {}

/// A [`Describe`] as `Display`.
struct Described<D>(D);

impl<D: Describe> fmt::Display for Described<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (self.0)(f)
    }
}

impl UserCode {
    pub(super) fn new() -> UserCode {
        // Ten lines a minute at most: enough to see what happens.
        UserCode {
            log: LogLimiter::new(Duration::from_secs(60), 10),
        }
    }

    /// Runs `f`; `None` when it panicked, which is logged as `what` panicked.
    pub(super) fn run<T>(
        &mut self,
        stats: &mut ServerStats,
        now: Instant,
        what: impl Describe,
        f: impl FnOnce() -> T,
    ) -> Option<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(value) => Some(value),
            Err(_) => {
                stats.panics += 1;
                log_limited(
                    &mut self.log,
                    now,
                    log::Level::Error,
                    format_args!("{} panicked", Described(what)),
                );
                None
            }
        }
    }

    /// Drops `value` (a source, or a session holding one): its `Drop` is user code too.
    pub(super) fn drop<T>(
        &mut self,
        stats: &mut ServerStats,
        now: Instant,
        what: impl Describe,
        value: T,
    ) {
        self.run(stats, now, what, move || drop(value));
    }
}

impl<H: Handler> Server<H> {
    /// Ends session `id`: frees its slot, reports its statistics.
    pub(super) fn finish(&mut self, id: SessionId, outcome: Outcome) {
        let Some(entry) = self.table.remove(id) else {
            return;
        };
        // The session's own socket is closed when the entry drops, which also takes it
        // out of the epoll set (the descriptor is never shared): no deregistration call,
        // one system call fewer per session.
        self.admission.session_ended(entry.request.peer);
        *self
            .stats
            .sessions_finished
            .entry(outcome.as_str())
            .or_default() += 1;
        let transfer = entry.session.stats().clone();
        let request = entry.request;
        self.user_code.drop(
            &mut self.stats,
            self.now,
            |f| {
                let (peer, filename) = (request.peer, &request.filename);
                write!(f, "{peer}: dropping the source of {filename:?}")
            },
            entry.session,
        );
        let stats = SessionStats {
            peer: request.peer,
            local: request.local,
            filename: request.filename,
            mode: request.mode,
            requested: request.options,
            start_time: request.start_time,
            duration: transfer.duration(self.now),
            outcome,
            transfer,
        };
        self.stats.session_durations.record(stats.duration);
        log_session(&stats);
        let handler = &mut self.handler;
        self.user_code.run(
            &mut self.stats,
            self.now,
            |f| f.write_str("the handler's session_finished"),
            || handler.session_finished(&stats),
        );
    }

    /// Reports the statistics since the last report: to the handler or, on a worker other
    /// than the first, to worker 0, which adds them to its next report.
    pub(super) fn report_stats(&mut self) {
        let mut stats = std::mem::take(&mut self.stats);
        stats.interval = self.now.saturating_duration_since(self.stats_since);
        stats.active_sessions = self.table.len() as u64;
        self.stats_since = self.now;
        if let Some(worker_0) = &self.stats_to_worker_0 {
            let _ = worker_0.send(stats);
            return;
        }
        if let Some(workers) = &self.stats_from_workers {
            while let Ok(other) = workers.try_recv() {
                stats.merge(&other);
            }
        }
        log_report(&stats);
        let handler = &mut self.handler;
        self.user_code.run(
            &mut self.stats,
            self.now,
            |f| f.write_str("the handler's server_stats"),
            || handler.server_stats(&stats),
        );
    }
}

/// The session's line, under [`SESSION_LOG_TARGET`].
fn log_session(stats: &SessionStats) {
    info!(
        target: SESSION_LOG_TARGET,
        "{} {:?} {}: {} bytes in {:.3} s ({:.1} MB/s), outcome {}{}, {} retransmits",
        stats.peer,
        stats.filename,
        stats.mode,
        stats.transfer.bytes_read,
        stats.duration.as_secs_f64(),
        stats.rate() / 1e6,
        stats.outcome.as_str(),
        stats
            .error()
            .map(|(code, msg)| format!(" (ERROR {code}: {msg})"))
            .unwrap_or_default(),
        stats.transfer.retransmits,
    );
}

/// The report's line, under [`STATS_LOG_TARGET`].
fn log_report(stats: &ServerStats) {
    info!(
        target: STATS_LOG_TARGET,
        "stats: {} requests, {} sessions started, {} finished ({} failed), {} active, \
         {} datagrams / {} bytes sent, {} retransmits, {} malformed, {} stray",
        stats.requests,
        stats.sessions_started,
        stats.sessions_finished.values().sum::<u64>(),
        stats.sessions_failed(),
        stats.active_sessions,
        stats.datagrams_sent,
        stats.bytes_sent,
        stats.retransmits,
        stats.malformed,
        stats.stray_datagrams,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_code_that_panics_is_counted_and_gives_none() {
        let mut guard = UserCode::new();
        let mut stats = ServerStats::default();
        let now = Instant::now();
        assert_eq!(
            guard.run(&mut stats, now, |f| f.write_str("ok"), || 7),
            Some(7)
        );
        assert_eq!(stats.panics, 0);
        let panicked: Option<u8> = guard.run(
            &mut stats,
            now,
            |f| f.write_str("boom"),
            || panic!("user code failed"),
        );
        assert_eq!(panicked, None);
        struct PanicsOnDrop;
        impl Drop for PanicsOnDrop {
            fn drop(&mut self) {
                panic!("drop failed");
            }
        }
        guard.drop(&mut stats, now, |f| f.write_str("a value"), PanicsOnDrop);
        assert_eq!(stats.panics, 2);
    }
}
