//! Abuse limits: per-client request rate (token buckets), per-client session counts, and
//! a limiter for log lines. No clock reads: every call takes `now`.
//!
//! TFTP is a reflection vector: one spoofed RRQ of a few dozen bytes makes a server send a
//! whole window of DATA, and retransmit it, to the victim. These limits bound what one
//! address can make the server do, without slowing a boot storm of distinct clients.
//! A *client* is an IPv4 address, or an IPv6 /64 (one host usually owns a whole /64, so
//! per-address limits would be free to evade).
//!
//! Sessions count per client in two kinds: *verified* (the client has acknowledged data:
//! it receives at its address) and *unverified* (no ACK yet: the request may have been
//! spoofed). Several event loops (workers) share one [`SharedClientLimits`], so a client
//! whose ports SO_REUSEPORT spreads over them meets the same limits as with one loop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token-bucket rate: `per_second` requests on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Bucket capacity: the most requests accepted at once after a quiet spell.
    pub burst: u32,
}

impl Rate {
    /// The default per-client request rate: 100 requests/s, bursts of 200. A PXE client
    /// makes a handful of requests per boot; this only stops floods.
    pub const DEFAULT: Rate = Rate {
        per_second: 100.0,
        burst: 200,
    };
}

/// The key limits are counted under: the IPv4 address, or the IPv6 /64 prefix
/// (IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 client.
    V4(u32),
    /// An IPv6 client's /64 prefix.
    V6(u64),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.into()),
                None => ClientKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Per-client token buckets. Memory is bounded: buckets that have refilled completely are
/// forgotten (they hold no information), and when `max_clients` buckets are live a new
/// client is refused until some refill — a flood from many spoofed sources then limits
/// itself instead of growing the table.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    /// Time for an empty bucket to refill (how often pruning is worth it).
    refill: Duration,
    buckets: HashMap<ClientKey, Bucket>,
    max_clients: usize,
    last_prune: Option<Instant>,
}

impl RateLimiter {
    /// A limiter allowing `rate` per client, tracking at most `max_clients` clients.
    pub fn new(rate: Rate, max_clients: usize) -> RateLimiter {
        let refill = if rate.per_second > 0.0 {
            Duration::from_secs_f64((f64::from(rate.burst.max(1)) / rate.per_second).min(1e6))
        } else {
            Duration::MAX
        };
        RateLimiter {
            rate,
            refill,
            buckets: HashMap::new(),
            max_clients: max_clients.max(1),
            last_prune: None,
        }
    }

    /// Takes one token for `client` at `now`; false when the request must be dropped.
    pub fn allow(&mut self, client: ClientKey, now: Instant) -> bool {
        let capacity = f64::from(self.rate.burst.max(1));
        if !self.buckets.contains_key(&client) && self.buckets.len() >= self.max_clients {
            self.prune(now);
            if self.buckets.len() >= self.max_clients {
                return false;
            }
        }
        let rate = self.rate.per_second;
        let bucket = self.buckets.entry(client).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.updated = now;
        // The epsilon absorbs rounding in the refill sum (ten 0.1-token refills are one).
        if bucket.tokens >= 1.0 - 1e-9 {
            bucket.tokens = (bucket.tokens - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled by `now`; cheap to call often (it does the work
    /// at most once per refill period).
    pub fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|last| now.saturating_duration_since(last) < self.refill / 4)
        {
            return;
        }
        self.last_prune = Some(now);
        let capacity = f64::from(self.rate.burst.max(1));
        let rate = self.rate.per_second;
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens + elapsed * rate < capacity
        });
    }

    /// Clients currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// One client's running sessions: verified (the client acknowledged data, so it receives
/// at its address) and unverified (no ACK yet: the request may have been spoofed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCounts {
    /// Sessions that received at least one ACK.
    pub verified: u32,
    /// Sessions that have not.
    pub unverified: u32,
}

/// Session counts per client.
#[derive(Debug, Default)]
pub struct ClientCounts {
    counts: HashMap<ClientKey, SessionCounts>,
}

impl ClientCounts {
    /// Sessions `client` has running.
    pub fn get(&self, client: ClientKey) -> SessionCounts {
        self.counts.get(&client).copied().unwrap_or_default()
    }

    /// One more (unverified) session for `client`.
    pub fn add(&mut self, client: ClientKey) {
        self.counts.entry(client).or_default().unverified += 1;
    }

