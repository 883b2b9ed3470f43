//! Admission: what to do with each datagram that reaches a listener. No sockets and no
//! clock (every call takes `now`): the driver reads the datagram, asks for a [`Verdict`]
//! and carries it out, so every rule here is unit-tested with explicit times.
//!
//! A session is *unverified* until its client's first ACK ([`Session::is_verified`]):
//! until then nothing shows that the request came from the address it names — it may be
//! spoofed. The driver reports the change ([`Admission::session_verified`], checked after
//! each datagram a session takes: O(1)). Unverified sessions cost their client little and
//! give way to newer requests.
//!
//! # The rules, in order
//!
//! In single-port mode the listeners also carry the running sessions' ACKs, so first:
//!
//! 1. A datagram that is not a request, from a peer with a running session, is that
//!    session's ([`Verdict::ToSession`]). If it makes no progress (no new ACK: duplicate
//!    or out-of-window ACKs, junk), the driver charges it to the client's request rate
//!    ([`Admission::charge_no_progress`]); ACKs that make progress cost nothing.
//! 2. While shutting down, nothing new: anything else from a peer without a session is
//!    dropped.
//!
//! Then, in both modes:
//!
//! 3. Each client (an IPv4 address or IPv6 /64) may send requests at the request rate
//!    (a token bucket, shared by every worker); over it, datagrams are dropped unanswered
//!    — an answer is what a reflection attack wants. Loopback is exempt unless
//!    `limit_loopback`.
//! 4. Nothing answered is larger than the datagram that caused it. Refusals carry short
//!    fixed messages; the driver sends the message only if the ERROR still fits, else
//!    an ERROR with an empty message, else nothing ([`fit_answer`]).
//! 5. Single-port mode: an ERROR from a stranger is dropped (never answer an ERROR);
//!    DATA, ACK or OACK from a stranger gets ERROR 5, as a session socket would answer,
//!    when that answer ([`STRAY_ANSWER_LEN`] bytes) is no larger than the datagram.
//! 6. A write request gets ERROR 4 "no writes"; an ERROR is dropped; DATA, ACK or OACK
//!    get ERROR 5 (normal mode, same size rule as 5); anything that does not parse gets
//!    ERROR 4 "malformed".
//! 7. A read request from a peer whose session still runs: in the normal mode the
//!    session first takes what its own socket holds ([`Verdict::CatchUp`]): a client
//!    that reuses its port may send its next request right after the last ACK of the
//!    previous transfer, and the listener can be read before that ACK. If the session
//!    still runs after that (at once in single-port mode, where the listener is the
//!    session's socket): a request identical to the session's (file, mode and options)
//!    is a repeat, handed to the session ([`Verdict::Repeated`]: an unverified session
//!    takes it as a sign that its first reply was lost, and may resend it under its
//!    retransmission clock and retry budget); a different one, while the session is
//!    unverified, replaces it ([`Verdict::Replace`]: the session ends,
//!    `Outcome::Evicted`, and sends nothing more) — a spoofed request cannot claim a
//!    client's port. A different request to a verified session is ignored.
//! 8. A client already running `max_sessions_per_client` *verified* sessions gets
//!    ERROR 0 "too many". Unverified sessions do not count there: they have
//!    their own, smaller cap (`max_unverified_per_client`), and a request at that cap
//!    replaces the client's own oldest unverified session instead of being refused, so
//!    spoofed requests from a victim's address cannot lock it out. With several workers
//!    the counts are shared, but a worker ends only its own sessions: when the client's
//!    unverified sessions all run on other workers, the request starts anyway (at most
//!    one more per worker).
//! 9. Mode `mail` or an unknown mode gets ERROR 4 "bad mode".
//! 10. With `max_sessions` running, the oldest unverified session that has had one
//!     retransmission timeout (`unverified_grace`) to answer gives way
//!     ([`Verdict::Replace`]); younger ones are kept, so requests cannot evict one
//!     another's sessions before an ACK could come back. When none can give way, the
//!     request waits in a queue, in both modes (one per peer, at most
//!     [`WAITING_REQUESTS`] peers, so at most 2 MiB of requests; beyond, dropped and
//!     counted as busy), and is served first come, first served when a slot frees or a session
//!     may give way; meanwhile its client hears nothing. An identical resend of a
//!     waiting request is a repeat; a different one takes a new place at the back. A
//!     request that has waited [`WAITING_MAX_AGE`] is dropped (counted as busy), never
//!     served stale: its client's next copy waits again, at the back.
//! 11. Anything else starts a session ([`Verdict::Start`]).
//!
//! When file descriptors run out, the driver hands the request back
//! ([`Admission::wait_for_descriptors`]): it waits first in line, and no request is taken
//! until a session ends or [`DESCRIPTOR_RETRY`] passes (the age bound holds there too).
//! The same when no port is free for the session's socket (the port range is full:
//! [`Admission::wait_for_ports`]).
//!
//! A read request is counted in [`ServerStats::requests`] once, when it arrives; every
//! other counter is counted where the rule above applies.
//!
//! [`Session::is_verified`]: crate::session::Session::is_verified

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;

use crate::handler::Reject;
use crate::limit::{ClientKey, ClientLimits, LogLimiter, Rate, SharedClientLimits};
use crate::packet::{ErrorCode, Mode, Packet, ParseError, Request};
use crate::stats::ServerStats;

use super::report::log_limited;
use super::table::SessionId;
use super::transport::Arrival;

/// Requests kept at most while no session can start.
pub(crate) const WAITING_REQUESTS: usize = 1024;

/// The queue holds at most twice [`WAITING_REQUESTS`] entries (a replaced request stays
/// until it reaches the front), each a request no longer than the parser accepts.
const _: () = assert!(2 * WAITING_REQUESTS * crate::packet::MAX_REQUEST_LEN <= 2 << 20);

/// How long a request may wait for a session before it is dropped. TFTP clients resend
/// an unanswered request after 1 to 5 s (PXE ROMs from 1 s, doubling; tftp-hpa 5 s):
/// after 3 s most have sent a newer copy, which waits in the old one's place, or given
/// up, and a session started for the old copy would only send to a client that has
/// moved on. Short enough that a flood's requests are gone before a slot frees.
pub(crate) const WAITING_MAX_AGE: Duration = Duration::from_secs(3);

/// How long new requests wait after descriptors ran out, when no session ends sooner.
pub(crate) const DESCRIPTOR_RETRY: Duration = Duration::from_secs(1);

/// Clients whose request rate is tracked at once; beyond, new clients wait for old
/// buckets to refill (see [`RateLimiter`](crate::limit::RateLimiter)).
pub(crate) const RATE_LIMITER_CLIENTS: usize = 65_536;

/// Size of the ERROR 5 "unknown transfer id" a stray datagram gets (opcode, code, text,
/// NUL); smaller strays get no answer.
pub(crate) const STRAY_ANSWER_LEN: usize = 4 + "unknown transfer id".len() + 1;

/// Size of an ERROR with an empty message.
const EMPTY_ERROR_LEN: usize = 5;

/// What admission is told to enforce.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Sessions are served from the listeners (see `ServerBuilder::single_port`).
    pub(crate) single_port: bool,
    /// The most sessions at once.
    pub(crate) max_sessions: usize,
    /// The most verified sessions one client may run at once.
    pub(crate) max_sessions_per_client: Option<u32>,
    /// The most unverified sessions one client may run at once.
    pub(crate) max_unverified_per_client: Option<u32>,
    /// How long an unverified session is kept from eviction by other clients' requests
    /// (the server's retransmission timeout).
    pub(crate) unverified_grace: Duration,
    /// The request rate per client.
    pub(crate) request_rate: Option<Rate>,
    /// Whether loopback peers are limited too.
    pub(crate) limit_loopback: bool,
}

