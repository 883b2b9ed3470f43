//! A `Session` driven by a program decoded from the input: options, limits, a source
//! (in-memory, or scripted to return short reads, `WouldBlock`, `Interrupted` and errors),
//! then a sequence of events (datagrams, ACKs, ERRORs, time steps, source readiness,
//! abort) on a virtual clock. After every input the output is drained as a driver would,
//! and checked:
//!
//! - at most `window + 2` datagrams per input;
//! - every datagram parses and is DATA, OACK or ERROR; the OACK is the negotiated one and
//!   comes first; no DATA before the client's ACK 0 when there is an OACK;
//! - DATA block `b` carries exactly bytes `(b-1)*blksize ..` of the expected transfer
//!   (netascii-translated when the mode is netascii), at most `blksize` of them, and a
//!   short block only at the very end;
//! - an old or duplicate ACK, or an ACK for a block never sent, sends nothing
//!   (Sorcerer's Apprentice), except the one go-back-N per retransmission interval that a
//!   duplicate may cause (issue 15: loss recovery), which the session counts in
//!   `go_back_acks`;
//! - nothing follows an ERROR but `Done`; once `Done(outcome)`, every later poll is the
//!   same `Done` and nothing is sent; the outcome fits the input that caused it;
//! - `Wait(deadline)` is never before the start; a deadline already due settles after a
//!   few immediate `handle_timeout` calls (no busy loop).
//!
//! Set `DYNTFTP_FUZZ_TRACE=1` to print the decoded program and what the session does, e.g.
//! `DYNTFTP_FUZZ_TRACE=1 cargo fuzz run session fuzz/artifacts/session/crash-…`.
//!
//! # Input format
//!
//! Every read past the end of the input yields zeros. Numbers are big-endian.
//!
//! ```text
//! header
//!   u8  flags          bit0 netascii, bit4 mail (else octet)
//!                      bit1 scripted source (else BytesSource)
//!                      bit2 raw option bytes (else structured options)
//!                      bit3 request tsize (structured options only)
//!                      bit5 scripted source does not know its size
//!   u8  retries        % 8
//!   u8  timeout        base retransmission interval (n + 1) * 10 ms
//!   u8  source_timeout (n + 1) * 100 ms
//!   u16 max_blksize    0 = default
//!   u8  max_window     0 = default
//!   u8  max_window_bytes  0 = default, else n * 256 bytes
//! options, structured (bit2 clear)
//!   u16 blksize        0 = not requested
//!   u16 windowsize     0 = not requested
//!   u8  timeout        0 = not requested, else seconds
//!   u8  utimeout       0 = not requested, else n * 1000 us
//! options, raw (bit2 set)
//!   u8  len, then len bytes appended to "\0\x01f\0octet\0" (inputs that fail to parse
//!       are rejected)
//! source
//!   u16 len            % 4097
//!   u8  motif_len, then motif bytes; the source is the motif repeated to len bytes (an
//!       empty motif means a fixed pattern with CR and LF in it)
//! script (bit1 set)
//!   u8  len, then len bytes: one per read call, low 3 bits
//!       0..=2 short read of at most (b >> 3) + 1 bytes   3, 4 WouldBlock
//!       5 Interrupted   6 an I/O error   7 full read claiming (b >> 3) + 1 bytes more
//!       than the buffer holds (only when the buffer is filled)
//!   after the script, reads are full.
//! events, until the input ends (at most 1024), tag u8 % 9
//!   0 Datagram  u8 len, then len bytes
//!   1 Ack       u16 block
//!   2 AckSeen   u8 k: ACK (highest DATA block sent - k), saturating
//!   3 Error     u16 code (an ERROR datagram with a short message)
//!   4 Advance   u16 milliseconds, then handle_timeout
//!   5 AdvanceToDeadline  jump to the last Wait deadline, then handle_timeout
//!   6 SourceReady
//!   7 Abort     (ERROR 0, ShutDown)
//!   8 AckLatest ACK the highest DATA block sent
//! ```

#![no_main]
// `..Default::default()` on purpose: new fields must not break the fuzz build.
#![allow(clippy::needless_update)]

use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dyntftp::client::{write_ack, write_rrq};
use dyntftp::options::Limits;
use dyntftp::packet::{write_error, ErrorCode, Mode, Packet};
use dyntftp::response::{BytesSource, ResponseData};
use dyntftp::session::{Outcome, Output, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

const MAX_SOURCE: usize = 4096;
const MAX_EVENTS: usize = 1024;
/// Immediate `handle_timeout` calls allowed for a deadline that is already due.
const MAX_CATCH_UP: usize = 8;

fuzz_target!(|data: &[u8]| run(data));

fn tracing() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("DYNTFTP_FUZZ_TRACE").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!($($arg)*);
        }
    };
}

