//! The running sessions: a slab of entries named by [`SessionId`] (slot and generation),
//! each session's single live timer in one wheel, the window memory they hold against
//! the [`WindowBudget`], and the queue through which sources on other threads say they are
//! ready again.
//!
//! Slab slots are reused, so every id carries a generation: a datagram, timer or
//! notification meant for a dead session never reaches the one that took its slot.
//!
//! What a session keeps of its request for its statistics ([`RequestInfo`]) is bounded:
//! the filename cut to [`STORED_FILENAME_BYTES`], at most [`STORED_OPTIONS`] options, each
//! name and value cut to [`STORED_OPTION_BYTES`]; about 3 KiB at most, whatever was sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use log::warn;
use mio::{Token, Waker};
use slab::Slab;

use crate::family::ClientFamily;
use crate::handler::ReadySink;
use crate::options::Limits;
use crate::packet::{Mode, Options};
use crate::session::Session;
use crate::timer::{TimerKey, TimerWheel};

use super::budget::{ring_bytes, WindowBudget};
use super::transport::Transport;

/// Options a session keeps of its request, for its statistics; later ones are dropped
/// (negotiation sees them all).
pub const STORED_OPTIONS: usize = 16;
/// Bytes a session keeps of each requested option name and value.
pub const STORED_OPTION_BYTES: usize = 64;
/// Bytes a session keeps of the requested filename.
pub const STORED_FILENAME_BYTES: usize = 256;

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
    /// The window memory reserved for it (its ring at most).
    window_bytes: usize,
    /// The kernel reported the peer unreachable (an ICMP error on the session's own
    /// socket); the session ends once the datagrams queued before it are read.
    pub(super) peer_unreachable: bool,
}

impl SessionEntry {
    /// The entry of session `id`, just created.
    pub(super) fn new(
        id: SessionId,
        transport: Transport,
        session: Session,
        request: RequestInfo,
    ) -> SessionEntry {
        let params = session.params();
        SessionEntry {
            generation: id.generation,
            window_bytes: ring_bytes(params.blksize, params.window),
            peer_unreachable: false,
            transport,
            session,
            request,
            timer: None,
        }
    }
}

/// Who asked for what, as the session's [`SessionStats`](crate::stats::SessionStats)
/// will report it: bounded (see the [module documentation](self)).
pub(super) struct RequestInfo {
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    /// The filename, lossily decoded and cut to [`STORED_FILENAME_BYTES`].
    pub(super) filename: String,
    pub(super) mode: Mode,
    /// The first [`STORED_OPTIONS`] options as requested, lossily decoded, names and values
    /// cut to [`STORED_OPTION_BYTES`].
    pub(super) options: Vec<(String, String)>,
    /// The client family the request looks like.
    pub(super) family: ClientFamily,
    pub(super) start_time: SystemTime,
    /// The handler's label for the session ([`ReadRequest::set_label`](crate::ReadRequest::set_label)).
    pub(super) label: Option<Arc<str>>,
    /// The client's MAC, if the handler looked it up.
    pub(super) mac: Option<crate::mac::MacAddr>,
}

impl RequestInfo {
    /// What a session keeps of a request for `filename` with `options`.
    pub(super) fn new(
        peer: SocketAddr,
        local: SocketAddr,
        filename: &[u8],
        mode: Mode,
        options: Options<'_>,
        start_time: SystemTime,
    ) -> RequestInfo {
        let options_raw = options;
        let options: Vec<(String, String)> = options
            .iter()
            .take(STORED_OPTIONS)
            .map(|o| {
                (
                    bounded_lossy(o.name, STORED_OPTION_BYTES),
                    bounded_lossy(o.value, STORED_OPTION_BYTES),
                )
            })
            .collect();
        RequestInfo {
            peer,
            local,
            filename: bounded_lossy(filename, STORED_FILENAME_BYTES),
            mode,
            family: ClientFamily::classify(filename, options_raw),
            options,
            start_time,
            label: None,
            mac: None,
        }
    }

