//! How datagrams leave: a session sends from its own socket (a new port, its transfer ID,
//! connected to the client) or, in single-port mode, from the listener that received its
//! request, with the address the client sent to as the source. Windows of DATA go out with
//! UDP GSO, several datagrams per system call, until the kernel says it cannot. Every send
//! is counted in [`ServerStats`].
//!
//! In single-port mode every session sends through the same few sockets, so single
//! datagrams to them (a lock-step session's DATA, an OACK, an ERROR) are queued and go out
//! together, up to [`sys::MAX_BATCH`] per `sendmmsg`, when the loop's iteration ends
//! ([`Sender::flush`]): a storm of lock-step clients costs one send call per batch of
//! ACKs read, not one per client. Anything else sent through a listener first sends the
//! queue, so datagrams leave in the order they were made.
//!
//! A session socket is connected to its peer, so the kernel drops other senders' datagrams
//! (answering them with ICMP port unreachable), sends carry no address, and an ICMP error
//! from the peer (nobody listens on its port: a closed client, or a spoofed request)
//! comes back as an error from the next send or receive ([`peer_unreachable`]): the driver
//! then ends the session at once instead of retransmitting into the void.
//!
//! A session socket outlives its session: [`SessionSockets::recycle`] disconnects it, which
//! gives its port back (it then receives nothing), empties it, and keeps it, up to
//! [`MAX_SPARES`], for the next session on the same address, which connects it again on a
//! new random ephemeral port. A storm of short transfers then costs a `connect` per
//! session where it cost `socket`, `bind`, `connect`, an epoll registration and `close`.
//! Sockets of a port range are not kept (their ports are bound for good).
//!
//! Session sockets take any free port, or with a port range
//! ([`ServerBuilder::port_range`](super::ServerBuilder::port_range)) a port of the range:
//! [`PortCursor`] starts each search where the last one ended (at first a random port),
//! so a session usually gets the first port it tries, and tries every port of the range
//! at most once. When none is free the open fails with `EADDRINUSE` ([`out_of_ports`]),
//! as it does when the kernel's ephemeral ports run out: the request waits.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::ops::RangeInclusive;

use log::{debug, info};
use mio::net::UdpSocket;

use crate::handler::Reject;
use crate::packet::{write_error, ErrorCode, DATA_HEADER_LEN};
use crate::session::Transmit;
use crate::stats::ServerStats;
use crate::sys;

/// The most bytes and datagrams one UDP GSO send may carry (Linux: 64 KiB minus
/// headers, and `UDP_MAX_SEGMENTS`).
const GSO_MAX_BYTES: usize = 65_000;
const GSO_MAX_SEGMENTS: usize = 64;

/// A listening socket.
pub(super) struct Listener {
    pub(super) socket: UdpSocket,
    /// An IPv6 socket (dual-stack when bound to `[::]`): IPv4 peers are mapped.
    pub(super) v6: bool,
    pub(super) local: SocketAddr,
    /// True when the socket may hold datagrams not read yet (edge-triggered readiness).
    pub(super) readable: bool,
}

/// The way back to a client through the listener that received its datagram: the
/// listener, and the address (with its interface) the client sent to, used as the source
/// of every reply when the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReplyPath {
    pub(crate) listener: usize,
    pub(crate) source: Option<(IpAddr, u32)>,
}

/// Where a datagram to a listener came from, where it went, and the way back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// The sender's address and port.
    pub(crate) peer: SocketAddr,
    /// The address it was sent to, with the listener's port (see [`destination`]).
    pub(crate) local: SocketAddr,
    /// The listener it came through.
    pub(crate) reply: ReplyPath,
}

/// Where a session sends from and receives on.
pub(super) enum Transport {
    /// Its own socket, on a new port (its transfer ID), connected to the peer.
    Own(UdpSocket),
    /// A listener, in single-port mode.
    Shared(ReplyPath),
}

/// The most session sockets kept for reuse (per loop): each holds a descriptor, and no
/// port.
pub(super) const MAX_SPARES: usize = 128;

/// The most datagrams read to empty a socket before it is kept: a socket with more
/// (a peer that flooded its port) is closed instead.
const DRAIN_MAX: usize = 8;

