//! TFTP read clients over blocking std sockets: [`drive`] and [`drive_with`], the
//! library's sans-IO [`ReadTransfer`] with a socket around it; [`Client`] and [`fetch`],
//! the test client; and [`Raw`] for hand-made datagrams. Every socket here has a read
//! timeout ([`WAIT`] unless told otherwise).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::client::{write_ack, write_rrq, Event, ReadTransfer, Transmit};
use dyntftp::Packet;

use crate::net::loopback_like;
use crate::{Mode, WAIT};

/// A UDP socket with the test read timeout.
pub fn socket_for(server: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(loopback_like(server)).expect("bind client socket");
    socket.set_read_timeout(Some(WAIT)).expect("set timeout");
    socket
}

// ---------------------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------------------

/// What to do with a datagram that arrived, before the transfer sees it
/// ([`Observer::received`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the transfer.
    Deliver,
    /// Drop it; the transfer never sees it.
    Ignore,
    /// Stop driving at once, without handing it over or sending anything more.
    Stop,
}

/// What a driver of [`drive_with`] wants to see besides the transfer's events. Only
/// [`event`](Self::event) must be written.
pub trait Observer {
    /// A datagram arrived from `from`; `transfer` has not seen it yet. Default: deliver it.
    fn received(&mut self, transfer: &ReadTransfer, from: SocketAddr, datagram: &[u8]) -> Verdict {
        let _ = (transfer, from, datagram);
        Verdict::Deliver
    }