    /// Heap bytes it holds.
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.filename.capacity()
            + self.options.capacity() * std::mem::size_of::<(String, String)>()
            + self
                .options
                .iter()
                .map(|(name, value)| name.capacity() + value.capacity())
                .sum::<usize>()
    }
}

/// Bytes from the wire as text, invalid UTF-8 replaced, at most `max` bytes long (`max`
/// at least 3): when cut, the text ends with `…`.
pub(super) fn bounded_lossy(bytes: &[u8], max: usize) -> String {
    const CUT: &str = "…";
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    let (mut end, cut) = if bytes.len() <= max && text.len() <= max {
        (text.len(), false)
    } else {
        (max.saturating_sub(CUT.len()).min(text.len()), true)
    };
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + if cut { CUT.len() } else { 0 });
    out.push_str(&text[..end]);
    if cut {
        out.push_str(CUT);
    }
    out
}

/// The running sessions, their timers and their window memory.
pub(super) struct SessionTable {
    slab: Slab<SessionEntry>,
    next_generation: u32,
    wheel: TimerWheel<SessionId>,
    windows: WindowBudget,
}

impl SessionTable {
    /// An empty table whose timer wheel counts from `now`, with no window budget.
    #[cfg(test)]
    pub(super) fn new(now: Instant) -> SessionTable {
        SessionTable::with_window_memory(now, usize::MAX)
    }

    /// An empty table whose timer wheel counts from `now`, whose sessions' windows hold at
    /// most `window_memory` bytes together (see [`WindowBudget`]).
    pub(super) fn with_window_memory(now: Instant, window_memory: usize) -> SessionTable {
        SessionTable {
            slab: Slab::new(),
            next_generation: 0,
            wheel: TimerWheel::with_origin(now),
            windows: WindowBudget::new(window_memory),
        }
    }

    /// `limits` cut to the window memory left, for a session about to start.
    pub(super) fn window_limits(&self, limits: Limits) -> Limits {
        self.windows.limits(limits)
    }

