//! Option negotiation (RFC 2347, 2348, 2349, 7440) under server [`Limits`].
//!
//! [`negotiate`] takes the options a client requested and the server's limits and returns
//! the transfer parameters plus the OACK to send. The rules:
//!
//! | option | accepted values | result |
//! |---|---|---|
//! | `blksize` | 8..=65464 | clamped down to [`Limits::max_blksize`] |
//! | `timeout` | 1..=255 (seconds) | the retransmission interval |
//! | `utimeout` | 10000..=255000000 (microseconds, tftpd-hpa) | the retransmission interval; wins over `timeout` |
//! | `tsize` | any decimal (normally 0) | answered with the real size when known, omitted otherwise |
//! | `windowsize` | 1..=65535 | capped by [`Limits::max_window`] and by [`Limits::max_window_bytes`] / blksize |
//!
//! Anything else is ignored: unknown options, values that are not plain decimal numbers, and
//! values out of range are never applied and never acknowledged (no error, no panic).
//! **A repeated option: the first occurrence counts**, whether or not its value is valid;
//! later ones are ignored. Only requested options appear in the OACK, in request order, with
//! normalised decimal values; when nothing was accepted there is no OACK at all. Client
//! options never change server policy such as the retry count.

use std::time::Duration;

use crate::packet::{write_oack, Options};

/// The RFC 1350 block size, used when the client does not negotiate one.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Smallest `blksize` a client may request (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// Largest `blksize` a client may request (RFC 2348).
pub const MAX_BLKSIZE: u16 = 65464;
/// Largest `windowsize` a client may request (RFC 7440).
pub const MAX_WINDOW: u16 = 65535;
/// Smallest `utimeout` accepted, in microseconds (10 ms, as tftpd-hpa).
pub const MIN_UTIMEOUT_US: u64 = 10_000;

/// What the server allows, whatever clients ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest block size granted (8..=65464). Default 65464.
    pub max_blksize: u16,
    /// Largest window granted, in blocks (1..=65535). Default 64.
    pub max_window: u16,
    /// Largest window granted, in payload bytes: the window is cut to
    /// `max_window_bytes / blksize` blocks (at least 1), so a huge blksize × window cannot
    /// pin megabytes per session. Default 1 MiB.
    pub max_window_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_blksize: MAX_BLKSIZE,
            max_window: 64,
            max_window_bytes: 1 << 20,
        }
    }
}

/// An option the server understands, as it appears in an OACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptionKind {
    /// `blksize` (RFC 2348).
    Blksize,
    /// `timeout` (RFC 2349), seconds.
    Timeout,
    /// `utimeout` (tftpd-hpa), microseconds.
    Utimeout,
    /// `tsize` (RFC 2349).
    Tsize,
    /// `windowsize` (RFC 7440).
    Windowsize,
}

impl OptionKind {
    /// The option for a name, case-insensitively.
    pub fn from_name(name: &[u8]) -> Option<OptionKind> {
        [
            OptionKind::Blksize,
            OptionKind::Timeout,
            OptionKind::Utimeout,
            OptionKind::Tsize,
            OptionKind::Windowsize,
        ]
        .into_iter()
        .find(|kind| name.eq_ignore_ascii_case(kind.name().as_bytes()))
    }

    /// The lower-case wire name.
    pub fn name(self) -> &'static str {
        match self {
            OptionKind::Blksize => "blksize",
            OptionKind::Timeout => "timeout",
            OptionKind::Utimeout => "utimeout",
            OptionKind::Tsize => "tsize",
            OptionKind::Windowsize => "windowsize",
        }
    }
}

/// The parameters of one transfer after negotiation, and the OACK that announces them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Payload bytes per DATA packet.
    pub blksize: u16,
    /// Blocks sent before waiting for an ACK (1 = lock-step RFC 1350).
    pub window: u16,
    /// The retransmission interval the client chose (`timeout` or `utimeout`), if any.
    pub timeout: Option<Duration>,
    /// The transfer size announced to the client, if it asked and the size is known.
    pub tsize: Option<u64>,
    /// The acknowledged options with their values, in request order.
    pub acked: Vec<(OptionKind, u64)>,
}

impl Default for Negotiated {
    fn default() -> Negotiated {
        Negotiated {
            blksize: DEFAULT_BLKSIZE,
            window: 1,
            timeout: None,
            tsize: None,
            acked: Vec::new(),
        }
    }
}

impl Negotiated {
    /// True when an OACK must be sent (at least one option was accepted).
    pub fn has_oack(&self) -> bool {
        !self.acked.is_empty()
    }

