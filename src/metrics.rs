//! Server metrics in the Prometheus text exposition format.
//!
//! [`ServerStats`] reports hold the counters of one stats interval. [`Metrics`] adds the
//! reports up into totals since start and renders them as Prometheus counters, gauges and a
//! histogram, for a scrape endpoint or for node_exporter's textfile collector
//! ([`Metrics::write_file`] replaces the file atomically).
//!
//! ```
//! use dyntftp::{Handler, Metrics, ReadRequest, Reject, ResponseData, ServerStats};
//!
//! /// Wraps a handler and keeps the metrics file up to date every stats interval.
//! struct WithMetrics<H> {
//!     inner: H,
//!     metrics: Metrics,
//! }
//!
//! impl<H: Handler> Handler for WithMetrics<H> {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         self.inner.open(req)
//!     }
//!
//!     fn server_stats(&mut self, stats: &ServerStats) {
//!         self.metrics.add(stats);
//!         let path = "/var/lib/node_exporter/textfile_collector/dyntftpd.prom";
//!         if let Err(e) = self.metrics.write_file(path.as_ref()) {
//!             eprintln!("cannot write {path}: {e}");
//!         }
//!     }
//! }
//!
//! let mut metrics = Metrics::new();
//! metrics.add(&ServerStats { requests: 3, ..ServerStats::default() });
//! metrics.add(&ServerStats { requests: 2, ..ServerStats::default() });
//! assert!(metrics.render().contains("\ndyntftp_requests_total 5\n"));
//! ```

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::family::ClientFamily;
use crate::session::Outcome;
use crate::stats::ServerStats;

/// Totals of every [`ServerStats`] report added, rendered in the Prometheus text format.
///
/// Counters are summed over the reports, the `active_sessions` gauge is the latest
/// report's, and the session-duration histograms are merged. Metric names start with
/// `dyntftp_`; see [`Metrics::render`] for the list.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    totals: ServerStats,
    reports: u64,
}

impl Metrics {
    /// No reports yet: every counter is zero.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Adds one interval's report.
    pub fn add(&mut self, report: &ServerStats) {
        let t = &mut self.totals;
        let interval = t.interval.saturating_add(report.interval);
        t.merge(report);
        // The time covered adds up; the gauge is the latest.
        t.interval = interval;
        t.active_sessions = report.active_sessions;
        self.reports += 1;
    }

    /// The totals so far, as one [`ServerStats`] covering every report (its `interval` is
    /// the time all reports covered; `active_sessions` is the latest gauge).
    pub fn totals(&self) -> &ServerStats {
        &self.totals
    }

    /// Reports added so far.
    pub fn reports(&self) -> u64 {
        self.reports
    }

