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
//! Exact names take the normal path unchanged. A name that misses costs, per level, one
//! directory open, up to three `fstatat` calls and a hash lookup: each directory is
//! listed once into an index of its names by case, reused until the directory changes
//! (its modification or change time moves). A name the index finds is checked to still
//! exist and not be a link before it is used. Two changes can share a timestamp tick, so
//! for 50 ms after a directory changed (2.1 s where its timestamps are whole seconds) a
//! name its index lacks is looked for again by listing the directory. The indexes take
//! at most 32 MiB (estimated) over at most 1,024 directories, least recently used
//! dropped first; in a directory whose index alone would exceed 8 MiB (about 80,000
//! names), only exact names are found (a warning is logged). Only ASCII letters fold
//! (names are bytes, not text).
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
//! [`FsHandler::cache`]`(max_bytes)`, a file is read whole into memory and every later
//! session sends the same shared bytes instead of reading the file again. An entry is
//! used only while the file's device, inode, size, modification time and change time are
//! all unchanged (checked on every request), so a replaced or rewritten file is reloaded
//! at its next request; a file that changes while it is being loaded is served from disk.
//!
//! A name served before is not even opened again: the cache remembers which version each
//! name (the normalised path) led to, and when a `stat` of that path finds the same
//! version still in memory, the request is served from it — one system call instead of
//! `openat2`, `statx` and `close`. Whatever the path resolves through by then, the same
//! version is the very file the confinement checks let through for that name; anything
//! else (another version, a final symbolic link, an error) is opened and checked as
//! usual. Not with [per-client roots](#per-client-roots), where a client's own file must
//! win from the moment it appears. At most 1,024 names of up to 255 bytes are
//! remembered ([`CacheStats::hits_by_name`] counts these hits).
//!
//! `max_bytes` bounds **every cached copy still in memory**, not only those the cache
//! holds: a copy that running sessions are sending counts until the last of them ends,
//! even once the cache has let go of it (an older version of a changed file). So:
//!
//! - there is one copy per file version, shared by all its sessions (and by the clones
//!   of the handler, one cache for all [`Workers`](crate::server::Workers));
//! - room is made by dropping the least recently used files that no session is sending
//!   (dropping one a session holds would free nothing, and the next request for it
//!   shares that copy instead of loading another);
//! - when the copies sessions hold leave no room, the request is served from disk
//!   ([`FileSource`]), exactly as without a cache; so is a file larger than `max_bytes`;
//! - loads read at most `max_bytes` per minute (an allowance refilled evenly, full at
//!   first): requests that make the cache drop one large file to load another — a
//!   spoofed request costs nothing to send — cannot make it read file after file; beyond
//!   the allowance a miss is served from disk.
//!
//! A miss never reads a large file on the event loop: files up to 256 KiB are read at
//! once (tens of microseconds from the page cache); a larger one is read by a background
//! thread (at most two at a time, their bytes reserved in the budget from the start)
//! while the sessions that ask meanwhile are served from disk — until it lands: from
//! their next read on they read the same bytes from memory, so the clients of a boot
//! storm that asked before the kernel was in memory do not read it from disk to the
//! end. Counters, including the bytes in use and their peak: [`FsHandler::cache_stats`].
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

mod cache;
mod case_index;
mod resolve;

use std::fmt;
use std::fs::{File, Metadata};
use std::io;
use std::net::IpAddr;
use std::path::Path;

use log::debug;

use crate::handler::{Handler, ReadRequest, Reject};
use crate::packet::ErrorCode;
use crate::response::{FileSource, ResponseData};

pub use cache::CacheStats;
use cache::{Cache, Lookup};
pub use resolve::components;
use resolve::{LogName, Root};

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
/// Cloning (for [`Workers`](crate::server::Workers)) shares the root descriptor, the
/// case-insensitive index and the cache (one budget for all the clones).
#[derive(Clone)]
pub struct FsHandler {
    /// The root directory and how names are resolved beneath it (the confinement, and
    /// the case-insensitive fallback).
    root: Root,
    /// Try `<root>/<client address>/<name>` first.
    unique_root: bool,
    /// Hot files kept in memory, when enabled.
    cache: Option<Cache>,
}

