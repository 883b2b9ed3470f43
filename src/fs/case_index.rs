//! The index behind [case-insensitive lookup](crate::fs#case-insensitive-lookup): per
//! directory, its names grouped by ASCII case, built by listing the directory once and
//! reused while the directory is unchanged, so a name that misses costs a hash lookup and
//! a `stat` rather than a listing.
//!
//! - **Freshness.** An index is keyed by the directory's device and inode and stamped
//!   with its modification and change times (nanoseconds): adding, removing or renaming
//!   an entry moves both, and the next lookup lists the directory again. Two changes can
//!   share one timestamp tick (the kernel's coarse clock, or whole seconds on some file
//!   systems), so an index built less than [`SETTLE_FINE`] after the directory's last
//!   change ([`SETTLE_COARSE`] when its timestamps are whole seconds) is *unsettled*: what
//!   it finds is used, but a name it does not find is looked for again by listing the
//!   directory. A file created in the same tick as an earlier change is therefore found.
//! - **Every answer is checked.** A name found in the index is used only if it still
//!   exists and is not a symbolic link (`fstatat` without following), so a file removed
//!   since the listing is never served, whatever the timestamps say.
//! - **Bounded memory.** The indexes together take at most [`MAX_BYTES`] (estimated as
//!   each name's length plus [`NAME_OVERHEAD`]) and [`MAX_DIRS`] directories; the least
//!   recently used directory is dropped to make room. A directory whose index alone would
//!   exceed [`DIR_MAX_BYTES`] is not indexed: in it, only exact names are found (a warning
//!   says so, once per change of that directory).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use log::warn;

use crate::sys;

/// An index built less than this after its directory last changed is unsettled, when the
/// directory's timestamps have a fraction of a second (a file system with fine
/// timestamps): it covers the kernel's coarse clock tick (at most 10 ms) and timestamp
/// granularities as coarse as exFAT's 10 ms.
pub(super) const SETTLE_FINE: Duration = Duration::from_millis(50);

/// The same for timestamps in whole seconds (ext3 or FAT's 2 s granularity, or a
/// fine-grained one that happened to land on a whole second).
pub(super) const SETTLE_COARSE: Duration = Duration::from_millis(2100);

/// The memory the indexes may take together (estimated).
pub(super) const MAX_BYTES: usize = 32 << 20;

/// The memory one directory's index may take (estimated): about 80,000 names of 20 bytes.
pub(super) const DIR_MAX_BYTES: usize = 8 << 20;

/// The most directories indexed at once.
pub(super) const MAX_DIRS: usize = 1024;

/// Estimated bytes per indexed name beyond the name itself (the table slot, the boxed
/// name's allocation).
pub(super) const NAME_OVERHEAD: usize = 80;

/// Estimated bytes of an index without its names.
const DIR_OVERHEAD: usize = 256;

/// A name compared and hashed ignoring ASCII case.
#[derive(Clone, Debug)]
struct Folded(Box<[u8]>);

impl PartialEq for Folded {
    fn eq(&self, other: &Folded) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl Eq for Folded {}

impl Hash for Folded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut lower = [0u8; 64];
        for chunk in self.0.chunks(lower.len()) {
            let lower = &mut lower[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            state.write(lower);
        }
        state.write_usize(self.0.len());
    }
}

/// What says a directory is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirStamp {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl DirStamp {
    fn of(st: &libc::stat64) -> DirStamp {
        DirStamp {
            dev: st.st_dev,
            ino: st.st_ino,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Whether either timestamp has a fraction of a second.
    fn fine(&self) -> bool {
        self.mtime.1 != 0 || self.ctime.1 != 0
    }

    /// The directory's last change, as a time.
    fn changed(&self) -> SystemTime {
        let at = |(secs, nanos): (i64, i64)| {
            let since_epoch =
                Duration::new(secs.unsigned_abs(), nanos.clamp(0, 999_999_999) as u32);
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + since_epoch
            } else {
                SystemTime::UNIX_EPOCH - since_epoch
            }
        };
        at(self.mtime).max(at(self.ctime))
    }
}

/// Whether an index of a directory stamped `stamp`, built at `built`, is complete for
/// good: any later change then moves the directory's timestamps.
fn settled(stamp: &DirStamp, built: SystemTime) -> bool {
    let margin = if stamp.fine() {
        SETTLE_FINE
    } else {
        SETTLE_COARSE
    };
    built
        .duration_since(stamp.changed())
        .is_ok_and(|since| since >= margin)
}

/// One directory's names.
struct DirIndex {
    stamp: DirStamp,
    /// Whether a name it lacks is missing (else the directory is listed again).
    settled: bool,
    /// Each group of names equal ignoring case: the smallest, and the others in order.
    /// `None`: too many names to index (exact names only).
    names: Option<HashMap<Folded, Vec<Box<[u8]>>>>,
    bytes: usize,
    last_used: u64,
}

