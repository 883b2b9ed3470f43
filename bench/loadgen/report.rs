//! The report of a run: text for people, `--json`, `--kv`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::cli::{Config, Expected, Output};
use crate::sys::Cpu;

/// Counters of a TFTP run.
#[derive(Default)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub payload_bytes: u64,
    /// Transfers (and their bytes) completed within `--duration`: the rates of a run
    /// that stopped on its duration are measured over that window, without the tail of
    /// transfers that were still in flight.
    pub ok_in_window: u64,
    pub bytes_in_window: u64,
    pub latencies_us: Vec<u64>,
    pub retransmits: u64,
    pub gap_acks: u64,
    pub dropped: u64,
    pub foreign: u64,
    /// Datagrams of shared-socket clients the kernel refused to send (no buffer space).
    pub send_drops: u64,
    /// Datagrams the clients received (from the server, or for a transfer that had
    /// ended): the denominator of the server's CPU per datagram in bench/compare.sh.
    pub datagrams_received: u64,
    pub failures: BTreeMap<String, u64>,
    pub ws_acked: u64,
    pub ws_not_acked: u64,
    pub bs_acked: u64,
    pub bs_not_acked: u64,
    /// Verified payload bytes of transfers that failed (or were cut by `--time-limit`).
    pub partial_bytes: u64,
    pub negotiated_blksize: Option<usize>,
    pub negotiated_windowsize: Option<u64>,
}

