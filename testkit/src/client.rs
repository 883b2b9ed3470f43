//! TFTP read clients over blocking std sockets, all of them the library's sans-IO
//! [`ReadTransfer`] with a socket around it: [`drive`] and [`drive_with`], the loop;
//! [`Client`] and [`fetch`], the test client built on it; and [`Raw`] for hand-made
//! datagrams. Every socket here has a read timeout ([`WAIT`] unless told otherwise).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::client::{
    self, write_ack, write_rrq, Event, ReadTransfer, Request, Settings, Transmit,
};
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

/// The test client's policy: it never retransmits (`retries: 0`), so a lost or missing
/// datagram fails the test instead of being repaired; [`WAIT`] without progress ends the
/// transfer; nothing is answered after the final ACK; the payload is kept.
pub const SETTINGS: Settings = Settings {
    timeout: WAIT,
    retries: 0,
    linger: 0,
    keep_payload: true,
};

/// A transfer still running after this long fails: a test never hangs on a server that
/// trickles.
const CAP: Duration = Duration::from_secs(60);

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
    /// The file as received (netascii as on the wire).
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
    /// No progress within [`WAIT`].
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
    /// The server broke the protocol, or answered from the wrong address or port.
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

/// A blocking TFTP read client: [`ReadTransfer`] with [`SETTINGS`] over [`drive_with`],
/// plus the checks a test wants (the server's transfer ID by [`Mode`], a log of every
/// datagram).
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

    /// Downloads `filename`: an RRQ with `options` in their order to `server`, then
    /// [`ReadTransfer`]'s protocol (see [`dyntftp::client`]): ACK 0 for an OACK, which may
    /// only acknowledge what was requested, within the values asked; an ACK for each full
    /// window and the final block; a repeat of the last block held is acknowledged again,
    /// a gap once. It never retransmits ([`SETTINGS`]): [`WAIT`] without progress is a
    /// [`ClientError::Timeout`].
    ///
    /// Every reply must come from `server`'s IP address, and all of them from one port:
    /// another than `server`'s, or in [`Mode::SinglePort`] `server`'s own. Anything else
    /// fails the download at once ([`ClientError::Protocol`]). `mode` is sent as written,
    /// in any case, or a mode the server does not know.
    pub fn fetch_with(
        &self,
        server: SocketAddr,
        filename: &[u8],
        mode: &str,
        options: &[(&str, &str)],
        hook: &mut dyn FnMut(&Progress),
    ) -> Result<Fetched, ClientError> {
        let request = options.iter().fold(
            Request::with_mode_name(filename, mode),
            |request, (name, value)| request.option(name, value),
        );
        let mut transfer = ReadTransfer::new(Instant::now(), server, &request, SETTINGS);

        let mut fetching = Fetching {
            server,
            single_port: self.mode.is_single_port(),
            pace: self.pace,
            hook,
            cap: Instant::now() + CAP,
            tid: None,
            failure: None,
            oack: None,
            packets: Vec::new(),
            out_of_order: 0,
        };
        let mut buf = vec![0u8; 65_536];
        drive_with(&self.socket, &mut transfer, &mut buf, &mut fetching)?;
        if let Some(failure) = fetching.failure {
            return Err(failure);
        }
        let tid = fetching.tid.unwrap_or(server);
        match transfer.outcome() {
            Some(Ok(_)) => Ok(Fetched {
                oack: fetching.oack,
                server: tid,
                packets: fetching.packets,
                blksize: transfer.blksize().into(),
                window: transfer.window().into(),
                out_of_order: fetching.out_of_order,
                data: transfer.into_data(),
            }),
            Some(Err(client::ClientError::Server { code, message })) => Err(ClientError::Error {
                code: code.to_u16(),
                message: message.clone(),
                from: tid,
            }),
            Some(Err(client::ClientError::TimedOut)) => Err(ClientError::Timeout {
                waiting_for: match fetching.tid {
                    None => format!("first reply from {server}"),
                    Some(tid) => format!(
                        "DATA from {tid} (block {}, {} bytes so far)",
                        transfer.blocks() + 1,
                        transfer.bytes()
                    ),
                },
            }),
            Some(Err(e)) => Err(ClientError::Protocol(e.to_string())),
            None => Err(ClientError::Protocol("the transfer did not end".into())),
        }
    }
}

/// The test client's [`Observer`]: checks senders, logs datagrams, calls the hook, paces.
struct Fetching<'h> {
    server: SocketAddr,
    single_port: bool,
    pace: Option<Duration>,
    hook: &'h mut dyn FnMut(&Progress),
    cap: Instant,
    /// The server's transfer ID, fixed by its first reply.
    tid: Option<SocketAddr>,
    failure: Option<ClientError>,
    oack: Option<Vec<(String, String)>>,
    packets: Vec<Received>,
    out_of_order: usize,
}

