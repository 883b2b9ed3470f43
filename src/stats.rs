//! Statistics: per transfer ([`TransferStats`], kept by the session), per session
//! ([`SessionStats`], with the request's identity) and server-wide ([`ServerStats`]).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::family::ClientFamily;
use crate::limit::{LogDecision, LogLimiter};
use crate::mac::MacAddr;
use crate::options::Negotiated;
use crate::packet::{ErrorCode, Mode};
use crate::session::Outcome;

/// The `log` target of the line the server writes for each finished session (at `info`).
/// Stable, so that a logger can route or replace these lines without matching their text.
pub const SESSION_LOG_TARGET: &str = "dyntftp::session";

/// The `log` target of the line the server writes for each statistics report (at `info`).
pub const STATS_LOG_TARGET: &str = "dyntftp::stats";

/// What one transfer did, kept by its [`Session`](crate::session::Session).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferStats {
    /// When the session was created.
    pub started: Instant,
    /// When it ended (`None` while it runs).
    pub finished: Option<Instant>,
    /// How it ended (`None` while it runs).
    pub outcome: Option<Outcome>,
    /// The negotiated parameters.
    pub negotiated: Negotiated,
    /// OACK and DATA packets sent, resends included.
    pub packets_sent: u64,
    /// DATA payload bytes sent, resends included.
    pub bytes_sent: u64,
    /// DATA packets sent again (timer retransmissions and window resumes).
    pub packets_resent: u64,
    /// DATA payload bytes sent again.
    pub bytes_resent: u64,
    /// Bytes read from the source (each byte once).
    pub bytes_read: u64,
    /// The size the source announced ([`ResponseData::size`]), when its data ended at a
    /// different length (`bytes_read` then holds the real one). The transfer follows the
    /// real data, but a client that asked for `tsize` was told the announced size. `None`
    /// when the two agree, when the source announced no size (netascii never does), or
    /// while the end has not been read.
    ///
    /// [`ResponseData::size`]: crate::response::ResponseData::size
    pub size_mismatch: Option<u64>,
    /// ERROR packets sent to the peer.
    pub errors_sent: u64,
    /// ACKs that made progress (ACK 0 of an OACK included).
    pub acks: u64,
    /// Blocks acknowledged.
    pub blocks_acked: u64,
    /// ACKs for the block already acknowledged (ignored, never answered).
    pub duplicate_acks: u64,
    /// ACKs for blocks never sent, or other ACKs out of place (ignored).
    pub unexpected_acks: u64,
    /// Retransmissions on the full timeout's schedule (these spend the retry budget): the
    /// timer's, and those a repeated request brought forward ([`repeat_resends`]).
    ///
    /// [`repeat_resends`]: Self::repeat_resends
    pub retransmits: u64,
    /// Retransmissions sent early because the measured round-trip time is far below the
    /// timeout (they do not spend the retry budget).
    pub early_retransmits: u64,
    /// Go-back-N resends caused by an ACK: one inside the window (the client lost what
    /// followed; made at once, or when the interval allows) or a duplicate (the next block
    /// was lost). At most one per go-back interval (see
    /// [`MIN_GO_BACK_INTERVAL`](crate::session::MIN_GO_BACK_INTERVAL)).
    pub go_back_acks: u64,
    /// ACKs that asked for a go-back-N within the interval of the previous one: they
    /// caused no resend at once (an in-window one slid the window, and its go-back is made
    /// when the interval is over). Many of them are a sign of forged ACKs.
    pub go_back_held: u64,
    /// Requests the peer repeated while the session ran (seen by the driver as identical
    /// to the one that started it).
    pub repeated_requests: u64,
    /// Resends of the first reply (OACK or DATA 1) that a repeated request caused before
    /// the peer acknowledged anything: the first reply was lost. Counted in
    /// [`retransmits`](Self::retransmits) too.
    pub repeat_resends: u64,
    /// How long a [`Deferred`](crate::deferred::Deferred) source took to open (the first
    /// answer waited that long); `None` for a source that was open at once, or never
    /// opened.
    pub open_wait: Option<Duration>,
    /// Smoothed round-trip time measured from ACKs, if any was measured.
    pub srtt: Option<Duration>,
    /// Mean deviation of the measured round-trip time, if any was measured: the early
    /// retransmission interval is `srtt + max(1 ms, 4 × rttvar)`, at least the minimum.
    pub rttvar: Option<Duration>,
    /// Datagrams from the peer that did not parse (ignored).
    pub malformed: u64,
    /// The ERROR the peer sent, if it sent one: code and message (invalid UTF-8 replaced,
    /// then cut to at most [`MAX_PEER_ERROR_LEN`](crate::session::MAX_PEER_ERROR_LEN)
    /// bytes on a character boundary; control characters are kept as sent).
    pub peer_error: Option<(ErrorCode, String)>,
    /// The ERROR we sent that ended the session, if any: code and message.
    pub error_sent: Option<(ErrorCode, String)>,
}