/// The report of a TFTP run, in the format `c.output` asks for (sorts the latencies).
pub fn tftp(c: &Config, s: &mut Stats, wall: Duration, cpu: Cpu, pass: bool) -> String {
    s.latencies_us.sort_unstable();
    let pct = |p: f64| percentile_ms(&s.latencies_us, p);
    let secs = wall.as_secs_f64().max(1e-9);
    let (rate_secs, rate_ok, rate_bytes) = match c.duration {
        Some(d) if wall > d => (d.as_secs_f64(), s.ok_in_window, s.bytes_in_window),
        _ => (secs, s.ok, s.payload_bytes),
    };
    let sessions_per_s = rate_ok as f64 / rate_secs;
    let mb_per_s = rate_bytes as f64 / rate_secs / 1e6;
    let cpu_pct = cpu.total() / secs * 100.0;
    // Everything verified, including the part of failed transfers, over the whole run.
    let delivered_mb_per_s = (s.payload_bytes + s.partial_bytes) as f64 / secs / 1e6;
    let ws_acked = Acked::new(c.windowsize.is_some(), s.ws_acked, s.ws_not_acked);
    let bs_acked = Acked::new(c.blksize.is_some(), s.bs_acked, s.bs_not_acked);
    let verification = match c.expected.first() {
        Some(Expected::Size(_)) => "size",
        _ => "bytes",
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let sockets = if c.shared_socket { "shared" } else { "own" };
    let mut out = String::new();
    if c.output == Output::Kv {
        // Failure reasons become `reason:count` pairs, spaces and commas replaced.
        let failures: Vec<String> = s
            .failures
            .iter()
            .map(|(reason, n)| format!("{}:{n}", kv_token(reason)))
            .collect();
        let num = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "mode=tftp ok={} failed={} elapsed_s={:.6} sessions_per_s={:.3} \
             payload_mb_per_s={:.3} delivered_mb_per_s={delivered_mb_per_s:.3} \
             p50_ms={} p90_ms={} p99_ms={} max_ms={} client_retransmits={} gap_acks={} \
             dropped={} send_drops={} datagrams_received={} partial_bytes={} windowsize_acknowledged={} \
             blksize_acknowledged={} negotiated_blksize={} negotiated_windowsize={} \
             cpu_s={:.3} cpu_pct={cpu_pct:.1} client_sockets={} failures={} pass={pass}",
            s.ok,
            s.failed,
            wall.as_secs_f64(),
            sessions_per_s,
            mb_per_s,
            num(pct(50.0).map(fixed3)),
            num(pct(90.0).map(fixed3)),
            num(pct(99.0).map(fixed3)),
            num(pct(100.0).map(fixed3)),
            s.retransmits,
            s.gap_acks,
            s.dropped,
            s.send_drops,
            s.datagrams_received,
            s.partial_bytes,
            ws_acked.token(),
            bs_acked.token(),
            num(s.negotiated_blksize.map(|n| n.to_string())),
            num(s.negotiated_windowsize.map(|n| n.to_string())),
            cpu.total(),
            sockets,
            if failures.is_empty() {
                "-".to_string()
            } else {
                failures.join(",")
            },
        );
        return out;
    }
    if c.output == Output::Json {
        let mut failures = Json::object();
        for (reason, n) in &s.failures {
            failures = failures.raw(reason, n);
        }
        let files: Vec<String> = c.files.iter().map(|f| json_str(f)).collect();
        let latency = Json::object()
            .opt("p50", pct(50.0).map(fixed3))
            .opt("p90", pct(90.0).map(fixed3))
            .opt("p99", pct(99.0).map(fixed3))
            .opt("max", pct(100.0).map(fixed3));
        let json = Json::object()
            .str("mode", "tftp")
            .str("server", &c.server.to_string())
            .raw("files", format!("[{}]", files.join(",")))
            .str("verification", verification)
            .raw("concurrency", c.concurrency)
            .opt("count", c.count)
            .opt("duration_s", c.duration.map(|d| fixed3(d.as_secs_f64())))
            .opt("blksize", c.blksize)
            .opt("windowsize", c.windowsize)
            .raw("tsize", c.tsize)
            .opt("timeout", c.timeout)
            .raw("client_timeout_ms", c.client_timeout.as_millis())
            .raw("drop_pct", c.drop_pct)
            .raw("seed", c.seed)
            .raw("rcvbuf", c.rcvbuf)
            .str("client_sockets", sockets)
            .opt(
                "time_limit_s",
                c.time_limit.map(|d| fixed3(d.as_secs_f64())),
            )
            .raw("transfers_ok", s.ok)
            .raw("transfers_failed", s.failed)
            .raw("elapsed_s", format!("{:.6}", wall.as_secs_f64()))
            .raw("rate_window_s", format!("{rate_secs:.6}"))
            .raw("sessions_per_s", fixed3(sessions_per_s))
            .raw("payload_bytes", s.payload_bytes)
            .raw("payload_mb_per_s", fixed3(mb_per_s))
            .raw("delivered_mb_per_s", fixed3(delivered_mb_per_s))
            .raw("partial_bytes", s.partial_bytes)
            .raw("latency_ms", latency.end())
            .raw("client_retransmits", s.retransmits)
            .raw("gap_acks", s.gap_acks)
            .raw("dropped_packets", s.dropped)
            .raw("foreign_packets", s.foreign)
            .raw("send_drops", s.send_drops)
            .raw("datagrams_received", s.datagrams_received)
            .raw("failures", failures.end())
            .str("windowsize_acknowledged", &ws_acked.text())
            .str("blksize_acknowledged", &bs_acked.text())
            .opt("negotiated_blksize", s.negotiated_blksize)
            .opt("negotiated_windowsize", s.negotiated_windowsize)
            .cpu(cpu, cpu_pct)
            .raw("pass", pass);
        return json.end() + "\n";
    }
    let _ = writeln!(
        out,
        "config: server {} files {} verify {verification} concurrency {} count {} \
         duration {} blksize {} windowsize {} tsize {} timeout {} client-timeout {} ms \
         drop {}% seed {} rcvbuf {} time-limit {} client sockets {sockets}",
        c.server,
        c.files.join(","),
        c.concurrency,
        opt(c.count.map(|n| n.to_string())),
        opt(c.duration.map(|d| format!("{}s", d.as_secs_f64()))),
        opt(c.blksize.map(|n| n.to_string())),
        opt(c.windowsize.map(|n| n.to_string())),
        if c.tsize { "yes" } else { "no" },
        opt(c.timeout.map(|n| format!("{n}s"))),
        c.client_timeout.as_millis(),
        c.drop_pct,
        c.seed,
        c.rcvbuf,
        opt(c.time_limit.map(|d| format!("{}s", d.as_secs_f64()))),
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
    let _ = writeln!(out, "transfers ok/failed: {}/{}", s.ok, s.failed);
    let _ = write!(out, "elapsed: {:.4} s", wall.as_secs_f64());
    if rate_secs < secs {
        let _ = write!(
            out,
            " (rates: transfers done within the {rate_secs} s duration)"
        );
    }
    out.push('\n');
    let _ = writeln!(out, "sessions/s: {sessions_per_s:.1}");
    let _ = writeln!(out, "payload MB/s: {mb_per_s:.2}");
    if s.partial_bytes > 0 {
        let _ = writeln!(
            out,
            "delivered MB/s (with the verified part of failed transfers): \
             {delivered_mb_per_s:.2}"
        );
    }
    let _ = writeln!(
        out,
        "latency ms p50/p90/p99/max: {}/{}/{}/{}",
        ms(pct(50.0)),
        ms(pct(90.0)),
        ms(pct(99.0)),
        ms(pct(100.0))
    );
    let _ = writeln!(
        out,
        "client retransmits: {} (gap acks {}, dropped packets {}, foreign packets {}, \
         send drops {}); datagrams received: {}",
        s.retransmits, s.gap_acks, s.dropped, s.foreign, s.send_drops, s.datagrams_received
    );
    if s.failures.is_empty() {
        let _ = writeln!(out, "failures: none");
    } else {
        let _ = writeln!(out, "failures:");
        for (reason, n) in &s.failures {
            let _ = writeln!(out, "  {n:>8}  {reason}");
        }
    }
    let _ = writeln!(out, "windowsize acknowledged: {}", ws_acked.text());
    let _ = writeln!(out, "blksize acknowledged: {}", bs_acked.text());
    let _ = writeln!(
        out,
        "negotiated: blksize {} windowsize {}",
        opt(s.negotiated_blksize.map(|n| n.to_string())),
        opt(s.negotiated_windowsize.map(|n| n.to_string()))
    );
    let _ = writeln!(
        out,
        "loadgen cpu: {:.3} s (user {:.3} s, sys {:.3} s) = {cpu_pct:.1}% of wall",
        cpu.total(),
        cpu.user,
        cpu.sys
    );
    let _ = writeln!(out, "result: {}", if pass { "PASS" } else { "FAIL" });
    out
}

/// Whether the server acknowledged a requested option in its OACK, over all transfers.
enum Acked {
    NotRequested,
    /// No transfer got an OACK or DATA 1.
    Unknown,
    Yes,
    No,
    Partial {
        yes: u64,
        no: u64,
    },
}

impl Acked {
    fn new(requested: bool, yes: u64, no: u64) -> Acked {
        match (requested, yes, no) {
            (false, _, _) => Acked::NotRequested,
            (true, 0, 0) => Acked::Unknown,
            (true, _, 0) => Acked::Yes,
            (true, 0, _) => Acked::No,
            (true, yes, no) => Acked::Partial { yes, no },
        }
    }

    fn text(&self) -> String {
        match self {
            Acked::NotRequested => "not requested".into(),
            Acked::Unknown => "unknown (no reply)".into(),
            Acked::Yes => "yes".into(),
            Acked::No => "no".into(),
            Acked::Partial { yes, no } => format!("partial ({yes} of {})", yes + no),
        }
    }

    /// The same as one word, for `--kv`.
    fn token(&self) -> &'static str {
        match self {
            Acked::NotRequested => "not-requested",
            Acked::Unknown => "unknown",
            Acked::Yes => "yes",
            Acked::No => "no",
            Acked::Partial { .. } => "partial",
        }
    }
}