impl FsHandler {
    /// Opens `root` (which must be an existing directory) and probes whether the kernel
    /// offers `openat2`.
    ///
    /// Fails with an error naming `root` when it is missing, not a directory or not
    /// accessible.
    pub fn new(root: impl AsRef<Path>) -> io::Result<FsHandler> {
        Ok(FsHandler {
            root: Root::new(root.as_ref())?,
            unique_root: false,
            cache: None,
        })
    }

    /// Resolves names ASCII-case-insensitively when the exact name does not exist, as
    /// Windows clients expect (`\Boot\BCD` for `boot/bcd`). See [Case-insensitive
    /// lookup](self#case-insensitive-lookup). Off by default.
    pub fn ignore_case(mut self, on: bool) -> FsHandler {
        self.root.ignore_case = on;
        self
    }

    /// Serves `<root>/<client IP>/<name>` when it exists, else `<root>/<name>`, like
    /// dnsmasq's `--tftp-unique-root=ip` (with a per-file fallback). See [Per-client
    /// roots](self#per-client-roots). Off by default.
    pub fn unique_root(mut self, on: bool) -> FsHandler {
        self.unique_root = on;
        self
    }

    /// Keeps recently served files in memory, shared by every session that sends them, with
    /// at most `max_bytes` of copies alive, those still held by running sessions included
    /// (`0` disables the cache, the default). See [Hot-file cache](self#hot-file-cache).
    pub fn cache(mut self, max_bytes: u64) -> FsHandler {
        self.cache = (max_bytes > 0).then(|| Cache::new(max_bytes));
        self
    }

    /// The cache's counters since the handler was made (all zero without a cache).
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.as_ref().map(Cache::stats).unwrap_or_default()
    }

    /// Whether the race-free `openat2` resolver is in use (symbolic links that stay inside
    /// the root are followed). `false` means the fallback walk, which refuses every symbolic
    /// link.
    pub fn uses_openat2(&self) -> bool {
        self.root.uses_openat2()
    }

    /// Opens the regular file that `filename` (a TFTP request's filename, as sent) names
    /// beneath the root, read-only, or says which TFTP error to send instead.
    ///
    /// Usable by other handlers that serve some names from disk.
    pub fn open_file(&self, filename: &[u8]) -> Result<File, Reject> {
        let parts = components(filename)?;
        self.root
            .open_regular(&parts, filename)
            .map(|(file, _)| file)
    }

    /// Like [`open_file`](FsHandler::open_file), for a request from `client`: with
    /// [`unique_root`](FsHandler::unique_root) on, `<root>/<client>/<name>` is tried first.
    pub fn open_file_for(&self, client: IpAddr, filename: &[u8]) -> Result<File, Reject> {
        self.open_unique_root(client, filename)
            .map(|(file, _)| file)
    }

    /// The per-client layer of [`open_file_for`](FsHandler::open_file_for): with
    /// `unique_root` on, `<root>/<client>/<name>` first, then the shared `<root>/<name>`
    /// (never another client's directory). Returns the metadata [`Root::open_regular`]
    /// checked, for the cache and `tsize`.
    fn open_unique_root(
        &self,
        client: IpAddr,
        filename: &[u8],
    ) -> Result<(File, Metadata), Reject> {
        let parts = components(filename)?;
        if self.unique_root {
            let dir = client.to_canonical().to_string();
            let mut own = Vec::with_capacity(parts.len() + 1);
            own.push(dir.as_bytes());
            own.extend_from_slice(&parts);
            match self.root.open_regular(&own, filename) {
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
        self.root.open_regular(&parts, filename)
    }

    /// Forces the fallback resolver, so that tests cover it on kernels with `openat2`.
    #[cfg(test)]
    fn force_walk(mut self) -> FsHandler {
        self.root = self.root.force_walk();
        self
    }
}

impl fmt::Debug for FsHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsHandler")
            .field("root", &self.root)
            .field("unique_root", &self.unique_root)
            .field("cache", &self.cache.is_some())
            .finish()
    }
}

