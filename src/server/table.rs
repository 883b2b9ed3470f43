//! The running sessions: a slab of entries named by [`SessionId`] (slot and generation),
//! each session's single live timer in one wheel, and the queue through which sources on
//! other threads say they are ready again.
//!
//! Slab slots are reused, so every id carries a generation: a datagram, timer or
//! notification meant for a dead session never reaches the one that took its slot.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use log::warn;
use mio::{Token, Waker};
use slab::Slab;

use crate::handler::ReadySink;
use crate::packet::Mode;
use crate::session::Session;
use crate::timer::{TimerKey, TimerWheel};

use super::transport::Transport;

/// Session tokens put the generation in the upper 32 bits of a `usize`.
const _: () = assert!(usize::BITS == 64, "session tokens need a 64-bit usize");

/// Generations are kept to 31 bits so that session tokens stay below the listener and
/// waker tokens, which count down from `usize::MAX`.
const GENERATION_MASK: u32 = 0x7fff_ffff;

/// A running session's name: its slab slot and the generation it was started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SessionId {
    key: u32,
    generation: u32,
}

impl SessionId {
    /// An id made up, for tests that need one without a table.
    #[cfg(test)]
    pub(crate) fn new(key: u32, generation: u32) -> SessionId {
        SessionId { key, generation }
    }

    /// The mio token of the session's own socket.
    pub(crate) fn token(self) -> Token {
        Token((self.generation as usize) << 32 | self.key as usize)
    }

    /// The session a token names, for tokens below the listeners' and the waker's.
    pub(crate) fn from_token(token: Token) -> SessionId {
        SessionId {
            key: token.0 as u32,
            generation: (token.0 >> 32) as u32,
        }
    }
}

/// One running session and what the driver knows about it.
pub(super) struct SessionEntry {
    generation: u32,
    pub(super) transport: Transport,
    pub(super) session: Session,
    pub(super) request: RequestInfo,
    /// The live timer wheel entry, if any, and its deadline.
    timer: Option<(Instant, TimerKey)>,
}

impl SessionEntry {
    /// The entry of session `id`, just created.
    pub(super) fn new(
        id: SessionId,
        transport: Transport,
        session: Session,
        request: RequestInfo,
    ) -> SessionEntry {
        SessionEntry {
            generation: id.generation,
            transport,
            session,
            request,
            timer: None,
        }
    }
}

/// Who asked for what, as the session's [`SessionStats`](crate::stats::SessionStats)
/// will report it.
pub(super) struct RequestInfo {
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) filename: String,
    pub(super) mode: Mode,
    /// The options as requested (lossily decoded).
    pub(super) options: Vec<(String, String)>,
    pub(super) start_time: SystemTime,
}

/// The running sessions and their timers.
pub(super) struct SessionTable {
    slab: Slab<SessionEntry>,
    next_generation: u32,
    wheel: TimerWheel<SessionId>,
}

impl SessionTable {
    /// An empty table whose timer wheel counts from `now`.
    pub(super) fn new(now: Instant) -> SessionTable {
        SessionTable {
            slab: Slab::new(),
            next_generation: 0,
            wheel: TimerWheel::with_origin(now),
        }
    }

    /// Sessions running.
    pub(super) fn len(&self) -> usize {
        self.slab.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// The id the next inserted session will have (its slot is the vacant one, its
    /// generation a fresh one). Fixed before the handler opens the source, so that the
    /// source's notifier can name it; an id never inserted only wastes a generation.
    pub(super) fn next_id(&mut self) -> SessionId {
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        SessionId {
            key: u32::try_from(self.slab.vacant_key()).expect("fewer than 2^32 sessions"),
            generation,
        }
    }

    /// Inserts the session `id` (from the last [`next_id`](Self::next_id)).
    pub(super) fn insert(&mut self, id: SessionId, entry: SessionEntry) {
        debug_assert_eq!(self.slab.vacant_key(), id.key as usize);
        debug_assert_eq!(entry.generation, id.generation);
        self.slab.insert(entry);
    }

    /// The session `id`, if it still runs.
    pub(super) fn get_mut(&mut self, id: SessionId) -> Option<&mut SessionEntry> {
        self.slab
            .get_mut(id.key as usize)
            .filter(|entry| entry.generation == id.generation)
    }

    /// Removes the session `id` and its timer.
    pub(super) fn remove(&mut self, id: SessionId) -> Option<SessionEntry> {
        self.get_mut(id)?;
        let entry = self.slab.remove(id.key as usize);
        if let Some((_, timer)) = entry.timer {
            self.wheel.cancel(timer);
        }
        Some(entry)
    }

    /// Every running session.
    pub(super) fn ids(&self) -> Vec<SessionId> {
        self.slab
            .iter()
            .map(|(key, entry)| SessionId {
                key: key as u32,
                generation: entry.generation,
            })
            .collect()
    }

    /// Makes sure the session's timer fires by `deadline`. Lazy: an armed timer that fires
    /// no later is kept (firing early is harmless: the session then does nothing and the
    /// driver re-arms), so an ACK that moves the deadline later costs no wheel operation.
    pub(super) fn arm(&mut self, id: SessionId, deadline: Instant) {
        let Some(entry) = self
            .slab
            .get_mut(id.key as usize)
            .filter(|entry| entry.generation == id.generation)
        else {
            return;
        };
        match entry.timer {
            Some((armed, _)) if armed <= deadline => {}
            previous => {
                if let Some((_, stale)) = previous {
                    self.wheel.cancel(stale);
                }
                entry.timer = Some((deadline, self.wheel.insert(deadline, id)));
            }
        }
    }

    /// The next session whose timer is due at `now` (its timer is then disarmed).
    pub(super) fn expired(&mut self, now: Instant) -> Option<SessionId> {
        while let Some(id) = self.wheel.poll(now) {
            if let Some(entry) = self.get_mut(id) {
                entry.timer = None;
                return Some(id);
            }
        }
        None
    }

    /// The earliest armed timer.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.wheel.next_deadline()
    }
}

