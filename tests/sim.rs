//! Deterministic simulation of the session state machine.
//!
//! A [`Session`] is driven by a virtual clock against the library's sans-IO TFTP read
//! client ([`ReadTransfer`]) over a seeded lossy link (one [`Lane`] per direction) that
//! drops, duplicates, delays and reorders datagrams. Nothing here reads the wall clock
//! except once per test for the origin, and nothing sleeps: a step jumps straight to the
//! next event (a delivery, the session's deadline or the client's deadline).
//!
//! Besides "the client got exactly the source bytes or the session ended with a legitimate
//! outcome", the driver keeps an independent view of the transfer (the [`Oracle`]) and checks
//! every session input against it:
//!
//! - **Sorcerer's Apprentice.** An ACK is *stale* when its block number (as the client meant
//!   it, unwrapped to 64 bits) is not above the highest block already acknowledged to the
//!   session. Anything the session transmits while handling a stale ACK is counted as an
//!   apprentice reply; the count must stay zero. The one exception (issue 15, item 11): a
//!   *duplicate* of the highest acknowledged block is evidence that the next block was lost
//!   and may cause one go-back-N, counted by the session in `go_back_acks` — not an
//!   apprentice reply, but it must resend only blocks after the acknowledged one and obey
//!   the clock below.
//! - **Resends.** `packets_resent` may only grow (a) while handling a timer expiry that the
//!   session counted as a retransmission, or (b) while handling an ACK that the session
//!   counted as causing a go-back-N: one that advanced the acknowledgement but named a
//!   block *inside* the window already sent (RFC 7440 §4: the client lost what followed,
//!   resume after it), or a duplicate (above); then at most the blocks after the
//!   acknowledged one and up to the highest block sent may be resent.
//! - **Clock.** One ACK causes at most one go-back-N, and the go-back-Ns that ACKs or early
//!   retransmissions cause keep to a token bucket of `GO_BACK_BURST` go-backs refilled one
//!   per `MIN_GO_BACK_INTERVAL` (or per base timeout, when shorter): the oracle runs its own
//!   bucket (GCRA), which go-back-Ns of any cause, timer included, drain. So in any span
//!   `d`, at most `GO_BACK_BURST + d / MIN_GO_BACK_INTERVAL` of them (the session's own
//!   interval, a round trip, is never shorter than that floor).
//! - **Repeated requests.** The client's RRQ, when it repeats it, crosses the link like any
//!   datagram and reaches `Session::handle_repeated_request`, as the server's driver hands
//!   it over (admission finds it identical to the running session's). It may cause one
//!   resend at most — of the first reply, only while nothing was acknowledged — counted as
//!   a retransmission (a retry spent) and keeping to the clock below.
//! - **Progress accounting.** The session's `acks` counter grows exactly for the ACKs the
//!   oracle considers advancing; an early `handle_timeout` sends nothing; garbage gets no
//!   reply.
//! - **Retry budget.** A session that ends with `TimedOut` or `FinalAckMissing` made exactly
//!   `SessionConfig::retries` full-timeout retransmissions since the last advancing ACK, or
//!   ended `SessionConfig::progress_timeout` after it (duplicate ACKs that cause resends
//!   restart the timer, so the retry budget may not be spent by then).
//!   Early (adaptive) retransmissions are counted apart, and there are never more than
//!   [`EARLY_BOUND`] of them in a row: their interval doubles until it reaches the timeout.
//! - **Outcomes** (sweep). `Completed`: the client holds exactly the source. `FinalAckMissing`:
//!   every block was sent at least once (the client may still miss the tail it never got).
//!   `TimedOut`: only with loss, and only when some block was never sent — otherwise it is
//!   `FinalAckMissing`. With loss 0 every run completes without a full-timeout
//!   retransmission, and early ones (spurious when delays vary) resend under 5 % of packets.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use dyntftp::client::{write_ack, ClientError, Event, ReadTransfer, Request, Settings};
use dyntftp::session::{GO_BACK_BURST, MIN_GO_BACK_INTERVAL};
use dyntftp::{
    BytesSource, ErrorCode, Mode, Outcome, Output, Packet, ResponseData, Session, SessionConfig,
};
use testkit::Rng;

// ---------------------------------------------------------------------------------------
// Randomness and block numbers
// ---------------------------------------------------------------------------------------

/// The 64-bit block number congruent to `wire` modulo 65536 that is closest to `reference`.
fn unwrap_block(reference: u64, wire: u16) -> u64 {
    let delta = wire.wrapping_sub(reference as u16) as i16 as i64;
    let block = reference as i64 + delta;
    if block < 0 {
        (block + 65536) as u64
    } else {
        block as u64
    }
}

/// A short human-readable name of a datagram: `OACK`, `DATA 3:512`, `ACK 2`, `ERROR 0`.
fn describe(bytes: &[u8]) -> String {
    match Packet::parse(bytes) {
        Ok(Packet::Oack(_)) => "OACK".to_owned(),
        Ok(Packet::Data { block, data }) => format!("DATA {block}:{}", data.len()),
        Ok(Packet::Ack { block }) => format!("ACK {block}"),
        Ok(Packet::Error { code, .. }) => format!("ERROR {}", code.to_u16()),
        Ok(Packet::Rrq(_)) => "RRQ".to_owned(),
        Ok(Packet::Wrq(_)) => "WRQ".to_owned(),
        Err(_) => "garbage".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

/// Where the client sends its RRQ: the server's request port.
const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 69);
/// The session's own port (its transfer ID), where every reply comes from.
const TID: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 50_000);
/// The file every request names.
const FILE: &str = "sim/file.bin";
/// The most datagrams the simulated driver takes from the session at once (as with GSO).
const GSO_SEGMENTS: usize = 64;

/// The client's settings: a retransmission interval of twice the server's default base
/// timeout, and 12 resends without progress before it gives up (26 s: longer than the
/// server's default 1+2+4+8+8 s retry schedule, so the session normally gives up first).
/// After the final block it answers up to 2 retransmissions of it.
fn client_settings() -> Settings {
    Settings {
        timeout: Duration::from_secs(2),
        retries: 12,
        linger: 2,
        keep_payload: true,
    }
}

/// An octet request for `blksize` and `window`.
fn octet(blksize: u16, window: u16) -> Request {
    Request::new(FILE, Mode::Octet)
        .blksize(blksize)
        .windowsize(window)
}

/// A plain RFC 1350 request: no options at all.
fn plain() -> Request {
    Request::new(FILE, Mode::Octet)
}

/// Whether `request` carries option `name`.
fn asks(request: &Request, name: &str) -> bool {
    matches!(Packet::parse(request.as_bytes()),
        Ok(Packet::Rrq(rrq)) if rrq.options.iter().any(|o| o.is(name)))
}

/// A scripted way for the client to end the transfer itself with an ERROR
/// ([`ReadTransfer::abort`]).
#[derive(Clone, Copy, Debug)]
enum Abort {
    /// Answer the OACK with this ERROR (code 8 = a UEFI-style size probe).
    AfterOack(ErrorCode),
    /// Answer this block (1-based, unwrapped) with this ERROR instead of an ACK.
    AfterBlock(u64, ErrorCode),
    /// Acknowledge this block, then close with this ERROR (GRUB, once it has the size
    /// `tsize` promised).
    ClosedAfter(u64, ErrorCode),
}

/// A datagram on the link. `ack` is the simulator's god view of an ACK: the 64-bit block
/// number the client meant (the wire only carries its low 16 bits).
#[derive(Clone, Debug)]
struct Datagram {
    bytes: Vec<u8>,
    ack: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// The link
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

/// How one direction of the link behaves.
#[derive(Clone, Copy, Debug)]
struct LinkProfile {
    /// Probability that a datagram is dropped.
    loss: f64,
    /// Probability that a datagram that was not dropped is delivered twice.
    dup: f64,
    /// Latency range; every copy draws its own latency.
    min_delay: Duration,
    max_delay: Duration,
    /// When false, a datagram is never delivered before one sent earlier in the same
    /// direction (the latency is raised to keep the order).
    reorder: bool,
    /// With this probability a datagram takes this much longer (a busy peer: firmware
    /// that answers late now and then).
    hiccup: (f64, Duration),
    /// The first this many datagrams take this much longer (firmware getting ready after
    /// the OACK: allocating for `tsize`, opening the image).
    slow_start: (u64, Duration),
}

impl LinkProfile {
    /// Fixed 5 ms each way, no loss, no reordering: the targeted scenarios, where every
    /// time is exact.
    fn clean() -> LinkProfile {
        LinkProfile {
            loss: 0.0,
            dup: 0.0,
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(5),
            reorder: false,
            hiccup: (0.0, Duration::ZERO),
            slow_start: (0, Duration::ZERO),
        }
    }

