//! dyntftpd's log output: human-readable text (simplelog) or JSON lines, on standard error
//! or appended to a file.
//!
//! In JSON, every line is one object with `time` (RFC 3339, UTC), `level` and `type`:
//! `"log"` for ordinary messages (with `target` and `message`), `"session"` for a finished
//! session (every [`SessionStats`] field, with every [`TransferStats`] counter under
//! `transfer`) and `"stats"` for a statistics report (every [`ServerStats`] field).
//!
//! What a peer sent is bounded in both formats: in text, by the server's escaping
//! ([`dyntftp::stats::LogText`]); in JSON, the filename and ERROR messages are cut to
//! [`LOG_TEXT_MAX`] bytes and the requested options to [`MAX_LOGGED_OPTIONS`] pairs of
//! [`MAX_LOGGED_OPTION_BYTES`] (a cut string ends in `…`), and the peer's ERROR message
//! is written once, under `error`. Session records pass the same rate limit as the text
//! lines ([`SessionLogLimiter`]), with a `"log"` record saying what it held back.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dyntftp::stats::{
    HeldBack, SessionLogLimiter, LOG_TEXT_MAX, SESSION_LOG_TARGET, STATS_LOG_TARGET,
};
use dyntftp::{Negotiated, ServerStats, SessionStats, TransferStats};
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
        Some(path) => open_log_file(path).map(Target::File),
    }
}

/// Opens (or creates, mode 0640) the log file for appending, without following a
/// symbolic link: dyntftpd may still be root here, and a local user who can write the
/// log directory must not make it append to another file. Refuses anything but a regular
/// file with one link (a hard link to another file would be the same trick).
pub fn open_log_file(path: &Path) -> Result<File, String> {
    let refuse = |why: String| format!("cannot open the log file {}: {why}", path.display());
    // Non-blocking: opening a FIFO without a reader would wait forever.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse("it is a symbolic link".into()),
            Some(libc::ENXIO) => refuse("not a regular file".into()),
            _ => refuse(e.to_string()),
        })?;
    let metadata = file.metadata().map_err(|e| refuse(e.to_string()))?;
    if !metadata.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if metadata.nlink() > 1 {
        return Err(refuse(format!(
            "it has {} hard links; give it a file of its own",
            metadata.nlink()
        )));
    }
    Ok(file)
}

/// The most requested options a JSON session record lists.
pub const MAX_LOGGED_OPTIONS: usize = 16;

/// The most bytes of an option's name or value a JSON session record holds.
pub const MAX_LOGGED_OPTION_BYTES: usize = 64;

/// Writes whole JSON lines, one `write` each, to the log target.
pub struct JsonSink {
    out: Mutex<Target>,
    level: LevelFilter,
    /// Shared by every worker's handler: one limit for the whole server.
    session_limit: Mutex<SessionLogLimiter>,
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

    /// Logs a finished session (at level INFO, like the text format's session line),
    /// unless the session rate limit holds it back.
    pub fn session(&self, stats: &SessionStats) {
        if self.level < log::Level::Info {
            return;
        }
        let held_back = {
            let Ok(mut limit) = self.session_limit.lock() else {
                return;
            };
            if !limit.allow(Instant::now(), stats) {
                return;
            }
            limit.take_held_back()
        };
        if let Some(held_back) = held_back {
            self.held_back(held_back);
        }
        self.line(log::Level::Info, "session", &session_members(stats));
    }

    /// Logs a statistics report (at level INFO), after saying what the session rate
    /// limit held back since it last did.
    pub fn stats(&self, stats: &ServerStats) {
        if self.level < log::Level::Info {
            return;
        }
        let held_back = self
            .session_limit
            .lock()
            .ok()
            .and_then(|mut limit| limit.take_held_back());
        if let Some(held_back) = held_back {
            self.held_back(held_back);
        }
        self.line(log::Level::Info, "stats", &stats_members(stats));
    }