impl DirIndex {
    /// The names that match `name` ignoring case, smallest first.
    fn candidates(&self, name: &[u8]) -> Vec<Box<[u8]>> {
        let Some(names) = &self.names else {
            return Vec::new();
        };
        match names.get_key_value(&Folded(name.into())) {
            Some((first, others)) => std::iter::once(&first.0).chain(others).cloned().collect(),
            None => Vec::new(),
        }
    }
}

/// What the lock protects.
struct Indexes {
    dirs: HashMap<(u64, u64), DirIndex>,
    bytes: usize,
    tick: u64,
    /// Directories listed so far.
    listings: u64,
}

/// The indexes of the directories looked up so far; cloning shares them.
#[derive(Clone)]
pub(super) struct CaseIndex {
    inner: Arc<Mutex<Indexes>>,
    /// The wall clock (tests move it).
    clock: fn() -> SystemTime,
}

impl std::fmt::Debug for CaseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseIndex").finish_non_exhaustive()
    }
}

impl CaseIndex {
    pub(super) fn new() -> CaseIndex {
        CaseIndex {
            inner: Arc::new(Mutex::new(Indexes {
                dirs: HashMap::new(),
                bytes: 0,
                tick: 0,
                listings: 0,
            })),
            clock: SystemTime::now,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Indexes> {
        // Consistent at every unlock point.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of directory `dir` (opened `O_RDONLY | O_DIRECTORY`) whose name equals
    /// `name` ignoring ASCII case and that is not a symbolic link; the bytewise smallest
    /// if several match. Lists the directory only when its index is missing or stale.
    pub(super) fn find(&self, dir: &OwnedFd, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let stamp = DirStamp::of(&sys::lstat_at(dir.as_fd(), b".")?);
        let now = (self.clock)();
        {
            let mut indexes = self.lock();
            indexes.tick += 1;
            let tick = indexes.tick;
            if let Some(index) = indexes.dirs.get_mut(&stamp.key()) {
                if index.stamp == stamp {
                    index.last_used = tick;
                    let candidates = index.candidates(name);
                    let trusted_miss = index.settled || index.names.is_none();
                    drop(indexes);
                    if let Some(found) = first_usable(dir, candidates) {
                        return Ok(Some(found));
                    }
                    if trusted_miss {
                        return Ok(None);
                    }
                }
            }
        }
        let index = list(dir, stamp, now)?;
        let candidates = index.candidates(name);
        self.insert(index);
        Ok(first_usable(dir, candidates))
    }

    /// Files a new index, dropping the least recently used ones to stay within bounds.
    fn insert(&self, mut index: DirIndex) {
        let mut indexes = self.lock();
        indexes.listings += 1;
        indexes.tick += 1;
        index.last_used = indexes.tick;
        if let Some(old) = indexes.dirs.remove(&index.stamp.key()) {
            indexes.bytes -= old.bytes;
        }
        while indexes.bytes + index.bytes > MAX_BYTES || indexes.dirs.len() >= MAX_DIRS {
            let Some(oldest) = indexes
                .dirs
                .iter()
                .min_by_key(|(_, d)| d.last_used)
                .map(|(&key, _)| key)
            else {
                break;
            };
            if let Some(old) = indexes.dirs.remove(&oldest) {
                indexes.bytes -= old.bytes;
            }
        }
        indexes.bytes += index.bytes;
        indexes.dirs.insert(index.stamp.key(), index);
    }

    /// Directories listed so far, and the estimated bytes the indexes take now (tests).
    #[cfg(test)]
    fn usage(&self) -> (u64, usize, usize) {
        let indexes = self.lock();
        (indexes.listings, indexes.bytes, indexes.dirs.len())
    }
}

/// The first of `candidates` that still exists in `dir` and is not a symbolic link.
fn first_usable(dir: &OwnedFd, candidates: Vec<Box<[u8]>>) -> Option<Vec<u8>> {
    candidates.into_iter().find_map(|name| {
        let st = sys::lstat_at(dir.as_fd(), &name).ok()?;
        (st.st_mode & libc::S_IFMT != libc::S_IFLNK).then(|| name.into_vec())
    })
}

/// Lists `dir` into a new index stamped `stamp` (taken before the listing, so a change
/// during it makes the index stale at once).
fn list(dir: &OwnedFd, stamp: DirStamp, now: SystemTime) -> io::Result<DirIndex> {
    let mut names: HashMap<Folded, Vec<Box<[u8]>>> = HashMap::new();
    let mut bytes = DIR_OVERHEAD;
    let mut too_large = false;
    // Listing consumes a descriptor; `dir` stays open for the checks of candidates.
    sys::for_each_entry(dir.try_clone()?, |_, entry, d_type| {
        // Links are never matched by case; a DT_UNKNOWN entry is checked when found.
        if too_large || entry == b"." || entry == b".." || d_type == libc::DT_LNK {
            return;
        }
        bytes += entry.len() + NAME_OVERHEAD;
        if bytes > DIR_MAX_BYTES {
            too_large = true;
            names = HashMap::new();
            return;
        }
        let entry = Folded(entry.into());
        match names.remove_entry(&entry) {
            None => {
                names.insert(entry, Vec::new());
            }
            // Another name equal ignoring case (rare): the smaller one is the key.
            Some((first, mut others)) => {
                let (smallest, other) = if entry.0 < first.0 {
                    (entry, first)
                } else {
                    (first, entry)
                };
                others.push(other.0);
                names.insert(smallest, others);
            }
        }
    })?;
    if too_large {
        warn!(
            "ignore-case: a directory has too many names to index (over {} MiB): only exact \
             names are found in it",
            DIR_MAX_BYTES >> 20
        );
        bytes = DIR_OVERHEAD;
    }
    for others in names.values_mut() {
        others.sort_unstable();
    }
    Ok(DirIndex {
        stamp,
        settled: settled(&stamp, now),
        names: (!too_large).then_some(names),
        bytes,
        last_used: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::Tree;

    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    /// A clock an hour ahead: every directory looks settled.
    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    fn open_dir(path: &Path) -> OwnedFd {
        fs::File::open(path).unwrap().into()
    }

    fn find(index: &CaseIndex, path: &Path, name: &[u8]) -> Option<Vec<u8>> {
        index.find(&open_dir(path), name).unwrap()
    }

    #[test]
    fn folded_names_hash_and_compare_ignoring_case() {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let long_upper = vec![b'A'; 200];
        let long_lower = vec![b'a'; 200];
        for (a, b) in [
            (&b"BOOT"[..], &b"boot"[..]),
            (&long_upper, &long_lower),
            (b"\xff\xfeX", b"\xff\xfex"),
        ] {
            let (a, b) = (Folded(a.into()), Folded(b.into()));
            assert_eq!(a, b);
            assert_eq!(state.hash_one(&a), state.hash_one(&b));
        }
        assert_ne!(Folded(b"boot"[..].into()), Folded(b"boots"[..].into()));
        // Only ASCII folds.
        assert_ne!(
            Folded(b"\xc3\xa9"[..].into()),
            Folded(b"\xc3\x89"[..].into())
        );
    }

    #[test]
    fn settling() {
        let stamp = |secs: i64, nanos: i64| DirStamp {
            dev: 1,
            ino: 2,
            mtime: (secs - 10, 0),
            ctime: (secs, nanos),
        };
        let at = |secs: u64, millis: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        // Fine timestamps: 50 ms after the last change (the ctime here).
        let fine = stamp(1_000_000, 500_000_000);
        assert!(!settled(&fine, at(1_000_000, 500)));
        assert!(!settled(&fine, at(1_000_000, 549)));
        assert!(settled(&fine, at(1_000_000, 550)));
        // Whole seconds: 2.1 s.
        let coarse = stamp(1_000_000, 0);
        assert!(!settled(&coarse, at(1_000_002, 0)));
        assert!(settled(&coarse, at(1_000_002, 100)));
        // A change time in the future (a clock set back, a skewed file server).
        assert!(!settled(&fine, at(999_000, 0)));
    }

    #[test]
    fn misses_list_a_settled_directory_once() {
        let tree = Tree::new();
        for i in 0..500 {
            tree.file(&format!("pxelinux.cfg/01-aa-bb-cc-dd-{i:04x}"), b"x");
        }
        tree.file("pxelinux.cfg/Default", b"d");
        let dir = tree.root().join("pxelinux.cfg");
        let index = CaseIndex {
            clock: later,
            ..CaseIndex::new()
        };
        for i in 0..1000 {
            assert_eq!(find(&index, &dir, format!("01-FF-{i}").as_bytes()), None);
        }
        assert_eq!(find(&index, &dir, b"DEFAULT"), Some(b"Default".to_vec()));
        assert_eq!(
            find(&index, &dir, b"01-AA-BB-CC-DD-01F3"),
            Some(b"01-aa-bb-cc-dd-01f3".to_vec())
        );
        let (listings, bytes, dirs) = index.usage();
        assert_eq!((listings, dirs), (1, 1));
        assert!(bytes > 501 * NAME_OVERHEAD && bytes < 501 * (NAME_OVERHEAD + 64));

        // A change is seen at the next lookup.
        tree.file("pxelinux.cfg/01-FF-7", b"new");
        assert_eq!(find(&index, &dir, b"01-ff-7"), Some(b"01-FF-7".to_vec()));
        fs::remove_file(dir.join("Default")).unwrap();
        assert_eq!(find(&index, &dir, b"default"), None);
        assert_eq!(index.usage().0, 3);
    }

    /// Makes the index of `dir` look current, as if the changes since it was built had
    /// happened within the same timestamp tick as the change before them.
    fn pretend_same_tick(index: &CaseIndex, dir: &Path) {
        let stamp = DirStamp::of(&sys::lstat_at(open_dir(dir).as_fd(), b".").unwrap());
        let mut indexes = index.lock();
        indexes.dirs.get_mut(&stamp.key()).unwrap().stamp = stamp;
    }

    #[test]
    fn a_file_created_in_the_same_tick_is_found() {
        let tree = Tree::new();
        tree.file("dir/a", b"a");
        let dir = tree.root().join("dir");
        // A clock a second behind: the directory changed "after" the index was built, so
        // it is unsettled (as when built within the settling time of the change).
        let index = CaseIndex {
            clock: || SystemTime::now() - Duration::from_secs(1),
            ..CaseIndex::new()
        };
        assert_eq!(find(&index, &dir, b"B"), None);
        assert!(!index.lock().dirs.values().next().unwrap().settled);
        // Found names are used without listing.
        assert_eq!(find(&index, &dir, b"A"), Some(b"a".to_vec()));
        assert_eq!(index.usage().0, 1);
        // Created within the same tick: the stamp says nothing changed, but a miss in an
        // unsettled index lists again.
        tree.file("dir/b", b"b");
        pretend_same_tick(&index, &dir);
        assert_eq!(find(&index, &dir, b"B"), Some(b"b".to_vec()));
        assert_eq!(index.usage().0, 2);
    }

    #[test]
    fn a_removed_file_is_not_served_and_links_never_match() {
        let tree = Tree::new();
        tree.file("d/Real", b"r");
        tree.file("d/zz", b"z");
        symlink("zz", tree.root().join("d/LINK")).unwrap();
        let dir = tree.root().join("d");
        let index = CaseIndex {
            clock: later,
            ..CaseIndex::new()
        };
        assert_eq!(find(&index, &dir, b"real"), Some(b"Real".to_vec()));
        assert_eq!(find(&index, &dir, b"link"), None);
        // Removed within the same tick: the index still holds the name, but it no longer
        // exists and is not served; a link put in its place is not followed either.
        fs::remove_file(dir.join("Real")).unwrap();
        pretend_same_tick(&index, &dir);
        assert_eq!(find(&index, &dir, b"real"), None);
        symlink("zz", dir.join("Real")).unwrap();
        pretend_same_tick(&index, &dir);
        assert_eq!(find(&index, &dir, b"REAL"), None);
        assert_eq!(index.usage().0, 1, "settled: misses were trusted");
    }

    #[test]
    fn the_smallest_name_that_is_not_a_link_wins() {
        let tree = Tree::new();
        tree.file("d/bcd", b"lower");
        tree.file("d/Bcd", b"mixed");
        symlink("bcd", tree.root().join("d/BCD")).unwrap();
        let dir = tree.root().join("d");
        let index = CaseIndex {
            clock: later,
            ..CaseIndex::new()
        };
        // "BCD" < "Bcd" < "bcd", but "BCD" is a link.
        assert_eq!(find(&index, &dir, b"bCD"), Some(b"Bcd".to_vec()));
        fs::remove_file(dir.join("Bcd")).unwrap();
        assert_eq!(find(&index, &dir, b"bCD"), Some(b"bcd".to_vec()));
    }

    #[test]
    fn indexes_stay_within_their_bounds() {
        let tree = Tree::new();
        let index = CaseIndex {
            clock: later,
            ..CaseIndex::new()
        };
        for d in 0..MAX_DIRS + 10 {
            let dir = tree.root().join(format!("d{d}"));
            fs::create_dir(&dir).unwrap();
            assert_eq!(find(&index, &dir, b"x"), None);
        }
        let (listings, bytes, dirs) = index.usage();
        assert_eq!(listings, (MAX_DIRS + 10) as u64);
        assert_eq!(dirs, MAX_DIRS);
        assert!(bytes <= MAX_BYTES);
        // The most recent directory is still indexed; the first ones were dropped.
        let last = tree.root().join(format!("d{}", MAX_DIRS + 9));
        assert_eq!(find(&index, &last, b"x"), None);
        assert_eq!(index.usage().0, listings);
        assert_eq!(find(&index, &tree.root().join("d0"), b"x"), None);
        assert_eq!(index.usage().0, listings + 1);
    }
}