/// A session socket kept after its session ended, for the next session on the same
/// address: disconnected (no port: nothing reaches it) and empty.
struct Spare {
    socket: UdpSocket,
    /// The address it is bound to, port 0.
    bound: SocketAddr,
    /// Registered with the poll (under an ended session's token).
    registered: bool,
}

/// A session's transport as [`SessionSockets::open`] made it.
pub(super) struct Opened {
    pub(super) transport: Transport,
    /// Its socket is a reused one already registered with the poll: the new session
    /// re-registers it under its own token.
    pub(super) registered: bool,
}

/// Opens the transports of new sessions (and of refusals): the listener in single-port
/// mode, else a socket on a new port, of the range when there is one, a kept one when
/// there is one for the address.
pub(super) struct SessionSockets {
    single_port: bool,
    /// The port range's next port to try; `None`: any port the kernel picks.
    ports: Option<PortCursor>,
    /// Sockets of ended sessions, kept for reuse (none in single-port mode or with a
    /// port range); the newest last.
    spares: Vec<Spare>,
    /// The most sessions: a kept socket holds a descriptor a session would, so running
    /// sessions and kept sockets together stay below it.
    max_sessions: usize,
}

impl SessionSockets {
    /// Session sockets for the single-port mode or not, in `port_range` when given (the
    /// first port tried is the one of the range `seed` picks), for at most `max_sessions`
    /// sessions.
    pub(super) fn new(
        single_port: bool,
        port_range: Option<RangeInclusive<u16>>,
        seed: u64,
        max_sessions: usize,
    ) -> SessionSockets {
        SessionSockets {
            single_port,
            ports: port_range.map(|range| PortCursor::new(range, seed)),
            spares: Vec::new(),
            max_sessions,
        }
    }

    /// The transport of a new session for `peer`, which asked through `reply` and sent to
    /// `local`: in single-port mode the listener, else a socket on the address the client
    /// sent to, on a new port (of the range, if any), connected to `peer`: a kept one
    /// when there is one for that address, else a new one. Fails with `EADDRINUSE` when
    /// no port is free ([`out_of_ports`]).
    pub(super) fn open(
        &mut self,
        reply: ReplyPath,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> io::Result<Opened> {
        if self.single_port {
            return Ok(Opened {
                transport: Transport::Shared(reply),
                registered: false,
            });
        }
        let bind = session_address(local);
        let peer = link_local_scope(peer, local);
        if let Some(opened) = self.reuse(bind, peer) {
            return Ok(opened);
        }
        let socket = match &mut self.ports {
            None => sys::bind_connected(bind, peer)?,
            Some(cursor) => {
                let socket = sys::bind_connected_in(bind, cursor.candidates(), peer)?;
                cursor.taken(socket.local_addr()?.port());
                socket
            }
        };
        Ok(Opened {
            transport: Transport::Own(UdpSocket::from_std(socket)),
            registered: false,
        })
    }

    /// The newest kept socket bound to `bind`, connected to `peer` (and so on a new
    /// port); `None` when none is kept, or connecting fails (the socket is closed, and a
    /// new one will report why).
    fn reuse(&mut self, bind: SocketAddr, peer: SocketAddr) -> Option<Opened> {
        let at = self.spares.iter().rposition(|spare| spare.bound == bind)?;
        let spare = self.spares.swap_remove(at);
        spare.socket.connect(sys::peer_of_family(bind, peer)).ok()?;
        Some(Opened {
            transport: Transport::Own(spare.socket),
            registered: spare.registered,
        })
    }

    /// Takes back the transport of an ended session (or of a refusal) that was opened for
    /// a client who sent to `local`: its socket, when kept, is disconnected (its port goes
    /// back to the kernel, so nothing more reaches it) and emptied (what its peer sent
    /// last, and the error of an ICMP message, must not reach the next session); else it
    /// is closed. Kept: up to [`MAX_SPARES`], while they and the `sessions` running are
    /// fewer than the most sessions (each holds a descriptor), without a port range, and
    /// not on an IPv6 link-local address (disconnecting forgets the interface). With no
    /// session running, every kept socket is closed: an idle server holds none.
    pub(super) fn recycle(
        &mut self,
        transport: Transport,
        local: SocketAddr,
        registered: bool,
        sessions: usize,
    ) {
        let Transport::Own(socket) = transport else {
            return;
        };
        if sessions == 0 {
            self.release_spares();
            return;
        }
        let kept = self.spares.len();
        let bound = session_address(local);
        let scoped = matches!(bound, SocketAddr::V6(v6) if v6.scope_id() != 0);
        if self.ports.is_some()
            || kept >= MAX_SPARES
            || sessions.saturating_add(kept) >= self.max_sessions
            || scoped
        {
            return;
        }
        if sys::disconnect(&socket).is_err() {
            return;
        }
        let mut byte = [0u8; 1];
        for _ in 0..DRAIN_MAX {
            match socket.recv(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.spares.push(Spare {
                        socket,
                        bound,
                        registered,
                    });
                    return;
                }
                // A datagram, or a pending error (now cleared).
                _ => {}
            }
        }
    }

