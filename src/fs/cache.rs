//! The [hot-file cache](crate::fs#hot-file-cache): whole files in memory, shared by the
//! sessions that send them, checked against the file's metadata on every open, and never
//! more bytes alive than the budget, counting the copies that running sessions still hold.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use log::debug;

use crate::response::{FileSource, ResponseData};

/// Files up to this size are read on the caller's thread (the event loop) when they miss:
/// from the page cache that is tens of microseconds, about what the session's first
/// window costs anyway. Larger ones are read by a background thread while the first
/// sessions are served from disk, so no miss stalls the loop for a whole large file.
pub(super) const SYNC_LOAD_MAX: u64 = 256 << 10;

/// At most this many background loads at once (per cache, shared by handler clones);
/// a miss beyond it is served from disk without starting one.
const MAX_BACKGROUND_LOADS: usize = 2;

/// Loads read at most the cache's budget per this period (the allowance refills evenly):
/// requests that make the cache drop one large file to load another — spoofed ones cost
/// nothing to send — cannot make it read file after file; beyond the allowance a miss is
/// served from disk, as without a cache.
const LOAD_REFILL: Duration = Duration::from_secs(60);

/// Names remembered for [`Cache::open_by_name`], at most: past it the record starts over
/// (a request can add one name only by opening a file the cache then holds).
const MAX_NAMES: usize = 1024;

/// Longer names are not remembered (they are opened as usual), so the names take at most
/// about `MAX_NAMES × MAX_NAME_LEN` bytes.
const MAX_NAME_LEN: usize = 255;

/// Counters of the [hot-file cache](crate::fs#hot-file-cache), from
/// [`FsHandler::cache_stats`](crate::FsHandler::cache_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Opens served from memory.
    pub hits: u64,
    /// Of those, requests served without opening the file at all: its name was opened
    /// before to a version the cache still holds, and a `stat` of the path found that
    /// version unchanged (see [`FsHandler::cache`](crate::FsHandler::cache)).
    pub hits_by_name: u64,
    /// Opens of a file not in the cache (or changed since it was loaded).
    pub misses: u64,
    /// Files read into the cache, and their bytes.
    pub loads: u64,
    /// Bytes read from disk into the cache.
    pub bytes_loaded: u64,
    /// Files dropped to make room.
    pub evictions: u64,
    /// Files served from disk because they are larger than the cache, or changed (or
    /// could not be read) while they were being loaded.
    pub uncached: u64,
    /// Opens served from disk because the copies that running sessions still hold (and
    /// loads in progress) leave no room for this file: loading it would exceed the budget.
    pub over_budget: u64,
    /// Opens served from disk while their file was being loaded by a background thread
    /// (or because the background loaders were all busy).
    pub loading: u64,
    /// Of those, sessions still running when their file's load ended, which then read
    /// on from memory.
    pub moved_to_memory: u64,
    /// Opens served from disk because loads had already read the cache's budget within
    /// the last minute (the load allowance refills by the budget per minute).
    pub load_limited: u64,
    /// Bytes of the files the cache holds now.
    pub bytes_held: u64,
    /// Bytes of every cached copy still in memory now: those the cache holds, those only
    /// running sessions hold (dropped from the cache, or an older version of a changed
    /// file), and loads in progress. Never more than the cache's budget.
    pub bytes_in_use: u64,
    /// The most [`bytes_in_use`](CacheStats::bytes_in_use) has been.
    pub peak_bytes_in_use: u64,
}

/// What identifies one version of a file: if any of these differ, the cached bytes are
/// stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The same from a `stat` of the path.
    fn of_stat(st: &libc::stat64) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// One version of a file in memory. It counts itself in the cache's bytes in use from
/// its creation until the last holder (the cache or a session) drops it, on whatever
/// thread that happens.
pub(super) struct Loaded {
    bytes: Box<[u8]>,
    in_use: Arc<AtomicU64>,
}

impl Loaded {
    /// Wraps `bytes`, counting them in `in_use`.
    fn new(bytes: Box<[u8]>, in_use: &Arc<AtomicU64>) -> Loaded {
        in_use.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Loaded {
            bytes,
            in_use: Arc::clone(in_use),
        }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.in_use
            .fetch_sub(self.bytes.len() as u64, Ordering::Relaxed);
    }
}

/// A session's copy of a cached file: shared bytes, read from the start.
pub(super) struct CachedSource {
    file: Arc<Loaded>,
    pos: usize,
}

impl ResponseData for CachedSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.file.bytes.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        let mut total = 0;
        for buf in bufs {
            let n = self.read(buf)?;
            total += n;
            if n < buf.len() {
                break;
            }
        }
        Ok(total)
    }

    fn size(&self) -> Option<u64> {
        Some(self.file.bytes.len() as u64)
    }
}

/// Where a background load puts the bytes once it is filed, for the sessions served
/// from disk meanwhile ([`LoadingSource`]).
type Landing = Arc<OnceLock<Arc<Loaded>>>;

/// A file version known to the cache.
enum Slot {
    /// In memory: the cache holds one reference, each session sending it another.
    Ready(Arc<Loaded>),
    /// Being read by a background thread; its bytes are reserved in `pending_bytes`.
    Loading(Landing),
}

/// What the cache has for a file just opened.
pub(super) enum Lookup {
    /// Its bytes, in memory.
    Memory(CachedSource),
    /// Nothing yet: a background thread is reading it. Served from disk until the load
    /// lands, then from memory.
    Loading(Landing),
    /// Nothing: served from disk.
    Disk,
}

