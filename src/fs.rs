//! [`FsHandler`]: the built-in handler that serves files from one root directory, and its
//! confinement logic ([`FsHandler::open_file`]) for other handlers to reuse.
//!
//! # Confinement
//!
//! The root is opened once, at construction, as an `O_PATH | O_DIRECTORY` descriptor. Every
//! request is then resolved *relative to that descriptor* by the kernel, so renaming or
//! replacing path components while the server runs can never lead outside the root. There
//! is no "check the string, then open the path" step to race against.
//!
//! 1. **Name normalisation** (the same for both resolvers below). A backslash is a path
//!    separator (Windows PXE clients ask for `\Boot\BCD`); leading separators are taken
//!    relative to the root (`/etc/passwd` means `<root>/etc/passwd`); empty components and
//!    `.` are dropped; `..` removes the previous component, lexically, and a `..` that would
//!    climb above the root is refused with ERROR 2. A name with a control character (a byte
//!    below 0x20, or 0x7f) is refused with ERROR 2, and so is a name that normalises to
//!    nothing (the root directory itself). Other bytes, including non-UTF-8 ones, are passed
//!    through: Linux paths are bytes.
//! 2. **Resolution with `openat2`** (Linux 5.6+), the normal case:
//!    `openat2(root, path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK,
//!    RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`. Symbolic links are followed as long as
//!    resolution stays beneath the root; a link that leads out of it (a relative link
//!    climbing with `..`, or any *absolute* link, even one naming a place inside the root)
//!    fails with `EXDEV`, and `/proc` magic links are refused. (Mount points beneath the
//!    root are crossed: what is mounted there is the administrator's choice.)
//! 3. **Fallback walk**, when `openat2` is unavailable (`ENOSYS` on an old kernel, `EPERM`
//!    from a seccomp filter; probed once, in [`FsHandler::new`]): the path is walked one
//!    component at a time with `openat(dir, component, O_PATH | O_NOFOLLOW)`, each step
//!    relative to the descriptor of the previous one, and the last component is opened with
//!    `O_RDONLY | O_NOFOLLOW | O_NONBLOCK`. Because `..` was already resolved lexically and
//!    no symbolic link is ever followed, the walk cannot leave the root either. The price:
//!    **in the fallback every symbolic link is refused** (ERROR 2), even one that stays
//!    inside the root.
//! 4. **Type check.** `O_NONBLOCK` makes opening a FIFO return at once instead of blocking
//!    the event loop; after opening, `fstat` refuses anything that is not a regular file
//!    (directory, FIFO, socket, device) with ERROR 2. The flag is left set: it has no effect
//!    on regular files.
//!
//! # Case-insensitive lookup
//!
//! With [`FsHandler::ignore_case`], a name that does not exist exactly (`ENOENT` or
//! `ENOTDIR`) is resolved again one directory at a time, ignoring ASCII case (Windows
//! boot loaders ask for `\Boot\BCD`, PXE ROMs for upper-case MAC names). The rules keep
//! the confinement above intact:
//!
//! - the name is normalised first, so `..` is already gone; each directory that is listed
//!   is opened with the same resolver as files (beneath the root, no escaping link);
//! - in each directory the exact name wins when it exists (and is then treated like any
//!   name, symbolic link or not); otherwise the entries that match ignoring case are
//!   considered, **never a symbolic link** among them, and the bytewise smallest wins, so
//!   the choice does not depend on directory order; there is no backtracking (with both
//!   `Boot/` and `boot/` present, `boot/bcd` looks only in `boot/`);
//! - the corrected path is then opened exactly as a normal request is.
//!
//! The cost, a directory listing per level, is paid only for names that miss; exact names
//! take the normal path unchanged. Only ASCII letters fold (names are bytes, not text).
//!
//! # Per-client roots
//!
//! With [`FsHandler::unique_root`], a request for `name` from client `A` is served from
//! `<root>/A/name` when that file exists, and from `<root>/name` otherwise; `A` is the
//! client's IP address in its usual text form (`192.0.2.7`, `2001:db8::7`; an IPv4-mapped
//! IPv6 address is written as IPv4). This is dnsmasq's `--tftp-unique-root=ip` with one
//! difference: dnsmasq decides by directory (if `<root>/A` exists, *every* name is looked
//! up only there), dyntftp by file, so a client directory can hold just the files that
//! differ (its `grub.cfg`) and share the rest (the kernel). The name is normalised before
//! `A/` is put in front, so `..` cannot climb from `<root>/A` into the shared root or
//! another client's directory; and in the shared fallback a name whose first directory
//! is an IP address is refused (ERROR 2), so no client reads another's directory by
//! asking for `192.0.2.8/grub.cfg`. dnsmasq's `=mac` form needs the client's hardware
//! address, which a TFTP server does not see; it is not offered.
//!
//! # Hot-file cache
//!
//! In a boot storm thousands of clients fetch the same kernel. With
//! [`FsHandler::cache`]`(max_bytes)`, a file is read whole into memory the first time it is
//! opened and every later session sends the same shared bytes ([`BytesSource`]) instead
//! of reading the file again. An entry is used only while the file's device, inode, size,
//! modification time and change time are all unchanged (checked with `fstat` on every
//! open), so a replaced or rewritten file is reloaded at its next request; a file that
//! changes while it is being loaded is served from disk. Files larger than `max_bytes`
//! are never cached; the least recently used files are dropped to make room. The load
//! happens on the event loop, like every read of this handler: it costs the first
//! session of each file version one whole-file read. Counters: [`FsHandler::cache_stats`].
//!
//! # Errors sent to the client
//!
//! | Cause | TFTP error |
//! |-------|------------|
//! | `ENOENT`, `ENOTDIR`, `ENAMETOOLONG`, a path longer than `PATH_MAX` | 1 "file not found" |
//! | `..` above the root, control characters, the root itself, not a regular file | 2 "access violation" |
//! | `EACCES`, `EPERM`, `EXDEV` (escape), `ELOOP` (symlink loop, or any symlink in the fallback) | 2 "access violation" |
//! | `EMFILE`, `ENFILE` (out of descriptors) | none yet: [`Reject::retry_later`](crate::handler::Reject::retry_later), the server keeps the request until a session ends |
//! | `ENOMEM`, `EIO` (a server-side, usually temporary, problem) | 0 "cannot open file" |
//! | anything else | 2 "access violation" |
//!
//! Messages are fixed strings: they never contain a server path or an OS error text. The
//! details (the requested name, escaped and truncated, and the `errno`) are logged at
//! `debug` level only.