impl TransferStats {
    /// Fresh counters for a transfer that starts at `started`.
    pub fn new(started: Instant, negotiated: Negotiated) -> TransferStats {
        TransferStats {
            started,
            finished: None,
            outcome: None,
            negotiated,
            packets_sent: 0,
            bytes_sent: 0,
            packets_resent: 0,
            bytes_resent: 0,
            bytes_read: 0,
            size_mismatch: None,
            errors_sent: 0,
            acks: 0,
            blocks_acked: 0,
            duplicate_acks: 0,
            unexpected_acks: 0,
            retransmits: 0,
            early_retransmits: 0,
            go_back_acks: 0,
            go_back_held: 0,
            repeated_requests: 0,
            repeat_resends: 0,
            open_wait: None,
            srtt: None,
            rttvar: None,
            malformed: 0,
            peer_error: None,
            error_sent: None,
        }
    }

    /// Records the end of the transfer.
    pub fn finish(&mut self, now: Instant, outcome: Outcome) {
        self.finished = Some(now);
        self.outcome = Some(outcome);
    }

    /// Time from start to end (or to `now` while running).
    pub fn duration(&self, now: Instant) -> Duration {
        self.finished
            .unwrap_or(now)
            .saturating_duration_since(self.started)
    }
}

/// Everything about one finished session, given to
/// [`Handler::session_finished`](crate::handler::Handler::session_finished).
#[derive(Clone, Debug)]
pub struct SessionStats {
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The address the client sent its request to.
    pub local: SocketAddr,
    /// The requested filename (invalid UTF-8 replaced), cut to
    /// [`STORED_FILENAME_BYTES`](crate::server::STORED_FILENAME_BYTES) (ending with `…`).
    pub filename: String,
    /// The transfer mode.
    pub mode: Mode,
    /// The options as the client requested them (name, value), in request order: the
    /// first [`STORED_OPTIONS`](crate::server::STORED_OPTIONS), names and values cut to
    /// [`STORED_OPTION_BYTES`](crate::server::STORED_OPTION_BYTES).
    pub requested: Vec<(String, String)>,
    /// The client family the request looked like.
    pub family: ClientFamily,
    /// What the handler named as having answered (see
    /// [`ReadRequest::set_label`](crate::ReadRequest::set_label)), if it did.
    pub label: Option<Arc<str>>,
    /// The client's MAC, when the handler asked for it
    /// ([`ReadRequest::mac`](crate::ReadRequest::mac)) and it was known.
    pub mac: Option<MacAddr>,
    /// Wall-clock time the session started.
    pub start_time: SystemTime,
    /// How long it lasted.
    pub duration: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// Negotiated options, counters and errors.
    pub transfer: TransferStats,
}

impl SessionStats {
    /// The error that ended the session, if any: the one the peer sent, else the one we
    /// sent.
    pub fn error(&self) -> Option<&(ErrorCode, String)> {
        self.transfer
            .peer_error
            .as_ref()
            .or(self.transfer.error_sent.as_ref())
    }

    /// Average payload rate in bytes per second (bytes read from the source over the
    /// duration).
    pub fn rate(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.transfer.bytes_read as f64 / secs
        } else {
            0.0
        }
    }
}