impl Lookup {
    /// The session's source for `file` of `size` bytes.
    pub(super) fn source(self, file: File, size: u64) -> Box<dyn ResponseData> {
        match self {
            Lookup::Memory(source) => Box::new(source),
            Lookup::Loading(landing) => Box::new(LoadingSource {
                reading: Reading::Disk(FileSource::with_size(file, size)),
                pos: 0,
                size,
                landing,
            }),
            Lookup::Disk => Box::new(FileSource::with_size(file, size)),
        }
    }
}

/// A file served from disk while the cache loads it, and from memory, at the same
/// offset, from the first read after the load lands: the sessions of a boot storm that
/// asked before the kernel was in memory do not read it from disk to the end. (Same
/// version: the load is of the file's device, inode, size and times at this open.)
pub(super) struct LoadingSource {
    reading: Reading,
    /// Bytes read so far.
    pos: usize,
    size: u64,
    landing: Landing,
}

enum Reading {
    Disk(FileSource),
    Memory(CachedSource),
}

impl LoadingSource {
    /// Moves to memory once the load has landed (the file is closed then).
    fn reading(&mut self) -> &mut Reading {
        if let Reading::Disk(_) = self.reading {
            if let Some(loaded) = self.landing.get() {
                self.reading = Reading::Memory(CachedSource {
                    file: Arc::clone(loaded),
                    pos: self.pos,
                });
            }
        }
        &mut self.reading
    }
}

impl ResponseData for LoadingSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.reading() {
            Reading::Disk(file) => file.read(buf)?,
            Reading::Memory(memory) => memory.read(buf)?,
        };
        self.pos += n;
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        let n = match self.reading() {
            Reading::Disk(file) => file.read_vectored(bufs)?,
            Reading::Memory(memory) => memory.read_vectored(bufs)?,
        };
        self.pos += n;
        Ok(n)
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
}

struct Entry {
    stamp: Stamp,
    slot: Slot,
    last_used: u64,
}

/// What the lock protects.
struct State {
    entries: HashMap<(u64, u64), Entry>,
    /// The version each name (a path beneath the root) was last opened to, for
    /// [`Cache::open_by_name`]; at most [`MAX_NAMES`].
    names: HashMap<Box<[u8]>, Stamp>,
    /// Orders `last_used`.
    tick: u64,
    /// Bytes reserved by loads in progress (not yet counted in `in_use`).
    pending_bytes: u64,
    background_loads: usize,
    /// Bytes loads may still read now, and when it was last refilled.
    load_allowance: u64,
    allowance_at: Option<Instant>,
    stats: CacheStats,
}

impl State {
    /// The load allowance at `now`: refilled by `max` bytes per `period` since the last
    /// refill, never above `max` (full at first); no limit with a zero period.
    fn allowance(&mut self, max: u64, period: Duration, now: Instant) -> u64 {
        if period.is_zero() {
            return u64::MAX;
        }
        let since = self
            .allowance_at
            .map_or(period, |at| now.saturating_duration_since(at));
        let refill = u128::from(max) * since.as_nanos() / period.as_nanos();
        // A refill too small to count keeps its time, so that frequent calls lose nothing.
        if refill > 0 || self.allowance_at.is_none() {
            self.load_allowance = u128::from(self.load_allowance)
                .saturating_add(refill)
                .min(u128::from(max)) as u64;
            self.allowance_at = Some(now);
        }
        self.load_allowance
    }
}

/// What the handler's clones and the background loaders share.
struct Shared {
    max_bytes: u64,
    sync_load_max: u64,
    /// Loads read at most `max_bytes` per this period ([`LOAD_REFILL`]; zero: no limit).
    load_refill: Duration,
    /// Bytes of every [`Loaded`] alive, wherever it is held.
    in_use: Arc<AtomicU64>,
    state: Mutex<State>,
    /// Signalled when a background load ends.
    load_ended: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock point; a panic elsewhere while it
        // was held does not make it unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes alive or reserved now (a lower bound can only shrink outside the lock:
    /// sessions drop copies on any thread, but copies are made only under it).
    fn committed(&self, state: &State) -> u64 {
        self.in_use.load(Ordering::Relaxed) + state.pending_bytes
    }
}

/// Whole files by (device, inode), least recently used evicted first, within a budget
/// that counts every copy still alive. Cloning shares it.
#[derive(Clone)]
pub(super) struct Cache {
    shared: Arc<Shared>,
}

impl Cache {
    pub(super) fn new(max_bytes: u64) -> Cache {
        Cache::with_limits(max_bytes, SYNC_LOAD_MAX, LOAD_REFILL)
    }

    /// A cache that reads files up to `sync_load_max` bytes on the caller's thread and
    /// larger ones in the background, and loads at most `max_bytes` per `load_refill`
    /// (zero: no such limit, for the tests of the budget).
    fn with_limits(max_bytes: u64, sync_load_max: u64, load_refill: Duration) -> Cache {
        Cache {
            shared: Arc::new(Shared {
                max_bytes,
                sync_load_max,
                load_refill,
                in_use: Arc::new(AtomicU64::new(0)),
                state: Mutex::new(State {
                    entries: HashMap::new(),
                    names: HashMap::new(),
                    tick: 0,
                    pending_bytes: 0,
                    background_loads: 0,
                    load_allowance: 0,
                    allowance_at: None,
                    stats: CacheStats::default(),
                }),
                load_ended: Condvar::new(),
            }),
        }
    }

