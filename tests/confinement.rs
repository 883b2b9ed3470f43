//! Path confinement of `FsHandler`, black-box: a matrix of hostile names, symbolic links
//! in and out of the root, races that swap links and directories while requests are
//! served, FIFOs, devices, sockets, directories and unreadable files — through the real
//! server over loopback and through `FsHandler::open_file` directly.
//!
//! Both resolvers are tested. The kernel's `openat2` is the normal one; the fallback walk
//! (`O_NOFOLLOW` component by component) is what `FsHandler::new` picks when `openat2` is
//! unavailable, and these tests make it unavailable for real: a seccomp filter installed
//! on the server's thread (and only there) fails `openat2` with `ENOSYS`, as on an old
//! kernel, before `FsHandler::new` probes it.
//!
//! Unreadable files: as root everything is readable, so the server thread sets its
//! file-system user and group IDs to `nobody` (65534) before opening the root. That
//! drops the file-system capabilities of that thread only, and the server then reads
//! files exactly as an unprivileged process would.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use dyntftp::{FsHandler, Handler, ResponseData};
use testkit::*;

/// Which resolver the handler must use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolver {
    Openat2,
    Walk,
}

const RESOLVERS: [Resolver; 2] = [Resolver::Openat2, Resolver::Walk];

/// What a request got.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Served {
    Data(Vec<u8>),
    Error(u16),
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `openat2` fail with `ENOSYS` in the calling thread (and threads it creates).
fn deny_openat2_in_this_thread() {
    const fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }
    // Offset of `nr` in `struct seccomp_data`.
    const NR: u32 = 0;
    let mut filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_openat2 as u32,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only. It is required to install
    // a filter without CAP_SYS_ADMIN and affects this thread only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(
        ret,
        0,
        "PR_SET_NO_NEW_PRIVS: {}",
        io::Error::last_os_error()
    );
    // SAFETY: `program` points to `filter`, a valid BPF program of `len` instructions;
    // both live until the call returns (the kernel copies the program). Without
    // SECCOMP_FILTER_FLAG_TSYNC the filter applies to this thread only.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    };
    assert_eq!(ret, 0, "PR_SET_SECCOMP: {}", io::Error::last_os_error());
}

/// Sets the calling thread's file-system user and group to `nobody` (65534). Only this
/// thread's file accesses change; it loses its file-system capabilities.
fn access_files_as_nobody_in_this_thread() {
    // SAFETY: setfsgid/setfsuid take an integer and change only this thread's credentials.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, 65534);
        libc::syscall(libc::SYS_setfsuid, 65534);
        // Called again, they return the current value: check the change took effect.
        assert_eq!(libc::syscall(libc::SYS_setfsuid, 65534), 65534);
        assert_eq!(libc::syscall(libc::SYS_setfsgid, 65534), 65534);
    }
}

/// Prepares the calling thread for `resolver` (and `nobody` access when `as_nobody` and
/// running as root) and opens an `FsHandler` on `root`, checking which resolver it chose.
fn handler_in_this_thread(root: &Path, resolver: Resolver, as_nobody: bool) -> FsHandler {
    if as_nobody && is_root() {
        access_files_as_nobody_in_this_thread();
    }
    if resolver == Resolver::Walk {
        deny_openat2_in_this_thread();
    }
    let handler = FsHandler::new(root).expect("FsHandler::new");
    assert_eq!(
        handler.uses_openat2(),
        resolver == Resolver::Openat2,
        "resolver in use"
    );
    handler
}

fn spawn_confined(root: &Path, resolver: Resolver, as_nobody: bool) -> ServerGuard {
    let root = root.to_path_buf();
    spawn_server(
        Mode::OwnPort,
        v4(),
        move || Box::new(handler_in_this_thread(&root, resolver, as_nobody)),
        |b| b,
    )
}

/// A request through the server.
fn via_server(server: &ServerGuard, name: &[u8]) -> Served {
    match Client::new(server.mode, server.addr).fetch_with(
        server.addr,
        name,
        "octet",
        &[],
        &mut |_| {},
    ) {
        Ok(got) => Served::Data(got.data),
        Err(ClientError::Error { code, message, .. }) => {
            assert!(
                !message.contains('/') && message.len() < 40,
                "the message reveals nothing: {message:?}"
            );
            Served::Error(code)
        }
        Err(e) => panic!("{:?}: {e:?}", name.escape_ascii().to_string()),
    }
}