    /// A `"log"` record of what the session rate limit held back, with the counts as
    /// numbers too.
    fn held_back(&self, held_back: HeldBack) {
        let mut o = Members::default();
        o.string("target", SESSION_LOG_TARGET);
        o.string("message", &held_back.to_string());
        o.raw("held_back", &held_back.lines.to_string());
        o.raw(
            "held_back_unverified",
            &held_back.unverified_failures.to_string(),
        );
        self.line(log::Level::Info, "log", &o.0);
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
                session_limit: Mutex::new(SessionLogLimiter::new()),
            });
            if log::set_boxed_logger(Box::new(JsonLogger(Arc::clone(&sink)))).is_ok() {
                log::set_max_level(level);
            }
            Ok(Some(sink))
        }
    }
}

/// The members of a `session` object: every field of [`SessionStats`], its
/// [`TransferStats`] and their [`Negotiated`] parameters. The structs are taken apart
/// without `..`, so a field added to one of them does not compile until it is written here
/// (or explicitly left out). What the peer chose is bounded: the filename and the ERROR
/// messages cut to [`LOG_TEXT_MAX`] bytes, [`MAX_LOGGED_OPTIONS`] requested options
/// (`requested_omitted` counts the others) of [`MAX_LOGGED_OPTION_BYTES`], and the peer's
/// ERROR message written once (under `error`; `transfer.peer_error` has its code).
pub fn session_members(s: &SessionStats) -> String {
    let SessionStats {
        peer,
        local,
        filename,
        mode,
        requested,
        family,
        label,
        mac,
        start_time,
        duration,
        outcome,
        transfer,
    } = s;
    let mut o = Members::default();
    o.string("peer", &peer.to_string());
    o.string("local", &local.to_string());
    o.string("filename", &cut(filename, LOG_TEXT_MAX));
    o.string("mode", mode.as_str());
    o.string("family", family.as_str());
    // dyntftpd's router names its rules with the label.
    match label {
        Some(rule) => o.string("rule", rule),
        None => o.raw("rule", "null"),
    }
    match mac {
        Some(mac) => o.string("mac", &mac.to_string()),
        None => o.raw("mac", "null"),
    }
    let mut list = String::from("[");
    for (i, (name, value)) in requested.iter().take(MAX_LOGGED_OPTIONS).enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push('[');
        string(&mut list, &cut(name, MAX_LOGGED_OPTION_BYTES));
        list.push(',');
        string(&mut list, &cut(value, MAX_LOGGED_OPTION_BYTES));
        list.push(']');
    }
    list.push(']');
    o.raw("requested", &list);
    o.raw(
        "requested_omitted",
        &requested
            .len()
            .saturating_sub(MAX_LOGGED_OPTIONS)
            .to_string(),
    );
    o.string("start_time", &rfc3339(*start_time));
    o.raw("duration", &seconds(*duration));
    o.string("outcome", outcome.as_str());
    o.raw("error", &error(s.error()));
    o.raw("rate", &format!("{:.0}", s.rate()));
    let TransferStats {
        // The session's own start_time, duration and outcome above say the same in
        // wall-clock terms.
        started: _,
        finished: _,
        outcome: _,
        negotiated,
        packets_sent,
        bytes_sent,
        packets_resent,
        bytes_resent,
        bytes_read,
        size_mismatch,
        errors_sent,
        acks,
        blocks_acked,
        duplicate_acks,
        unexpected_acks,
        retransmits,
        early_retransmits,
        go_back_acks,
        go_back_held,
        repeated_requests,
        repeat_resends,
        open_wait,
        srtt,
        rttvar,
        malformed,
        peer_error,
        error_sent,
    } = transfer;
    let Negotiated {
        blksize,
        window,
        timeout,
        tsize,
        acked,
    } = negotiated;
    let mut n = Members::default();
    n.raw("blksize", &blksize.to_string());
    n.raw("window", &window.to_string());
    n.raw("timeout", &timeout.map_or("null".into(), seconds));
    n.raw("tsize", &number(*tsize));
    let mut acked_members = Members::default();
    for (kind, value) in acked {
        acked_members.raw(kind.name(), &value.to_string());
    }
    n.raw("acked", &acked_members.object());
    let mut t = Members::default();
    t.raw("negotiated", &n.object());
    for (name, value) in [
        ("packets_sent", packets_sent),
        ("bytes_sent", bytes_sent),
        ("packets_resent", packets_resent),
        ("bytes_resent", bytes_resent),
        ("bytes_read", bytes_read),
    ] {
        t.raw(name, &value.to_string());
    }
    t.raw("size_mismatch", &number(*size_mismatch));
    for (name, value) in [
        ("errors_sent", errors_sent),
        ("acks", acks),
        ("blocks_acked", blocks_acked),
        ("duplicate_acks", duplicate_acks),
        ("unexpected_acks", unexpected_acks),
        ("retransmits", retransmits),
        ("early_retransmits", early_retransmits),
        ("go_back_acks", go_back_acks),
        ("go_back_held", go_back_held),
        ("repeated_requests", repeated_requests),
        ("repeat_resends", repeat_resends),
    ] {
        t.raw(name, &value.to_string());
    }
    t.raw("open_wait", &open_wait.map_or("null".into(), seconds));
    t.raw("srtt", &srtt.map_or("null".into(), seconds));
    t.raw("rttvar", &rttvar.map_or("null".into(), seconds));
    t.raw("malformed", &malformed.to_string());
    // Its message is the session's `error` (the peer's error comes first there).
    t.raw(
        "peer_error",
        &peer_error.as_ref().map_or("null".into(), |(code, _)| {
            format!("{{\"code\":{}}}", code.to_u16())
        }),
    );
    t.raw("error_sent", &error(error_sent.as_ref()));
    o.raw("transfer", &t.object());
    o.0
}