    /// Its counters so far.
    pub(super) fn stats(&self) -> CacheStats {
        let state = self.shared.lock();
        let mut stats = state.stats;
        stats.bytes_in_use = self.shared.committed(&state);
        stats
    }

    /// The bytes of the file at `path` (beneath the root, as the handler resolved it)
    /// without opening it: when that name was last opened ([`remember`](Self::remember))
    /// to a version the cache holds in memory, and `stat` — a `stat` of the path now,
    /// not following a final symbolic link, called without the lock held — finds that
    /// same version (device, inode, size and both times). `None` otherwise, without
    /// counting anything: the caller opens the file as usual.
    ///
    /// Safe whatever the path resolves through now: the same name leads to the very
    /// file version that the handler's checks let through when it was opened.
    pub(super) fn open_by_name(
        &self,
        path: &[u8],
        stat: impl FnOnce() -> io::Result<libc::stat64>,
    ) -> Option<CachedSource> {
        let known = *self.shared.lock().names.get(path)?;
        if Stamp::of_stat(&stat().ok()?) != known {
            return None;
        }
        let mut state = self.shared.lock();
        state.tick += 1;
        let tick = state.tick;
        let Some(entry) = state
            .entries
            .get_mut(&known.key())
            .filter(|entry| entry.stamp == known)
        else {
            // Dropped from the cache (or replaced): the name leads nowhere in memory, so
            // its next requests skip the stat.
            state.names.remove(path);
            return None;
        };
        let Slot::Ready(loaded) = &entry.slot else {
            return None;
        };
        let file = Arc::clone(loaded);
        entry.last_used = tick;
        state.stats.hits += 1;
        state.stats.hits_by_name += 1;
        Some(CachedSource { file, pos: 0 })
    }

    /// Records that `path` was just opened to the version `meta` describes, which
    /// [`open`](Self::open) served from memory or is loading, for
    /// [`open_by_name`](Self::open_by_name). Names longer than [`MAX_NAME_LEN`] are not
    /// kept; past [`MAX_NAMES`] the record starts over.
    pub(super) fn remember(&self, path: &[u8], meta: &Metadata) {
        if path.len() > MAX_NAME_LEN {
            return;
        }
        let stamp = Stamp::of(meta);
        let mut state = self.shared.lock();
        if let Some(known) = state.names.get_mut(path) {
            *known = stamp;
            return;
        }
        if state.names.len() >= MAX_NAMES {
            state.names.clear();
        }
        state.names.insert(path.into(), stamp);
    }

    /// The bytes of `file` (just opened, with metadata `meta`) when this version is in
    /// memory, or can be read now within the budget; `None` when the caller should serve
    /// it from disk: larger than the cache, no room left by the copies sessions hold,
    /// being loaded in the background (a load is started for a large file that fits),
    /// changed or unreadable while it was read.
    /// `now` (the request's time) refills the load allowance.
    pub(super) fn open(&self, file: &File, meta: &Metadata, now: Instant) -> Lookup {
        let shared = &self.shared;
        let stamp = Stamp::of(meta);
        let mut state = shared.lock();
        state.tick += 1;
        let tick = state.tick;
        if let Some(entry) = state.entries.get_mut(&stamp.key()) {
            if entry.stamp == stamp {
                entry.last_used = tick;
                match &entry.slot {
                    Slot::Ready(loaded) => {
                        let file = Arc::clone(loaded);
                        state.stats.hits += 1;
                        return Lookup::Memory(CachedSource { file, pos: 0 });
                    }
                    Slot::Loading(landing) => {
                        let landing = Arc::clone(landing);
                        state.stats.loading += 1;
                        return Lookup::Loading(landing);
                    }
                }
            }
            // An older version: sessions may still hold it (and it stays counted until
            // they drop it), but no new session gets it.
            remove(&mut state, stamp.key());
        }
        state.stats.misses += 1;
        if stamp.size > shared.max_bytes {
            state.stats.uncached += 1;
            return Lookup::Disk;
        }
        let background = stamp.size > shared.sync_load_max;
        if background && state.background_loads >= MAX_BACKGROUND_LOADS {
            state.stats.loading += 1;
            return Lookup::Disk;
        }
        let Some(evict) = self.room_for(&state, stamp.size) else {
            state.stats.over_budget += 1;
            return Lookup::Disk;
        };
        if state.allowance(shared.max_bytes, shared.load_refill, now) < stamp.size {
            state.stats.load_limited += 1;
            return Lookup::Disk;
        }
        for key in evict {
            remove(&mut state, key);
            state.stats.evictions += 1;
        }
        state.load_allowance = state.load_allowance.saturating_sub(stamp.size);
        // Reserve the bytes and mark the version as loading, so that neither another
        // load nor another version can take the room while the lock is released.
        state.pending_bytes += stamp.size;
        let committed = shared.committed(&state);
        state.stats.peak_bytes_in_use = state.stats.peak_bytes_in_use.max(committed);
        let landing = Landing::default();
        state.entries.insert(
            stamp.key(),
            Entry {
                stamp,
                slot: Slot::Loading(Arc::clone(&landing)),
                last_used: tick,
            },
        );
        if background {
            state.background_loads += 1;
            drop(state);
            self.spawn_load(file, stamp);
            return Lookup::Loading(landing);
        }
        drop(state);
        let bytes = read_whole(file, stamp);
        match self.finish_load(stamp, bytes, false) {
            Some(loaded) => Lookup::Memory(CachedSource {
                file: loaded,
                pos: 0,
            }),
            None => Lookup::Disk,
        }
    }