/// A request straight to `FsHandler::open_file`.
fn direct(handler: &FsHandler, name: &[u8]) -> Served {
    match handler.open_file(name) {
        Ok(mut file) => {
            let mut data = Vec::new();
            file.read_to_end(&mut data).expect("read");
            Served::Data(data)
        }
        Err(reject) => Served::Error(reject.code.to_u16()),
    }
}

const SECRET: &[u8] = b"TOP SECRET, outside the root";

/// `outer/` holds secrets; `outer/root/` is served.
struct Tree {
    outer: TempDir,
    root: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        let outer = TempDir::new("confine");
        fs::set_permissions(outer.path(), fs::Permissions::from_mode(0o755)).unwrap();
        outer.write("secret.txt", SECRET);
        outer.write("outdir/secret.txt", SECRET);
        outer.write("outdir/f.txt", SECRET);
        let root = outer.subdir("root");
        let tree = Tree { outer, root };
        tree.file("small.txt", SMALL);
        tree.file("a/b", b"a/b inside");
        tree.file("a/inside.txt", b"inside");
        tree.file("etc/passwd", b"a harmless passwd inside the root");
        tree.file("realdir/f.txt", b"inside f");
        let deep: String = "d/".repeat(100);
        tree.file(&format!("{deep}deep.txt"), b"deep inside");
        let s = |target: &str, link: &str| symlink(target, tree.root.join(link)).unwrap();
        s("../secret.txt", "up-file");
        s("../outdir", "up-dir");
        s(
            tree.outer.path().join("secret.txt").to_str().unwrap(),
            "abs-file",
        );
        s(
            tree.outer.path().join("outdir").to_str().unwrap(),
            "abs-dir",
        );
        s(tree.root.join("small.txt").to_str().unwrap(), "abs-inside");
        s("small.txt", "rel-inside");
        s("a", "rel-dir-inside");
        s("../../../../../../../../../etc/passwd", "many-ups");
        s("/etc/passwd", "etc-link");
        s("/proc/self/root/etc/passwd", "magic");
        s("/dev/zero", "dev-link");
        s("loop", "loop");
        s("a/../../secret.txt", "a-up");
        tree
    }

    fn file(&self, rel: &str, data: &[u8]) {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
    }
}

/// The confinement matrix: (name, answer with openat2, answer with the walk).
fn matrix() -> Vec<(Vec<u8>, Served, Served)> {
    use Served::{Data, Error};
    let both = |name: &[u8], want: Served| (name.to_vec(), want.clone(), want);
    let too_deep = "x/".repeat(2100) + "f";
    let climb_then_back = "a/".repeat(500) + &"../".repeat(500) + "small.txt";
    let climb_too_far = "a/".repeat(500) + &"../".repeat(501) + "small.txt";
    vec![
        both(b"small.txt", Data(SMALL.to_vec())),
        both(b"../x", Error(2)),
        both(b"../secret.txt", Error(2)),
        both(b"a/../../x", Error(2)),
        both(b"a/../../secret.txt", Error(2)),
        both(b"../root/small.txt", Error(2)),
        both(b"..", Error(2)),
        // An absolute name is taken relative to the root: never the real /etc/passwd.
        both(
            b"/etc/passwd",
            Data(b"a harmless passwd inside the root".to_vec()),
        ),
        both(
            b"//etc/passwd",
            Data(b"a harmless passwd inside the root".to_vec()),
        ),
        both(b"/etc/shadow", Error(1)),
        both(b"/../etc/passwd", Error(2)),
        // Backslashes are separators.
        both(b"..\\..\\x", Error(2)),
        both(b"..\\secret.txt", Error(2)),
        both(b"a\\inside.txt", Data(b"inside".to_vec())),
        both(
            b"\\etc\\passwd",
            Data(b"a harmless passwd inside the root".to_vec()),
        ),
        both(b"a/./b", Data(b"a/b inside".to_vec())),
        both(b"./a/.//./b", Data(b"a/b inside".to_vec())),
        both(b"a/../a/inside.txt", Data(b"inside".to_vec())),
        // Very deep paths.
        (
            format!("{}deep.txt", "d/".repeat(100)).into_bytes(),
            Data(b"deep inside".to_vec()),
            Data(b"deep inside".to_vec()),
        ),
        both(format!("{}nope", "d/".repeat(100)).as_bytes(), Error(1)),
        both(too_deep.as_bytes(), Error(1)),
        both(climb_then_back.as_bytes(), Data(SMALL.to_vec())),
        both(climb_too_far.as_bytes(), Error(2)),
        // Symbolic links that lead out, as files and as directories.
        both(b"up-file", Error(2)),
        both(b"up-dir/secret.txt", Error(2)),
        both(b"abs-file", Error(2)),
        both(b"abs-dir/secret.txt", Error(2)),
        both(b"many-ups", Error(2)),
        both(b"etc-link", Error(2)),
        both(b"magic", Error(2)),
        both(b"dev-link", Error(2)),
        both(b"a-up", Error(2)),
        both(b"loop", Error(2)),
        // Links that stay inside: followed by openat2 (relative ones), never by the walk.
        (b"rel-inside".to_vec(), Data(SMALL.to_vec()), Error(2)),
        (
            b"rel-dir-inside/inside.txt".to_vec(),
            Data(b"inside".to_vec()),
            Error(2),
        ),
        // An absolute link is refused even when it names a place inside the root.
        both(b"abs-inside", Error(2)),
        // Directories and the root itself.
        both(b"a", Error(2)),
        both(b"a/", Error(2)),
        both(b"/", Error(2)),
        both(b".", Error(2)),
        both(b"a/..", Error(2)),
        // Empty components are dropped, so a trailing separator changes nothing.
        both(b"small.txt/", Data(SMALL.to_vec())),
        both(b"small.txt/x", Error(1)),
    ]
}

