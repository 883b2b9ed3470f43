//! The upstream's bounded memory cache: which URLs' bodies stay in memory, what they weigh,
//! and which go first when room is needed (least recently used). Socket-free: the caller
//! stores any value and says how many bytes it weighs.
//!
//! **The bound.** [`Cache::used`] — the bytes of every value admitted and not yet gone —
//! never exceeds the budget. A value still *held* elsewhere ([`Held`]: a session reading
//! a body, the worker filling it) is never evicted; a held value that is replaced or
//! removed keeps counting until its last holder lets go. So the memory of the bodies is
//! the budget, whatever the clients do; a body that does not fit is simply not admitted
//! (the caller streams it through a bounded window instead).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Whether a cached value is in use outside the cache (so its memory cannot be freed now).
pub trait Held {
    /// True while someone other than the cache holds the value.
    fn is_held(&self) -> bool;
}

impl<T: ?Sized> Held for Arc<T> {
    fn is_held(&self) -> bool {
        Arc::strong_count(self) > 1
    }
}

/// A byte-budgeted LRU cache keyed by URL.
pub struct Cache<V> {
    budget: u64,
    /// Bytes of the slots and of the held values no longer in a slot.
    used: u64,
    slots: HashMap<String, Slot<V>>,
    /// Use order, least recent first: tick → key.
    order: BTreeMap<u64, String>,
    tick: u64,
    /// Values replaced or removed while held, with their weight: counted in `used` until
    /// their holders let go.
    leaving: Vec<(V, u64)>,
}

struct Slot<V> {
    value: V,
    bytes: u64,
    /// When the origin last confirmed this value (admitted or revalidated).
    validated: Instant,
    tick: u64,
}

impl<V: Clone + Held> Cache<V> {
    /// An empty cache that keeps at most `budget` bytes.
    pub fn new(budget: u64) -> Cache<V> {
        Cache {
            budget,
            used: 0,
            slots: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            leaving: Vec::new(),
        }
    }