    /// Window memory the running sessions hold.
    #[cfg(test)]
    pub(super) fn window_memory_reserved(&self) -> usize {
        self.windows.reserved()
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
        self.windows.reserve(entry.window_bytes);
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
        self.windows.release(entry.window_bytes);
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
    use crate::response::BytesSource;
    use crate::server::transport::ReplyPath;
    use crate::session::SessionConfig;
    use std::time::Duration;

    fn entry(id: SessionId, now: Instant, port: u16) -> SessionEntry {
        entry_with(id, now, port, Options::EMPTY, SessionConfig::default())
    }

    fn entry_with(
        id: SessionId,
        now: Instant,
        port: u16,
        options: Options<'_>,
        config: SessionConfig,
    ) -> SessionEntry {
        let session = Session::new(
            now,
            options,
            Mode::Octet,
            Box::new(BytesSource::new(b"x".to_vec())),
            config,
        );
        let peer: SocketAddr = ([127, 0, 0, 1], port).into();
        let transport = Transport::Shared(ReplyPath {
            listener: 0,
            source: None,
        });
        let request = RequestInfo::new(peer, peer, b"f", Mode::Octet, options, SystemTime::now());
        SessionEntry::new(id, transport, session, request)
    }

    /// The most heap bytes a session's [`RequestInfo`] may hold: 3 KiB.
    const STORED_REQUEST_MAX: usize = STORED_FILENAME_BYTES
        + STORED_OPTIONS * (std::mem::size_of::<(String, String)>() + 2 * STORED_OPTION_BYTES);
    const _: () = assert!(STORED_REQUEST_MAX == 3 * 1024);

    #[test]
    fn stored_request_is_bounded_whatever_was_sent() {
        let peer: SocketAddr = ([192, 0, 2, 1], 1000).into();
        let info = |filename: &[u8], options: &[u8]| {
            let options = Options::parse(options).expect("valid options");
            RequestInfo::new(
                peer,
                peer,
                filename,
                Mode::Octet,
                options,
                SystemTime::now(),
            )
        };
        // What F2 sent: 21,826 options `a\0\0` (65 KB), after `timeout 255`.
        let mut stuffed = b"timeout\x00255\x00".to_vec();
        for _ in 0..21_826 {
            stuffed.extend_from_slice(b"a\x00\x00");
        }
        let kept = info(b"f2k.bin", &stuffed);
        assert_eq!(kept.options.len(), STORED_OPTIONS);
        assert_eq!(kept.options[0], ("timeout".into(), "255".into()));
        assert!(
            kept.heap_bytes() <= STORED_REQUEST_MAX,
            "{}",
            kept.heap_bytes()
        );
        // Long names, values and filename, not UTF-8: each cut, with a mark.
        let long = vec![0xffu8; 60_000];
        let mut options = Vec::new();
        for _ in 0..100 {
            options.extend_from_slice(&long[..300]);
            options.push(0);
            options.extend_from_slice(&long[..300]);
            options.push(0);
        }
        let kept = info(&long, &options);
        assert!(kept.filename.len() <= STORED_FILENAME_BYTES);
        assert!(kept.filename.ends_with('…'));
        for (name, value) in &kept.options {
            assert!(name.len() <= STORED_OPTION_BYTES && value.len() <= STORED_OPTION_BYTES);
            assert!(name.starts_with('\u{fffd}') && value.ends_with('…'));
        }
        assert!(
            kept.heap_bytes() <= STORED_REQUEST_MAX,
            "{}",
            kept.heap_bytes()
        );
        // A normal request is kept as it was.
        let kept = info(
            b"pxelinux.cfg/01-aa-bb",
            b"tsize\x000\x00blksize\x001468\x00",
        );
        assert_eq!(kept.filename, "pxelinux.cfg/01-aa-bb");
        assert_eq!(
            kept.options,
            vec![
                ("tsize".to_string(), "0".to_string()),
                ("blksize".to_string(), "1468".to_string())
            ]
        );
    }

    #[test]
    fn bounded_lossy_cuts_at_character_boundaries() {
        assert_eq!(bounded_lossy(b"abc", 3), "abc");
        assert_eq!(bounded_lossy(b"abcd", 4), "abcd");
        assert_eq!(bounded_lossy(b"abcdef", 4), "a…");
        // A multi-byte character straddling the cut is dropped whole.
        let text = "ééééé".as_bytes();
        assert_eq!(bounded_lossy(text, 10), "ééééé");
        assert_eq!(bounded_lossy(text, 8), "éé…");
        // Invalid bytes that grow to 3-byte replacements still fit.
        let cut = bounded_lossy(&[0xff; 10], 10);
        assert!(cut.len() <= 10 && cut.ends_with('…'), "{cut:?}");
        assert_eq!(bounded_lossy(&[0xff; 3], 9), "\u{fffd}\u{fffd}\u{fffd}");
    }

    #[test]
    fn window_memory_is_reserved_while_a_session_runs() {
        let now = Instant::now();
        let mut table = SessionTable::with_window_memory(now, 10_000);
        let ask = Options::parse(b"blksize\x001468\x00windowsize\x0064\x00").unwrap();
        let config = |table: &SessionTable| SessionConfig {
            limits: table.window_limits(Limits::default()),
            ..SessionConfig::default()
        };
        let a = table.next_id();
        table.insert(a, entry_with(a, now, 1000, ask, config(&table)));
        assert_eq!(table.get_mut(a).unwrap().session.params().window, 6);
        assert_eq!(table.window_memory_reserved(), 6 * 1472);
        let b = table.next_id();
        table.insert(b, entry_with(b, now, 1001, ask, config(&table)));
        assert_eq!(table.get_mut(b).unwrap().session.params().window, 1);
        assert_eq!(table.window_memory_reserved(), 7 * 1472);
        table.remove(a);
        assert_eq!(table.window_memory_reserved(), 1472);
        assert!(table.remove(a).is_none());
        assert_eq!(table.window_memory_reserved(), 1472, "released once");
        table.remove(b);
        assert_eq!(table.window_memory_reserved(), 0);
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