    /// One of `client`'s unverified sessions got its first ACK.
    pub fn verify(&mut self, client: ClientKey) {
        if let Some(n) = self.counts.get_mut(&client) {
            if n.unverified > 0 {
                n.unverified -= 1;
                n.verified += 1;
            }
        }
    }

    /// One session fewer for `client` (`verified`: which kind); the entry goes when both
    /// counts reach zero.
    pub fn remove(&mut self, client: ClientKey, verified: bool) {
        if let Some(n) = self.counts.get_mut(&client) {
            let count = if verified {
                &mut n.verified
            } else {
                &mut n.unverified
            };
            *count = count.saturating_sub(1);
            if *n == SessionCounts::default() {
                self.counts.remove(&client);
            }
        }
    }

    /// Clients with at least one session.
    #[cfg(test)]
    pub fn clients(&self) -> usize {
        self.counts.len()
    }
}

/// What one part of the client space keeps: request-rate buckets and session counts.
#[derive(Debug)]
struct Shard {
    rate: Option<RateLimiter>,
    counts: ClientCounts,
}

impl Shard {
    fn new(rate: Option<Rate>, max_clients: usize) -> Shard {
        Shard {
            rate: rate.map(|rate| RateLimiter::new(rate, max_clients)),
            counts: ClientCounts::default(),
        }
    }
}

/// Shards of [`SharedClientLimits`]: enough that workers rarely wait on one another.
const SHARDS: usize = 16;

/// Per-client limits shared by several event loops (workers): each client's rate bucket and
/// session counts live in one of [`SHARDS`] mutexes (chosen by the client), so a client
/// spread over the workers by SO_REUSEPORT meets the same limits as with one worker.
#[derive(Clone, Debug)]
pub struct SharedClientLimits {
    shards: Arc<[Mutex<Shard>]>,
}

impl SharedClientLimits {
    /// Limits allowing `rate` per client (`None`: no rate limit), tracking about
    /// `max_clients` rate buckets in all.
    pub fn new(rate: Option<Rate>, max_clients: usize) -> SharedClientLimits {
        let per_shard = max_clients.div_ceil(SHARDS).max(1);
        SharedClientLimits {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(rate, per_shard)))
                .collect(),
        }
    }
}

/// Per-client limits as one event loop sees them: its own (one loop: no lock), or
/// [`SharedClientLimits`] (several workers).
#[derive(Debug)]
pub struct ClientLimits {
    shards: Shards,
    /// When the rate buckets were last pruned.
    pruned: Option<Instant>,
}

#[derive(Debug)]
enum Shards {
    Own(Box<Shard>),
    Shared(SharedClientLimits),
}

/// How often [`ClientLimits::prune`] looks at the buckets (each [`RateLimiter`] also
/// prunes at most once per quarter of its refill time).
const PRUNE_INTERVAL: Duration = Duration::from_millis(250);

impl ClientLimits {
    /// Limits of one event loop alone: `rate` per client, at most `max_clients` buckets.
    pub fn own(rate: Option<Rate>, max_clients: usize) -> ClientLimits {
        ClientLimits {
            shards: Shards::Own(Box::new(Shard::new(rate, max_clients))),
            pruned: None,
        }
    }

    /// This loop's view of limits shared with other loops.
    pub fn shared(shared: SharedClientLimits) -> ClientLimits {
        ClientLimits {
            shards: Shards::Shared(shared),
            pruned: None,
        }
    }

    fn with<R>(&mut self, client: ClientKey, f: impl FnOnce(&mut Shard) -> R) -> R {
        match &mut self.shards {
            Shards::Own(shard) => f(shard),
            Shards::Shared(shared) => {
                let i = shard_of(client, shared.shards.len());
                let mut shard = shared.shards[i]
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                f(&mut shard)
            }
        }
    }

    /// Takes one token from `client`'s bucket at `now`; false when it is empty (true
    /// without a rate limit).
    pub fn allow(&mut self, client: ClientKey, now: Instant) -> bool {
        self.with(client, |shard| {
            shard
                .rate
                .as_mut()
                .is_none_or(|rate| rate.allow(client, now))
        })
    }

    /// `client`'s running sessions.
    pub fn counts(&mut self, client: ClientKey) -> SessionCounts {
        self.with(client, |shard| shard.counts.get(client))
    }

    /// One more unverified session for `client`.
    pub fn add(&mut self, client: ClientKey) {
        self.with(client, |shard| shard.counts.add(client));
    }