    /// The sweep: loss `p`, duplicates `p / 4`, 1–20 ms latency. With `p == 0` the network is
    /// perfect (jitter without reordering), the baseline where any resend is a bug; with loss
    /// the latency jitter also reorders.
    fn lossy(p: f64) -> LinkProfile {
        LinkProfile {
            loss: p,
            dup: p / 4.0,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
            reorder: p > 0.0,
            hiccup: (0.0, Duration::ZERO),
            slow_start: (0, Duration::ZERO),
        }
    }
}

/// One direction of the link: its profile, its own random stream, its last delivery time.
struct Lane {
    profile: LinkProfile,
    rng: Rng,
    last_at: Option<Instant>,
    /// Datagrams the profile's loss dropped, and all it was given.
    dropped: u64,
    offered: u64,
}

impl Lane {
    /// Delivery times of the copies of one datagram sent at `now` (empty: dropped).
    fn schedule(&mut self, now: Instant) -> Vec<Instant> {
        self.offered += 1;
        let slow_start = if self.offered <= self.profile.slow_start.0 {
            self.profile.slow_start.1
        } else {
            Duration::ZERO
        };
        if self.rng.chance(self.profile.loss) {
            self.dropped += 1;
            return Vec::new();
        }
        let copies = 1 + usize::from(self.rng.chance(self.profile.dup));
        (0..copies)
            .map(|_| {
                let lo = self.profile.min_delay.as_micros() as u64;
                let hi = self.profile.max_delay.as_micros() as u64;
                let mut at = now + Duration::from_micros(self.rng.between(lo, hi)) + slow_start;
                if self.profile.hiccup.0 > 0.0 && self.rng.chance(self.profile.hiccup.0) {
                    at += self.profile.hiccup.1;
                }
                if !self.profile.reorder {
                    at = at.max(self.last_at.unwrap_or(at));
                }
                self.last_at = Some(at);
                at
            })
            .collect()
    }
}

/// A datagram in flight, ordered by delivery time, then by sequence number.
struct InFlight {
    at: Instant,
    seq: u64,
    dir: Dir,
    datagram: Datagram,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Decides, before the random loss, whether a datagram is dropped: for scripted losses.
type DropFilter = Box<dyn FnMut(Dir, &[u8]) -> bool>;

/// Drops the first datagram in `dir` that [`describe`]s as `what`.
fn drop_first(dir: Dir, what: &'static str) -> DropFilter {
    let mut done = false;
    Box::new(move |d, bytes| {
        if !done && d == dir && describe(bytes) == what {
            done = true;
            return true;
        }
        false
    })
}

/// A datagram as it was sent, for the targeted scenarios' assertions.
#[derive(Clone, Debug)]
struct Sent {
    at: Duration,
    dir: Dir,
    what: String,
    dropped: bool,
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// Upper bounds that keep a buggy run from hanging the test.
const MAX_STEPS: u64 = 5_000_000;
const MAX_VIRTUAL_TIME: Duration = Duration::from_secs(48 * 3600);

/// The simulator's independent view of the transfer (see the module documentation).
/// Early retransmissions in a row can be at most log2(timeout / min_rto) + 1: with the
/// defaults (1 s, 500 µs) that is 11 (0.5, 1, 2 … 512 ms).
const EARLY_BOUND: u32 = 11;

#[derive(Default)]
struct Oracle {
    /// Highest block acknowledged to the session (ACK 0 of an OACK included).
    acked_high: Option<u64>,
    /// Highest DATA block the session sent, unwrapped.
    sent_high: u64,
    /// Full-timeout retransmissions since the last advancing ACK.
    streak: u32,
    /// Early retransmissions since the last advancing ACK.
    early_streak: u32,
    /// When the last advancing ACK reached the session (`None`: the session's start).
    progress_at: Option<Instant>,
    /// The oracle's go-back clock: the theoretical time of a token bucket that every
    /// go-back-N drains (a timer retransmission or an ACK's go-back-N), one token per
    /// `MIN_GO_BACK_INTERVAL`.
    go_back_clock: Option<Instant>,
    /// Go-back-Ns that duplicate ACKs caused.
    duplicate_go_backs: u64,
    /// Repeated requests that reached the session, and the resends they caused.
    repeated_requests: u64,
    repeat_resends: u64,
    /// The longest time between two advancing ACKs (or from the start to the first).
    longest_stall: Duration,
    /// Stale ACKs delivered, and datagrams the session sent while handling them.
    stale_acks: u64,
    apprentice_replies: u64,
    /// Short DATA (final blocks) delivered to the client.
    final_deliveries: u64,
    violations: Vec<String>,
}

/// The session counters the oracle compares before and after an input.
/// How the server's loop fires a deadline: the timer wheel rounds it up to the next tick
/// after the wheel's origin (the session's start, here), and the loop's precise timer
/// (a `timerfd`) wakes it some time after that.
#[derive(Clone, Copy)]
struct DriverTimer {
    tick: Duration,
    latency: Duration,
}

impl DriverTimer {
    /// The server loop's: 100 µs ticks (`dyntftp`'s timer wheel), woken 50 µs late.
    const SERVER: DriverTimer = DriverTimer {
        tick: Duration::from_micros(100),
        latency: Duration::from_micros(50),
    };

    fn fires(&self, origin: Instant, deadline: Instant) -> Instant {
        let since = deadline.saturating_duration_since(origin).as_nanos();
        let tick = self.tick.as_nanos();
        let ticks = since.div_ceil(tick);
        origin + Duration::from_nanos((ticks * tick) as u64) + self.latency
    }
}

#[derive(Clone, Copy)]
struct Counters {
    resent: u64,
    retransmits: u64,
    early: u64,
    acks: u64,
    malformed: u64,
    go_back_acks: u64,
}

struct Sim {
    origin: Instant,
    now: Instant,
    config: SessionConfig,
    session: Session,
    /// The deadline of the last `Output::Wait`.
    session_wait: Option<Instant>,
    /// When set, the session's deadlines fire as the server's loop fires them, not
    /// exactly: rounded up to its timer wheel's tick, plus a wake-up latency.
    driver_timer: Option<DriverTimer>,
    outcome: Option<Outcome>,
    client: ReadTransfer,
    /// The request asked for options (then DATA must follow an OACK).
    asks_options: bool,
    abort: Option<Abort>,
    /// What the client saw that the library client accepts but this server must not do.
    client_violations: Vec<String>,
    lanes: [Lane; 2],
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    drop_filter: Option<DropFilter>,
    trace: Option<Vec<Sent>>,
    oracle: Oracle,
    steps: u64,
}

impl Sim {
    fn new(
        origin: Instant,
        seed: u64,
        request: Request,
        source: Box<dyn ResponseData>,
        config: SessionConfig,
        profile: LinkProfile,
    ) -> Sim {
        Sim::with_client(
            origin,
            seed,
            request,
            source,
            config,
            profile,
            client_settings(),
        )
    }

    /// [`Sim::new`] with other client settings.
    fn with_client(
        origin: Instant,
        seed: u64,
        request: Request,
        source: Box<dyn ResponseData>,
        config: SessionConfig,
        profile: LinkProfile,
        settings: Settings,
    ) -> Sim {
        // The client's first datagram, its RRQ, starts the session.
        let mut client = ReadTransfer::new(origin, SERVER, &request, settings);
        let rrq = client.poll_transmit().expect("the RRQ");
        assert_eq!(rrq.destination, SERVER);
        let Ok(Packet::Rrq(rrq)) = Packet::parse(rrq.contents) else {
            panic!("the client's RRQ does not parse");
        };
        let mode = rrq.mode().expect("a known mode");
        let asks_options = !rrq.options.is_empty();
        let session = Session::new(origin, rrq.options, mode, source, config);
        let lane = |salt: u64| Lane {
            profile,
            rng: Rng::new(seed ^ salt),
            last_at: None,
            dropped: 0,
            offered: 0,
        };
        Sim {
            origin,
            now: origin,
            config,
            session,
            session_wait: None,
            driver_timer: None,
            outcome: None,
            client,
            asks_options,
            abort: None,
            client_violations: Vec::new(),
            lanes: [lane(0x5e5e_0001), lane(0xc1c1_0002)],
            queue: BinaryHeap::new(),
            seq: 0,
            drop_filter: None,
            trace: None,
            oracle: Oracle::default(),
            steps: 0,
        }
    }

    /// A lossless scenario with a trace: for the targeted tests.
    fn scripted(origin: Instant, request: Request, source: Box<dyn ResponseData>) -> Sim {
        let mut sim = Sim::new(
            origin,
            0,
            request,
            source,
            SessionConfig::default(),
            LinkProfile::clean(),
        );
        sim.trace = Some(Vec::new());
        sim
    }

    fn with_drops(mut self, filter: DropFilter) -> Sim {
        self.drop_filter = Some(filter);
        self
    }

    fn with_abort(mut self, abort: Abort) -> Sim {
        self.abort = Some(abort);
        self
    }

    /// Schedules a datagram for delivery at `origin + at`, bypassing the link.
    fn inject(&mut self, at: Duration, dir: Dir, datagram: Datagram) {
        self.seq += 1;
        self.queue.push(Reverse(InFlight {
            at: self.origin + at,
            seq: self.seq,
            dir,
            datagram,
        }));
    }

    /// Runs until the session is over, the link is empty and the client is done (or the
    /// step/time bounds are hit, which is recorded as a violation).
    fn run(&mut self) {
        self.drain_session();
        loop {
            if self.outcome.is_some() && self.queue.is_empty() && self.client.outcome().is_some() {
                return;
            }
            let packet_at = self.queue.peek().map(|Reverse(p)| p.at);
            let session_at = self
                .session_wait
                .filter(|_| self.outcome.is_none())
                .map(|deadline| match self.driver_timer {
                    Some(timer) => timer.fires(self.origin, deadline),
                    None => deadline,
                });
            let client_at = self.client.deadline();
            let Some(at) = [packet_at, session_at, client_at]
                .into_iter()
                .flatten()
                .min()
            else {
                return;
            };
            self.steps += 1;
            if self.steps > MAX_STEPS || at - self.origin > MAX_VIRTUAL_TIME {
                self.oracle.violations.push(format!(
                    "run bound hit: {} steps, {:?} virtual; session {:?}",
                    self.steps,
                    at - self.origin,
                    self.session
                ));
                return;
            }
            self.now = self.now.max(at);
            if packet_at == Some(at) {
                let Some(Reverse(packet)) = self.queue.pop() else {
                    unreachable!("peeked")
                };
                self.deliver(packet);
            } else if session_at == Some(at) {
                self.session_timer();
            } else {
                self.client.handle_timeout(self.now);
                self.flush_client();
            }
        }
    }