impl Fetching<'_> {
    /// Why a datagram from `from` is not acceptable, if it is not: the transfer itself
    /// takes the first reply from the server's IP address on any port, and ignores
    /// datagrams from anywhere else; a test wants to know.
    fn wrong_sender(&mut self, from: SocketAddr) -> Option<String> {
        let server = self.server;
        if from.ip() != server.ip() {
            return Some(format!(
                "reply from {from}, but the request went to {server}"
            ));
        }
        match self.tid {
            None if self.single_port && from.port() != server.port() => {
                Some(format!("single-port mode, but the reply came from {from}"))
            }
            None if !self.single_port && from.port() == server.port() => Some(format!(
                "reply from the listening port {from}, not a new TID"
            )),
            None => {
                self.tid = Some(from);
                None
            }
            Some(tid) if tid != from => Some(format!(
                "datagram from a second server TID {from} (first {tid})"
            )),
            Some(_) => None,
        }
    }
}

impl Observer for Fetching<'_> {
    fn received(&mut self, transfer: &ReadTransfer, from: SocketAddr, datagram: &[u8]) -> Verdict {
        self.packets.push(Received {
            from,
            kind: kind_of(datagram),
        });
        if let Some(problem) = self.wrong_sender(from) {
            self.failure = Some(ClientError::Protocol(problem));
            return Verdict::Stop;
        }
        if Instant::now() > self.cap {
            self.failure = Some(ClientError::Protocol(format!("transfer took over {CAP:?}")));
            return Verdict::Stop;
        }
        if let Ok(Packet::Data { block, .. }) = Packet::parse(datagram) {
            if block != (transfer.blocks() + 1) as u16 {
                self.out_of_order += 1;
            }
        }
        Verdict::Deliver
    }

    fn event(&mut self, transfer: &mut ReadTransfer, event: Event<'_>) -> ControlFlow<()> {
        match event {
            Event::Oack(options) => {
                self.oack = Some(
                    options
                        .iter()
                        .map(|o| {
                            (
                                String::from_utf8_lossy(o.name).to_ascii_lowercase(),
                                String::from_utf8_lossy(o.value).into_owned(),
                            )
                        })
                        .collect(),
                );
            }
            Event::Data(_) => (self.hook)(&Progress {
                block: transfer.blocks(),
                server: transfer.peer().expect("DATA came from the server"),
                bytes: transfer.bytes() as usize,
            }),
        }
        ControlFlow::Continue(())
    }

    fn sending(&mut self, transmit: &Transmit<'_>) {
        if let (Some(pace), [0, 4, ..]) = (self.pace, transmit.contents) {
            thread::sleep(pace);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use dyntftp::client::write_rrq;
    use std::thread::JoinHandle;

    /// A scripted server on 127.0.0.1: a listener and a session socket. The thread takes
    /// the RRQ on the listener, then runs `script(listener, session, client)`.
    fn scripted<S>(script: S) -> (SocketAddr, JoinHandle<Vec<u8>>)
    where
        S: FnOnce(&Raw, &Raw, SocketAddr) + Send + 'static,
    {
        let listener = Raw::new(crate::v4());
        let addr = listener.local_addr();
        let thread = thread::spawn(move || {
            let session = Raw::new(crate::v4());
            let (rrq, client) = listener.recv();
            script(&listener, &session, client);
            rrq
        });
        (addr, thread)
    }

    fn data(block: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 3];
        out.extend_from_slice(&block.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn ack(block: u16) -> Vec<u8> {
        let mut out = Vec::new();
        write_ack(&mut out, block);
        out
    }

    fn protocol_error(result: Result<Fetched, ClientError>) -> String {
        match result {
            Err(ClientError::Protocol(problem)) => problem,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn the_rrq_goes_out_as_written_and_the_first_reply_fixes_the_tid() {
        let (server, thread) = scripted(|_, session, client| {
            session.send(client, &data(1, &[7; 512]));
            assert_eq!(session.recv(), (ack(1), client));
            // Our ACK was "lost": the same block again is acknowledged again.
            session.send(client, &data(1, &[7; 512]));
            assert_eq!(session.recv(), (ack(1), client));
            session.send(client, &data(2, b"end"));
            assert_eq!(session.recv(), (ack(2), client));
        });
        let mut blocks = Vec::new();
        let got = Client::new(Mode::OwnPort, server)
            .fetch_with(server, b"a file", "NetASCII", &[], &mut |p| {
                blocks.push((p.block, p.bytes))
            })
            .unwrap();
        let rrq = thread.join().unwrap();
        let mut want = Vec::new();
        write_rrq(&mut want, b"a file", "NetASCII", []);
        assert_eq!(rrq, want);
        assert_eq!(blocks, [(1, 512), (2, 515)]);
        assert_eq!(got.data.len(), 515);
        assert_eq!(got.data_lens(), [512, 512, 3]);
        assert_eq!(got.out_of_order, 1);
        assert_ne!(got.server, server);
        assert_eq!((got.blksize, got.window, got.oack), (512, 1, None));
    }

    #[test]
    fn own_port_mode_wants_a_new_port_single_port_mode_the_listening_one() {
        let (server, thread) = scripted(|listener, _, client| {
            listener.send(client, &data(1, b"short"));
        });
        let result = Client::new(Mode::OwnPort, server).fetch(server, "f", "octet", &[]);
        assert!(protocol_error(result).contains("listening port"));
        thread.join().unwrap();

        let (server, thread) = scripted(|listener, _, client| {
            listener.send(client, &data(1, b"short"));
            assert_eq!(listener.recv(), (ack(1), client));
        });
        let got = Client::new(Mode::SinglePort, server)
            .fetch(server, "f", "octet", &[])
            .unwrap();
        assert_eq!((got.data.as_slice(), got.server), (&b"short"[..], server));
        thread.join().unwrap();

        let (server, thread) = scripted(|_, session, client| {
            session.send(client, &data(1, b"short"));
        });
        let result = Client::new(Mode::SinglePort, server).fetch(server, "f", "octet", &[]);
        assert!(protocol_error(result).contains("single-port"));
        thread.join().unwrap();
    }

    #[test]
    fn a_second_tid_fails_the_download() {
        let (server, thread) = scripted(|_, session, client| {
            session.send(client, &data(1, &[1; 512]));
            assert_eq!(session.recv(), (ack(1), client));
            Raw::new(crate::v4()).send(client, &data(2, b"end"));
        });
        let result = Client::new(Mode::OwnPort, server).fetch(server, "f", "octet", &[]);
        assert!(protocol_error(result).contains("second server TID"));
        thread.join().unwrap();
    }

    #[test]
    fn the_oack_sets_blksize_and_window_and_may_only_hold_what_was_asked() {
        let (server, thread) = scripted(|_, session, client| {
            let oack = b"\x00\x06BLKSIZE\x008\x00windowsize\x002\x00".to_vec();
            session.send(client, &oack);
            assert_eq!(session.recv(), (ack(0), client));
            session.send(client, &data(1, &[1; 8]));
            session.send(client, &data(2, &[2; 8]));
            assert_eq!(session.recv(), (ack(2), client));
            session.send(client, &data(3, &[3; 1]));
            assert_eq!(session.recv(), (ack(3), client));
        });
        let options = [("blksize", "8"), ("windowsize", "4")];
        let got = Client::new(Mode::OwnPort, server)
            .fetch(server, "f", "octet", &options)
            .unwrap();
        assert_eq!((got.blksize, got.window, got.data.len()), (8, 2, 17));
        assert_eq!(got.oack_value("blksize"), Some("8"));
        thread.join().unwrap();

        let (server, thread) = scripted(|_, session, client| {
            session.send(client, b"\x00\x06blksize\x001024\x00");
            // The client refuses it with ERROR 8.
            let (datagram, from) = session.recv();
            assert_eq!((&datagram[..4], from), (&b"\x00\x05\x00\x08"[..], client));
        });
        let result =
            Client::new(Mode::OwnPort, server).fetch(server, "f", "octet", &[("tsize", "0")]);
        assert!(protocol_error(result).contains("blksize"));
        thread.join().unwrap();
    }

    #[test]
    fn an_error_names_its_sender() {
        let (server, thread) = scripted(|_, session, client| {
            session.send(client, b"\x00\x05\x00\x01no such file\x00");
        });
        let err = Client::new(Mode::OwnPort, server)
            .fetch(server, "f", "octet", &[])
            .unwrap_err();
        let ClientError::Error {
            code,
            message,
            from,
        } = err
        else {
            panic!("expected an ERROR, got {err:?}");
        };
        assert_eq!((code, message.as_str()), (1, "no such file"));
        assert_ne!(from, server);
        thread.join().unwrap();
    }

    #[test]
    fn silence_is_a_timeout_after_wait_without_a_resend() {
        let (server, thread) = scripted(|listener, _, _| {
            // Nothing more comes: no resent RRQ.
            assert_eq!(listener.recv_within(WAIT + Duration::from_secs(1)), None);
        });
        let started = Instant::now();
        let err = Client::new(Mode::OwnPort, server)
            .fetch(server, "f", "octet", &[])
            .unwrap_err();
        let ClientError::Timeout { waiting_for } = err else {
            panic!("expected a timeout, got {err:?}");
        };
        assert_eq!(waiting_for, format!("first reply from {server}"));
        assert!(started.elapsed() >= WAIT);
        thread.join().unwrap();
    }
}
