//! Admission: what to do with each datagram that reaches a listener. No sockets and no
//! clock (every call takes `now`): the driver reads the datagram, asks for a [`Verdict`]
//! and carries it out, so every rule here is unit-tested with explicit times.
//!
//! # The rules, in order
//!
//! In single-port mode the listeners also carry the running sessions' ACKs, so first:
//!
//! 1. A datagram that is not a request, from a peer with a running session, is that
//!    session's ([`Verdict::ToSession`]).
//! 2. While shutting down, nothing new: anything else from a peer without a session is
//!    dropped.
//!
//! Then, in both modes:
//!
//! 3. Each client (an IPv4 address or IPv6 /64) may send requests at the request rate
//!    (a token bucket); over it, datagrams are dropped unanswered — an answer is what a
//!    reflection attack wants. Loopback is exempt unless `limit_loopback`.
//! 4. Single-port mode: an ERROR from a stranger is dropped (never answer an ERROR);
//!    DATA, ACK or OACK from a stranger gets ERROR 5, as a session socket would answer;
//!    a read request while `max_sessions` run or descriptors are short waits in a queue
//!    (one per peer, at most [`WAITING_REQUESTS`]; beyond, dropped and counted as busy).
//! 5. A write request gets ERROR 4; an ERROR is dropped; any other opcode gets ERROR 5;
//!    a malformed request gets ERROR 4 saying what was wrong (silence if it is too short
//!    to have an opcode).
//! 6. A read request from a peer whose session still runs: in the normal mode the
//!    session first takes what its own socket holds ([`Verdict::CatchUp`]): a client
//!    that reuses its port may send its next request right after the last ACK of the
//!    previous transfer, and the listener can be read before that ACK. If the session
//!    still runs after that, the request is a repeat and is ignored.
//! 7. A client already running the most sessions allowed gets ERROR 0.
//! 8. Mode `mail` or an unknown mode gets ERROR 4. Anything else starts a session
//!    ([`Verdict::Start`]).
//!
//! When file descriptors run out, the driver hands the request back
//! ([`Admission::wait_for_descriptors`]): it waits first in line, and no request is taken
//! until a session ends or [`DESCRIPTOR_RETRY`] passes.
//!
//! A read request is counted in [`ServerStats::requests`] once, when it arrives; every
//! other counter is counted where the rule above applies.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;

use crate::handler::Reject;
use crate::limit::{ClientCounts, ClientKey, LogLimiter, Rate, RateLimiter};
use crate::packet::{ErrorCode, Mode, Packet, ParseError, Request};
use crate::stats::ServerStats;

use super::report::log_limited;
use super::table::SessionId;
use super::transport::Arrival;

/// Requests kept at most while no session can start.
pub(crate) const WAITING_REQUESTS: usize = 1024;

/// How long new requests wait after descriptors ran out, when no session ends sooner.
pub(crate) const DESCRIPTOR_RETRY: Duration = Duration::from_secs(1);

/// Clients whose request rate is tracked at once; beyond, new clients wait for old
/// buckets to refill (see [`RateLimiter`]).
const RATE_LIMITER_CLIENTS: usize = 65_536;