use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use log::debug;

use crate::handler::{Handler, ReadRequest, Reject};
use crate::packet::ErrorCode;
use crate::response::{BytesSource, FileSource, ResponseData};
use crate::sys;

/// Flags of every file open: read-only, never a controlling terminal, never blocking (a FIFO
/// must not stall the event loop).
const FILE_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_LARGEFILE;

/// Flags of a directory opened to list it (case-insensitive lookup).
const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_DIRECTORY;

/// `openat2` resolve flags: stay beneath the root, never through `/proc` magic links.
const RESOLVE_FLAGS: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;

/// How many times an `openat2` that reports `EAGAIN` (a concurrent rename or mount during a
/// `..` in a symlink target) is retried before the request is refused.
const EAGAIN_RETRIES: usize = 8;

/// Log at most this many bytes of a requested name.
const LOG_NAME_MAX: usize = 200;

/// Serves regular files from a root directory, confined to it (see the [module
/// docs](self) for the rules).
///
/// ```no_run
/// use dyntftp::FsHandler;
///
/// let handler = FsHandler::new("/srv/tftp")?;
/// let file = handler.open_file(b"\\Boot\\BCD"); // <root>/Boot/BCD
/// # let _ = file;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// Cloning (for [`Workers`](crate::server::Workers)) shares the root descriptor; each clone
/// keeps its own cache, of the same size.
pub struct FsHandler {
    /// `O_PATH | O_DIRECTORY | O_CLOEXEC` descriptor of the root, opened once (shared by
    /// clones: `openat` from several threads on one directory descriptor is safe).
    root: Arc<OwnedFd>,
    /// Chosen once, at construction.
    resolver: Resolver,
    /// Retry a missing name with ASCII case-insensitive matching.
    ignore_case: bool,
    /// Try `<root>/<client address>/<name>` first.
    unique_root: bool,
    /// Hot files kept in memory, when enabled.
    cache: Option<Cache>,
}

impl Clone for FsHandler {
    fn clone(&self) -> FsHandler {
        FsHandler {
            root: self.root.clone(),
            resolver: self.resolver,
            ignore_case: self.ignore_case,
            unique_root: self.unique_root,
            cache: self.cache.as_ref().map(|c| Cache::new(c.max_bytes)),
        }
    }
}

/// How paths are resolved beneath the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolver {
    /// One `openat2` call with `RESOLVE_BENEATH`.
    Openat2,
    /// Component by component with `openat(.., O_NOFOLLOW)`: every symlink is refused.
    Walk,
}

