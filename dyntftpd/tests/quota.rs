//! Busy polling follows the CPU quota: dyntftpd started in a cgroup capped at 30 % of a
//! CPU turns busy polling off by default (and says so), keeps it when asked explicitly,
//! and keeps the default outside a quota. The cgroup is made under the cgroup v2 root, or
//! under the cgroup v1 `cpu` hierarchy, and removed afterwards; the test is skipped
//! loudly where neither can be written (not root), unless `DYNTFTP_REQUIRE_CLIENTS=1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_dyntftpd");

/// A cgroup capped at 30 % of one CPU; removed on drop (once its processes are gone).
struct CappedGroup {
    dir: PathBuf,
}

impl CappedGroup {
    fn create(tag: &str) -> Result<CappedGroup, String> {
        let name = format!("dyntftpd-test-{tag}-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup");
        let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        let dir = if controllers.split_whitespace().any(|c| c == "cpu") {
            let subtree = fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
            if !subtree.split_whitespace().any(|c| c == "cpu") {
                fs::write(v2.join("cgroup.subtree_control"), "+cpu")
                    .map_err(|e| format!("cannot enable the cpu controller: {e}"))?;
            }
            v2.join(name)
        } else {
            let mounts = fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
            let cpu = mounts
                .lines()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu"))
                .map(|f| PathBuf::from(f[1]))
                .ok_or("no cgroup v2 cpu controller and no cgroup v1 cpu hierarchy")?;
            cpu.join(name)
        };
        fs::create_dir(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let group = CappedGroup { dir };
        let written = if group.dir.join("cpu.max").exists() {
            fs::write(group.dir.join("cpu.max"), "30000 100000")
        } else {
            fs::write(group.dir.join("cpu.cfs_period_us"), "100000")
                .and_then(|()| fs::write(group.dir.join("cpu.cfs_quota_us"), "30000"))
        };
        written.map_err(|e| format!("cannot set the quota: {e}"))?;
        Ok(group)
    }

    /// A command that joins the group, then runs dyntftpd with `args`.
    fn dyntftpd(&self, args: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.dir.join("cgroup.procs"))
            .arg(BIN)
            .args(args);
        command
    }
}

impl Drop for CappedGroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("warning: cgroup {} not removed: {e}", self.dir.display());
        }
    }
}

/// Runs dyntftpd (in `group`, or not) until it logs that it serves, and returns its log.
fn serving_log(group: Option<&CappedGroup>, extra: &[&str], logs: &TempDir, tag: &str) -> String {
    let root = logs.path().to_str().unwrap();
    let mut args = vec!["-l", "127.0.0.1:0", "-r", root];
    args.extend_from_slice(extra);
    let command = match group {
        Some(group) => group.dyntftpd(&args),
        None => {
            let mut command = Command::new(BIN);
            command.args(&args);
            command
        }
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut daemon = Daemon::spawn(command, addr, &logs.path().join(format!("{tag}.log")));
    let log = eventually("the serving line", Duration::from_secs(10), || {
        daemon.assert_running();
        let log = daemon.log();
        log.contains("serving ").then_some(log)
    });
    drop(daemon);
    log
}

#[test]
fn busy_polling_is_off_by_default_under_a_cpu_quota() {
    let test = "busy_polling_is_off_by_default_under_a_cpu_quota";
    let group = match CappedGroup::create("quota") {
        Ok(group) => group,
        Err(why) => return skip_missing(test, &why).unwrap_or(()),
    };
    let logs = TempDir::new("quota");
    let capped = serving_log(Some(&group), &[], &logs, "capped");
    assert!(
        capped
            .contains("busy polling off: the cgroup's CPU quota is 0.30 CPUs for 1 event loop(s)"),
        "{capped}"
    );
    let explicit = serving_log(Some(&group), &["--busy-poll", "50"], &logs, "explicit");
    assert!(!explicit.contains("busy polling off"), "{explicit}");
    let free = serving_log(None, &[], &logs, "free");
    assert!(!free.contains("busy polling off"), "{free}");
}