/// What admission is told to enforce.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Sessions are served from the listeners (see `ServerBuilder::single_port`).
    pub(crate) single_port: bool,
    /// The most sessions at once.
    pub(crate) max_sessions: usize,
    /// The most sessions one client may run at once.
    pub(crate) max_sessions_per_client: Option<u32>,
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
    /// It belongs to this running session (single-port mode); a datagram that did not
    /// parse is given as its error.
    ToSession(SessionId, Result<Packet<'a>, ParseError>),
    /// A request from a peer whose session runs: let the session take what its socket
    /// holds without answering, then ask [`Admission::after_catch_up`].
    CatchUp(SessionId, Request<'a>),
    /// Answer with this ERROR, as a session would.
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
}

/// One limiter per kind of warning, so a flood of one kind cannot hide the others.
struct Logs {
    rate_limited: LogLimiter,
    client_limited: LogLimiter,
    descriptors: LogLimiter,
}

/// Decides, for each datagram that reaches a listener, what the driver does with it, and
/// keeps what that needs: the running sessions by peer, per-client counts and rates, the
/// requests waiting for room. See the [module documentation](self) for the rules.
pub(crate) struct Admission {
    policy: Policy,
    /// The running sessions, by peer (one per peer).
    sessions: HashMap<SocketAddr, SessionId>,
    per_client: ClientCounts,
    rate: Option<RateLimiter>,
    waiting: VecDeque<Waiting>,
    /// Descriptors ran out: no request is taken before this (or a session's end).
    descriptors_paused_until: Option<Instant>,
    shutting_down: bool,
    logs: Logs,
}

impl Admission {
    /// Admission under `policy`, with no session running.
    pub(crate) fn new(policy: Policy) -> Admission {
        // Ten lines per kind per minute at most: enough to see what happens.
        let limiter = || LogLimiter::new(Duration::from_secs(60), 10);
        Admission {
            policy,
            sessions: HashMap::new(),
            per_client: ClientCounts::default(),
            rate: policy
                .request_rate
                .map(|rate| RateLimiter::new(rate, RATE_LIMITER_CLIENTS)),
            waiting: VecDeque::new(),
            descriptors_paused_until: None,
            shutting_down: false,
            logs: Logs {
                rate_limited: limiter(),
                client_limited: limiter(),
                descriptors: limiter(),
            },
        }
    }

    /// Sessions running.
    pub(crate) fn running(&self) -> usize {
        self.sessions.len()
    }

    /// Whether a new session may start now.
    pub(crate) fn has_room(&self) -> bool {
        !self.shutting_down
            && self.sessions.len() < self.policy.max_sessions
            && self.descriptors_paused_until.is_none()
    }

    /// Whether the driver should read the listeners now. In the normal mode requests are
    /// left in the kernel's queue while no session can start (backpressure, as dnsmasq
    /// does); in single-port mode the listeners carry the running sessions' datagrams, so
    /// they are always read.
    pub(crate) fn reads_listeners(&self) -> bool {
        self.policy.single_port || self.has_room()
    }

    /// When admission wants to be asked again without any datagram: the end of a
    /// descriptor pause.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.descriptors_paused_until
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
        let session = self.sessions.get(&peer).copied();
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
                debug!("{peer}: datagram for no session, ERROR 5");
                Verdict::Stray
            }
            Ok(Packet::Rrq(_)) if session.is_none() && !self.has_room() => {
                stats.requests += 1;
                self.queue(arrival, datagram, stats)
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
        request: Request<'a>,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        if self.sessions.contains_key(&arrival.peer) {
            return repeat(arrival.peer, stats);
        }
        self.admit(now, arrival.peer, request, stats)
    }

    /// The first waiting request, when a session can start.
    pub(crate) fn next_waiting(&mut self) -> Option<Waiting> {
        if !self.has_room() {
            return None;
        }
        self.waiting.pop_front()
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
        self.descriptors_paused_until = Some(now + DESCRIPTOR_RETRY);
        if self.waiting.len() < WAITING_REQUESTS {
            self.waiting.push_front(Waiting {
                arrival: *arrival,
                datagram: datagram.to_vec(),
            });
        } else {
            stats.busy += 1;
        }
    }

    /// A session started for `peer`.
    pub(crate) fn session_started(&mut self, peer: SocketAddr, id: SessionId) {
        self.sessions.insert(peer, id);
        if let Some(client) = self.capped_client(peer) {
            self.per_client.add(client);
        }
    }

    /// `peer`'s session ended: its slot and its descriptors are free again.
    pub(crate) fn session_ended(&mut self, peer: SocketAddr) {
        if self.sessions.remove(&peer).is_none() {
            return;
        }
        if let Some(client) = self.capped_client(peer) {
            self.per_client.remove(client);
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
        if let Some(rate) = self.rate.as_mut() {
            rate.prune(now);
        }
    }

    /// Single-port mode with no room: keeps the request until a session ends. One per
    /// peer; beyond [`WAITING_REQUESTS`], dropped (the client resends it).
    fn queue<'a>(
        &mut self,
        arrival: &Arrival,
        datagram: &[u8],
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        if self.waiting.iter().any(|w| w.arrival.peer == arrival.peer) {
            stats.duplicate_requests += 1;
            return Verdict::Ignore;
        }
        if self.waiting.len() >= WAITING_REQUESTS {
            stats.busy += 1;
            return Verdict::Ignore;
        }
        self.waiting.push_back(Waiting {
            arrival: *arrival,
            datagram: datagram.to_vec(),
        });
        Verdict::Queued
    }

    /// Rules 5 to 8 for a datagram (`fresh`: just arrived, not from the queue).
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
                    Some(&id) if !self.policy.single_port => Verdict::CatchUp(id, request),
                    // Single-port: the session has had every datagram before this one.
                    Some(_) => repeat(peer, stats),
                    None => self.admit(now, peer, request, stats),
                }
            }
            Ok(Packet::Wrq(_)) => {
                stats.write_requests += 1;
                Verdict::Refuse(Reject::new(
                    ErrorCode::IllegalOperation,
                    "write requests are not supported",
                ))
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
                Verdict::Refuse(Reject::new(
                    ErrorCode::UnknownTransferId,
                    "unknown transfer id",
                ))
            }
            Err(e) => {
                stats.malformed += 1;
                debug!("{peer}: malformed request: {e}");
                // A request too short to have an opcode gets silence; a broken request
                // gets told what was wrong.
                if datagram.len() < 2 {
                    return Verdict::Ignore;
                }
                Verdict::Refuse(Reject::new(
                    ErrorCode::IllegalOperation,
                    format!("malformed request: {e}"),
                ))
            }
        }
    }

    /// Rules 7 and 8 for a request from a peer without a session.
    fn admit<'a>(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        request: Request<'a>,
        stats: &mut ServerStats,
    ) -> Verdict<'a> {
        if let (Some(client), Some(max)) = (
            self.capped_client(peer),
            self.policy.max_sessions_per_client,
        ) {
            if self.per_client.get(client) >= max {
                stats.client_limited += 1;
                log_limited(
                    &mut self.logs.client_limited,
                    now,
                    log::Level::Warn,
                    format_args!("{peer}: already {max} sessions from this client, refused"),
                );
                return Verdict::Refuse(Reject::new(
                    ErrorCode::NotDefined,
                    "too many transfers from your address",
                ));
            }
        }
        match request.mode() {
            Some(mode @ (Mode::Octet | Mode::Netascii)) => Verdict::Start(request, mode),
            Some(Mode::Mail) => Verdict::Refuse(Reject::new(
                ErrorCode::IllegalOperation,
                "mail mode is not supported",
            )),
            None => Verdict::Refuse(Reject::new(
                ErrorCode::IllegalOperation,
                "unknown transfer mode",
            )),
        }
    }

    /// Whether the peer's client may send one more datagram to a listener now.
    fn within_rate(&mut self, now: Instant, peer: SocketAddr, stats: &mut ServerStats) -> bool {
        let Some(rate) = self.rate.as_mut() else {
            return true;
        };
        if peer.ip().is_loopback() && !self.policy.limit_loopback {
            return true;
        }
        if rate.allow(ClientKey::from(peer.ip()), now) {
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

    /// The per-client key a session counts under, when the per-client cap applies.
    fn capped_client(&self, peer: SocketAddr) -> Option<ClientKey> {
        self.policy.max_sessions_per_client?;
        if peer.ip().is_loopback() && !self.policy.limit_loopback {
            return None;
        }
        Some(ClientKey::from(peer.ip()))
    }
}

/// A request repeated while its peer's session runs: ignored.
fn repeat<'a>(peer: SocketAddr, stats: &mut ServerStats) -> Verdict<'a> {
    stats.duplicate_requests += 1;
    debug!("{peer}: repeated request while its session runs, ignored");
    Verdict::Ignore
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::table::SessionTable;
    use crate::server::transport::ReplyPath;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> Policy {
        Policy {
            single_port: false,
            max_sessions: 100,
            max_sessions_per_client: Some(2),
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
                admission: Admission::new(policy),
                table: SessionTable::new(now),
                stats: ServerStats::default(),
            }
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
            let id = self.table.next_id();
            self.admission.session_started(arrival.peer, id);
            id
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
        let datagram = rrq("file");
        let verdict = f.judge(&from("192.0.2.7:1002"), &datagram);
        assert_eq!(
            refused_with(&verdict),
            Some((0, "too many transfers from your address".into()))
        );
        assert_eq!(f.stats.client_limited, 1);
        f.admission.session_ended("192.0.2.7:1000".parse().unwrap());
        assert!(matches!(
            f.judge(&from("192.0.2.7:1002"), &datagram),
            Verdict::Start(..)
        ));
        // Without a cap, no refusal.
        let mut f = Fixture::new(Policy {
            max_sessions_per_client: None,
            request_rate: None,
            ..policy()
        });
        for port in 1000..1010 {
            f.start(&format!("192.0.2.7:{port}"));
        }
    }

    #[test]
    fn a_repeat_first_lets_the_session_catch_up_then_is_ignored_while_it_runs() {
        let mut f = Fixture::new(policy());
        let id = f.start("192.0.2.7:1000");
        let arrival = from("192.0.2.7:1000");
        let datagram = rrq("file");
        let Verdict::CatchUp(caught_up, request) = f.judge(&arrival, &datagram) else {
            panic!("no catch-up")
        };
        assert_eq!(caught_up, id);
        // The session still runs after catching up: a repeat.
        let verdict = f
            .admission
            .after_catch_up(f.now, &arrival, request, &mut f.stats);
        assert_eq!(verdict, Verdict::Ignore);
        assert_eq!(f.stats.duplicate_requests, 1);
        // It ended while catching up: the request is the client's next transfer.
        let Verdict::CatchUp(_, request) = f.judge(&arrival, &datagram) else {
            panic!("no catch-up")
        };
        f.admission.session_ended(arrival.peer);
        let verdict = f
            .admission
            .after_catch_up(f.now, &arrival, request, &mut f.stats);
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
        let cases: [(Vec<u8>, Expected); 7] = [
            (
                request(2, "f", "octet"),
                Some((4, "write requests are not supported")),
            ),
            (
                request(1, "f", "mail"),
                Some((4, "mail mode is not supported")),
            ),
            (
                request(1, "f", "ebcdic"),
                Some((4, "unknown transfer mode")),
            ),
            (ACK_1.to_vec(), Some((5, "unknown transfer id"))),
            (
                vec![0, 1, b'f'],
                Some((4, "malformed request: string field not NUL-terminated")),
            ),
            // Too short for an opcode, and an ERROR: silence.
            (vec![0], None),
            (vec![0, 5, 0, 1, b'x', 0], None),
        ];
        for (datagram, expected) in cases {
            let verdict = f.judge(&peer, &datagram);
            let got = refused_with(&verdict);
            match expected {
                Some((code, message)) => {
                    let (got_code, got_message) = got.expect("refused");
                    assert_eq!(got_code, code, "{datagram:?}");
                    assert!(got_message.starts_with(message), "{got_message}");
                }
                None => assert_eq!(verdict, Verdict::Ignore, "{datagram:?}"),
            }
        }
        assert_eq!(f.stats.write_requests, 1);
        assert_eq!(f.stats.malformed, 4);
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
        assert_eq!(f.judge(&arrival, &rrq("file")), Verdict::Ignore);
        assert_eq!(f.stats.duplicate_requests, 1);
        // The same port on another address is a stranger.
        assert_eq!(f.judge(&from("192.0.2.8:1000"), ACK_1), Verdict::Stray);
        assert_eq!(
            f.judge(&from("192.0.2.8:1000"), &[0, 5, 0, 0, 0]),
            Verdict::Ignore
        );
        assert_eq!(f.stats.stray_datagrams, 2);
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
        assert!(f.admission.next_waiting().is_none(), "no room yet");
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        let waiting = f.admission.next_waiting().expect("b waits first");
        assert_eq!(waiting.arrival, b);
        let verdict = f.admission.on_waiting(f.now, &waiting, &mut f.stats);
        assert!(matches!(verdict, Verdict::Start(r, _) if r.filename == b"b"));
        assert_eq!(f.stats.requests, 4, "counted once, when it arrived");
        let id = f.table.next_id();
        f.admission.session_started(b.peer, id);
        assert!(f.admission.next_waiting().is_none(), "full again");
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
        assert_eq!(f.admission.waiting.len(), WAITING_REQUESTS);
        assert_eq!(f.stats.busy, 10);
    }

    #[test]
    fn running_out_of_descriptors_pauses_requests_until_a_session_ends_or_time_passes() {
        let mut f = Fixture::new(policy());
        f.start("192.0.2.1:1000");
        let arrival = from("192.0.2.2:1000");
        let datagram = rrq("late");
        let Verdict::Start(..) = f.judge(&arrival, &datagram) else {
            panic!()
        };
        // The driver found no descriptor for the session.
        f.admission
            .wait_for_descriptors(f.now, &arrival, &datagram, &mut f.stats);
        assert!(!f.admission.has_room() && !f.admission.reads_listeners());
        assert_eq!(f.admission.wake_at(), Some(f.now + DESCRIPTOR_RETRY));
        assert!(f.admission.next_waiting().is_none());
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
        let first = f.admission.next_waiting().unwrap();
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
    }

    #[test]
    fn normal_mode_leaves_requests_in_the_kernel_queue_when_full() {
        let mut f = Fixture::new(Policy {
            max_sessions: 2,
            ..policy()
        });
        assert!(f.admission.reads_listeners());
        f.start("192.0.2.1:1000");
        f.start("192.0.2.2:1000");
        assert!(!f.admission.reads_listeners());
        assert_eq!(f.admission.running(), 2);
        f.admission.session_ended("192.0.2.1:1000".parse().unwrap());
        assert!(f.admission.reads_listeners());
        // Ending an unknown peer changes nothing.
        f.admission.session_ended("192.0.2.9:1000".parse().unwrap());
        assert_eq!(f.admission.running(), 1);
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
        assert!(f.admission.next_waiting().is_none());
    }

    #[test]
    fn rate_buckets_of_quiet_clients_are_forgotten() {
        let mut f = Fixture::new(policy());
        let datagram = rrq("f");
        for host in 1..=50 {
            f.judge(&from(&format!("10.0.0.{host}:1000")), &datagram);
        }
        let tracked = |f: &Fixture| f.admission.rate.as_ref().map(RateLimiter::tracked);
        assert_eq!(tracked(&f), Some(50));
        // Burst 3 at 10/s: full again after 300 ms.
        f.now += 400 * MS;
        f.admission.tick(f.now);
        assert_eq!(tracked(&f), Some(0));
    }
}