    /// The metrics in the Prometheus text exposition format (version 0.0.4), each with its
    /// `# HELP` and `# TYPE` lines:
    ///
    /// | metric | type | labels |
    /// |---|---|---|
    /// | `dyntftp_requests_total` | counter | |
    /// | `dyntftp_requests_rejected_total` | counter | `code` (TFTP error code sent) |
    /// | `dyntftp_write_requests_total` | counter | |
    /// | `dyntftp_duplicate_requests_total` | counter | |
    /// | `dyntftp_sessions_started_total` | counter | |
    /// | `dyntftp_sessions_total` | counter | `outcome` ([`Outcome::as_str`]) |
    /// | `dyntftp_sessions_by_client_total` | counter | `family` ([`ClientFamily::as_str`]) |
    /// | `dyntftp_sessions_by_label_total` | counter | `label` ([`ReadRequest::set_label`](crate::ReadRequest::set_label); at most [`MAX_LABELS`](crate::stats::MAX_LABELS), then `other`) |
    /// | `dyntftp_malformed_datagrams_total` | counter | |
    /// | `dyntftp_stray_datagrams_total` | counter | |
    /// | `dyntftp_datagrams_sent_total` | counter | |
    /// | `dyntftp_bytes_sent_total` | counter | |
    /// | `dyntftp_retransmits_total` | counter | |
    /// | `dyntftp_early_retransmits_total` | counter | |
    /// | `dyntftp_rate_limited_total` | counter | |
    /// | `dyntftp_client_limited_total` | counter | |
    /// | `dyntftp_busy_total` | counter | |
    /// | `dyntftp_descriptor_pauses_total` | counter | |
    /// | `dyntftp_port_pauses_total` | counter | |
    /// | `dyntftp_send_would_block_total` | counter | |
    /// | `dyntftp_send_errors_total` | counter | |
    /// | `dyntftp_panics_total` | counter | |
    /// | `dyntftp_busy_poll_seconds_total` | counter | |
    /// | `dyntftp_stats_seconds_total` | counter | |
    /// | `dyntftp_sessions_active` | gauge | |
    /// | `dyntftp_session_duration_seconds` | histogram | `le` |
    ///
    /// Every outcome and the error codes 0 to 8 are present from the start, at zero.
    pub fn render(&self) -> String {
        let t = &self.totals;
        let mut out = String::with_capacity(4096);
        counter(
            &mut out,
            "dyntftp_requests_total",
            "Well-formed read requests received.",
            t.requests,
        );
        let mut rejected: BTreeMap<u16, u64> = (0..=8).map(|code| (code, 0)).collect();
        for (code, n) in &t.rejected {
            *rejected.entry(*code).or_default() += n;
        }
        header(
            &mut out,
            "dyntftp_requests_rejected_total",
            "Requests refused with an ERROR, by the TFTP error code sent.",
            "counter",
        );
        for (code, n) in rejected {
            let _ = writeln!(
                out,
                "dyntftp_requests_rejected_total{{code=\"{code}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "dyntftp_write_requests_total",
            "Write requests received (refused with ERROR 4).",
            t.write_requests,
        );
        counter(
            &mut out,
            "dyntftp_duplicate_requests_total",
            "Read requests repeated while the same peer's session ran (ignored).",
            t.duplicate_requests,
        );
        counter(
            &mut out,
            "dyntftp_sessions_started_total",
            "Transfer sessions started.",
            t.sessions_started,
        );
        let mut sessions: BTreeMap<&str, u64> =
            Outcome::ALL.iter().map(|o| (o.as_str(), 0)).collect();
        for (outcome, n) in &t.sessions_finished {
            *sessions.entry(outcome).or_default() += n;
        }
        header(
            &mut out,
            "dyntftp_sessions_total",
            "Transfer sessions ended, by outcome.",
            "counter",
        );
        for (outcome, n) in sessions {
            let _ = writeln!(
                out,
                "dyntftp_sessions_total{{outcome=\"{}\"}} {n}",
                label_value(outcome)
            );
        }
        let mut families: BTreeMap<&str, u64> =
            ClientFamily::ALL.iter().map(|f| (f.as_str(), 0)).collect();
        for (family, n) in &t.sessions_by_family {
            *families.entry(family).or_default() += n;
        }
        header(
            &mut out,
            "dyntftp_sessions_by_client_total",
            "Transfer sessions started, by the client family the request looked like.",
            "counter",
        );
        for (family, n) in families {
            let _ = writeln!(
                out,
                "dyntftp_sessions_by_client_total{{family=\"{}\"}} {n}",
                label_value(family)
            );
        }
        header(
            &mut out,
            "dyntftp_sessions_by_label_total",
            "Transfer sessions ended, by the label their handler gave them (in dyntftpd: \
             the rule that answered).",
            "counter",
        );
        for (label, n) in &t.sessions_by_label {
            let _ = writeln!(
                out,
                "dyntftp_sessions_by_label_total{{label=\"{}\"}} {n}",
                label_value(label)
            );
        }
        counter(
            &mut out,
            "dyntftp_malformed_datagrams_total",
            "Datagrams on a listener that did not parse or were not a request.",
            t.malformed,
        );
        counter(
            &mut out,
            "dyntftp_stray_datagrams_total",
            "Datagrams on a session socket from another address or port (answered with ERROR 5).",
            t.stray_datagrams,
        );
        counter(
            &mut out,
            "dyntftp_datagrams_sent_total",
            "Datagrams sent (DATA, OACK and ERROR).",
            t.datagrams_sent,
        );
        counter(
            &mut out,
            "dyntftp_bytes_sent_total",
            "DATA payload bytes sent, resends included.",
            t.bytes_sent,
        );
        counter(
            &mut out,
            "dyntftp_retransmits_total",
            "Retransmissions at the full timeout.",
            t.retransmits,
        );
        counter(
            &mut out,
            "dyntftp_early_retransmits_total",
            "Retransmissions at the adaptive, round-trip based timeout.",
            t.early_retransmits,
        );
        counter(
            &mut out,
            "dyntftp_rate_limited_total",
            "Datagrams dropped unanswered because their client was over the request rate.",
            t.rate_limited,
        );
        counter(
            &mut out,
            "dyntftp_client_limited_total",
            "Requests refused because their client ran the most sessions allowed.",
            t.client_limited,
        );
        counter(
            &mut out,
            "dyntftp_busy_total",
            "Requests dropped (the client resends them) because no session slot was free \
             and the queue of waiting requests was full.",
            t.busy,
        );
        counter(
            &mut out,
            "dyntftp_descriptor_pauses_total",
            "Times the server ran out of file descriptors and paused taking requests.",
            t.descriptor_pauses,
        );
        counter(
            &mut out,
            "dyntftp_port_pauses_total",
            "Times every port for session sockets was in use and the server paused taking \
             requests.",
            t.port_pauses,
        );
        counter(
            &mut out,
            "dyntftp_send_would_block_total",
            "Sends dropped because a socket buffer was full.",
            t.send_would_block,
        );
        counter(
            &mut out,
            "dyntftp_send_errors_total",
            "Send failures other than a full buffer.",
            t.send_errors,
        );
        counter(
            &mut out,
            "dyntftp_panics_total",
            "Panics caught in handler or source code.",
            t.panics,
        );
        header(
            &mut out,
            "dyntftp_busy_poll_seconds_total",
            "Time the event loop spent polling without sleeping (adaptive busy polling).",
            "counter",
        );
        let _ = writeln!(
            out,
            "dyntftp_busy_poll_seconds_total {}",
            seconds(t.busy_poll)
        );
        header(
            &mut out,
            "dyntftp_stats_seconds_total",
            "Time covered by the statistics reports added up here.",
            "counter",
        );
        let _ = writeln!(out, "dyntftp_stats_seconds_total {}", seconds(t.interval));
        header(
            &mut out,
            "dyntftp_sessions_active",
            "Sessions running at the latest statistics report.",
            "gauge",
        );
        let _ = writeln!(out, "dyntftp_sessions_active {}", t.active_sessions);
        let name = "dyntftp_session_duration_seconds";
        header(
            &mut out,
            name,
            "How long finished transfer sessions lasted.",
            "histogram",
        );
        for (bound, n) in t.session_durations.cumulative() {
            let le = bound.map_or_else(|| "+Inf".to_string(), seconds);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_sum {}", seconds(t.session_durations.sum()));
        let _ = writeln!(out, "{name}_count {}", t.session_durations.count());
        out
    }

    /// Writes [`render`](Metrics::render)'s text to `path` atomically: to a new temporary
    /// file in the same directory, then renamed over `path`. A reader sees the old file or
    /// the new one, never a partial one.
    ///
    /// The temporary file is named `.<file name>.<random>.tmp` (node_exporter's textfile
    /// collector ignores it) with a name no other user can predict, and is created with
    /// `O_CREAT | O_EXCL | O_NOFOLLOW`: in a directory other users can write, a symbolic
    /// link or file planted there is never followed or written, and the rename replaces
    /// a link at `path` instead of writing through it. The file is mode 0644, owned by
    /// whoever calls this.
    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
        let (tmp, mut file) = create_temporary(path, name)?;
        let result = file
            .set_permissions(fs::Permissions::from_mode(0o644))
            .and_then(|()| file.write_all(self.render().as_bytes()))
            .and_then(|()| fs::rename(&tmp, path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// Creates a new file next to `path`, named `.<name>.<random>.tmp`, without following a
/// symbolic link; tries other names if one exists.
fn create_temporary(path: &Path, name: &OsStr) -> io::Result<(PathBuf, fs::File)> {
    let mut last = None;
    for _ in 0..8 {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{:016x}.tmp", unpredictable()));
        let tmp = path.with_file_name(tmp_name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name")))
}

/// 64 bits no other process can predict: the standard library's per-process random
/// SipHash keys (from the system's random source) applied to the time and a counter.
fn unpredictable() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {value}");
}

/// Seconds as the shortest decimal that reads back as the same `f64`.
fn seconds(duration: Duration) -> String {
    format!("{}", duration.as_secs_f64())
}

/// A label value with `\`, `"` and newlines escaped as the text format requires.
fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_string)
    }

    fn report(requests: u64, active: u64, durations_ms: &[u64]) -> ServerStats {
        let mut s = ServerStats {
            interval: Duration::from_secs(10),
            requests,
            active_sessions: active,
            bytes_sent: 1000 * requests,
            retransmits: 2,
            early_retransmits: 3,
            rate_limited: 5,
            client_limited: 1,
            ..ServerStats::default()
        };
        s.rejected.insert(1, 1);
        s.sessions_finished.insert("completed", requests - 1);
        s.sessions_finished.insert("timed_out", 1);
        for ms in durations_ms {
            s.session_durations.record(Duration::from_millis(*ms));
        }
        s
    }

    #[test]
    fn counters_add_up_and_the_gauge_is_the_latest() {
        let mut m = Metrics::new();
        m.add(&report(4, 7, &[5, 20, 3000]));
        m.add(&report(6, 2, &[40]));
        let text = m.render();
        assert_eq!(m.reports(), 2);
        for (series, want) in [
            ("dyntftp_early_retransmits_total", "6"),
            ("dyntftp_rate_limited_total", "10"),
            ("dyntftp_client_limited_total", "2"),
        ] {
            assert_eq!(sample(&text, series).as_deref(), Some(want), "{series}");
        }
        assert_eq!(
            sample(&text, "dyntftp_requests_total").as_deref(),
            Some("10")
        );
        assert_eq!(
            sample(&text, "dyntftp_bytes_sent_total").as_deref(),
            Some("10000")
        );
        assert_eq!(
            sample(&text, "dyntftp_retransmits_total").as_deref(),
            Some("4")
        );
        assert_eq!(
            sample(&text, "dyntftp_sessions_active").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(&text, "dyntftp_stats_seconds_total").as_deref(),
            Some("20")
        );
        let completed = sample(&text, "dyntftp_sessions_total{outcome=\"completed\"}");
        assert_eq!(completed.as_deref(), Some("8"));
        let timed_out = sample(&text, "dyntftp_sessions_total{outcome=\"timed_out\"}");
        assert_eq!(timed_out.as_deref(), Some("2"));
        let not_found = sample(&text, "dyntftp_requests_rejected_total{code=\"1\"}");
        assert_eq!(not_found.as_deref(), Some("2"));
        let h = "dyntftp_session_duration_seconds";
        let bucket = |le: &str| sample(&text, &format!("{h}_bucket{{le=\"{le}\"}}"));
        assert_eq!(bucket("0.01").as_deref(), Some("1"));
        assert_eq!(bucket("0.05").as_deref(), Some("3"));
        assert_eq!(bucket("2.5").as_deref(), Some("3"));
        assert_eq!(bucket("5").as_deref(), Some("4"));
        assert_eq!(bucket("+Inf").as_deref(), Some("4"));
        assert_eq!(sample(&text, &format!("{h}_count")).as_deref(), Some("4"));
        assert_eq!(sample(&text, &format!("{h}_sum")).as_deref(), Some("3.065"));
    }

    #[test]
    fn every_series_is_present_at_zero_with_help_and_type() {
        let text = Metrics::new().render();
        for outcome in Outcome::ALL {
            let series = format!("dyntftp_sessions_total{{outcome=\"{}\"}}", outcome.as_str());
            assert_eq!(sample(&text, &series).as_deref(), Some("0"), "{series}");
        }
        for code in 0..=8 {
            let series = format!("dyntftp_requests_rejected_total{{code=\"{code}\"}}");
            assert_eq!(sample(&text, &series).as_deref(), Some("0"), "{series}");
        }
        // Every sample belongs to a family announced by HELP and TYPE just before it.
        let mut family = String::new();
        let mut kind = String::new();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap_or_default().to_string();
                let next = lines.next().unwrap_or_default();
                let mut parts = next.strip_prefix("# TYPE ").unwrap_or_default().split(' ');
                assert_eq!(parts.next(), Some(family.as_str()), "{next}");
                kind = parts.next().unwrap_or_default().to_string();
                assert!(["counter", "gauge", "histogram"].contains(&kind.as_str()));
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = match kind.as_str() {
                "histogram" => name
                    .strip_suffix("_bucket")
                    .or(name.strip_suffix("_sum"))
                    .or(name.strip_suffix("_count"))
                    .unwrap_or(name),
                _ => name,
            };
            assert_eq!(base, family, "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn write_file_replaces_the_file_atomically() {
        let dir = std::env::temp_dir().join(format!("dyntftp-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dyntftpd.prom");
        fs::write(&path, "old contents\n").unwrap();
        let mut m = Metrics::new();
        m.add(&report(3, 1, &[]));
        m.write_file(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let entries: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, m.render());
        assert_eq!(entries, vec![std::ffi::OsString::from("dyntftpd.prom")]);
        assert!(m.write_file(Path::new("/")).is_err());
    }

    /// A local user who can write the metrics directory plants symbolic links where the
    /// temporary file used to go (`.<name>.<pid>.tmp`) and at the file itself: neither is
    /// followed, the victim file is unchanged, and the file is mode 0644.
    #[test]
    fn write_file_never_follows_a_planted_link() {
        use std::os::unix::fs::{symlink, MetadataExt};
        let dir = std::env::temp_dir().join(format!("dyntftp-metrics-link-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, "IMPORTANT DATA\n").unwrap();
        let old_tmp = dir.join(format!(".dyntftpd.prom.{}.tmp", std::process::id()));
        symlink(&victim, &old_tmp).unwrap();
        let path = dir.join("dyntftpd.prom");
        let m = Metrics::new();
        m.write_file(&path).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "IMPORTANT DATA\n");
        assert_eq!(fs::read_to_string(&path).unwrap(), m.render());
        // A link at the target: replaced, not written through.
        fs::remove_file(&path).unwrap();
        symlink(&victim, &path).unwrap();
        m.write_file(&path).unwrap();
        let written = fs::symlink_metadata(&path).unwrap();
        assert!(written.file_type().is_file(), "the link was replaced");
        assert_eq!(written.mode() & 0o777, 0o644);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "IMPORTANT DATA\n");
        // Every write picks a new temporary name; none is left behind.
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        fs::remove_dir_all(&dir).unwrap();
        let old_name = format!(".dyntftpd.prom.{}.tmp", std::process::id());
        assert_eq!(names, [old_name.as_str(), "dyntftpd.prom", "victim"]);
        assert_ne!(unpredictable(), unpredictable());
    }
}