impl FsHandler {
    /// Opens `root` (which must be an existing directory) and probes whether the kernel
    /// offers `openat2`.
    ///
    /// Fails with an error naming `root` when it is missing, not a directory or not
    /// accessible.
    pub fn new(root: impl AsRef<Path>) -> io::Result<FsHandler> {
        let path = root.as_ref();
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("TFTP root {}: {e}", path.display())))?;
        let root = Arc::new(OwnedFd::from(dir));
        let resolver = match sys::openat2(
            root.as_fd(),
            c".",
            libc::O_PATH | libc::O_DIRECTORY,
            RESOLVE_FLAGS,
        ) {
            Ok(_) => Resolver::Openat2,
            Err(e) => {
                // Once per handler and without request data, so at info: operators should
                // know that symlinks will be refused.
                log::info!("openat2 unavailable ({e}): symbolic links under the root are refused");
                Resolver::Walk
            }
        };
        debug!("serving files from {} with {resolver:?}", path.display());
        Ok(FsHandler {
            root,
            resolver,
            ignore_case: false,
            unique_root: false,
            cache: None,
        })
    }

    /// Resolves names ASCII-case-insensitively when the exact name does not exist, as
    /// Windows clients expect (`\Boot\BCD` for `boot/bcd`). See [Case-insensitive
    /// lookup](self#case-insensitive-lookup). Off by default.
    pub fn ignore_case(mut self, on: bool) -> FsHandler {
        self.ignore_case = on;
        self
    }

    /// Serves `<root>/<client IP>/<name>` when it exists, else `<root>/<name>`, like
    /// dnsmasq's `--tftp-unique-root=ip` (with a per-file fallback). See [Per-client
    /// roots](self#per-client-roots). Off by default.
    pub fn unique_root(mut self, on: bool) -> FsHandler {
        self.unique_root = on;
        self
    }

    /// Keeps up to `max_bytes` of recently served files in memory, shared by every session
    /// that sends them (`0` disables the cache, the default). See [Hot-file
    /// cache](self#hot-file-cache).
    pub fn cache(mut self, max_bytes: u64) -> FsHandler {
        self.cache = (max_bytes > 0).then(|| Cache::new(max_bytes));
        self
    }

    /// The cache's counters since the handler was made (all zero without a cache).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.as_ref().map(|c| c.stats).unwrap_or_default()
    }

    /// Whether the race-free `openat2` resolver is in use (symbolic links that stay inside
    /// the root are followed). `false` means the fallback walk, which refuses every symbolic
    /// link.
    pub fn uses_openat2(&self) -> bool {
        self.resolver == Resolver::Openat2
    }

    /// Opens the regular file that `filename` (a TFTP request's filename, as sent) names
    /// beneath the root, read-only, or says which TFTP error to send instead.
    ///
    /// Usable by other handlers that serve some names from disk.
    pub fn open_file(&self, filename: &[u8]) -> Result<File, Reject> {
        let parts = components(filename)?;
        self.open_components(&parts, filename).map(|(file, _)| file)
    }

    /// Like [`open_file`](FsHandler::open_file), for a request from `client`: with
    /// [`unique_root`](FsHandler::unique_root) on, `<root>/<client>/<name>` is tried first.
    pub fn open_file_for(&self, client: IpAddr, filename: &[u8]) -> Result<File, Reject> {
        self.open_checked(client, filename).map(|(file, _)| file)
    }

    /// [`open_file_for`](FsHandler::open_file_for) with the metadata it checked.
    fn open_checked(&self, client: IpAddr, filename: &[u8]) -> Result<(File, Metadata), Reject> {
        let parts = components(filename)?;
        if self.unique_root {
            let dir = client.to_canonical().to_string();
            let mut own = Vec::with_capacity(parts.len() + 1);
            own.push(dir.as_bytes());
            own.extend_from_slice(&parts);
            match self.open_components(&own, filename) {
                Err(reject) if reject.code == ErrorCode::FileNotFound => {}
                result => return result,
            }
            // The shared fallback never reaches into another client's directory.
            let first_is_address =
                std::str::from_utf8(parts[0]).is_ok_and(|text| text.parse::<IpAddr>().is_ok());
            if parts.len() > 1 && first_is_address {
                debug!("refused {}: another client's directory", LogName(filename));
                return Err(Reject::access_violation());
            }
        }
        self.open_components(&parts, filename)
    }

    /// Opens normalised `parts` (see [`components`]) and checks that it is a regular file;
    /// `filename` is for the log.
    fn open_components(
        &self,
        parts: &[&[u8]],
        filename: &[u8],
    ) -> Result<(File, Metadata), Reject> {
        let name = LogName(filename);
        let mut opened = self.open_path(parts, FILE_FLAGS);
        if self.ignore_case {
            if let Err(e) = &opened {
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) {
                    opened = self.resolve_case(parts).and_then(|found| {
                        let found: Vec<&[u8]> = found.iter().map(Vec::as_slice).collect();
                        self.open_path(&found, FILE_FLAGS)
                    });
                }
            }
        }
        let file = File::from(opened.map_err(|e| {
            debug!("cannot open {name}: {e}");
            reject_for(&e)
        })?);
        match file.metadata() {
            Ok(meta) if meta.is_file() => Ok((file, meta)),
            Ok(meta) => {
                debug!(
                    "refused {name}: not a regular file ({:?})",
                    meta.file_type()
                );
                Err(Reject::access_violation())
            }
            Err(e) => {
                debug!("cannot stat {name}: {e}");
                Err(reject_for(&e))
            }
        }
    }

    /// Opens `parts` beneath the root with `flags`, with the handler's resolver (the root
    /// itself when `parts` is empty).
    fn open_path(&self, parts: &[&[u8]], flags: libc::c_int) -> io::Result<OwnedFd> {
        if parts.is_empty() {
            return sys::openat(self.root.as_fd(), b".", flags);
        }
        match self.resolver {
            Resolver::Openat2 => open_beneath(self.root.as_fd(), parts, flags),
            Resolver::Walk => open_walk(self.root.as_fd(), parts, flags | libc::O_NOFOLLOW),
        }
    }

    /// Finds the names on disk that match `parts` ignoring ASCII case, one directory at a
    /// time (each directory opened with the handler's resolver, so still confined). An
    /// exact name is always preferred; a name that matches only case-insensitively is
    /// never a symbolic link; among several matches the smallest name (bytewise) wins.
    fn resolve_case(&self, parts: &[&[u8]]) -> io::Result<Vec<Vec<u8>>> {
        let mut found: Vec<Vec<u8>> = Vec::with_capacity(parts.len());
        for part in parts {
            let prefix: Vec<&[u8]> = found.iter().map(Vec::as_slice).collect();
            let dir = self.open_path(&prefix, DIR_FLAGS)?;
            if sys::lstat_at(dir.as_fd(), part).is_ok() {
                found.push(part.to_vec());
                continue;
            }
            match find_ignoring_case(dir, part)? {
                Some(name) => found.push(name),
                None => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }
        Ok(found)
    }

    /// Forces the fallback resolver, so that tests cover it on kernels with `openat2`.
    #[cfg(test)]
    fn force_walk(mut self) -> FsHandler {
        self.resolver = Resolver::Walk;
        self
    }
}

