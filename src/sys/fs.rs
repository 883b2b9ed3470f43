//! File-system calls std does not offer: `openat` and `openat2` relative to a directory
//! descriptor, `fstatat` that never follows a link, and the listing of a directory given
//! by a descriptor (`fdopendir`/`readdir`). The confinement rules built on them are in
//! `crate::fs`.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// `openat(dir, name, flags)` for one path component, retried on `EINTR`.
pub fn openat(dir: BorrowedFd<'_>, name: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let name = c_name(name)?;
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

/// The `open_how` of `linux/openat2.h` (version 0, 24 bytes). libc's own is
/// `#[non_exhaustive]` and so cannot be built outside libc without `unsafe`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, {flags, resolve})` (Linux 5.6+), retried on `EINTR`. `resolve` is a
/// set of `RESOLVE_*` flags.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve,
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
                size_of::<OpenHow>(),
            )
        };
        if let Some(fd) = owned_fd(ret as RawFd)? {
            return Ok(fd);
        }
    }
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: the entry itself, never a link's target.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<libc::stat64> {
    let name = c_name(name)?;
    let mut st = MaybeUninit::<libc::stat64>::uninit();
    // SAFETY: `name` is NUL-terminated and outlives the call; `st` is valid for writes of a
    // `stat64`; `dir` is an open descriptor borrowed for the call.
    let ret = unsafe {
        libc::fstatat64(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat returned 0, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// Lists the directory `dir` (opened with `O_RDONLY | O_DIRECTORY`, and closed here):
/// calls `visit(dir, name, d_type)` for every entry, `.` and `..` included, in directory
/// order. `dir` is lent to `visit` for calls such as [`lstat_at`]; `d_type` is a `DT_*`
/// value, possibly `DT_UNKNOWN`.
pub fn for_each_entry(
    dir: OwnedFd,
    mut visit: impl FnMut(BorrowedFd<'_>, &[u8], u8),
) -> io::Result<()> {
    let raw = dir.into_raw_fd();
    // SAFETY: `raw` is an open directory descriptor we own; on success fdopendir takes
    // ownership of it (closedir closes it), on failure we close it.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    // SAFETY: `dirp` is valid; the descriptor it owns stays open until the closedir below,
    // after the last use of this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(libc::dirfd(dirp)) };
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells the end of the directory (NULL,
        // errno 0) from an error (NULL, errno set).
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dirp` is a valid open directory stream, used by this thread only.
        let entry = unsafe { libc::readdir64(dirp) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(e),
            };
        }
        // SAFETY: readdir returned a valid entry whose d_name is NUL-terminated; it stays
        // valid until the next readdir/closedir on `dirp`, and `visit` can only borrow it
        // for the duration of its call.
        let (name, d_type) = unsafe {
            (
                CStr::from_ptr((*entry).d_name.as_ptr()).to_bytes(),
                (*entry).d_type,
            )
        };
        visit(fd, name, d_type);
    };
    // SAFETY: `dirp` is valid and closed exactly once.
    unsafe { libc::closedir(dirp) };
    result
}

/// `name` as a C string; a NUL byte inside it is `InvalidInput`.
fn c_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
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

/// Makes a FIFO at `path` (tests: opening it must not block the event loop).
#[cfg(test)]
pub fn mkfifo(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = c_name(path.as_os_str().as_bytes())?;
    // SAFETY: `path` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(path.as_ptr(), 0o644) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes a character device node at `path` (tests; needs root): `/dev/null` is 1, 3.
#[cfg(test)]
pub fn mknod_char(path: &std::path::Path, major: u32, minor: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = c_name(path.as_os_str().as_bytes())?;
    let dev = libc::makedev(major, minor);
    // SAFETY: `path` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, dev) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
