//! dyntftpd's log output: human-readable text (simplelog) or JSON lines, on standard error
//! or appended to a file.
//!
//! In JSON, every line is one object with `time` (RFC 3339, UTC), `level` and `type`:
//! `"log"` for ordinary messages (with `target` and `message`), `"session"` for a finished
//! session (every [`SessionStats`] field) and `"stats"` for a statistics report (every
//! [`ServerStats`] field).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dyntftp::stats::{SESSION_LOG_TARGET, STATS_LOG_TARGET};
use dyntftp::{ServerStats, SessionStats};
use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogFormat;

/// Where log lines go.
enum Target {
    Stderr,
    File(File),
}

impl Write for Target {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Target::Stderr => io::stderr().write(buf),
            Target::File(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Target::Stderr => io::stderr().flush(),
            Target::File(file) => file.flush(),
        }
    }
}

fn open_target(file: Option<&Path>) -> Result<Target, String> {
    match file {
        None => Ok(Target::Stderr),
        Some(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Target::File)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display())),
    }
}

/// Writes whole JSON lines, one `write` each, to the log target.
pub struct JsonSink {
    out: Mutex<Target>,
    level: LevelFilter,
}

impl JsonSink {
    /// Writes `object` (the members of a JSON object, without braces, after the common
    /// `time`, `level` and `type` members) as one line.
    fn line(&self, level: log::Level, kind: &str, members: &str) {
        let mut line = String::with_capacity(members.len() + 80);
        line.push_str("{\"time\":");
        string(&mut line, &rfc3339(SystemTime::now()));
        line.push_str(",\"level\":");
        string(&mut line, level.as_str());
        line.push_str(",\"type\":");
        string(&mut line, kind);
        if !members.is_empty() {
            line.push(',');
            line.push_str(members);
        }
        line.push_str("}\n");
        if let Ok(mut out) = self.out.lock() {
            // A log line that cannot be written has nowhere else to go.
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }

    /// Logs a finished session (at level INFO, like the text format's session line).
    pub fn session(&self, stats: &SessionStats) {
        if self.level >= log::Level::Info {
            self.line(log::Level::Info, "session", &session_members(stats));
        }
    }

    /// Logs a statistics report (at level INFO).
    pub fn stats(&self, stats: &ServerStats) {
        if self.level >= log::Level::Info {
            self.line(log::Level::Info, "stats", &stats_members(stats));
        }
    }
}

/// The `log` backend for the JSON format.
struct JsonLogger(Arc<JsonSink>);

impl Log for JsonLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= self.0.level
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if is_text_report(record) {
            return;
        }
        let message = record.args().to_string();
        let mut members = String::from("\"target\":");
        string(&mut members, record.target());
        members.push_str(",\"message\":");
        string(&mut members, &message);
        self.0.line(record.level(), "log", &members);
    }

    fn flush(&self) {
        if let Ok(mut out) = self.0.out.lock() {
            let _ = out.flush();
        }
    }
}

/// True for the server's own human-readable session and statistics lines, which the JSON
/// format replaces with its `session` and `stats` objects.
fn is_text_report(record: &Record<'_>) -> bool {
    matches!(record.target(), SESSION_LOG_TARGET | STATS_LOG_TARGET)
}

/// Installs the logger for `format`; for JSON, returns the sink the session and statistics
/// records go to.
pub fn init(
    format: LogFormat,
    level: LevelFilter,
    file: Option<&Path>,
) -> Result<Option<Arc<JsonSink>>, String> {
    let target = open_target(file)?;
    match format {
        LogFormat::Text => {
            let config = simplelog::ConfigBuilder::new()
                .set_time_format_rfc3339()
                .set_target_level(LevelFilter::Off)
                .set_thread_level(LevelFilter::Off)
                .build();
            let _ = match target {
                Target::Stderr => simplelog::TermLogger::init(
                    level,
                    config,
                    simplelog::TerminalMode::Stderr,
                    simplelog::ColorChoice::Never,
                ),
                Target::File(file) => simplelog::WriteLogger::init(level, config, file),
            };
            Ok(None)
        }
        LogFormat::Json => {
            let sink = Arc::new(JsonSink {
                out: Mutex::new(target),
                level,
            });
            if log::set_boxed_logger(Box::new(JsonLogger(Arc::clone(&sink)))).is_ok() {
                log::set_max_level(level);
            }
            Ok(Some(sink))
        }
    }
}

