//! TFTP mode: the client slots and the `mio` loop that drives them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use dyntftp::packet::{write_rrq, Packet, MAX_DATAGRAM};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use crate::cli::{Config, Expected};
use crate::mmsg::{Outbox, SharedSocket, SHARED_RCVBUF, SHARED_TOKEN};
use crate::report::{self, Stats};
use crate::sys::{cpu_times, raise_fd_limit, set_rcvbuf};

/// Timer expiries without progress before a transfer fails with `timeout`: the RRQ or
/// last ACK is sent at most this many times.
const MAX_TRIES: u32 = 5;

enum Link {
    /// No transfer in flight.
    Idle,
    /// The transfer's own socket (the default).
    Own(UdpSocket),
    /// `--shared-socket`: the loopback address the transfer uses on the shared socket.
    Shared(Ipv4Addr),
}

/// One client slot. A slot runs one transfer at a time, each on a fresh socket (or a
/// fresh loopback address of the shared socket).
struct Client {
    link: Link,
    /// Unique number of the current transfer; stale timer entries carry an older one.
    transfer: u64,
    /// Index into `Config::files`.
    file: usize,
    /// The server's transfer ID, locked by the first accepted packet.
    peer: Option<SocketAddr>,
    /// The socket is connected to `peer`.
    connected: bool,
    /// Whether any OACK or DATA was accepted (else a timeout resends the RRQ).
    responded: bool,
    oack_seen: bool,
    blksize: usize,
    window: u64,
    /// Next expected block, unwrapped (the wire carries it modulo 65536).
    next: u64,
    /// Bytes received and verified so far.
    offset: u64,
    /// In-order blocks since the last ACK.
    since_ack: u64,
    /// An out-of-order block was answered since the last in-order block.
    gap_acked: bool,
    started: Instant,
    deadline: Instant,
    /// Timer periods without progress, counting the current one.
    tries: u32,
}

impl Client {
    fn idle(now: Instant) -> Client {
        Client {
            link: Link::Idle,
            transfer: 0,
            file: 0,
            peer: None,
            connected: false,
            responded: false,
            oack_seen: false,
            blksize: 512,
            window: 1,
            next: 1,
            offset: 0,
            since_ack: 0,
            gap_acked: false,
            started: now,
            deadline: now,
            tries: 0,
        }
    }

    /// Locks the server's transfer ID. Datagrams from anyone else are then counted as
    /// foreign and ignored.
    fn lock_peer(&mut self, peer: SocketAddr) {
        self.peer = Some(peer);
    }

    /// Connects the socket to the locked peer, as real clients do: the kernel then drops
    /// datagrams from anyone else, and sends skip the route lookup. Done once the transfer
    /// is longer than one block, so that a one-block transfer (the small-file load) does
    /// not pay a `connect` it would not use.
    fn connect_peer(&mut self) {
        if let (Link::Own(socket), Some(peer), false) = (&self.link, self.peer, self.connected) {
            self.connected = socket.connect(peer).is_ok();
        }
    }

    /// Sends `datagram` to the server's TID (or its request port before the first reply),
    /// or queues it in `out` for the shared socket's next batch. A full socket buffer
    /// loses the datagram, as the network would; the timers recover.
    fn send(&self, datagram: &[u8], server: SocketAddr, out: &mut Outbox) -> Result<(), String> {
        let socket = match &self.link {
            Link::Idle => return Ok(()),
            Link::Own(socket) => socket,
            Link::Shared(from) => {
                out.queue(datagram, *from, self.peer.unwrap_or(server));
                return Ok(());
            }
        };
        let sent = if self.connected {
            socket.send(datagram)
        } else {
            socket.send_to(datagram, self.peer.unwrap_or(server))
        };
        match sent {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("send: {e}")),
        }
    }
}

/// Tiny xorshift64* generator for the drop decisions.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A uniform value in [0, 1).
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a datagram or timeout did to a transfer.
enum Step {
    Continue,
    Done(Result<(), String>),
}