    fn deliver(&mut self, packet: InFlight) {
        match packet.dir {
            Dir::ToClient => {
                if let Ok(Packet::Data { data, .. }) = Packet::parse(&packet.datagram.bytes) {
                    if data.len() < self.session.params().blksize as usize {
                        self.oracle.final_deliveries += 1;
                    }
                }
                let event = self
                    .client
                    .handle_datagram(self.now, TID, &packet.datagram.bytes);
                if let Some(Event::Data(_)) = event {
                    if self.asks_options && self.client.oack().is_none() {
                        self.client_violations
                            .push("DATA without OACK although options were requested".into());
                    }
                }
                match (self.abort, event) {
                    (Some(Abort::AfterOack(code)), Some(Event::Oack(_))) => {
                        self.client.abort(code, "tsize probe");
                    }
                    (Some(Abort::AfterBlock(after, code)), Some(Event::Data(_)))
                        if self.client.blocks() == after =>
                    {
                        self.client.abort(code, "disk full");
                    }
                    (Some(Abort::ClosedAfter(after, code)), Some(Event::Data(_)))
                        if self.client.blocks() == after =>
                    {
                        self.flush_client();
                        self.client.abort(code, "closed");
                    }
                    _ => {}
                }
                self.flush_client();
            }
            Dir::ToServer => self.server_input(packet.datagram),
        }
    }

    fn flush_client(&mut self) {
        while let Some(transmit) = self.client.poll_transmit() {
            let bytes = transmit.contents.to_vec();
            // The RRQ again goes to the request port: the session from this port already
            // runs, so the server starts nothing and hands the repeat to the session
            // (`server_input`).
            let ack = match Packet::parse(&bytes) {
                Ok(Packet::Ack { block }) => Some(unwrap_block(self.client.blocks(), block)),
                _ => None,
            };
            self.send(Dir::ToServer, Datagram { bytes, ack });
        }
    }

    fn trace(&mut self, dir: Dir, bytes: &[u8], dropped: bool) {
        if let Some(trace) = &mut self.trace {
            trace.push(Sent {
                at: self.now - self.origin,
                dir,
                what: describe(bytes),
                dropped,
            });
        }
    }

    /// Puts a datagram on the link (or drops it).
    fn send(&mut self, dir: Dir, datagram: Datagram) {
        let scripted_drop = self
            .drop_filter
            .as_mut()
            .is_some_and(|filter| filter(dir, &datagram.bytes));
        let lane = match dir {
            Dir::ToServer => &mut self.lanes[0],
            Dir::ToClient => &mut self.lanes[1],
        };
        let times = if scripted_drop {
            Vec::new()
        } else {
            lane.schedule(self.now)
        };
        self.trace(dir, &datagram.bytes, times.is_empty());
        for at in times {
            self.seq += 1;
            self.queue.push(Reverse(InFlight {
                at,
                seq: self.seq,
                dir,
                datagram: datagram.clone(),
            }));
        }
    }

    fn counters(&self) -> Counters {
        let stats = self.session.stats();
        Counters {
            resent: stats.packets_resent,
            retransmits: stats.retransmits,
            early: stats.early_retransmits,
            acks: stats.acks,
            malformed: stats.malformed,
            go_back_acks: stats.go_back_acks,
        }
    }

    /// Drains the session's output onto the link; returns how many datagrams it sent.
    fn drain_session(&mut self) -> u64 {
        let mut sent = 0;
        loop {
            // As a driver with UDP GSO asks: a window's packets may come out together.
            let datagrams: Vec<Vec<u8>> = match self.session.poll_output(GSO_SEGMENTS) {
                Output::Transmit(transmit) => transmit.segments().map(<[u8]>::to_vec).collect(),
                Output::Wait(deadline) => {
                    self.session_wait = Some(deadline);
                    return sent;
                }
                Output::Done(outcome) => {
                    self.session_wait = None;
                    self.outcome = Some(outcome);
                    return sent;
                }
            };
            for bytes in datagrams {
                sent += 1;
                if let Ok(Packet::Data { block, .. }) = Packet::parse(&bytes) {
                    let block = unwrap_block(self.oracle.sent_high, block);
                    self.oracle.sent_high = self.oracle.sent_high.max(block);
                }
                self.send(Dir::ToClient, Datagram { bytes, ack: None });
            }
        }
    }

    fn session_timer(&mut self) {
        let before = self.counters();
        self.session.handle_timeout(self.now);
        let sent = self.drain_session();
        let after = self.counters();
        let full = after.retransmits - before.retransmits;
        let early = after.early - before.early;
        let fired = full + early;
        // A go-back-N that an in-window ACK asked for too early, made when its interval is
        // over: it is the ACK's, not a retransmission.
        let owed = after.go_back_acks - before.go_back_acks;
        self.oracle.streak += full as u32;
        self.oracle.early_streak += early as u32;
        if self.oracle.early_streak > EARLY_BOUND {
            self.violation(format!(
                "{} early retransmissions in a row",
                self.oracle.early_streak
            ));
        }
        if fired + owed == 0 && (sent > 0 || after.resent != before.resent) {
            self.violation(format!(
                "sent {sent} datagram(s) on a timer expiry that was not a retransmission"
            ));
        }
        if fired + owed > 1 {
            self.violation(format!(
                "{fired} retransmissions and {owed} go-back-Ns for one expiry"
            ));
        }
        if owed == 1 {
            self.check_go_back_clock("an owed go-back-N".into());
        }
        if early == 1 {
            self.check_go_back_clock("an early retransmission".into());
        }
        if fired + owed == 1 {
            self.spend_go_back();
        }
    }

    /// A datagram from the client reaches the session; every rule of the oracle is checked.
    fn server_input(&mut self, datagram: Datagram) {
        let was_done = self.outcome.is_some();
        // An early timer call must be harmless.
        if let Some(deadline) = self.session_wait.filter(|_| !was_done) {
            if self.now < deadline {
                let before = self.counters();
                self.session.handle_timeout(self.now);
                let sent = self.drain_session();
                let after = self.counters();
                if sent > 0
                    || after.retransmits != before.retransmits
                    || after.early != before.early
                {
                    self.violation("an early handle_timeout did something".into());
                }
            }
        }
        if matches!(Packet::parse(&datagram.bytes), Ok(Packet::Rrq(_))) {
            return self.repeated_request(was_done);
        }
        let before = self.counters();
        let sent_high = self.oracle.sent_high;
        self.session.handle_datagram(self.now, &datagram.bytes);
        let sent = self.drain_session();
        let after = self.counters();
        let resent = after.resent - before.resent;
        if was_done {
            if sent > 0 {
                self.violation("a finished session sent something".into());
            }
            return;
        }
        let Some(block) = datagram.ack else {
            if after.malformed > before.malformed && sent > 0 {
                self.violation(format!("answered garbage with {sent} datagram(s)"));
            }
            if resent > 0 {
                self.violation("resent DATA in reply to a non-ACK".into());
            }
            return;
        };
        let go_backs = after.go_back_acks - before.go_back_acks;
        if go_backs > 1 {
            self.violation(format!("ACK {block} caused {go_backs} go-back-Ns"));
        }
        if go_backs == 1 {
            self.check_go_back_clock(format!("ACK {block}"));
            self.spend_go_back();
        }
        let advanced = self.oracle.acked_high.is_none_or(|high| block > high);
        if !advanced {
            self.oracle.stale_acks += 1;
            if after.acks != before.acks {
                self.violation(format!("stale ACK {block} counted as progress"));
            }
            if go_backs == 1 && self.oracle.acked_high == Some(block) {
                // A duplicate: loss recovery, one go-back-N after the acknowledged block.
                self.oracle.duplicate_go_backs += 1;
                if resent > sent_high.saturating_sub(block) || sent > resent {
                    self.violation(format!(
                        "duplicate ACK {block} (highest sent {sent_high}) sent {sent}, \
                         {resent} of them resends"
                    ));
                }
            } else {
                // Sorcerer's Apprentice: any other stale ACK must never trigger a send.
                self.oracle.apprentice_replies += sent;
            }
            return;
        }
        self.oracle.acked_high = Some(block);
        let stall = self.now - self.oracle.progress_at.unwrap_or(self.origin);
        self.oracle.longest_stall = self.oracle.longest_stall.max(stall);
        self.oracle.progress_at = Some(self.now);
        self.oracle.streak = 0;
        self.oracle.early_streak = 0;
        if after.acks != before.acks + 1 {
            self.violation(format!("advancing ACK {block} not counted as progress"));
        }
        if resent > 0 && go_backs == 0 {
            self.violation(format!("ACK {block} resent {resent} without a go-back-N"));
        }
        // Resending is allowed only from an ACK inside the window already sent, and only
        // the blocks after it.
        if resent > sent_high.saturating_sub(block) {
            self.violation(format!(
                "ACK {block} (highest sent {sent_high}) caused {resent} resends"
            ));
        }
    }

    /// The client's request again, as the driver hands it to the running session: at most
    /// one resend, of the first reply, while nothing was acknowledged; a retransmission
    /// (a retry spent) that keeps to the go-back clock.
    fn repeated_request(&mut self, was_done: bool) {
        let before = self.counters();
        self.session.handle_repeated_request(self.now);
        let sent = self.drain_session();
        let after = self.counters();
        if was_done {
            if sent > 0 {
                self.violation("a finished session sent something".into());
            }
            return;
        }
        self.oracle.repeated_requests += 1;
        let retransmits = after.retransmits - before.retransmits;
        if sent > 1 || sent != retransmits || after.early != before.early {
            self.violation(format!(
                "a repeated request caused {sent} datagram(s), {retransmits} retransmission(s)"
            ));
        }
        if sent == 1 {
            if self.oracle.acked_high.is_some() {
                self.violation("a repeated request was answered after an ACK".into());
            }
            if self.oracle.sent_high > 1 {
                self.violation("a repeated request resent more than the first reply".into());
            }
            self.check_go_back_clock("a repeated request".into());
            self.spend_go_back();
            self.oracle.streak += 1;
            self.oracle.repeat_resends += 1;
        }
    }