    /// Closes every kept socket (descriptors ran short).
    pub(super) fn release_spares(&mut self) {
        self.spares.clear();
    }

    /// How many sockets are kept.
    #[cfg(test)]
    fn spares(&self) -> usize {
        self.spares.len()
    }
}

/// The address a session socket for a client who sent to `local` is bound to: `local`'s
/// address (with its scope), any port.
fn session_address(local: SocketAddr) -> SocketAddr {
    with_scope_of(SocketAddr::new(local.ip(), 0), local)
}

/// Whether opening a session socket failed because no port was free: every port of the
/// range, or of the kernel's ephemeral range, is in use.
pub(super) fn out_of_ports(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EADDRINUSE)
}

/// Where the search for a free port of a range starts: after the port the last session
/// got, wrapping around. Sessions end about in the order they start, so the port after
/// the newest session's is usually the one free the longest.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PortCursor {
    low: u16,
    high: u16,
    next: u16,
}

impl PortCursor {
    /// A cursor over `range` (not empty) at the port `seed` picks.
    fn new(range: RangeInclusive<u16>, seed: u64) -> PortCursor {
        let (low, high) = (*range.start(), *range.end());
        assert!(low <= high, "empty port range");
        let size = u64::from(high - low) + 1;
        PortCursor {
            low,
            high,
            next: low + (seed % size) as u16,
        }
    }

    /// Every port of the range once, from the next one on, wrapping around.
    fn candidates(&self) -> impl Iterator<Item = u16> {
        (self.next..=self.high).chain(self.low..self.next)
    }

    /// A session got `port`: the next search starts after it.
    fn taken(&mut self, port: u16) {
        self.next = if port >= self.high || port < self.low {
            self.low
        } else {
            port + 1
        };
    }
}

/// Whether a send or receive error means the peer cannot be reached: the kernel got an
/// ICMP error for a connected session socket (port unreachable: `ECONNREFUSED`; host or
/// network unreachable).
pub(super) fn peer_unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// Datagrams no larger than this are queued for a listener; larger ones (single-port
/// caps lifted) go at once rather than be copied.
const QUEUED_MAX_LEN: usize = 9216;

/// One datagram waiting in [`Sender`]'s queue.
struct Queued {
    reply: ReplyPath,
    peer: SocketAddr,
    /// Where its bytes are in the queue's buffer.
    start: usize,
    len: usize,
    /// DATA payload bytes it carries, for the statistics.
    payload: u64,
}

/// Sends what sessions and refusals have to send.
pub(super) struct Sender {
    /// Send runs of DATA with UDP GSO (turned off for good at the first failure).
    gso: bool,
    /// Encoding buffer for ERROR packets.
    scratch: Vec<u8>,
    /// Datagrams for listeners, sent by [`flush`](Self::flush); their bytes in `bytes`.
    queue: Vec<Queued>,
    bytes: Vec<u8>,
}

impl Sender {
    /// A sender that tries UDP GSO when `gso`.
    pub(super) fn new(gso: bool) -> Sender {
        Sender {
            gso,
            scratch: Vec::new(),
            queue: Vec::with_capacity(sys::MAX_BATCH),
            bytes: Vec::new(),
        }
    }