/// Server-wide counters since the previous report, plus gauges, given to
/// [`Handler::server_stats`](crate::handler::Handler::server_stats) every stats interval.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Time covered by these counters.
    pub interval: Duration,
    /// Well-formed read requests received.
    pub requests: u64,
    /// Requests refused, by the ERROR code sent (wire value → count).
    pub rejected: BTreeMap<u16, u64>,
    /// Write requests refused.
    pub write_requests: u64,
    /// RRQs repeated by a peer whose session was still running (handed to the session,
    /// which may resend its first reply), and different RRQs to a verified session
    /// (ignored).
    pub duplicate_requests: u64,
    /// Sessions started.
    pub sessions_started: u64,
    /// Sessions ended, by outcome name ([`Outcome::as_str`]).
    pub sessions_finished: BTreeMap<&'static str, u64>,
    /// Sessions started, by the client family their request looked like
    /// ([`ClientFamily::as_str`]).
    pub sessions_by_family: BTreeMap<&'static str, u64>,
    /// Sessions ended, by the label their handler gave them
    /// ([`ReadRequest::set_label`](crate::ReadRequest::set_label)); at most
    /// [`MAX_LABELS`] labels, the sessions of any other under `other`.
    pub sessions_by_label: BTreeMap<Arc<str>, u64>,
    /// Datagrams on a listener that did not parse, or had an opcode other than RRQ/WRQ.
    pub malformed: u64,
    /// Datagrams on a session socket from another address or port (answered with ERROR 5).
    pub stray_datagrams: u64,
    /// Datagrams sent (DATA, OACK, ERROR).
    pub datagrams_sent: u64,
    /// DATA payload bytes sent, resends included.
    pub bytes_sent: u64,
    /// Timer-driven retransmissions at the full timeout.
    pub retransmits: u64,
    /// Early retransmissions at the adaptive (round-trip based) timeout.
    pub early_retransmits: u64,
    /// Sends dropped because the socket buffer was full (the timer recovers them).
    pub send_would_block: u64,
    /// Other send failures.
    pub send_errors: u64,
    /// Panics caught in user code (handler or source).
    pub panics: u64,
    /// Datagrams to a listener dropped, unanswered, because their client was over the
    /// request rate.
    pub rate_limited: u64,
    /// Requests refused because their client already ran the most sessions allowed.
    pub client_limited: u64,
    /// Requests dropped (the client resends them) because no session could start for
    /// them: the queue of waiting requests was full, or they waited longer than its
    /// bound (3 s).
    pub busy: u64,
    /// Times the server ran out of file descriptors and paused taking requests.
    pub descriptor_pauses: u64,
    /// Times no port was free for a session socket (every port of the
    /// [port range](crate::ServerBuilder::port_range), or of the kernel's ephemeral
    /// range, in use) and the server paused taking requests.
    pub port_pauses: u64,
    /// Time the loop spent polling without sleeping ([`ServerBuilder::busy_poll`]).
    ///
    /// [`ServerBuilder::busy_poll`]: crate::server::ServerBuilder::busy_poll
    pub busy_poll: Duration,
    /// Gauge: sessions running at the time of the report.
    pub active_sessions: u64,
    /// How long the sessions that ended in this interval lasted.
    pub session_durations: DurationHistogram,
}

/// The most distinct labels [`ServerStats::sessions_by_label`] keeps, besides `other`.
pub const MAX_LABELS: usize = 64;

/// Where [`ServerStats::sessions_by_label`] counts the sessions of labels past the cap.
const OTHER_LABEL: &str = "other";

impl ServerStats {
    /// Adds `n` sessions to `label`'s count, or to `other`'s once [`MAX_LABELS`] labels
    /// are counted: a handler whose labels vary per client cannot grow the map (or the
    /// metrics) without bound.
    pub fn count_label(&mut self, label: &Arc<str>, n: u64) {
        let labels = &mut self.sessions_by_label;
        let others = usize::from(labels.contains_key(OTHER_LABEL));
        if let Some(count) = labels.get_mut(label) {
            *count += n;
        } else if labels.len() - others < MAX_LABELS || &**label == OTHER_LABEL {
            labels.insert(Arc::clone(label), n);
        } else {
            *labels.entry(Arc::from(OTHER_LABEL)).or_default() += n;
        }
    }

