//! Helpers for handlers whose content comes from a slower backend (an HTTP repository, a
//! database, a configuration service): at most one call per key in flight, and what the
//! backend answered remembered for a while. Socket-free, clock-free (every method that
//! needs the time takes `now`), no threads of their own.
//!
//! - [`SingleFlight`]: many requests for one key while a backend call for it is running
//!   become one call. The first request leads (starts the call); the others queue a
//!   waiter (typically the `Opener` of a deferred open, or a channel's sender) that the leader
//!   completes when the call ends. PXELINUX and GRUB probe the same names from every
//!   machine of a boot storm, and clients retransmit: without it, N clients are N calls.
//! - [`TtlCache`]: a bounded map whose entries expire after a time to live. Two uses:
//!   - the **negative cache**: names the backend answered 404 for, refused at once for a
//!     TTL (the PXELINUX, GRUB and `autoexec.ipxe` probe cascades ask for a dozen names
//!     per machine that mostly do not exist);
//!   - the **size cache**: sizes the backend reported (`Content-Length`), so a UEFI size
//!     probe (`tsize 0`, aborted after the OACK) is answered without another call.
//!
//! Bounds: a `SingleFlight` holds at most `max_keys` calls; a further key gets
//! [`Joined::Full`] back with its waiter, to refuse or serve otherwise. The waiters of one
//! key are not capped here: each is a request the caller already admitted (a session
//! holds at most one), so they are bounded by the server's session limit. A `TtlCache`
//! holds at most `capacity` entries; when full, an insert drops the expired entries first,
//! then the oldest. Every operation is O(log n) or better; nothing is done in the
//! background.
//!
//! ```
//! use std::sync::Mutex;
//! use std::time::{Duration, Instant};
//! use dyntftp::backend::{Joined, SingleFlight, TtlCache};
//!
//! // Shared by every worker's handler: one backend call per name in flight, at most 64.
//! let flights: SingleFlight<String, &str> = SingleFlight::new(64);
//! // 404s remembered for 10 s, sizes for a minute; 4096 names each.
//! let not_found: Mutex<TtlCache<String, ()>> =
//!     Mutex::new(TtlCache::new(4096, Duration::from_secs(10)));
//! let sizes: Mutex<TtlCache<String, u64>> =
//!     Mutex::new(TtlCache::new(4096, Duration::from_secs(60)));
//!
//! let now = Instant::now();
//! let name = "pxelinux.cfg/default".to_string();
//! // Not a remembered 404 (that would be ERROR 1 at once, no call) and no size known:
//! assert!(not_found.lock().unwrap().get(&name, now).is_none());
//! assert!(sizes.lock().unwrap().get(&name, now).is_none());
//! assert!(matches!(flights.join(name.clone(), "client 1"), Joined::Lead)); // start the GET
//! assert!(matches!(flights.join(name.clone(), "client 2"), Joined::Follow)); // wait for it
//! // … the GET answers 200 with Content-Length 1234 (or 404: insert into `not_found`):
//! sizes.lock().unwrap().insert(name.clone(), 1234, now);
//! assert_eq!(flights.finish(&name), ["client 1", "client 2"]); // complete them all
//! assert_eq!(sizes.lock().unwrap().get(&name, now), Some(&1234));
//! assert_eq!(sizes.lock().unwrap().get(&name, now + Duration::from_secs(60)), None);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// At most one backend call per key in flight, with the requests waiting for it; see the
/// [module documentation](self). `Sync`: share it (in an `Arc`) between threads.
pub struct SingleFlight<K, W> {
    max_keys: usize,
    calls: Mutex<HashMap<K, Vec<W>>>,
}

/// What [`SingleFlight::join`] made of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined<W> {
    /// No call for the key was in flight: the caller starts one and must end it with
    /// [`SingleFlight::finish`] (its own waiter is queued first).
    Lead,
    /// A call for the key is in flight: the waiter is queued and will be returned by the
    /// leader's `finish`.
    Follow,
    /// `max_keys` calls are in flight: nothing was queued; the waiter comes back.
    Full(W),
}