    /// The files to drop to make room for `size` more bytes within the budget: the least
    /// recently used that only the cache holds (dropping one a session holds would free
    /// nothing). `None` when that cannot be enough.
    fn room_for(&self, state: &State, size: u64) -> Option<Vec<(u64, u64)>> {
        let max = self.shared.max_bytes;
        let committed = self.shared.committed(state);
        if committed + size <= max {
            return Some(Vec::new());
        }
        // Copies are made only under the lock, so a count of 1 means the cache's
        // reference is the last one: dropping it frees the bytes at once.
        let mut freeable: Vec<(u64, (u64, u64), u64)> = state
            .entries
            .iter()
            .filter_map(|(&key, entry)| match &entry.slot {
                Slot::Ready(loaded) if Arc::strong_count(loaded) == 1 => {
                    Some((entry.last_used, key, entry.stamp.size))
                }
                _ => None,
            })
            .collect();
        let need = committed + size - max;
        if freeable.iter().map(|&(_, _, size)| size).sum::<u64>() < need {
            return None;
        }
        freeable.sort_unstable();
        let mut freed = 0;
        let mut evict = Vec::new();
        for (_, key, size) in freeable {
            if freed >= need {
                break;
            }
            evict.push(key);
            freed += size;
        }
        Some(evict)
    }

    /// Reads `file` on a new thread, then files it; the session that asked is served from
    /// disk meanwhile. If the thread cannot start, the reservation is given back.
    fn spawn_load(&self, file: &File, stamp: Stamp) {
        let cache = self.clone();
        let started = file.try_clone().and_then(|file| {
            thread::Builder::new()
                .name("dyntftp-cache".into())
                .spawn(move || {
                    let bytes = read_whole(&file, stamp);
                    cache.finish_load(stamp, bytes, true);
                })
        });
        if let Err(e) = started {
            debug!("cache: cannot start a background load: {e}");
            self.finish_load(stamp, None, true);
        }
    }

    /// Files the bytes a load read (`None`: it failed, or the file changed meanwhile) and
    /// gives back its reservation. The bytes are kept only if this version is still the
    /// one expected; returns them when kept.
    fn finish_load(
        &self,
        stamp: Stamp,
        bytes: Option<Box<[u8]>>,
        background: bool,
    ) -> Option<Arc<Loaded>> {
        let shared = &self.shared;
        let mut state = shared.lock();
        let expected = state
            .entries
            .get(&stamp.key())
            .is_some_and(|e| e.stamp == stamp && matches!(e.slot, Slot::Loading(_)));
        if let Some(bytes) = &bytes {
            state.stats.bytes_loaded += bytes.len() as u64;
        }
        let kept = match bytes {
            Some(bytes) if expected => {
                // The reservation becomes the copy's own count, under the lock: the total
                // never moves.
                let loaded = Arc::new(Loaded::new(bytes, &shared.in_use));
                state.pending_bytes -= stamp.size;
                state.stats.loads += 1;
                state.stats.bytes_held += stamp.size;
                if let Some(entry) = state.entries.get_mut(&stamp.key()) {
                    let slot = std::mem::replace(&mut entry.slot, Slot::Ready(Arc::clone(&loaded)));
                    // The sessions served from disk meanwhile read on from memory.
                    if let Slot::Loading(landing) = slot {
                        let _ = landing.set(Arc::clone(&loaded));
                        state.stats.moved_to_memory += Arc::strong_count(&landing) as u64 - 1;
                    }
                }
                Some(loaded)
            }
            bytes => {
                // Freed before the reservation is given back.
                drop(bytes);
                state.pending_bytes -= stamp.size;
                if expected {
                    state.entries.remove(&stamp.key());
                    state.stats.uncached += 1;
                }
                None
            }
        };
        if background {
            state.background_loads -= 1;
            shared.load_ended.notify_all();
        }
        kept
    }