    /// One of `client`'s unverified sessions got its first ACK.
    pub fn verify(&mut self, client: ClientKey) {
        self.with(client, |shard| shard.counts.verify(client));
    }

    /// One session fewer for `client`.
    pub fn remove(&mut self, client: ClientKey, verified: bool) {
        self.with(client, |shard| shard.counts.remove(client, verified));
    }

    /// Forgets rate buckets that have refilled by `now` (at most every
    /// [`PRUNE_INTERVAL`]).
    pub fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|last| now.saturating_duration_since(last) < PRUNE_INTERVAL)
        {
            return;
        }
        self.pruned = Some(now);
        let prune = |shard: &mut Shard| {
            if let Some(rate) = shard.rate.as_mut() {
                rate.prune(now);
            }
        };
        match &mut self.shards {
            Shards::Own(shard) => prune(shard),
            Shards::Shared(shared) => {
                for shard in shared.shards.iter() {
                    prune(&mut shard.lock().unwrap_or_else(|p| p.into_inner()));
                }
            }
        }
    }

    /// Rate buckets tracked, in all shards.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        let tracked = |shard: &Shard| shard.rate.as_ref().map_or(0, RateLimiter::tracked);
        match &self.shards {
            Shards::Own(shard) => tracked(shard),
            Shards::Shared(shared) => shared
                .shards
                .iter()
                .map(|s| tracked(&s.lock().unwrap()))
                .sum(),
        }
    }
}

/// The shard of `client` among `shards`.
fn shard_of(client: ClientKey, shards: usize) -> usize {
    let bits = match client {
        ClientKey::V4(v4) => u64::from(v4),
        ClientKey::V6(prefix) => prefix ^ (prefix >> 32),
    };
    // Fibonacci hashing: neighbouring addresses land in different shards.
    (bits.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % shards
}

/// Lets at most `burst` log lines of one kind through per `period`, and says how many
/// were held back when the next period starts, so a flood cannot fill a disk.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    burst: u32,
    started: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

/// What to do with one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogDecision {
    /// Write it. If lines were suppressed in the previous period, say how many first.
    Log {
        /// Lines of this kind held back since the last one written.
        suppressed: u64,
    },
    /// Drop it (counted).
    Suppress,
}

impl LogLimiter {
    /// A limiter for `burst` lines per `period`.
    pub const fn new(period: Duration, burst: u32) -> LogLimiter {
        LogLimiter {
            period,
            burst,
            started: None,
            passed: 0,
            suppressed: 0,
        }
    }

    /// Decides for one line at `now`.
    pub fn check(&mut self, now: Instant) -> LogDecision {
        let new_period = self
            .started
            .is_none_or(|start| now.saturating_duration_since(start) >= self.period);
        if new_period {
            self.started = Some(now);
            self.passed = 0;
        }
        if self.passed < self.burst {
            self.passed += 1;
            let suppressed = std::mem::take(&mut self.suppressed);
            LogDecision::Log { suppressed }
        } else {
            self.suppressed += 1;
            LogDecision::Suppress
        }
    }

    /// Lines held back and not yet reported.
    #[cfg(test)]
    pub fn pending_suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn key(s: &str) -> ClientKey {
        s.parse::<IpAddr>().unwrap().into()
    }