    /// The value for `key` and when it was last validated; marks it most recently used.
    pub fn get(&mut self, key: &str) -> Option<(V, Instant)> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(key)?;
        self.order.remove(&slot.tick);
        slot.tick = tick;
        self.order.insert(tick, key.to_owned());
        Some((slot.value.clone(), slot.validated))
    }

    /// Stores `value` (weighing `bytes`) under `key`, replacing what was there, after
    /// evicting least recently used values not held elsewhere until it fits. Returns false
    /// — and changes nothing but the replaced slot — when it cannot fit: larger than the
    /// budget, or the room is held by values in use.
    pub fn admit(&mut self, key: &str, value: V, bytes: u64, now: Instant) -> bool {
        self.remove(key);
        self.reap();
        if bytes > self.budget {
            return false;
        }
        let need = (self.used + bytes).saturating_sub(self.budget);
        if need > 0 {
            let freeable: u64 = self
                .slots
                .values()
                .filter(|slot| !slot.value.is_held())
                .map(|slot| slot.bytes)
                .sum();
            if freeable < need {
                return false;
            }
            let victims: Vec<String> = self
                .order
                .values()
                .filter(|k| !self.slots[*k].value.is_held())
                .scan(0u64, |freed, k| {
                    (*freed < need).then(|| {
                        *freed += self.slots[k].bytes;
                        k.clone()
                    })
                })
                .collect();
            for victim in victims {
                self.remove(&victim);
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.to_owned());
        self.slots.insert(
            key.to_owned(),
            Slot {
                value,
                bytes,
                validated: now,
                tick: self.tick,
            },
        );
        self.used += bytes;
        true
    }

    /// The origin confirmed `key`'s value is current (HTTP 304).
    pub fn revalidated(&mut self, key: &str, now: Instant) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.validated = now;
        }
    }

    /// Drops `key`'s slot (a failed transfer, or a replacement). A value still held keeps
    /// counting in [`used`](Self::used) until released.
    pub fn remove(&mut self, key: &str) {
        if let Some(slot) = self.slots.remove(key) {
            self.order.remove(&slot.tick);
            if slot.value.is_held() {
                self.leaving.push((slot.value, slot.bytes));
            } else {
                self.used -= slot.bytes;
            }
        }
    }

    /// Drops `key`'s slot if `is_it` says it holds the value meant (a newer value under
    /// the same key stays).
    pub fn remove_if(&mut self, key: &str, is_it: impl FnOnce(&V) -> bool) {
        if self.slots.get(key).is_some_and(|slot| is_it(&slot.value)) {
            self.remove(key);
        }
    }

    /// Bytes held by the cache's values now (never above the budget).
    pub fn used(&mut self) -> u64 {
        self.reap();
        self.used
    }

    /// Number of values in the cache.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Forgets the replaced or removed values whose holders have let go.
    fn reap(&mut self) {
        let used = &mut self.used;
        self.leaving.retain(|(value, bytes)| {
            let held = value.is_held();
            if !held {
                *used -= bytes;
            }
            held
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn value() -> Arc<()> {
        Arc::new(())
    }

    #[test]
    fn keeps_what_fits_and_evicts_the_least_recently_used() {
        let now = Instant::now();
        let mut cache = Cache::new(100);
        assert!(cache.admit("a", value(), 40, now));
        assert!(cache.admit("b", value(), 40, now));
        // Using "a" makes "b" the least recently used.
        assert!(cache.get("a").is_some());
        assert!(cache.admit("c", value(), 40, now));
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
        assert!(cache.get("c").is_some());
        assert_eq!(cache.used(), 80);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn refuses_a_value_larger_than_the_budget() {
        let mut cache = Cache::new(100);
        assert!(cache.admit("small", value(), 10, Instant::now()));
        assert!(!cache.admit("huge", value(), 101, Instant::now()));
        assert!(cache.get("small").is_some(), "nothing evicted for nothing");
        assert_eq!(cache.used(), 10);
        let mut none = Cache::new(0);
        assert!(!none.admit("x", value(), 1, Instant::now()));
        assert!(none.admit("empty", value(), 0, Instant::now()));
    }

    #[test]
    fn never_evicts_a_held_value_and_refuses_instead() {
        let now = Instant::now();
        let mut cache = Cache::new(100);
        let reading = value();
        assert!(cache.admit("a", Arc::clone(&reading), 60, now));
        assert!(cache.admit("b", value(), 30, now));
        // 40 needed, only "b" (30) is free: nothing is evicted, the newcomer is refused.
        assert!(!cache.admit("c", value(), 50, now));
        assert!(cache.get("a").is_some() && cache.get("b").is_some());
        drop(reading);
        assert!(cache.admit("c", value(), 50, now));
        assert!(cache.get("a").is_none(), "the least recently used one went");
        assert!(cache.used() <= 100);
    }

    #[test]
    fn a_replaced_value_counts_until_its_readers_let_go() {
        let now = Instant::now();
        let mut cache = Cache::new(100);
        let old = value();
        assert!(cache.admit("a", Arc::clone(&old), 60, now));
        // The new version of "a" cannot fit beside the old one a session still reads.
        assert!(!cache.admit("a", value(), 60, now));
        assert!(cache.get("a").is_none());
        assert_eq!(cache.used(), 60);
        drop(old);
        assert_eq!(cache.used(), 0);
        assert!(cache.admit("a", value(), 60, now));
        assert_eq!(cache.used(), 60);
    }

    #[test]
    fn remove_if_spares_a_newer_value() {
        let now = Instant::now();
        let mut cache = Cache::new(100);
        let old = value();
        assert!(cache.admit("a", Arc::clone(&old), 10, now));
        assert!(cache.admit("a", value(), 20, now));
        cache.remove_if("a", |v| Arc::ptr_eq(v, &old));
        assert!(cache.get("a").is_some());
        let current = cache.get("a").unwrap().0;
        cache.remove_if("a", |v| Arc::ptr_eq(v, &current));
        assert!(cache.get("a").is_none());
    }

    #[test]
    fn revalidation_refreshes_the_age() {
        let then = Instant::now();
        let later = then + Duration::from_secs(61);
        let mut cache = Cache::new(100);
        assert!(cache.admit("a", value(), 1, then));
        assert_eq!(cache.get("a").unwrap().1, then);
        cache.revalidated("a", later);
        assert_eq!(cache.get("a").unwrap().1, later);
        cache.revalidated("missing", later);
    }

    #[test]
    fn used_never_exceeds_the_budget_under_churn() {
        let now = Instant::now();
        let mut cache = Cache::new(1000);
        let mut held = Vec::new();
        for i in 0..500u64 {
            let v = value();
            if i % 7 == 0 {
                held.push(Arc::clone(&v));
            }
            if i % 50 == 0 {
                held.clear();
            }
            let key = format!("k{}", i % 37);
            cache.admit(&key, v, (i * 13) % 300, now);
            if i % 11 == 0 {
                cache.remove(&format!("k{}", i % 5));
            }
            assert!(cache.used() <= 1000, "step {i}: {}", cache.used());
        }
    }
}