impl fmt::Debug for FsHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsHandler")
            .field("root_fd", &self.root.as_raw_fd())
            .field("resolver", &self.resolver)
            .finish()
    }
}

impl Handler for FsHandler {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let (file, meta) = self.open_checked(request.peer.ip(), request.filename)?;
        if let Some(cache) = &mut self.cache {
            let cached = cache.get(&file, &meta).map_err(|e| {
                debug!("cannot read {}: {e}", LogName(request.filename));
                reject_for(&e)
            })?;
            if let Some(bytes) = cached {
                return Ok(Box::new(BytesSource::new(bytes)));
            }
        }
        Ok(Box::new(FileSource::with_size(file, meta.len())))
    }
}

/// Counters of the [hot-file cache](self#hot-file-cache), from
/// [`FsHandler::cache_stats`].
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
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
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
struct Cache {
    max_bytes: u64,
    tick: u64,
    entries: HashMap<(u64, u64), CacheEntry>,
    stats: CacheStats,
}

impl Cache {
    fn new(max_bytes: u64) -> Cache {
        Cache {
            max_bytes,
            tick: 0,
            entries: HashMap::new(),
            stats: CacheStats::default(),
        }
    }

    /// The bytes of `file` (just opened, with metadata `meta`), from memory or loaded now;
    /// `None` when it is not cacheable and must be read from disk.
    fn get(&mut self, file: &File, meta: &Metadata) -> io::Result<Option<Arc<[u8]>>> {
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

/// Why a name was refused before touching the file system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// A byte below 0x20, or 0x7f.
    ControlCharacter,
    /// A `..` above the root.
    Escape,
    /// Nothing left: the root directory itself.
    Root,
    /// Longer than `PATH_MAX` once normalised.
    TooLong,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::ControlCharacter => "control character in name",
            Refusal::Escape => "'..' climbs above the root",
            Refusal::Root => "names the root directory",
            Refusal::TooLong => "path longer than PATH_MAX",
        }
    }

    fn reject(self) -> Reject {
        match self {
            Refusal::TooLong => Reject::not_found(),
            _ => Reject::access_violation(),
        }
    }
}

/// Splits a requested filename into the path components [`FsHandler`] would open, with the
/// same rules (step 1 of the [module docs](self#confinement)): `/` and `\\` separate, empty
/// and `.` components are dropped, `..` is resolved lexically and may not climb above the
/// root, control characters and names of the root itself are refused.
///
/// Handlers that map names onto something other than a directory (an HTTP URL, a key in
/// a store) use it to get the same confinement as files.
///
/// ```
/// let parts = dyntftp::fs::components(b"\\boot//./x/../pxelinux.0").unwrap();
/// assert_eq!(parts, [&b"boot"[..], b"pxelinux.0"]);
/// assert!(dyntftp::fs::components(b"../etc/passwd").is_err());
/// ```
pub fn components(filename: &[u8]) -> Result<Vec<&[u8]>, Reject> {
    normalise(filename).map_err(|refusal| {
        debug!("refused {}: {}", LogName(filename), refusal.reason());
        refusal.reject()
    })
}

/// Splits `filename` into the components of a path beneath the root (see the module docs).
/// The result is non-empty, has no empty, `.` or `..` component, and joined with `/` is
/// shorter than `PATH_MAX`.
fn normalise(filename: &[u8]) -> Result<Vec<&[u8]>, Refusal> {
    if filename.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(Refusal::ControlCharacter);
    }
    let mut components: Vec<&[u8]> = Vec::new();
    for component in filename.split(|&b| b == b'/' || b == b'\\') {
        match component {
            b"" | b"." => {}
            b".." => {
                components.pop().ok_or(Refusal::Escape)?;
            }
            _ => components.push(component),
        }
    }
    if components.is_empty() {
        return Err(Refusal::Root);
    }
    // Joined length: the components plus one separator between each pair.
    let len = components.iter().map(|c| c.len() + 1).sum::<usize>() - 1;
    if len >= libc::PATH_MAX as usize {
        return Err(Refusal::TooLong);
    }
    Ok(components)
}

/// Opens `components` beneath `root` with one `openat2` call.
fn open_beneath(
    root: BorrowedFd<'_>,
    components: &[&[u8]],
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let path = CString::new(components.join(&b'/'))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut tries = 0;
    loop {
        match sys::openat2(root, &path, flags, RESOLVE_FLAGS) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < EAGAIN_RETRIES => {
                tries += 1;
            }
            result => return result,
        }
    }
}