    /// The floor of the go-back clock: [`MIN_GO_BACK_INTERVAL`], or the base timeout when
    /// shorter.
    fn go_back_floor(&self) -> Duration {
        let base = self.session.params().timeout.unwrap_or(self.config.timeout);
        MIN_GO_BACK_INTERVAL.min(base)
    }

    /// A go-back-N that an ACK or an early retransmission caused must find a token in the
    /// oracle's bucket: at most [`GO_BACK_BURST`] at once, then one per floor interval.
    fn check_go_back_clock(&mut self, cause: String) {
        let tolerance = self.go_back_floor() * (GO_BACK_BURST - 1);
        if let Some(clock) = self.oracle.go_back_clock {
            if self.now + tolerance < clock {
                self.violation(format!(
                    "{cause} went back {:?} before the go-back clock allowed it",
                    clock - tolerance - self.now
                ));
            }
        }
    }

    /// A go-back-N of any cause takes a token from the oracle's bucket.
    fn spend_go_back(&mut self) {
        let clock = self
            .oracle
            .go_back_clock
            .map_or(self.now, |c| c.max(self.now));
        self.oracle.go_back_clock = Some(clock + self.go_back_floor());
    }

    fn violation(&mut self, what: String) {
        let at = self.now - self.origin;
        self.oracle.violations.push(format!("at {at:?}: {what}"));
    }

    /// The datagrams the session sent, as `"<ms> <what>"` with ` (lost)` when dropped.
    fn server_sends(&self) -> Vec<String> {
        self.sends(Dir::ToClient)
    }

    fn client_sends(&self) -> Vec<String> {
        self.sends(Dir::ToServer)
    }

    fn sends(&self, dir: Dir) -> Vec<String> {
        let trace = self.trace.as_deref().unwrap_or_default();
        trace
            .iter()
            .filter(|sent| sent.dir == dir)
            .map(|sent| {
                let lost = if sent.dropped { " (lost)" } else { "" };
                format!("{} {}{lost}", sent.at.as_millis(), sent.what)
            })
            .collect()
    }

    /// Protocol violations by the server as the client saw them: those the library
    /// client ended the transfer for, and those only this simulator checks.
    fn client_violations(&self) -> Vec<String> {
        let mut violations = self.client_violations.clone();
        if let Some(Err(ClientError::Protocol(violation))) = self.client.outcome() {
            violations.push(violation.to_string());
        }
        violations
    }

    /// True when the client got the final block.
    fn client_finished(&self) -> bool {
        matches!(self.client.outcome(), Some(Ok(_)))
    }

    /// The `tsize` the OACK announced.
    fn client_tsize(&self) -> Option<u64> {
        self.client.oack().and_then(|oack| oack.tsize)
    }