impl<K: Eq + Hash + Clone, W> SingleFlight<K, W> {
    /// At most `max_keys` calls in flight at once (0: every join is `Full`).
    pub fn new(max_keys: usize) -> Self {
        SingleFlight {
            max_keys,
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Joins the call for `key`: [`Joined::Lead`] when none is in flight (the caller
    /// starts it and must call [`finish`](Self::finish)), [`Joined::Follow`] when one is
    /// (the waiter is queued), [`Joined::Full`] with the waiter when `max_keys` calls are
    /// in flight already.
    pub fn join(&self, key: K, waiter: W) -> Joined<W> {
        let mut calls = self.lock();
        if let Some(waiters) = calls.get_mut(&key) {
            waiters.push(waiter);
            return Joined::Follow;
        }
        if calls.len() >= self.max_keys {
            return Joined::Full(waiter);
        }
        calls.insert(key, vec![waiter]);
        Joined::Lead
    }

    /// Ends `key`'s call: every queued waiter, in join order (the leader's first). Empty
    /// when no call for `key` was in flight. A later `join` for `key` leads a new call.
    pub fn finish(&self, key: &K) -> Vec<W> {
        self.lock().remove(key).unwrap_or_default()
    }

    /// How many calls are in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    /// The map, also after a panic in another thread (every operation leaves it whole).
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Vec<W>>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K, W> fmt::Debug for SingleFlight<K, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_flight = self
            .calls
            .lock()
            .map_or_else(|poisoned| poisoned.into_inner().len(), |calls| calls.len());
        f.debug_struct("SingleFlight")
            .field("max_keys", &self.max_keys)
            .field("in_flight", &in_flight)
            .finish()
    }
}

/// A map of at most `capacity` entries that expire `ttl` after their insertion; see the
/// [module documentation](self). Not synchronized: wrap it in a `Mutex` to share it.
///
/// Times are the caller's `now` (from one monotonic clock, never going backwards), so
/// tests can use any instants.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<K, Entry<V>>,
    /// Keys by insertion number: the first is the oldest (and first to expire).
    order: BTreeMap<u64, K>,
    next_insertion: u64,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    inserted: Instant,
    insertion: u64,
}

impl<K: Eq + Hash + Clone, V> TtlCache<K, V> {
    /// An empty cache of at most `capacity` entries (0: nothing is ever kept), each valid
    /// for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        TtlCache {
            capacity,
            ttl,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_insertion: 0,
        }
    }

    /// The value for `key`, unless it is missing or expired at `now` (an expired entry is
    /// removed).
    pub fn get(&mut self, key: &K, now: Instant) -> Option<&V> {
        let expired = self.is_expired(self.entries.get(key)?, now);
        if expired {
            self.remove(key);
            return None;
        }
        self.entries.get(key).map(|entry| &entry.value)
    }

    /// Keeps `value` for `key` from `now` for the TTL, replacing any value `key` had. When
    /// the cache is full, the expired entries go first, then the oldest.
    pub fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.remove(&key);
        if self.entries.len() >= self.capacity {
            self.evict_expired(now);
        }
        while self.entries.len() >= self.capacity {
            self.evict_oldest();
        }
        let insertion = self.next_insertion;
        self.next_insertion += 1;
        self.order.insert(insertion, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                inserted: now,
                insertion,
            },
        );
    }

    /// Removes `key`'s entry (expired or not) and returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.insertion);
        Some(entry.value)
    }

    /// How many entries are held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn is_expired(&self, entry: &Entry<V>, now: Instant) -> bool {
        now.saturating_duration_since(entry.inserted) >= self.ttl
    }

    /// Drops the expired entries: they are the oldest, so from the front of the order.
    fn evict_expired(&mut self, now: Instant) {
        while let Some((_, key)) = self.order.first_key_value() {
            let entry = &self.entries[key];
            if !self.is_expired(entry, now) {
                break;
            }
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_first() {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    const TTL: Duration = Duration::from_secs(10);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_first_join_leads_the_others_follow_and_finish_returns_all_in_order() {
        let flights = SingleFlight::new(4);
        assert_eq!(flights.join("a", 1), Joined::Lead);
        assert_eq!(flights.join("a", 2), Joined::Follow);
        assert_eq!(flights.join("b", 10), Joined::Lead);
        assert_eq!(flights.join("a", 3), Joined::Follow);
        assert_eq!(flights.in_flight(), 2);
        assert_eq!(flights.finish(&"a"), vec![1, 2, 3]);
        assert_eq!(flights.in_flight(), 1);
        // The call ended: the next request for the key leads a new one.
        assert_eq!(flights.join("a", 4), Joined::Lead);
        assert_eq!(flights.finish(&"a"), vec![4]);
        assert_eq!(flights.finish(&"b"), vec![10]);
        assert_eq!(flights.finish(&"b"), Vec::<i32>::new(), "nothing in flight");
        assert_eq!(flights.in_flight(), 0);
    }

    #[test]
    fn at_most_max_keys_calls_are_in_flight() {
        let flights = SingleFlight::new(2);
        assert_eq!(flights.join(1, 'a'), Joined::Lead);
        assert_eq!(flights.join(2, 'b'), Joined::Lead);
        assert_eq!(flights.join(3, 'c'), Joined::Full('c'));
        // A key already in flight still takes waiters.
        assert_eq!(flights.join(1, 'd'), Joined::Follow);
        assert_eq!(flights.in_flight(), 2);
        assert_eq!(flights.finish(&2), vec!['b']);
        assert_eq!(flights.join(3, 'c'), Joined::Lead);
        // Zero: nothing is ever started.
        let none: SingleFlight<u8, u8> = SingleFlight::new(0);
        assert_eq!(none.join(1, 1), Joined::Full(1));
        assert_eq!(none.in_flight(), 0);
    }

    #[test]
    fn concurrent_joins_elect_one_leader_and_lose_no_waiter() {
        let flights = Arc::new(SingleFlight::new(1));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let flights = Arc::clone(&flights);
                thread::spawn(move || flights.join("key", i))
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| **r == Joined::Lead).count(), 1);
        assert_eq!(results.iter().filter(|r| **r == Joined::Follow).count(), 7);
        let mut waiters = flights.finish(&"key");
        waiters.sort();
        assert_eq!(waiters, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(4, TTL);
        cache.insert("a", 1, t0);
        assert_eq!(cache.get(&"a", t0), Some(&1));
        assert_eq!(
            cache.get(&"a", t0 + TTL - Duration::from_nanos(1)),
            Some(&1)
        );
        assert_eq!(cache.get(&"a", t0 + TTL), None);
        assert_eq!(cache.len(), 0, "the expired entry is dropped when seen");
        // A re-insert starts a new TTL and replaces the value.
        cache.insert("b", 2, t0);
        cache.insert("b", 3, t0 + secs(5));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&"b", t0 + secs(14)), Some(&3));
        assert_eq!(cache.get(&"b", t0 + secs(15)), None);
        // A `now` before the insertion counts as no time passed.
        cache.insert("c", 4, t0 + secs(1));
        assert_eq!(cache.get(&"c", t0), Some(&4));
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_the_oldest() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(3, TTL);
        cache.insert("old", 1, t0);
        cache.insert("mid", 2, t0 + secs(4));
        cache.insert("new", 3, t0 + secs(8));
        // At t0+12 "old" has expired: it goes, the others stay.
        cache.insert("x", 4, t0 + secs(12));
        assert_eq!(cache.len(), 3);
        let now = t0 + secs(12);
        assert_eq!(cache.get(&"old", now), None);
        assert_eq!(cache.get(&"mid", now), Some(&2));
        // None expired at t0+13: the oldest ("mid") makes room.
        cache.insert("y", 5, t0 + secs(13));
        let now = t0 + secs(13);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&"mid", now), None);
        assert_eq!(cache.get(&"new", now), Some(&3));
        assert_eq!(cache.get(&"x", now), Some(&4));
        assert_eq!(cache.get(&"y", now), Some(&5));
        // Replacing a key refreshes its age: "new" is now the youngest, "x" the oldest.
        cache.insert("new", 6, now);
        cache.insert("z", 7, now);
        assert_eq!(cache.get(&"x", now), None);
        assert_eq!(cache.get(&"new", now), Some(&6));
        // Many expired entries go at once; the capacity holds whatever is inserted.
        for i in 0..100 {
            cache.insert("many", i, now + secs(i));
            assert!(cache.len() <= 3);
        }
        assert_eq!(
            cache.order.len(),
            cache.len(),
            "the order index stays in step"
        );
    }

    #[test]
    fn remove_takes_an_entry_out() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(2, TTL);
        cache.insert(1, "one", t0);
        cache.insert(2, "two", t0);
        assert_eq!(cache.remove(&1), Some("one"));
        assert_eq!(cache.remove(&1), None);
        assert_eq!(cache.len(), 1);
        // Its slot is free: nothing is evicted.
        cache.insert(3, "three", t0);
        assert_eq!(cache.get(&2, t0), Some(&"two"));
        assert_eq!(cache.get(&3, t0), Some(&"three"));
        // Removing needs no time: an entry comes back expired or not.
        assert_eq!(cache.get(&2, t0 + TTL), None);
        assert_eq!(cache.remove(&3), Some("three"));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_zero_capacity_caches_nothing() {
        let t0 = Instant::now();
        let mut cache = TtlCache::new(0, TTL);
        cache.insert("a", 1, t0);
        assert_eq!(cache.get(&"a", t0), None);
        assert!(cache.is_empty());
    }
}
