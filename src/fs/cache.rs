//! The [hot-file cache](crate::fs#hot-file-cache): whole files in memory, shared by the
//! sessions that send them, checked against the file's metadata on every open.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

/// Counters of the [hot-file cache](crate::fs#hot-file-cache), from
/// [`FsHandler::cache_stats`](crate::FsHandler::cache_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Opens served from memory.
    pub hits: u64,
    /// Opens of a file not in the cache (or changed since it was loaded).
    pub misses: u64,
    /// Files read into the cache, and their bytes.
    pub loads: u64,
    /// Bytes read from disk into the cache.
    pub bytes_loaded: u64,
    /// Files dropped to make room.
    pub evictions: u64,
    /// Files served from disk because they are larger than the cache, or changed while
    /// they were being loaded.
    pub uncached: u64,
    /// Bytes held now.
    pub bytes_held: u64,
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
}

struct CacheEntry {
    stamp: Stamp,
    data: Arc<[u8]>,
    last_used: u64,
}

/// Whole files by (device, inode), least recently used evicted first.
pub(super) struct Cache {
    max_bytes: u64,
    tick: u64,
    entries: HashMap<(u64, u64), CacheEntry>,
    stats: CacheStats,
}

impl Cache {
    pub(super) fn new(max_bytes: u64) -> Cache {
        Cache {
            max_bytes,
            tick: 0,
            entries: HashMap::new(),
            stats: CacheStats::default(),
        }
    }

    /// The most bytes it holds.
    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Its counters so far.
    pub(super) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The bytes of `file` (just opened, with metadata `meta`): from memory when this
    /// version of the file is held, else read whole now and kept, evicting the least
    /// recently used files to make room. `None` when it cannot be held (larger than the
    /// cache, or changed while it was read): the caller serves it from disk.
    pub(super) fn get_or_load(
        &mut self,
        file: &File,
        meta: &Metadata,
    ) -> io::Result<Option<Arc<[u8]>>> {
        let stamp = Stamp::of(meta);
        let key = (stamp.dev, stamp.ino);
        self.tick += 1;
        if let Some(entry) = self.entries.get_mut(&key) {
            if entry.stamp == stamp {
                entry.last_used = self.tick;
                self.stats.hits += 1;
                return Ok(Some(Arc::clone(&entry.data)));
            }
            self.remove(key);
        }
        self.stats.misses += 1;
        if stamp.size > self.max_bytes {
            self.stats.uncached += 1;
            return Ok(None);
        }
        while self.stats.bytes_held + stamp.size > self.max_bytes {
            let Some((&oldest, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else {
                break;
            };
            self.remove(oldest);
            self.stats.evictions += 1;
        }
        // Positioned reads: the file's offset stays at 0 for the FileSource fallback.
        let mut data = vec![0u8; stamp.size as usize];
        let mut filled = 0;
        while filled < data.len() {
            match file.read_at(&mut data[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.stats.bytes_loaded += filled as u64;
        // Changed while we read (or shorter than its size said): serve it from disk.
        if filled != data.len() || Stamp::of(&file.metadata()?) != stamp {
            self.stats.uncached += 1;
            return Ok(None);
        }
        let data: Arc<[u8]> = data.into();
        self.stats.loads += 1;
        self.stats.bytes_held += stamp.size;
        self.entries.insert(
            key,
            CacheEntry {
                stamp,
                data: Arc::clone(&data),
                last_used: self.tick,
            },
        );
        Ok(Some(data))
    }

    fn remove(&mut self, key: (u64, u64)) {
        if let Some(entry) = self.entries.remove(&key) {
            self.stats.bytes_held -= entry.stamp.size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tests::{request, serve, Tree};
    use crate::fs::FsHandler;
    use crate::handler::{Handler, Notifier};

    use std::fs;
    use std::time::Duration;

    #[test]
    fn cache_serves_shared_bytes_and_notices_changes() {
        let tree = Tree::new();
        tree.file("kernel", &[1; 3000]);
        tree.file("initrd", &[2; 5000]);
        tree.file("huge", &[3; 20_000]);
        let mut h = FsHandler::new(tree.root()).unwrap().cache(10_000);
        assert_eq!(h.cache_stats(), CacheStats::default());
        for _ in 0..3 {
            assert_eq!(serve(&mut h, "192.0.2.1:1", b"kernel"), Ok(vec![1; 3000]));
        }
        let stats = h.cache_stats();
        assert_eq!((stats.misses, stats.hits, stats.loads), (1, 2, 1));
        assert_eq!(stats.bytes_held, 3000);
        // Sizes are answered from the cached bytes too.
        let notifier = Notifier::detached();
        let source = h
            .open(&request("192.0.2.1:1", b"kernel", &notifier))
            .unwrap();
        assert_eq!(source.size(), Some(3000));

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
}
