//! Confinement: how a requested name becomes an open regular file beneath the root, with
//! the rules of the [module docs](crate::fs#confinement).
//!
//! Below `FsHandler`'s own layers (`open_file`, `open_file_for`, and `open_unique_root`,
//! which tries the client's directory first), a request goes through these, outermost
//! first; each adds one thing:
//!
//! - [`components`]: the name normalised into path components, or refused;
//! - [`Root::open_regular`]: only a regular file is served, and an OS error becomes the
//!   TFTP error to send;
//! - [`Root::open_with_case_fallback`]: a missing name is looked up again ignoring case,
//!   when that is on;
//! - [`Root::open`]: the resolver chosen once, at construction;
//! - [`open_by_openat2`] or [`open_by_walk`]: the two resolvers, over `sys::openat2` and
//!   `sys::openat`.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use log::debug;

use crate::handler::Reject;
use crate::packet::ErrorCode;
use crate::sys;

use super::case_index::CaseIndex;

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

/// The root directory, and how names are resolved beneath it. Cloning shares the
/// descriptor.
#[derive(Clone, Debug)]
pub(super) struct Root {
    /// `O_PATH | O_DIRECTORY | O_CLOEXEC` descriptor of the root, opened once (shared by
    /// clones: `openat` from several threads on one directory descriptor is safe).
    dir: Arc<OwnedFd>,
    /// Chosen once, at construction.
    resolver: Resolver,
    /// Retry a missing name with ASCII case-insensitive matching.
    pub(super) ignore_case: bool,
    /// The directories listed for that, indexed by case (shared by clones).
    case_index: CaseIndex,
}

/// How paths are resolved beneath the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolver {
    /// One `openat2` call with `RESOLVE_BENEATH`.
    Openat2,
    /// Component by component with `openat(.., O_NOFOLLOW)`: every symlink is refused.
    Walk,
}