    /// Sends the queued datagrams, up to [`sys::MAX_BATCH`] per call, each batch to one
    /// listener. A datagram the kernel refuses is counted and dropped, as a single send's
    /// would be (the session's retransmission recovers it).
    pub(super) fn flush(&mut self, listeners: &[Listener], stats: &mut ServerStats) {
        let mut next = 0;
        while next < self.queue.len() {
            let listener = self.queue[next].reply.listener;
            let run = self.queue[next..]
                .iter()
                .take(sys::MAX_BATCH)
                .take_while(|q| q.reply.listener == listener)
                .count();
            let batch = self.queue[next..next + run].iter().map(|q| sys::Outgoing {
                buf: &self.bytes[q.start..q.start + q.len],
                peer: q.peer,
                source: q.reply.source,
            });
            let socket = &listeners[listener];
            match sys::send_batch_from(&socket.socket, socket.v6, batch) {
                Ok(sent) => {
                    for q in &self.queue[next..next + sent] {
                        stats.datagrams_sent += 1;
                        stats.bytes_sent += q.payload;
                    }
                    // A short count: the next one failed, and says why as the first of
                    // the next call.
                    next += sent.max(1).min(run);
                    if sent == 0 {
                        stats.send_errors += 1;
                    }
                }
                Err(e) => {
                    let q = &self.queue[next];
                    count_send(stats, Err(e), 1, q.payload, q.peer);
                    next += 1;
                }
            }
        }
        self.queue.clear();
        self.bytes.clear();
    }

    /// Queues one datagram for a listener; sends the queue when it holds a batch.
    fn enqueue(
        &mut self,
        listeners: &[Listener],
        reply: ReplyPath,
        peer: SocketAddr,
        datagram: &[u8],
        payload: u64,
        stats: &mut ServerStats,
    ) {
        self.queue.push(Queued {
            reply,
            peer,
            start: self.bytes.len(),
            len: datagram.len(),
            payload,
        });
        self.bytes.extend_from_slice(datagram);
        if self.queue.len() >= sys::MAX_BATCH {
            self.flush(listeners, stats);
        }
    }

    /// The most datagrams worth asking a session for at once (see
    /// [`Session::poll_output`](crate::session::Session::poll_output)).
    pub(super) fn max_datagrams(&self, blksize: u16) -> usize {
        if !self.gso {
            return 1;
        }
        let segment = blksize as usize + DATA_HEADER_LEN;
        (GSO_MAX_BYTES / segment).clamp(1, GSO_MAX_SEGMENTS)
    }