    /// Answers `tsize` with `size` once it is known, in the place the client asked for it;
    /// `None` leaves it out of the answer. Nothing changes when `tsize` was not
    /// acknowledged (the client did not ask, or negotiation ran without a size).
    pub fn set_tsize(&mut self, size: Option<u64>) {
        let Some(at) = self.acked.iter().position(|(k, _)| *k == OptionKind::Tsize) else {
            return;
        };
        match size {
            Some(size) => self.acked[at].1 = size,
            None => {
                self.acked.remove(at);
            }
        }
        self.tsize = size;
    }

    /// Appends the OACK packet to `out` (nothing when [`has_oack`](Self::has_oack) is false).
    pub fn write_oack(&self, out: &mut Vec<u8>) {
        if !self.has_oack() {
            return;
        }
        let values: Vec<String> = self.acked.iter().map(|(_, v)| v.to_string()).collect();
        write_oack(
            out,
            self.acked
                .iter()
                .zip(&values)
                .map(|((kind, _), value)| (kind.name(), value.as_str())),
        );
    }
}

/// Negotiates `requested` under `limits`. `size` is the transfer size when the source knows
/// it (it answers `tsize`).
pub fn negotiate(requested: Options<'_>, limits: &Limits, size: Option<u64>) -> Negotiated {
    let mut seen: Vec<OptionKind> = Vec::new();
    let mut accepted: Vec<(OptionKind, u64)> = Vec::new();
    for option in requested {
        let Some(kind) = OptionKind::from_name(option.name) else {
            continue;
        };
        if seen.contains(&kind) {
            continue;
        }
        seen.push(kind);
        let Some(value) = parse_decimal(option.value) else {
            continue;
        };
        let granted = match kind {
            OptionKind::Blksize => (MIN_BLKSIZE as u64..=MAX_BLKSIZE as u64)
                .contains(&value)
                .then(|| value.min(limits.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE) as u64)),
            OptionKind::Timeout => (1..=255).contains(&value).then_some(value),
            OptionKind::Utimeout => (MIN_UTIMEOUT_US..=255_000_000)
                .contains(&value)
                .then_some(value),
            OptionKind::Tsize => size,
            // The byte cap depends on the final blksize, so it is applied below.
            OptionKind::Windowsize => (1..=MAX_WINDOW as u64)
                .contains(&value)
                .then(|| value.min(limits.max_window.max(1) as u64)),
        };
        if let Some(granted) = granted {
            accepted.push((kind, granted));
        }
    }

    let mut out = Negotiated::default();
    let value_of = |kind| {
        accepted
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|&(_, value)| value)
    };
    if let Some(blksize) = value_of(OptionKind::Blksize) {
        out.blksize = blksize as u16;
    }
    out.timeout = match (
        value_of(OptionKind::Utimeout),
        value_of(OptionKind::Timeout),
    ) {
        (Some(us), _) => Some(Duration::from_micros(us)),
        (None, Some(secs)) => Some(Duration::from_secs(secs)),
        (None, None) => None,
    };
    out.tsize = value_of(OptionKind::Tsize);
    if let Some((_, window)) = accepted
        .iter_mut()
        .find(|(k, _)| *k == OptionKind::Windowsize)
    {
        let by_bytes = (limits.max_window_bytes / out.blksize as usize).max(1) as u64;
        *window = (*window).min(by_bytes);
        out.window = *window as u16;
    }
    out.acked = accepted;
    out
}

