//! Adaptive busy polling: whether the event loop polls without sleeping for a while
//! before it blocks.
//!
//! A lock-step transfer on a fast network spends most of its server time in the
//! scheduler: every ACK wakes the sleeping loop thread. When the next datagram comes
//! within microseconds, polling for it without sleeping saves that wake-up. [`Spinner`]
//! decides before each wait, from how recent waits ended, whether spinning pays: it
//! spins while spins find datagrams, and after a spin that found nothing it blocks and
//! spins again only after a number of short waits that doubles with every fruitless
//! spin (up to [`MAX_BACKOFF`]). Like the session, it reads no clock: the driver passes
//! the durations it measured.
//!
//! Worst cases, with the limit `L`: an idle server spins once per burst of traffic (one
//! `L`); a loop that shares its CPU with its client (which cannot run while the loop
//! spins, so every spin misses) ends up spinning once every [`MAX_BACKOFF`] short waits.

use std::time::Duration;

/// The most short waits required before the next spin after fruitless spins.
pub(crate) const MAX_BACKOFF: u32 = 64;

/// Decides when the event loop spins (see the module documentation).
#[derive(Debug)]
pub(crate) struct Spinner {
    /// The longest spin; zero turns spinning off.
    limit: Duration,
    /// Short waits still to be seen before the next spin.
    due: u32,
    /// What `due` becomes after the next fruitless spin.
    backoff: u32,
}

impl Spinner {
    /// A spinner that spins for at most `limit` (zero: never).
    pub(crate) fn new(limit: Duration) -> Spinner {
        Spinner {
            limit,
            due: 0,
            backoff: 1,
        }
    }

    /// How long to poll without sleeping before this wait; zero: block at once.
    pub(crate) fn budget(&self) -> Duration {
        if self.due > 0 {
            Duration::ZERO
        } else {
            self.limit
        }
    }

    /// A spin found events after `empty_polls` empty polls. Events waiting already at
    /// the first poll say nothing about spinning; events found by spinning reset the
    /// back-off.
    pub(crate) fn found(&mut self, empty_polls: u64) {
        if empty_polls > 0 {
            self.backoff = 1;
        }
    }

    /// A spin found nothing for its whole budget: block, and spin again only after
    /// `backoff` short waits; the next fruitless spin waits twice as many.
    pub(crate) fn missed(&mut self) {
        self.due = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// A blocking wait ended with events after `waited`. A wait no longer than the limit
    /// is one a spin would have cut short: it counts towards the next spin.
    pub(crate) fn blocked(&mut self, waited: Duration) {
        if waited <= self.limit {
            self.due = self.due.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Duration = Duration::from_micros(50);

    #[test]
    fn spins_while_spins_find_events() {
        let mut s = Spinner::new(L);
        for _ in 0..100 {
            assert_eq!(s.budget(), L);
            s.found(3);
        }
    }

    #[test]
    fn zero_limit_never_spins() {
        let mut s = Spinner::new(Duration::ZERO);
        assert_eq!(s.budget(), Duration::ZERO);
        s.blocked(Duration::ZERO);
        assert_eq!(s.budget(), Duration::ZERO);
    }

    #[test]
    fn a_miss_waits_for_short_waits_and_doubles_each_time() {
        let mut s = Spinner::new(L);
        let mut required = Vec::new();
        for _ in 0..10 {
            assert_eq!(s.budget(), L);
            s.missed();
            let mut waits = 0;
            while s.budget().is_zero() {
                s.blocked(Duration::from_micros(10));
                waits += 1;
            }
            required.push(waits);
        }
        assert_eq!(required, [1, 2, 4, 8, 16, 32, 64, 64, 64, 64]);
    }

    #[test]
    fn long_waits_do_not_bring_spinning_back() {
        let mut s = Spinner::new(L);
        s.missed();
        for _ in 0..1000 {
            s.blocked(Duration::from_millis(1));
        }
        assert_eq!(s.budget(), Duration::ZERO);
        s.blocked(L);
        assert_eq!(s.budget(), L);
    }

    #[test]
    fn events_already_waiting_do_not_reset_the_back_off() {
        let mut s = Spinner::new(L);
        s.missed();
        s.blocked(L);
        s.missed(); // backoff is now 4
        s.blocked(L);
        s.blocked(L);
        assert_eq!(s.budget(), L);
        s.found(0);
        s.missed();
        assert_eq!(s.due, 4);
        s.found(1);
        assert_eq!(s.backoff, 1);
    }
}
