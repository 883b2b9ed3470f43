//! The dyntftpd tests of `daemon.rs`, run again with `--single-port` (`common::single_port()`
//! is true in this binary, which adds the flag and switches the test client's TID check).

#[path = "daemon.rs"]
mod daemon_suite;
