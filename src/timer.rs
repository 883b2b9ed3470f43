//! A hashed timing wheel for per-session retransmission deadlines.
//!
//! # Design
//!
//! * **Ticks.** Time is measured in whole ticks since a fixed `origin`
//!   instant. A deadline is converted to the tick `ceil((deadline - origin) /
//!   tick)`, so an entry can only fire at or after its deadline; a poll time
//!   is converted with `floor`. Both conversions saturate (instants before the
//!   origin map to tick 0, absurdly distant ones to `u64::MAX`).
//! * **Slots.** Each entry lives in bucket `tick & (slots - 1)` (the slot count
//!   is a power of two). An occupancy bitmap (one bit per slot, packed into
//!   `u64` words) lets [`TimerWheel::poll`] skip empty slots and
//!   [`TimerWheel::next_deadline`] scan words instead of slots.
//! * **Rounds.** Entries more than one revolution ahead share a slot with
//!   nearer ones. Each entry stores its absolute tick, and visiting a slot only
//!   moves entries whose tick has been reached; the rest wait for a later round.
//!   A poll that jumps more than one revolution visits every occupied slot once.
//! * **Storage.** Entries live in a `Vec` slab with a free list and form
//!   intrusive doubly-linked lists (one per slot plus a FIFO "due" list of
//!   expired entries), so `insert` and `cancel` are O(1) and allocation-free
//!   once the slab has warmed up.
//! * **Generation-checked keys.** A [`TimerKey`] is a slab index plus a
//!   generation that is bumped whenever the entry is released, so a key of a
//!   fired or cancelled entry can never cancel a newer entry reusing the slot.
//!
//! The wheel never reads the clock: every time arrives as an argument, which
//! keeps it deterministic and testable. Cancellation is optional — callers may
//! let stale timers fire lazily and ignore them.

use std::time::{Duration, Instant};

/// Sentinel for "no entry" in links, heads and the free list.
const NIL: u32 = u32::MAX;
/// Upper bound on the number of slots (keeps allocations sane).
const MAX_SLOTS: usize = 1 << 20;

/// The tick of [`TimerWheel::with_origin`]: a retransmission on a fast network is due
/// a few hundred microseconds after its packet, and a deadline fires up to one tick
/// late.
pub(crate) const DEFAULT_TICK: Duration = Duration::from_micros(100);

/// The slots of [`TimerWheel::with_origin`]: one revolution is 0.8 s, about a full
/// retransmission timeout, so few entries wait for a later round.
const DEFAULT_SLOTS: usize = 8192;

/// A handle to an inserted timer, used to [`TimerWheel::cancel`] it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// One timer: a node of the intrusive lists (a slot's, the due list, or the free list);
/// `value` is `None` while it is on the free list.
#[derive(Debug)]
struct Node<T> {
    value: Option<T>,
    tick: u64,
    generation: u32,
    /// Index into `heads` of the list holding this entry (`NIL` when free).
    list: u32,
    prev: u32,
    next: u32,
}

/// A hashed timing wheel mapping deadlines to values of type `T`.
#[derive(Debug)]
pub struct TimerWheel<T> {
    origin: Instant,
    tick_ns: u128,
    mask: u64,
    /// List heads: one per slot, then the due list at index `slots`.
    heads: Vec<u32>,
    due_tail: u32,
    bitmap: Vec<u64>,
    entries: Vec<Node<T>>,
    free: u32,
    /// Next tick to process; every entry still in a slot has `tick >= cursor`.
    cursor: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// Creates a wheel whose tick 0 starts at `origin`, with granularity
    /// `tick` (a zero tick is treated as 1 ns) and `slots` buckets, rounded up
    /// to a power of two (at least 1, at most 2^20).
    pub fn new(origin: Instant, tick: Duration, slots: usize) -> Self {
        let slots = slots.clamp(1, MAX_SLOTS).next_power_of_two();
        TimerWheel {
            origin,
            tick_ns: tick.as_nanos().max(1),
            mask: slots as u64 - 1,
            heads: vec![NIL; slots + 1],
            due_tail: NIL,
            bitmap: vec![0; slots.div_ceil(64)],
            entries: Vec::new(),
            free: NIL,
            cursor: 0,
            len: 0,
        }
    }

