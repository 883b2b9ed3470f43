//! TEMPORARY: the signatures of `dyntftp::backend` (api14 §2, branch `backend`) until that
//! branch is merged; removed then.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub enum Joined<W> {
    Lead,
    Follow,
    Full(W),
}

pub struct SingleFlight<K, W> {
    max_keys: usize,
    calls: Mutex<HashMap<K, Vec<W>>>,
}

impl<K: Eq + Hash + Clone, W> SingleFlight<K, W> {
    pub fn new(max_keys: usize) -> Self {
        SingleFlight {
            max_keys,
            calls: Mutex::new(HashMap::new()),
        }
    }

    pub fn join(&self, key: K, waiter: W) -> Joined<W> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
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

    pub fn finish(&self, key: &K) -> Vec<W> {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.remove(key).unwrap_or_default()
    }
}

pub struct TtlCache<K, V> {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<K, (V, Instant)>,
}

impl<K: Eq + Hash + Clone, V> TtlCache<K, V> {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        TtlCache {
            capacity,
            ttl,
            entries: HashMap::new(),
        }
    }

    pub fn get(&mut self, key: &K, now: Instant) -> Option<&V> {
        let ttl = self.ttl;
        match self.entries.get(key) {
            Some((_, at)) if now.saturating_duration_since(*at) >= ttl => {
                self.entries.remove(key);
                None
            }
            _ => self.entries.get(key).map(|(v, _)| v),
        }
    }

    pub fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(key, (value, now));
    }
}