/// What the driver must do with a datagram that reached a listener.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict<'a> {
    /// Start a session for this request.
    Start(Request<'a>, Mode),
    /// End this unverified session without sending anything more (`Outcome::Evicted`),
    /// then start a session for this request.
    Replace(SessionId, Request<'a>, Mode),
    /// It belongs to this running session (single-port mode); a datagram that did not
    /// parse is given as its error.
    ToSession(SessionId, Result<Packet<'a>, ParseError>),
    /// A request from a peer whose session runs: let the session take what its socket
    /// holds without answering, then ask [`Admission::after_catch_up`].
    CatchUp(SessionId, Request<'a>),
    /// The peer repeated the request of this running session: tell the session
    /// ([`Session::handle_repeated_request`]), which decides whether to resend its first
    /// reply, then drive it.
    ///
    /// [`Session::handle_repeated_request`]: crate::session::Session::handle_repeated_request
    Repeated(SessionId),
    /// Answer with this ERROR, as a session would (cut to fit, see [`fit_answer`]).
    Refuse(Reject),
    /// A datagram for no session (single-port mode): answer ERROR 5 from the listener.
    Stray,
    /// Kept until a session can start; the driver gets it back from
    /// [`Admission::next_waiting`].
    Queued,
    /// Nothing to do (counted where it applies).
    Ignore,
}

/// A request kept until a session can start.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub(crate) arrival: Arrival,
    pub(crate) datagram: Vec<u8>,
    /// When it arrived (the first time, for a request handed back).
    arrived: Instant,
    /// Matches its peer's entry in `Admission::queued` while it is that peer's latest.
    generation: u64,
}

/// The latest waiting request of a peer.
#[derive(Debug)]
struct Queued {
    generation: u64,
    signature: u64,
}

/// What admission keeps about a running session.
#[derive(Debug)]
struct Running {
    id: SessionId,
    /// Keyed hash of its request (file, mode, options), to tell a repeat from a new one.
    signature: u64,
    started: Instant,
    /// Its place in the start order while unverified; `None` once verified.
    unverified: Option<u64>,
    /// The client it counts under, unless exempt.
    client: Option<ClientKey>,
}

/// One limiter per kind of warning, so a flood of one kind cannot hide the others.
struct Logs {
    rate_limited: LogLimiter,
    client_limited: LogLimiter,
    descriptors: LogLimiter,
    ports: LogLimiter,
}

/// Decides, for each datagram that reaches a listener, what the driver does with it, and
/// keeps what that needs: the running sessions by peer (and the unverified ones by age),
/// per-client counts and rates, the requests waiting for room. See the
/// [module documentation](self) for the rules.
pub(crate) struct Admission {
    policy: Policy,
    /// The running sessions, by peer (one per peer).
    sessions: HashMap<SocketAddr, Running>,
    /// The unverified sessions by start order (oldest first).
    unverified: BTreeMap<u64, SocketAddr>,
    /// The same, per limited client.
    unverified_by_client: HashMap<ClientKey, BTreeSet<u64>>,
    next_start: u64,
    /// Keys the request signatures, so that no one can make two requests look the same.
    signatures: RandomState,
    limits: ClientLimits,
    waiting: VecDeque<Waiting>,
    /// Bytes of the datagrams in `waiting`.
    /// The latest waiting request of each peer.
    queued: HashMap<SocketAddr, Queued>,
    next_generation: u64,
    /// The peer and arrival time of the request last taken from the queue, so that one
    /// handed back keeps its age.
    last_taken: Option<(SocketAddr, Instant)>,
    /// Descriptors (or session ports) ran out: no request is taken before this (or a
    /// session's end).
    descriptors_paused_until: Option<Instant>,
    shutting_down: bool,
    logs: Logs,
}

impl Admission {
    /// Admission under `policy`, with no session running; with `shared`, the per-client
    /// limits are those of every worker holding it.
    pub(crate) fn new(policy: Policy, shared: Option<SharedClientLimits>) -> Admission {
        // Ten lines per kind per minute at most: enough to see what happens.
        let limiter = || LogLimiter::new(Duration::from_secs(60), 10);
        let limits = match shared {
            Some(shared) => ClientLimits::shared(shared),
            None => ClientLimits::own(policy.request_rate, RATE_LIMITER_CLIENTS),
        };
        Admission {
            policy,
            sessions: HashMap::new(),
            unverified: BTreeMap::new(),
            unverified_by_client: HashMap::new(),
            next_start: 0,
            signatures: RandomState::new(),
            limits,
            waiting: VecDeque::new(),
            queued: HashMap::new(),
            next_generation: 0,
            last_taken: None,
            descriptors_paused_until: None,
            shutting_down: false,
            logs: Logs {
                rate_limited: limiter(),
                client_limited: limiter(),
                descriptors: limiter(),
                ports: limiter(),
            },
        }
    }

    /// Sessions running.
    pub(crate) fn running(&self) -> usize {
        self.sessions.len()
    }

    /// Whether a new session may start now without another giving way.
    pub(crate) fn has_room(&self) -> bool {
        !self.shutting_down
            && self.sessions.len() < self.policy.max_sessions
            && self.descriptors_paused_until.is_none()
    }

    /// Whether the driver should read the listeners now: always, but in the normal mode
    /// while shutting down (the listeners are closed then). Requests that find no room
    /// wait in admission's queue, where their age is known.
    pub(crate) fn reads_listeners(&self) -> bool {
        self.policy.single_port || !self.shutting_down
    }

    /// When admission wants to be asked again without any datagram: the end of a
    /// descriptor pause, or the moment the oldest unverified session may give its slot
    /// to a waiting request.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let evictable = if self.waiting.is_empty()
            || self.shutting_down
            || self.descriptors_paused_until.is_some()
        {
            None
        } else {
            self.oldest_unverified()
                .map(|running| running.started + self.policy.unverified_grace)
        };
        [self.descriptors_paused_until, evictable]
            .into_iter()
            .flatten()
            .min()
    }

    /// Judges a datagram that reached a listener.
    pub(crate) fn on_datagram<'a>(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &'a [u8],
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        let parsed = Packet::parse(datagram);
        let peer = arrival.peer;
        if !self.policy.single_port {
            if !self.within_rate(now, peer, stats) {
                return Verdict::Ignore;
            }
            return self.on_listener_packet(now, arrival, parsed, datagram, true, stats);
        }
        let request = matches!(parsed, Ok(Packet::Rrq(_) | Packet::Wrq(_)));
        let session = self.sessions.get(&peer).map(|running| running.id);
        match session {
            Some(id) if !request => return Verdict::ToSession(id, parsed),
            None if self.shutting_down => return Verdict::Ignore,
            _ => {}
        }
        if !self.within_rate(now, peer, stats) {
            return Verdict::Ignore;
        }
        match parsed {
            Ok(Packet::Error { .. }) => {
                // Never answer an ERROR.
                stats.stray_datagrams += 1;
                Verdict::Ignore
            }
            Ok(Packet::Data { .. } | Packet::Ack { .. } | Packet::Oack(_)) => {
                stats.stray_datagrams += 1;
                if datagram.len() < STRAY_ANSWER_LEN {
                    debug!("{peer}: datagram for no session, too short for an answer");
                    return Verdict::Ignore;
                }
                debug!("{peer}: datagram for no session, ERROR 5");
                Verdict::Stray
            }
            parsed => self.on_listener_packet(now, arrival, parsed, datagram, true, stats),
        }
    }

    /// Judges a request again after its peer's session took what was queued for it
    /// (see [`Verdict::CatchUp`]).
    pub(crate) fn after_catch_up<'a>(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &[u8],
        request: Request<'a>,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        if self.sessions.contains_key(&arrival.peer) {
            return self.on_repeat(now, arrival, datagram, request, stats);
        }
        self.admit(now, arrival, datagram, request, None, true, stats)
    }

    /// The first waiting request, when a session can start for it (now, or by taking the
    /// slot of an unverified session); requests older than [`WAITING_MAX_AGE`] are
    /// dropped on the way.
    pub(crate) fn next_waiting(
        &mut self,
        now: Instant,
        stats: &mut ServerStats,
    ) -> Option<Waiting> {
        self.drop_stale(now, stats);
        if self.waiting.is_empty() {
            return None;
        }
        if !self.has_room() && self.evictable(now).is_none() {
            return None;
        }
        let waiting = self.pop_waiting()?;
        self.queued.remove(&waiting.arrival.peer);
        self.last_taken = Some((waiting.arrival.peer, waiting.arrived));
        Some(waiting)
    }

    /// Judges a request that waited (it was counted when it arrived, and the rate limit
    /// applied then).
    pub(crate) fn on_waiting<'a>(
        &mut self,
        now: Instant,
        waiting: &'a Waiting,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        let datagram = &waiting.datagram;
        let parsed = Packet::parse(datagram);
        self.on_listener_packet(now, &waiting.arrival, parsed, datagram, false, stats)
    }

    /// Descriptors ran out while starting the session for `datagram`: keeps the request
    /// first in line and takes no new one until a session ends or [`DESCRIPTOR_RETRY`]
    /// passes, instead of refusing requests that a moment later there would be room for.
    /// Logged once per episode.
    pub(crate) fn wait_for_descriptors(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &[u8],
        stats: &mut ServerStats,
    ) {
        if self.descriptors_paused_until.is_none() {
            stats.descriptor_pauses += 1;
            log_limited(
                &mut self.logs.descriptors,
                now,
                log::Level::Warn,
                format_args!(
                    "out of file descriptors with {} sessions running: new requests wait \
                     until one ends (raise the limit, or lower --max-sessions)",
                    self.sessions.len()
                ),
            );
        }
        self.pause(now, arrival, datagram, stats);
    }

    /// No port was free for the session's socket (every port of the port range, or of
    /// the kernel's ephemeral range, is in use): the request waits as in
    /// [`wait_for_descriptors`](Self::wait_for_descriptors). Counted in
    /// [`ServerStats::port_pauses`] and logged once per episode.
    pub(crate) fn wait_for_ports(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &[u8],
        stats: &mut ServerStats,
    ) {
        if self.descriptors_paused_until.is_none() {
            stats.port_pauses += 1;
            log_limited(
                &mut self.logs.ports,
                now,
                log::Level::Warn,
                format_args!(
                    "every port for session sockets is in use, with {} sessions running: \
                     new requests wait until one ends (widen --port-range, or lower \
                     --max-sessions)",
                    self.sessions.len()
                ),
            );
        }
        self.pause(now, arrival, datagram, stats);
    }

    /// Keeps the request first in line and takes no new one until a session ends or
    /// [`DESCRIPTOR_RETRY`] passes.
    fn pause(&mut self, now: Instant, arrival: &Arrival, datagram: &[u8], stats: &mut ServerStats) {
        self.descriptors_paused_until = Some(now + DESCRIPTOR_RETRY);
        let signature = match Packet::parse(datagram) {
            Ok(Packet::Rrq(request)) => self.signature(&request),
            _ => 0,
        };
        self.enqueue(now, arrival, datagram, signature, false, stats);
    }

    /// A session started for `peer` (unverified).
    pub(crate) fn session_started(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        id: SessionId,
        request: &Request<'_>,
    ) {
        let order = self.next_start;
        self.next_start += 1;
        // A request of this peer still waiting is outdated now.
        self.queued.remove(&peer);
        self.last_taken = None;
        let client = self.counted_client(peer);
        self.unverified.insert(order, peer);
        if let Some(client) = client {
            self.unverified_by_client
                .entry(client)
                .or_default()
                .insert(order);
            self.limits.add(client);
        }
        let previous = self.sessions.insert(
            peer,
            Running {
                id,
                signature: self.signature(request),
                started: now,
                unverified: Some(order),
                client,
            },
        );
        debug_assert!(previous.is_none(), "{peer}: two sessions");
    }

    /// `peer`'s session got its first ACK: it counts as verified from now on.
    pub(crate) fn session_verified(&mut self, peer: SocketAddr) {
        let Some(running) = self.sessions.get_mut(&peer) else {
            return;
        };
        let Some(order) = running.unverified.take() else {
            return;
        };
        let client = running.client;
        self.forget_unverified(order, client);
        if let Some(client) = client {
            self.limits.verify(client);
        }
    }

    /// A datagram from `peer` to its running session made no progress (single-port
    /// mode): it takes a token from the client's request rate, as a request would.
    pub(crate) fn charge_no_progress(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(client) = self.limited_client(peer) {
            self.limits.allow(client, now);
        }
    }

    /// `peer`'s session ended: its slot and its descriptors are free again.
    pub(crate) fn session_ended(&mut self, peer: SocketAddr) {
        let Some(running) = self.sessions.remove(&peer) else {
            return;
        };
        if let Some(order) = running.unverified {
            self.forget_unverified(order, running.client);
        }
        if let Some(client) = running.client {
            self.limits.remove(client, running.unverified.is_none());
        }
        self.descriptors_paused_until = None;
    }

    /// No new session from now on.
    pub(crate) fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Time passes: a descriptor pause ends, rate buckets that refilled are forgotten.
    pub(crate) fn tick(&mut self, now: Instant) {
        if self
            .descriptors_paused_until
            .is_some_and(|until| now >= until)
        {
            self.descriptors_paused_until = None;
        }
        self.limits.prune(now);
    }

    fn forget_unverified(&mut self, order: u64, client: Option<ClientKey>) {
        self.unverified.remove(&order);
        if let Some(client) = client {
            if let Some(orders) = self.unverified_by_client.get_mut(&client) {
                orders.remove(&order);
                if orders.is_empty() {
                    self.unverified_by_client.remove(&client);
                }
            }
        }
    }

    /// The oldest unverified session.
    fn oldest_unverified(&self) -> Option<&Running> {
        let (_, peer) = self.unverified.first_key_value()?;
        self.sessions.get(peer)
    }

    /// The session that gives its slot to a request when `max_sessions` run: the oldest
    /// unverified one, once it has had `unverified_grace` to answer.
    fn evictable(&self, now: Instant) -> Option<SessionId> {
        if self.shutting_down || self.descriptors_paused_until.is_some() {
            return None;
        }
        self.oldest_unverified()
            .filter(|running| now >= running.started + self.policy.unverified_grace)
            .map(|running| running.id)
    }

    /// The session of `client` that gives way to its new request: its oldest unverified
    /// one on this loop, when the client is at `max_unverified_per_client`.
    fn client_evictable(&mut self, client: Option<ClientKey>) -> Option<SessionId> {
        let client = client?;
        let max = self.policy.max_unverified_per_client?;
        if self.limits.counts(client).unverified < max {
            return None;
        }
        let order = self.unverified_by_client.get(&client)?.first()?;
        let peer = self.unverified.get(order)?;
        self.sessions.get(peer).map(|running| running.id)
    }

    /// A keyed hash of what a request asks for: file, mode (any case) and options (names
    /// in any case).
    fn signature(&self, request: &Request<'_>) -> u64 {
        let mut hasher = self.signatures.build_hasher();
        hasher.write(request.filename);
        hasher.write_u8(0);
        for &b in request.mode_name {
            hasher.write_u8(b.to_ascii_lowercase());
        }
        for option in request.options.iter() {
            hasher.write_u8(0);
            for &b in option.name {
                hasher.write_u8(b.to_ascii_lowercase());
            }
            hasher.write_u8(0);
            hasher.write(option.value);
        }
        hasher.finish()
    }

    /// Drops waiting requests that are no longer their peer's latest, or too old.
    fn drop_stale(&mut self, now: Instant, stats: &mut ServerStats) {
        while let Some(front) = self.waiting.front() {
            let peer = front.arrival.peer;
            let latest = self
                .queued
                .get(&peer)
                .is_some_and(|q| q.generation == front.generation);
            if latest && now.saturating_duration_since(front.arrived) <= WAITING_MAX_AGE {
                return;
            }
            if latest {
                self.queued.remove(&peer);
                stats.busy += 1;
                debug!("{peer}: request waited too long, dropped");
            }
            self.pop_waiting();
        }
    }

    fn pop_waiting(&mut self) -> Option<Waiting> {
        self.waiting.pop_front()
    }

    /// Keeps a request until a session can start: at the back (`fresh`) or, handed
    /// back, first in line with its age. One per peer; beyond [`WAITING_REQUESTS`],
    /// dropped (the client resends it).
    fn enqueue<'a>(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &[u8],
        signature: u64,
        fresh: bool,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        let peer = arrival.peer;
        let arrived = match self.last_taken {
            Some((taken, arrived)) if !fresh && taken == peer => arrived,
            _ => now,
        };
        if fresh {
            self.drop_stale(now, stats);
            if self
                .queued
                .get(&peer)
                .is_some_and(|q| q.signature == signature)
            {
                stats.duplicate_requests += 1;
                return Verdict::Ignore;
            }
            let full = !self.queued.contains_key(&peer) && self.queued.len() >= WAITING_REQUESTS;
            // Replaced requests stay in the queue until they reach its front.
            if full || self.waiting.len() >= 2 * WAITING_REQUESTS {
                stats.busy += 1;
                return Verdict::Ignore;
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.queued.insert(
            peer,
            Queued {
                generation,
                signature,
            },
        );
        let waiting = Waiting {
            arrival: *arrival,
            datagram: datagram.to_vec(),
            arrived,
            generation,
        };
        if fresh {
            self.waiting.push_back(waiting);
        } else {
            self.waiting.push_front(waiting);
        }
        Verdict::Queued
    }

    /// Rules 6 to 11 for a datagram (`fresh`: just arrived, not from the queue).
    fn on_listener_packet<'a>(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        parsed: Result<Packet<'a>, ParseError>,
        datagram: &[u8],
        fresh: bool,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        let peer = arrival.peer;
        match parsed {
            Ok(Packet::Rrq(request)) => {
                if fresh {
                    stats.requests += 1;
                }
                match self.sessions.get(&peer) {
                    Some(running) if !self.policy.single_port => {
                        Verdict::CatchUp(running.id, request)
                    }
                    // Single-port: the session has had every datagram before this one.
                    Some(_) => self.on_repeat(now, arrival, datagram, request, stats),
                    None => self.admit(now, arrival, datagram, request, None, fresh, stats),
                }
            }
            Ok(Packet::Wrq(_)) => {
                stats.write_requests += 1;
                Verdict::Refuse(Reject::new(ErrorCode::IllegalOperation, "no writes"))
            }
            Ok(Packet::Error { .. }) => {
                // Never answer an ERROR.
                stats.malformed += 1;
                debug!("{peer}: ERROR sent to the listener, ignored");
                Verdict::Ignore
            }
            Ok(other) => {
                stats.malformed += 1;
                debug!("{peer}: {:?} sent to the listener", other.opcode());
                if datagram.len() < STRAY_ANSWER_LEN {
                    return Verdict::Ignore;
                }
                Verdict::Refuse(Reject::new(
                    ErrorCode::UnknownTransferId,
                    "unknown transfer id",
                ))
            }
            Err(e) => {
                stats.malformed += 1;
                debug!("{peer}: malformed request: {e}");
                Verdict::Refuse(Reject::new(ErrorCode::IllegalOperation, "malformed"))
            }
        }
    }

    /// Rule 7 once the peer's session has had what came before: a repeat is ignored; a
    /// different request replaces an unverified session.
    fn on_repeat<'a>(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &[u8],
        request: Request<'a>,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        let peer = arrival.peer;
        let signature = self.signature(&request);
        let Some(running) = self.sessions.get(&peer) else {
            return self.admit(now, arrival, datagram, request, None, true, stats);
        };
        if running.signature == signature {
            return repeat(peer, running.id, stats);
        }
        if running.unverified.is_none() {
            stats.duplicate_requests += 1;
            debug!("{peer}: a different request while its verified session runs, ignored");
            return Verdict::Ignore;
        }
        debug!("{peer}: a different request replaces its unverified session");
        let id = running.id;
        self.admit(now, arrival, datagram, request, Some(id), true, stats)
    }

    /// Rules 8 to 11 for a request (`replacing`: the peer's own unverified session,
    /// which gives way to it if it is admitted).
    #[allow(clippy::too_many_arguments)]
    fn admit<'a>(
        &mut self,
        now: Instant,
        arrival: &Arrival,
        datagram: &[u8],
        request: Request<'a>,
        replacing: Option<SessionId>,
        fresh: bool,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        let peer = arrival.peer;
        if self.shutting_down {
            return Verdict::Ignore;
        }
        let client = self.counted_client(peer);
        if let (Some(client), Some(max)) = (client, self.policy.max_sessions_per_client) {
            if self.limits.counts(client).verified >= max {
                stats.client_limited += 1;
                log_limited(
                    &mut self.logs.client_limited,
                    now,
                    log::Level::Warn,
                    format_args!(
                        "{peer}: already {max} verified sessions from this client, refused"
                    ),
                );
                return Verdict::Refuse(Reject::new(ErrorCode::NotDefined, "too many"));
            }
        }
        let mode = match request.mode() {
            Some(mode @ (Mode::Octet | Mode::Netascii)) => mode,
            Some(Mode::Mail) | None => {
                return Verdict::Refuse(Reject::new(ErrorCode::IllegalOperation, "bad mode"))
            }
        };
        // Replacing the peer's own session keeps the client's count of unverified ones.
        let gives_way = replacing.or_else(|| self.client_evictable(client));
        if let Some(id) = gives_way {
            return Verdict::Replace(id, request, mode);
        }
        if fresh {
            // First come, first served: not before the requests that wait.
            self.drop_stale(now, stats);
        }
        if !fresh || self.queued.is_empty() {
            if self.has_room() {
                return Verdict::Start(request, mode);
            }
            if let Some(id) = self.evictable(now) {
                debug!("{peer}: full, the oldest unverified session gives way");
                return Verdict::Replace(id, request, mode);
            }
        }
        let signature = self.signature(&request);
        self.enqueue(now, arrival, datagram, signature, fresh, stats)
    }

    /// Whether the peer's client may send one more datagram to a listener now.
    fn within_rate(&mut self, now: Instant, peer: SocketAddr, stats: &mut ServerStats) -> bool {
        if self.policy.request_rate.is_none() {
            return true;
        }
        let Some(client) = self.limited_client(peer) else {
            return true;
        };
        if self.limits.allow(client, now) {
            return true;
        }
        stats.rate_limited += 1;
        log_limited(
            &mut self.logs.rate_limited,
            now,
            log::Level::Warn,
            format_args!("{peer}: over the request rate limit, dropped"),
        );
        false
    }

    /// The client the peer's limits count under; `None` for exempt loopback peers.
    fn limited_client(&self, peer: SocketAddr) -> Option<ClientKey> {
        if peer.ip().is_loopback() && !self.policy.limit_loopback {
            return None;
        }
        Some(ClientKey::from(peer.ip()))
    }

    /// The client the peer's sessions count under, when a per-client cap applies.
    fn counted_client(&self, peer: SocketAddr) -> Option<ClientKey> {
        if self.policy.max_sessions_per_client.is_none()
            && self.policy.max_unverified_per_client.is_none()
        {
            return None;
        }
        self.limited_client(peer)
    }
}