struct Loadgen {
    config: Config,
    /// The RRQ of each file, built once.
    rrqs: Vec<Vec<u8>>,
    poll: Poll,
    clients: Vec<Client>,
    /// Deadlines as (when, slot, transfer). Lazy: a transfer has at most one entry, which
    /// may be earlier than its deadline (then it is re-pushed) but never later.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    stats: Stats,
    rng: Rng,
    /// Datagrams on their way out (queued for the shared socket's next batch).
    out: Outbox,
    /// `--shared-socket`: the one socket of every client.
    shared: Option<SharedSocket>,
    /// Receive buffer of the per-transfer sockets.
    buf: Vec<u8>,
    started: u64,
    in_flight: usize,
    next_transfer: u64,
    start_time: Instant,
    end_time: Option<Instant>,
    /// When `--time-limit` abandons the transfers still in flight.
    limit_time: Option<Instant>,
    last_done: Instant,
}

pub fn run_tftp(config: Config) -> io::Result<bool> {
    raise_fd_limit((config.concurrency as libc::rlim_t).saturating_add(64));
    let options = requested_options(&config);
    let rrqs = config
        .files
        .iter()
        .map(|f| {
            let mut rrq = Vec::new();
            write_rrq(
                &mut rrq,
                f.as_bytes(),
                "octet",
                options.iter().map(|(n, v)| (*n, v.as_str())),
            );
            rrq
        })
        .collect();
    let cpu_before = cpu_times();
    let now = Instant::now();
    let poll = Poll::new()?;
    let shared = if config.shared_socket {
        Some(SharedSocket::open(&poll, config.rcvbuf.max(SHARED_RCVBUF))?)
    } else {
        None
    };
    let mut lg = Loadgen {
        rrqs,
        poll,
        clients: (0..config.concurrency).map(|_| Client::idle(now)).collect(),
        timers: BinaryHeap::new(),
        stats: Stats::default(),
        rng: Rng::new(config.seed),
        out: Outbox::default(),
        shared,
        buf: vec![0; MAX_DATAGRAM],
        started: 0,
        in_flight: 0,
        next_transfer: 1,
        start_time: now,
        end_time: config.duration.map(|d| now + d),
        limit_time: config.time_limit.map(|d| now + d),
        last_done: now,
        config,
    };
    lg.run()?;
    let wall = lg.last_done - lg.start_time;
    let cpu = cpu_times() - cpu_before;
    let pass = lg.stats.failed == 0 && lg.stats.ok > 0;
    let report = report::tftp(&lg.config, &mut lg.stats, wall, cpu, pass);
    print!("{report}");
    Ok(pass)
}

/// The options every RRQ carries, in wire order.
fn requested_options(config: &Config) -> Vec<(&'static str, String)> {
    let mut options = Vec::new();
    if let Some(b) = config.blksize {
        options.push(("blksize", b.to_string()));
    }
    if let Some(w) = config.windowsize {
        options.push(("windowsize", w.to_string()));
    }
    if config.tsize {
        options.push(("tsize", "0".to_string()));
    }
    if let Some(t) = config.timeout {
        options.push(("timeout", t.to_string()));
    }
    options
}