    /// Sends a session's transmit to `peer`: one datagram, or a run with one GSO send
    /// (one by one if the kernel refuses GSO, and never GSO again). Returns false when the
    /// kernel says the peer is unreachable ([`peer_unreachable`]): the session must end.
    pub(super) fn transmit(
        &mut self,
        listeners: &[Listener],
        transport: &Transport,
        peer: SocketAddr,
        transmit: &Transmit<'_>,
        stats: &mut ServerStats,
    ) -> bool {
        if let Transport::Shared(reply) = transport {
            if transmit.datagrams == 1 && transmit.contents.len() <= QUEUED_MAX_LEN {
                let payload = transmit.payload;
                self.enqueue(listeners, *reply, peer, transmit.contents, payload, stats);
                return true;
            }
            // Sent at once: after what is queued.
            self.flush(listeners, stats);
        }
        if transmit.datagrams == 1 {
            let sent = send(listeners, transport, transmit.contents, peer, None);
            return count_send(stats, sent, 1, transmit.payload, peer);
        }
        let segment = Some(transmit.segment_size as u16);
        match send(listeners, transport, transmit.contents, peer, segment) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock && !peer_unreachable(&e) => {
                info!("UDP segmentation offload unavailable ({e}); sending one datagram per call");
                self.gso = false;
                for datagram in transmit.segments() {
                    let sent = send(listeners, transport, datagram, peer, None);
                    let payload = (datagram.len() - DATA_HEADER_LEN) as u64;
                    if !count_send(stats, sent, 1, payload, peer) {
                        return false;
                    }
                }
                true
            }
            sent => {
                let datagrams = transmit.datagrams as u64;
                count_send(stats, sent, datagrams, transmit.payload, peer)
            }
        }
    }

    /// Answers a datagram from a stranger with ERROR 5 "unknown transfer id", from the
    /// session's (or, in single-port mode, the listener's) address and port.
    pub(super) fn answer_stray(
        &mut self,
        listeners: &[Listener],
        transport: &Transport,
        to: SocketAddr,
        stats: &mut ServerStats,
    ) {
        self.scratch.clear();
        write_error(
            &mut self.scratch,
            ErrorCode::UnknownTransferId,
            "unknown transfer id",
        );
        let sent = match transport {
            // Not the peer the socket is connected to: an explicit address.
            Transport::Own(socket) => socket.send_to(&self.scratch, to),
            Transport::Shared(_) => {
                self.flush(listeners, stats);
                send(listeners, transport, &self.scratch, to, None)
            }
        };
        count_send(stats, sent, 1, 0, to);
    }

    /// Sends the ERROR of a refused request as a session would: from a new socket on the
    /// address the client sent to (in the port range, if any) or, in single-port mode,
    /// from the listener.
    pub(super) fn refuse(
        &mut self,
        listeners: &[Listener],
        sockets: &mut SessionSockets,
        sessions: usize,
        arrival: &Arrival,
        reject: &Reject,
        stats: &mut ServerStats,
    ) {
        let peer = arrival.peer;
        *stats.rejected.entry(reject.code.to_u16()).or_default() += 1;
        self.scratch.clear();
        write_error(&mut self.scratch, reject.code, &reject.message);
        let sent = match sockets.open(arrival.reply, arrival.local, peer) {
            Ok(Opened {
                transport: Transport::Shared(reply),
                ..
            }) => {
                let error = std::mem::take(&mut self.scratch);
                self.enqueue(listeners, reply, peer, &error, 0, stats);
                self.scratch = error;
                return;
            }
            Ok(Opened {
                transport,
                registered,
            }) => {
                let sent = send(listeners, &transport, &self.scratch, peer, None);
                sockets.recycle(transport, arrival.local, registered, sessions);
                sent
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(_) => stats.datagrams_sent += 1,
            Err(e) => {
                stats.send_errors += 1;
                debug!("{peer}: cannot send ERROR: {e}");
            }
        }
    }
}

/// Sends `datagrams` to the session's `peer` over `transport`: one datagram, or with
/// `segment` several of that size back to back in one UDP GSO send. A session's own
/// socket is connected to `peer`: no address goes with the send.
fn send(
    listeners: &[Listener],
    transport: &Transport,
    datagrams: &[u8],
    peer: SocketAddr,
    segment: Option<u16>,
) -> io::Result<usize> {
    match (transport, segment) {
        (Transport::Own(socket), None) => socket.send(datagrams),
        (Transport::Own(socket), Some(segment)) => {
            sys::send_segments(socket, datagrams, segment, None)
        }
        (Transport::Shared(reply), segment) => {
            let listener = &listeners[reply.listener];
            let (socket, v6) = (&listener.socket, listener.v6);
            sys::send_from(socket, v6, datagrams, peer, reply.source, segment)
        }
    }
}

/// Counts one send of `datagrams` carrying `payload` DATA bytes. A send dropped for a
/// full buffer is recovered by the retransmission timer. Returns false when the peer is
/// unreachable ([`peer_unreachable`]).
fn count_send(
    stats: &mut ServerStats,
    sent: io::Result<usize>,
    datagrams: u64,
    payload: u64,
    peer: SocketAddr,
) -> bool {
    match sent {
        Ok(_) => {
            stats.datagrams_sent += datagrams;
            stats.bytes_sent += payload;
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => stats.send_would_block += datagrams,
        Err(e) => {
            stats.send_errors += datagrams;
            debug!("{peer}: send failed: {e}");
            return !peer_unreachable(&e);
        }
    }
    true
}

/// The address a datagram was sent to: the destination the kernel reported (with the
/// interface as scope for an IPv6 link-local address, which needs it to be bound), else
/// the listener's own address.
pub(super) fn destination(listener: SocketAddr, reported: Option<(IpAddr, u32)>) -> SocketAddr {
    match reported {
        Some((IpAddr::V6(v6), ifindex)) if v6.is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(v6, listener.port(), 0, ifindex))
        }
        Some((ip, _)) => SocketAddr::new(ip, listener.port()),
        None => SocketAddr::new(sys::unmap(listener.ip()), listener.port()),
    }
}

