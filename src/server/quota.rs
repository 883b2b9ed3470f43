//! The CPU quota of the process's cgroup, for the default of busy polling: a loop that
//! spins while it waits for the next datagram spends CPU time it would otherwise sleep
//! through, and under a quota (a container's CPU limit, `systemd`'s `CPUQuota=`) that time
//! is taken from the transfers. cgroup v2 `cpu.max` and cgroup v1 `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us` are read for the process's group and every group above it up to
//! the hierarchy's mount point; the smallest quota applies.

use std::fs;
use std::path::{Path, PathBuf};

/// The CPUs the process's cgroup may use (0.3 for 30 % of one CPU), the smallest quota of
/// its group and the groups above it; `None` without a quota (or where it cannot be read).
pub(crate) fn cpu_quota() -> Option<f64> {
    let membership = fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut smallest: Option<f64> = None;
    for (hierarchy, dirs) in group_dirs(&membership, &mounts) {
        for dir in dirs {
            let quota = match hierarchy {
                Hierarchy::V2 => read(&dir.join("cpu.max")).and_then(|t| parse_cpu_max(&t)),
                Hierarchy::V1 => {
                    let quota = read(&dir.join("cpu.cfs_quota_us"));
                    let period = read(&dir.join("cpu.cfs_period_us"));
                    quota.zip(period).and_then(|(q, p)| parse_cfs(&q, &p))
                }
            };
            if let Some(quota) = quota {
                smallest = Some(smallest.map_or(quota, |s: f64| s.min(quota)));
            }
        }
    }
    smallest
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hierarchy {
    V2,
    V1,
}

/// The directories whose quota applies: for the unified hierarchy and the v1 `cpu` one
/// (whichever are mounted), the process's group and every group above it, up to the
/// mount point.
fn group_dirs(membership: &str, mountinfo: &str) -> Vec<(Hierarchy, Vec<PathBuf>)> {
    let mut found = Vec::new();
    for line in membership.lines() {
        // "ID:CONTROLLERS:PATH": "0::/a/b" for v2, "4:cpu,cpuacct:/a/b" for v1.
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let hierarchy = if id == "0" && controllers.is_empty() {
            Hierarchy::V2
        } else if controllers.split(',').any(|c| c == "cpu") {
            Hierarchy::V1
        } else {
            continue;
        };
        let Some((root, mount)) = mount_of(mountinfo, hierarchy) else {
            continue;
        };
        // The mount shows the hierarchy from `root` down (a container sees its own
        // group as `/`); the process's path is relative to the hierarchy.
        let relative = path.strip_prefix(root.as_str()).unwrap_or(path);
        let mut dir = mount.clone();
        let mut dirs = vec![dir.clone()];
        for part in relative.split('/').filter(|p| !p.is_empty() && *p != "..") {
            dir.push(part);
            dirs.push(dir.clone());
        }
        found.push((hierarchy, dirs));
    }
    found
}

/// The root within the hierarchy and the mount point of `hierarchy` (`cgroup2`, or a
/// `cgroup` mount with the `cpu` controller), from `/proc/self/mountinfo`.
fn mount_of(mountinfo: &str, hierarchy: Hierarchy) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS…] - FSTYPE SOURCE SUPEROPTIONS"
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let (root, mount_point) = (*fields.get(3)?, *fields.get(4)?);
        let mut after = after.split(' ');
        let fs_type = after.next()?;
        let super_options = after.nth(1).unwrap_or_default();
        let wanted = match hierarchy {
            Hierarchy::V2 => fs_type == "cgroup2",
            Hierarchy::V1 => fs_type == "cgroup" && super_options.split(',').any(|o| o == "cpu"),
        };
        wanted.then(|| (root.to_string(), PathBuf::from(mount_point)))
    })
}

/// cgroup v2 `cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" for none.
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// cgroup v1 `cpu.cfs_quota_us` (-1 for none) and `cpu.cfs_period_us`.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_read_in_both_formats() {
        assert_eq!(parse_cpu_max("30000 100000\n"), Some(0.3));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("250000 100000"), Some(2.5));
        assert_eq!(parse_cfs("30000\n", "100000\n"), Some(0.3));
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("junk", "100000"), None);
    }

    const MOUNTS_V1: &str = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
38 25 0:33 / /sys/fs/cgroup/cpu rw,nosuid shared:14 - cgroup cgroup rw,cpu
39 25 0:34 / /sys/fs/cgroup/cpuacct rw,nosuid shared:15 - cgroup cgroup rw,cpuacct
";

    #[test]
    fn the_group_and_its_ancestors_are_found_in_each_hierarchy() {
        let membership = "4:cpuacct:/\n1:cpu:/compare.sh.7/dyntftpd\n0::/\n";
        let dirs = group_dirs(membership, MOUNTS_V1);
        assert_eq!(
            dirs,
            vec![
                (
                    Hierarchy::V1,
                    vec![
                        PathBuf::from("/sys/fs/cgroup/cpu"),
                        PathBuf::from("/sys/fs/cgroup/cpu/compare.sh.7"),
                        PathBuf::from("/sys/fs/cgroup/cpu/compare.sh.7/dyntftpd"),
                    ]
                ),
                (Hierarchy::V2, vec![PathBuf::from("/sys/fs/cgroup/unified")]),
            ]
        );
    }

    #[test]
    fn a_container_sees_its_own_group_as_the_root() {
        let mounts =
            "40 30 0:35 /kubepods/pod1/ctr /sys/fs/cgroup rw shared:9 - cgroup2 cgroup2 rw\n";
        let dirs = group_dirs("0::/kubepods/pod1/ctr\n", mounts);
        assert_eq!(
            dirs,
            vec![(Hierarchy::V2, vec![PathBuf::from("/sys/fs/cgroup")])]
        );
        // Nothing mounted for the hierarchy: nothing to read.
        assert!(group_dirs("0::/x\n", MOUNTS_V1.lines().next().unwrap()).is_empty());
    }
}