/// The members of a `session` object.
pub fn session_members(s: &SessionStats) -> String {
    let mut o = Members::default();
    o.string("peer", &s.peer.to_string());
    o.string("local", &s.local.to_string());
    o.string("filename", &s.filename);
    o.string("mode", s.mode.as_str());
    let mut requested = String::from("[");
    for (i, (name, value)) in s.requested.iter().enumerate() {
        if i > 0 {
            requested.push(',');
        }
        requested.push('[');
        string(&mut requested, name);
        requested.push(',');
        string(&mut requested, value);
        requested.push(']');
    }
    requested.push(']');
    o.raw("requested", &requested);
    o.string("start_time", &rfc3339(s.start_time));
    o.raw("duration", &seconds(s.duration));
    o.string("outcome", s.outcome.as_str());
    o.raw("error", &error(s.error()));
    o.raw("rate", &format!("{:.0}", s.rate()));
    let t = &s.transfer;
    let n = &t.negotiated;
    let mut negotiated = Members::default();
    negotiated.raw("blksize", &n.blksize.to_string());
    negotiated.raw("window", &n.window.to_string());
    negotiated.raw("timeout", &n.timeout.map_or("null".into(), seconds));
    negotiated.raw("tsize", &n.tsize.map_or("null".into(), |v| v.to_string()));
    let mut acked = Members::default();
    for (kind, value) in &n.acked {
        acked.raw(kind.name(), &value.to_string());
    }
    negotiated.raw("acked", &acked.object());
    let mut transfer = Members::default();
    transfer.raw("negotiated", &negotiated.object());
    for (name, value) in [
        ("packets_sent", t.packets_sent),
        ("bytes_sent", t.bytes_sent),
        ("packets_resent", t.packets_resent),
        ("bytes_resent", t.bytes_resent),
        ("bytes_read", t.bytes_read),
        ("errors_sent", t.errors_sent),
        ("acks", t.acks),
        ("blocks_acked", t.blocks_acked),
        ("duplicate_acks", t.duplicate_acks),
        ("unexpected_acks", t.unexpected_acks),
        ("retransmits", t.retransmits),
        ("malformed", t.malformed),
    ] {
        transfer.raw(name, &value.to_string());
    }
    transfer.raw("peer_error", &error(t.peer_error.as_ref()));
    transfer.raw("error_sent", &error(t.error_sent.as_ref()));
    o.raw("transfer", &transfer.object());
    o.0
}

/// The members of a `stats` object.
pub fn stats_members(s: &ServerStats) -> String {
    let mut o = Members::default();
    o.raw("interval", &seconds(s.interval));
    o.raw("requests", &s.requests.to_string());
    let mut rejected = Members::default();
    for (code, n) in &s.rejected {
        rejected.raw(&code.to_string(), &n.to_string());
    }
    o.raw("rejected", &rejected.object());
    o.raw("write_requests", &s.write_requests.to_string());
    o.raw("duplicate_requests", &s.duplicate_requests.to_string());
    o.raw("sessions_started", &s.sessions_started.to_string());
    let mut finished = Members::default();
    for (outcome, n) in &s.sessions_finished {
        finished.raw(outcome, &n.to_string());
    }
    o.raw("sessions_finished", &finished.object());
    o.raw("sessions_failed", &s.sessions_failed().to_string());
    for (name, value) in [
        ("malformed", s.malformed),
        ("stray_datagrams", s.stray_datagrams),
        ("datagrams_sent", s.datagrams_sent),
        ("bytes_sent", s.bytes_sent),
        ("retransmits", s.retransmits),
        ("send_would_block", s.send_would_block),
        ("send_errors", s.send_errors),
        ("panics", s.panics),
        ("active_sessions", s.active_sessions),
    ] {
        o.raw(name, &value.to_string());
    }
    let h = &s.session_durations;
    let mut durations = Members::default();
    durations.raw("count", &h.count().to_string());
    durations.raw("sum", &seconds(h.sum()));
    let mut buckets = Members::default();
    for (bound, n) in h.cumulative() {
        let le = bound.map_or_else(|| "+Inf".to_string(), seconds);
        buckets.raw(&le, &n.to_string());
    }
    durations.raw("buckets", &buckets.object());
    o.raw("session_durations", &durations.object());
    o.0
}