    /// Waits until no background load is running (tests).
    #[cfg(test)]
    fn wait_for_loads(&self) {
        let mut state = self.shared.lock();
        while state.background_loads > 0 {
            state = self
                .shared
                .load_ended
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Drops the cache's entry for `key` (sessions keep their copies, still counted).
fn remove(state: &mut State, key: (u64, u64)) {
    if let Some(entry) = state.entries.remove(&key) {
        if let Slot::Ready(_) = entry.slot {
            state.stats.bytes_held -= entry.stamp.size;
        }
    }
}

/// The whole of `file`, which must still match `stamp` once read; `None` if it changed,
/// was shorter than its size said, or could not be read.
fn read_whole(file: &File, stamp: Stamp) -> Option<Box<[u8]>> {
    let mut data = vec![0u8; usize::try_from(stamp.size).ok()?];
    let mut filled = 0;
    // Positioned reads: the file's offset stays at 0 for the FileSource fallback.
    while filled < data.len() {
        match file.read_at(&mut data[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("cache: cannot read a file to cache: {e}");
                return None;
            }
        }
    }
    let unchanged = file.metadata().is_ok_and(|meta| Stamp::of(&meta) == stamp);
    (filled == data.len() && unchanged).then(|| data.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::{ok, request, serve, Tree, NOT_FOUND};
    use crate::fs::FsHandler;
    use crate::handler::{Handler, Notifier};

    use std::cell::Cell;
    use std::fs;

    thread_local! {
        /// The time of the tests' opens: each a whole [`LOAD_REFILL`] after the last, so
        /// that the load allowance never decides what the budget tests look at.
        static CLOCK: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    /// Opens `name` under the tree's root and asks `cache` for it, a [`LOAD_REFILL`]
    /// after the previous open.
    fn open(cache: &Cache, tree: &Tree, name: &str) -> (Option<CachedSource>, File) {
        let now = CLOCK.with(|clock| {
            let now = clock
                .get()
                .map_or_else(Instant::now, |last| last + LOAD_REFILL);
            clock.set(Some(now));
            now
        });
        open_at(cache, tree, name, now)
    }

    /// Opens `name` under the tree's root and asks `cache` for it at `now`.
    fn open_at(
        cache: &Cache,
        tree: &Tree,
        name: &str,
        now: Instant,
    ) -> (Option<CachedSource>, File) {
        let file = File::open(tree.root().join(name)).unwrap();
        let meta = file.metadata().unwrap();
        let lookup = cache.open(&file, &meta, now);
        let memory = match lookup {
            Lookup::Memory(source) => Some(source),
            Lookup::Loading(_) | Lookup::Disk => None,
        };
        (memory, file)
    }

    /// A handler on the tree with a cache of `budget` bytes whose loads the allowance
    /// does not limit: for the tests of the budget, which load more than it at once.
    fn cached_handler(tree: &Tree, budget: u64) -> FsHandler {
        let mut h = FsHandler::new(tree.root()).unwrap();
        h.cache = Some(Cache::with_limits(budget, SYNC_LOAD_MAX, Duration::ZERO));
        h
    }

    #[test]
    fn loads_read_at_most_the_budget_per_refill_period() {
        // Two files that do not fit together, asked for in turn: each load drops the
        // other. The budget's worth of loads goes at once; then a load waits for the
        // allowance to refill, and the misses meanwhile are served from disk.
        let tree = Tree::new();
        tree.file("a", &[1; 600]);
        tree.file("b", &[2; 600]);
        let cache = Cache::new(1000);
        let t0 = Instant::now();
        assert!(
            open_at(&cache, &tree, "a", t0).0.is_some(),
            "loaded: 400 left"
        );
        assert!(
            open_at(&cache, &tree, "b", t0).0.is_none(),
            "600 > 400: from disk"
        );
        assert!(
            open_at(&cache, &tree, "a", t0).0.is_some(),
            "a hit costs nothing"
        );
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.hits, stats.load_limited), (1, 1, 1));
        // 12 s refill a fifth of the budget: 600 in all, enough for b.
        let later = t0 + LOAD_REFILL / 5;
        assert!(open_at(&cache, &tree, "b", later).0.is_some());
        assert!(open_at(&cache, &tree, "a", later).0.is_none());
        let stats = cache.stats();
        assert_eq!(
            (stats.loads, stats.evictions, stats.load_limited),
            (2, 1, 2)
        );
        // Never more than the budget saved up: after an hour, one budget's worth.
        let hour = later + Duration::from_secs(3600);
        assert!(open_at(&cache, &tree, "a", hour).0.is_some());
        assert!(open_at(&cache, &tree, "b", hour).0.is_none());
        assert_eq!(cache.stats().loads, 3);
    }

    fn contents(source: &mut dyn ResponseData) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            match source.read(&mut buf).unwrap() {
                0 => return out,
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn cache_serves_shared_bytes_and_notices_changes() {
        let tree = Tree::new();
        tree.file("kernel", &[1; 3000]);
        tree.file("initrd", &[2; 5000]);
        tree.file("huge", &[3; 20_000]);
        let mut h = cached_handler(&tree, 10_000);
        assert_eq!(h.cache_stats(), CacheStats::default());
        for _ in 0..3 {
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"kernel"), Ok(vec![1; 3000]));
        }
        let stats = h.cache_stats();
        assert_eq!((stats.misses, stats.hits, stats.loads), (1, 2, 1));
        assert_eq!(stats.bytes_held, 3000);
        assert_eq!(stats.bytes_in_use, 3000);
        // Sizes are answered from the cached bytes too.
        let notifier = Notifier::detached();
        let source = h
            .open(&request("192.0.2.1:1", b"kernel", &notifier))
            .unwrap();
        assert_eq!(source.size(), Some(3000));
        drop(source);

        // Larger than the cache: served from disk, never held.
        assert_eq!(serve(&mut h, "192.0.2.1:1", b"huge"), Ok(vec![3; 20_000]));
        assert_eq!(h.cache_stats().uncached, 1);

        // Rewritten in place (same size, same inode): reloaded.
        fs::write(tree.root().join("kernel"), [9; 3000]).unwrap();
        let bump = fs::File::options()
            .write(true)
            .open(tree.root().join("kernel"))
            .unwrap();
        // Make sure the stamp moves even on a coarse-grained clock.
        bump.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(12345))
            .unwrap();
        assert_eq!(serve(&mut h, "192.0.2.1:1", b"kernel"), Ok(vec![9; 3000]));
        // Replaced by another file (new inode).
        fs::write(tree.root().join("kernel.new"), [7; 100]).unwrap();
        fs::rename(tree.root().join("kernel.new"), tree.root().join("kernel")).unwrap();
        assert_eq!(serve(&mut h, "192.0.2.1:1", b"kernel"), Ok(vec![7; 100]));

        // Room is made by dropping the least recently used file.
        tree.file("a", &[4; 4000]);
        tree.file("b", &[5; 4000]);
        for name in [&b"initrd"[..], b"a", b"initrd", b"b"] {
            serve(&mut h, "192.0.2.1:1", name).unwrap();
        }
        let stats = h.cache_stats();
        assert!(stats.bytes_held <= 10_000, "{stats:?}");
        assert!(stats.peak_bytes_in_use <= 10_000, "{stats:?}");
        assert!(stats.evictions >= 1, "{stats:?}");
        let hits = stats.hits;
        serve(&mut h, "192.0.2.1:1", b"initrd").unwrap();
        assert_eq!(
            h.cache_stats().hits,
            hits + 1,
            "initrd was used recently: kept"
        );
        serve(&mut h, "192.0.2.1:1", b"a").unwrap();
        assert_eq!(h.cache_stats().hits, hits + 1, "a was the oldest: evicted");
    }

    /// The review's F3 scenario, scaled down: a 64 KiB budget, two 40 KiB files, requests
    /// alternating between them while every session stays alive. The copies alive stay
    /// within the budget, every request gets the right bytes, and a copy a session holds
    /// is shared by the next request for that file.
    #[test]
    fn copies_held_by_sessions_count_against_the_budget() {
        const BUDGET: u64 = 64 << 10;
        let tree = Tree::new();
        let a: Vec<u8> = (0..40 << 10).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..40 << 10).map(|i| (i % 241) as u8).collect();
        tree.file("a", &a);
        tree.file("b", &b);
        let mut h = cached_handler(&tree, BUDGET);
        let notifier = Notifier::detached();
        let mut sessions = Vec::new();
        for round in 0..10 {
            let (name, want) = if round % 2 == 0 { ("a", &a) } else { ("b", &b) };
            let mut source = h
                .open(&request("192.0.2.1:1", name.as_bytes(), &notifier))
                .unwrap();
            assert_eq!(&contents(&mut source), want, "request {round} for {name}");
            sessions.push(source);
            let stats = h.cache_stats();
            assert!(stats.bytes_in_use <= BUDGET, "{stats:?}");
        }
        let stats = h.cache_stats();
        assert_eq!(stats.loads, 1, "{stats:?}");
        assert_eq!(stats.hits, 4, "a, shared by its sessions: {stats:?}");
        assert_eq!(stats.over_budget, 5, "b, served from disk: {stats:?}");
        assert_eq!(stats.bytes_in_use, 40 << 10);
        assert!(stats.peak_bytes_in_use <= BUDGET, "{stats:?}");

        // Once the sessions end, a's copy is freed to make room for b.
        sessions.clear();
        assert_eq!(serve(&mut h, "192.0.2.1:1", b"b"), Ok(b.clone()));
        let stats = h.cache_stats();
        assert_eq!((stats.loads, stats.evictions), (2, 1), "{stats:?}");
        assert_eq!(stats.bytes_in_use, 40 << 10);
        assert!(stats.peak_bytes_in_use <= BUDGET, "{stats:?}");
    }