/// Sessions whose sources said they are ready again, filled from any thread.
pub(super) struct ReadyQueue {
    ready: Mutex<Vec<SessionId>>,
    waker: Arc<Waker>,
}

impl ReadyQueue {
    /// A queue that wakes the loop through `waker`.
    pub(super) fn new(waker: Arc<Waker>) -> ReadyQueue {
        ReadyQueue {
            ready: Mutex::new(Vec::new()),
            waker,
        }
    }

    /// Moves the queued sessions into `into` (empty), leaving the queue empty.
    pub(super) fn take(&self, into: &mut Vec<SessionId>) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *ready, into);
    }
}

impl ReadySink for ReadyQueue {
    fn ready(&self, session: SessionId) {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let first = ready.is_empty();
        ready.push(session);
        drop(ready);
        // A non-empty queue already has a wake-up on its way.
        if first {
            if let Err(e) = self.waker.wake() {
                warn!("cannot wake the event loop: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Options;
    use crate::response::BytesSource;
    use crate::server::transport::ReplyPath;
    use crate::session::SessionConfig;
    use std::time::Duration;

    fn entry(id: SessionId, now: Instant, port: u16) -> SessionEntry {
        let session = Session::new(
            now,
            Options::EMPTY,
            Mode::Octet,
            Box::new(BytesSource::new(b"x".to_vec())),
            SessionConfig::default(),
        );
        let peer: SocketAddr = ([127, 0, 0, 1], port).into();
        let transport = Transport::Shared(ReplyPath {
            listener: 0,
            source: None,
        });
        let request = RequestInfo {
            peer,
            local: peer,
            filename: "f".into(),
            mode: Mode::Octet,
            options: Vec::new(),
            start_time: SystemTime::now(),
        };
        SessionEntry::new(id, transport, session, request)
    }

    #[test]
    fn tokens_round_trip_and_stay_below_the_listener_tokens() {
        for (key, generation) in [(0, 0), (7, 1), (u32::MAX, GENERATION_MASK)] {
            let id = SessionId { key, generation };
            assert_eq!(SessionId::from_token(id.token()), id);
            assert!(id.token().0 < usize::MAX - 64);
        }
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_id() {
        let now = Instant::now();
        let mut table = SessionTable::new(now);
        let old = table.next_id();
        table.insert(old, entry(old, now, 1000));
        assert!(table.get_mut(old).is_some());
        assert!(table.remove(old).is_some());
        let new = table.next_id();
        table.insert(new, entry(new, now, 1001));
        assert_eq!(new.key, old.key, "the slot is reused");
        assert!(table.get_mut(old).is_none());
        assert!(table.remove(old).is_none());
        assert_eq!(
            table.get_mut(new).map(|e| e.request.peer.port()),
            Some(1001)
        );
        assert_eq!(table.ids(), vec![new]);
        // Nor does its timer: arming the old id arms nothing.
        table.arm(old, now);
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn generations_wrap_within_31_bits() {
        let mut table = SessionTable::new(Instant::now());
        table.next_generation = GENERATION_MASK;
        assert_eq!(table.next_id().generation, GENERATION_MASK);
        assert_eq!(table.next_id().generation, 0);
    }

    #[test]
    fn timers_are_armed_lazily_and_removed_with_their_session() {
        let now = Instant::now();
        let mut table = SessionTable::new(now);
        let a = table.next_id();
        table.insert(a, entry(a, now, 1000));
        let b = table.next_id();
        table.insert(b, entry(b, now, 1001));
        let ms = Duration::from_millis;
        table.arm(a, now + ms(100));
        // A later deadline keeps the earlier timer; an earlier one replaces it.
        table.arm(a, now + ms(500));
        assert_eq!(
            table.next_deadline().map(|d| d - now >= ms(100)),
            Some(true)
        );
        table.arm(b, now + ms(300));
        table.arm(b, now + ms(200));
        assert_eq!(table.expired(now + ms(50)), None);
        assert_eq!(table.expired(now + ms(150)), Some(a));
        assert_eq!(table.expired(now + ms(150)), None);
        // Removing b takes its timer with it.
        table.remove(b);
        assert_eq!(table.expired(now + ms(1000)), None);
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn a_dead_sessions_timer_is_skipped() {
        let now = Instant::now();
        let mut table = SessionTable::new(now);
        let a = table.next_id();
        table.insert(a, entry(a, now, 1000));
        table.arm(a, now + Duration::from_millis(10));
        // Removed through the slab without the table's help: the stale wheel entry fires
        // for an id that no longer runs and is ignored.
        table.slab.remove(a.key as usize);
        assert_eq!(table.expired(now + Duration::from_secs(1)), None);
    }
}
