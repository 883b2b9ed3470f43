//! A CPU quota for the processes of a test: a cgroup of its own, capped at a share of one
//! CPU (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`, whichever the machine has), so
//! that a test can run firmware, DHCP server and dyntftpd starved of CPU as in a boot
//! storm on an oversubscribed host. The quota throttles in periods of 100 ms: what it
//! cuts comes as pauses of tens of milliseconds, not as a slower clock.
//!
//! Needs root and a cgroup file system; where either is missing,
//! [`CpuQuota::create_or_skip`] says so loudly and the test is skipped (unless
//! `DYNTFTP_REQUIRE_CLIENTS=1`). The group is removed on drop, once its processes are
//! gone.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::netns::skip_missing;

/// The quota's period, in microseconds.
const PERIOD_US: u32 = 100_000;

/// A cgroup whose processes share `percent` % of one CPU.
pub struct CpuQuota {
    dir: PathBuf,
    /// The file a process joins the group through.
    procs: PathBuf,
}

impl CpuQuota {
    /// Creates the group, or explains why it cannot (see [`skip_missing`]).
    pub fn create_or_skip(tag: &str, test: &str, percent: u32) -> Option<CpuQuota> {
        match CpuQuota::create(tag, percent) {
            Ok(group) => Some(group),
            Err(e) => skip_missing(test, &format!("no CPU quota for the test: {e}")),
        }
    }

    /// Creates the group: v2 when the unified hierarchy has the cpu controller, else the
    /// v1 cpu hierarchy.
    pub fn create(tag: &str, percent: u32) -> Result<CpuQuota, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "dyntftp-test-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let quota = PERIOD_US / 100 * percent;
        let root = Path::new("/sys/fs/cgroup");
        let unified = fs::read_to_string(root.join("cgroup.controllers"))
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "cpu"));
        if unified {
            let control = root.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control)
                .is_ok_and(|enabled| enabled.split_whitespace().any(|c| c == "cpu"));
            if !enabled {
                write(&control, "+cpu")?;
            }
            let dir = root.join(name);
            make(&dir)?;
            let group = CpuQuota {
                procs: dir.join("cgroup.procs"),
                dir,
            };
            write(&group.dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            return Ok(group);
        }
        let mounts =
            fs::read_to_string("/proc/mounts").map_err(|e| format!("/proc/mounts: {e}"))?;
        let cpu = mounts
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "cpu"))
            .map(|f| PathBuf::from(f[1]))
            .ok_or("no cgroup v2 cpu controller and no cgroup v1 cpu hierarchy")?;
        let dir = cpu.join(name);
        make(&dir)?;
        let group = CpuQuota {
            procs: dir.join("cgroup.procs"),
            dir,
        };
        write(&group.dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
        write(&group.dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        Ok(group)
    }

    /// A command that joins the group before it runs `program` (through `sh`, which
    /// writes its own PID, then execs): for a program that must be in the group from its
    /// first instruction, such as dyntftpd, which reads its quota at start.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(&self.procs)
            .arg(program);
        command
    }

    /// Moves process `pid` (its threads too; children it starts later are born in the
    /// group) into the group.
    pub fn add(&self, pid: u32) {
        write(&self.procs, &pid.to_string()).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("warning: cgroup {} not removed: {e}", self.dir.display());
        }
    }
}

fn make(dir: &Path) -> Result<(), String> {
    fs::create_dir(dir).map_err(|e| format!("create {}: {e}", dir.display()))
}

fn write(file: &Path, value: &str) -> Result<(), String> {
    fs::write(file, value).map_err(|e| format!("write {value:?} to {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_the_group_is_listed_and_the_group_goes_on_drop() {
        let Ok(group) = CpuQuota::create("unit", 50) else {
            eprintln!("SKIPPED: no cgroup to create here (needs root)");
            return;
        };
        let dir = group.dir.clone();
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        group.add(child.id());
        let listed = fs::read_to_string(&group.procs).unwrap();
        assert!(
            listed.lines().any(|l| l == child.id().to_string()),
            "{listed}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        drop(group);
        assert!(!dir.exists(), "{} still there", dir.display());
    }
}