/// `peer` with the IPv6 scope of `local` when `peer` is link-local (which needs one to be
/// connected to); any other address unchanged.
fn link_local_scope(peer: SocketAddr, local: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V6(v6) if v6.ip().is_unicast_link_local() && v6.scope_id() == 0 => {
            with_scope_of(peer, local)
        }
        _ => peer,
    }
}

/// `addr` with the IPv6 scope of `other`.
fn with_scope_of(addr: SocketAddr, other: SocketAddr) -> SocketAddr {
    match (addr, other) {
        (SocketAddr::V6(mut mine), SocketAddr::V6(theirs)) => {
            mine.set_scope_id(theirs.scope_id());
            SocketAddr::V6(mine)
        }
        (mine, _) => mine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A listener on 127.0.0.1, the single-port transport through it, and a receiver with
    /// a read timeout.
    fn single_port() -> ([Listener; 1], Transport, std::net::UdpSocket) {
        let socket = sys::bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let local = socket.local_addr().unwrap();
        let listener = Listener {
            socket: UdpSocket::from_std(socket),
            v6: false,
            local,
            readable: false,
        };
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let shared = Transport::Shared(ReplyPath {
            listener: 0,
            source: None,
        });
        ([listener], shared, receiver)
    }

    fn single(contents: &[u8]) -> Transmit<'_> {
        Transmit {
            contents,
            segment_size: contents.len(),
            datagrams: 1,
            payload: contents.len() as u64,
            retransmission: None,
        }
    }

    #[test]
    fn single_port_datagrams_wait_for_the_flush_or_a_full_batch_and_keep_their_order() {
        let (listeners, shared, receiver) = single_port();
        let to = receiver.local_addr().unwrap();
        let mut sender = Sender::new(false);
        let mut stats = ServerStats::default();
        let count = sys::MAX_BATCH + 3;
        for i in 0..count {
            let datagram = [i as u8; 10];
            assert!(sender.transmit(&listeners, &shared, to, &single(&datagram), &mut stats));
        }
        // A full batch went at once; the rest waits for the flush.
        assert_eq!(stats.datagrams_sent, sys::MAX_BATCH as u64);
        sender.flush(&listeners, &mut stats);
        assert_eq!(stats.datagrams_sent, count as u64);
        assert_eq!(stats.bytes_sent, 10 * count as u64);
        let mut buf = [0u8; 16];
        for i in 0..count {
            let (n, from) = receiver.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&[i as u8; 10][..], listeners[0].local));
        }
    }

    #[test]
    fn a_datagram_sent_at_once_leaves_after_the_queue() {
        let (listeners, shared, receiver) = single_port();
        let to = receiver.local_addr().unwrap();
        let mut sender = Sender::new(false);
        let mut stats = ServerStats::default();
        sender.transmit(&listeners, &shared, to, &single(b"queued"), &mut stats);
        // Too large to be queued: the queue goes first.
        let large = vec![7u8; QUEUED_MAX_LEN + 1];
        sender.transmit(&listeners, &shared, to, &single(&large), &mut stats);
        sender.answer_stray(&listeners, &shared, to, &mut stats);
        assert_eq!(stats.datagrams_sent, 3);
        let mut buf = vec![0u8; 65536];
        let mut next = || {
            let (n, _) = receiver.recv_from(&mut buf).unwrap();
            buf[..n].to_vec()
        };
        assert_eq!(next(), b"queued");
        assert_eq!(next().len(), QUEUED_MAX_LEN + 1);
        assert_eq!(next()[..2], [0, 5], "ERROR 5 last");
    }

    #[test]
    fn gso_runs_fit_the_kernel_limits() {
        let sender = Sender::new(true);
        assert_eq!(sender.max_datagrams(512), 64);
        assert_eq!(sender.max_datagrams(1428), 45);
        assert_eq!(sender.max_datagrams(8192), 7);
        assert_eq!(sender.max_datagrams(65464), 1);
        assert_eq!(Sender::new(false).max_datagrams(512), 1);
    }

    #[test]
    fn the_port_cursor_tries_each_port_once_from_after_the_last_one_taken() {
        let mut cursor = PortCursor::new(7000..=7004, 12);
        // 12 % 5 ports: the search starts at 7002.
        assert_eq!(
            cursor.candidates().collect::<Vec<_>>(),
            [7002, 7003, 7004, 7000, 7001]
        );
        cursor.taken(7003);
        assert_eq!(cursor.candidates().next(), Some(7004));
        cursor.taken(7004);
        assert_eq!(
            cursor.candidates().collect::<Vec<_>>(),
            [7000, 7001, 7002, 7003, 7004]
        );
        // One port; the whole u16 range (no overflow at either end).
        let mut one = PortCursor::new(69..=69, u64::MAX);
        assert_eq!(one.candidates().collect::<Vec<_>>(), [69]);
        one.taken(69);
        assert_eq!(one.candidates().collect::<Vec<_>>(), [69]);
        let mut all = PortCursor::new(1..=u16::MAX, u64::MAX);
        assert_eq!(all.candidates().count(), usize::from(u16::MAX));
        all.taken(u16::MAX);
        assert_eq!(all.candidates().next(), Some(1));
        assert_eq!(all.candidates().last(), Some(u16::MAX));
    }

    #[test]
    fn a_full_range_fails_as_out_of_ports_until_a_port_is_free() {
        // A range of one port the kernel just handed out (and took back): free.
        let client: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:69".parse().unwrap();
        let reply = ReplyPath {
            listener: 0,
            source: None,
        };
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let mut sockets = SessionSockets::new(false, Some(port..=port), 0, 1000);
        let Transport::Own(first) = sockets.open(reply, local, client).unwrap().transport else {
            panic!("not a session socket");
        };
        assert_eq!(
            first.local_addr().unwrap(),
            SocketAddr::new(local.ip(), port)
        );
        let e = sockets
            .open(reply, local, client)
            .err()
            .expect("the range is full");
        assert!(out_of_ports(&e), "{e}");
        // A range's socket is never kept: it would keep its port.
        sockets.recycle(Transport::Own(first), local, true, 1);
        assert_eq!(sockets.spares(), 0);
        assert!(sockets.open(reply, local, client).is_ok());
        // Single-port mode never opens a socket.
        let mut shared = SessionSockets::new(true, Some(port..=port), 0, 1000);
        assert!(matches!(
            shared.open(reply, local, client),
            Ok(Opened {
                transport: Transport::Shared(_),
                ..
            })
        ));
    }

    fn client() -> std::net::UdpSocket {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        socket
    }

    const REPLY: ReplyPath = ReplyPath {
        listener: 0,
        source: None,
    };

    #[test]
    fn an_ended_sessions_socket_serves_the_next_one_on_a_new_port_with_nothing_left() {
        let local: SocketAddr = "127.0.0.1:69".parse().unwrap();
        let (first, second) = (client(), client());
        let mut sockets = SessionSockets::new(false, None, 0, 1000);
        let opened = sockets
            .open(REPLY, local, first.local_addr().unwrap())
            .unwrap();
        assert!(!opened.registered);
        let Transport::Own(socket) = &opened.transport else {
            panic!("not a session socket");
        };
        let old = socket.local_addr().unwrap();
        // The first client's last datagram is still queued when its session ends, and
        // its port closed: the session's last send drew an ICMP error, pending.
        first.send_to(b"late", old).unwrap();
        drop(first);
        socket.send(b"anyone there?").unwrap();
        sockets.recycle(opened.transport, local, true, 1);
        assert_eq!(sockets.spares(), 1);

        let opened = sockets
            .open(REPLY, local, second.local_addr().unwrap())
            .unwrap();
        assert!(opened.registered, "the kept socket, known to the poll");
        assert_eq!(sockets.spares(), 0);
        let Transport::Own(socket) = &opened.transport else {
            panic!("not a session socket");
        };
        let new = socket.local_addr().unwrap();
        assert_eq!(new.ip(), old.ip());
        assert_ne!(new.port(), 0);
        // Nothing of the first session reaches the second: no datagram, no error.
        let mut buf = [0u8; 16];
        let e = socket.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        socket.send(b"hello").unwrap();
        let (n, from) = second.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], new));

        // Each reuse is a new random port, as a new socket's would be: a transfer ID is
        // not handed out again at once.
        let mut ports = std::collections::HashSet::new();
        let mut opened = opened;
        for _ in 0..20 {
            let Transport::Own(socket) = &opened.transport else {
                panic!("not a session socket");
            };
            ports.insert(socket.local_addr().unwrap().port());
            sockets.recycle(opened.transport, local, true, 1);
            opened = sockets
                .open(REPLY, local, second.local_addr().unwrap())
                .unwrap();
            assert!(opened.registered);
        }
        assert!(ports.len() >= 18, "ports {ports:?}");
    }

    #[test]
    fn kept_sockets_are_bounded_and_serve_only_their_own_address() {
        let local: SocketAddr = "127.0.0.1:69".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut sockets = SessionSockets::new(false, None, 0, 1000);
        let opened: Vec<Opened> = (0..MAX_SPARES + 3)
            .map(|_| sockets.open(REPLY, local, peer).unwrap())
            .collect();
        for opened in opened {
            sockets.recycle(opened.transport, local, false, 1);
        }
        assert_eq!(sockets.spares(), MAX_SPARES);
        // A client who sent to another address gets a new socket on that one.
        let other: SocketAddr = "127.0.0.2:69".parse().unwrap();
        let Transport::Own(socket) = sockets.open(REPLY, other, peer).unwrap().transport else {
            panic!("not a session socket");
        };
        assert_eq!(socket.local_addr().unwrap().ip(), other.ip());
        assert_eq!(sockets.spares(), MAX_SPARES);
        // A socket its peer flooded is closed, not emptied datagram by datagram.
        let flooder = client();
        let flooded = sockets
            .open(REPLY, local, flooder.local_addr().unwrap())
            .unwrap();
        let Transport::Own(socket) = &flooded.transport else {
            panic!("not a session socket");
        };
        for _ in 0..DRAIN_MAX + 1 {
            flooder.send_to(b"x", socket.local_addr().unwrap()).unwrap();
        }
        sockets.recycle(flooded.transport, local, false, 1);
        assert_eq!(sockets.spares(), MAX_SPARES - 1);
        sockets.release_spares();
        assert_eq!(sockets.spares(), 0);

        // Kept sockets and running sessions hold a descriptor each: together they stay
        // below the most sessions (4 here, 2 running).
        let mut few = SessionSockets::new(false, None, 0, 4);
        let opened: Vec<Opened> = (0..3)
            .map(|_| few.open(REPLY, local, peer).unwrap())
            .collect();
        for opened in opened {
            few.recycle(opened.transport, local, false, 2);
        }
        assert_eq!(few.spares(), 2);
        // The last session ends: the server is idle and keeps none.
        let last = few.open(REPLY, local, peer).unwrap();
        assert_eq!(few.spares(), 1);
        few.recycle(last.transport, local, true, 0);
        assert_eq!(few.spares(), 0);
    }

    #[test]
    fn destination_keeps_the_scope_of_link_local_addresses_only() {
        let listener: SocketAddr = "[::]:69".parse().unwrap();
        let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
        assert_eq!(
            destination(listener, Some((IpAddr::V6(link_local), 3))),
            SocketAddr::V6(SocketAddrV6::new(link_local, 69, 0, 3))
        );
        let global: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            destination(listener, Some((IpAddr::V6(global), 3))),
            SocketAddr::new(IpAddr::V6(global), 69)
        );
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:69".parse().unwrap();
        assert_eq!(
            destination(mapped, None),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 69)
        );
    }

    #[test]
    fn with_scope_of_copies_only_between_ipv6_addresses() {
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 69, 0, 7));
        let bare: SocketAddr = "[fe80::1]:0".parse().unwrap();
        let SocketAddr::V6(v6) = with_scope_of(bare, scoped) else {
            panic!("not IPv6")
        };
        assert_eq!(v6.scope_id(), 7);
        let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(with_scope_of(v4, scoped), v4);
    }
}