impl Loadgen {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        for id in 0..self.clients.len() {
            self.refill(id, Instant::now());
        }
        self.flush()?;
        while self.in_flight > 0 {
            let now = Instant::now();
            if self.limit_time.is_some_and(|limit| now >= limit) {
                self.abandon_all(now);
                break;
            }
            let next = match (self.timers.peek(), self.limit_time) {
                (Some(Reverse((when, _, _))), Some(limit)) => Some((*when).min(limit)),
                (Some(Reverse((when, _, _))), None) => Some(*when),
                (None, limit) => limit,
            };
            let timeout = next.map(|when| when.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    SHARED_TOKEN => self.on_shared_readable()?,
                    Token(id) => self.on_readable(id),
                }
            }
            self.fire_timers(Instant::now());
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what the shared socket's clients queued (nothing to do without one).
    fn flush(&mut self) -> io::Result<()> {
        match &self.shared {
            Some(shared) => {
                self.stats.send_drops += self.out.send_all(&shared.socket)?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Whether another transfer may start.
    fn may_start(&self, now: Instant) -> bool {
        self.config.count.is_none_or(|c| self.started < c)
            && self.end_time.is_none_or(|end| now < end)
            && self.limit_time.is_none_or(|limit| now < limit)
    }

    /// Ends every transfer in flight with failure `time limit` (`--time-limit`).
    fn abandon_all(&mut self, now: Instant) {
        for id in 0..self.clients.len() {
            self.finish(id, Err("time limit".into()), now);
        }
    }

    /// Starts the next transfer in slot `id` if the bounds allow. A transfer that cannot
    /// even start (no socket) counts as failed, and the next one is tried.
    fn refill(&mut self, id: usize, now: Instant) {
        while self.may_start(now) {
            self.started += 1;
            match self.start(id, now) {
                Ok(()) => return,
                Err(reason) => self.record(Err(reason), now, 0, now),
            }
        }
    }

    fn start(&mut self, id: usize, now: Instant) -> Result<(), String> {
        let server = self.config.server;
        let link = match &mut self.shared {
            Some(shared) => Link::Shared(shared.claim(id)),
            None => {
                let unspecified = match server.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                };
                let local = self.config.bind.unwrap_or(unspecified);
                let mut socket =
                    UdpSocket::bind(SocketAddr::new(local, 0)).map_err(|e| format!("bind: {e}"))?;
                if self.config.rcvbuf_needed() {
                    set_rcvbuf(&socket, self.config.rcvbuf);
                }
                self.poll
                    .registry()
                    .register(&mut socket, Token(id), Interest::READABLE)
                    .map_err(|e| format!("register: {e}"))?;
                Link::Own(socket)
            }
        };
        let file = (self.started - 1) as usize % self.config.files.len();
        let transfer = self.next_transfer;
        self.next_transfer += 1;
        let client = &mut self.clients[id];
        *client = Client::idle(now);
        client.link = link;
        client.transfer = transfer;
        client.file = file;
        client.tries = 1;
        client.deadline = now + self.config.client_timeout;
        if let Err(e) = client.send(&self.rrqs[file], server, &mut self.out) {
            client.link = Link::Idle;
            return Err(e);
        }
        self.timers.push(Reverse((client.deadline, id, transfer)));
        self.in_flight += 1;
        Ok(())
    }

    /// Drains slot `id`'s socket. Spurious events are harmless.
    fn on_readable(&mut self, id: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Link::Own(socket) = &self.clients[id].link {
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error queued on the socket (e.g. the server's port closed).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    self.finish(id, Err(format!("recv: {e}")), Instant::now());
                    break;
                }
            };
            let now = Instant::now();
            if let Step::Done(result) = self.on_datagram(id, &buf[..len], from, now) {
                self.finish(id, result, now);
                break;
            }
        }
        self.buf = buf;
    }

    /// Drains the shared socket a batch at a time, each datagram to the client whose
    /// address it was sent to, and sends the batch's answers before reading the next.
    fn on_shared_readable(&mut self) -> io::Result<()> {
        let mut batch = match &mut self.shared {
            Some(shared) => std::mem::take(&mut shared.batch),
            None => return Ok(()),
        };
        let result = loop {
            let Some(shared) = &self.shared else {
                break Ok(());
            };
            let received = batch.recv(&shared.socket);
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            let now = Instant::now();
            for i in 0..n {
                let (data, from, to) = batch.datagram(i);
                let by_addr = self.shared.as_ref().map(|shared| &shared.by_addr);
                let Some(id) = to.and_then(|to| by_addr?.get(&to).copied()) else {
                    // For a transfer that has ended (or for nobody).
                    self.stats.foreign += 1;
                    continue;
                };
                if let Step::Done(result) = self.on_datagram(id, data, from, now) {
                    self.finish(id, result, now);
                }
            }
            if let Err(e) = self.flush() {
                break Err(e);
            }
        };
        if let Some(shared) = &mut self.shared {
            shared.batch = batch;
        }
        result
    }

    fn on_datagram(&mut self, id: usize, data: &[u8], from: SocketAddr, now: Instant) -> Step {
        let server = self.config.server;
        let c = &mut self.clients[id];
        if c.peer.is_some_and(|peer| peer != from) {
            self.stats.foreign += 1;
            return Step::Continue;
        }
        let packet = match Packet::parse(data) {
            Ok(packet) => packet,
            Err(e) => return Step::Done(Err(format!("malformed packet: {e}"))),
        };
        let is_payload = matches!(packet, Packet::Data { .. } | Packet::Oack(_));
        if is_payload
            && self.config.drop_pct > 0.0
            && self.rng.unit() * 100.0 < self.config.drop_pct
        {
            self.stats.dropped += 1;
            return Step::Continue;
        }
        let expected = &self.config.expected[c.file];
        match packet {
            Packet::Error { code, message } => Step::Done(Err(format!(
                "error {}: {}",
                code.to_u16(),
                String::from_utf8_lossy(message)
            ))),
            Packet::Oack(options) => {
                if c.next > 1 {
                    return Step::Continue; // a late duplicate; the transfer has moved on
                }
                if !c.oack_seen {
                    if let Err(e) = check_oack(&self.config, expected, options, c) {
                        return Step::Done(Err(e));
                    }
                    c.oack_seen = true;
                    c.responded = true;
                    c.lock_peer(from);
                    if self.config.windowsize.is_some() {
                        if options.iter().any(|o| o.is("windowsize")) {
                            self.stats.ws_acked += 1;
                        } else {
                            self.stats.ws_not_acked += 1;
                        }
                    }
                    if self.config.blksize.is_some() {
                        if options.iter().any(|o| o.is("blksize")) {
                            self.stats.bs_acked += 1;
                        } else {
                            self.stats.bs_not_acked += 1;
                        }
                    }
                    self.stats.negotiated_blksize = Some(c.blksize);
                    self.stats.negotiated_windowsize = Some(c.window);
                } else {
                    // The server resent its OACK: our ACK 0 was lost or is late.
                    self.stats.retransmits += 1;
                }
                c.tries = 1;
                c.deadline = now + self.config.client_timeout;
                send_ack(c, &mut self.out, 0, server)
            }
            Packet::Data { block, data } => {
                if !c.responded {
                    // DATA 1 without an OACK: the server ignored every option.
                    c.responded = true;
                    c.lock_peer(from);
                    if self.config.windowsize.is_some() {
                        self.stats.ws_not_acked += 1;
                    }
                    if self.config.blksize.is_some() {
                        self.stats.bs_not_acked += 1;
                    }
                    self.stats.negotiated_blksize = Some(512);
                    self.stats.negotiated_windowsize = Some(1);
                }
                if block != c.next as u16 {
                    // A gap or an old duplicate: ask once for a resend from the last
                    // in-order block, then wait for it.
                    if c.gap_acked {
                        return Step::Continue;
                    }
                    c.gap_acked = true;
                    c.since_ack = 0;
                    self.stats.gap_acks += 1;
                    return send_ack(c, &mut self.out, (c.next - 1) as u16, server);
                }
                if data.len() > c.blksize {
                    return Step::Done(Err("oversize block".into()));
                }
                let end = c.offset + data.len() as u64;
                let matches = match expected {
                    Expected::Bytes(bytes) => {
                        bytes.get(c.offset as usize..end as usize) == Some(data)
                    }
                    Expected::Size(size) => end <= *size,
                };
                if !matches {
                    return Step::Done(Err(if end > expected.len() {
                        "size mismatch".into()
                    } else {
                        "data mismatch".into()
                    }));
                }
                c.offset = end;
                c.next += 1;
                if c.next == 3 {
                    c.connect_peer();
                }
                c.since_ack += 1;
                c.gap_acked = false;
                c.tries = 1;
                c.deadline = now + self.config.client_timeout;
                if data.len() < c.blksize {
                    if let Step::Done(Err(e)) = send_ack(c, &mut self.out, block, server) {
                        return Step::Done(Err(e));
                    }
                    if c.offset != expected.len() {
                        return Step::Done(Err("size mismatch".into()));
                    }
                    return Step::Done(Ok(()));
                }
                if c.since_ack >= c.window {
                    c.since_ack = 0;
                    return send_ack(c, &mut self.out, block, server);
                }
                Step::Continue
            }
            Packet::Ack { .. } | Packet::Rrq(_) | Packet::Wrq(_) => {
                Step::Done(Err("unexpected packet".into()))
            }
        }
    }

    /// Pops expired timers. A stale entry (older transfer, or a deadline that moved later)
    /// is dropped or re-pushed at the current deadline.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((when, id, transfer))) = self.timers.peek() {
            if when > now {
                return;
            }
            self.timers.pop();
            let c = &mut self.clients[id];
            if matches!(c.link, Link::Idle) || c.transfer != transfer {
                continue;
            }
            if c.deadline > now {
                self.timers.push(Reverse((c.deadline, id, transfer)));
                continue;
            }
            if c.tries >= MAX_TRIES {
                self.finish(id, Err("timeout".into()), now);
                continue;
            }
            c.tries += 1;
            c.since_ack = 0;
            c.gap_acked = false;
            c.deadline = now + self.config.client_timeout;
            self.stats.retransmits += 1;
            let sent = if c.responded {
                let block = (c.next - 1) as u16;
                send_ack(c, &mut self.out, block, self.config.server)
            } else {
                match c.send(&self.rrqs[c.file], self.config.server, &mut self.out) {
                    Ok(()) => Step::Continue,
                    Err(e) => Step::Done(Err(e)),
                }
            };
            if let Step::Done(result) = sent {
                self.finish(id, result, now);
                continue;
            }
            self.timers.push(Reverse((c.deadline, id, transfer)));
        }
    }

    /// Ends slot `id`'s transfer, closes its socket and starts the next one.
    fn finish(&mut self, id: usize, result: Result<(), String>, now: Instant) {
        let c = &mut self.clients[id];
        // Closing the socket removes it from the epoll set: no deregister syscall needed
        // (a stale event for the slot only finds the next socket empty).
        match std::mem::replace(&mut c.link, Link::Idle) {
            Link::Idle => return,
            Link::Own(_) => {}
            Link::Shared(addr) => {
                if let Some(shared) = &mut self.shared {
                    shared.by_addr.remove(&addr);
                }
            }
        }
        self.in_flight -= 1;
        let (started, bytes) = (c.started, c.offset);
        self.record(result, started, bytes, now);
        self.refill(id, now);
    }

    /// Counts a finished transfer that moved `bytes` of payload.
    fn record(&mut self, result: Result<(), String>, started: Instant, bytes: u64, now: Instant) {
        match result {
            Ok(()) => {
                self.stats.ok += 1;
                self.stats.payload_bytes += bytes;
                if self.end_time.is_none_or(|end| now <= end) {
                    self.stats.ok_in_window += 1;
                    self.stats.bytes_in_window += bytes;
                }
                let us = (now - started).as_micros();
                self.stats
                    .latencies_us
                    .push(us.try_into().unwrap_or(u64::MAX));
            }
            Err(reason) => {
                self.stats.failed += 1;
                self.stats.partial_bytes += bytes;
                *self.stats.failures.entry(reason).or_default() += 1;
            }
        }
        self.last_done = now;
    }
}