impl Root {
    /// Opens `path` (which must be an existing directory) and probes whether the kernel
    /// offers `openat2`. The error names `path`.
    pub(super) fn new(path: &Path) -> io::Result<Root> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("TFTP root {}: {e}", path.display())))?;
        let dir = Arc::new(OwnedFd::from(dir));
        let probe = sys::openat2(
            dir.as_fd(),
            c".",
            libc::O_PATH | libc::O_DIRECTORY,
            RESOLVE_FLAGS,
        );
        let resolver = match probe {
            Ok(_) => Resolver::Openat2,
            Err(e) => {
                // Once per handler and without request data, so at info: operators should
                // know that symlinks will be refused.
                log::info!("openat2 unavailable ({e}): symbolic links under the root are refused");
                Resolver::Walk
            }
        };
        debug!("serving files from {} with {resolver:?}", path.display());
        Ok(Root {
            dir,
            resolver,
            ignore_case: false,
            case_index: CaseIndex::new(),
        })
    }

    /// `stat` of `path` (normalised components joined with `/`) beneath the root, not
    /// following a final symbolic link; links on the way are followed, so the result
    /// proves nothing about confinement on its own (see `Cache::open_by_name`).
    pub(super) fn lstat(&self, path: &[u8]) -> io::Result<libc::stat64> {
        sys::lstat_at(self.dir.as_fd(), path)
    }

    /// Whether the `openat2` resolver is in use (else the walk).
    pub(super) fn uses_openat2(&self) -> bool {
        self.resolver == Resolver::Openat2
    }

    /// Opens normalised `parts` (see [`components`]) and checks that it is a regular file,
    /// or says which TFTP error to send; `filename` is for the log.
    pub(super) fn open_regular(
        &self,
        parts: &[&[u8]],
        filename: &[u8],
    ) -> Result<(File, Metadata), Reject> {
        let name = LogName(filename);
        let file = File::from(self.open_with_case_fallback(parts).map_err(|e| {
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

    /// Opens `parts` as a file; with `ignore_case`, a name that does not exist exactly
    /// (`ENOENT`, `ENOTDIR`) is looked up again ignoring case ([`Root::resolve_case`]).
    fn open_with_case_fallback(&self, parts: &[&[u8]]) -> io::Result<OwnedFd> {
        match self.open(parts, FILE_FLAGS) {
            Err(e)
                if self.ignore_case
                    && matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) =>
            {
                let found = self.resolve_case(parts)?;
                let found: Vec<&[u8]> = found.iter().map(Vec::as_slice).collect();
                self.open(&found, FILE_FLAGS)
            }
            result => result,
        }
    }

    /// Opens `parts` beneath the root with `flags`, with the resolver chosen at
    /// construction (the root itself when `parts` is empty).
    fn open(&self, parts: &[&[u8]], flags: libc::c_int) -> io::Result<OwnedFd> {
        let root = self.dir.as_fd();
        if parts.is_empty() {
            return sys::openat(root, b".", flags);
        }
        match self.resolver {
            Resolver::Openat2 => open_by_openat2(root, parts, flags),
            Resolver::Walk => open_by_walk(root, parts, flags | libc::O_NOFOLLOW),
        }
    }

    /// Finds the names on disk that match `parts` ignoring ASCII case, one directory at a
    /// time (each directory opened with the root's resolver, so still confined). An
    /// exact name is always preferred; a name that matches only case-insensitively is
    /// never a symbolic link; among several matches the smallest name (bytewise) wins.
    /// Directories are looked up in their [`CaseIndex`], listed only when they change.
    fn resolve_case(&self, parts: &[&[u8]]) -> io::Result<Vec<Vec<u8>>> {
        let mut found: Vec<Vec<u8>> = Vec::with_capacity(parts.len());
        for part in parts {
            let prefix: Vec<&[u8]> = found.iter().map(Vec::as_slice).collect();
            let dir = self.open(&prefix, DIR_FLAGS)?;
            if sys::lstat_at(dir.as_fd(), part).is_ok() {
                found.push(part.to_vec());
                continue;
            }
            match self.case_index.find(&dir, part)? {
                Some(name) => found.push(name),
                None => return Err(io::Error::from_raw_os_error(libc::ENOENT)),
            }
        }
        Ok(found)
    }

    /// Forces the fallback resolver, so that tests cover it on kernels with `openat2`.
    #[cfg(test)]
    pub(super) fn force_walk(mut self) -> Root {
        self.resolver = Resolver::Walk;
        self
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

/// Splits a requested filename into the path components [`FsHandler`](super::FsHandler)
/// would open, with the same rules (step 1 of the [module docs](crate::fs#confinement)):
/// `/` and `\\` separate, empty and `.` components are dropped, `..` is resolved lexically
/// and may not climb above the root, control characters and names of the root itself are
/// refused.
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

/// Opens `components` beneath `root` with one `openat2` call, retried a few times on
/// `EAGAIN`.
fn open_by_openat2(
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
fn open_by_walk(
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

/// The TFTP error for an OS error while opening (see the table in the [module
/// docs](crate::fs#errors-sent-to-the-client)).
pub(super) fn reject_for(e: &io::Error) -> Reject {
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
pub(super) struct LogName<'a>(pub(super) &'a [u8]);

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
    use crate::fs::tests::{check, code, ok, read, Tree, ACCESS, NOT_FOUND};
    use crate::fs::FsHandler;

    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;
    use std::{fs, thread};

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
            assert_eq!(code(read(&h, name)), ok(b"latin1"), "{:?}", h.root.resolver);
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
            let resolver = h.root.resolver;
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
                assert_eq!(code(read(&h, b"secret")), ACCESS, "{:?}", h.root.resolver);
            }
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
                        assert_eq!(contents, b"inside", "escaped with {:?}", h.root.resolver);
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
                h.root.resolver
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

    #[test]
    fn log_name_is_escaped_and_truncated() {
        assert_eq!(LogName(b"a\n\xff").to_string(), "\"a\\n\\xff\"");
        let long = LogName(&[b'x'; 1000]).to_string();
        assert!(long.ends_with("... (1000 bytes)"), "{long}");
        assert!(long.len() < 250);
    }
}