/// Opens `components` beneath `root` one at a time, following no symbolic link; the last
/// one with `flags` (which include `O_NOFOLLOW`).
fn open_walk(
    root: BorrowedFd<'_>,
    components: &[&[u8]],
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let (last, dirs) = components
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    let mut dir: Option<OwnedFd> = None;
    for component in dirs {
        let parent = dir.as_ref().map_or(root, |fd| fd.as_fd());
        // O_PATH | O_NOFOLLOW opens a symlink itself rather than failing with ENOTDIR, so
        // the fstat below can tell "symlink" (refused) from "not a directory" (not found).
        let fd = sys::openat(
            parent,
            component,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )?;
        let step = File::from(fd);
        let file_type = step.metadata()?.file_type();
        if file_type.is_symlink() {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        if !file_type.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        dir = Some(OwnedFd::from(step));
    }
    let parent = dir.as_ref().map_or(root, |fd| fd.as_fd());
    sys::openat(parent, last, flags)
}

/// The entry of directory `dir` whose name equals `name` ignoring ASCII case and that is
/// not a symbolic link; the bytewise smallest if several match.
fn find_ignoring_case(dir: OwnedFd, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut best: Option<Vec<u8>> = None;
    sys::for_each_entry(dir, |dir, entry, d_type| {
        if !entry.eq_ignore_ascii_case(name) || d_type == libc::DT_LNK {
            return;
        }
        if best.as_deref().is_some_and(|b| b <= entry) {
            return;
        }
        // d_type may be DT_UNKNOWN: ask the file system whether it is a link.
        let is_link = sys::lstat_at(dir, entry)
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
            .unwrap_or(true);
        if !is_link {
            best = Some(entry.to_vec());
        }
    })?;
    Ok(best)
}

/// The TFTP error for an OS error while opening (see the table in the module docs).
fn reject_for(e: &io::Error) -> Reject {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG) => Reject::not_found(),
        // Out of descriptors: running sessions hold them, so the server retries later.
        Some(libc::EMFILE | libc::ENFILE) => {
            Reject::retry_later(ErrorCode::NotDefined, "cannot open file")
        }
        Some(libc::ENOMEM | libc::EIO) => Reject::new(ErrorCode::NotDefined, "cannot open file"),
        _ => Reject::access_violation(),
    }
}

/// A requested name for the log: escaped (control characters and non-UTF-8 bytes shown as
/// `\xNN`) and truncated.
struct LogName<'a>(&'a [u8]);

