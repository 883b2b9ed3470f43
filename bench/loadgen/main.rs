//! Load generator for TFTP servers: many concurrent read transfers from one thread over
//! loopback, every transfer verified byte for byte, plus a raw UDP mode that measures the
//! physical ceiling of the machine for the same datagram size.
//!
//! ```text
//! # a server to measure
//! cargo build --release
//! ./target/release/dyntftpd -l 127.0.0.1:6969 -r /tmp/lg-root &
//!
//! # one 32 MiB transfer, blksize 1428, windowsize 16, bytes compared with the local copy
//! cargo bench --bench loadgen -- --server 127.0.0.1:6969 --file big \
//!     --verify /tmp/lg-root/big --blksize 1428 --windowsize 16
//!
//! # 64 clients in flight fetching a 1 KiB file for 5 seconds
//! cargo bench --bench loadgen -- --server 127.0.0.1:6969 --file small \
//!     --verify /tmp/lg-root/small --concurrency 64 --duration 5
//!
//! # several files (NAME is compared with DIR/NAME), 1 % of DATA/OACK dropped, JSON out
//! cargo bench --bench loadgen -- --server 127.0.0.1:6969 --file a --file b \
//!     --verify-dir /tmp/lg-root --windowsize 16 --drop 1 --seed 7 --json
//!
//! # the ceiling: plain UDP datagrams of 1432 bytes (blksize 1428 + 4) for 5 seconds
//! cargo bench --bench loadgen -- --raw 1432 --raw-seconds 5
//! ```
//!
//! Run without any flag (as a plain `cargo bench` or `cargo test --all-targets` does) it
//! prints its usage and exits 0, so that it never breaks the other benchmarks.
//!
//! # TFTP mode
//!
//! One thread and one `mio` poll drive `--concurrency` clients. Each transfer gets its own
//! socket on a new ephemeral port, like a real client; its protocol is the library's
//! `dyntftp::client::ReadTransfer`. It sends an RRQ with the requested options, checks the
//! OACK against them and answers it with ACK 0 (or takes DATA 1 when the server ignores
//! options), and acknowledges every `windowsize` in-order blocks and the final short block
//! (RFC 7440). A block beyond the next one makes the client acknowledge its last in-order
//! block, once per gap (the server resends from there), and a repeat of that block is
//! acknowledged again (*gap acks* counts both). When its own timer (`--client-timeout`,
//! default 1000 ms) expires it resends the RRQ or that ACK (a *client retransmit*); five
//! expiries without progress (the RRQ or ACK sent five times) end the transfer with
//! failure `timeout`. Each payload is compared, as it arrives, with the expected bytes at
//! the same offset, so no transfer is buffered. `--drop PCT` ignores that share of received DATA and OACK
//! packets (seeded xorshift), leaving the recovery to the gap ACK and the timers of both
//! sides. When a requested window may exceed 32 KiB of payload, every client socket asks
//! for a 4 MiB receive buffer (`--rcvbuf` sets the size and applies it always), so that a
//! window of large blocks arriving at loopback speed is not dropped by the client's own
//! kernel buffer (with `SO_RCVBUFFORCE` when privileged; otherwise the kernel caps the
//! value at `net.core.rmem_max`). A client connects its socket to the server's transfer
//! ID once a transfer passes its first block.
//!
//! `--shared-socket` makes the clients cheaper, for loads of many short transfers where
//! a socket per transfer would make the load generator the bottleneck: one socket on
//! the IPv4 wildcard address carries every client, each transfer sends from its own
//! loopback address (127.1.0.1, 127.1.0.2, … chosen per datagram with `IP_PKTINFO`, so
//! the server still sees a distinct client per transfer, as from distinct machines),
//! replies are told apart by the address they were sent to, and datagrams move in
//! batches of up to 64 per `recvmmsg`/`sendmmsg`. It needs an IPv4 loopback server and
//! excludes `--bind`.
//!
//! `--bind 127.0.0.2` puts the clients on their own loopback address: on a machine
//! where other programs use loopback too, a late datagram of theirs sent to a port this
//! run has just reused (for 127.0.0.1) then cannot reach a client and pass for its
//! server's first reply.
//!
//! A run is bounded by `--count` transfers and/or `--duration` seconds, whichever comes
//! first (default count: one transfer per client). After the duration no transfer is
//! started and those in flight finish (and are verified), but the rates of such a run
//! count only the transfers completed within the duration. `--time-limit SECS` is a hard
//! bound: transfers still in flight then fail with reason `time limit`, and the verified
//! bytes they had received count in *delivered MB/s* (slow lossy runs stay bounded). The report gives transfers
//! ok/failed, sessions/s, payload MB/s (10^6 bytes), latency from the first RRQ to the
//! final block (p50, p90, p99, max), client retransmits, the datagrams the clients received
//! (the denominator of a server's CPU per datagram), failures by reason, whether the
//! server acknowledged windowsize and blksize in its OACK (a server that ignores an option
//! leaves it out), and the load generator's own CPU time (getrusage) as a share of wall
//! time: when it nears 100 %, the load generator is the bottleneck, not the server.
//! `--json` prints the same as one JSON object, `--kv` as one line of `key=value` fields
//! whose values hold no spaces (what `bench/compare.sh` reads). Exit status: 0 when every
//! transfer verified, 1 when any failed, 2 for bad flags.
//!
//! # Raw mode
//!
//! `--raw SIZE` blasts datagrams of SIZE bytes from one loopback socket to another for
//! `--raw-seconds` (default 5) and reports received datagrams/s, received payload MB/s and
//! the loss ratio. It uses two threads, a sender and a receiver, each in a blocking loop:
//! that is the fairer ceiling (a server sends on one core while its client receives on
//! another), and no send is ever throttled by the receive side.
//!
//! # Layout
//!
//! `cli` (flags), `clients` (TFTP mode: the client slots and the `mio` loop), `mmsg`
//! (`--shared-socket`: batched system calls, a loopback address per transfer), `raw` (raw
//! mode), `report` (text, `--json`, `--kv`), `sys` (CPU time, fd limit, socket options);
//! `../common/args.rs` is shared with the other benches.

#[path = "../common/args.rs"]
mod args;
mod cli;
mod clients;
mod mmsg;
mod raw;
mod report;
mod sys;

use std::process::ExitCode;

use cli::{options, parse_args, usage, Mode};
use clients::run_tftp;
use raw::run_raw;

fn main() -> ExitCode {
    let args = args::args();
    let opts = options();
    if args.is_empty() {
        println!("{}", usage(&opts));
        return ExitCode::SUCCESS;
    }
    let mode = match parse_args(&opts, &args) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("loadgen: {message}");
            eprintln!("{}", opts.short_usage("loadgen"));
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => {
            println!("{}", usage(&opts));
            ExitCode::SUCCESS
        }
        Mode::Raw(raw) => match run_raw(&raw) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadgen: raw mode: {e}");
                ExitCode::FAILURE
            }
        },
        Mode::Tftp(config) => match run_tftp(config) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("loadgen: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