/// The members of a `stats` object: every field of [`ServerStats`], plus
/// `sessions_failed`. The struct is taken apart without `..`, so a field added to it does
/// not compile until it is written here.
pub fn stats_members(s: &ServerStats) -> String {
    let ServerStats {
        interval,
        requests,
        rejected,
        write_requests,
        duplicate_requests,
        sessions_started,
        sessions_finished,
        sessions_by_family,
        sessions_by_label,
        malformed,
        stray_datagrams,
        datagrams_sent,
        bytes_sent,
        retransmits,
        early_retransmits,
        send_would_block,
        send_errors,
        panics,
        rate_limited,
        client_limited,
        busy,
        descriptor_pauses,
        port_pauses,
        busy_poll,
        active_sessions,
        session_durations,
    } = s;
    let mut o = Members::default();
    o.raw("interval", &seconds(*interval));
    o.raw("requests", &requests.to_string());
    let mut by_code = Members::default();
    for (code, n) in rejected {
        by_code.raw(&code.to_string(), &n.to_string());
    }
    o.raw("rejected", &by_code.object());
    o.raw("write_requests", &write_requests.to_string());
    o.raw("duplicate_requests", &duplicate_requests.to_string());
    o.raw("sessions_started", &sessions_started.to_string());
    let mut by_outcome = Members::default();
    for (outcome, n) in sessions_finished {
        by_outcome.raw(outcome, &n.to_string());
    }
    o.raw("sessions_finished", &by_outcome.object());
    let mut by_family = Members::default();
    for (family, n) in sessions_by_family {
        by_family.raw(family, &n.to_string());
    }
    o.raw("sessions_by_family", &by_family.object());
    // dyntftpd labels sessions with the router's rule names.
    let mut by_rule = Members::default();
    for (rule, n) in sessions_by_label {
        by_rule.raw(rule, &n.to_string());
    }
    o.raw("sessions_by_rule", &by_rule.object());
    o.raw("sessions_failed", &s.sessions_failed().to_string());
    for (name, value) in [
        ("malformed", malformed),
        ("stray_datagrams", stray_datagrams),
        ("datagrams_sent", datagrams_sent),
        ("bytes_sent", bytes_sent),
        ("retransmits", retransmits),
        ("early_retransmits", early_retransmits),
        ("send_would_block", send_would_block),
        ("send_errors", send_errors),
        ("panics", panics),
        ("rate_limited", rate_limited),
        ("client_limited", client_limited),
        ("busy", busy),
        ("descriptor_pauses", descriptor_pauses),
        ("port_pauses", port_pauses),
    ] {
        o.raw(name, &value.to_string());
    }
    o.raw("busy_poll", &seconds(*busy_poll));
    o.raw("active_sessions", &active_sessions.to_string());
    let h = session_durations;
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
            string(&mut out, &cut(message, LOG_TEXT_MAX));
            out.push('}');
            out
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` appended when
/// cut.
fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// A number, or `null`.
fn number(value: Option<u64>) -> String {
    value.map_or_else(|| "null".into(), |v| v.to_string())
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

    /// A report with every field set, each counter to a different value: built without
    /// `..`, so a field added to [`ServerStats`] breaks this test until it is set here
    /// (and [`stats_members`] no longer compiles until it writes it).
    fn full_report() -> ServerStats {
        let mut session_durations = dyntftp::DurationHistogram::default();
        session_durations.record(Duration::from_micros(31_250));
        session_durations.record(Duration::from_secs(2));
        ServerStats {
            interval: Duration::from_secs(10),
            requests: 1,
            rejected: [(1, 2), (2, 3)].into(),
            write_requests: 4,
            duplicate_requests: 5,
            sessions_started: 6,
            sessions_finished: [("completed", 7), ("timed_out", 8)].into(),
            sessions_by_family: [("grub", 5), ("uefi", 1)].into(),
            sessions_by_label: [("per-mac".into(), 4)].into(),
            malformed: 9,
            stray_datagrams: 10,
            datagrams_sent: 11,
            bytes_sent: 12,
            retransmits: 13,
            early_retransmits: 14,
            send_would_block: 15,
            send_errors: 16,
            panics: 17,
            rate_limited: 18,
            client_limited: 19,
            busy: 20,
            descriptor_pauses: 21,
            port_pauses: 23,
            busy_poll: Duration::from_millis(500),
            active_sessions: 22,
            session_durations,
        }
    }

    fn parse(members: &str) -> serde_json::Value {
        value(&format!("{{{members}}}"))
    }

    fn value(text: &str) -> serde_json::Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// Every field of the report is in the object, with its value, and nothing else is.
    #[test]
    fn stats_members_hold_every_counter() {
        let got = parse(&stats_members(&full_report()));
        let want = value(
            r#"{
            "interval": 10,
            "requests": 1,
            "rejected": {"1": 2, "2": 3},
            "write_requests": 4,
            "duplicate_requests": 5,
            "sessions_started": 6,
            "sessions_finished": {"completed": 7, "timed_out": 8},
            "sessions_failed": 8,
            "sessions_by_family": {"grub": 5, "uefi": 1},
            "sessions_by_rule": {"per-mac": 4},
            "malformed": 9,
            "stray_datagrams": 10,
            "datagrams_sent": 11,
            "bytes_sent": 12,
            "retransmits": 13,
            "early_retransmits": 14,
            "send_would_block": 15,
            "send_errors": 16,
            "panics": 17,
            "rate_limited": 18,
            "client_limited": 19,
            "busy": 20,
            "descriptor_pauses": 21,
            "port_pauses": 23,
            "busy_poll": 0.5,
            "active_sessions": 22,
            "session_durations": {
                "count": 2,
                "sum": 2.03125,
                "buckets": {
                    "0.01": 0, "0.05": 1, "0.1": 1, "0.25": 1, "0.5": 1, "1": 1, "2.5": 2,
                    "5": 2, "10": 2, "30": 2, "60": 2, "120": 2, "300": 2, "600": 2,
                    "+Inf": 2
                }
            }
            }"#,
        );
        assert_eq!(got, want);
    }

    /// A session with every field set, built without `..` (see [`full_report`]).
    fn full_session() -> SessionStats {
        use dyntftp::options::OptionKind;
        use dyntftp::{ErrorCode, Mode, Outcome};
        let started = std::time::Instant::now();
        SessionStats {
            peer: "192.0.2.7:1234".parse().unwrap(),
            local: "192.0.2.1:69".parse().unwrap(),
            filename: "boot/pxelinux.0".into(),
            mode: Mode::Octet,
            requested: vec![
                ("blksize".into(), "1428".into()),
                ("tsize".into(), "0".into()),
            ],
            family: dyntftp::ClientFamily::Other,
            label: Some("per-mac".into()),
            mac: Some(dyntftp::MacAddr([0x02, 0, 0, 0, 0, 0x17])),
            start_time: UNIX_EPOCH + Duration::from_millis(951_782_400_123),
            duration: Duration::from_millis(500),
            outcome: Outcome::PeerError(ErrorCode::DiskFull),
            transfer: TransferStats {
                started,
                finished: Some(started + Duration::from_millis(500)),
                outcome: Some(Outcome::PeerError(ErrorCode::DiskFull)),
                negotiated: Negotiated {
                    blksize: 1428,
                    window: 16,
                    timeout: Some(Duration::from_secs(2)),
                    tsize: Some(1000),
                    acked: vec![(OptionKind::Blksize, 1428), (OptionKind::Tsize, 1000)],
                },
                packets_sent: 1,
                bytes_sent: 2,
                packets_resent: 3,
                bytes_resent: 4,
                bytes_read: 1000,
                size_mismatch: Some(999),
                errors_sent: 5,
                acks: 6,
                blocks_acked: 7,
                duplicate_acks: 8,
                unexpected_acks: 9,
                retransmits: 10,
                early_retransmits: 11,
                go_back_acks: 13,
                go_back_held: 14,
                repeated_requests: 16,
                repeat_resends: 17,
                open_wait: Some(Duration::from_millis(250)),
                srtt: Some(Duration::from_nanos(15_625_000)),
                rttvar: Some(Duration::from_nanos(3_906_250)),
                malformed: 12,
                peer_error: Some((ErrorCode::DiskFull, "disk full".into())),
                error_sent: Some((ErrorCode::NotDefined, "sent".into())),
            },
        }
    }

    /// Every field of the session and of its transfer counters is in the object, with its
    /// value, and nothing else is; the optional ones are `null` when unset.
    #[test]
    fn session_members_hold_every_field() {
        let got = parse(&session_members(&full_session()));
        let want = value(
            r#"{
            "peer": "192.0.2.7:1234",
            "local": "192.0.2.1:69",
            "filename": "boot/pxelinux.0",
            "mode": "octet",
            "family": "other",
            "rule": "per-mac",
            "mac": "02:00:00:00:00:17",
            "requested": [["blksize", "1428"], ["tsize", "0"]],
            "requested_omitted": 0,
            "start_time": "2000-02-29T00:00:00.123Z",
            "duration": 0.5,
            "outcome": "peer_error",
            "error": {"code": 3, "message": "disk full"},
            "rate": 2000,
            "transfer": {
                "negotiated": {
                    "blksize": 1428,
                    "window": 16,
                    "timeout": 2,
                    "tsize": 1000,
                    "acked": {"blksize": 1428, "tsize": 1000}
                },
                "packets_sent": 1,
                "bytes_sent": 2,
                "packets_resent": 3,
                "bytes_resent": 4,
                "bytes_read": 1000,
                "size_mismatch": 999,
                "errors_sent": 5,
                "acks": 6,
                "blocks_acked": 7,
                "duplicate_acks": 8,
                "unexpected_acks": 9,
                "retransmits": 10,
                "early_retransmits": 11,
                "go_back_acks": 13,
                "go_back_held": 14,
                "repeated_requests": 16,
                "repeat_resends": 17,
                "open_wait": 0.25,
                "srtt": 0.015625,
                "rttvar": 0.00390625,
                "malformed": 12,
                "peer_error": {"code": 3},
                "error_sent": {"code": 0, "message": "sent"}
            }
            }"#,
        );
        assert_eq!(got, want);

        let mut bare = full_session();
        let t = &mut bare.transfer;
        t.negotiated.timeout = None;
        t.negotiated.tsize = None;
        t.negotiated.acked.clear();
        t.size_mismatch = None;
        t.srtt = None;
        t.rttvar = None;
        t.open_wait = None;
        bare.label = None;
        bare.mac = None;
        let t = &mut bare.transfer;
        t.peer_error = None;
        t.error_sent = None;
        let got = parse(&session_members(&bare));
        assert_eq!(got["error"], serde_json::Value::Null);
        assert_eq!(got["rule"], serde_json::Value::Null);
        assert_eq!(got["mac"], serde_json::Value::Null);
        let t = &got["transfer"];
        for field in [
            "open_wait",
            "size_mismatch",
            "srtt",
            "rttvar",
            "peer_error",
            "error_sent",
        ] {
            assert_eq!(t[field], serde_json::Value::Null, "{field}: {got}");
        }
        let n = &t["negotiated"];
        assert_eq!(
            (&n["timeout"], &n["tsize"]),
            (&serde_json::Value::Null, &serde_json::Value::Null)
        );
        assert_eq!(n["acked"], serde_json::json!({}));
    }

    /// What a peer chose (name, options, ERROR message) takes a bounded room in a
    /// session record, however much of it came, and the peer's message is there once.
    #[test]
    fn session_members_are_bounded_whatever_the_peer_sent() {
        let mut s = full_session();
        s.filename = "\u{1b}".repeat(65_000);
        s.requested = (0..5000)
            .map(|i| (format!("opt{i}-{}", "n".repeat(100)), "é".repeat(100)))
            .collect();
        let forged =
            "bye\n<forged line>\n\u{1b}[31mred\u{1b}[0m \u{1b}]0;title\u{7} \u{fffd}\u{fffd} end";
        s.transfer.peer_error = Some((dyntftp::ErrorCode::NotDefined, forged.repeat(1000)));
        let members = session_members(&s);
        let got = parse(&members);
        assert!(!members.contains('\n') && !members.contains('\u{1b}'));
        // The worst case: every byte a control character, escaped as \u00XX (six bytes).
        let mut worst = full_session();
        worst.filename = "\u{1}".repeat(65_000);
        worst.requested = vec![("\u{1}".repeat(1000), "\u{1}".repeat(1000)); 5000];
        worst.transfer.peer_error = Some((dyntftp::ErrorCode::NotDefined, "\u{1}".repeat(65_000)));
        worst.transfer.error_sent = None;
        let worst = session_members(&worst);
        parse(&worst);
        assert!(worst.len() < 16 * 1024, "{} bytes: {worst}", worst.len());
        eprintln!(
            "JSON session members: {} bytes at worst, {} bytes for printable junk",
            worst.len(),
            members.len()
        );
        let filename = got["filename"].as_str().unwrap();
        assert_eq!(filename, format!("{}…", "\u{1b}".repeat(LOG_TEXT_MAX)));
        let requested = got["requested"].as_array().unwrap();
        assert_eq!(requested.len(), MAX_LOGGED_OPTIONS);
        assert_eq!(got["requested_omitted"], 5000 - MAX_LOGGED_OPTIONS);
        for pair in requested {
            for part in pair.as_array().unwrap() {
                let part = part.as_str().unwrap();
                assert!(part.ends_with('…') && part.len() <= MAX_LOGGED_OPTION_BYTES + 3);
            }
        }
        let message = got["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(forged) && message.ends_with('…'));
        assert!(message.len() <= LOG_TEXT_MAX + 3);
        assert_eq!(
            got["transfer"]["peer_error"],
            serde_json::json!({"code": 0})
        );
        assert_eq!(
            members.matches("forged line").count(),
            message.matches("forged line").count(),
            "the message is written once: {members}"
        );
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("ééé", 3), "é…");
        assert_eq!(cut("abc", 2), "ab…");
    }

    /// A scratch directory, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("dyntftpd-logging-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_log_file_is_never_a_link_or_a_special_file() {
        let dir = Scratch::new("open");
        let victim = dir.0.join("victim");
        std::fs::write(&victim, "IMPORTANT\n").unwrap();
        let link = dir.0.join("link.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = open_log_file(&link).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // Dangling: not created through the link either.
        let dangling = dir.0.join("dangling.log");
        std::os::unix::fs::symlink(dir.0.join("created"), &dangling).unwrap();
        assert!(open_log_file(&dangling)
            .unwrap_err()
            .contains("symbolic link"));
        assert!(!dir.0.join("created").exists());
        let hard = dir.0.join("hard.log");
        std::fs::hard_link(&victim, &hard).unwrap();
        let err = open_log_file(&hard).unwrap_err();
        assert!(err.contains("2 hard links"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "IMPORTANT\n");
        let err = open_log_file(&dir.0).unwrap_err();
        assert!(err.contains("cannot open the log file"), "{err}");
        let err = open_log_file(Path::new("/dev/null")).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        // A regular file is appended to; a new one is created.
        let log = dir.0.join("ok.log");
        let mut file = open_log_file(&log).unwrap();
        file.write_all(b"line\n").unwrap();
        drop(file);
        open_log_file(&log).unwrap().write_all(b"more\n").unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "line\nmore\n");
    }
}