/// Reads the input front to back; past the end everything is zero.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        head
    }
}

/// A source whose behaviour per `read` call follows a script from the input.
struct Scripted {
    data: Vec<u8>,
    pos: usize,
    script: Vec<u8>,
    step: usize,
    known_size: bool,
}

impl ResponseData for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let op = self.script.get(self.step).copied();
        self.step += 1;
        let rest = &self.data[self.pos..];
        let full = rest.len().min(buf.len());
        let (copy, claim) = match op {
            None => (full, full),
            Some(b) => match b & 7 {
                0..=2 => {
                    let n = full.min(usize::from(b >> 3) + 1);
                    (n, n)
                }
                3 | 4 => return Err(io::ErrorKind::WouldBlock.into()),
                5 => return Err(io::ErrorKind::Interrupted.into()),
                6 => return Err(io::Error::other("scripted failure")),
                _ => {
                    let extra = if full == buf.len() && full > 0 {
                        usize::from(b >> 3) + 1
                    } else {
                        0
                    };
                    (full, full + extra)
                }
            },
        };
        buf[..copy].copy_from_slice(&rest[..copy]);
        self.pos += copy;
        Ok(claim)
    }

    /// The same script step over all the buffers at once (what a window's read-ahead
    /// asks for): the bytes a plain read of their total length would give, spread.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        let total = bufs.iter().map(|b| b.len()).sum();
        let mut tmp = vec![0u8; total];
        let claim = self.read(&mut tmp)?;
        let mut left = &tmp[..claim.min(total)];
        for buf in bufs {
            let n = buf.len().min(left.len());
            buf[..n].copy_from_slice(&left[..n]);
            left = &left[n..];
        }
        Ok(claim)
    }

    fn size(&self) -> Option<u64> {
        self.known_size.then_some(self.data.len() as u64)
    }
}

/// The netascii translation, written independently of the crate's.
fn netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 2);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Start,
    Datagram,
    Ack(u16),
    PeerError(ErrorCode),
    Timeout,
    SourceReady,
    Abort,
}

/// What the checks know about the transfer so far.
struct Checker {
    start: Instant,
    blksize: usize,
    window: usize,
    oack: Vec<u8>,
    expected: Vec<u8>,
    /// The scripted source has an I/O error in its script.
    may_fail_read: bool,
    ack0_delivered: bool,
    /// Highest DATA block sent (0 before any).
    highest_data: u16,
    /// The short block that ends the transfer, once sent.
    final_block: Option<u16>,
    /// A lower bound on the last ACK the session accepted.
    acked_low: Option<u16>,
    error_sent: bool,
    done: Option<Outcome>,
    last_wait: Option<Instant>,
}

impl Checker {
    fn in_transfer(&self) -> bool {
        self.oack.is_empty() || self.ack0_delivered
    }

    fn on_transmit(&mut self, bytes: &[u8], count: usize) {
        assert!(self.done.is_none(), "transmit after Done({:?})", self.done);
        assert!(!self.error_sent, "transmit after an ERROR: {bytes:?}");
        assert!(
            count <= self.window + 2,
            "{count} datagrams for one input (window {})",
            self.window
        );
        let packet = Packet::parse(bytes).expect("a transmitted datagram parses");
        trace!("  -> {packet:?}");
        match packet {
            Packet::Data { block, data } => {
                assert!(
                    self.in_transfer(),
                    "DATA {block} before the client's ACK 0 of our OACK"
                );
                assert!(
                    data.len() <= self.blksize,
                    "DATA {block}: {} bytes > blksize {}",
                    data.len(),
                    self.blksize
                );
                assert!(block >= 1, "DATA 0 in a transfer shorter than 65535 blocks");
                let offset = (usize::from(block) - 1) * self.blksize;
                assert!(
                    offset <= self.expected.len(),
                    "DATA {block} past the end ({} bytes)",
                    self.expected.len()
                );
                let end = (offset + self.blksize).min(self.expected.len());
                assert!(
                    data == &self.expected[offset..end],
                    "DATA {block} carries the wrong bytes: got {data:?}, want {:?}",
                    &self.expected[offset..end]
                );
                if data.len() < self.blksize {
                    assert_eq!(usize::from(block), self.expected.len() / self.blksize + 1);
                    self.final_block = Some(block);
                }
                self.highest_data = self.highest_data.max(block);
            }
            Packet::Oack(_) => {
                assert!(
                    !self.oack.is_empty(),
                    "OACK although no option was accepted"
                );
                assert_eq!(
                    bytes,
                    &self.oack[..],
                    "OACK differs from the negotiated one"
                );
                assert!(!self.ack0_delivered, "OACK after the transfer started");
            }
            Packet::Error { .. } => self.error_sent = true,
            other => panic!("the server sent {other:?}"),
        }
    }