/// Comma-separated `"name":value` members of a JSON object under construction.
#[derive(Default)]
struct Members(String);

impl Members {
    /// Adds a member whose value is already JSON.
    fn raw(&mut self, name: &str, json: &str) {
        if !self.0.is_empty() {
            self.0.push(',');
        }
        string(&mut self.0, name);
        self.0.push(':');
        self.0.push_str(json);
    }

    /// Adds a string member.
    fn string(&mut self, name: &str, value: &str) {
        let mut json = String::with_capacity(value.len() + 2);
        string(&mut json, value);
        self.raw(name, &json);
    }

    fn object(self) -> String {
        format!("{{{}}}", self.0)
    }
}

/// `{"code":N,"message":"…"}` or `null`.
fn error(error: Option<&(dyntftp::ErrorCode, String)>) -> String {
    match error {
        None => "null".into(),
        Some((code, message)) => {
            let mut out = format!("{{\"code\":{},\"message\":", code.to_u16());
            string(&mut out, message);
            out.push('}');
            out
        }
    }
}

/// Seconds as a JSON number.
fn seconds(duration: Duration) -> String {
    format!("{}", duration.as_secs_f64())
}

/// Appends `value` as a JSON string: quotes, backslashes and control characters escaped
/// (`\n`, `\t`, … or `\u00XX`), and U+2028/U+2029 too, so the line is also valid
/// JavaScript. Rust strings are UTF-8, so no invalid sequence can get through; names that
/// were not UTF-8 arrive with U+FFFD in place of the bad bytes.
pub fn string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c < ' ' || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `time` as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:34:56.789Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Year, month, day of the day `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(value: &str) -> String {
        let mut out = String::new();
        string(&mut out, value);
        out
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(json("plain/file.bin"), "\"plain/file.bin\"");
        assert_eq!(json("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json("\n\r\t\u{8}\u{c}"), "\"\\n\\r\\t\\b\\f\"");
        assert_eq!(
            json("\0\u{1}\u{1f}\u{7f}"),
            "\"\\u0000\\u0001\\u001f\\u007f\""
        );
        assert_eq!(json("\u{2028}é\u{fffd}"), "\"\\u2028é\u{fffd}\"");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // last second of 2024
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59.000Z");
    }

    #[test]
    fn stats_members_hold_every_counter() {
        let mut s = ServerStats {
            requests: 4,
            active_sessions: 2,
            ..ServerStats::default()
        };
        s.rejected.insert(1, 3);
        s.sessions_finished.insert("completed", 1);
        s.session_durations.record(Duration::from_millis(20));
        let text = stats_members(&s);
        for needle in [
            "\"requests\":4",
            "\"rejected\":{\"1\":3}",
            "\"sessions_finished\":{\"completed\":1}",
            "\"active_sessions\":2",
            "\"count\":1",
            "\"0.05\":1",
            "\"+Inf\":1",
        ] {
            assert!(text.contains(needle), "{needle} missing: {text}");
        }
    }
}
