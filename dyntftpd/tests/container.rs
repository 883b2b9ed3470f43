//! The container image: built from the repository's `Containerfile` with podman around the
//! binary under test, run as its non-root user, and fetched from with curl over a
//! published port; its scrape endpoint answers, and SIGTERM stops it with status 0.
//!
//! No image registry is needed: the Debian base is made with `mmdebstrap --variant=minbase`
//! for the host's own release (the binary links the host's glibc) and imported as
//! `localhost/debian:<release>-slim`, once: later runs reuse it. Needs root (rootful
//! podman; `setcap` on the binary), podman, runc, mmdebstrap, setcap and curl; skips
//! loudly without them unless `DYNTFTP_REQUIRE_CLIENTS=1`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_dyntftpd");
/// The repository root (this crate is its `dyntftpd/` directory).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const TEST: &str = "container_image_serves_its_volume";

/// podman's flags for every build and run here: the runtime and limits this kind of
/// machine accepts (the defaults are refused on some).
const RUNTIME_FLAGS: [&str; 6] = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

/// A finished command.
struct Done {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Done {
    fn ok(self, what: &str) -> String {
        assert!(
            self.status.success(),
            "{what}: {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

/// Runs `program args`, killing it (by its PID) after `deadline`, which fails the test.
fn run_within(program: &Path, args: &[&str], deadline: Duration, scratch: &Path) -> Done {
    let out = scratch.join("out");
    let err = scratch.join("err");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still running after {deadline:?}; killed\nstderr: {}",
                program.display(),
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Done {
        status,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// The tools the test needs, found on `PATH`.
struct Tools {
    podman: PathBuf,
    mmdebstrap: PathBuf,
    setcap: PathBuf,
    curl: PathBuf,
}

impl Tools {
    /// Every tool, or `None` after a loud SKIPPED line (a panic when clients are required).
    fn find() -> Option<Tools> {
        let uid = Command::new("id").arg("-u").output().ok();
        let root = uid.is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !root {
            if require_clients() {
                panic!(
                    "{TEST}: needs root (rootful podman, setcap), and DYNTFTP_REQUIRE_CLIENTS=1"
                );
            }
            eprintln!(
                "SKIPPED: {TEST}: needs root for rootful podman and setcap (set DYNTFTP_REQUIRE_CLIENTS=1 to make this fail)"
            );
            return None;
        }
        // Each one's absence is reported, not only the first.
        let found = ["podman", "runc", "mmdebstrap", "setcap", "curl"]
            .map(|program| client_or_skip(program, TEST));
        let [Some(podman), Some(_runc), Some(mmdebstrap), Some(setcap), Some(curl)] = found else {
            return None;
        };
        Some(Tools {
            podman,
            mmdebstrap,
            setcap,
            curl,
        })
    }

    fn podman(&self, args: &[&str], deadline: Duration, scratch: &Path) -> Done {
        run_within(&self.podman, args, deadline, scratch)
    }
}

/// The host's Debian release (`VERSION_CODENAME`), the base's: the binary links its glibc.
fn host_release() -> String {
    let text = std::fs::read_to_string("/etc/os-release").expect("/etc/os-release");
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .expect("VERSION_CODENAME in /etc/os-release")
}

/// `localhost/debian:<release>-slim`, made with mmdebstrap and imported unless podman
/// already has it.
fn base_image(tools: &Tools, scratch: &Path) -> String {
    let release = host_release();
    let image = format!("localhost/debian:{release}-slim");
    let exists = tools.podman(
        &["image", "exists", &image],
        Duration::from_secs(60),
        scratch,
    );
    if exists.status.success() {
        return image;
    }
    eprintln!("{TEST}: making the base image {image} with mmdebstrap (once)");
    let rootfs = TempDir::new("container-rootfs");
    let tar = rootfs.path().join("rootfs.tar");
    let tar = tar.to_str().expect("UTF-8 temp path");
    run_within(
        &tools.mmdebstrap,
        &["--variant=minbase", &release, tar],
        Duration::from_secs(600),
        scratch,
    )
    .ok("mmdebstrap");
    tools
        .podman(&["import", tar, &image], Duration::from_secs(300), scratch)
        .ok("podman import");
    image
}

/// A podman object removed (`podman rm -f` / `podman rmi -f`) on drop, also on panic.
struct Removed<'a> {
    tools: &'a Tools,
    remove: [&'static str; 2],
    name: String,
    scratch: PathBuf,
}

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let [verb, force] = self.remove;
        let _ = run_within(
            &self.tools.podman,
            &[verb, force, &self.name],
            Duration::from_secs(60),
            &self.scratch,
        );
    }
}

#[test]
fn container_image_serves_its_volume() {
    let Some(tools) = Tools::find() else {
        return;
    };
    let scratch_dir = TempDir::new("container-scratch");
    let scratch = scratch_dir.path();
    let base = base_image(&tools, scratch);

    // The context: the binary under test, allowed to bind port 69 as the image's user.
    let context = TempDir::new("container-context");
    let binary = context.path().join("dyntftpd");
    std::fs::copy(BIN, &binary).expect("copy the binary");
    let binary = binary.to_str().expect("UTF-8 temp path");
    run_within(
        &tools.setcap,
        &["cap_net_bind_service=+ep", binary],
        Duration::from_secs(30),
        scratch,
    )
    .ok("setcap");

    let unique = format!("{}-{}", std::process::id(), host_release());
    let image = format!("localhost/dyntftpd-test:{unique}");
    let _image = Removed {
        tools: &tools,
        remove: ["rmi", "-f"],
        name: image.clone(),
        scratch: scratch.to_path_buf(),
    };
    let containerfile = format!("{REPO}/Containerfile");
    let build_arg = format!("BASE={base}");
    let mut build = vec!["build", "--pull=never", "--build-arg", &build_arg];
    build.extend(RUNTIME_FLAGS);
    build.extend(["-f", &containerfile, "-t", &image]);
    build.push(context.path().to_str().unwrap());
    tools
        .podman(&build, Duration::from_secs(300), scratch)
        .ok("podman build");
    let user = tools
        .podman(
            &["image", "inspect", "--format", "{{.Config.User}}", &image],
            Duration::from_secs(60),
            scratch,
        )
        .ok("podman image inspect");
    assert_eq!(user.trim(), "dyntftpd", "the image's USER");

    // The volume: a multi-block file and a small one, read-only inside.
    let root = TempDir::new("container-root");
    let file = pseudo_random(100_000, 77);
    root.write("boot/kernel.bin", &file);
    root.write("hello.txt", b"hello from the container\n");
    let name = format!("dyntftpd-test-{unique}");
    let volume = format!("{}:/srv/tftp:ro", root.path().display());
    let mut start = vec!["run", "-d", "--name", &name];
    start.extend(RUNTIME_FLAGS);
    start.extend(["-p", "127.0.0.1::69/udp", "-p", "127.0.0.1::9169/tcp"]);
    start.extend(["-v", &volume, &image]);
    let container = Removed {
        tools: &tools,
        remove: ["rm", "-f"],
        name: name.clone(),
        scratch: scratch.to_path_buf(),
    };
    tools
        .podman(&start, Duration::from_secs(120), scratch)
        .ok("podman run");
    eventually(
        "dyntftpd serving in the container",
        Duration::from_secs(60),
        || {
            let logs = tools.podman(&["logs", &name], Duration::from_secs(30), scratch);
            (logs.stderr.contains("serving /srv/tftp on")
                || logs.stdout.contains("serving /srv/tftp on"))
            .then_some(())
        },
    );

    // Not root: the container's first process runs as the image's user.
    let pid = tools
        .podman(
            &["inspect", "--format", "{{.State.Pid}}", &name],
            Duration::from_secs(60),
            scratch,
        )
        .ok("podman inspect");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .expect("the container's process");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .expect("Uid line");
    assert_ne!(uid, "0", "dyntftpd runs as root in the container");

    let port = |inner: &str| -> String {
        let out = tools
            .podman(&["port", &name, inner], Duration::from_secs(60), scratch)
            .ok("podman port");
        out.lines()
            .next()
            .expect("a published address")
            .trim()
            .to_string()
    };
    let (tftp, http) = (port("69/udp"), port("9169/tcp"));

    let downloads = TempDir::new("container-downloads");
    let curl = |url: &str, out: &str| {
        let run = run(
            &tools.curl,
            &["-sS", "--max-time", "20", "-o", out, url],
            downloads.path(),
        );
        assert!(run.status.success(), "curl {url}: {}", run.describe());
        std::fs::read(downloads.path().join(out)).expect("curl's output")
    };
    assert_eq!(
        curl(&format!("tftp://{tftp}/boot/kernel.bin"), "kernel.bin"),
        file
    );
    assert_eq!(
        curl(&format!("tftp://{tftp}/hello.txt"), "hello.txt"),
        b"hello from the container\n"
    );
    assert_eq!(curl(&format!("http://{http}/healthz"), "healthz"), b"ok\n");
    let metrics = curl(&format!("http://{http}/metrics"), "metrics");
    assert!(
        String::from_utf8_lossy(&metrics).contains("# TYPE dyntftp_sessions_total counter\n"),
        "{}",
        String::from_utf8_lossy(&metrics)
    );

    // SIGTERM (podman stop) ends it cleanly: status 0, well before the kill timeout.
    tools
        .podman(
            &["stop", "-t", "20", &name],
            Duration::from_secs(60),
            scratch,
        )
        .ok("podman stop");
    let code = tools
        .podman(
            &["inspect", "--format", "{{.State.ExitCode}}", &name],
            Duration::from_secs(60),
            scratch,
        )
        .ok("podman inspect");
    assert_eq!(code.trim(), "0", "exit status after SIGTERM");
    drop(container);
}