impl Handler for FsHandler {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let Some(cache) = &self.cache else {
            let (file, meta) = self.open_unique_root(request.peer.ip(), request.filename)?;
            return Ok(Box::new(FileSource::with_size(file, meta.len())));
        };
        if self.unique_root {
            // A name means a different path per client: always opened.
            let (file, meta) = self.open_unique_root(request.peer.ip(), request.filename)?;
            return Ok(cache
                .open(&file, &meta, request.now)
                .source(file, meta.len()));
        }
        let parts = components(request.filename)?;
        let path = parts.join(&b'/');
        if let Some(source) = cache.open_by_name(&path, || self.root.lstat(&path)) {
            return Ok(Box::new(source));
        }
        let (file, meta) = self.root.open_regular(&parts, request.filename)?;
        let lookup = cache.open(&file, &meta, request.now);
        if !matches!(lookup, Lookup::Disk) {
            cache.remember(&path, &meta);
        }
        Ok(lookup.source(file, meta.len()))
    }
}

#[cfg(test)]
mod tests {
    //! The tree and request helpers here are shared with the tests of `resolve` and
    //! `cache`.

    use super::*;
    use crate::handler::Notifier;

    use std::fs;
    use std::io::Read;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temporary tree `<tmp>/dyntftp-fs-<pid>-<n>/{root,outside}`, removed on drop.
    pub(super) struct Tree {
        base: PathBuf,
    }

    impl Tree {
        pub(super) fn new() -> Tree {
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

        pub(super) fn root(&self) -> PathBuf {
            self.base.join("root")
        }

        pub(super) fn outside(&self) -> PathBuf {
            self.base.join("outside")
        }

        /// Writes `contents` at `rel` under the root, creating parent directories.
        pub(super) fn file(&self, rel: &str, contents: &[u8]) {
            let path = self.root().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        /// Both resolvers over this root (the `openat2` one only when the kernel has it).
        pub(super) fn handlers(&self) -> Vec<FsHandler> {
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

    pub(super) fn read(handler: &FsHandler, name: &[u8]) -> Result<Vec<u8>, Reject> {
        let mut file = handler.open_file(name)?;
        let mut contents = Vec::new();
        file.read_to_end(&mut contents).unwrap();
        Ok(contents)
    }

    /// What a request gives: the file's contents, or the TFTP error code.
    pub(super) type Served = Result<Vec<u8>, ErrorCode>;

    pub(super) fn code(result: Result<Vec<u8>, Reject>) -> Served {
        result.map_err(|r| r.code)
    }

    pub(super) const NOT_FOUND: Served = Err(ErrorCode::FileNotFound);
    pub(super) const ACCESS: Served = Err(ErrorCode::AccessViolation);

    pub(super) fn ok(contents: &[u8]) -> Served {
        Ok(contents.to_vec())
    }

    pub(super) fn check(h: &FsHandler, cases: &[(&[u8], Served)]) {
        for (name, expected) in cases {
            assert_eq!(
                &code(read(h, name)),
                expected,
                "{} with {:?}",
                name.escape_ascii(),
                h.root
            );
        }
    }

    pub(super) fn request<'a>(
        peer: &str,
        filename: &'a [u8],
        notifier: &'a Notifier,
    ) -> ReadRequest<'a> {
        ReadRequest {
            peer: peer.parse().unwrap(),
            local: "127.0.0.1:69".parse().unwrap(),
            filename,
            mode: crate::packet::Mode::Octet,
            options: crate::packet::Options::EMPTY,
            notifier,
            // Leaked: a test helper's request outlives this call.
            notes: Box::leak(Box::default()),
            now: std::time::Instant::now(),
        }
    }

    pub(super) fn serve(h: &mut FsHandler, peer: &str, name: &[u8]) -> Served {
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
                notes: &crate::handler::SessionNotes::default(),
                now: std::time::Instant::now(),
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
}
