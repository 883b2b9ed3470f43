//! Busy polling follows the CPU quota: dyntftpd started in a cgroup capped at 30 % of a
//! CPU turns busy polling off by default (and says so), keeps it when asked explicitly,
//! and keeps the default outside a quota. The cgroup is testkit's [`CpuQuota`] (v2 or v1,
//! removed afterwards); the test is skipped loudly where neither can be written (not
//! root), unless `DYNTFTP_REQUIRE_CLIENTS=1`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_dyntftpd");

/// Runs dyntftpd (in `group`, or not) until it logs that it serves, and returns its log.
fn serving_log(group: Option<&CpuQuota>, extra: &[&str], logs: &TempDir, tag: &str) -> String {
    let root = logs.path().to_str().unwrap();
    let mut args = vec!["-l", "127.0.0.1:0", "-r", root];
    args.extend_from_slice(extra);
    let mut command = match group {
        Some(group) => group.command(Path::new(BIN)),
        None => Command::new(BIN),
    };
    command.args(&args);
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
    let Some(group) = CpuQuota::create_or_skip("quota", test, 30) else {
        return;
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