    /// What the transfer made of a datagram ([`ReadTransfer::handle_datagram`]). It may
    /// [`abort`](ReadTransfer::abort) the transfer, or return `Break` to vanish: stop at
    /// once and send nothing more.
    fn event(&mut self, transfer: &mut ReadTransfer, event: Event<'_>) -> ControlFlow<()>;

    /// The transfer is about to send `transmit`. Default: nothing.
    fn sending(&mut self, transmit: &Transmit<'_>) {
        let _ = transmit;
    }
}

/// Runs `transfer` over `socket` until it ends (see [`ReadTransfer::outcome`]), receiving
/// into `buf` (65,536 bytes hold any datagram). `on_event` sees every event as it comes
/// and may [`abort`](ReadTransfer::abort) the transfer, or return `Break` to vanish: stop
/// at once and send nothing more. [`drive_with`] also shows every datagram before the
/// transfer sees it, and every datagram before it is sent.
///
/// The socket's read timeout is how long a silent server is waited for before the
/// transfer's timer is looked at: set it to about the client's timeout. Nothing here
/// allocates.
pub fn drive(
    socket: &UdpSocket,
    transfer: &mut ReadTransfer,
    buf: &mut [u8],
    on_event: impl FnMut(&mut ReadTransfer, Event<'_>) -> ControlFlow<()>,
) -> io::Result<()> {
    struct Events<F>(F);
    impl<F: FnMut(&mut ReadTransfer, Event<'_>) -> ControlFlow<()>> Observer for Events<F> {
        fn event(&mut self, transfer: &mut ReadTransfer, event: Event<'_>) -> ControlFlow<()> {
            (self.0)(transfer, event)
        }
    }
    drive_with(socket, transfer, buf, &mut Events(on_event))
}

/// [`drive`], with an [`Observer`] that also sees each datagram that arrives (and may drop
/// it or stop there) and each one the transfer sends.
///
/// The loop: send what the transfer has to send; return once it is over; receive (up to
/// the socket's read timeout); show the datagram to the observer, hand it over, show the
/// event; call [`handle_timeout`](ReadTransfer::handle_timeout) when the deadline has
/// passed. It returns `Ok` when the transfer ended or the observer stopped it, `Err` on a
/// socket error other than a timeout or an interruption.
pub fn drive_with(
    socket: &UdpSocket,
    transfer: &mut ReadTransfer,
    buf: &mut [u8],
    observer: &mut impl Observer,
) -> io::Result<()> {
    loop {
        if let Some(transmit) = transfer.poll_transmit() {
            observer.sending(&transmit);
            socket.send_to(transmit.contents, transmit.destination)?;
        }
        if transfer.outcome().is_some() {
            return Ok(());
        }
        let received = socket.recv_from(buf);
        let now = Instant::now();
        match received {
            Ok((len, from)) => {
                let datagram = &buf[..len];
                match observer.received(transfer, from, datagram) {
                    Verdict::Deliver => {
                        if let Some(event) = transfer.handle_datagram(now, from, datagram) {
                            if observer.event(transfer, event).is_break() {
                                return Ok(());
                            }
                        }
                    }
                    Verdict::Ignore => {}
                    Verdict::Stop => return Ok(()),
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
        if transfer.deadline().is_some_and(|deadline| now >= deadline) {
            transfer.handle_timeout(now);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------------------

/// What the client received, one entry per datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The sender.
    pub from: SocketAddr,
    /// What it was.
    pub kind: Kind,
}

/// A datagram the client received, in short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// DATA: its block number and payload length.
    Data {
        /// The block number.
        block: u16,
        /// The payload length.
        len: usize,
    },
    /// OACK: its options as sent (name, value).
    Oack(Vec<(String, String)>),
    /// ERROR: its code and message.
    Error {
        /// The code.
        code: u16,
        /// The message (invalid UTF-8 replaced).
        message: String,
    },
    /// Anything else, whole.
    Other(Vec<u8>),
}

/// A completed download.
#[derive(Debug)]
pub struct Fetched {
    /// The file as received.
    pub data: Vec<u8>,
    /// The OACK's options (lower-cased names), if the server sent one.
    pub oack: Option<Vec<(String, String)>>,
    /// The server's transfer ID (address and port of the session socket).
    pub server: SocketAddr,
    /// Every datagram received, in order.
    pub packets: Vec<Received>,
    /// The block size in effect.
    pub blksize: usize,
    /// The window in effect.
    pub window: usize,
    /// DATA packets that were not the next expected block (duplicates or gaps).
    pub out_of_order: usize,
}

impl Fetched {
    /// The value of an OACK option.
    pub fn oack_value(&self, name: &str) -> Option<&str> {
        self.oack
            .as_ref()?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Lengths of the DATA packets received, in order.
    pub fn data_lens(&self) -> Vec<usize> {
        self.packets
            .iter()
            .filter_map(|p| match p.kind {
                Kind::Data { len, .. } => Some(len),
                _ => None,
            })
            .collect()
    }
}

/// Why a download failed.
#[derive(Debug)]
pub enum ClientError {
    /// No datagram within [`WAIT`].
    Timeout {
        /// What the client was waiting for, and how far it had come.
        waiting_for: String,
    },
    /// A socket error.
    Io(io::Error),
    /// The server sent an ERROR.
    Error {
        /// Its code.
        code: u16,
        /// Its message (invalid UTF-8 replaced).
        message: String,
        /// Its sender.
        from: SocketAddr,
    },
    /// The server broke the protocol.
    Protocol(String),
}

impl ClientError {
    /// The ERROR code, if the server sent one.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Error { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

/// Where a download is, given to the hook after each new in-order DATA block (before its
/// ACK is sent).
#[derive(Debug)]
pub struct Progress {
    /// The block just received, counted from 1 without wrapping.
    pub block: u64,
    /// The server's transfer ID.
    pub server: SocketAddr,
    /// Bytes received so far.
    pub bytes: usize,
}

/// A blocking TFTP read client.
pub struct Client {
    /// Its socket, with the read timeout [`WAIT`].
    pub socket: UdpSocket,
    /// Sleep before each ACK (a deliberately slow client).
    pub pace: Option<Duration>,
    /// Where the server answers from: a new TID per session, or the listening port.
    pub mode: Mode,
}

impl Client {
    /// A client on a loopback socket of the same family as `server`, for a server that
    /// answers as `mode` says.
    pub fn new(mode: Mode, server: SocketAddr) -> Client {
        Client {
            socket: socket_for(server),
            pace: None,
            mode,
        }
    }

    /// The client's address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

    /// Downloads `filename` in transfer mode `mode` (`"octet"`, `"netascii"`) with
    /// `options` (see [`Client::fetch_with`]).
    pub fn fetch(
        &self,
        server: SocketAddr,
        filename: &str,
        mode: &str,
        options: &[(&str, &str)],
    ) -> Result<Fetched, ClientError> {
        self.fetch_with(server, filename.as_bytes(), mode, options, &mut |_| {})
    }

    /// Downloads `filename`: RRQ to `server`, OACK → ACK 0 when options were requested,
    /// then DATA, ACKing each full window and the last block. Every reply must come from
    /// `server`'s IP address and from one port: another than `server`'s, or in
    /// [`Mode::SinglePort`] `server`'s own.
    pub fn fetch_with(
        &self,
        server: SocketAddr,
        filename: &[u8],
        mode: &str,
        options: &[(&str, &str)],
        hook: &mut dyn FnMut(&Progress),
    ) -> Result<Fetched, ClientError> {
        let mut rrq = Vec::new();
        write_rrq(&mut rrq, filename, mode, options.iter().copied());
        self.socket.send_to(&rrq, server)?;

        let mut out = Fetched {
            data: Vec::new(),
            oack: None,
            server,
            packets: Vec::new(),
            blksize: 512,
            window: 1,
            out_of_order: 0,
        };
        let mut tid: Option<SocketAddr> = None;
        let mut started = false;
        // Next block wanted, counted from 1 without wrapping.
        let mut expected: u64 = 1;
        let mut in_window = 0usize;
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if Instant::now() > deadline {
                return Err(ClientError::Protocol("transfer took over 60 s".into()));
            }
            let (len, from) = match self.socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout {
                        waiting_for: format!(
                            "{} from {server} (block {expected}, {} bytes so far)",
                            if started { "DATA" } else { "first reply" },
                            out.data.len()
                        ),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let datagram = &buf[..len];
            let packet = Packet::parse(datagram);
            out.packets.push(Received {
                from,
                kind: kind_of(datagram),
            });
            if from.ip() != server.ip() {
                return Err(ClientError::Protocol(format!(
                    "reply from {from}, but the request went to {server}"
                )));
            }
            match tid {
                None => {
                    let single_port = self.mode.is_single_port();
                    if single_port && from.port() != server.port() {
                        return Err(ClientError::Protocol(format!(
                            "single-port mode, but the reply came from {from}"
                        )));
                    }
                    if !single_port && from.port() == server.port() {
                        return Err(ClientError::Protocol(format!(
                            "reply from the listening port {from}, not a new TID"
                        )));
                    }
                    tid = Some(from);
                    out.server = from;
                }
                Some(t) if t != from => {
                    return Err(ClientError::Protocol(format!(
                        "datagram from a second server TID {from} (first {t})"
                    )));
                }
                Some(_) => {}
            }
            match packet {
                Ok(Packet::Error { code, message }) => {
                    return Err(ClientError::Error {
                        code: code.to_u16(),
                        message: String::from_utf8_lossy(message).into_owned(),
                        from,
                    })
                }
                Ok(Packet::Oack(opts)) if !started && out.oack.is_none() => {
                    if options.is_empty() {
                        return Err(ClientError::Protocol("OACK without options".into()));
                    }
                    let mut list = Vec::new();
                    for o in opts.iter() {
                        let name = String::from_utf8_lossy(o.name).to_ascii_lowercase();
                        let value = String::from_utf8_lossy(o.value).into_owned();
                        if !options.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
                            return Err(ClientError::Protocol(format!(
                                "OACK has option {name} that was not requested"
                            )));
                        }
                        list.push((name, value));
                    }
                    let number = |name: &str| -> Result<Option<usize>, ClientError> {
                        match list.iter().find(|(n, _)| n == name) {
                            None => Ok(None),
                            Some((_, v)) => v.parse().map(Some).map_err(|_| {
                                ClientError::Protocol(format!("bad OACK {name} {v:?}"))
                            }),
                        }
                    };
                    out.blksize = number("blksize")?.unwrap_or(512);
                    out.window = number("windowsize")?.unwrap_or(1);
                    if out.window == 0 {
                        return Err(ClientError::Protocol("OACK windowsize 0".into()));
                    }
                    out.oack = Some(list);
                    started = true;
                    self.ack(from, 0)?;
                }
                Ok(Packet::Data { block, data }) => {
                    started = true;
                    if block == expected as u16 {
                        if data.len() > out.blksize {
                            return Err(ClientError::Protocol(format!(
                                "DATA {block} has {} bytes, blksize is {}",
                                data.len(),
                                out.blksize
                            )));
                        }
                        out.data.extend_from_slice(data);
                        hook(&Progress {
                            block: expected,
                            server: from,
                            bytes: out.data.len(),
                        });
                        let last = data.len() < out.blksize;
                        expected += 1;
                        in_window += 1;
                        if last || in_window == out.window {
                            if let Some(pace) = self.pace {
                                thread::sleep(pace);
                            }
                            self.ack(from, block)?;
                            in_window = 0;
                        }
                        if last {
                            return Ok(out);
                        }
                    } else {
                        // A duplicate (retransmission) or a gap: acknowledge what we have so
                        // the server resumes right after it (RFC 7440).
                        out.out_of_order += 1;
                        if out.out_of_order > 10_000 {
                            return Err(ClientError::Protocol(
                                "too many out-of-order blocks".into(),
                            ));
                        }
                        self.ack(from, (expected - 1) as u16)?;
                        in_window = 0;
                    }
                }
                Ok(other) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {:?} (started: {started})",
                        other.opcode()
                    )))
                }
                Err(e) => return Err(ClientError::Protocol(format!("unparsable datagram: {e}"))),
            }
        }
    }

    fn ack(&self, to: SocketAddr, block: u16) -> io::Result<()> {
        let mut ack = Vec::new();
        write_ack(&mut ack, block);
        self.socket.send_to(&ack, to).map(|_| ())
    }
}

fn kind_of(datagram: &[u8]) -> Kind {
    match Packet::parse(datagram) {
        Ok(Packet::Data { block, data }) => Kind::Data {
            block,
            len: data.len(),
        },
        Ok(Packet::Oack(opts)) => Kind::Oack(
            opts.iter()
                .map(|o| {
                    (
                        String::from_utf8_lossy(o.name).into_owned(),
                        String::from_utf8_lossy(o.value).into_owned(),
                    )
                })
                .collect(),
        ),
        Ok(Packet::Error { code, message }) => Kind::Error {
            code: code.to_u16(),
            message: String::from_utf8_lossy(message).into_owned(),
        },
        _ => Kind::Other(datagram.to_vec()),
    }
}

/// Downloads with a fresh client, from a server that answers as `ports` says.
pub fn fetch(
    ports: Mode,
    server: SocketAddr,
    filename: &str,
    mode: &str,
    options: &[(&str, &str)],
) -> Result<Fetched, ClientError> {
    Client::new(ports, server).fetch(server, filename, mode, options)
}

// ---------------------------------------------------------------------------------------
// Raw datagrams
// ---------------------------------------------------------------------------------------

/// A socket for hand-made datagrams.
pub struct Raw {
    /// Its socket, with the read timeout [`WAIT`].
    pub socket: UdpSocket,
}

impl Raw {
    /// A loopback socket of the same family as `server`, with the test read timeout.
    pub fn new(server: SocketAddr) -> Raw {
        Raw {
            socket: socket_for(server),
        }
    }

    /// The socket's address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

    /// Sends `datagram` to `to`.
    pub fn send(&self, to: SocketAddr, datagram: &[u8]) {
        self.socket.send_to(datagram, to).expect("send");
    }

    /// A read request.
    pub fn rrq(&self, to: SocketAddr, filename: &[u8], mode: &str, options: &[(&str, &str)]) {
        let mut rrq = Vec::new();
        write_rrq(&mut rrq, filename, mode, options.iter().copied());
        self.send(to, &rrq);
    }

    /// A write request (opcode 2).
    pub fn wrq(&self, to: SocketAddr, filename: &[u8], mode: &str) {
        let mut wrq = Vec::new();
        write_rrq(&mut wrq, filename, mode, []);
        wrq[1] = 2;
        self.send(to, &wrq);
    }

    /// An ACK.
    pub fn ack(&self, to: SocketAddr, block: u16) {
        let mut ack = Vec::new();
        write_ack(&mut ack, block);
        self.send(to, &ack);
    }

    /// The next datagram; panics after [`WAIT`].
    pub fn recv(&self) -> (Vec<u8>, SocketAddr) {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("no datagram on {} within {WAIT:?}", self.local_addr()))
    }

    /// The next datagram within `wait`, if any.
    pub fn recv_within(&self, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .expect("set timeout");
        let mut buf = vec![0u8; 65_536];
        let result = self.socket.recv_from(&mut buf);
        self.socket
            .set_read_timeout(Some(WAIT))
            .expect("set timeout");
        match result {
            Ok((len, from)) => {
                buf.truncate(len);
                Some((buf, from))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// The next datagram, which must be an ERROR: (code, message, sender).
    pub fn expect_error(&self) -> (u16, String, SocketAddr) {
        let (datagram, from) = self.recv();
        match kind_of(&datagram) {
            Kind::Error { code, message } => (code, message, from),
            other => panic!("expected an ERROR from the server, got {other:?} from {from}"),
        }
    }

    /// The next datagram, which must be DATA: (block, payload, sender).
    pub fn expect_data(&self) -> (u16, Vec<u8>, SocketAddr) {
        let (datagram, from) = self.recv();
        match Packet::parse(&datagram) {
            Ok(Packet::Data { block, data }) => (block, data.to_vec(), from),
            other => panic!("expected DATA from the server, got {other:?} from {from}"),
        }
    }
}
