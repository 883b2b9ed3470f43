//! The whole server loop, through `Server::run_once`, fed arbitrary datagrams from several
//! peers over real loopback UDP sockets.
//!
//! One server is built on first use and reused by every iteration (building one costs
//! more than an iteration). It serves a few in-memory files, a source that is never ready
//! and one that fails, with a 2 ms timeout, 2 retries and a 5 ms source timeout, so that
//! sessions left over by an iteration end within a few milliseconds of the next ones.
//! Each iteration uses fresh peer sockets, so its sessions are its own.
//!
//! Checks, after every step:
//!
//! - `run_once` never fails (and, as everywhere in a fuzz target, nothing panics);
//! - every datagram the server sends parses, and is DATA, OACK or ERROR;
//! - nothing is ever sent from the listening port (answers come from a new TID);
//! - DATA carries at most 65464 bytes; an ERROR is never followed by anything else from
//!   the same TID within the step.
//!
//! # Input format
//!
//! A sequence of steps until the input ends (at most 64). Reads past the end yield zeros.
//!
//! ```text
//! u8 tag   peer = tag & 3, op = (tag >> 2) % 5
//!   0  datagram to the listener:        u8 len, then len bytes
//!   1  datagram to the peer's session:  u8 len, then len bytes (to the listener if the
//!                                       peer has no session yet)
//!   2  RRQ to the listener:             u8 file (% 6), u8 option set (% 8)
//!   3  ACK to the peer's session:       u8 k: ACK (highest DATA block received - k)
//!   4  pause:                           u8 n: run_once waits up to (n % 4) ms
//! ```

#![no_main]

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use dyntftp::client::{write_ack, write_rrq};
use dyntftp::packet::Packet;
use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData, Server, ServerBuilder};
use libfuzzer_sys::fuzz_target;

const PEERS: usize = 4;
const MAX_STEPS: usize = 64;

/// Files: small, several blocks, empty, exactly one block, a stalled and a failing source.
const FILES: [&str; 6] = ["small", "multi", "empty", "block", "stall", "fail"];

struct Files;

/// Never ready.
struct Stalled;

impl ResponseData for Stalled {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// Fails after 600 bytes.
struct Failing(usize);

impl ResponseData for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0 >= 600 {
            return Err(io::Error::other("fuzz source failure"));
        }
        let n = buf.len().min(600 - self.0);
        buf[..n].fill(b'f');
        self.0 += n;
        Ok(n)
    }
}

impl Handler for Files {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        Ok(match req.filename {
            b"small" => Box::new(BytesSource::new(b"small file\n".to_vec())),
            b"multi" => Box::new(BytesSource::new(vec![b'm'; 3000])),
            b"empty" => Box::new(BytesSource::new(Vec::new())),
            b"block" => Box::new(BytesSource::new(vec![b'b'; 512])),
            b"stall" => Box::new(Stalled),
            b"fail" => Box::new(Failing(0)),
            _ => return Err(Reject::not_found()),
        })
    }
}

struct Harness {
    server: Server<Files>,
    addr: SocketAddr,
    buf: Vec<u8>,
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

fn build() -> Harness {
    let server = ServerBuilder::new(Files)
        .bind("127.0.0.1:0".parse().unwrap())
        .timeout(Duration::from_millis(2))
        .retries(2)
        .source_timeout(Duration::from_millis(5))
        .max_sessions(256)
        .stats_interval(Duration::from_secs(3600))
        .build()
        .expect("server builds");
    let addr = server.local_addr();
    Harness {
        server,
        addr,
        buf: vec![0; 65_536],
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let (head, rest) = self.0.split_at(len.min(self.0.len()));
        self.0 = rest;
        head.to_vec()
    }
}

/// What a peer knows of its session.
#[derive(Default)]
struct Peer {
    tid: Option<SocketAddr>,
    highest: u16,
    /// TIDs that sent an ERROR during this step.
    ended: Vec<SocketAddr>,
}

const OPTION_SETS: [&[(&str, &str)]; 8] = [
    &[],
    &[("tsize", "0")],
    &[("blksize", "8")],
    &[("blksize", "1024"), ("windowsize", "4")],
    &[("windowsize", "16"), ("tsize", "0")],
    &[("timeout", "1")],
    &[("utimeout", "10000"), ("blksize", "100")],
    &[("blksize", "abc"), ("windowsize", "0"), ("tsize", "-5")],
];

impl Harness {
    /// Runs the loop until it has nothing immediate left to do (bounded).
    fn settle(&mut self, wait: Duration) {
        assert!(self.server.run_once(Some(wait)).expect("run_once"));
        for _ in 0..8 {
            assert!(self
                .server
                .run_once(Some(Duration::ZERO))
                .expect("run_once"));
        }
    }