    /// Panics with the session, the client and the trace when any invariant was broken.
    fn assert_clean(&self) {
        let client_violations = self.client_violations();
        assert!(
            self.oracle.violations.is_empty() && client_violations.is_empty(),
            "oracle: {:#?}\nclient: {:#?}\nsession: {:?}\ntrace: {:#?}",
            self.oracle.violations,
            client_violations,
            self.session,
            self.trace
        );
        assert_eq!(self.oracle.apprentice_replies, 0, "Sorcerer's Apprentice");
    }
}

// ---------------------------------------------------------------------------------------
// The sweep
// ---------------------------------------------------------------------------------------

/// One sweep run, fully determined by these values (rerun one with [`run_one`]).
#[derive(Clone, Copy, Debug)]
struct RunSpec {
    size: usize,
    blksize: u16,
    window: u16,
    loss: f64,
    seed: u64,
}

/// A part of the sweep: every combination of these values, `seeds` times.
struct Plan {
    sizes: &'static [usize],
    blksize: u16,
    windows: &'static [u16],
    losses: &'static [f64],
    seeds: u64,
}

/// What a run produced, for the summary.
struct RunReport {
    outcome: Outcome,
    counts: Counts,
}

/// Counters of one run, or summed over the sweep.
#[derive(Debug, Default)]
struct Counts {
    packets_sent: u64,
    resent: u64,
    stale_acks: u64,
    client_repeat_acks: u64,
    client_gap_acks: u64,
    client_timer_resends: u64,
    client_duplicates: u64,
    virtual_time: Duration,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.packets_sent += other.packets_sent;
        self.resent += other.resent;
        self.stale_acks += other.stale_acks;
        self.client_repeat_acks += other.client_repeat_acks;
        self.client_gap_acks += other.client_gap_acks;
        self.client_timer_resends += other.client_timer_resends;
        self.client_duplicates += other.client_duplicates;
        self.virtual_time += other.virtual_time;
    }
}

/// The client's request for a run: the seed varies the options around blksize/windowsize.
fn request_for(spec: &RunSpec) -> Request {
    let variant = spec.seed % 4;
    if variant == 3 && spec.blksize == 512 && spec.window == 1 {
        return plain();
    }
    let mut request = Request::new(FILE, Mode::Octet).blksize(spec.blksize);
    if variant >= 1 {
        request = request.tsize();
    }
    if variant == 2 {
        request = request.timeout(1);
    }
    request.windowsize(spec.window)
}

fn run_one(origin: Instant, spec: RunSpec) -> Result<RunReport, String> {
    let source = Rng::new(spec.seed ^ 0xda7a).bytes(spec.size);
    let request = request_for(&spec);
    let config = SessionConfig::default();
    let mut sim = Sim::new(
        origin,
        spec.seed,
        request.clone(),
        Box::new(BytesSource::new(source.clone())),
        config,
        LinkProfile::lossy(spec.loss),
    );
    sim.run();
    check_run(&sim, &request, &source, spec.loss).map(|outcome| {
        let stats = sim.session.stats();
        let counts = Counts {
            packets_sent: stats.packets_sent,
            resent: stats.packets_resent,
            stale_acks: sim.oracle.stale_acks,
            client_repeat_acks: sim.client.stats().repeat_acks,
            client_gap_acks: sim.client.stats().gap_acks,
            client_timer_resends: sim.client.stats().timer_resends,
            client_duplicates: sim.client.stats().duplicates,
            virtual_time: sim.now - origin,
        };
        RunReport { outcome, counts }
    })
}

/// The acceptance rules of a sweep run (see `sweep`).
fn check_run(sim: &Sim, request: &Request, source: &[u8], loss: f64) -> Result<Outcome, String> {
    let fail = |what: String| {
        Err(format!(
            "{what}\n  request {request:?}\n  session {:?}\n  client {:?} has {} of {} bytes\n  stats {:?}",
            sim.session,
            sim.client,
            sim.client.data().len(),
            source.len(),
            sim.session.stats()
        ))
    };
    let client_violations = sim.client_violations();
    if !sim.oracle.violations.is_empty() || !client_violations.is_empty() {
        return fail(format!(
            "violations: oracle {:?} client {client_violations:?}",
            sim.oracle.violations
        ));
    }
    if sim.oracle.apprentice_replies > 0 {
        return fail(format!(
            "Sorcerer's Apprentice: {} datagram(s) sent in reply to stale ACKs",
            sim.oracle.apprentice_replies
        ));
    }
    let Some(outcome) = sim.outcome else {
        return fail("the session never ended".into());
    };
    let stats = sim.session.stats();
    if stats.outcome != Some(outcome) {
        return fail(format!("stats outcome {:?} != {outcome:?}", stats.outcome));
    }
    // Whatever happened, the client never holds a byte that is not the source's.
    if !source.starts_with(sim.client.data()) {
        return fail("the client's bytes are not a prefix of the source".into());
    }
    if asks(request, "tsize") && sim.client_tsize() != Some(source.len() as u64) {
        return fail(format!("tsize answered {:?}", sim.client_tsize()));
    }
    let blksize = sim.session.params().blksize as usize;
    let client_has_all = sim.client_finished() && sim.client.data() == source;
    let total_blocks = (source.len() / blksize + 1) as u64;
    let every_block_sent = sim.oracle.sent_high == total_blocks;
    match outcome {
        Outcome::Completed => {
            if !client_has_all {
                return fail("Completed but the client does not hold the source".into());
            }
            if stats.bytes_read != source.len() as u64 {
                return fail(format!("read {} source bytes", stats.bytes_read));
            }
        }
        // "Every block was sent, but the ACK of the last one never came": the client holds
        // at least what it acknowledged (by construction) and usually everything, but the
        // last window may have been lost as often as its ACK.
        Outcome::FinalAckMissing if every_block_sent => {}
        // Not every block went out, so the client cannot have finished.
        Outcome::TimedOut if loss > 0.0 && !every_block_sent => {}
        other => {
            return fail(format!(
                "outcome {other:?} with loss {loss}, every block sent: {every_block_sent}"
            ))
        }
    }
    let progress_at = sim.oracle.progress_at.unwrap_or(sim.origin);
    let without_progress = stats.finished.map(|end| end - progress_at);
    if matches!(outcome, Outcome::TimedOut | Outcome::FinalAckMissing)
        && sim.oracle.streak != sim.config.retries
        && without_progress < Some(sim.config.progress_timeout)
    {
        return fail(format!(
            "{outcome:?} after {} retransmissions in the final streak, budget {}",
            sim.oracle.streak, sim.config.retries
        ));
    }
    // Without loss nothing waits for the full timeout. Delays that vary (1–20 ms here) can
    // still make an early retransmission spurious, as in TCP; they stay rare.
    if loss == 0.0
        && (outcome != Outcome::Completed
            || stats.retransmits > 0
            || stats.packets_resent * 20 > stats.packets_sent)
    {
        return fail(format!(
            "a perfect network needed resends: {} full, {} early, {} of {} packets resent",
            stats.retransmits, stats.early_retransmits, stats.packets_resent, stats.packets_sent
        ));
    }
    Ok(outcome)
}

/// Seeds × sizes × windows × loss rates. Every run ends with the exact bytes or a legitimate
/// outcome, and the oracle's invariants hold throughout.
#[test]
fn sweep() {
    let origin = Instant::now();
    const MIB: usize = 1 << 20;
    let plan = [
        Plan {
            sizes: &[0, 1, 511, 512, 513, 3 * 512],
            blksize: 512,
            windows: &[1, 4, 16],
            losses: &[0.0, 0.1, 0.3],
            seeds: 5,
        },
        Plan {
            sizes: &[MIB + 1],
            blksize: 512,
            windows: &[1, 4, 16],
            losses: &[0.0, 0.1, 0.3],
            seeds: 2,
        },
        // blksize 8: 65537 full blocks and an empty block 65538, numbered ... 65535, 0, 1, 2.
        Plan {
            sizes: &[512 * 1024 + 8],
            blksize: 8,
            windows: &[1, 4, 16],
            losses: &[0.0, 0.1],
            seeds: 2,
        },
    ];
    let mut failures = Vec::new();
    let mut outcomes: BTreeMap<(String, &str), u64> = BTreeMap::new();
    let mut runs = 0u64;
    let mut totals = Counts::default();
    for part in plan {
        for &size in part.sizes {
            for &window in part.windows {
                for &loss in part.losses {
                    for s in 0..part.seeds {
                        let seed = ((size as u64) << 32)
                            ^ (u64::from(window) << 16)
                            ^ (((loss * 100.0) as u64) << 8)
                            ^ s;
                        let spec = RunSpec {
                            size,
                            blksize: part.blksize,
                            window,
                            loss,
                            seed,
                        };
                        runs += 1;
                        match run_one(origin, spec) {
                            Ok(report) => {
                                *outcomes
                                    .entry((format!("loss {loss}"), report.outcome.as_str()))
                                    .or_default() += 1;
                                totals.add(&report.counts);
                            }
                            Err(e) => failures.push(format!("{spec:?}: {e}")),
                        }
                    }
                }
            }
        }
    }
    // The wall time is printed for information only, never asserted.
    eprintln!(
        "sim sweep: {runs} runs in {:?} wall time; totals {totals:#?}",
        origin.elapsed()
    );
    for ((loss, outcome), n) in &outcomes {
        eprintln!("  {loss}: {outcome} × {n}");
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // The apprentice check must have been exercised, and the lossy runs must mostly succeed
    // (a simulator in which everything times out would prove little).
    assert!(totals.stale_acks > 0, "no stale ACK was ever delivered");
    let lossy_completed: u64 = outcomes
        .iter()
        .filter(|((loss, outcome), _)| loss != "loss 0" && *outcome == "completed")
        .map(|(_, n)| n)
        .sum();
    let lossy_runs: u64 = outcomes
        .iter()
        .filter(|((loss, _), _)| loss != "loss 0")
        .map(|(_, n)| n)
        .sum();
    assert!(
        lossy_completed * 2 > lossy_runs,
        "only {lossy_completed} of {lossy_runs} lossy runs completed"
    );
}

// ---------------------------------------------------------------------------------------
// Targeted scenarios (clean link, 5 ms each way, explicit drops)
// ---------------------------------------------------------------------------------------

fn bytes(len: usize) -> Vec<u8> {
    Rng::new(len as u64).bytes(len)
}

fn source(data: &[u8]) -> Box<dyn ResponseData> {
    Box::new(BytesSource::new(data.to_vec()))
}

/// Asserts that `sends` starts with `expected`.
fn assert_starts(sends: &[String], expected: &[&str]) {
    assert!(
        sends.len() >= expected.len() && sends[..expected.len()] == *expected,
        "expected the trace to start with {expected:#?}\ngot {sends:#?}"
    );
}

/// Asserts a clean completed transfer of `data`.
fn assert_completed(sim: &Sim, data: &[u8]) {
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::Completed));
    assert!(sim.client_finished(), "{:?}", sim.client);
    assert!(sim.client.data() == data, "the client's bytes differ");
}

#[test]
fn lost_oack_is_resent_on_timeout() {
    let origin = Instant::now();
    let data = bytes(2000);
    let mut sim = Sim::scripted(origin, octet(512, 4).tsize(), source(&data))
        .with_drops(drop_first(Dir::ToClient, "OACK"));
    sim.run();
    assert_completed(&sim, &data);
    assert_starts(
        &sim.server_sends(),
        &[
            "0 OACK (lost)",
            "1000 OACK",
            "1010 DATA 1:512",
            "1010 DATA 2:512",
        ],
    );
    assert_eq!(sim.session.stats().retransmits, 1);
    assert_eq!(sim.session.stats().packets_resent, 0);
    assert_eq!(sim.client_tsize(), Some(2000));
}

#[test]
fn lost_ack0_is_recovered_by_the_resent_oack() {
    let origin = Instant::now();
    let data = bytes(2000);
    let mut sim = Sim::scripted(origin, octet(512, 4), source(&data))
        .with_drops(drop_first(Dir::ToServer, "ACK 0"));
    sim.run();
    assert_completed(&sim, &data);
    assert_starts(
        &sim.server_sends(),
        &["0 OACK", "1000 OACK", "1010 DATA 1:512"],
    );
    assert_starts(&sim.client_sends(), &["5 ACK 0 (lost)", "1005 ACK 0"]);
    assert_eq!(sim.session.stats().retransmits, 1);
    assert_eq!(sim.client.stats().repeat_acks, 1);
}

#[test]
fn lost_data_mid_window_resumes_after_the_last_in_order_block() {
    let origin = Instant::now();
    let data = bytes(10 * 512 + 100);
    let mut sim = Sim::scripted(origin, octet(512, 4), source(&data))
        .with_drops(drop_first(Dir::ToClient, "DATA 2:512"));
    sim.run();
    assert_completed(&sim, &data);
    // The client gets 1, sees 3 (a gap: ACK 1, once) and drops 3 and 4; the session
    // resumes from 2 right away, without waiting for its timer.
    assert_starts(&sim.client_sends(), &["5 ACK 0", "15 ACK 1", "25 ACK 5"]);
    assert_starts(
        &sim.server_sends(),
        &[
            "0 OACK",
            "10 DATA 1:512",
            "10 DATA 2:512 (lost)",
            "10 DATA 3:512",
            "10 DATA 4:512",
            "20 DATA 2:512",
            "20 DATA 3:512",
            "20 DATA 4:512",
            "20 DATA 5:512",
            "30 DATA 6:512",
        ],
    );
    let stats = sim.session.stats();
    assert_eq!((stats.retransmits, stats.packets_resent), (0, 3));
    assert_eq!(sim.client.stats().gap_acks, 1);
}

#[test]
fn lost_final_ack_is_answered_again_by_the_lingering_client() {
    let origin = Instant::now();
    // Blocks 1..=4, then 5 and the short final block 6.
    let data = bytes(5 * 512 + 7);
    let mut sim = Sim::scripted(origin, octet(512, 4), source(&data))
        .with_drops(drop_first(Dir::ToServer, "ACK 6"));
    sim.run();
    assert_completed(&sim, &data);
    let sends = sim.server_sends();
    // The timer resends the unacknowledged window 5..=6, early: with two round trips
    // measured the early timer waits 200 ms (not the 1 s timeout); the finished client
    // answers the final block again.
    assert_eq!(
        sends[sends.len() - 4..],
        [
            "20 DATA 5:512",
            "20 DATA 6:7",
            "220 DATA 5:512",
            "220 DATA 6:7"
        ]
    );
    assert_eq!(sim.client_sends().last().unwrap(), "225 ACK 6");
    let stats = sim.session.stats();
    assert_eq!(
        (
            stats.retransmits,
            stats.early_retransmits,
            stats.packets_resent
        ),
        (0, 1, 2)
    );
    assert_eq!(sim.client.stats().linger_acks, 1);
}

#[test]
fn client_vanishing_after_the_oack_times_out_after_exactly_the_retries() {
    let origin = Instant::now();
    let mut sim = Sim::scripted(origin, octet(512, 4), source(&bytes(5000)))
        .with_drops(Box::new(|dir, _| dir == Dir::ToServer));
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::TimedOut));
    // Backoff 1, 2, 4, 8, 8 s; then 8 s more and it gives up. No ERROR is sent.
    assert_eq!(
        sim.server_sends(),
        [
            "0 OACK",
            "1000 OACK",
            "3000 OACK",
            "7000 OACK",
            "15000 OACK",
            "23000 OACK"
        ]
    );
    let stats = sim.session.stats();
    assert_eq!(
        stats.retransmits,
        u64::from(SessionConfig::default().retries)
    );
    assert_eq!(sim.oracle.streak, SessionConfig::default().retries);
    assert_eq!(stats.finished, Some(origin + Duration::from_secs(31)));
    assert_eq!(sim.client.outcome(), Some(Err(&ClientError::TimedOut)));
}

#[test]
fn error_8_after_the_oack_is_a_probe_and_gets_no_reply() {
    let origin = Instant::now();
    let mut sim = Sim::scripted(origin, octet(1468, 1).tsize(), source(&bytes(9000)))
        .with_abort(Abort::AfterOack(ErrorCode::OptionNegotiation));
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::Probe));
    assert_eq!(sim.server_sends(), ["0 OACK"]);
    assert_eq!(sim.client_sends(), ["5 ERROR 8"]);
    assert_eq!(sim.client_tsize(), Some(9000));
    let stats = sim.session.stats();
    assert_eq!(
        stats.peer_error,
        Some((ErrorCode::OptionNegotiation, "tsize probe".into()))
    );
    assert_eq!(stats.errors_sent, 0);
}