    /// Adds another report's counters, gauge and histogram to these (the interval is
    /// the longer of the two): how the reports of several workers, or of several
    /// intervals, are summed.
    pub fn merge(&mut self, other: &ServerStats) {
        self.interval = self.interval.max(other.interval);
        self.requests += other.requests;
        for (code, n) in &other.rejected {
            *self.rejected.entry(*code).or_default() += n;
        }
        self.write_requests += other.write_requests;
        self.duplicate_requests += other.duplicate_requests;
        self.sessions_started += other.sessions_started;
        for (outcome, n) in &other.sessions_finished {
            *self.sessions_finished.entry(outcome).or_default() += n;
        }
        for (family, n) in &other.sessions_by_family {
            *self.sessions_by_family.entry(family).or_default() += n;
        }
        for (label, n) in &other.sessions_by_label {
            self.count_label(label, *n);
        }
        self.malformed += other.malformed;
        self.stray_datagrams += other.stray_datagrams;
        self.datagrams_sent += other.datagrams_sent;
        self.bytes_sent += other.bytes_sent;
        self.retransmits += other.retransmits;
        self.early_retransmits += other.early_retransmits;
        self.send_would_block += other.send_would_block;
        self.send_errors += other.send_errors;
        self.panics += other.panics;
        self.rate_limited += other.rate_limited;
        self.client_limited += other.client_limited;
        self.busy += other.busy;
        self.descriptor_pauses += other.descriptor_pauses;
        self.port_pauses += other.port_pauses;
        self.busy_poll += other.busy_poll;
        self.active_sessions += other.active_sessions;
        self.session_durations.merge(&other.session_durations);
    }

    /// Sessions ended with a failure outcome (not completed, final ACK missing or probe).
    pub fn sessions_failed(&self) -> u64 {
        self.sessions_finished
            .iter()
            .filter(|(name, _)| !Outcome::from_name(name).is_some_and(Outcome::is_success))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Upper bounds of the [`DurationHistogram`] buckets: from 10 ms (a small file on a LAN) to
/// 10 minutes (a large image over a slow or lossy link).
pub const DURATION_BUCKETS: [Duration; 14] = [
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_millis(2500),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
];

/// A histogram of durations over the fixed [`DURATION_BUCKETS`], plus an overflow bucket,
/// their count and their sum: what a Prometheus histogram needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    /// Per bucket (not cumulative): `counts[i]` holds durations in
    /// `(DURATION_BUCKETS[i-1], DURATION_BUCKETS[i]]`; the last entry holds those above
    /// the largest bound. Boxed to keep [`ServerStats`] small.
    counts: Box<[u64; DURATION_BUCKETS.len() + 1]>,
    sum: Duration,
}

impl DurationHistogram {
    /// Adds one duration.
    pub fn record(&mut self, duration: Duration) {
        let bucket = DURATION_BUCKETS.partition_point(|bound| *bound < duration);
        self.counts[bucket] += 1;
        self.sum = self.sum.saturating_add(duration);
    }

    /// Adds every duration recorded in `other`.
    pub fn merge(&mut self, other: &DurationHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.sum = self.sum.saturating_add(other.sum);
    }

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their sum.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// Cumulative counts, Prometheus style: for each bound of [`DURATION_BUCKETS`] the
    /// durations at most that long, then `(None, count())` for `+Inf`.
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        let bounds = DURATION_BUCKETS.iter().copied().map(Some).chain([None]);
        bounds.zip(self.counts.iter().scan(0, |total, n| {
            *total += n;
            Some(*total)
        }))
    }
}

/// The most bytes a peer-supplied string (a filename, an ERROR message, an option) takes
/// in a log line once escaped, quotes and truncation mark aside.
pub const LOG_TEXT_MAX: usize = 200;

/// Peer-supplied text made safe for a one-line log: in double quotes, with `"` and `\`
/// escaped, newline, carriage return and tab as `\n`, `\r` and `\t`, other control
/// characters (C0, DEL, C1), line and paragraph separators, bidirectional controls, the
/// byte-order mark and U+FFFD (where a lossy conversion replaced bad bytes) as `\u{…}`,
/// and bytes that are not UTF-8 as `\xNN`. At most [`LOG_TEXT_MAX`] bytes of escaped
/// text are written; when the text was cut, `…` and its full length follow the closing
/// quote: `"aaaa"…(70000 bytes)`.
#[derive(Clone, Copy, Debug)]
pub struct LogText<'a>(pub &'a [u8]);