    /// Reads everything the server sent to the peers and checks it.
    fn collect(&mut self, sockets: &[UdpSocket], peers: &mut [Peer]) {
        for (socket, peer) in sockets.iter().zip(peers.iter_mut()) {
            peer.ended.clear();
            loop {
                let (len, from) = match socket.recv_from(&mut self.buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => panic!("peer receive: {e}"),
                };
                assert_ne!(from, self.addr, "a datagram from the listening port");
                assert!(
                    !peer.ended.contains(&from),
                    "a datagram after an ERROR from {from}"
                );
                match Packet::parse(&self.buf[..len]) {
                    Ok(Packet::Data { block, data }) => {
                        assert!(data.len() <= 65_464);
                        peer.tid = Some(from);
                        peer.highest = peer.highest.max(block);
                    }
                    Ok(Packet::Oack(_)) => peer.tid = Some(from),
                    Ok(Packet::Error { .. }) => peer.ended.push(from),
                    other => panic!("the server sent {other:?}"),
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|cell| {
        let mut slot = cell.borrow_mut();
        let h = slot.get_or_insert_with(build);
        let sockets: Vec<UdpSocket> = (0..PEERS)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind peer");
                s.set_nonblocking(true).expect("nonblocking");
                s
            })
            .collect();
        let mut peers: Vec<Peer> = (0..PEERS).map(|_| Peer::default()).collect();
        let mut input = Input(data);
        let mut scratch = Vec::new();
        for _ in 0..MAX_STEPS {
            if input.0.is_empty() {
                break;
            }
            let tag = input.u8();
            let p = (tag & 3) as usize;
            let mut wait = Duration::ZERO;
            let sent = match (tag >> 2) % 5 {
                0 => {
                    let len = input.u8() as usize;
                    sockets[p].send_to(&input.bytes(len), h.addr)
                }
                1 => {
                    let len = input.u8() as usize;
                    let to = peers[p].tid.unwrap_or(h.addr);
                    sockets[p].send_to(&input.bytes(len), to)
                }
                2 => {
                    let file = FILES[input.u8() as usize % FILES.len()];
                    let options = OPTION_SETS[input.u8() as usize % OPTION_SETS.len()];
                    scratch.clear();
                    write_rrq(
                        &mut scratch,
                        file.as_bytes(),
                        "octet",
                        options.iter().copied(),
                    );
                    sockets[p].send_to(&scratch, h.addr)
                }
                3 => {
                    let k = input.u8() as u16;
                    scratch.clear();
                    write_ack(&mut scratch, peers[p].highest.wrapping_sub(k));
                    let to = peers[p].tid.unwrap_or(h.addr);
                    sockets[p].send_to(&scratch, to)
                }
                _ => {
                    let ms = input.u8() % 4;
                    wait = Duration::from_millis(ms.into());
                    Ok(0)
                }
            };
            // Sending to a closed session port may report an earlier ICMP error.
            if let Err(e) = sent {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "send: {e}");
            }
            h.settle(wait);
            h.collect(&sockets, &mut peers);
        }
    });
});