#[test]
fn error_mid_transfer_ends_the_session_without_reply() {
    let origin = Instant::now();
    let mut sim = Sim::scripted(origin, octet(512, 4), source(&bytes(20 * 512)))
        .with_abort(Abort::AfterBlock(6, ErrorCode::DiskFull));
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::PeerError(ErrorCode::DiskFull)));
    assert_eq!(sim.client_sends().last().unwrap(), "25 ERROR 3");
    // The second window (5..=8) went out at 20 ms; nothing after the ERROR.
    assert_eq!(sim.server_sends().last().unwrap(), "20 DATA 8:512");
    assert_eq!(sim.session.stats().errors_sent, 0);
    assert_eq!(sim.client.data().len(), 6 * 512);
}

#[test]
fn repeated_ack0_is_never_answered() {
    let origin = Instant::now();
    let data = bytes(20 * 512 + 1);
    let mut sim = Sim::scripted(origin, octet(512, 4), source(&data));
    // The genuine ACK 0 reaches the session at 10 ms; 100 copies follow, 0.5 ms apart, while
    // the transfer runs (its windows go out at 10, 20, ... 60 ms). Had a copy caused a
    // resend, the client's answer to that resend (a duplicate of its last ACK, one round
    // trip later) must not cause another, or every later window would go twice: the
    // count of packets sent below catches both.
    for i in 0..100 {
        let mut ack0 = Vec::new();
        write_ack(&mut ack0, 0);
        let at = Duration::from_millis(11) + Duration::from_micros(500 * i);
        let datagram = Datagram {
            bytes: ack0,
            ack: Some(0),
        };
        sim.inject(at, Dir::ToServer, datagram);
    }
    sim.run();
    assert_completed(&sim, &data);
    assert_eq!(sim.oracle.stale_acks, 100);
    let stats = sim.session.stats();
    assert_eq!(stats.duplicate_acks + stats.unexpected_acks, 100);
    assert_eq!((stats.retransmits, stats.packets_resent), (0, 0));
    assert_eq!(
        stats.packets_sent,
        1 + 21,
        "the OACK and 21 blocks, once each"
    );
}

#[test]
fn duplicated_data_in_lock_step_does_not_start_the_apprentice() {
    // Every DATA arrives twice; the RFC 1350 client ACKs each copy. The session must ignore
    // every second ACK, or each block would double the traffic from then on.
    let origin = Instant::now();
    let data = bytes(40 * 512 + 3);
    let mut sim = Sim::scripted(origin, plain(), source(&data));
    sim.lanes[1].profile.dup = 1.0;
    sim.run();
    assert_completed(&sim, &data);
    let stats = sim.session.stats();
    assert_eq!(stats.packets_sent, 41);
    assert_eq!(
        stats.duplicate_acks, 40,
        "the final block's duplicate ACK comes too late"
    );
    assert_eq!(sim.oracle.stale_acks, 40);
    assert_eq!(sim.client.stats().repeat_acks, 40);
    assert_eq!(sim.client.stats().linger_acks, 1);
}

/// Fails with an `io::Error` after `ok` bytes.
struct FailAfter {
    data: Vec<u8>,
    pos: usize,
}

impl ResponseData for FailAfter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.data.len() {
            return Err(io::Error::other("disk on fire at /srv/secret/path"));
        }
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn source_read_error_sends_error_0_and_ends() {
    let origin = Instant::now();
    let data = bytes(1500);
    let failing = Box::new(FailAfter {
        data: data.clone(),
        pos: 0,
    });
    let mut sim = Sim::scripted(origin, plain(), failing);
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::ReadFailed));
    assert_eq!(
        sim.server_sends(),
        ["0 DATA 1:512", "10 DATA 2:512", "20 ERROR 0"]
    );
    assert!(
        matches!(
            sim.client.outcome(),
            Some(Err(ClientError::Server {
                code: ErrorCode::NotDefined,
                ..
            }))
        ),
        "{:?}",
        sim.client
    );
    assert!(sim.client.data() == &data[..1024]);
    let stats = sim.session.stats();
    assert_eq!(stats.errors_sent, 1);
    // The message is generic: no path, no io::Error text.
    assert_eq!(
        stats.error_sent,
        Some((ErrorCode::NotDefined, "error reading file".into()))
    );
}

#[test]
fn exact_multiple_of_blksize_ends_with_an_empty_data() {
    let origin = Instant::now();
    for window in [1, 4] {
        let data = bytes(3 * 512);
        let mut sim = Sim::scripted(origin, octet(512, window), source(&data));
        sim.run();
        assert_completed(&sim, &data);
        let sends = sim.server_sends();
        assert!(sends.last().unwrap().ends_with(" DATA 4:0"), "{sends:?}");
        assert_eq!(sim.session.stats().packets_sent, 5, "OACK + 4 blocks");
    }
}

#[test]
fn empty_file_is_one_empty_data_1() {
    let origin = Instant::now();
    let mut sim = Sim::scripted(origin, plain(), source(b""));
    sim.run();
    assert_completed(&sim, b"");
    assert_eq!(sim.server_sends(), ["0 DATA 1:0"]);
    assert_eq!(sim.client_sends(), ["5 ACK 1"]);

    let mut sim = Sim::scripted(origin, octet(1024, 8).tsize(), source(b""));
    sim.run();
    assert_completed(&sim, b"");
    assert_eq!(sim.server_sends(), ["0 OACK", "10 DATA 1:0"]);
    assert_eq!(sim.client_tsize(), Some(0));
}