/// Checks an OACK against what was requested and applies it to `c`.
fn check_oack(
    config: &Config,
    expected: &Expected,
    options: dyntftp::packet::Options<'_>,
    c: &mut Client,
) -> Result<(), String> {
    let number = |value: &[u8]| -> Option<u64> { std::str::from_utf8(value).ok()?.parse().ok() };
    for o in options.iter() {
        let value = number(o.value);
        let name = String::from_utf8_lossy(o.name).to_ascii_lowercase();
        match (name.as_str(), value) {
            ("blksize", Some(v)) if config.blksize.is_some_and(|b| (8..=b as u64).contains(&v)) => {
                c.blksize = v as usize;
            }
            ("windowsize", Some(v))
                if config
                    .windowsize
                    .is_some_and(|w| (1..=w as u64).contains(&v)) =>
            {
                c.window = v;
            }
            ("tsize", Some(v)) if config.tsize => {
                if v != expected.len() {
                    return Err("tsize mismatch".into());
                }
            }
            ("timeout", Some(v)) if config.timeout.is_some_and(|t| t as u64 == v) => {}
            _ => {
                return Err(format!(
                    "bad oack: {name}={}",
                    String::from_utf8_lossy(o.value)
                ))
            }
        }
    }
    Ok(())
}

fn send_ack(c: &Client, out: &mut Outbox, block: u16, server: SocketAddr) -> Step {
    // Opcode 4 (ACK) and the block number: no buffer to borrow beside `out`.
    let [hi, lo] = block.to_be_bytes();
    match c.send(&[0, 4, hi, lo], server, out) {
        Ok(()) => Step::Continue,
        Err(e) => Step::Done(Err(e)),
    }
}