    /// Creates a wheel with the [`DEFAULT_TICK`] (100 µs) and 8192 slots.
    pub fn with_origin(origin: Instant) -> Self {
        Self::new(origin, DEFAULT_TICK, DEFAULT_SLOTS)
    }

    /// Schedules `value` to fire once `deadline` has passed, in O(1).
    ///
    /// A deadline at or before the wheel's current position (or before the
    /// origin) is due at the next [`poll`](Self::poll).
    ///
    /// # Panics
    ///
    /// Only if more than `u32::MAX - 1` entries are pending at once.
    pub fn insert(&mut self, deadline: Instant, value: T) -> TimerKey {
        let tick = self.to_tick(deadline, true);
        let index = if self.free != NIL {
            let i = self.free;
            let e = &mut self.entries[i as usize];
            self.free = e.next;
            e.value = Some(value);
            e.tick = tick;
            i
        } else {
            let i = u32::try_from(self.entries.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("TimerWheel: too many pending timers");
            self.entries.push(Node {
                value: Some(value),
                tick,
                generation: 0,
                list: NIL,
                prev: NIL,
                next: NIL,
            });
            i
        };
        if tick < self.cursor {
            self.push_due(index);
        } else {
            self.push_slot(index, tick);
        }
        self.len += 1;
        TimerKey {
            index,
            generation: self.entries[index as usize].generation,
        }
    }

    /// Removes a pending timer in O(1) and returns its value, or `None` if the
    /// key is stale (already fired or cancelled, or from another wheel).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let e = self.entries.get(key.index as usize)?;
        if e.generation != key.generation || e.value.is_none() {
            return None;
        }
        self.unlink(key.index);
        Some(self.release(key.index))
    }

    /// Returns one expired value (deadline `<= now`), or `None` if nothing is
    /// due yet. Call repeatedly until `None` to drain all expired timers.
    ///
    /// `now` should not go backwards; an earlier `now` is treated as the
    /// wheel's current position.
    pub fn poll(&mut self, now: Instant) -> Option<T> {
        let due = self.heads.len() - 1;
        if self.heads[due] == NIL {
            let now_tick = self.to_tick(now, false);
            self.advance(now_tick);
        }
        let i = self.heads[due];
        if i == NIL {
            return None;
        }
        self.unlink(i);
        Some(self.release(i))
    }

