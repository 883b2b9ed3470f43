//! `Packet::parse` on arbitrary bytes: never panics, and whatever parses has a canonical
//! encoding that is a fixpoint (parse → encode → parse gives the same packet, and encoding
//! that again gives the same bytes). Options of requests and OACKs also go through
//! `options::negotiate` under a few server limits, whose results must stay in range.

#![no_main]
// `..Limits::default()` on purpose: new fields must not break the fuzz build.
#![allow(clippy::needless_update)]

use std::time::Duration;

use dyntftp::options::{
    negotiate, Limits, OptionKind, DEFAULT_BLKSIZE, MAX_BLKSIZE, MIN_BLKSIZE, MIN_UTIMEOUT_US,
};
use dyntftp::packet::{Options, Packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(first) = Packet::parse(data) else {
        return;
    };
    let _ = format!("{first:?}");

    let mut encoded = Vec::new();
    first.encode(&mut encoded);
    // Canonical form only drops bytes (NUL padding, junk after an ERROR message's NUL),
    // except that a message without its NUL gains one.
    assert!(
        encoded.len() <= data.len() + 1,
        "encoding grew: {} -> {} bytes",
        data.len(),
        encoded.len()
    );
    let second = Packet::parse(&encoded).expect("the encoding of a parsed packet parses");
    assert_eq!(first, second, "parse(encode(p)) != p");
    let mut again = Vec::new();
    second.encode(&mut again);
    assert_eq!(encoded, again, "canonical encoding is not a fixpoint");

    let options = match first {
        Packet::Rrq(req) | Packet::Wrq(req) => {
            let _ = req.mode();
            assert!(!req.filename.is_empty() && !req.filename.contains(&0));
            assert!(!req.mode_name.is_empty() && !req.mode_name.contains(&0));
            req.options
        }
        Packet::Oack(options) => options,
        Packet::Error { code, message } => {
            let _ = code.to_string();
            assert!(!message.contains(&0));
            return;
        }
        Packet::Data { .. } | Packet::Ack { .. } => return,
    };

    assert_eq!(options.len(), options.iter().count());
    for option in options {
        assert!(!option.name.is_empty() && !option.name.contains(&0));
        assert!(!option.value.contains(&0));
    }

    let limits = [
        Limits::default(),
        Limits {
            max_blksize: 1468,
            max_window: 8,
            max_window_bytes: 4096,
            ..Limits::default()
        },
        // Out-of-range limits must be tolerated too (clamped, never a panic).
        Limits {
            max_blksize: 0,
            max_window: 0,
            max_window_bytes: 0,
            ..Limits::default()
        },
        Limits {
            max_blksize: u16::MAX,
            max_window: u16::MAX,
            max_window_bytes: usize::MAX,
            ..Limits::default()
        },
    ];
    // A size taken from the input, so that tsize sees large values too.
    let mut size = [0u8; 8];
    for (slot, byte) in size.iter_mut().zip(data.iter().rev()) {
        *slot = *byte;
    }
    let size = u64::from_le_bytes(size);
    for limits in &limits {
        for size in [None, Some(0), Some(size)] {
            check_negotiation(options, limits, size);
        }
    }
});

fn check_negotiation(options: Options<'_>, limits: &Limits, size: Option<u64>) {
    let n = negotiate(options, limits, size);
    let max_blksize = limits.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
    let acked = |kind: OptionKind| n.acked.iter().find(|(k, _)| *k == kind).map(|&(_, v)| v);

    // Each option is acknowledged at most once.
    for (i, (kind, _)) in n.acked.iter().enumerate() {
        assert!(
            n.acked[..i].iter().all(|(k, _)| k != kind),
            "{kind:?} acknowledged twice: {n:?}"
        );
    }

    match acked(OptionKind::Blksize) {
        Some(b) => {
            assert_eq!(u64::from(n.blksize), b);
            assert!((MIN_BLKSIZE..=max_blksize).contains(&n.blksize), "{n:?}");
        }
        None => assert_eq!(n.blksize, DEFAULT_BLKSIZE),
    }

    assert!(n.window >= 1, "{n:?}");
    match acked(OptionKind::Windowsize) {
        Some(w) => {
            assert_eq!(u64::from(n.window), w);
            assert!(n.window <= limits.max_window.max(1), "{n:?} {limits:?}");
            assert!(
                n.window == 1
                    || usize::from(n.window) * usize::from(n.blksize) <= limits.max_window_bytes,
                "window exceeds the byte cap: {n:?} {limits:?}"
            );
        }
        None => assert_eq!(n.window, 1),
    }

    if let Some(timeout) = n.timeout {
        assert!(
            timeout >= Duration::from_micros(MIN_UTIMEOUT_US)
                && timeout <= Duration::from_secs(255),
            "{n:?}"
        );
        assert!(acked(OptionKind::Timeout).is_some() || acked(OptionKind::Utimeout).is_some());
    }

    assert_eq!(n.tsize, acked(OptionKind::Tsize));
    if n.tsize.is_some() {
        assert_eq!(n.tsize, size);
    }

    // The OACK, when there is one, parses back to exactly the acknowledged options.
    let mut oack = Vec::new();
    n.write_oack(&mut oack);
    assert_eq!(oack.is_empty(), !n.has_oack());
    if n.has_oack() {
        let Ok(Packet::Oack(back)) = Packet::parse(&oack) else {
            panic!("our OACK does not parse: {oack:?}");
        };
        let back: Vec<_> = back.iter().collect();
        assert_eq!(back.len(), n.acked.len());
        for (option, (kind, value)) in back.iter().zip(&n.acked) {
            assert!(option.is(kind.name()));
            assert_eq!(option.value, value.to_string().as_bytes());
        }
    }
}