/// Parses a plain unsigned decimal: 1 to 20 ASCII digits, no sign, no spaces, no overflow.
pub fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(raw: &[u8]) -> Options<'_> {
        Options::parse(raw).expect("valid option bytes")
    }

    fn neg(raw: &[u8], size: Option<u64>) -> Negotiated {
        negotiate(opts(raw), &Limits::default(), size)
    }

    #[test]
    fn no_options_means_no_oack_and_rfc1350_defaults() {
        let n = neg(b"", Some(10));
        assert_eq!(n, Negotiated::default());
        assert!(!n.has_oack());
        let mut out = Vec::new();
        n.write_oack(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn blksize_range_and_clamp() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"blksize\x008\x00", Some(8)),
            (b"blksize\x001428\x00", Some(1428)),
            (b"blksize\x0065464\x00", Some(65464)),
            (b"blksize\x0001428\x00", Some(1428)),
            (b"blksize\x007\x00", None),
            (b"blksize\x000\x00", None),
            (b"blksize\x0065465\x00", None),
            (b"blksize\x00-1\x00", None),
            (b"blksize\x00abc\x00", None),
            (b"blksize\x00\x00", None),
            (b"blksize\x00 512\x00", None),
            (b"blksize\x0099999999999999999999\x00", None),
            (b"blksize\x00999999999999999999999\x00", None),
        ];
        for (raw, want) in cases {
            let n = neg(raw, None);
            let got = n.acked.first().map(|&(_, v)| v);
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(raw));
            assert_eq!(n.blksize as u64, want.unwrap_or(512));
        }
        let limits = Limits {
            max_blksize: 1468,
            ..Limits::default()
        };
        let n = negotiate(opts(b"blksize\x0065464\x00"), &limits, None);
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.acked, vec![(OptionKind::Blksize, 1468)]);
    }

    #[test]
    fn timeout_and_utimeout() {
        assert_eq!(
            neg(b"timeout\x003\x00", None).timeout,
            Some(Duration::from_secs(3))
        );
        for bad in [
            &b"timeout\x000\x00"[..],
            b"timeout\x00256\x00",
            b"timeout\x001.5\x00",
        ] {
            let n = neg(bad, None);
            assert_eq!(n.timeout, None);
            assert!(!n.has_oack());
        }
        assert_eq!(
            neg(b"utimeout\x0050000\x00", None).timeout,
            Some(Duration::from_millis(50))
        );
        assert_eq!(neg(b"utimeout\x009999\x00", None).timeout, None);
        // utimeout wins over timeout; both are acknowledged.
        let n = neg(b"timeout\x002\x00utimeout\x0020000\x00", None);
        assert_eq!(n.timeout, Some(Duration::from_millis(20)));
        assert_eq!(n.acked.len(), 2);
    }

    #[test]
    fn tsize_answered_only_when_known() {
        let n = neg(b"tsize\x000\x00", Some(123_456));
        assert_eq!(n.tsize, Some(123_456));
        assert_eq!(n.acked, vec![(OptionKind::Tsize, 123_456)]);
        let n = neg(b"tsize\x000\x00", None);
        assert!(!n.has_oack());
        assert!(!neg(b"tsize\x00-5\x00", Some(1)).has_oack());
    }

    #[test]
    fn windowsize_caps() {
        assert_eq!(neg(b"windowsize\x0016\x00", None).window, 16);
        assert_eq!(neg(b"windowsize\x0070000\x00", None).window, 1);
        assert!(!neg(b"windowsize\x000\x00", None).has_oack());
        assert_eq!(neg(b"windowsize\x0065535\x00", None).window, 64);
        // 1 MiB / 65464 = 16 blocks.
        let n = neg(b"windowsize\x0064\x00blksize\x0065464\x00", None);
        assert_eq!(n.window, 16);
        assert_eq!(
            n.acked,
            vec![(OptionKind::Windowsize, 16), (OptionKind::Blksize, 65464)]
        );
        let tiny = Limits {
            max_window_bytes: 10,
            ..Limits::default()
        };
        assert_eq!(
            negotiate(opts(b"windowsize\x008\x00"), &tiny, None).window,
            1
        );
    }

    #[test]
    fn first_occurrence_wins_and_unknown_are_ignored() {
        let n = neg(b"BLKSIZE\x001024\x00blksize\x002048\x00", None);
        assert_eq!(n.blksize, 1024);
        assert_eq!(n.acked.len(), 1);
        // An invalid first occurrence still counts: the later valid one is ignored.
        let n = neg(b"blksize\x00abc\x00blksize\x002048\x00", None);
        assert_eq!(n.blksize, 512);
        assert!(!n.has_oack());
        let n = neg(b"retries\x000\x00rollover\x000\x00foo\x00bar\x00", None);
        assert!(!n.has_oack());
    }

    #[test]
    fn oack_keeps_request_order_with_normalised_values() {
        let n = neg(
            b"tsize\x000\x00blksize\x0001428\x00windowsize\x004\x00timeout\x0005\x00",
            Some(99),
        );
        let mut out = Vec::new();
        n.write_oack(&mut out);
        assert_eq!(
            out,
            b"\x00\x06tsize\x0099\x00blksize\x001428\x00windowsize\x004\x00timeout\x005\x00"
        );
    }

    #[test]
    fn a_thousand_options_are_fine() {
        let mut raw = Vec::new();
        for i in 0..1000 {
            raw.extend_from_slice(format!("opt{i}\x00{i}\x00").as_bytes());
        }
        raw.extend_from_slice(b"blksize\x001000\x00");
        assert_eq!(neg(&raw, None).blksize, 1000);
    }

    #[test]
    fn decimal_parser() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b"+1"), None);
        assert_eq!(parse_decimal(b""), None);
    }
}