    /// Returns an instant by which [`poll`](Self::poll) should next be called,
    /// or `None` when the wheel is empty.
    ///
    /// If expired entries are already waiting to be returned, this is the
    /// origin (long past), meaning "poll now".
    ///
    /// The result is never later than the earliest moment `poll` could return
    /// an entry (a deadline rounded up to its tick boundary), but may be
    /// earlier, e.g. when the first occupied slot holds only entries for a
    /// later round. Costs O(slots / 64) at worst.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        if self.heads[self.heads.len() - 1] != NIL {
            return Some(self.origin);
        }
        let start = (self.cursor & self.mask) as usize;
        let slot = self.next_occupied(start)?;
        let dist = (slot as u64).wrapping_sub(start as u64) & self.mask;
        let tick = self.cursor.saturating_add(dist);
        Some(self.instant_at(tick).unwrap_or(self.origin))
    }

    /// Returns the number of pending (not yet returned) timers.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Returns `true` if no timers are pending.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Converts an instant to a tick index, rounding up or down, saturating.
    fn to_tick(&self, t: Instant, round_up: bool) -> u64 {
        let ns = t.saturating_duration_since(self.origin).as_nanos();
        let ticks = if round_up {
            ns.div_ceil(self.tick_ns)
        } else {
            ns / self.tick_ns
        };
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// The instant at which `tick` starts, or `None` if unrepresentable.
    fn instant_at(&self, tick: u64) -> Option<Instant> {
        let ns = self.tick_ns.checked_mul(u128::from(tick))?;
        let secs = u64::try_from(ns / 1_000_000_000).ok()?;
        let d = Duration::new(secs, (ns % 1_000_000_000) as u32);
        self.origin.checked_add(d)
    }

    /// Moves every slotted entry with `tick <= now_tick` to the due list and
    /// sets the cursor past `now_tick`.
    fn advance(&mut self, now_tick: u64) {
        if now_tick < self.cursor {
            return;
        }
        if self.len == 0 {
            // Nothing in any slot: just jump.
        } else if now_tick - self.cursor > self.mask {
            // More than a full revolution: visit every occupied slot once.
            for w in 0..self.bitmap.len() {
                let mut bits = self.bitmap[w];
                while bits != 0 {
                    self.expire_slot(w * 64 + bits.trailing_zeros() as usize, now_tick);
                    bits &= bits - 1;
                }
            }
        } else {
            let mut t = self.cursor;
            while let Some(slot) = self.next_occupied((t & self.mask) as usize) {
                let dist = (slot as u64).wrapping_sub(t) & self.mask;
                match t.checked_add(dist) {
                    Some(next) if next <= now_tick => t = next,
                    _ => break,
                }
                self.expire_slot(slot, now_tick);
                if t == now_tick {
                    break;
                }
                t += 1;
            }
        }
        self.cursor = now_tick.saturating_add(1);
    }

    /// Moves the entries of `slot` whose tick is `<= now_tick` to the due list.
    fn expire_slot(&mut self, slot: usize, now_tick: u64) {
        let mut i = self.heads[slot];
        while i != NIL {
            let e = &self.entries[i as usize];
            let (next, tick) = (e.next, e.tick);
            if tick <= now_tick {
                self.unlink(i);
                self.push_due(i);
            }
            i = next;
        }
    }

    /// First occupied slot at or after `start`, wrapping around.
    fn next_occupied(&self, start: usize) -> Option<usize> {
        let words = self.bitmap.len();
        let w0 = start / 64;
        let first = self.bitmap[w0] & (!0u64 << (start % 64));
        if first != 0 {
            return Some(w0 * 64 + first.trailing_zeros() as usize);
        }
        (1..=words).find_map(|k| {
            let w = (w0 + k) % words;
            let bits = self.bitmap[w];
            (bits != 0).then(|| w * 64 + bits.trailing_zeros() as usize)
        })
    }

    /// Pushes entry `i` onto the front of the slot list for `tick`.
    fn push_slot(&mut self, i: u32, tick: u64) {
        let slot = (tick & self.mask) as usize;
        let head = self.heads[slot];
        if head != NIL {
            self.entries[head as usize].prev = i;
        }
        let e = &mut self.entries[i as usize];
        (e.list, e.prev, e.next) = (slot as u32, NIL, head);
        self.heads[slot] = i;
        self.bitmap[slot / 64] |= 1 << (slot % 64);
    }

    /// Appends entry `i` to the due list.
    fn push_due(&mut self, i: u32) {
        let due = self.heads.len() - 1;
        let tail = self.due_tail;
        let e = &mut self.entries[i as usize];
        (e.list, e.prev, e.next) = (due as u32, tail, NIL);
        if tail == NIL {
            self.heads[due] = i;
        } else {
            self.entries[tail as usize].next = i;
        }
        self.due_tail = i;
    }

    /// Unlinks entry `i` from whichever list holds it.
    fn unlink(&mut self, i: u32) {
        let e = &self.entries[i as usize];
        let (list, prev, next) = (e.list as usize, e.prev, e.next);
        let due = self.heads.len() - 1;
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else {
            self.heads[list] = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        } else if list == due {
            self.due_tail = prev;
        }
        if list != due && self.heads[list] == NIL {
            self.bitmap[list / 64] &= !(1 << (list % 64));
        }
    }

    /// Returns an unlinked entry to the free list, bumping its generation.
    fn release(&mut self, i: u32) -> T {
        let e = &mut self.entries[i as usize];
        e.generation = e.generation.wrapping_add(1);
        (e.list, e.prev, e.next) = (NIL, NIL, self.free);
        self.free = i;
        self.len -= 1;
        e.value.take().expect("released entry holds a value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn drain<T>(w: &mut TimerWheel<T>, now: Instant) -> Vec<T> {
        std::iter::from_fn(|| w.poll(now)).collect()
    }

    #[test]
    fn fires_in_order_never_early() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, ms(1), 16);
        for d in [30u64, 5, 12, 7] {
            w.insert(t0 + ms(d), d);
        }
        assert_eq!(w.len(), 4);
        let mut fired = Vec::new();
        for now in 0..=40 {
            for v in drain(&mut w, t0 + ms(now)) {
                assert!(v <= now, "{v} fired early at {now}");
                assert!(v + 1 >= now, "{v} fired late at {now}");
                fired.push(v);
            }
        }
        assert_eq!(fired, [5, 7, 12, 30]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn sub_tick_deadline_rounds_up() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, ms(1), 8);
        w.insert(t0 + Duration::from_micros(1500), ());
        assert_eq!(w.next_deadline(), Some(t0 + ms(2)));
        assert_eq!(w.poll(t0 + Duration::from_micros(1600)), None);
        assert_eq!(w.poll(t0 + ms(2)), Some(()));
    }

    #[test]
    fn past_and_now_deadlines_fire_on_next_poll() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0 + ms(10), ms(1), 8);
        w.insert(t0, "before origin");
        assert_eq!(w.poll(t0 + ms(10)), Some("before origin"));
        assert_eq!(w.poll(t0 + ms(50)), None);
        w.insert(t0 + ms(50), "now");
        assert!(w.next_deadline() <= Some(t0 + ms(50)));
        w.insert(t0 + ms(20), "past");
        assert!(w.next_deadline() <= Some(t0 + ms(20)));
        let mut got = drain(&mut w, t0 + ms(50));
        got.sort_unstable();
        assert_eq!(got, ["now", "past"]);
    }

    #[test]
    fn cancel_and_stale_keys() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, ms(1), 8);
        let a = w.insert(t0 + ms(5), 'a');
        let b = w.insert(t0 + ms(6), 'b');
        assert_eq!(w.cancel(a), Some('a'));
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.len(), 1);
        // `c` reuses a's slab slot; the stale key must not touch it.
        let c = w.insert(t0 + ms(7), 'c');
        assert_eq!(c.index, a.index);
        assert_eq!(w.cancel(a), None);
        assert_eq!(drain(&mut w, t0 + ms(10)), ['b', 'c']);
        assert_eq!(w.cancel(b), None);
        assert_eq!(w.cancel(c), None);
        let d = w.insert(t0 + ms(20), 'd');
        assert_eq!(w.cancel(b), None);
        assert_eq!(w.cancel(c), None);
        assert_eq!(w.cancel(d), Some('d'));
        assert_eq!(w.poll(t0 + ms(100)), None);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_while_due() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, ms(1), 8);
        let keys: Vec<_> = (0..3).map(|i| w.insert(t0 + ms(i), i)).collect();
        assert_eq!(w.poll(t0 + ms(5)), Some(0));
        assert_eq!(w.cancel(keys[2]), Some(2));
        assert_eq!(w.poll(t0 + ms(5)), Some(1));
        assert_eq!(w.poll(t0 + ms(5)), None);
    }

    #[test]
    fn wrap_around_does_not_fire_early() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, ms(1), 8);
        w.insert(t0 + ms(100), "far");
        w.insert(t0 + ms(4), "near");
        for now in 0..100 {
            for v in drain(&mut w, t0 + ms(now)) {
                assert_eq!((v, now), ("near", 4));
            }
            let nd = w.next_deadline().unwrap();
            assert!(nd <= t0 + ms(100));
        }
        assert_eq!(w.poll(t0 + ms(100)), Some("far"));
        assert!(w.is_empty());
    }

    #[test]
    fn big_jump_fires_everything_once() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, ms(1), 8);
        for d in 0..200u64 {
            w.insert(t0 + ms(d), d);
        }
        let mut got = drain(&mut w, t0 + ms(80)); // 10 revolutions
        got.sort_unstable();
        assert_eq!(got, (0..=80).collect::<Vec<_>>());
        assert_eq!(w.len(), 119);
        assert_eq!(w.next_deadline(), Some(t0 + ms(81)));
        let mut rest = drain(&mut w, t0 + ms(10_000));
        rest.sort_unstable();
        assert_eq!(rest, (81..200).collect::<Vec<_>>());
        assert_eq!(w.poll(t0 + ms(20_000)), None);
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, Duration::ZERO, 0);
        w.insert(t0 + Duration::from_secs(u32::MAX.into()), 1);
        assert!(w.next_deadline().is_some());
        assert_eq!(w.poll(t0 + ms(5)), None);
        let mut w = TimerWheel::new(t0, Duration::MAX, usize::MAX);
        w.insert(t0 + ms(1), 2);
        assert_eq!(w.poll(t0 + Duration::from_secs(1 << 40)), None);
        // Tick 1 is unrepresentable as an Instant: falls back to (early) origin.
        assert_eq!(w.next_deadline(), Some(t0));
    }

    #[test]
    fn slab_is_reused() {
        let t0 = Instant::now();
        let mut w = TimerWheel::with_origin(t0);
        for i in 0..1000u64 {
            w.insert(t0 + ms(i * 7), i);
            assert_eq!(w.poll(t0 + ms(i * 7)), Some(i));
        }
        assert!(w.entries.len() <= 2, "slab grew to {}", w.entries.len());
    }

    /// Tiny deterministic xorshift64 generator.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn randomized_against_model() {
        let t0 = Instant::now();
        let tick = ms(1);
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut w = TimerWheel::new(t0, tick, 16);
        // Model: (key, id, deadline) of every pending entry.
        let mut model: Vec<(TimerKey, u64, Instant)> = Vec::new();
        let mut stale: Vec<TimerKey> = Vec::new();
        let mut now = t0;
        let floor = |now: Instant| t0 + tick * (now - t0).as_millis() as u32;
        let ceil = |d: Instant| {
            t0 + tick
                * d.saturating_duration_since(t0)
                    .as_nanos()
                    .div_ceil(1_000_000) as u32
        };
        for id in 0..10_000u64 {
            match rng.below(10) {
                0..=3 => {
                    let span = if rng.below(5) == 0 { 200_000 } else { 40_000 };
                    let d = (now + Duration::from_micros(rng.below(span)))
                        .checked_sub(Duration::from_micros(5_000))
                        .unwrap_or(t0);
                    model.push((w.insert(d, id), id, d));
                }
                4 | 5 => {
                    if !model.is_empty() && rng.below(4) != 0 {
                        let (key, id, _) =
                            model.swap_remove(rng.below(model.len() as u64) as usize);
                        assert_eq!(w.cancel(key), Some(id));
                        stale.push(key);
                    } else if !stale.is_empty() {
                        let key = stale[rng.below(stale.len() as u64) as usize];
                        assert_eq!(w.cancel(key), None);
                    }
                }
                _ => {
                    let step = if rng.below(50) == 0 { 150_000 } else { 2_500 };
                    now += Duration::from_micros(rng.below(step));
                    loop {
                        let Some(v) = w.poll(now) else {
                            // (b) nothing left that should have fired.
                            for &(_, id, d) in &model {
                                assert!(d > floor(now), "{id} not fired at {now:?}");
                            }
                            break;
                        };
                        let pos = model.iter().position(|e| e.1 == v).expect("unknown id");
                        let (key, _, d) = model.swap_remove(pos);
                        assert!(d <= now, "(a) {v} fired early");
                        stale.push(key);
                        if rng.below(3) == 0 {
                            break;
                        }
                    }
                }
            }
            // (c) next_deadline never later than the earliest pollable time.
            match model.iter().map(|e| e.2).min() {
                Some(min) => {
                    let nd = w.next_deadline().expect("non-empty");
                    assert!(nd <= ceil(min), "(c) {nd:?} > {min:?}");
                    assert!(nd < min + tick);
                }
                None => assert_eq!(w.next_deadline(), None),
            }
            // (d) length matches.
            assert_eq!(w.len(), model.len());
        }
        assert!(w.entries.len() < 200);
    }
}
