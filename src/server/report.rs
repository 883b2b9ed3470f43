//! What the server says about itself: each finished session's [`SessionStats`] (to the
//! handler and as one log line, escaped and rate-limited), the periodic [`ServerStats`]
//! report (merged across workers), rate-limited warnings, and the guard that keeps a panic
//! in user code from taking the loop down.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use log::info;

use crate::handler::Handler;
use crate::limit::{LogDecision, LogLimiter};
use crate::session::Outcome;
use crate::stats::{
    LogText, ServerStats, SessionLogLimiter, SessionStats, SESSION_LOG_TARGET, STATS_LOG_TARGET,
};

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
        // The session's own socket is kept for the next session, or closed, which also
        // takes it out of the epoll set (the descriptor is never shared): no
        // deregistration call either way.
        let sessions = self.table.len();
        self.sockets
            .recycle(entry.transport, entry.request.local, true, sessions);
        self.admission.session_ended(entry.request.peer);
        *self
            .stats
            .sessions_finished
            .entry(outcome.as_str())
            .or_default() += 1;
        if let Some(label) = &entry.request.label {
            self.stats.count_label(label, 1);
        }
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
            family: request.family,
            label: request.label,
            mac: request.mac,
            start_time: request.start_time,
            duration: transfer.duration(self.now),
            outcome,
            transfer,
        };
        self.stats.session_durations.record(stats.duration);
        if log::log_enabled!(target: SESSION_LOG_TARGET, log::Level::Info)
            && self.session_log.allow(self.now, &stats)
        {
            log_held_back(&mut self.session_log);
            info!(target: SESSION_LOG_TARGET, "{}", SessionLine(&stats));
        }
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
        log_held_back(&mut self.session_log);
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

/// Says how many session lines `limiter` held back since it last said so, if any.
fn log_held_back(limiter: &mut SessionLogLimiter) {
    if let Some(held_back) = limiter.take_held_back() {
        info!(target: SESSION_LOG_TARGET, "{held_back}");
    }
}

/// The session's line, written under [`SESSION_LOG_TARGET`]: one line whatever the peer
/// sent, its filename and ERROR message escaped and cut by [`LogText`].
struct SessionLine<'a>(&'a SessionStats);

impl fmt::Display for SessionLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.0;
        write!(
            f,
            "{} {} {}: {} bytes in {:.3} s ({:.1} MB/s), outcome {}",
            stats.peer,
            LogText::new(&stats.filename),
            stats.mode,
            stats.transfer.bytes_read,
            stats.duration.as_secs_f64(),
            stats.rate() / 1e6,
            stats.outcome.as_str(),
        )?;
        if let Some((code, message)) = stats.error() {
            write!(f, " (ERROR {code}: {})", LogText::new(message))?;
        }
        // Every resend by cause, then the round-trip estimate.
        let t = &stats.transfer;
        write!(
            f,
            ", {} retransmits ({} for a repeated request), {} early, {} go-backs from ACKs, \
             {} packets resent",
            t.retransmits, t.repeat_resends, t.early_retransmits, t.go_back_acks, t.packets_resent,
        )?;
        match (t.srtt, t.rttvar) {
            (Some(srtt), Some(rttvar)) => write!(
                f,
                ", srtt {:.3} ms, rttvar {:.3} ms",
                srtt.as_secs_f64() * 1e3,
                rttvar.as_secs_f64() * 1e3
            )?,
            _ => f.write_str(", srtt unmeasured")?,
        }
        write!(f, ", client {}", stats.family.as_str())?;
        if let Some(mac) = stats.mac {
            write!(f, ", mac {mac}")?;
        }
        match &stats.label {
            Some(label) => write!(f, ", by {}", LogText::new(label.as_bytes())),
            None => Ok(()),
        }
    }
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
    use crate::packet::{ErrorCode, Mode};
    use crate::stats::TransferStats;
    use crate::Negotiated;

    /// A session the peer ended with an ERROR whose message is `message`, named `filename`.
    fn aborted(filename: &[u8], message: &[u8]) -> SessionStats {
        let now = Instant::now();
        let mut transfer = TransferStats::new(now, Negotiated::default());
        transfer.bytes_read = 100;
        transfer.acks = 1;
        let message = String::from_utf8_lossy(message).into_owned();
        transfer.peer_error = Some((ErrorCode::NotDefined, message));
        SessionStats {
            peer: "127.0.0.1:44846".parse().unwrap(),
            local: "127.0.0.1:69".parse().unwrap(),
            filename: String::from_utf8_lossy(filename).into_owned(),
            mode: Mode::Octet,
            requested: Vec::new(),
            family: crate::ClientFamily::Other,
            label: None,
            mac: None,
            start_time: std::time::SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(1),
            outcome: Outcome::PeerError(ErrorCode::NotDefined),
            transfer,
        }
    }

    #[test]
    fn a_forged_error_message_stays_on_one_line_without_control_bytes() {
        let forged = b"bye\n2026-01-01T00:00:00.000000000Z [WARN] forged: accepted root login \
            from 203.0.113.9\n\x1b[31mred\x1b[0m \x1b]0;title\x07 \xff\xfe end";
        let line = SessionLine(&aborted(b"small\r\n.txt", forged)).to_string();
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.chars().all(|c| !c.is_control()), "{line}");
        assert!(
            line.starts_with("127.0.0.1:44846 \"small\\r\\n.txt\" octet: 100 bytes in 0.001 s"),
            "{line}"
        );
        assert!(
            line.contains(
                "outcome peer_error (ERROR 0 (not defined): \"bye\\n2026-01-01T00:00:00.000000000Z \
                 [WARN] forged: accepted root login from 203.0.113.9\\n\\u{1b}[31mred\\u{1b}[0m \
                 \\u{1b}]0;title\\u{7} \\u{fffd}\\u{fffd} end\"), 0 retransmits"
            ),
            "{line}"
        );
    }

    #[test]
    fn the_session_line_shows_every_resend_and_the_round_trip_estimate() {
        let mut stats = aborted(b"f", b"bye");
        let t = &mut stats.transfer;
        (t.retransmits, t.repeat_resends, t.early_retransmits) = (3, 1, 12);
        (t.go_back_acks, t.packets_resent) = (5, 2515);
        let line = SessionLine(&stats).to_string();
        assert!(
            line.ends_with(
                ", 3 retransmits (1 for a repeated request), 12 early, 5 go-backs from ACKs, \
                 2515 packets resent, srtt unmeasured, client other"
            ),
            "{line}"
        );
        stats.transfer.srtt = Some(Duration::from_micros(105));
        stats.transfer.rttvar = Some(Duration::from_micros(20));
        let line = SessionLine(&stats).to_string();
        assert!(
            line.ends_with("packets resent, srtt 0.105 ms, rttvar 0.020 ms, client other"),
            "{line}"
        );
    }

    #[test]
    fn a_session_line_is_bounded_whatever_the_peer_sent() {
        let name = vec![0x1bu8; 65_000];
        let message = vec![b'\n'; 65_000];
        let line = SessionLine(&aborted(&name, &message)).to_string();
        assert_eq!(line.lines().count(), 1);
        // Peer, two fields of at most LOG_TEXT_MAX escaped bytes with their quotes and
        // marks, and the fixed words and numbers (the counters and the estimate).
        assert!(
            line.len() < 2 * crate::stats::LOG_TEXT_MAX + 500,
            "{} bytes: {line}",
            line.len()
        );
        assert!(line.contains("…(65000 bytes)"), "{line}");
        eprintln!("session line: {} bytes at worst", line.len());
    }

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