/// `text` as one `--kv` value: whitespace, `=`, `,` and `:` become `_`.
fn kv_token(text: &str) -> String {
    text.chars()
        .map(|ch| {
            if ch.is_whitespace() || ch.is_control() || matches!(ch, '=' | ',' | ':') {
                '_'
            } else {
                ch
            }
        })
        .collect()
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    Some(sorted_us[index] as f64 / 1000.0)
}

/// A JSON object written by hand: fields in order, values already encoded.
pub struct Json(String);

impl Json {
    pub fn object() -> Json {
        Json(String::from("{"))
    }

    /// Adds a field whose value is already valid JSON (a number, `true`, an object…).
    pub fn raw(mut self, name: &str, value: impl std::fmt::Display) -> Json {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "{}:{value}", json_str(name));
        self
    }

    pub fn str(self, name: &str, value: &str) -> Json {
        self.raw(name, json_str(value))
    }

    /// Adds a field that is `null` when absent.
    fn opt(self, name: &str, value: Option<impl std::fmt::Display>) -> Json {
        match value {
            Some(v) => self.raw(name, v),
            None => self.raw(name, "null"),
        }
    }

    pub fn cpu(self, cpu: Cpu, pct: f64) -> Json {
        self.raw("cpu_user_s", fixed3(cpu.user))
            .raw("cpu_sys_s", fixed3(cpu.sys))
            .raw("cpu_s", fixed3(cpu.total()))
            .raw("cpu_pct", format!("{pct:.1}"))
    }

    pub fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

pub fn fixed3(v: f64) -> String {
    format!("{v:.3}")
}

fn json_str(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
