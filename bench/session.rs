//! Per-packet cost of the session state machine alone (no sockets, no clock reads in the
//! loop): an ideal client acknowledges every window at once.
//!
//! ```text
//! cargo bench --bench session
//! ```
//!
//! Prints, per blksize × windowsize, DATA packets per second and payload GB/s through
//! `poll_output` / `handle_packet`. The figures bound what the driver can reach: anything
//! above this cost per packet is syscalls.

use std::hint::black_box;
use std::time::{Duration, Instant};

use dyntftp::packet::{Options, Packet};
use dyntftp::{BytesSource, Mode, Output, Session, SessionConfig};

/// Transfers `data` once; returns the number of DATA packets.
fn transfer(data: &std::sync::Arc<[u8]>, options: &[u8], now: Instant) -> u64 {
    let options = Options::parse(options).expect("valid options");
    let mut session = Session::new(
        now,
        options,
        Mode::Octet,
        Box::new(BytesSource::new(data.clone())),
        SessionConfig::default(),
    );
    let mut packets = 0u64;
    loop {
        let mut last_block = None;
        loop {
            match session.poll_output(1) {
                Output::Transmit(transmit) => {
                    let datagram = black_box(transmit.contents);
                    if let [0, 3, hi, lo, ..] = *datagram {
                        packets += 1;
                        last_block = Some(u16::from_be_bytes([hi, lo]));
                    } else {
                        last_block = Some(0); // the OACK: answer with ACK 0
                    }
                }
                Output::Wait(_) => break,
                Output::Done(_) => return packets,
            }
        }
        let block = last_block.expect("a waiting session sent something");
        session.handle_packet(now, Packet::Ack { block });
    }
}

fn main() {
    let size = 64 << 20;
    let data: std::sync::Arc<[u8]> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let now = Instant::now();
    println!("session state machine, {} MiB per transfer", size >> 20);
    println!(
        "{:>8} {:>7} {:>12} {:>10} {:>9}",
        "blksize", "window", "packets/s", "GB/s", "ns/pkt"
    );
    for blksize in [512u32, 1428, 8192, 65464] {
        for window in [1u32, 16, 64] {
            let options = format!("blksize\0{blksize}\0windowsize\0{window}\0");
            let start = Instant::now();
            let mut packets = 0;
            let mut bytes = 0u64;
            while start.elapsed() < Duration::from_millis(400) {
                packets += transfer(&data, options.as_bytes(), now);
                bytes += size as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{blksize:>8} {window:>7} {:>12.0} {:>10.2} {:>9.1}",
                packets as f64 / secs,
                bytes as f64 / secs / 1e9,
                secs * 1e9 / packets as f64
            );
        }
    }
}
