//! The loopback black-box suites of `tests/server.rs`, `tests/abuse.rs`, `tests/hostile.rs`,
//! `tests/sources.rs` and `tests/clients.rs`, run again with every server in single-port mode
//! (`ServerBuilder::single_port`): same protocol behaviour, replies from the listening port.
//! `common::single_port()` is true in this binary, which switches the servers and the test
//! client's TID check. Where single-port mode must differ, the tests say so: a datagram
//! from a peer without a session reaches the listener (a stray gets ERROR 5 there too,
//! garbage is a malformed request), and a request from a peer with a session is a repeat.
//!
//! Each included suite declares its own `mod common;`, so the helpers are compiled once per
//! suite here: that is what lets them run unchanged.

#![allow(clippy::duplicate_mod)]

#[path = "server.rs"]
mod server_suite;

#[path = "abuse.rs"]
mod abuse_suite;

#[path = "clients.rs"]
mod clients_suite;

#[path = "hostile.rs"]
mod hostile_suite;

#[path = "sources.rs"]
mod sources_suite;