/// A request repeated while its peer's session `id` runs: for the session to judge.
fn repeat<'a>(peer: SocketAddr, id: SessionId, stats: &mut ServerStats) -> Verdict<'a> {
    stats.duplicate_requests += 1;
    debug!("{peer}: repeated request while its session runs");
    Verdict::Repeated(id)
}

/// What to send for `reject`, in answer to a datagram of `datagram_len` bytes, so that
/// the answer is no larger: the ERROR with its message if that fits, else with an empty
/// message, else nothing.
pub(crate) fn fit_answer(reject: &Reject, datagram_len: usize) -> Option<Reject> {
    if EMPTY_ERROR_LEN + reject.message.len() <= datagram_len {
        Some(reject.clone())
    } else if EMPTY_ERROR_LEN <= datagram_len {
        Some(Reject::new(reject.code, ""))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::table::SessionTable;
    use crate::server::transport::ReplyPath;

    const MS: Duration = Duration::from_millis(1);
    const GRACE: Duration = Duration::from_secs(1);

    fn policy() -> Policy {
        Policy {
            single_port: false,
            max_sessions: 100,
            max_sessions_per_client: Some(2),
            max_unverified_per_client: Some(3),
            unverified_grace: GRACE,
            request_rate: Some(Rate {
                per_second: 10.0,
                burst: 3,
            }),
            limit_loopback: false,
        }
    }

    fn from(peer: &str) -> Arrival {
        Arrival {
            peer: peer.parse().unwrap(),
            local: "192.0.2.1:69".parse().unwrap(),
            reply: ReplyPath {
                listener: 0,
                source: None,
            },
        }
    }

    fn rrq(name: &str) -> Vec<u8> {
        request(1, name, "octet")
    }

    fn request(opcode: u8, name: &str, mode: &str) -> Vec<u8> {
        let mut out = vec![0, opcode];
        for field in [name, mode] {
            out.extend_from_slice(field.as_bytes());
            out.push(0);
        }
        out
    }

    const ACK_1: &[u8] = &[0, 4, 0, 1];

    /// Admission plus a session table to draw real ids from.
    struct Fixture {
        now: Instant,
        admission: Admission,
        table: SessionTable,
        stats: ServerStats,
    }

    impl Fixture {
        fn new(policy: Policy) -> Fixture {
            let now = Instant::now();
            Fixture {
                now,
                admission: Admission::new(policy, None),
                table: SessionTable::new(now),
                stats: ServerStats::default(),
            }
        }

        fn next_waiting(&mut self) -> Option<Waiting> {
            self.admission.next_waiting(self.now, &mut self.stats)
        }

        fn judge<'a>(&mut self, arrival: &Arrival, datagram: &'a [u8]) -> Verdict<'a> {
            self.admission
                .on_datagram(self.now, arrival, datagram, &mut self.stats)
        }

        /// Judges a request and, when the verdict is to start, starts it.
        fn start(&mut self, peer: &str) -> SessionId {
            let arrival = from(peer);
            let datagram = rrq("file");
            let verdict = self.judge(&arrival, &datagram);
            assert!(matches!(verdict, Verdict::Start(..)), "{peer}: {verdict:?}");
            self.started(&arrival, &datagram)
        }

        /// What the driver does once it has started a session for `datagram`.
        fn started(&mut self, arrival: &Arrival, datagram: &[u8]) -> SessionId {
            let Ok(Packet::Rrq(request)) = Packet::parse(datagram) else {
                panic!("not a request")
            };
            let id = self.table.next_id();
            self.admission
                .session_started(self.now, arrival.peer, id, &request);
            id
        }

        /// Carries out a verdict as the driver would: ends the session that gives way,
        /// starts the new one. Returns the ended session and the new one.
        fn carry_out(
            &mut self,
            arrival: &Arrival,
            datagram: &[u8],
            verdict: Verdict<'_>,
        ) -> (Option<SessionId>, SessionId) {
            let evicted = match verdict {
                Verdict::Start(..) => None,
                Verdict::Replace(id, ..) => {
                    let peer = self.peer_of(id);
                    self.admission.session_ended(peer);
                    Some(id)
                }
                other => panic!("{}: {other:?}", arrival.peer),
            };
            (evicted, self.started(arrival, datagram))
        }

        fn peer_of(&self, id: SessionId) -> SocketAddr {
            let running = self.admission.sessions.iter().find(|(_, r)| r.id == id);
            *running.expect("a running session").0
        }

        fn verify(&mut self, peer: &str) {
            self.admission.session_verified(peer.parse().unwrap());
        }
    }

    fn refused_with(verdict: &Verdict<'_>) -> Option<(u16, String)> {
        match verdict {
            Verdict::Refuse(reject) => Some((reject.code.to_u16(), reject.message.to_string())),
            _ => None,
        }
    }

    #[test]
    fn a_read_request_starts_a_session_with_its_name_and_mode() {
        let mut f = Fixture::new(policy());
        let datagram = request(1, "pxelinux.0", "NetASCII");
        match f.judge(&from("192.0.2.7:1000"), &datagram) {
            Verdict::Start(request, mode) => {
                assert_eq!(request.filename, b"pxelinux.0");
                assert_eq!(mode, Mode::Netascii);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stats.requests, 1);
    }

    #[test]
    fn the_request_rate_is_a_token_bucket_per_client() {
        let mut f = Fixture::new(policy());
        let datagram = rrq("file");
        let a = from("192.0.2.7:1000");
        // Burst of 3, from any port of the same address.
        for port in 0..3 {
            let other_port = from(&format!("192.0.2.7:{}", 2000 + port));
            assert!(matches!(
                f.judge(&other_port, &datagram),
                Verdict::Start(..)
            ));
        }
        assert_eq!(f.judge(&a, &datagram), Verdict::Ignore);
        assert_eq!(f.stats.rate_limited, 1);
        // Another client has its own bucket.
        assert!(matches!(
            f.judge(&from("192.0.2.8:1000"), &datagram),
            Verdict::Start(..)
        ));
        // 10 per second: one token after 100 ms, not before.
        f.now += 99 * MS;
        assert_eq!(f.judge(&a, &datagram), Verdict::Ignore);
        f.now += 2 * MS;
        assert!(matches!(f.judge(&a, &datagram), Verdict::Start(..)));
        assert_eq!(f.judge(&a, &datagram), Verdict::Ignore);
        assert_eq!(f.stats.rate_limited, 3);
        // Dropped datagrams were not requests.
        assert_eq!(f.stats.requests, 5);
    }

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let mut f = Fixture::new(policy());
        let datagram = rrq("file");
        for host in 1..=3 {
            let peer = format!("[2001:db8:0:1::{host}]:1000");
            assert!(matches!(
                f.judge(&from(&peer), &datagram),
                Verdict::Start(..)
            ));
        }
        assert_eq!(
            f.judge(&from("[2001:db8:0:1::99]:1000"), &datagram),
            Verdict::Ignore
        );
        assert!(matches!(
            f.judge(&from("[2001:db8:0:2::1]:1000"), &datagram),
            Verdict::Start(..)
        ));
    }

    #[test]
    fn loopback_is_exempt_from_limits_unless_asked() {
        let datagram = rrq("file");
        let mut f = Fixture::new(policy());
        for port in 1000..1010 {
            f.start(&format!("127.0.0.1:{port}"));
        }
        assert!(matches!(
            f.judge(&from("127.0.0.1:2000"), &datagram),
            Verdict::Start(..)
        ));
        assert_eq!((f.stats.rate_limited, f.stats.client_limited), (0, 0));

        let mut f = Fixture::new(Policy {
            limit_loopback: true,
            ..policy()
        });
        f.start("127.0.0.1:1000");
        f.start("127.0.0.1:1001");
        f.verify("127.0.0.1:1000");
        f.verify("127.0.0.1:1001");
        // The per-client cap (2) first, then the rate (burst 3).
        let verdict = f.judge(&from("127.0.0.1:1002"), &datagram);
        assert_eq!(refused_with(&verdict).map(|r| r.0), Some(0));
        assert_eq!(f.judge(&from("127.0.0.1:1003"), &datagram), Verdict::Ignore);
    }

    #[test]
    fn the_per_client_cap_refuses_with_error_0_until_a_session_ends() {
        let mut f = Fixture::new(Policy {
            request_rate: None,
            ..policy()
        });
        f.start("192.0.2.7:1000");
        f.start("192.0.2.7:1001");
        f.verify("192.0.2.7:1000");
        f.verify("192.0.2.7:1001");
        let datagram = rrq("file");
        let verdict = f.judge(&from("192.0.2.7:1002"), &datagram);
        assert_eq!(refused_with(&verdict), Some((0, "too many".into())));
        assert_eq!(f.stats.client_limited, 1);
        f.admission.session_ended("192.0.2.7:1000".parse().unwrap());
        assert!(matches!(
            f.judge(&from("192.0.2.7:1002"), &datagram),
            Verdict::Start(..)
        ));
        // Without a cap, no refusal.
        let mut f = Fixture::new(Policy {
            max_sessions_per_client: None,
            max_unverified_per_client: None,
            request_rate: None,
            ..policy()
        });
        for port in 1000..1010 {
            let peer = format!("192.0.2.7:{port}");
            f.start(&peer);
            f.verify(&peer);
        }
    }

    #[test]
    fn a_repeat_first_lets_the_session_catch_up_then_goes_to_it_while_it_runs() {
        let mut f = Fixture::new(policy());
        let id = f.start("192.0.2.7:1000");
        let arrival = from("192.0.2.7:1000");
        let datagram = rrq("file");
        let Verdict::CatchUp(caught_up, request) = f.judge(&arrival, &datagram) else {
            panic!("no catch-up")
        };
        assert_eq!(caught_up, id);
        // The session still runs after catching up: a repeat, for the session to judge
        // (an unverified one may resend its first reply).
        let verdict = f
            .admission
            .after_catch_up(f.now, &arrival, &datagram, request, &mut f.stats);
        assert_eq!(verdict, Verdict::Repeated(id));
        assert_eq!(f.stats.duplicate_requests, 1);
        // It ended while catching up: the request is the client's next transfer.
        let Verdict::CatchUp(_, request) = f.judge(&arrival, &datagram) else {
            panic!("no catch-up")
        };
        f.admission.session_ended(arrival.peer);
        let verdict = f
            .admission
            .after_catch_up(f.now, &arrival, &datagram, request, &mut f.stats);
        assert!(matches!(verdict, Verdict::Start(..)));
        assert_eq!((f.stats.requests, f.stats.duplicate_requests), (3, 1));
    }

    #[test]
    fn requests_that_cannot_be_served_are_refused_with_the_right_error() {
        let mut f = Fixture::new(Policy {
            request_rate: None,
            ..policy()
        });
        let peer = from("192.0.2.7:1000");
        type Expected = Option<(u16, &'static str)>;
        let long_oack = b"\x00\x06blksize\x00512\x00windowsize\x004\x00".to_vec();
        let cases: [(Vec<u8>, Expected); 8] = [
            (request(2, "f", "octet"), Some((4, "no writes"))),
            (request(1, "f", "mail"), Some((4, "bad mode"))),
            (request(1, "f", "ebcdic"), Some((4, "bad mode"))),
            // Misdirected: ERROR 5 when it is no smaller than the answer.
            (long_oack, Some((5, "unknown transfer id"))),
            (ACK_1.to_vec(), None),
            // Malformed: the driver cuts the answer to fit (see `fit_answer`).
            (vec![0, 1, b'f'], Some((4, "malformed"))),
            (vec![0], Some((4, "malformed"))),
            // An ERROR: silence.
            (vec![0, 5, 0, 1, b'x', 0], None),
        ];
        for (datagram, expected) in cases {
            let verdict = f.judge(&peer, &datagram);
            let got = refused_with(&verdict);
            match expected {
                Some((code, message)) => {
                    let (got_code, got_message) = got.expect("refused");
                    assert_eq!(got_code, code, "{datagram:?}");
                    assert_eq!(got_message, message);
                }
                None => assert_eq!(verdict, Verdict::Ignore, "{datagram:?}"),
            }
        }
        assert_eq!(f.stats.write_requests, 1);
        assert_eq!(f.stats.malformed, 5);
        assert_eq!(f.stats.requests, 2, "the RRQs with bad modes");
    }

    #[test]
    fn single_port_routes_a_peers_datagrams_to_its_session() {
        let mut f = Fixture::new(Policy {
            single_port: true,
            ..policy()
        });
        let id = f.start("192.0.2.7:1000");
        let arrival = from("192.0.2.7:1000");
        assert_eq!(
            f.judge(&arrival, ACK_1),
            Verdict::ToSession(id, Ok(Packet::Ack { block: 1 }))
        );
        // Garbage from the peer is its session's to count.
        assert!(matches!(
            f.judge(&arrival, &[0, 4, 0]),
            Verdict::ToSession(_, Err(_))
        ));
        // A request from it is a repeat, without catch-up (the listener is the session's
        // socket: it has had everything sent before).
        assert_eq!(f.judge(&arrival, &rrq("file")), Verdict::Repeated(id));
        assert_eq!(f.stats.duplicate_requests, 1);
        // The same port on another address is a stranger: ERROR 5 if that is no larger
        // than what it sent.
        assert_eq!(f.judge(&from("192.0.2.8:1000"), ACK_1), Verdict::Ignore);
        let data = [&[0, 3, 0, 1][..], &[b'x'; STRAY_ANSWER_LEN - 4]].concat();
        assert_eq!(f.judge(&from("192.0.2.8:1000"), &data), Verdict::Stray);
        assert_eq!(
            f.judge(&from("192.0.2.8:1000"), &[0, 5, 0, 0, 0]),
            Verdict::Ignore
        );
        assert_eq!(f.stats.stray_datagrams, 3);
        // Datagrams to a running session are not rate-limited.
        for _ in 0..100 {
            assert!(matches!(f.judge(&arrival, ACK_1), Verdict::ToSession(..)));
        }
        assert_eq!(f.stats.rate_limited, 0);
    }

    #[test]
    fn single_port_queues_requests_while_full_and_hands_them_back_in_order() {
        let mut f = Fixture::new(Policy {
            single_port: true,
            max_sessions: 1,
            request_rate: None,
            ..policy()
        });
        f.start("192.0.2.1:1000");
        assert!(f.admission.reads_listeners(), "single-port always reads");
        assert!(!f.admission.has_room());
        let (b, c) = (from("192.0.2.2:1000"), from("192.0.2.3:1000"));
        assert_eq!(f.judge(&b, &rrq("b")), Verdict::Queued);
        assert_eq!(f.judge(&c, &rrq("c")), Verdict::Queued);
        // A resend of a queued request is not queued twice.
        assert_eq!(f.judge(&b, &rrq("b")), Verdict::Ignore);
        assert_eq!((f.stats.requests, f.stats.duplicate_requests), (4, 1));
        assert!(f.next_waiting().is_none(), "no room yet");
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        let waiting = f.next_waiting().expect("b waits first");
        assert_eq!(waiting.arrival, b);
        let verdict = f.admission.on_waiting(f.now, &waiting, &mut f.stats);
        assert!(matches!(verdict, Verdict::Start(r, _) if r.filename == b"b"));
        assert_eq!(f.stats.requests, 4, "counted once, when it arrived");
        f.started(&b, &waiting.datagram);
        assert!(f.next_waiting().is_none(), "full again");
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut f = Fixture::new(Policy {
            single_port: true,
            max_sessions: 1,
            request_rate: None,
            ..policy()
        });
        f.start("192.0.2.1:1000");
        let datagram = rrq("file");
        for i in 0..WAITING_REQUESTS + 10 {
            let peer = format!("10.0.{}.{}:69", i / 250, i % 250 + 1);
            f.judge(&from(&peer), &datagram);
        }
        assert_eq!(f.admission.queued.len(), WAITING_REQUESTS);
        assert_eq!(f.stats.busy, 10);
        // A request longer than the parser accepts never waits: it is malformed.
        let mut f = Fixture::new(Policy {
            max_sessions: 1,
            request_rate: None,
            ..policy()
        });
        f.start("192.0.2.1:1000");
        let large = rrq(&"x".repeat(crate::packet::MAX_REQUEST_LEN));
        let verdict = f.judge(&from("10.0.0.1:69"), &large);
        assert!(
            refused_with(&verdict).is_some_and(|(code, _)| code == 4),
            "{verdict:?}"
        );
        assert!(f.admission.queued.is_empty());
    }

    /// A fixture with one session running and a second request admitted (the driver is
    /// about to find it no descriptor or no port).
    fn admitted_while_one_runs() -> (Fixture, Arrival, Vec<u8>) {
        let mut f = Fixture::new(policy());
        f.start("192.0.2.1:1000");
        let arrival = from("192.0.2.2:1000");
        let datagram = rrq("late");
        let Verdict::Start(..) = f.judge(&arrival, &datagram) else {
            panic!("the request is admitted")
        };
        (f, arrival, datagram)
    }

    #[test]
    fn running_out_of_descriptors_pauses_requests_until_a_session_ends_or_time_passes() {
        let (mut f, arrival, datagram) = admitted_while_one_runs();
        // The driver found no descriptor for the session.
        f.admission
            .wait_for_descriptors(f.now, &arrival, &datagram, &mut f.stats);
        assert!(!f.admission.has_room());
        assert_eq!(f.admission.wake_at(), Some(f.now + DESCRIPTOR_RETRY));
        assert!(f.next_waiting().is_none());
        // Again before it passed: one episode.
        f.admission
            .wait_for_descriptors(f.now, &from("192.0.2.3:1000"), &datagram, &mut f.stats);
        assert_eq!(f.stats.descriptor_pauses, 1);
        f.now += DESCRIPTOR_RETRY - MS;
        f.admission.tick(f.now);
        assert!(!f.admission.has_room());
        f.now += MS;
        f.admission.tick(f.now);
        assert!(f.admission.has_room());
        // The latest refused request waits first.
        let first = f.next_waiting().unwrap();
        assert_eq!(first.arrival.peer, "192.0.2.3:1000".parse().unwrap());
        // A session's end lifts a pause at once.
        f.admission
            .wait_for_descriptors(f.now, &arrival, &datagram, &mut f.stats);
        assert_eq!(f.stats.descriptor_pauses, 2);
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        assert!(f.admission.has_room());
        assert_eq!(
            f.stats.requests, 2,
            "waiting requests are not counted again"
        );
        // A request handed back keeps its age: dropped WAITING_MAX_AGE after it came.
        let taken = f.next_waiting().unwrap();
        f.admission
            .wait_for_descriptors(f.now, &taken.arrival, &taken.datagram, &mut f.stats);
        f.now += WAITING_MAX_AGE;
        f.admission.tick(f.now);
        let busy = f.stats.busy;
        let next = f
            .next_waiting()
            .expect("the handed-back request, at the bound");
        assert_eq!(next.arrival, taken.arrival);
        f.admission
            .wait_for_descriptors(f.now, &next.arrival, &next.datagram, &mut f.stats);
        f.now += DESCRIPTOR_RETRY;
        f.admission.tick(f.now);
        assert!(f.next_waiting().is_none(), "too old now");
        assert_eq!(f.stats.busy, busy + 1);
    }

    #[test]
    fn a_full_port_range_pauses_requests_as_descriptors_do_and_is_counted_apart() {
        let (mut f, arrival, datagram) = admitted_while_one_runs();
        // The driver found no free port for the session's socket.
        f.admission
            .wait_for_ports(f.now, &arrival, &datagram, &mut f.stats);
        assert!(!f.admission.has_room());
        assert_eq!(f.admission.wake_at(), Some(f.now + DESCRIPTOR_RETRY));
        // Again within the pause (its retry, another request): one episode.
        f.admission
            .wait_for_ports(f.now, &from("192.0.2.3:1000"), &datagram, &mut f.stats);
        assert_eq!((f.stats.port_pauses, f.stats.descriptor_pauses), (1, 0));
        assert!(f.next_waiting().is_none());
        // A session's end frees its port: the waiting request is taken at once.
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        assert!(f.admission.has_room());
        let first = f.next_waiting().unwrap();
        assert_eq!(first.arrival.peer, "192.0.2.3:1000".parse().unwrap());
        assert_eq!(f.stats.requests, 2, "not counted again");
    }

    #[test]
    fn normal_mode_queues_requests_too_when_full() {
        let mut f = Fixture::new(Policy {
            max_sessions: 2,
            ..policy()
        });
        assert!(f.admission.reads_listeners());
        f.start("192.0.2.1:1000");
        f.start("192.0.2.2:1000");
        assert!(
            f.admission.reads_listeners(),
            "requests wait where their age is known"
        );
        assert_eq!(f.judge(&from("192.0.2.3:1000"), &rrq("c")), Verdict::Queued);
        assert_eq!(f.admission.running(), 2);
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        let waiting = f.next_waiting().expect("a slot is free");
        assert_eq!(waiting.arrival.peer, "192.0.2.3:1000".parse().unwrap());
        // Ending an unknown peer changes nothing.
        f.admission.session_ended("192.0.2.9:1000".parse().unwrap());
        assert_eq!(f.admission.running(), 1);
        f.admission.begin_shutdown();
        assert!(
            !f.admission.reads_listeners(),
            "normal-mode listeners close"
        );
    }

    #[test]
    fn shutting_down_takes_nothing_new_but_running_sessions_still_get_their_datagrams() {
        let mut f = Fixture::new(Policy {
            single_port: true,
            ..policy()
        });
        let id = f.start("192.0.2.1:1000");
        f.admission.begin_shutdown();
        assert!(!f.admission.has_room());
        assert!(f.admission.reads_listeners());
        let session_peer = from("192.0.2.1:1000");
        assert!(matches!(f.judge(&session_peer, ACK_1), Verdict::ToSession(s, _) if s == id));
        assert_eq!(f.judge(&from("192.0.2.2:1000"), &rrq("f")), Verdict::Ignore);
        assert_eq!(f.judge(&from("192.0.2.2:1000"), ACK_1), Verdict::Ignore);
        assert_eq!(f.stats.requests, 1, "only the session's own");
        assert!(f.next_waiting().is_none());
    }

    #[test]
    fn rate_buckets_of_quiet_clients_are_forgotten() {
        let mut f = Fixture::new(policy());
        let datagram = rrq("f");
        for host in 1..=50 {
            f.judge(&from(&format!("10.0.0.{host}:1000")), &datagram);
        }
        let tracked = |f: &Fixture| f.admission.limits.tracked();
        assert_eq!(tracked(&f), 50);
        // Burst 3 at 10/s: full again after 300 ms.
        f.now += 400 * MS;
        f.admission.tick(f.now);
        assert_eq!(tracked(&f), 0);
    }

    #[test]
    fn a_full_server_gives_the_oldest_unverified_slot_once_its_grace_passed() {
        let mut f = Fixture::new(Policy {
            max_sessions: 2,
            request_rate: None,
            ..policy()
        });
        let a = f.start("192.0.2.1:1000");
        f.now += 10 * MS;
        let b = f.start("192.0.2.2:1000");
        // Both too young to give way: the request waits, and admission wants to be asked
        // again when the oldest may.
        let c = from("192.0.2.3:1000");
        assert_eq!(f.judge(&c, &rrq("c")), Verdict::Queued);
        assert_eq!(f.admission.wake_at(), Some(f.now - 10 * MS + GRACE));
        f.now += GRACE - 10 * MS - MS;
        assert!(f.next_waiting().is_none(), "not yet");
        f.now += MS;
        let waiting = f.next_waiting().expect("a may give way now");
        let verdict = f.admission.on_waiting(f.now, &waiting, &mut f.stats);
        assert!(matches!(verdict, Verdict::Replace(id, r, _) if id == a && r.filename == b"c"));
        let (_, c_id) = f.carry_out(&c, &waiting.datagram, verdict);
        // A fresh request waits until b's grace passed too, then takes b's slot at once;
        // c's session is too young to give way.
        let d = from("192.0.2.4:1000");
        assert_eq!(f.judge(&d, &rrq("d-early")), Verdict::Queued);
        f.now += 10 * MS;
        // Its different request takes the first one's place, after e's, which came
        // between (first come, first served, even with a slot to take).
        let e = from("192.0.2.5:1000");
        assert_eq!(f.judge(&e, &rrq("e")), Verdict::Queued);
        assert_eq!(f.judge(&d, &rrq("d")), Verdict::Queued);
        let waiting = f.next_waiting().expect("e");
        assert_eq!(waiting.arrival, e);
        let verdict = f.admission.on_waiting(f.now, &waiting, &mut f.stats);
        assert!(matches!(verdict, Verdict::Replace(id, ..) if id == b));
        f.carry_out(&e, &waiting.datagram, verdict);
        assert!(f.next_waiting().is_none(), "c's and e's sessions are young");
        assert_eq!(f.admission.running(), 2);
        f.admission.session_ended(f.peer_of(c_id));
        let next = f.next_waiting().unwrap();
        assert_eq!((next.arrival, &next.datagram), (d, &rrq("d")));
        f.started(&d, &next.datagram);
        assert!(f.next_waiting().is_none(), "d's first request is gone");
    }

    #[test]
    fn verified_sessions_never_give_way_and_waiting_requests_go_stale() {
        let mut f = Fixture::new(Policy {
            max_sessions: 2,
            request_rate: None,
            ..policy()
        });
        f.start("192.0.2.1:1000");
        f.start("192.0.2.2:1000");
        f.verify("192.0.2.1:1000");
        f.verify("192.0.2.2:1000");
        let c = from("192.0.2.3:1000");
        assert_eq!(f.judge(&c, &rrq("c")), Verdict::Queued);
        assert_eq!(f.admission.wake_at(), None, "nothing will give way");
        f.now += 10 * GRACE;
        assert_eq!(f.judge(&from("192.0.2.4:1000"), &rrq("d")), Verdict::Queued);
        // c waited longer than the bound: a freed slot goes to d, never to c.
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        let next = f.next_waiting().expect("d");
        assert_eq!(next.arrival.peer, "192.0.2.4:1000".parse().unwrap());
        assert_eq!(f.stats.busy, 1, "c, dropped");
        // A resend while waiting is a repeat; a different request takes a new place.
        let e = from("192.0.2.5:1000");
        f.admission.session_ended("192.0.2.2:1000".parse().unwrap());
        f.start("192.0.2.6:1000");
        f.start("192.0.2.7:1000");
        f.verify("192.0.2.6:1000");
        f.verify("192.0.2.7:1000");
        assert_eq!(f.judge(&e, &rrq("e")), Verdict::Queued);
        assert_eq!(f.judge(&e, &rrq("e")), Verdict::Ignore);
        assert_eq!(f.stats.duplicate_requests, 1);
        assert_eq!(f.judge(&from("192.0.2.8:1000"), &rrq("g")), Verdict::Queued);
        assert_eq!(f.judge(&e, &rrq("f")), Verdict::Queued);
        // A copy that comes after the bound waits again (at the back).
        let h = from("192.0.2.9:1000");
        assert_eq!(f.judge(&h, &rrq("h")), Verdict::Queued);
        f.now += WAITING_MAX_AGE + MS;
        assert_eq!(f.judge(&h, &rrq("h")), Verdict::Queued);
        assert_eq!(f.stats.busy, 4, "c, e's f, g and h's first copy");
        assert_eq!(f.judge(&e, &rrq("f")), Verdict::Queued);
        assert_eq!(f.judge(&from("192.0.2.8:1000"), &rrq("g")), Verdict::Queued);
        f.admission.session_ended("192.0.2.6:1000".parse().unwrap());
        let next = f.next_waiting().unwrap();
        assert_eq!(next.arrival, h);
        f.started(&h, &next.datagram);
        f.admission.session_ended("192.0.2.7:1000".parse().unwrap());
        let next = f.next_waiting().unwrap();
        assert_eq!((next.arrival, &next.datagram), (e, &rrq("f")));
        f.started(&e, &next.datagram);
        f.admission.session_ended(h.peer);
        let next = f.next_waiting().unwrap();
        assert_eq!(next.arrival.peer, "192.0.2.8:1000".parse().unwrap());
        f.admission.session_ended(e.peer);
        assert!(f.next_waiting().is_none(), "e's first request is gone");
    }

    #[test]
    fn unverified_sessions_have_their_own_cap_and_the_oldest_gives_way() {
        let mut f = Fixture::new(Policy {
            request_rate: None,
            ..policy()
        });
        // Spoofed requests from the victim's address: at the cap (3) each new one ends the
        // client's oldest unverified session instead of being refused.
        let mut ids = Vec::new();
        for port in 1000..1064 {
            let peer = from(&format!("192.0.2.7:{port}"));
            let spoofed = rrq("spoofed");
            let verdict = f.judge(&peer, &spoofed);
            let (evicted, id) = f.carry_out(&peer, &spoofed, verdict);
            if port >= 1003 {
                assert_eq!(evicted, Some(ids[(port - 1003) as usize]), "{port}");
            } else {
                assert_eq!(evicted, None);
            }
            ids.push(id);
        }
        assert_eq!(f.admission.running(), 3);
        assert_eq!(f.stats.client_limited, 0);
        // The victim itself still gets a session.
        let victim = from("192.0.2.7:2000");
        let mine = rrq("mine");
        let verdict = f.judge(&victim, &mine);
        assert!(matches!(verdict, Verdict::Replace(id, ..) if id == ids[61]));
        f.carry_out(&victim, &mine, verdict);
        // Verified sessions count against the per-client cap (2), not unverified ones.
        f.verify("192.0.2.7:2000");
        let x = rrq("x");
        let verdict = f.judge(&from("192.0.2.7:2001"), &x);
        f.carry_out(&from("192.0.2.7:2001"), &x, verdict);
        f.verify("192.0.2.7:2001");
        let y = rrq("y");
        let verdict = f.judge(&from("192.0.2.7:2002"), &y);
        assert_eq!(refused_with(&verdict).map(|r| r.0), Some(0));
        assert_eq!(f.stats.client_limited, 1);
        // Another client is untouched.
        f.start("192.0.2.8:1000");
    }

    #[test]
    fn a_different_request_replaces_an_unverified_session_an_identical_one_is_a_repeat() {
        for single_port in [false, true] {
            let mut f = Fixture::new(Policy {
                single_port,
                request_rate: None,
                ..policy()
            });
            let peer = from("192.0.2.7:1000");
            let id = f.start("192.0.2.7:1000");
            // The answer to a request from the peer of a running session, after the
            // catch-up in the normal mode.
            #[derive(Debug, PartialEq)]
            enum Answer {
                Repeated,
                Ignored,
                Replaced(SessionId),
            }
            let ask = |f: &mut Fixture, datagram: &[u8]| -> Answer {
                let verdict = match f.judge(&peer, datagram) {
                    Verdict::CatchUp(caught_up, request) => {
                        assert!(!single_port);
                        assert_eq!(caught_up, f.admission.sessions[&peer.peer].id);
                        f.admission
                            .after_catch_up(f.now, &peer, datagram, request, &mut f.stats)
                    }
                    other => other,
                };
                match verdict {
                    Verdict::Repeated(repeated) => {
                        assert_eq!(repeated, f.admission.sessions[&peer.peer].id);
                        Answer::Repeated
                    }
                    Verdict::Ignore => Answer::Ignored,
                    replace @ Verdict::Replace(..) => {
                        Answer::Replaced(f.carry_out(&peer, datagram, replace).1)
                    }
                    other => panic!("{other:?}"),
                }
            };
            let replaced = |answer: Answer| match answer {
                Answer::Replaced(id) => id,
                other => panic!("not replaced: {other:?}"),
            };
            // The same file, mode (in any case) and options: a repeat.
            assert_eq!(ask(&mut f, &rrq("file")), Answer::Repeated);
            assert_eq!(ask(&mut f, &request(1, "file", "OCTET")), Answer::Repeated);
            assert_eq!(f.stats.duplicate_requests, 2);
            // Another file, mode or options: the new request replaces the session.
            let second = replaced(ask(&mut f, &rrq("other")));
            assert_ne!(second, id);
            let third = replaced(ask(&mut f, &request(1, "other", "netascii")));
            let mut with_option = request(1, "other", "netascii");
            with_option.extend_from_slice(b"blksize\x001428\x00");
            let fourth = replaced(ask(&mut f, &with_option));
            assert_ne!(third, fourth);
            assert_eq!(f.admission.running(), 1);
            // Once verified, the session is the peer's: nothing replaces it, a different
            // request is ignored, the same one still goes to the session.
            f.verify("192.0.2.7:1000");
            assert_eq!(ask(&mut f, &rrq("again")), Answer::Ignored);
            assert_eq!(ask(&mut f, &with_option), Answer::Repeated);
            assert_eq!(f.admission.sessions[&peer.peer].id, fourth);
        }
    }

    #[test]
    fn datagrams_to_a_session_that_make_no_progress_spend_the_request_rate() {
        let mut f = Fixture::new(Policy {
            single_port: true,
            ..policy()
        });
        let peer = from("192.0.2.7:1000");
        f.start("192.0.2.7:1000");
        // Burst 3: one token went to the request; two duplicate ACKs take the rest.
        f.admission.charge_no_progress(f.now, peer.peer);
        f.admission.charge_no_progress(f.now, peer.peer);
        assert!(matches!(f.judge(&peer, ACK_1), Verdict::ToSession(..)));
        let file = rrq("file");
        let verdict = f.judge(&from("192.0.2.7:1001"), &file);
        assert_eq!(verdict, Verdict::Ignore);
        assert_eq!(f.stats.rate_limited, 1);
        // Loopback stays exempt unless asked.
        let lo = "127.0.0.1:1000".parse().unwrap();
        for _ in 0..10 {
            f.admission.charge_no_progress(f.now, lo);
        }
        assert!(matches!(
            f.judge(&from("127.0.0.1:1001"), &rrq("f")),
            Verdict::Start(..)
        ));
    }

    #[test]
    fn answers_are_cut_to_the_size_of_what_caused_them() {
        let reject = Reject::new(ErrorCode::FileNotFound, "file not found");
        let full = EMPTY_ERROR_LEN + reject.message.len();
        assert_eq!(fit_answer(&reject, full), Some(reject.clone()));
        assert_eq!(
            fit_answer(&reject, full - 1),
            Some(Reject::new(ErrorCode::FileNotFound, ""))
        );
        assert_eq!(
            fit_answer(&reject, EMPTY_ERROR_LEN),
            Some(Reject::new(ErrorCode::FileNotFound, ""))
        );
        assert_eq!(fit_answer(&reject, EMPTY_ERROR_LEN - 1), None);
        assert_eq!(fit_answer(&reject, 0), None);
        let mut stray = Vec::new();
        crate::packet::write_error(
            &mut stray,
            ErrorCode::UnknownTransferId,
            "unknown transfer id",
        );
        assert_eq!(stray.len(), STRAY_ANSWER_LEN);
    }
}