/// Asks for every name of the matrix no longer than `max_name` bytes.
fn check_matrix(
    resolver: Resolver,
    ask: &mut dyn FnMut(&[u8]) -> Served,
    how: &str,
    max_name: usize,
) {
    for (name, openat2, walk) in matrix() {
        if name.len() > max_name {
            continue;
        }
        let want = if resolver == Resolver::Openat2 {
            openat2
        } else {
            walk
        };
        let got = ask(&name);
        let shown: String = name.escape_ascii().to_string().chars().take(80).collect();
        assert_eq!(got, want, "{how} {resolver:?}: {shown}");
        if let Served::Data(data) = &got {
            assert!(!data.windows(10).any(|w| w == &SECRET[..10]), "{shown}");
        }
    }
}

#[test]
fn confinement_matrix_through_the_server() {
    let tree = Tree::new();
    for resolver in RESOLVERS {
        let server = spawn_confined(&tree.root, resolver, false);
        // Longer names do not fit in a request (opcode, NULs, "octet"): ERROR 4.
        let max_name = dyntftp::packet::MAX_REQUEST_LEN - 9;
        check_matrix(
            resolver,
            &mut |name| via_server(&server, name),
            "server",
            max_name,
        );
    }
}

#[test]
fn confinement_matrix_through_open_file() {
    let tree = Tree::new();
    for resolver in RESOLVERS {
        let root = tree.root.clone();
        // The resolver is chosen per thread (the seccomp filter stays on its thread).
        thread::spawn(move || {
            let handler = handler_in_this_thread(&root, resolver, false);
            let ask = &mut |name: &[u8]| direct(&handler, name);
            check_matrix(resolver, ask, "open_file", usize::MAX);
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(ret, 0, "mkfifo: {}", io::Error::last_os_error());
}

/// Makes a character device `major:minor` at `path` (needs CAP_MKNOD).
fn mknod_char(path: &Path, major: u32, minor: u32) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let ret = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[test]
fn fifos_devices_sockets_and_directories_are_refused_without_blocking() {
    let tree = Tree::new();
    mkfifo(&tree.root.join("fifo"));
    mkfifo(&tree.root.join("fifo-with-writer"));
    let _socket = std::os::unix::net::UnixListener::bind(tree.root.join("sock")).unwrap();
    // A FIFO with a writer holding it open and data waiting: still refused.
    let fifo_path = tree.root.join("fifo-with-writer");
    let writer = thread::spawn(move || {
        let mut options = fs::OpenOptions::new();
        options.read(true).write(true);
        let mut fifo = options.open(&fifo_path).unwrap();
        std::io::Write::write_all(&mut fifo, b"data in the pipe").unwrap();
        fifo
    });
    let _fifo_held = writer.join().unwrap();
    let devices = if is_root() {
        // Container runtimes may forbid mknod even to root.
        match (
            mknod_char(&tree.root.join("null"), 1, 3),
            mknod_char(&tree.root.join("zero"), 1, 5),
        ) {
            (Ok(()), Ok(())) => true,
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("SKIPPED (device nodes only): mknod failed: {e}");
                false
            }
        }
    } else {
        eprintln!("SKIPPED (device nodes only): creating device nodes needs root");
        false
    };
    for resolver in RESOLVERS {
        let server = spawn_confined(&tree.root, resolver, false);
        let mut names: Vec<&[u8]> = vec![b"fifo", b"fifo-with-writer", b"sock", b"a", b"d/d"];
        if devices {
            names.extend_from_slice(&[b"null", b"zero"]);
        }
        for name in names {
            // If opening blocked the loop, this answer would never come.
            assert_eq!(
                via_server(&server, name),
                Served::Error(2),
                "{resolver:?}: {}",
                name.escape_ascii()
            );
            assert_eq!(
                via_server(&server, b"small.txt"),
                Served::Data(SMALL.to_vec())
            );
        }
        let (sessions, _) = server.stop();
        assert!(
            sessions.iter().all(|s| s.filename == "small.txt"),
            "no session started for a refused name"
        );
    }
}

#[test]
fn unreadable_files_are_access_violations() {
    let tree = Tree::new();
    tree.file("private.txt", b"nobody may read this");
    fs::set_permissions(
        tree.root.join("private.txt"),
        fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    tree.file("locked/inner.txt", b"behind a locked directory");
    fs::set_permissions(tree.root.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    tree.file("public.txt", b"anyone may read this");
    // Whatever the umask: the root is searchable and public.txt readable by anyone.
    fs::set_permissions(&tree.root, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(
        tree.root.join("public.txt"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    if is_root() {
        eprintln!("running as root: the server thread reads files as nobody (setfsuid)");
    }
    for resolver in RESOLVERS {
        let server = spawn_confined(&tree.root, resolver, true);
        assert_eq!(
            via_server(&server, b"public.txt"),
            Served::Data(b"anyone may read this".to_vec()),
            "{resolver:?}"
        );
        assert_eq!(
            via_server(&server, b"private.txt"),
            Served::Error(2),
            "{resolver:?}"
        );
        assert_eq!(
            via_server(&server, b"locked/inner.txt"),
            Served::Error(2),
            "{resolver:?}"
        );
    }
    // Let TempDir remove them.
    fs::set_permissions(tree.root.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
}

/// Repeatedly swaps `link` between `inside` and `outside` targets (atomically, by renaming
/// a fresh symlink over it) until stopped; returns the number of swaps.
fn swap_link_until(
    stop: Arc<AtomicBool>,
    root: PathBuf,
    link: &str,
    targets: [&str; 2],
) -> thread::JoinHandle<u64> {
    let link = root.join(link);
    let tmp = root.join(format!(
        ".{}.tmp",
        link.file_name().unwrap().to_string_lossy()
    ));
    let targets = targets.map(str::to_owned);
    let (started_tx, started) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut swaps = 0u64;
        while !stop.load(Ordering::Relaxed) && swaps < 50_000_000 {
            let _ = fs::remove_file(&tmp);
            symlink(&targets[(swaps % 2) as usize], &tmp).unwrap();
            fs::rename(&tmp, &link).unwrap();
            swaps += 1;
            if swaps == 1 {
                started_tx.send(()).unwrap();
            }
        }
        swaps
    });
    started.recv().unwrap();
    handle
}

#[test]
fn symlinks_swapped_while_requests_are_served_never_escape() {
    let tree = Tree::new();
    symlink("small.txt", tree.root.join("flip")).unwrap();
    symlink("realdir", tree.root.join("dirflip")).unwrap();
    for resolver in RESOLVERS {
        let server = spawn_confined(&tree.root, resolver, false);
        for (link, targets, name, inside) in [
            ("flip", ["small.txt", "../secret.txt"], &b"flip"[..], SMALL),
            (
                "dirflip",
                ["realdir", "../outdir"],
                b"dirflip/f.txt",
                b"inside f",
            ),
        ] {
            let stop = Arc::new(AtomicBool::new(false));
            let swapper = swap_link_until(stop.clone(), tree.root.clone(), link, targets);
            let (mut served, mut refused, mut naive_escapes) = (0, 0, 0);
            for _ in 0..300 {
                match via_server(&server, name) {
                    Served::Data(data) => {
                        assert_eq!(data, inside, "{resolver:?} {link}: escaped");
                        served += 1;
                    }
                    Served::Error(code) => {
                        assert!(code == 1 || code == 2, "{resolver:?} {link}: ERROR {code}");
                        refused += 1;
                    }
                }
                // What a naive open of the same path gets meanwhile.
                let naive = std::str::from_utf8(name).unwrap();
                if fs::read(tree.root.join(naive)).is_ok_and(|d| d == SECRET) {
                    naive_escapes += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            let swaps = swapper.join().unwrap();
            eprintln!(
                "{resolver:?} {link}: {served} served, {refused} refused during {swaps} swaps; \
                 a naive open escaped {naive_escapes} times"
            );
            if resolver == Resolver::Walk {
                assert_eq!(served, 0, "the walk follows no symbolic link");
            }
        }
    }
}

#[test]
fn directory_replaced_by_a_symlink_while_requests_are_served_never_escapes() {
    let tree = Tree::new();
    for resolver in RESOLVERS {
        let server = spawn_confined(&tree.root, resolver, false);
        let stop = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = mpsc::channel();
        let flipper = {
            let stop = stop.clone();
            let root = tree.root.clone();
            thread::spawn(move || {
                let (dir, parked) = (root.join("realdir"), root.join(".parked"));
                let mut flips = 0u64;
                while !stop.load(Ordering::Relaxed) && flips < 10_000_000 {
                    // realdir becomes a link to the secrets, then the real directory again.
                    fs::rename(&dir, &parked).unwrap();
                    symlink("../outdir", &dir).unwrap();
                    fs::remove_file(&dir).unwrap();
                    fs::rename(&parked, &dir).unwrap();
                    flips += 1;
                    if flips == 1 {
                        started_tx.send(()).unwrap();
                    }
                }
                flips
            })
        };
        started.recv().unwrap();
        let mut served = 0;
        for _ in 0..300 {
            match via_server(&server, b"realdir/f.txt") {
                Served::Data(data) => {
                    assert_eq!(data, b"inside f", "{resolver:?}: escaped");
                    served += 1;
                }
                Served::Error(code) => assert!(code == 1 || code == 2, "ERROR {code}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.join().unwrap();
        eprintln!("{resolver:?}: realdir/f.txt served {served} of 300 during {flips} flips");
    }
}

#[test]
fn a_link_swapped_mid_transfer_changes_nothing_already_open() {
    let tree = Tree::new();
    let v1 = pseudo_random(200_000, 11);
    tree.file("v1.bin", &v1);
    tree.file("v2.bin", &pseudo_random(200_000, 12));
    symlink("v1.bin", tree.root.join("current")).unwrap();
    let server = spawn_confined(&tree.root, Resolver::Openat2, false);
    for target in ["../secret.txt", "v2.bin"] {
        let link = tree.root.join("current");
        let tmp = tree.root.join(".current.tmp");
        let mut swapped = false;
        let got = Client::new(server.mode, server.addr)
            .fetch_with(server.addr, b"current", "octet", &[], &mut |p| {
                if p.block == 10 {
                    symlink(target, &tmp).unwrap();
                    fs::rename(&tmp, &link).unwrap();
                    swapped = true;
                }
            })
            .expect("transfer");
        assert!(swapped);
        assert!(
            got.data == v1,
            "after swapping to {target}: the file opened is served"
        );
        // Back to v1 for the next round.
        symlink("v1.bin", &tmp).unwrap();
        fs::rename(&tmp, &link).unwrap();
    }
    // A new request follows the link as it is now.
    symlink("v2.bin", tree.root.join(".current.tmp")).unwrap();
    fs::rename(tree.root.join(".current.tmp"), tree.root.join("current")).unwrap();
    assert_eq!(
        via_server(&server, b"current"),
        Served::Data(pseudo_random(200_000, 12))
    );
}

/// `Handler::open` (what the server calls) confines exactly as `open_file`.
#[test]
fn handler_open_confines_like_open_file() {
    let tree = Tree::new();
    let mut handler = FsHandler::new(&tree.root).unwrap();
    let notifier = dyntftp::Notifier::detached();
    for (name, openat2, _) in matrix() {
        let request = dyntftp::ReadRequest {
            peer: v4(),
            local: v4(),
            filename: &name,
            mode: dyntftp::Mode::Octet,
            options: dyntftp::packet::Options::EMPTY,
            notifier: &notifier,
            notes: &dyntftp::SessionNotes::default(),
            now: std::time::Instant::now(),
        };
        let got = match handler.open(&request) {
            Ok(mut source) => {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = source.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    data.extend_from_slice(&buf[..n]);
                }
                Served::Data(data)
            }
            Err(reject) => Served::Error(reject.code.to_u16()),
        };
        if handler.uses_openat2() {
            assert_eq!(got, openat2, "{}", name.escape_ascii());
        }
    }
}

fn spawn_ignoring_case(root: &Path, resolver: Resolver) -> ServerGuard {
    let root = root.to_path_buf();
    spawn_server(
        Mode::OwnPort,
        v4(),
        move || Box::new(handler_in_this_thread(&root, resolver, false).ignore_case(true)),
        |b| b,
    )
}

/// With `ignore_case`, the whole matrix holds; names matched only by case reach files and
/// directories but never a symbolic link; and the per-directory index follows changes: a
/// file created after its directory was indexed is found, a removed one is not served, a
/// link put in its place is not followed.
#[test]
fn ignore_case_stays_confined_and_follows_changes() {
    use Served::{Data, Error};
    let tree = Tree::new();
    tree.file("Boot/BCD", b"bcd");
    for resolver in RESOLVERS {
        let server = spawn_ignoring_case(&tree.root, resolver);
        let ask = |name: &[u8]| via_server(&server, name);
        check_matrix(
            resolver,
            &mut |name| ask(name),
            "server, ignore-case",
            dyntftp::packet::MAX_REQUEST_LEN - 9,
        );
        assert_eq!(ask(b"SMALL.TXT"), Data(SMALL.to_vec()));
        assert_eq!(ask(b"A/INSIDE.TXT"), Data(b"inside".to_vec()));
        assert_eq!(ask(b"\\boot\\bcd"), Data(b"bcd".to_vec()));
        for name in [
            &b"UP-FILE"[..],
            b"Up-Dir/secret.txt",
            b"ABS-FILE",
            b"ABS-DIR/secret.txt",
            b"ABS-INSIDE",
            b"REL-INSIDE",
            b"REL-DIR-INSIDE/inside.txt",
            b"MAGIC",
            b"ETC-LINK",
            b"Loop",
        ] {
            assert_eq!(ask(name), Error(1), "{}", name.escape_ascii());
        }

        let new = format!("Boot/New-{resolver:?}.cfg");
        let asked = new.to_uppercase();
        assert_eq!(ask(asked.as_bytes()), Error(1));
        tree.file(&new, b"new");
        assert_eq!(ask(asked.as_bytes()), Data(b"new".to_vec()), "created");
        fs::remove_file(tree.root.join(&new)).unwrap();
        assert_eq!(ask(asked.as_bytes()), Error(1), "removed");
        symlink("../../secret.txt", tree.root.join(&new)).unwrap();
        assert_eq!(ask(asked.as_bytes()), Error(1), "replaced by a link");
        fs::remove_file(tree.root.join(&new)).unwrap();
        // The same in the root directory, and for a directory on the way.
        tree.file("Late/File", b"late");
        assert_eq!(ask(b"late/file"), Data(b"late".to_vec()));
        fs::remove_dir_all(tree.root.join("Late")).unwrap();
        assert_eq!(ask(b"late/file"), Error(1));
        symlink("a", tree.root.join("Late")).unwrap();
        tree.file("a/file", b"through a link");
        assert_eq!(
            ask(b"late/file"),
            Error(1),
            "a directory link matched by case"
        );
        fs::remove_file(tree.root.join("Late")).unwrap();
        fs::remove_file(tree.root.join("a/file")).unwrap();
    }
}