    #[test]
    fn a_copy_alive_in_a_session_is_reused_not_loaded_again() {
        let tree = Tree::new();
        tree.file("a", &[1; 3000]);
        tree.file("b", &[2; 3000]);
        let cache = Cache::new(5000);
        let (first, _) = open(&cache, &tree, "a");
        let first = first.expect("a fits");
        // b would need a's room, but a session holds a: b is served from disk and a is
        // kept, so the next request for a shares the same copy.
        assert!(open(&cache, &tree, "b").0.is_none());
        let (again, _) = open(&cache, &tree, "a");
        assert!(Arc::ptr_eq(&first.file, &again.expect("a is held").file));
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.hits, stats.over_budget), (1, 1, 1));

        // A new version of a: the old copy stays counted while its session lives, so the
        // new one does not fit beside it yet.
        let path = tree.root().join("a");
        fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(777))
            .unwrap();
        assert!(open(&cache, &tree, "a").0.is_none());
        assert_eq!(cache.stats().bytes_in_use, 3000);
        assert_eq!(cache.stats().bytes_held, 0, "the old version is not served");
        drop(first);
        assert_eq!(cache.stats().bytes_in_use, 0, "freed by its last session");
        let (new, _) = open(&cache, &tree, "a");
        assert_eq!(contents(&mut new.expect("room now")), vec![1; 3000]);
    }

    #[test]
    fn large_files_are_loaded_in_the_background() {
        let tree = Tree::new();
        let big: Vec<u8> = (0..50_000).map(|i| (i % 253) as u8).collect();
        tree.file("big", &big);
        tree.file("small", &[7; 100]);
        let cache = Cache::with_limits(100_000, 1000, LOAD_REFILL);

        // The first request is served from disk while the file loads.
        let (none, file) = open(&cache, &tree, "big");
        assert!(none.is_none());
        let mut from_disk = crate::response::FileSource::new(file).unwrap();
        assert_eq!(contents(&mut from_disk), big);
        cache.wait_for_loads();
        let (hit, _) = open(&cache, &tree, "big");
        assert_eq!(contents(&mut hit.expect("loaded")), big);
        let stats = cache.stats();
        assert_eq!((stats.loads, stats.hits, stats.misses), (1, 1, 1));
        assert_eq!(stats.bytes_in_use, 50_000);

        // Small files are loaded at once.
        let (small, _) = open(&cache, &tree, "small");
        assert_eq!(contents(&mut small.expect("sync")), vec![7; 100]);

        // A file rewritten while (or after) it loads is never served stale.
        tree.file("moving", &big);
        let (none, _) = open(&cache, &tree, "moving");
        assert!(none.is_none());
        let changed: Vec<u8> = big.iter().map(|b| b ^ 0xff).collect();
        fs::write(tree.root().join("moving"), &changed).unwrap();
        fs::File::options()
            .write(true)
            .open(tree.root().join("moving"))
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(999))
            .unwrap();
        cache.wait_for_loads();
        for _ in 0..2 {
            let (source, file) = open(&cache, &tree, "moving");
            let got = match source {
                Some(mut source) => contents(&mut source),
                None => contents(&mut crate::response::FileSource::new(file).unwrap()),
            };
            assert_eq!(got, changed);
            cache.wait_for_loads();
        }
        let stats = cache.stats();
        assert!(stats.peak_bytes_in_use <= 100_000, "{stats:?}");
    }

    #[test]
    fn sessions_served_from_disk_while_a_file_loads_read_on_from_memory() {
        let tree = Tree::new();
        let big: Vec<u8> = (0..50_000).map(|i| (i % 251) as u8).collect();
        tree.file("big", &big);
        let cache = Cache::with_limits(100_000, 1000, LOAD_REFILL);
        let file = File::open(tree.root().join("big")).unwrap();
        let meta = file.metadata().unwrap();
        let lookup = cache.open(&file, &meta, Instant::now());
        assert!(matches!(lookup, Lookup::Loading(_)));
        let mut source = lookup.source(file, meta.len());
        assert_eq!(source.size(), Some(50_000));
        // From disk, or from memory if the load was that quick: the same bytes.
        let mut got = vec![0u8; 10_000];
        let mut filled = 0;
        while filled < got.len() {
            filled += source.read(&mut got[filled..]).unwrap();
        }
        cache.wait_for_loads();
        assert_eq!(cache.stats().moved_to_memory, 1);
        // The file changes on disk (same inode): a read from disk would see zeros now.
        fs::write(tree.root().join("big"), vec![0u8; 50_000]).unwrap();
        // From memory, a window's blocks in one call, then the rest.
        let (mut a, mut b, mut c) = ([0u8; 1000], [0u8; 1000], [0u8; 1000]);
        let mut window = [
            io::IoSliceMut::new(&mut a),
            io::IoSliceMut::new(&mut b),
            io::IoSliceMut::new(&mut c),
        ];
        assert_eq!(source.read_vectored(&mut window).unwrap(), 3000);
        got.extend_from_slice(&a);
        got.extend_from_slice(&b);
        got.extend_from_slice(&c);
        got.extend(contents(&mut *source));
        assert!(got == big, "the bytes of the version opened");
    }

    #[test]
    fn background_loads_are_bounded_and_reserve_their_bytes() {
        let tree = Tree::new();
        for name in ["f0", "f1", "f2", "f3"] {
            tree.file(name, &[5; 30_000]);
        }
        let cache = Cache::with_limits(70_000, 1000, LOAD_REFILL);
        // Nothing waits between these: whether a load has ended yet or not, the budget
        // (two files, with the reservations of loads in flight) and the number of loaders
        // hold.
        let mut files = Vec::new();
        for name in ["f0", "f1", "f2", "f3"] {
            let (source, file) = open(&cache, &tree, name);
            assert!(source.is_none(), "large: loaded in the background");
            files.push(file);
            assert!(cache.stats().bytes_in_use <= 70_000);
        }
        cache.wait_for_loads();
        let stats = cache.stats();
        // Each miss either started a load or was served from disk (loaders busy, or no
        // room beside the loads in flight); at most two files fit.
        assert!(stats.loads >= 2, "{stats:?}");
        assert_eq!(
            stats.loads + stats.loading + stats.over_budget,
            4,
            "{stats:?}"
        );
        assert_eq!(stats.bytes_in_use, 60_000);
        assert!(stats.peak_bytes_in_use <= 70_000, "{stats:?}");
    }

    #[test]
    fn clones_share_one_cache() {
        let tree = Tree::new();
        tree.file("kernel", &[1; 3000]);
        let mut h = FsHandler::new(tree.root()).unwrap().cache(10_000);
        let mut other = h.clone();
        serve(&mut h, "192.0.2.1:1", b"kernel").unwrap();
        serve(&mut other, "192.0.2.1:1", b"kernel").unwrap();
        let stats = other.cache_stats();
        assert_eq!((stats.loads, stats.hits), (1, 1));
        assert_eq!(stats.bytes_in_use, 3000);
    }

    #[test]
    fn a_name_served_before_is_served_again_without_opening_until_its_file_changes() {
        let tree = Tree::new();
        for h in tree.handlers() {
            tree.file("boot/kernel", &[1; 3000]);
            let mut h = h.cache(10_000);
            for _ in 0..3 {
                assert_eq!(serve(&mut h, "192.0.2.1:1", b"boot/kernel"), ok(&[1; 3000]));
            }
            // Another spelling of the same path is the same name.
            assert_eq!(
                serve(&mut h, "192.0.2.1:1", b"\\boot\\kernel"),
                ok(&[1; 3000])
            );
            let stats = h.cache_stats();
            assert_eq!(
                (stats.misses, stats.hits, stats.hits_by_name),
                (1, 3, 3),
                "{h:?}"
            );
            // Replaced by another file: opened again, and the new version remembered.
            fs::write(tree.root().join("boot/kernel.new"), [7; 100]).unwrap();
            fs::rename(
                tree.root().join("boot/kernel.new"),
                tree.root().join("boot/kernel"),
            )
            .unwrap();
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"boot/kernel"), ok(&[7; 100]));
            assert_eq!(h.cache_stats().hits_by_name, 3);
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"boot/kernel"), ok(&[7; 100]));
            assert_eq!(h.cache_stats().hits_by_name, 4);
            // Rewritten in place (same inode, same size, new time): opened again.
            fs::write(tree.root().join("boot/kernel"), [8; 100]).unwrap();
            fs::File::options()
                .write(true)
                .open(tree.root().join("boot/kernel"))
                .unwrap()
                .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1))
                .unwrap();
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"boot/kernel"), ok(&[8; 100]));
            assert_eq!(h.cache_stats().hits_by_name, 4);
            // Gone: refused as without a cache.
            fs::remove_file(tree.root().join("boot/kernel")).unwrap();
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"boot/kernel"), NOT_FOUND);
        }
    }

    #[test]
    fn a_remembered_name_that_now_leads_outside_the_root_is_refused() {
        let tree = Tree::new();
        for h in tree.handlers() {
            // As long as the outside file, so that only the path tells them apart.
            tree.file("dir/secret", b"INSIDE!");
            let mut h = h.cache(10_000);
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"dir/secret"), ok(b"INSIDE!"));
            // `dir` becomes a link to a directory outside, with a `secret` of its own.
            fs::remove_dir_all(tree.root().join("dir")).unwrap();
            std::os::unix::fs::symlink(tree.outside().join("dir"), tree.root().join("dir"))
                .unwrap();
            let served = serve(&mut h, "192.0.2.1:1", b"dir/secret");
            assert!(served.is_err(), "{h:?}: {served:?}");
            assert_eq!(h.cache_stats().hits_by_name, 0);
            fs::remove_file(tree.root().join("dir")).unwrap();
        }
    }

    #[test]
    fn per_client_roots_open_every_request() {
        // A client's own file must win from the moment it appears, so with per-client
        // roots a name is never served from what it led to before.
        let tree = Tree::new();
        tree.file("grub.cfg", b"shared");
        let mut h = FsHandler::new(tree.root())
            .unwrap()
            .unique_root(true)
            .cache(10_000);
        assert_eq!(serve(&mut h, "192.0.2.9:1", b"grub.cfg"), ok(b"shared"));
        assert_eq!(serve(&mut h, "192.0.2.9:1", b"grub.cfg"), ok(b"shared"));
        tree.file("192.0.2.9/grub.cfg", b"own");
        assert_eq!(serve(&mut h, "192.0.2.9:1", b"grub.cfg"), ok(b"own"));
        let stats = h.cache_stats();
        assert_eq!((stats.hits, stats.hits_by_name), (1, 0));
    }

    #[test]
    fn a_name_whose_file_left_the_cache_is_forgotten() {
        let tree = Tree::new();
        tree.file("a", &[1; 600]);
        tree.file("b", &[2; 600]);
        let mut h = cached_handler(&tree, 1000);
        let remembers = |h: &FsHandler, name: &[u8]| {
            h.cache
                .as_ref()
                .unwrap()
                .shared
                .lock()
                .names
                .contains_key(name)
        };
        serve(&mut h, "192.0.2.1:1", b"a").unwrap();
        assert!(remembers(&h, b"a"));
        // A session sending b holds its copy; loading b dropped a.
        let notifier = Notifier::detached();
        let held = h.open(&request("192.0.2.1:1", b"b", &notifier)).unwrap();
        // a's stat still matches, but nothing is in memory for it: the name is forgotten,
        // and a is served from disk (b's copy leaves no room), so it is not remembered.
        assert_eq!(serve(&mut h, "192.0.2.1:1", b"a"), ok(&[1; 600]));
        assert!(!remembers(&h, b"a"), "{:?}", h.cache_stats());
        assert_eq!(h.cache_stats().over_budget, 1);
        assert_eq!(h.cache_stats().hits_by_name, 0);
        drop(held);
    }

    #[test]
    fn remembered_names_are_bounded() {
        let tree = Tree::new();
        tree.file("f", b"x");
        let meta = fs::metadata(tree.root().join("f")).unwrap();
        let cache = Cache::new(1000);
        for i in 0..MAX_NAMES + 10 {
            cache.remember(format!("name{i}").as_bytes(), &meta);
            assert!(cache.shared.lock().names.len() <= MAX_NAMES);
        }
        assert!(cache.shared.lock().names.contains_key(&b"name1033"[..]));
        let long = vec![b'a'; MAX_NAME_LEN + 1];
        cache.remember(&long, &meta);
        assert!(!cache.shared.lock().names.contains_key(&long[..]));
        cache.remember(&long[..MAX_NAME_LEN], &meta);
        assert!(cache
            .shared
            .lock()
            .names
            .contains_key(&long[..MAX_NAME_LEN]));
    }
}