impl<'a> LogText<'a> {
    /// Wraps a string or bytes.
    pub fn new(text: &'a (impl AsRef<[u8]> + ?Sized)) -> LogText<'a> {
        LogText(text.as_ref())
    }
}

impl fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut escaped = String::with_capacity(LOG_TEXT_MAX.min(self.0.len() * 4) + 4);
        let whole = escape_for_log(&mut escaped, self.0, LOG_TEXT_MAX);
        write!(f, "\"{escaped}\"")?;
        if !whole {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

/// Appends `text` to `out` escaped as [`LogText`] describes (without the quotes), at most
/// `max` bytes of escaped text; false when it had to stop before the end.
pub fn escape_for_log(out: &mut String, text: &[u8], max: usize) -> bool {
    let limit = out.len() + max;
    let mut piece = String::with_capacity(12);
    for chunk in text.utf8_chunks() {
        for c in chunk.valid().chars() {
            piece.clear();
            match c {
                '"' => piece.push_str("\\\""),
                '\\' => piece.push_str("\\\\"),
                '\n' => piece.push_str("\\n"),
                '\r' => piece.push_str("\\r"),
                '\t' => piece.push_str("\\t"),
                c if hidden_in_logs(c) => {
                    let _ = write!(piece, "\\u{{{:x}}}", u32::from(c));
                }
                c => piece.push(c),
            }
            if out.len() + piece.len() > limit {
                return false;
            }
            out.push_str(&piece);
        }
        for byte in chunk.invalid() {
            if out.len() + 4 > limit {
                return false;
            }
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    true
}

/// Characters a terminal or log viewer acts on, or shows as something else: controls,
/// line breaks outside ASCII, bidirectional overrides, invisible marks.
fn hidden_in_logs(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2069}'
                | '\u{feff}'
                | '\u{fffd}'
        )
}

/// Session lines held back by a [`SessionLogLimiter`] since it last said so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldBack {
    /// Session lines not written.
    pub lines: u64,
    /// Of those, lines of sessions that failed before any ACK.
    pub unverified_failures: u64,
}

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} session lines held back by the log rate limit ({} of sessions that failed \
             before any ACK); the statistics reports count every session",
            self.lines, self.unverified_failures
        )
    }
}

/// The rate limit on per-session log lines, so that a flood of requests cannot fill a
/// disk: lines of sessions that failed before the peer sent any ACK (what spoofed
/// requests produce) pass at [`UNVERIFIED_FAILURE_LINES`](Self::UNVERIFIED_FAILURE_LINES)
/// per [`PERIOD`](Self::PERIOD), and all lines together at
/// [`LINES`](Self::LINES) per period: a boot storm of a thousand sessions a second is
/// logged in full, anything beyond is counted. What was held back is said in a later
/// line ([`take_held_back`](Self::take_held_back)). Takes `now`; no clock reads.
#[derive(Debug)]
pub struct SessionLogLimiter {
    all: LogLimiter,
    unverified_failures: LogLimiter,
    held_back: HeldBack,
}

impl SessionLogLimiter {
    /// The period over which lines are counted.
    pub const PERIOD: Duration = Duration::from_secs(10);
    /// Session lines per period, all sessions together.
    pub const LINES: u32 = 10_000;
    /// Lines per period of sessions that failed before any ACK.
    pub const UNVERIFIED_FAILURE_LINES: u32 = 100;

    /// A limiter with the rates above.
    pub fn new() -> SessionLogLimiter {
        SessionLogLimiter {
            all: LogLimiter::new(Self::PERIOD, Self::LINES),
            unverified_failures: LogLimiter::new(Self::PERIOD, Self::UNVERIFIED_FAILURE_LINES),
            held_back: HeldBack::default(),
        }
    }

    /// Whether the line of `session` is written at `now`; counted as held back if not.
    pub fn allow(&mut self, now: Instant, session: &SessionStats) -> bool {
        // A refusal after a deferred open is no failure, but like one it comes before any
        // ACK, so a spoofed source can cause it: it shares the unverified failures' lines.
        let unverified_failure = session.transfer.acks == 0
            && (!session.outcome.is_success() || session.outcome == Outcome::Refused);
        let allowed = (!unverified_failure
            || self.unverified_failures.check(now) != LogDecision::Suppress)
            && self.all.check(now) != LogDecision::Suppress;
        if !allowed {
            self.held_back.lines += 1;
            self.held_back.unverified_failures += u64::from(unverified_failure);
        }
        allowed
    }

