//! TFTP mode: the client slots and the `mio` loop that drives them. The protocol of each
//! transfer is `dyntftp::client::ReadTransfer`; this file is its socket layer and the
//! measurement around it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use dyntftp::client::{ClientError, Event, ReadTransfer, Request, Settings, Violation};
use dyntftp::packet::MAX_DATAGRAM;
use dyntftp::Mode;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use testkit::Rng;

use crate::cli::{Config, Expected};
use crate::mmsg::{Outbox, SharedSocket, SHARED_RCVBUF, SHARED_TOKEN};
use crate::report::{self, Stats};
use crate::sys::{cpu_times, set_rcvbuf};

/// Timer resends without progress before a transfer fails with `timeout`: the RRQ or the
/// last ACK is sent at most five times.
const RETRIES: u32 = 4;

/// How a slot's transfer reaches the network.
enum Link {
    /// No transfer in flight.
    Idle,
    /// Its own socket (the default), connected to the server's transfer ID once the
    /// transfer passes its first block.
    Own { socket: UdpSocket, connected: bool },
    /// `--shared-socket`: its loopback address on the shared socket.
    Shared(Ipv4Addr),
}

/// One client slot. A slot runs one transfer at a time, each on a fresh socket (or a fresh
/// loopback address of the shared socket). The transfer's state stays in the slot and is
/// overwritten in place by the next one: it is a few hundred bytes, not worth a copy per
/// transfer.
struct Client {
    link: Link,
    /// Unique number of the current transfer; stale timer entries carry an older one.
    id: u64,
    /// Index into `Config::files`.
    file: usize,
    started: Instant,
    /// Payload bytes received and verified.
    verified: u64,
    tftp: ReadTransfer,
}

impl Client {
    /// Sends what the transfer queued, if anything, on its socket, or queues it in `out`
    /// for the shared socket's next batch. A full socket buffer loses the datagram, as the
    /// network would; the timers recover. Called for every datagram: always inlined.
    #[inline(always)]
    fn flush(&mut self, out: &mut Outbox) -> Result<(), String> {
        let Some(transmit) = self.tftp.poll_transmit() else {
            return Ok(());
        };
        let sent = match &self.link {
            Link::Idle => return Ok(()),
            Link::Shared(from) => {
                out.queue(transmit.contents, *from, transmit.destination);
                return Ok(());
            }
            Link::Own {
                socket,
                connected: true,
            } => socket.send(transmit.contents),
            Link::Own { socket, .. } => socket.send_to(transmit.contents, transmit.destination),
        };
        match sent {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("send: {e}")),
        }
    }

    /// Connects the socket to the server's transfer ID, as real clients do: the kernel then
    /// drops datagrams from anyone else, and sends skip the route lookup. Done once the
    /// transfer is longer than one block, so that a one-block transfer (the small-file
    /// load) does not pay a `connect` it would not use.
    fn connect_peer(&mut self) {
        if let (Link::Own { socket, connected }, Some(peer)) = (&mut self.link, self.tftp.peer()) {
            if !*connected {
                *connected = socket.connect(peer).is_ok();
            }
        }
    }
}

/// What a datagram or timeout did to a transfer.
enum Step {
    Continue,
    Done(Result<(), String>),
}