impl fmt::Display for LogName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(LOG_NAME_MAX)];
        write!(f, "\"{}\"", shown.escape_ascii())?;
        if shown.len() < self.0.len() {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Notifier;

    use std::ffi::{OsStr, OsString};
    use std::io::Read;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;
    use std::{fs, thread};

    /// A temporary tree `<tmp>/dyntftp-fs-<pid>-<n>/{root,outside}`, removed on drop.
    struct Tree {
        base: PathBuf,
    }

    impl Tree {
        fn new() -> Tree {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let base = std::env::temp_dir().join(format!("dyntftp-fs-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&base);
            fs::create_dir_all(base.join("root")).unwrap();
            fs::create_dir_all(base.join("outside/dir")).unwrap();
            fs::write(base.join("outside/secret"), b"OUTSIDE").unwrap();
            fs::write(base.join("outside/dir/secret"), b"OUTSIDE").unwrap();
            Tree { base }
        }

        fn root(&self) -> PathBuf {
            self.base.join("root")
        }

        fn outside(&self) -> PathBuf {
            self.base.join("outside")
        }

        /// Writes `contents` at `rel` under the root, creating parent directories.
        fn file(&self, rel: &str, contents: &[u8]) {
            let path = self.root().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        /// Both resolvers over this root (the `openat2` one only when the kernel has it).
        fn handlers(&self) -> Vec<FsHandler> {
            let mut handlers = vec![FsHandler::new(self.root()).unwrap().force_walk()];
            let native = FsHandler::new(self.root()).unwrap();
            if native.uses_openat2() {
                handlers.push(native);
            } else {
                eprintln!("openat2 unavailable: only the fallback walk is tested");
            }
            handlers
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.base);
        }
    }

    fn read(handler: &FsHandler, name: &[u8]) -> Result<Vec<u8>, Reject> {
        let mut file = handler.open_file(name)?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).unwrap();
        Ok(contents)
    }

    /// What a request gives: the file's contents, or the TFTP error code.
    type Served = Result<Vec<u8>, ErrorCode>;

    fn code(result: Result<Vec<u8>, Reject>) -> Served {
        result.map_err(|r| r.code)
    }

    const NOT_FOUND: Served = Err(ErrorCode::FileNotFound);
    const ACCESS: Served = Err(ErrorCode::AccessViolation);

    fn ok(contents: &[u8]) -> Served {
        Ok(contents.to_vec())
    }

    fn check(h: &FsHandler, cases: &[(&[u8], Served)]) {
        for (name, expected) in cases {
            assert_eq!(
                &code(read(h, name)),
                expected,
                "{} with {:?}",
                name.escape_ascii(),
                h.resolver
            );
        }
    }

    #[test]
    fn new_fails_clearly() {
        let tree = Tree::new();
        let missing = FsHandler::new(tree.base.join("missing")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(missing.to_string().contains("missing"), "{missing}");
        tree.file("plain", b"x");
        let not_dir = FsHandler::new(tree.root().join("plain")).unwrap_err();
        assert_eq!(not_dir.raw_os_error(), None); // wrapped, with the path in the text
        assert!(not_dir.to_string().contains("plain"), "{not_dir}");
        assert_eq!(not_dir.kind(), io::ErrorKind::NotADirectory);
    }

    #[test]
    fn reports_openat2_support() {
        let tree = Tree::new();
        let handler = FsHandler::new(tree.root()).unwrap();
        eprintln!("openat2 available: {}", handler.uses_openat2());
        assert!(!handler.force_walk().uses_openat2());
    }

    #[test]
    fn name_normalisation() {
        let tree = Tree::new();
        tree.file("plain.txt", b"plain");
        tree.file("a/b/c.txt", b"abc");
        tree.file("a/x", b"ax");
        for h in tree.handlers() {
            check(
                &h,
                &[
                    (b"plain.txt", ok(b"plain")),
                    (b"a/b/c.txt", ok(b"abc")),
                    (b"/a/b/c.txt", ok(b"abc")),
                    (b"//a/x", ok(b"ax")),
                    (b"///plain.txt", ok(b"plain")),
                    (b"\\a\\b\\c.txt", ok(b"abc")),
                    (b"a\\b/c.txt", ok(b"abc")),
                    (b"a/./x", ok(b"ax")),
                    (b"./a//x/", ok(b"ax")),
                    (b"a/../a/x", ok(b"ax")),
                    (b"a/b/../../plain.txt", ok(b"plain")),
                    (b"../x", ACCESS),
                    (b"..", ACCESS),
                    (b"a/../../x", ACCESS),
                    (b"..\\..\\x", ACCESS),
                    (b"/../plain.txt", ACCESS),
                    (b"a/b/../../../plain.txt", ACCESS),
                    (b"/etc/passwd", NOT_FOUND),
                    (b"missing", NOT_FOUND),
                    (b"plain.txt/x", NOT_FOUND),
                    (b"/", ACCESS),
                    (b"", ACCESS),
                    (b".", ACCESS),
                    (b"a/..", ACCESS),
                    (b"a", ACCESS),
                    (b"a/", ACCESS),
                    (b"plain\n.txt", ACCESS),
                    (b"plain.txt\x7f", ACCESS),
                    (b"\x1b[2J", ACCESS),
                    (b"plain.txt\0", ACCESS),
                ],
            );
        }
    }

    #[test]
    fn messages_never_reveal_paths() {
        let tree = Tree::new();
        let root = tree.root();
        for h in tree.handlers() {
            for name in [&b"missing"[..], b"../x", b"/", b"a\x01"] {
                let reject = h.open_file(name).unwrap_err();
                assert!(!reject.message.contains(root.to_str().unwrap()), "{reject}");
                assert!(
                    reject.message == "file not found" || reject.message == "access violation",
                    "{reject}"
                );
            }
        }
    }

    #[test]
    fn non_utf8_names() {
        let tree = Tree::new();
        let name: &[u8] = b"caf\xe9/\xff\xfe.bin";
        fs::create_dir(tree.root().join(OsStr::from_bytes(b"caf\xe9"))).unwrap();
        fs::write(
            tree.root().join(OsString::from_vec(name.to_vec())),
            b"latin1",
        )
        .unwrap();
        for h in tree.handlers() {
            assert_eq!(code(read(&h, name)), ok(b"latin1"), "{:?}", h.resolver);
            assert_eq!(code(read(&h, b"caf\xe9\\\xff\xfe.bin")), ok(b"latin1"));
            assert_eq!(code(read(&h, b"caf\xe9/\xff")), NOT_FOUND);
        }
    }

    #[test]
    fn symlinks() {
        let tree = Tree::new();
        let root = tree.root();
        tree.file("real/file", b"inside");
        symlink("real/file", root.join("link-in")).unwrap();
        symlink("real", root.join("dirlink-in")).unwrap();
        symlink("../outside/secret", root.join("link-out")).unwrap();
        symlink(tree.outside().join("secret"), root.join("link-out-abs")).unwrap();
        symlink("../outside/dir", root.join("dirlink-out")).unwrap();
        symlink(tree.outside().join("dir"), root.join("dirlink-out-abs")).unwrap();
        // Absolute, but pointing inside the root: RESOLVE_BENEATH refuses those too.
        symlink(root.join("real/file"), root.join("link-in-abs")).unwrap();
        symlink("loop-b", root.join("loop-a")).unwrap();
        symlink("loop-a", root.join("loop-b")).unwrap();
        symlink("nowhere", root.join("dangling")).unwrap();
        symlink("/proc/self/root/etc/passwd", root.join("magic")).unwrap();
        for h in tree.handlers() {
            let follows = h.uses_openat2();
            let inside = if follows { ok(b"inside") } else { ACCESS };
            let dangling = if follows { NOT_FOUND } else { ACCESS };
            check(
                &h,
                &[
                    (b"real/file", ok(b"inside")),
                    (b"link-in", inside.clone()),
                    (b"dirlink-in/file", inside),
                    (b"link-out", ACCESS),
                    (b"link-out-abs", ACCESS),
                    (b"dirlink-out/secret", ACCESS),
                    (b"dirlink-out-abs/secret", ACCESS),
                    (b"link-in-abs", ACCESS),
                    (b"loop-a", ACCESS),
                    (b"dangling", dangling),
                    (b"magic", ACCESS),
                ],
            );
        }
    }

    #[test]
    fn deep_and_long_paths() {
        let tree = Tree::new();
        let deep = vec!["d"; 200].join("/") + "/file";
        tree.file(&deep, b"deep");
        tree.file("a/a/a/a/a/file", b"a");
        let nonexistent = vec!["a"; 5000].join("/");
        let medium = vec!["a"; 1500].join("/"); // under PATH_MAX: reaches the kernel
        let long_name = vec![b'x'; 60_000];
        let long_component = vec![b'y'; 300]; // over NAME_MAX
        for h in tree.handlers() {
            assert_eq!(code(read(&h, deep.as_bytes())), ok(b"deep"));
            assert_eq!(code(read(&h, nonexistent.as_bytes())), NOT_FOUND);
            assert_eq!(code(read(&h, medium.as_bytes())), NOT_FOUND);
            assert_eq!(code(read(&h, &long_name)), NOT_FOUND);
            assert_eq!(code(read(&h, &long_component)), NOT_FOUND);
            // Many `..` that cancel out stay cheap and correct.
            let back = "x/../".repeat(10_000) + "a/a/a/a/a/file";
            assert_eq!(code(read(&h, back.as_bytes())), ok(b"a"));
        }
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let tree = Tree::new();
        sys::mkfifo(&tree.root().join("fifo")).unwrap();
        for h in tree.handlers() {
            let resolver = h.resolver;
            let (tx, rx) = mpsc::channel();
            // If opening blocked, this thread would stay stuck; the test fails instead.
            thread::spawn(move || tx.send(code(read(&h, b"fifo"))).unwrap());
            let result = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("opening a FIFO blocked with {resolver:?}"));
            assert_eq!(result, ACCESS, "{resolver:?}");
        }
    }

    #[test]
    fn non_regular_files_are_refused() {
        let tree = Tree::new();
        fs::create_dir(tree.root().join("dir")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(tree.root().join("sock")).unwrap();
        let mut names: Vec<&[u8]> = vec![b"dir", b"dir/", b"/dir/.", b"sock"];
        if sys::running_as_root() {
            match sys::mknod_char(&tree.root().join("null"), 1, 3) {
                Ok(()) => names.push(b"null"),
                Err(e) => eprintln!("skipping the device case: mknod failed: {e}"),
            }
        } else {
            eprintln!("skipping the device case: mknod needs root");
        }
        for h in tree.handlers() {
            for name in &names {
                assert_eq!(code(read(&h, name)), ACCESS, "{}", name.escape_ascii());
            }
        }
    }

    #[test]
    fn unreadable_file() {
        let tree = Tree::new();
        tree.file("secret", b"s");
        let path = tree.root().join("secret");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).unwrap();
        for h in tree.handlers() {
            if sys::running_as_root() {
                eprintln!("running as root: chmod 000 does not stop reading; assertion skipped");
            } else {
                assert_eq!(code(read(&h, b"secret")), ACCESS, "{:?}", h.resolver);
            }
        }
    }

    #[test]
    fn handler_serves_file_source() {
        let tree = Tree::new();
        tree.file("boot/pxelinux.0", b"0123456789");
        for mut h in tree.handlers() {
            let request = ReadRequest {
                peer: "127.0.0.1:1234".parse().unwrap(),
                local: "127.0.0.1:69".parse().unwrap(),
                filename: b"\\boot\\pxelinux.0",
                mode: crate::packet::Mode::Octet,
                options: crate::packet::Options::EMPTY,
                notifier: &crate::handler::Notifier::detached(),
            };
            let mut source = h.open(&request).unwrap();
            assert_eq!(source.size(), Some(10));
            let mut buf = [0u8; 16];
            assert_eq!(source.read(&mut buf).unwrap(), 10);
            assert_eq!(&buf[..10], b"0123456789");
            let missing = ReadRequest {
                filename: b"nope",
                ..request
            };
            assert_eq!(h.open(&missing).err().unwrap(), Reject::not_found());
        }
    }

    /// A helper thread keeps swapping `root/dir` between a real directory and a symlink to
    /// an outside directory holding a file of the same name; the outside file must never be
    /// served. A naive `File::open(root.join(name))` in the same loop shows the race is real
    /// (its escapes are counted, not asserted: they depend on scheduling).
    #[test]
    fn swapped_component_never_escapes() {
        let tree = Tree::new();
        let root = tree.root();
        tree.file("dir/secret", b"inside");
        symlink(tree.outside().join("dir"), root.join(".link")).unwrap();
        for h in tree.handlers() {
            let stop = Arc::new(AtomicBool::new(false));
            let (started_tx, started) = mpsc::channel();
            let flipper = {
                let stop = Arc::clone(&stop);
                let root = root.clone();
                thread::spawn(move || {
                    let (dir, real, link) =
                        (root.join("dir"), root.join(".real"), root.join(".link"));
                    let mut flips = 0u64;
                    loop {
                        fs::rename(&dir, &real).unwrap();
                        fs::rename(&link, &dir).unwrap();
                        fs::rename(&dir, &link).unwrap();
                        fs::rename(&real, &dir).unwrap();
                        flips += 1;
                        if flips == 1 {
                            started_tx.send(()).unwrap();
                        }
                        if stop.load(Ordering::Relaxed) {
                            return flips;
                        }
                    }
                })
            };
            started.recv().unwrap();
            let (mut served, mut refused, mut naive_escapes) = (0, 0, 0);
            for _ in 0..1000 {
                match read(&h, b"dir/secret") {
                    Ok(contents) => {
                        assert_eq!(contents, b"inside", "escaped with {:?}", h.resolver);
                        served += 1;
                    }
                    Err(_) => refused += 1,
                }
                if fs::read(root.join("dir/secret")).is_ok_and(|c| c == b"OUTSIDE") {
                    naive_escapes += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            let flips = flipper.join().unwrap();
            eprintln!(
                "{:?}: {served} served, {refused} refused, {flips} flips; \
                 a naive open escaped {naive_escapes} times",
                h.resolver
            );
        }
    }

    #[test]
    fn ignore_case_finds_names_and_stays_confined() {
        let tree = Tree::new();
        let root = tree.root();
        tree.file("Boot/BCD", b"bcd");
        tree.file("boot/exact", b"lower dir");
        tree.file("pxelinux.cfg/01-aa-bb", b"mac");
        tree.file("Dup/x", b"upper");
        tree.file("dup/x", b"lower");
        tree.file("real/secret", b"inside");
        // Case-insensitive matches that are links must never be used, even in the root.
        symlink("real/secret", root.join("link")).unwrap();
        symlink(tree.outside().join("secret"), root.join("OUTLINK")).unwrap();
        symlink(tree.outside().join("dir"), root.join("outdir")).unwrap();
        for h in tree.handlers() {
            let h = h.ignore_case(true);
            let follows = h.uses_openat2();
            check(
                &h,
                &[
                    (b"\\Boot\\BCD", ok(b"bcd")),
                    (b"\\BOOT\\bcd", ok(b"bcd")),
                    // "boot" exists exactly: it wins over "Boot", with no backtracking.
                    (b"boot/bcd", NOT_FOUND),
                    (b"boot/exact", ok(b"lower dir")),
                    // "BOOT" matches "Boot" and "boot": "Boot" is the smaller.
                    (b"BOOT/EXACT", NOT_FOUND),
                    (b"PXELINUX.CFG/01-AA-BB", ok(b"mac")),
                    // Several matches: the bytewise smallest ("Dup" < "dup").
                    (b"DUP/X", ok(b"upper")),
                    (b"dup/x", ok(b"lower")),
                    (b"missing", NOT_FOUND),
                    (b"boot/BCD/x", NOT_FOUND),
                    (b"../Boot/BCD", ACCESS),
                    // Exact-case links behave as without ignore_case...
                    (b"link", if follows { ok(b"inside") } else { ACCESS }),
                    (b"OUTLINK", ACCESS),
                    (b"outdir/secret", ACCESS),
                    // ...and links matched only ignoring case are not followed.
                    (b"LINK", NOT_FOUND),
                    (b"outlink", NOT_FOUND),
                    (b"OUTDIR/secret", NOT_FOUND),
                ],
            );
        }
        // Without the option, case matters.
        for h in tree.handlers() {
            check(&h, &[(b"boot/bcd", NOT_FOUND), (b"Boot/BCD", ok(b"bcd"))]);
        }
    }

    fn request<'a>(peer: &str, filename: &'a [u8], notifier: &'a Notifier) -> ReadRequest<'a> {
        ReadRequest {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:69".parse().unwrap(),
            filename,
            mode: crate::packet::Mode::Octet,
            options: crate::packet::Options::EMPTY,
            notifier,
        }
    }

    fn serve(h: &mut FsHandler, peer: &str, name: &[u8]) -> Served {
        let notifier = Notifier::detached();
        let mut source = h
            .open(&request(peer, name, &notifier))
            .map_err(|r| r.code)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            match source.read(&mut buf).unwrap() {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn unique_root_prefers_the_client_directory_per_file() {
        let tree = Tree::new();
        tree.file("grub.cfg", b"shared cfg");
        tree.file("vmlinuz", b"shared kernel");
        tree.file("192.0.2.7/grub.cfg", b"cfg of .7");
        tree.file("192.0.2.8/secret", b"only .8");
        tree.file("2001:db8::7/grub.cfg", b"cfg of v6");
        for h in tree.handlers() {
            let mut h = h.unique_root(true);
            let cases: &[(&str, &[u8], Served)] = &[
                ("192.0.2.7:1000", b"grub.cfg", ok(b"cfg of .7")),
                ("192.0.2.7:1000", b"/vmlinuz", ok(b"shared kernel")),
                ("192.0.2.9:1000", b"grub.cfg", ok(b"shared cfg")),
                ("[::ffff:192.0.2.7]:1000", b"grub.cfg", ok(b"cfg of .7")),
                ("[2001:db8::7]:1000", b"grub.cfg", ok(b"cfg of v6")),
                ("[2001:db8::7]:1000", b"vmlinuz", ok(b"shared kernel")),
                // No way into another client's directory, by name or by "..".
                ("192.0.2.7:1000", b"192.0.2.8/secret", ACCESS),
                ("192.0.2.7:1000", b"../192.0.2.8/secret", ACCESS),
                ("192.0.2.7:1000", b"x/../../192.0.2.8/secret", ACCESS),
                ("192.0.2.8:1000", b"secret", ok(b"only .8")),
                ("192.0.2.7:1000", b"missing", NOT_FOUND),
            ];
            for (peer, name, want) in cases {
                assert_eq!(
                    &serve(&mut h, peer, name),
                    want,
                    "{peer} {}",
                    name.escape_ascii()
                );
            }
        }
        // Off: the client directories are plain directories.
        let mut plain = FsHandler::new(tree.root()).unwrap();
        assert_eq!(
            serve(&mut plain, "192.0.2.7:1", b"grub.cfg"),
            ok(b"shared cfg")
        );
        assert_eq!(
            serve(&mut plain, "192.0.2.7:1", b"192.0.2.8/secret"),
            ok(b"only .8")
        );
    }

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

    #[test]
    fn log_name_is_escaped_and_truncated() {
        assert_eq!(LogName(b"a\n\xff").to_string(), "\"a\\n\\xff\"");
        let long = LogName(&[b'x'; 1000]).to_string();
        assert!(long.ends_with("... (1000 bytes)"), "{long}");
        assert!(long.len() < 250);
    }
}