    /// The lines held back since the last call, if any (then the count starts over).
    pub fn take_held_back(&mut self) -> Option<HeldBack> {
        let held_back = std::mem::take(&mut self.held_back);
        (held_back.lines > 0).then_some(held_back)
    }
}

impl Default for SessionLogLimiter {
    fn default() -> SessionLogLimiter {
        SessionLogLimiter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload of the review's log-injection test: forged lines, terminal escapes (CSI
    /// colour, OSC title with BEL) and bytes that are not UTF-8.
    const FORGED: &[u8] = b"bye\n2026-01-01T00:00:00Z [WARN] forged: root login\n\x1b[31mred\x1b[0m \x1b]0;title\x07 \xff\xfe end";

    #[test]
    fn log_text_escapes_forged_lines_and_terminal_escapes() {
        let shown = LogText(FORGED).to_string();
        assert_eq!(
            shown,
            "\"bye\\n2026-01-01T00:00:00Z [WARN] forged: root login\\n\\u{1b}[31mred\\u{1b}[0m \
             \\u{1b}]0;title\\u{7} \\xff\\xfe end\""
        );
        assert!(shown.chars().all(|c| !c.is_control()), "{shown}");
        // The same once converted lossily, as the session's statistics hold it.
        let lossy = String::from_utf8_lossy(FORGED);
        let shown = LogText::new(&*lossy).to_string();
        assert!(shown.ends_with(" \\u{fffd}\\u{fffd} end\""), "{shown}");
        assert!(shown.chars().all(|c| !c.is_control()), "{shown}");
        for (text, want) in [
            ("plain/file.bin", "\"plain/file.bin\""),
            (
                "quote\" back\\ tab\t cr\r",
                "\"quote\\\" back\\\\ tab\\t cr\\r\"",
            ),
            ("é ünï", "\"é ünï\""),
            (
                "\u{202e}gpj.exe \u{2028} \u{85} \u{7f} \0",
                "\"\\u{202e}gpj.exe \\u{2028} \\u{85} \\u{7f} \\u{0}\"",
            ),
        ] {
            assert_eq!(LogText::new(text).to_string(), want, "{text:?}");
        }
    }

    #[test]
    fn log_text_is_cut_at_the_bound_and_says_so() {
        let long = vec![b'x'; 70_000];
        let shown = LogText(&long).to_string();
        assert_eq!(
            shown,
            format!("\"{}\"…(70000 bytes)", "x".repeat(LOG_TEXT_MAX))
        );
        // Escapes are never cut in half, and the bound holds for escaped text too.
        for text in [
            vec![0xffu8; 1000],
            vec![b'\n'; 1000],
            "é".repeat(500).into_bytes(),
        ] {
            let shown = LogText(&text).to_string();
            let inner = shown[1..].split('"').next().unwrap();
            assert!(
                inner.len() <= LOG_TEXT_MAX && inner.len() > LOG_TEXT_MAX - 4,
                "{shown}"
            );
            assert!(
                shown.ends_with(&format!("…({} bytes)", text.len())),
                "{shown}"
            );
        }
        assert_eq!(
            LogText(&[0xff; 50]).to_string(),
            format!("\"{}\"", "\\xff".repeat(50))
        );
        let exactly = "y".repeat(LOG_TEXT_MAX);
        assert_eq!(LogText::new(&exactly).to_string(), format!("\"{exactly}\""));
    }

    fn session(outcome: Outcome, acks: u64) -> SessionStats {
        let now = Instant::now();
        let mut transfer = TransferStats::new(now, Negotiated::default());
        transfer.acks = acks;
        SessionStats {
            peer: "192.0.2.1:1000".parse().unwrap(),
            local: "192.0.2.2:69".parse().unwrap(),
            filename: "f".into(),
            mode: Mode::Octet,
            requested: Vec::new(),
            family: ClientFamily::Other,
            label: None,
            mac: None,
            start_time: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            outcome,
            transfer,
        }
    }

    #[test]
    fn a_flood_of_unverified_failures_is_cut_to_a_bounded_number_of_lines_and_counted() {
        let t0 = Instant::now();
        let mut limiter = SessionLogLimiter::new();
        let spoofed = session(Outcome::TimedOut, 0);
        let n = 50_000;
        let written = (0..n).filter(|_| limiter.allow(t0, &spoofed)).count() as u64;
        assert_eq!(
            written,
            u64::from(SessionLogLimiter::UNVERIFIED_FAILURE_LINES)
        );
        let held = limiter.take_held_back().unwrap();
        assert_eq!(
            held,
            HeldBack {
                lines: n - written,
                unverified_failures: n - written
            }
        );
        assert!(
            held.to_string()
                .starts_with("49900 session lines held back"),
            "{held}"
        );
        assert_eq!(limiter.take_held_back(), None, "said once");
        // Meanwhile, sessions that a client acknowledged are still logged, and failures
        // after an ACK are not unverified.
        assert!(limiter.allow(t0, &session(Outcome::Completed, 3)));
        assert!(limiter.allow(t0, &session(Outcome::TimedOut, 1)));
        assert!(limiter.allow(t0, &session(Outcome::Probe, 0)));
        // A deferred source's refusal is no failure, but a spoofed request can cause it:
        // it shares the spent budget.
        assert!(!limiter.allow(t0, &session(Outcome::Refused, 0)));
        // The next period lets a new batch through.
        let t1 = t0 + SessionLogLimiter::PERIOD;
        assert!(limiter.allow(t1, &spoofed));
    }

    #[test]
    fn a_boot_storm_is_logged_up_to_the_global_cap_then_counted() {
        let t0 = Instant::now();
        let mut limiter = SessionLogLimiter::new();
        let good = session(Outcome::Completed, 10);
        let n = 25_000u64;
        let written = (0..n).filter(|_| limiter.allow(t0, &good)).count() as u64;
        assert_eq!(written, u64::from(SessionLogLimiter::LINES));
        assert_eq!(
            limiter.take_held_back(),
            Some(HeldBack {
                lines: n - written,
                unverified_failures: 0
            })
        );
    }

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let mut h = DurationHistogram::default();
        for ms in [0, 10, 11, 50, 999, 1000, 600_000, 600_001, 3_600_000] {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 9);
        assert_eq!(h.sum(), Duration::from_millis(4_802_071));
        let cumulative: Vec<_> = h.cumulative().collect();
        assert_eq!(cumulative.len(), DURATION_BUCKETS.len() + 1);
        assert_eq!(cumulative[0], (Some(Duration::from_millis(10)), 2));
        assert_eq!(cumulative[1], (Some(Duration::from_millis(50)), 4));
        assert_eq!(cumulative[5], (Some(Duration::from_secs(1)), 6));
        assert_eq!(cumulative[13], (Some(Duration::from_secs(600)), 7));
        assert_eq!(cumulative[14], (None, 9));
        assert!(cumulative.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn histograms_merge() {
        let mut a = DurationHistogram::default();
        let mut b = DurationHistogram::default();
        a.record(Duration::from_millis(20));
        b.record(Duration::from_millis(20));
        b.record(Duration::from_secs(7));
        a.merge(&b);
        let mut want = DurationHistogram::default();
        for d in [20, 20, 7000] {
            want.record(Duration::from_millis(d));
        }
        assert_eq!(a, want);
    }

    #[test]
    fn labels_are_counted_up_to_the_cap_then_under_other() {
        let mut stats = ServerStats::default();
        for i in 0..MAX_LABELS + 10 {
            stats.count_label(&Arc::from(format!("rule-{i}")), 1);
        }
        stats.count_label(&Arc::from("rule-0"), 2);
        assert_eq!(stats.sessions_by_label.len(), MAX_LABELS + 1);
        assert_eq!(stats.sessions_by_label["rule-0"], 3);
        assert_eq!(stats.sessions_by_label["other"], 10);
        let mut merged = ServerStats::default();
        merged.merge(&stats);
        merged.merge(&stats);
        assert_eq!(merged.sessions_by_label.len(), MAX_LABELS + 1);
        assert_eq!(merged.sessions_by_label["other"], 20);
    }
}