struct Loadgen {
    config: Config,
    /// The request of each file, built once.
    requests: Vec<Request>,
    settings: Settings,
    poll: Poll,
    /// The client slots; a slot's index is its poll token.
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
    // One socket per client; sockets that cannot be opened count as failures.
    testkit::sys::raise_fd_limit((config.concurrency as u64).saturating_add(64));
    let requests: Vec<Request> = config.files.iter().map(|f| request(&config, f)).collect();
    let settings = Settings {
        timeout: config.client_timeout,
        retries: RETRIES,
        linger: 0,
        keep_payload: false,
    };
    let cpu_before = cpu_times();
    let now = Instant::now();
    let poll = Poll::new()?;
    let shared = if config.shared_socket {
        Some(SharedSocket::open(&poll, config.rcvbuf.max(SHARED_RCVBUF))?)
    } else {
        None
    };
    let idle = |_| Client {
        link: Link::Idle,
        id: 0,
        file: 0,
        started: now,
        verified: 0,
        tftp: ReadTransfer::new(now, config.server, &requests[0], settings),
    };
    let clients = (0..config.concurrency).map(idle).collect();
    let mut lg = Loadgen {
        requests,
        settings,
        poll,
        clients,
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

/// The request for `file`: the options asked for, in wire order.
fn request(config: &Config, file: &str) -> Request {
    let mut request = Request::new(file, Mode::Octet);
    if let Some(blksize) = config.blksize {
        request = request.blksize(blksize);
    }
    if let Some(window) = config.windowsize {
        request = request.windowsize(window);
    }
    if config.tsize {
        request = request.tsize();
    }
    if let Some(seconds) = config.timeout {
        request = request.timeout(seconds);
    }
    request
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
                Link::Own {
                    socket,
                    connected: false,
                }
            }
        };
        let file = (self.started - 1) as usize % self.config.files.len();
        let transfer = self.next_transfer;
        self.next_transfer += 1;
        let c = &mut self.clients[id];
        c.link = link;
        c.id = transfer;
        c.file = file;
        c.started = now;
        c.verified = 0;
        c.tftp = ReadTransfer::new(now, server, &self.requests[file], self.settings);
        if let Err(e) = c.flush(&mut self.out) {
            if let (Link::Shared(addr), Some(shared)) = (&c.link, &mut self.shared) {
                shared.by_addr.remove(addr);
            }
            c.link = Link::Idle;
            return Err(e);
        }
        if let Some(deadline) = c.tftp.deadline() {
            self.timers.push(Reverse((deadline, id, transfer)));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Drains slot `id`'s socket. Spurious events are harmless.
    fn on_readable(&mut self, id: usize) {
        let mut buf = std::mem::take(&mut self.buf);
        while let Link::Own { socket, .. } = &self.clients[id].link {
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
            self.stats.datagrams_received += 1;
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
            self.stats.datagrams_received += n as u64;
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

    /// Feeds a datagram to slot `id`'s transfer, checks what it brought against the
    /// expected bytes and sends the answer.
    fn on_datagram(&mut self, id: usize, data: &[u8], from: SocketAddr, now: Instant) -> Step {
        let t = &mut self.clients[id];
        // `--drop`: DATA and OACK from the server, before the transfer sees them.
        if self.config.drop_pct > 0.0
            && matches!(data, [0, 3 | 6, ..])
            && t.tftp.peer().is_none_or(|peer| peer == from)
            && self.rng.unit() * 100.0 < self.config.drop_pct
        {
            self.stats.dropped += 1;
            return Step::Continue;
        }
        let expected = &self.config.expected[t.file];
        match t.tftp.handle_datagram(now, from, data) {
            Some(Event::Oack(_)) => {
                let oack = t.tftp.oack().unwrap_or_default();
                if self.config.windowsize.is_some() {
                    match oack.windowsize {
                        Some(_) => self.stats.ws_acked += 1,
                        None => self.stats.ws_not_acked += 1,
                    }
                }
                if self.config.blksize.is_some() {
                    match oack.blksize {
                        Some(_) => self.stats.bs_acked += 1,
                        None => self.stats.bs_not_acked += 1,
                    }
                }
                self.stats.negotiated_blksize = Some(usize::from(t.tftp.blksize()));
                self.stats.negotiated_windowsize = Some(u64::from(t.tftp.window()));
                if oack.tsize.is_some_and(|size| size != expected.len()) {
                    return Step::Done(Err("tsize mismatch".into()));
                }
            }
            Some(Event::Data(payload)) => {
                if t.tftp.blocks() == 1 && t.tftp.oack().is_none() {
                    // DATA 1 without an OACK: the server ignored every option.
                    if self.config.windowsize.is_some() {
                        self.stats.ws_not_acked += 1;
                    }
                    if self.config.blksize.is_some() {
                        self.stats.bs_not_acked += 1;
                    }
                    self.stats.negotiated_blksize = Some(512);
                    self.stats.negotiated_windowsize = Some(1);
                }
                let end = t.tftp.bytes();
                let matches = match expected {
                    Expected::Bytes(bytes) => {
                        let start = (end - payload.len() as u64) as usize;
                        bytes.get(start..end as usize) == Some(payload)
                    }
                    Expected::Size(size) => end <= *size,
                };
                if !matches {
                    // Refused: its ACK is not sent.
                    return Step::Done(Err(if end > expected.len() {
                        "size mismatch".into()
                    } else {
                        "data mismatch".into()
                    }));
                }
                t.verified = end;
                if t.tftp.blocks() == 2 {
                    t.connect_peer();
                }
            }
            None => {}
        }
        if let Err(e) = t.flush(&mut self.out) {
            return Step::Done(Err(e));
        }
        match t.tftp.outcome() {
            None => Step::Continue,
            Some(Ok(bytes)) if bytes != expected.len() => Step::Done(Err("size mismatch".into())),
            Some(Ok(_)) => Step::Done(Ok(())),
            Some(Err(e)) => Step::Done(Err(failure(e))),
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
            let t = &mut self.clients[id];
            if matches!(t.link, Link::Idle) || t.id != transfer {
                continue;
            }
            let Some(deadline) = t.tftp.deadline() else {
                continue;
            };
            if deadline > now {
                self.timers.push(Reverse((deadline, id, transfer)));
                continue;
            }
            t.tftp.handle_timeout(now);
            let result = match (t.flush(&mut self.out), t.tftp.outcome()) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(Err(e))) => Err(failure(e)),
                (Ok(()), _) => Ok(()),
            };
            match (result, t.tftp.deadline()) {
                (Ok(()), Some(deadline)) => self.timers.push(Reverse((deadline, id, transfer))),
                (result, _) => self.finish(id, result, now),
            }
        }
    }

    /// Ends slot `id`'s transfer, closes its socket and starts the next one.
    fn finish(&mut self, id: usize, result: Result<(), String>, now: Instant) {
        let c = &mut self.clients[id];
        // Closing the socket removes it from the epoll set: no deregister syscall needed
        // (a stale event for the slot only finds the next socket empty).
        match std::mem::replace(&mut c.link, Link::Idle) {
            Link::Idle => return,
            Link::Own { .. } => {}
            Link::Shared(addr) => {
                if let Some(shared) = &mut self.shared {
                    shared.by_addr.remove(&addr);
                }
            }
        }
        let (started, verified, counters) = (c.started, c.verified, *c.tftp.stats());
        self.in_flight -= 1;
        self.stats.retransmits += counters.timer_resends;
        self.stats.gap_acks += counters.gap_acks + counters.repeat_acks;
        self.stats.foreign += counters.foreign;
        self.record(result, started, verified, now);
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

/// A failed transfer's reason in the report.
fn failure(error: &ClientError) -> String {
    match error {
        ClientError::Server { code, message } => format!("error {}: {message}", code.to_u16()),
        ClientError::TimedOut => "timeout".into(),
        ClientError::Protocol(Violation::Malformed(e)) => format!("malformed packet: {e}"),
        ClientError::Protocol(Violation::Option { name, value }) => {
            format!("bad oack: {}={value}", name.to_ascii_lowercase())
        }
        ClientError::Protocol(Violation::Oversize { .. }) => "oversize block".into(),
        ClientError::Protocol(Violation::Unexpected(_)) => "unexpected packet".into(),
        other => other.to_string(),
    }
}
