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
//! # Errors sent to the client
//!
//! | Cause | TFTP error |
//! |-------|------------|
//! | `ENOENT`, `ENOTDIR`, `ENAMETOOLONG`, a path longer than `PATH_MAX` | 1 "file not found" |
//! | `..` above the root, control characters, the root itself, not a regular file | 2 "access violation" |
//! | `EACCES`, `EPERM`, `EXDEV` (escape), `ELOOP` (symlink loop, or any symlink in the fallback) | 2 "access violation" |
//! | `EMFILE`, `ENFILE`, `ENOMEM`, `EIO` (a server-side, usually temporary, problem) | 0 "cannot open file" |
//! | anything else | 2 "access violation" |
//!
//! Messages are fixed strings: they never contain a server path or an OS error text. The
//! details (the requested name, escaped and truncated, and the `errno`) are logged at
//! `debug` level only.

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use log::debug;

use crate::handler::{Handler, ReadRequest, Reject};
use crate::packet::ErrorCode;
use crate::response::{FileSource, ResponseData};

/// Flags of every file open: read-only, never a controlling terminal, never blocking (a FIFO
/// must not stall the event loop).
const FILE_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_LARGEFILE;

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
pub struct FsHandler {
    /// `O_PATH | O_DIRECTORY | O_CLOEXEC` descriptor of the root, opened once.
    root: OwnedFd,
    /// Chosen once, at construction.
    resolver: Resolver,
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
        let root = OwnedFd::from(dir);
        let resolver = match openat2(root.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY) {
            Ok(_) => Resolver::Openat2,
            Err(e) => {
                // Once per handler and without request data, so at info: operators should
                // know that symlinks will be refused.
                log::info!("openat2 unavailable ({e}): symbolic links under the root are refused");
                Resolver::Walk
            }
        };
        debug!("serving files from {} with {resolver:?}", path.display());
        Ok(FsHandler { root, resolver })
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
        let name = LogName(filename);
        let components = normalise(filename).map_err(|refusal| {
            debug!("refused {name}: {}", refusal.reason());
            refusal.reject()
        })?;
        let opened = match self.resolver {
            Resolver::Openat2 => open_beneath(self.root.as_fd(), &components),
            Resolver::Walk => open_walk(self.root.as_fd(), &components),
        };
        let file = File::from(opened.map_err(|e| {
            debug!("cannot open {name}: {e}");
            reject_for(&e)
        })?);
        match file.metadata() {
            Ok(meta) if meta.is_file() => Ok(file),
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
        let file = self.open_file(request.filename)?;
        let source = FileSource::new(file).map_err(|e| {
            debug!("cannot stat {}: {e}", LogName(request.filename));
            reject_for(&e)
        })?;
        Ok(Box::new(source))
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
fn open_beneath(root: BorrowedFd<'_>, components: &[&[u8]]) -> io::Result<OwnedFd> {
    let path = CString::new(components.join(&b'/'))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut tries = 0;
    loop {
        match openat2(root, &path, FILE_FLAGS) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < EAGAIN_RETRIES => {
                tries += 1;
            }
            result => return result,
        }
    }
}

/// Opens `components` beneath `root` one at a time, following no symbolic link.
fn open_walk(root: BorrowedFd<'_>, components: &[&[u8]]) -> io::Result<OwnedFd> {
    let (last, dirs) = components
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    let mut dir: Option<OwnedFd> = None;
    for component in dirs {
        let parent = dir.as_ref().map_or(root, |fd| fd.as_fd());
        // O_PATH | O_NOFOLLOW opens a symlink itself rather than failing with ENOTDIR, so
        // the fstat below can tell "symlink" (refused) from "not a directory" (not found).
        let fd = openat(
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
    openat(parent, last, FILE_FLAGS | libc::O_NOFOLLOW)
}

/// The `open_how` of `linux/openat2.h` (version 0, 24 bytes). libc's own is
/// `#[non_exhaustive]` and so cannot be built outside libc without `unsafe`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, {flags, resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS})`,
/// retried on `EINTR`.
fn openat2(dir: BorrowedFd<'_>, path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve: RESOLVE_FLAGS,
    };
    loop {
        // SAFETY: `path` is NUL-terminated and `how` is a valid `open_how` whose exact size
        // is passed; both outlive the call, which only reads them. `dir` is an open
        // descriptor borrowed for the duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if let Some(fd) = owned_fd(ret as RawFd)? {
            return Ok(fd);
        }
    }
}

/// `openat(dir, name, flags)` for one path component, retried on `EINTR`.
fn openat(dir: BorrowedFd<'_>, name: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is an open
        // descriptor borrowed for the duration of the call; no mode is needed without
        // O_CREAT.
        let ret = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        if let Some(fd) = owned_fd(ret)? {
            return Ok(fd);
        }
    }
}

/// Takes ownership of the descriptor an open call returned: `Ok(None)` on `EINTR` (call
/// again), the OS error on any other failure.
fn owned_fd(ret: RawFd) -> io::Result<Option<OwnedFd>> {
    if ret >= 0 {
        // SAFETY: a non-negative return of open/openat/openat2 is a new descriptor that
        // nothing else owns.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(ret) }));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINTR) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The TFTP error for an OS error while opening (see the table in the module docs).
fn reject_for(e: &io::Error) -> Reject {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG) => Reject::not_found(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EIO) => {
            Reject::new(ErrorCode::NotDefined, "cannot open file")
        }
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

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
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
        let fifo = CString::new(tree.root().join("fifo").into_os_string().into_vec()).unwrap();
        // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
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
        if is_root() {
            let dev = CString::new(tree.root().join("null").into_os_string().into_vec()).unwrap();
            // SAFETY: `dev` is a NUL-terminated path that outlives the call.
            let made =
                unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
            if made == 0 {
                names.push(b"null");
            } else {
                eprintln!(
                    "skipping the device case: mknod failed: {}",
                    io::Error::last_os_error()
                );
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
            if is_root() {
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
    fn log_name_is_escaped_and_truncated() {
        assert_eq!(LogName(b"a\n\xff").to_string(), "\"a\\n\\xff\"");
        let long = LogName(&[b'x'; 1000]).to_string();
        assert!(long.ends_with("... (1000 bytes)"), "{long}");
        assert!(long.len() < 250);
    }
}