/// LF → CR LF, CR → CR NUL (every source byte is translated, as in tftpd-hpa).
fn to_netascii(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &b in text {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

/// The client side: CR LF → LF, CR NUL → CR.
fn from_netascii(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = wire.iter().copied();
    while let Some(b) = bytes.next() {
        if b == b'\r' {
            match bytes.next() {
                Some(b'\n') => out.push(b'\n'),
                Some(0) => out.push(b'\r'),
                other => panic!("bare CR followed by {other:?}"),
            }
        } else {
            out.push(b);
        }
    }
    out
}

#[test]
fn netascii_translates_end_to_end() {
    let origin = Instant::now();
    // A CR at offset 511 (its NUL lands in block 2), an LF at 1022 (its pair straddles the
    // block 2/3 boundary after the first translation shifts everything by one), CR LF pairs.
    let mut text = vec![b'a'; 511];
    text.push(b'\r');
    text.extend(vec![b'b'; 510]);
    text.push(b'\n');
    text.extend(b"line\r\nnext\nlast\rend\n".repeat(40));
    let request = Request::new(FILE, Mode::Netascii)
        .blksize(512)
        .windowsize(4)
        .tsize();
    let mut sim = Sim::scripted(origin, request, source(&text));
    sim.run();
    let wire = to_netascii(&text);
    assert_completed(&sim, &wire);
    assert_eq!(from_netascii(sim.client.data()), text);
    // The translated size is unknown in advance, so tsize is not answered.
    assert_eq!(sim.client_tsize(), None);
    assert_eq!(sim.session.params().tsize, None);
}

#[test]
fn stray_malformed_datagrams_mid_transfer_are_ignored() {
    let origin = Instant::now();
    let data = bytes(30 * 512 + 77);
    let mut sim = Sim::scripted(origin, octet(512, 2), source(&data));
    let garbage: [&[u8]; 6] = [
        b"",
        b"\x00",
        b"\x00\x04\x00\x01trailing",
        b"\x00\x63unknown opcode",
        b"\x00\x05",
        b"\x00\x06blksize\x00",
    ];
    for (i, junk) in garbage.iter().enumerate() {
        let at = Duration::from_millis(23 + 20 * i as u64);
        let datagram = Datagram {
            bytes: junk.to_vec(),
            ack: None,
        };
        sim.inject(at, Dir::ToServer, datagram);
    }
    sim.run();
    assert_completed(&sim, &data);
    let stats = sim.session.stats();
    assert_eq!(stats.malformed, garbage.len() as u64);
    assert_eq!((stats.retransmits, stats.packets_resent), (0, 0));
    assert_eq!(stats.errors_sent, 0);
}

/// Issue 15, item 11: with 20 % of DATA lost, a client that re-sends its last ACK every
/// 300 ms and gives up after 20 tries, and the server at timeout 1 s with 3 retries, every
/// transfer completes, in lock step and with windowsize 16. Before duplicate ACKs could
/// trigger a resend, 1 to 2 transfers in 16 failed: after a few losses the server's
/// doubling timer (1, 2, 4 s) left the client 6 s without DATA.
#[test]
fn duplicate_acks_recover_losses_before_an_impatient_client_gives_up() {
    let origin = Instant::now();
    let config = SessionConfig {
        timeout: Duration::from_secs(1),
        retries: 3,
        ..SessionConfig::default()
    };
    let impatient = Settings {
        timeout: Duration::from_millis(300),
        retries: 20,
        linger: 2,
        keep_payload: true,
    };
    let mut duplicate_go_backs = 0;
    let mut failures = Vec::new();
    for window in [1, 16] {
        for seed in 0..3u64 {
            for transfer in 0..16u64 {
                let seed = (seed << 8) | transfer;
                let data = Rng::new(seed ^ 0xf11e).bytes(100_000);
                let mut loss = Rng::new(seed ^ 0x10_55);
                // Only DATA is lost: the OACK and every ACK arrive.
                let lose_data: DropFilter = Box::new(move |dir, bytes| {
                    dir == Dir::ToClient && describe(bytes).starts_with("DATA") && loss.chance(0.2)
                });
                let mut sim = Sim::with_client(
                    origin,
                    seed,
                    octet(512, window),
                    source(&data),
                    config,
                    LinkProfile::clean(),
                    impatient,
                )
                .with_drops(lose_data);
                sim.run();
                sim.assert_clean();
                duplicate_go_backs += sim.oracle.duplicate_go_backs;
                if !(sim.client_finished() && sim.client.data() == data) {
                    failures.push(format!(
                        "window {window} seed {seed:#x}: client {:?}, session {:?}",
                        sim.client.outcome(),
                        sim.session.stats()
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 96 failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        duplicate_go_backs > 0,
        "no duplicate ACK ever caused a resend"
    );
}

#[test]
fn block_numbers_roll_over_under_loss() {
    // One lossy run across the wrap with a window straddling 65535 → 0; the sweep covers
    // the other combinations.
    let origin = Instant::now();
    let spec = RunSpec {
        size: 512 * 1024 + 8 + 3,
        blksize: 8,
        window: 7,
        loss: 0.05,
        seed: 0x0011_0000,
    };
    let report = run_one(origin, spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    assert_eq!(report.outcome, Outcome::Completed);
}

/// Fails at the time of writing: the session reports `TimedOut`, because it decides
/// `FinalAckMissing` by `base == last` (only the last block unacknowledged), which in window
/// mode is false whenever the final window holds more than one block.
#[test]
fn lost_final_window_ack_is_final_ack_missing() {
    // Every block is sent; the client gets them all and ACKs the final window (blocks 5 and
    // 6) with ACK 6, which is always lost, lingering replies included. "Every block was sent,
    // but the ACK of the last one never came" is `FinalAckMissing`.
    let origin = Instant::now();
    let data = bytes(5 * 512 + 7);
    let mut sim =
        Sim::scripted(origin, octet(512, 4), source(&data)).with_drops(Box::new(|dir, bytes| {
            dir == Dir::ToServer && describe(bytes) == "ACK 6"
        }));
    sim.run();
    sim.assert_clean();
    assert!(sim.client_finished(), "{:?}", sim.client);
    assert!(sim.client.data() == data);
    assert_eq!(sim.oracle.streak, SessionConfig::default().retries);
    assert_eq!(
        sim.outcome,
        Some(Outcome::FinalAckMissing),
        "{:?}",
        sim.session
    );
}

// ---------------------------------------------------------------------------------------
// Firmware loss behaviour (issue 16, item 2)
// ---------------------------------------------------------------------------------------

/// GRUB 2: blksize 1024 and `tsize`, no window; it repeats its request 0.40 s after it
/// went unanswered, and then about every 0.4 s.
fn grub() -> (Request, Settings) {
    let request = Request::new(FILE, Mode::Octet).blksize(1024).tsize();
    let settings = Settings {
        timeout: Duration::from_millis(400),
        retries: 20,
        linger: 2,
        keep_payload: true,
    };
    (request, settings)
}

/// A GRUB-like scenario on the clean link (5 ms each way) with a trace.
fn grub_sim(origin: Instant, data: &[u8]) -> Sim {
    let (request, settings) = grub();
    let mut sim = Sim::with_client(
        origin,
        0,
        request,
        source(data),
        SessionConfig::default(),
        LinkProfile::clean(),
        settings,
    );
    sim.trace = Some(Vec::new());
    sim
}

#[test]
fn a_repeated_request_resends_a_lost_oack_before_the_timer() {
    let origin = Instant::now();
    let data = bytes(5000);
    let mut sim = grub_sim(origin, &data).with_drops(drop_first(Dir::ToClient, "OACK"));
    sim.run();
    assert_completed(&sim, &data);
    // The OACK is lost; GRUB repeats its request at 0.40 s and the OACK goes again when
    // the repeat arrives, not at the 1 s timer.
    assert_starts(&sim.client_sends(), &["400 RRQ", "410 ACK 0"]);
    assert_starts(
        &sim.server_sends(),
        &["0 OACK (lost)", "405 OACK", "415 DATA 1:1024"],
    );
    let stats = sim.session.stats();
    assert_eq!((stats.repeated_requests, stats.repeat_resends), (1, 1));
    assert_eq!(stats.retransmits, 1, "a retry spent");
    assert_eq!(sim.oracle.repeat_resends, 1);

    // So is a lost DATA 1 without options: a repeat brings it again.
    let mut sim = Sim::with_client(
        origin,
        0,
        plain(),
        source(&data),
        SessionConfig::default(),
        LinkProfile::clean(),
        grub().1,
    )
    .with_drops(drop_first(Dir::ToClient, "DATA 1:512"));
    sim.trace = Some(Vec::new());
    sim.run();
    assert_completed(&sim, &data);
    assert_starts(
        &sim.server_sends(),
        &["0 DATA 1:512 (lost)", "405 DATA 1:512", "415 DATA 2:512"],
    );
}

#[test]
fn a_flood_of_repeated_requests_gets_no_more_than_the_timer_would_send() {
    // Every reply is lost, and the client repeats its request every millisecond (as a
    // spoofer would, from a victim's address): the session sends its first reply once
    // per go-back interval at most (20 ms: nothing was measured), and no more often in
    // all than the timer would, 1 + retries.
    let origin = Instant::now();
    let flood = Settings {
        timeout: Duration::from_millis(1),
        retries: 5000,
        linger: 0,
        keep_payload: true,
    };
    let mut sim = Sim::with_client(
        origin,
        0,
        octet(1024, 1).tsize(),
        source(&bytes(5000)),
        SessionConfig::default(),
        LinkProfile::clean(),
        flood,
    )
    .with_drops(Box::new(|dir, _| dir == Dir::ToClient));
    sim.trace = Some(Vec::new());
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::TimedOut));
    let retries = SessionConfig::default().retries;
    assert_eq!(
        sim.server_sends(),
        [
            "0 OACK (lost)",
            "20 OACK (lost)",
            "40 OACK (lost)",
            "60 OACK (lost)",
            "80 OACK (lost)",
            "100 OACK (lost)"
        ]
    );
    let stats = sim.session.stats();
    assert_eq!(stats.repeat_resends, u64::from(retries));
    assert!(stats.repeated_requests > 1000, "{stats:?}");
    // Then the timer, finding the budget spent, ends the session: 8 s after the last
    // resend, sooner than the 31 s of the timer alone.
    assert_eq!(
        stats.finished,
        Some(origin + Duration::from_millis(100) + Duration::from_secs(8))
    );
}

#[test]
fn grub_closing_after_the_promised_size_with_the_empty_final_data_lost_completed() {
    // A file of exactly 8 × 1024 bytes ends with an empty DATA 9. GRUB acknowledges
    // DATA 8, has the `tsize` bytes and closes with ERROR 0; DATA 9 is lost (here every
    // time).
    let origin = Instant::now();
    let data = bytes(8 * 1024);
    let mut sim = grub_sim(origin, &data)
        .with_drops(Box::new(|dir, bytes| {
            dir == Dir::ToClient && describe(bytes) == "DATA 9:0"
        }))
        .with_abort(Abort::ClosedAfter(8, ErrorCode::NotDefined));
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::Completed), "{:?}", sim.session);
    assert!(sim.client.data() == data, "the client's bytes differ");
    let sends = sim.client_sends();
    assert_eq!(sends[sends.len() - 2..], ["85 ACK 8", "85 ERROR 0"]);
    let stats = sim.session.stats();
    assert_eq!(
        stats.peer_error,
        Some((ErrorCode::NotDefined, "closed".into()))
    );
    // One block short of that, the same ERROR is still the client's failure.
    let mut sim = grub_sim(origin, &data).with_abort(Abort::ClosedAfter(7, ErrorCode::NotDefined));
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::PeerError(ErrorCode::NotDefined)));
}

/// iPXE: blksize 1432 and `tsize`, lock step; it re-sends its last ACK (or its request)
/// after 250 ms without news, its retry timer's minimum.
fn ipxe() -> (Request, Settings) {
    let request = Request::new(FILE, Mode::Octet).blksize(1432).tsize();
    let settings = Settings {
        timeout: Duration::from_millis(250),
        retries: 40,
        linger: 2,
        keep_payload: false,
    };
    (request, settings)
}

/// A lock-step path: one way uniform in `one_way` microseconds, never reordered.
fn path(one_way: (u64, u64)) -> LinkProfile {
    LinkProfile {
        loss: 0.0,
        dup: 0.0,
        min_delay: Duration::from_micros(one_way.0),
        max_delay: Duration::from_micros(one_way.1),
        reorder: false,
        hiccup: (0.0, Duration::ZERO),
        slow_start: (0, Duration::ZERO),
    }
}

/// One iPXE-like lock-step transfer of `data` over `link`, with `loss` of the datagrams
/// towards the client dropped (as the issue measured it with nftables). The client is
/// slow at first (its first three ACKs 8 ms late: getting ready after the OACK) and busy
/// now and then (one ACK in a thousand 10 ms late): slow samples that the old estimate
/// kept for good. The session's timer fires as the server's loop would fire it
/// ([`DriverTimer::SERVER`]). It must complete cleanly.
fn lock_step_run(origin: Instant, seed: u64, data: &[u8], link: LinkProfile, loss: f64) -> Sim {
    let (request, settings) = ipxe();
    let mut sim = Sim::with_client(
        origin,
        seed,
        request,
        source(data),
        SessionConfig::default(),
        link,
        settings,
    );
    sim.driver_timer = Some(DriverTimer::SERVER);
    sim.lanes[0].profile.hiccup = (0.001, Duration::from_millis(10));
    sim.lanes[0].profile.slow_start = (3, Duration::from_millis(8));
    sim.lanes[1].profile.loss = loss;
    sim.run();
    sim.assert_clean();
    assert_eq!(sim.outcome, Some(Outcome::Completed), "{:?}", sim.session);
    assert!(sim.client_finished(), "{:?}", sim.client);
    assert_eq!(sim.client.bytes(), data.len() as u64);
    sim
}

/// How long the session took, first packet to last ACK (virtual time).
fn session_time(sim: &Sim) -> Duration {
    let stats = sim.session.stats();
    stats.duration(stats.started)
}

/// Issue 16, item 2: an iPXE-like client (lock step, blksize 1432, its last ACK again
/// after 250 ms) fetches 64 MiB with 5 % of the datagrams towards it lost. No loss may
/// cost a full server timeout (the client's repeated ACK, or request, is a loss signal,
/// and the early timer comes first), and the whole transfer takes at most 1.5 × the
/// loss-free time, on a 0.1 ms path too: the early timer's floor is 500 µs
/// (`SessionConfig::min_rto`) and the session's deadlines fire as the server's 100 µs
/// timer wheel fires them (1.27–1.34× there; with a 2 ms floor and a millisecond wheel
/// it was 1.9–2.0×). (With the estimate's old floor, 1.5 × the slowest sample ever,
/// the slow start kept the early timer at 12 ms for good: 7.8–8.3× on the 0.1 ms path,
/// 2.3–2.4× on the LAN path, the 4–10× with iPXE in qemu.)
#[test]
fn lock_step_at_5_percent_loss_costs_little_and_never_a_full_timeout() {
    let origin = Instant::now();
    let size = 64 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let timeout = SessionConfig::default().timeout;
    // (name, one way in µs, the bound on the ratio)
    let paths = [
        ("qemu bridge, 0.1 ms", (40, 70), 1.5),
        ("LAN, 0.5-0.8 ms", (250, 400), 1.5),
        ("WAN, 10 ms", (5000, 5000), 1.5),
    ];
    let mut failures = Vec::new();
    for (name, one_way, bound) in paths {
        let clean = session_time(&lock_step_run(origin, 0, &data, path(one_way), 0.0));
        for seed in 1..=3u64 {
            let sim = lock_step_run(origin, seed, &data, path(one_way), 0.05);
            let time = session_time(&sim);
            let ratio = time.as_secs_f64() / clean.as_secs_f64();
            let stats = sim.session.stats();
            let full_timeouts = stats.retransmits - stats.repeat_resends;
            let lost = sim.lanes[1].dropped;
            eprintln!(
                "{name}, seed {seed}: {time:?} against {clean:?} loss-free, {ratio:.3}×; \
                 {} early, {} go-backs, {} repeat, {full_timeouts} full; longest stall {:?}; \
                 srtt {:?} rttvar {:?}; {lost} lost",
                stats.early_retransmits,
                stats.go_back_acks,
                stats.repeat_resends,
                sim.oracle.longest_stall,
                stats.srtt,
                stats.rttvar,
            );
            if ratio > bound || full_timeouts > 0 || sim.oracle.longest_stall >= timeout {
                failures.push(format!("{name}, seed {seed}: {ratio:.3}× {stats:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// EDK2's windowsize 4 on the sweep's path (1–20 ms each way, reordering) losing 2 or
/// 5 % of the datagrams each way: 1 MiB at blksize 1428, four seeds; the total time at
/// most 3 × and 4 × the loss-free time (2.41× and 3.07× now; on this path a loss costs
/// the client's and the server's timers far more than its round trips). Guards the
/// backoff of resends made on time: kept until a round-trip sample, as first written, it
/// made these 3.5× and 5.7× (few ACKs on such a path are of blocks sent once); a resend
/// answered within the estimate ends it now.
#[test]
fn windowsize_4_at_moderate_loss_stays_close_to_the_loss_free_time() {
    let origin = Instant::now();
    let total = |loss: f64| -> f64 {
        (0..4u64)
            .map(|seed| {
                let spec = RunSpec {
                    size: 1 << 20,
                    blksize: 1428,
                    window: 4,
                    loss,
                    seed: seed * 7919 + 1,
                };
                let report = run_one(origin, spec).unwrap_or_else(|e| panic!("{e}"));
                report.counts.virtual_time.as_secs_f64()
            })
            .sum()
    };
    let clean = total(0.0);
    let mut failures = Vec::new();
    for (loss, bound) in [(0.02, 3.0), (0.05, 4.0)] {
        let ratio = total(loss) / clean;
        eprintln!("windowsize 4, loss {loss}: {ratio:.2} × the loss-free time");
        if ratio > bound {
            failures.push(format!("loss {loss}: {ratio:.2}× (at most {bound}×)"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn an_edk2_gap_ack_before_three_samples_recovers_in_milliseconds() {
    // EDK2's read: blksize 1468, windowsize 4. DATA 5 is lost; the client answers DATA 6
    // with ACK 4 at once. Two round trips (10 ms) are measured, too few for the early
    // timer, but the duplicate owes a go-back once DATA 5 has been out for the estimate
    // (10 + 4 × 3.75 = 25 ms): DATA 5 goes again at 45 ms, not at the 1 s timer.
    let origin = Instant::now();
    let data = bytes(20 * 1468 + 100);
    let mut sim = Sim::scripted(origin, octet(1468, 4), source(&data))
        .with_drops(drop_first(Dir::ToClient, "DATA 5:1468"));
    sim.run();
    assert_completed(&sim, &data);
    assert_starts(&sim.client_sends(), &["5 ACK 0", "15 ACK 4", "25 ACK 4"]);
    let sends = sim.server_sends();
    assert_eq!(
        sends[5..10],
        [
            "20 DATA 5:1468 (lost)",
            "20 DATA 6:1468",
            "20 DATA 7:1468",
            "20 DATA 8:1468",
            "45 DATA 5:1468"
        ],
        "{sends:#?}"
    );
    let stats = sim.session.stats();
    assert_eq!((stats.go_back_acks, stats.go_back_held), (1, 1));
    assert_eq!((stats.retransmits, stats.early_retransmits), (0, 0));
}

/// Drops `loss` of the DATA and of the ACKs other than ACK 0, at random from `seed`: the
/// options' exchange is never lost (a lost OACK or ACK 0 waits for the full timeout by
/// design, as nothing is measured yet; tested on their own).
fn drop_after_negotiation(seed: u64, loss: f64) -> DropFilter {
    let mut rng = Rng::new(seed);
    Box::new(move |_, bytes| match Packet::parse(bytes) {
        Ok(Packet::Data { .. }) => rng.chance(loss),
        Ok(Packet::Ack { block }) => block != 0 && rng.chance(loss),
        _ => false,
    })
}

/// RFC 7440's windowsize 16 (a client that acknowledges each window, and its last
/// in-order block once per gap) fetching 16 MiB at blksize 1432 on the lock-step test's
/// three paths, with 1 or 5 % of the DATA and of the ACKs lost, four seeds each: no loss
/// may cost a full timeout (the client's gap ACK, or the early timer, comes first), and
/// the transfer takes at most 1.6× and 3× the loss-free time (1.14–1.44× and 1.63–2.42×
/// now). A lost window tail draws no ACK from such a client: without the early timer
/// (adaptive retransmission off) each waits the full timeout, 17–132 of them per run.
#[test]
fn windowsize_16_under_loss_never_waits_a_full_timeout() {
    let origin = Instant::now();
    let data: Vec<u8> = (0..16 << 20).map(|i| (i % 251) as u8).collect();
    let run = |one_way: (u64, u64), drops: Option<DropFilter>| -> Sim {
        let mut sim = Sim::with_client(
            origin,
            0,
            octet(1432, 16),
            source(&data),
            SessionConfig::default(),
            path(one_way),
            client_settings(),
        );
        sim.driver_timer = Some(DriverTimer::SERVER);
        if let Some(drops) = drops {
            sim = sim.with_drops(drops);
        }
        sim.run();
        assert_completed(&sim, &data);
        sim
    };
    let paths = [
        ("qemu bridge, 0.1 ms", (40, 70)),
        ("LAN, 0.5-0.8 ms", (250, 400)),
        ("WAN, 10 ms", (5000, 5000)),
    ];
    let mut failures = Vec::new();
    for (name, one_way) in paths {
        let clean = session_time(&run(one_way, None));
        for (loss, bound) in [(0.01, 1.6), (0.05, 3.0)] {
            for seed in 1..=4u64 {
                let sim = run(one_way, Some(drop_after_negotiation(seed, loss)));
                let time = session_time(&sim);
                let ratio = time.as_secs_f64() / clean.as_secs_f64();
                let stats = sim.session.stats();
                eprintln!(
                    "{name}, loss {loss}, seed {seed}: {time:?} against {clean:?} loss-free, \
                     {ratio:.2}×; {} early, {} full, {} go-backs, {} of {} resent",
                    stats.early_retransmits,
                    stats.retransmits,
                    stats.go_back_acks,
                    stats.packets_resent,
                    stats.packets_sent,
                );
                if ratio > bound || stats.retransmits > 0 {
                    failures.push(format!(
                        "{name}, loss {loss}, seed {seed}: {ratio:.2}× {stats:?}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Windowed clients that acknowledge each window, and their last in-order block once per
/// gap, send nothing more until their own timer when an ACK or a window's tail is lost:
/// the server's timer must recover it. In the first windows the estimate has one or two
/// samples, and the early timer used to wait for the third, so such a loss waited the
/// full timeout (1 s) in 16 % of these transfers (1 MiB on the LAN path, windowsize 4 to
/// 64, 1 or 5 % of DATA and ACKs lost after the options' exchange); now it waits 200 ms
/// at most (before backoff), and no transfer meets the full timeout.
#[test]
fn a_loss_in_the_first_windows_never_waits_the_full_timeout() {
    let origin = Instant::now();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut failures = Vec::new();
    for window in [4u16, 16, 64] {
        for seed in 1..=40u64 {
            for loss in [0.01, 0.05] {
                let mut sim = Sim::with_client(
                    origin,
                    0,
                    octet(1432, window),
                    source(&data),
                    SessionConfig::default(),
                    path((250, 400)),
                    client_settings(),
                )
                .with_drops(drop_after_negotiation(seed, loss));
                sim.driver_timer = Some(DriverTimer::SERVER);
                sim.run();
                assert_completed(&sim, &data);
                let stats = sim.session.stats();
                if stats.retransmits > 0 {
                    failures.push(format!(
                        "windowsize {window}, seed {seed}, loss {loss}: {} full timeouts",
                        stats.retransmits
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