    #[test]
    fn ipv6_clients_are_their_64_prefix_and_mapped_addresses_are_ipv4() {
        assert_eq!(key("2001:db8::1"), key("2001:db8::ffff:1"));
        assert_ne!(key("2001:db8::1"), key("2001:db8:0:1::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(
            ClientKey::from(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ClientKey::V4(0x7f00_0001)
        );
        assert_eq!(
            ClientKey::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ClientKey::V6(0)
        );
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(
            Rate {
                per_second: 10.0,
                burst: 5,
            },
            100,
        );
        let a = key("10.0.0.1");
        let allowed = (0..20).filter(|_| limiter.allow(a, t0)).count();
        assert_eq!(allowed, 5, "the burst");
        // Another client has its own bucket.
        assert!(limiter.allow(key("10.0.0.2"), t0));
        // 10/s: after 0.5 s, five more.
        let t1 = t0 + Duration::from_millis(500);
        let allowed = (0..20).filter(|_| limiter.allow(a, t1)).count();
        assert_eq!(allowed, 5);
        // Steady state: one every 100 ms.
        let mut allowed = 0;
        for i in 1..=100u64 {
            if limiter.allow(a, t1 + Duration::from_millis(10 * i)) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 10);
    }

    #[test]
    fn refilled_buckets_are_forgotten_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(
            Rate {
                per_second: 100.0,
                burst: 10,
            },
            3,
        );
        for i in 1..=3 {
            assert!(limiter.allow(key(&format!("10.0.0.{i}")), t0));
        }
        // Full table, nobody refilled yet: a fourth client is refused.
        assert!(!limiter.allow(key("10.0.0.4"), t0));
        assert!(limiter.allow(key("10.0.0.1"), t0), "known clients go on");
        // After a refill period the old buckets go and the newcomer gets in.
        let later = t0 + Duration::from_millis(200);
        assert!(limiter.allow(key("10.0.0.4"), later));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn zero_rate_with_a_burst_allows_only_the_burst() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(
            Rate {
                per_second: 0.0,
                burst: 2,
            },
            10,
        );
        let a = key("10.0.0.1");
        assert!(limiter.allow(a, t0));
        assert!(limiter.allow(a, t0));
        assert!(!limiter.allow(a, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn client_counts_go_away_at_zero() {
        let mut counts = ClientCounts::default();
        let a = key("10.0.0.1");
        counts.add(a);
        counts.add(a);
        counts.verify(a);
        let both = SessionCounts {
            verified: 1,
            unverified: 1,
        };
        assert_eq!(counts.get(a), both);
        counts.remove(a, true);
        assert_eq!(counts.get(a).verified, 0);
        counts.remove(a, false);
        assert_eq!(counts.get(a), SessionCounts::default());
        assert_eq!(counts.clients(), 0);
        counts.remove(a, false);
        counts.verify(a);
        assert_eq!(counts.get(a), SessionCounts::default());
    }

    #[test]
    fn shared_limits_are_one_budget_for_every_loop() {
        let t0 = Instant::now();
        let rate = Rate {
            per_second: 0.0,
            burst: 4,
        };
        let shared = SharedClientLimits::new(Some(rate), 1000);
        let mut loops: Vec<ClientLimits> = (0..4)
            .map(|_| ClientLimits::shared(shared.clone()))
            .collect();
        let a = key("10.0.0.1");
        // Four tokens in all, whichever loop takes them.
        let allowed = (0..16).filter(|i| loops[i % 4].allow(a, t0)).count();
        assert_eq!(allowed, 4);
        assert!(loops[0].allow(key("10.0.0.2"), t0), "another client");
        // Counts added on one loop are seen on another.
        loops[1].add(a);
        loops[2].add(a);
        loops[3].verify(a);
        assert_eq!(
            loops[0].counts(a),
            SessionCounts {
                verified: 1,
                unverified: 1
            }
        );
        loops[0].remove(a, true);
        loops[1].remove(a, false);
        assert_eq!(loops[2].counts(a), SessionCounts::default());
        // A loop alone counts the same way.
        let mut own = ClientLimits::own(Some(rate), 1000);
        assert_eq!((0..16).filter(|_| own.allow(a, t0)).count(), 4);
        let mut unlimited = ClientLimits::own(None, 1000);
        assert!((0..100).all(|_| unlimited.allow(a, t0)));
    }

    #[test]
    fn clients_spread_over_the_shards() {
        let mut used = [false; SHARDS];
        for host in 0..64u32 {
            used[shard_of(ClientKey::V4(0x0a00_0000 + host), SHARDS)] = true;
        }
        assert!(used.iter().all(|&u| u), "{used:?}");
    }

    #[test]
    fn log_limiter_passes_a_burst_per_period_and_reports_what_it_held_back() {
        let t0 = Instant::now();
        let mut log = LogLimiter::new(Duration::from_secs(10), 3);
        let decisions: Vec<_> = (0..10).map(|_| log.check(t0)).collect();
        assert_eq!(
            decisions
                .iter()
                .filter(|d| **d != LogDecision::Suppress)
                .count(),
            3
        );
        assert_eq!(log.pending_suppressed(), 7);
        assert_eq!(
            log.check(t0 + Duration::from_secs(9)),
            LogDecision::Suppress
        );
        assert_eq!(
            log.check(t0 + Duration::from_secs(10)),
            LogDecision::Log { suppressed: 8 }
        );
        assert_eq!(log.pending_suppressed(), 0);
    }
}