    /// `acked_bytes`: payload bytes the session counts as acknowledged (its blocks_acked ×
    /// blksize).
    fn on_done(&mut self, outcome: Outcome, cause: Cause, acked_bytes: u64) {
        if let Some(done) = self.done {
            assert_eq!(outcome, done, "Done changed its outcome");
            return;
        }
        trace!("  => Done({outcome:?})");
        self.done = Some(outcome);
        match outcome {
            Outcome::Completed => match cause {
                // The client closed with an ERROR after every byte was acknowledged (GRUB
                // stops at the size tsize announced): only the empty final block, if any,
                // went unacknowledged.
                Cause::PeerError(_) => assert!(
                    acked_bytes >= self.expected.len() as u64,
                    "Completed by an ERROR with {acked_bytes} of {} bytes acknowledged",
                    self.expected.len()
                ),
                _ => {
                    let last = self.final_block.expect("Completed before the last block");
                    assert_eq!(cause, Cause::Ack(last), "Completed without the final ACK");
                }
            },
            Outcome::FinalAckMissing => {
                assert!(self.final_block.is_some(), "FinalAckMissing before the end");
                assert_eq!(cause, Cause::Timeout);
            }
            Outcome::TimedOut => assert_eq!(cause, Cause::Timeout),
            Outcome::Probe => {
                assert!(!self.oack.is_empty() && !self.ack0_delivered);
                assert_eq!(cause, Cause::PeerError(ErrorCode::OptionNegotiation));
            }
            Outcome::PeerError(code) => assert_eq!(cause, Cause::PeerError(code)),
            Outcome::IllegalOperation => {
                assert!(self.error_sent);
                assert_eq!(cause, Cause::Datagram);
            }
            Outcome::ReadFailed => assert!(self.error_sent && self.may_fail_read),
            Outcome::SourceStalled => assert!(self.error_sent),
            Outcome::ShutDown => assert!(self.error_sent && cause == Cause::Abort),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
}

struct Harness {
    now: Instant,
    session: Session,
    check: Checker,
    /// The most datagrams asked for per transmit, as a GSO driver does (0 and 1: one).
    runs: usize,
}

impl Harness {
    /// Drains the output after one input; returns the number of datagrams sent.
    fn drain(&mut self, cause: Cause) -> usize {
        let mut count = 0;
        loop {
            let max = self.runs.max(1);
            match self.session.poll_output(max) {
                Output::Transmit(transmit) => {
                    assert!(transmit.datagrams >= 1 && transmit.datagrams <= max);
                    let packets: Vec<Vec<u8>> = transmit.segments().map(<[u8]>::to_vec).collect();
                    assert_eq!(packets.len(), transmit.datagrams);
                    let mut payload = 0;
                    for (i, packet) in packets.iter().enumerate() {
                        if i + 1 < packets.len() {
                            assert_eq!(
                                packet.len(),
                                transmit.segment_size,
                                "a short packet mid-run"
                            );
                        }
                        if let [0, 3, ..] = packet[..] {
                            payload += packet.len() as u64 - 4;
                        } else {
                            assert_eq!(transmit.datagrams, 1, "OACK or ERROR in a run");
                        }
                        count += 1;
                        self.check.on_transmit(packet, count);
                    }
                    assert_eq!(transmit.payload, payload, "payload miscounted");
                }
                Output::Wait(deadline) => {
                    assert!(
                        self.check.done.is_none(),
                        "Wait after Done({:?})",
                        self.check.done
                    );
                    assert!(!self.check.error_sent, "Wait after an ERROR");
                    assert!(deadline >= self.check.start, "Wait before the start");
                    trace!("  .. Wait(+{:?})", deadline - self.check.start);
                    self.check.last_wait = Some(deadline);
                    return count;
                }
                Output::Done(outcome) => {
                    let stats = self.session.stats();
                    let acked_bytes = stats.blocks_acked * stats.negotiated.blksize as u64;
                    self.check.on_done(outcome, cause, acked_bytes);
                    assert!(self.session.is_done());
                    assert_eq!(self.session.deadline(), None);
                    assert_eq!(self.session.stats().outcome, Some(outcome));
                    self.check.last_wait = None;
                    return count;
                }
            }
        }
    }

    /// Drains, then keeps firing a deadline that is already due, as a driver would.
    fn settle(&mut self, cause: Cause) -> usize {
        let sent = self.drain(cause);
        for _ in 0..MAX_CATCH_UP {
            match self.check.last_wait {
                Some(deadline) if deadline <= self.now => {
                    trace!("  deadline already due: handle_timeout");
                    self.session.handle_timeout(self.now);
                    self.drain(Cause::Timeout);
                }
                _ => return sent,
            }
        }
        panic!(
            "a due deadline does not settle after {MAX_CATCH_UP} timeouts: {:?}",
            self.session
        );
    }

    fn ack(&mut self, block: u16, datagram: Option<&[u8]>) {
        let in_transfer = self.check.in_transfer() && self.check.done.is_none();
        let oack_phase = !in_transfer && self.check.done.is_none();
        let go_backs = self.session.stats().go_back_acks;
        match datagram {
            Some(bytes) => self.session.handle_datagram(self.now, bytes),
            None => {
                let mut bytes = Vec::new();
                write_ack(&mut bytes, block);
                self.session.handle_datagram(self.now, &bytes);
            }
        }
        if oack_phase && block == 0 {
            self.check.ack0_delivered = true;
        }
        let sent = self.settle(Cause::Ack(block));
        if oack_phase && block != 0 {
            assert_eq!(
                sent, 0,
                "ACK {block} in answer to our OACK made the session send"
            );
        }
        if in_transfer {
            let duplicate_go_back = self.check.acked_low == Some(block)
                && self.session.stats().go_back_acks == go_backs + 1;
            let old = self.check.acked_low.is_some_and(|low| block <= low) && !duplicate_go_back;
            let unsent = block > self.check.highest_data;
            assert!(
                sent == 0 || !(old || unsent),
                "ACK {block} (old: {old}, never sent: {unsent}) made the session send {sent} \
                 datagrams"
            );
            if sent > 0 {
                self.check.acked_low = Some(block);
            }
        }
    }
}

fn run(data: &[u8]) {
    let mut input = Input { data };

    // Header.
    let flags = input.u8();
    let mode = if flags & 1 != 0 {
        Mode::Netascii
    } else if flags & 0x10 != 0 {
        Mode::Mail
    } else {
        Mode::Octet
    };
    let scripted = flags & 2 != 0;
    let raw_options = flags & 4 != 0;
    let want_tsize = flags & 8 != 0;
    let known_size = flags & 0x20 == 0;
    let runs = match flags >> 6 {
        0 => 0,
        1 => 2,
        2 => 5,
        _ => 64,
    };
    let retries = u32::from(input.u8() % 8);
    let timeout = Duration::from_millis((u64::from(input.u8()) + 1) * 10);
    let source_timeout = Duration::from_millis((u64::from(input.u8()) + 1) * 100);
    let defaults = Limits::default();
    let limits = Limits {
        max_blksize: match input.u16() {
            0 => defaults.max_blksize,
            n => n,
        },
        max_window: match input.u8() {
            0 => defaults.max_window,
            n => u16::from(n),
        },
        max_window_bytes: match input.u8() {
            0 => defaults.max_window_bytes,
            n => usize::from(n) * 256,
        },
        ..defaults
    };
    let config = SessionConfig {
        timeout,
        retries,
        source_timeout,
        limits,
        ..SessionConfig::default()
    };

    // Options, as the RRQ that carried them.
    let mut rrq = Vec::new();
    if raw_options {
        let len = usize::from(input.u8());
        write_rrq(&mut rrq, b"f", "octet", []);
        rrq.extend_from_slice(input.bytes(len));
    } else {
        let blksize = input.u16().to_string();
        let windowsize = input.u16().to_string();
        let secs = input.u8().to_string();
        let utimeout = (u32::from(input.u8()) * 1000).to_string();
        let mut options = Vec::new();
        for (name, value) in [
            ("blksize", &blksize),
            ("windowsize", &windowsize),
            ("timeout", &secs),
            ("utimeout", &utimeout),
        ] {
            if value != "0" {
                options.push((name, value.as_str()));
            }
        }
        if want_tsize {
            options.push(("tsize", "0"));
        }
        write_rrq(&mut rrq, b"f", mode.as_str(), options);
    }
    let Ok(Packet::Rrq(request)) = Packet::parse(&rrq) else {
        return;
    };

    // Source.
    let len = usize::from(input.u16()) % (MAX_SOURCE + 1);
    let motif_len = usize::from(input.u8());
    let motif = input.bytes(motif_len);
    let content: Vec<u8> = if motif.is_empty() {
        (0..len).map(|i| (i * 7 % 23) as u8 + b'\x07').collect()
    } else {
        motif.iter().copied().cycle().take(len).collect()
    };
    let script = if scripted {
        let len = usize::from(input.u8());
        input.bytes(len).to_vec()
    } else {
        Vec::new()
    };
    let may_fail_read = script.iter().any(|&b| b & 7 == 6);
    let source: Box<dyn ResponseData> = if scripted {
        Box::new(Scripted {
            data: content.clone(),
            pos: 0,
            script,
            step: 0,
            known_size,
        })
    } else {
        Box::new(BytesSource::new(content.clone()))
    };
    let expected = match mode {
        Mode::Netascii => netascii(&content),
        _ => content,
    };

    let start = Instant::now();
    trace!(
        "mode {mode:?}, options {:?}, {} bytes ({} on the wire), scripted {scripted}, \
         {config:?}",
        request.options,
        len,
        expected.len()
    );
    let session = Session::new(start, request.options, mode, source, config);
    let params = session.params().clone();
    trace!("negotiated {params:?}");
    assert!((8..=65464).contains(&params.blksize), "{params:?}");
    assert!(params.window >= 1, "{params:?}");
    let mut oack = Vec::new();
    params.write_oack(&mut oack);
    let mut h = Harness {
        now: start,
        session,
        runs,
        check: Checker {
            start,
            blksize: usize::from(params.blksize),
            window: usize::from(params.window),
            oack,
            expected,
            may_fail_read,
            ack0_delivered: false,
            highest_data: 0,
            final_block: None,
            acked_low: None,
            error_sent: false,
            done: None,
            last_wait: None,
        },
    };
    h.settle(Cause::Start);

    // Events.
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 9 {
            0 => {
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                trace!("Datagram {bytes:?}");
                match Packet::parse(bytes) {
                    Ok(Packet::Ack { block }) => h.ack(block, Some(bytes)),
                    Ok(Packet::Error { code, .. }) => {
                        h.session.handle_datagram(h.now, bytes);
                        h.settle(Cause::PeerError(code));
                    }
                    _ => {
                        h.session.handle_datagram(h.now, bytes);
                        h.settle(Cause::Datagram);
                    }
                }
            }
            1 => {
                let block = input.u16();
                trace!("Ack {block}");
                h.ack(block, None);
            }
            2 => {
                let block = h.check.highest_data.saturating_sub(input.u8().into());
                trace!("AckSeen {block}");
                h.ack(block, None);
            }
            3 => {
                let code = ErrorCode::from_u16(input.u16());
                trace!("Error {code:?}");
                let mut bytes = Vec::new();
                write_error(&mut bytes, code, "fuzz");
                h.session.handle_datagram(h.now, &bytes);
                h.settle(Cause::PeerError(code));
            }
            4 => {
                let millis = input.u16();
                h.now += Duration::from_millis(millis.into());
                trace!("Advance {millis} ms to +{:?}", h.now - start);
                h.session.handle_timeout(h.now);
                h.settle(Cause::Timeout);
            }
            5 => {
                if let Some(deadline) = h.check.last_wait {
                    h.now = h.now.max(deadline);
                }
                trace!("AdvanceToDeadline +{:?}", h.now - start);
                h.session.handle_timeout(h.now);
                h.settle(Cause::Timeout);
            }
            6 => {
                trace!("SourceReady");
                h.session.handle_source_ready(h.now);
                h.settle(Cause::SourceReady);
            }
            7 => {
                trace!("Abort");
                h.session.abort(
                    h.now,
                    ErrorCode::NotDefined,
                    "shutting down",
                    Outcome::ShutDown,
                );
                h.settle(Cause::Abort);
            }
            _ => {
                let block = h.check.highest_data;
                trace!("AckLatest {block}");
                h.ack(block, None);
            }
        }
    }
}
