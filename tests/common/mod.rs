//! Shared helpers for the loopback tests: temporary roots with test files, a server on its
//! own thread with its statistics forwarded over a channel, and a small blocking TFTP
//! client (every socket has a read timeout: a broken server fails a test, never hangs it).

#![allow(dead_code)]

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dyntftp::packet::{write_ack, write_rrq};
use dyntftp::{
    FsHandler, Handler, Packet, ReadRequest, Reject, ResponseData, ServerBuilder, ServerStats,
    SessionStats, ShutdownHandle,
};

/// True in the test binaries that run the black-box suites against single-port servers
/// (`tests/single_port.rs` includes them; the crate name tells which binary this is).
pub fn single_port() -> bool {
    module_path!().starts_with("single_port")
}

/// Read timeout of every test socket, and how long a test waits for any event.
pub const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

/// A small text file (one block).
pub const SMALL: &[u8] = b"Hello from dyntftp!\nThis is a small file, one block long.\n";

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The 3 MiB pseudo-random file, generated once per test binary.
pub fn big() -> &'static [u8] {
    static BIG: OnceLock<Vec<u8>> = OnceLock::new();
    BIG.get_or_init(|| pseudo_random(3 << 20, 0xd1ce))
}

/// Text with LF, CR LF and bare CR (also across a 512-byte boundary), for netascii.
pub fn text() -> Vec<u8> {
    // 511 plain bytes then CR: on the wire the CR ends block 1 and its NUL opens block 2.
    let mut t = vec![b'x'; 511];
    t.push(b'\r');
    t.extend_from_slice(b"\n\n\rline one\nline two\r\nbare\rcarriage return\n");
    for i in 0..200 {
        t.extend_from_slice(format!("row {i}\n").as_bytes());
    }
    t
}

/// RFC 764 netascii, computed independently of the crate: LF → CR LF, CR → CR NUL.
pub fn to_netascii(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() * 2);
    for &b in raw {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

/// A unique temporary directory, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/dyntftp-<tag>-<pid>-<suite>-<n>`. The suite (this module's path) keeps
    /// names apart when one test binary includes this module several times, each copy
    /// with its own counter (`tests/single_port.rs`).
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let suite = module_path!().replace("::", "-");
        let path =
            std::env::temp_dir().join(format!("dyntftp-{tag}-{}-{suite}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` to `name` (relative; parent directories are created).
    pub fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.path.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        fs::write(&path, data).expect("write test file");
        path
    }

    /// A directory inside this one.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        fs::create_dir_all(&path).expect("create subdir");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The standard files every root gets, with their contents.
pub fn standard_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("small.txt", SMALL.to_vec()),
        ("empty.bin", Vec::new()),
        ("512.bin", pseudo_random(512, 1)),
        ("1024.bin", pseudo_random(1024, 2)),
        ("big.bin", big().to_vec()),
        ("text.txt", text()),
        ("dir/nested.bin", pseudo_random(3000, 3)),
    ]
}

/// A temporary root holding [`standard_files`].
pub fn standard_root() -> TempDir {
    let dir = TempDir::new("root");
    for (name, data) in standard_files() {
        dir.write(name, &data);
    }
    dir
}

/// The contents of a standard file.
pub fn content(name: &str) -> Vec<u8> {
    standard_files()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| d)
        .unwrap_or_else(|| panic!("no standard file {name}"))
}

// ---------------------------------------------------------------------------------------
// Server on a thread
// ---------------------------------------------------------------------------------------

pub fn v4() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

pub fn v6() -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
}

/// True when `::1` can be bound; prints a loud SKIPPED line otherwise.
pub fn ipv6_or_skip(test: &str) -> bool {
    match UdpSocket::bind(v6()) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: {test}: cannot bind [::1] ({e}); IPv6 loopback unavailable");
            false
        }
    }
}

/// What the forwarding handler reports, in the order the server produced it.
#[derive(Debug)]
pub enum Event {
    Session(Box<SessionStats>),
    Server(Box<ServerStats>),
}

/// Wraps a handler and forwards both statistics callbacks over a channel.
pub struct Forward {
    inner: Box<dyn Handler>,
    events: Sender<Event>,
}

impl Handler for Forward {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.inner.open(request)
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        self.inner.session_finished(stats);
        let _ = self.events.send(Event::Session(Box::new(stats.clone())));
    }

    fn server_stats(&mut self, stats: &ServerStats) {
        self.inner.server_stats(stats);
        let _ = self.events.send(Event::Server(Box::new(stats.clone())));
    }
}

pub type Builder = ServerBuilder<Forward>;

/// A server running on its own thread. Dropping it shuts the server down and joins it.
pub struct ServerGuard {
    pub addr: SocketAddr,
    pub handle: ShutdownHandle,
    events: Receiver<Event>,
    thread: Option<JoinHandle<Result<(), String>>>,
    /// Events received while waiting for the other kind.
    sessions: Vec<SessionStats>,
    reports: Vec<ServerStats>,
}

/// Starts a server bound to `bind` whose handler `make` builds on the server thread (so it
/// need not be `Send`). `configure` adjusts the builder after the test defaults (shutdown
/// grace 300 ms; adaptive retransmission off, so that the fixed timer schedule makes the
/// exact packet sequences these tests assert independent of how fast the test client
/// runs — tests of adaptive retransmission turn it back on).
pub fn spawn_server<M, C>(bind: SocketAddr, make: M, configure: C) -> ServerGuard
where
    M: FnOnce() -> Box<dyn Handler> + Send + 'static,
    C: FnOnce(Builder) -> Builder + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel();
    let (events_tx, events_rx) = mpsc::channel();
    let thread = thread::Builder::new()
        .name(format!("server-{bind}"))
        .spawn(move || {
            let handler = Forward {
                inner: make(),
                events: events_tx,
            };
            let builder = ServerBuilder::new(handler)
                .bind(bind)
                .shutdown_grace(Duration::from_millis(300))
                .adaptive_timeout(false)
                .single_port(single_port());
            match configure(builder).build() {
                Ok(mut server) => {
                    let _ = ready_tx.send(Ok((server.local_addr(), server.shutdown_handle())));
                    server.run().map_err(|e| e.to_string())
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    Err(e.to_string())
                }
            }
        })
        .expect("spawn server thread");
    let (addr, handle) = match ready_rx.recv_timeout(WAIT) {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => panic!("server failed to build on {bind}: {e}"),
        Err(e) => panic!("server on {bind} did not start: {e}"),
    };
    ServerGuard {
        addr,
        handle,
        events: events_rx,
        thread: Some(thread),
        sessions: Vec::new(),
        reports: Vec::new(),
    }
}

/// An [`FsHandler`] server on `root`, with the test defaults.
pub fn spawn_fs(bind: SocketAddr, root: &Path) -> ServerGuard {
    spawn_fs_with(bind, root, |b| b)
}

/// An [`FsHandler`] server on `root`, configured by `configure`.
pub fn spawn_fs_with<C>(bind: SocketAddr, root: &Path, configure: C) -> ServerGuard
where
    C: FnOnce(Builder) -> Builder + Send + 'static,
{
    let root = root.to_path_buf();
    spawn_server(
        bind,
        move || Box::new(FsHandler::new(root).expect("FsHandler::new")),
        configure,
    )
}

impl ServerGuard {
    /// The address to send requests to (the bound address; for a wildcard listener, use
    /// [`ServerGuard::port`] with an address of your choice).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn recv_event(&self, deadline: Instant, what: &str) -> Event {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(left) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("server thread ended while waiting for {what}")
            }
        }
    }

    /// The next finished session (waits up to [`WAIT`]).
    pub fn next_session(&mut self) -> SessionStats {
        if !self.sessions.is_empty() {
            return self.sessions.remove(0);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.recv_event(deadline, "a finished session") {
                Event::Session(s) => return *s,
                Event::Server(r) => self.reports.push(*r),
            }
        }
    }

    /// The next `n` finished sessions.
    pub fn sessions(&mut self, n: usize) -> Vec<SessionStats> {
        (0..n).map(|_| self.next_session()).collect()
    }

    /// Waits for the next server statistics report produced *after* every event already
    /// received, and returns every report received so far (that one included), in order.
    pub fn reports_until_next(&mut self) -> Vec<ServerStats> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.recv_event(deadline, "a server stats report") {
                Event::Session(s) => self.sessions.push(*s),
                Event::Server(r) => {
                    self.reports.push(*r);
                    return std::mem::take(&mut self.reports);
                }
            }
        }
    }

    /// Asks the server to shut down (returns at once).
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// Waits (bounded) for the server thread to return and gives run()'s result.
    pub fn join(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                // Leave it detached; the test fails.
                return Err("server thread did not stop within 10 s".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err("server thread panicked".into()),
        }
    }

    /// Shuts down, joins, and returns every event not consumed yet.
    pub fn stop(mut self) -> (Vec<SessionStats>, Vec<ServerStats>) {
        self.shutdown();
        let result = self.join();
        assert_eq!(result, Ok(()), "server run() result");
        let mut sessions = std::mem::take(&mut self.sessions);
        let mut reports = std::mem::take(&mut self.reports);
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Session(s) => sessions.push(*s),
                Event::Server(r) => reports.push(*r),
            }
        }
        (sessions, reports)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.handle.shutdown();
        let result = self.join();
        if !thread::panicking() {
            if let Err(e) = result {
                panic!("server shutdown: {e}");
            }
        }
    }
}

/// The next finished session of `peer`; sessions of other peers reported before it are
/// passed over, as long as they are the `small.txt` fetches tests use to check that the
/// server still serves.
#[track_caller]
pub fn session_of(server: &mut ServerGuard, peer: SocketAddr) -> SessionStats {
    for _ in 0..1000 {
        let stats = server.next_session();
        if stats.peer == peer {
            return stats;
        }
        assert_eq!(
            stats.filename, "small.txt",
            "an unexpected session: {stats:?}"
        );
    }
    panic!("no session of {peer}");
}

/// Sums counters of several reports (gauges and intervals are not summed).
pub fn sum_reports(reports: &[ServerStats]) -> ServerStats {
    let mut total = ServerStats::default();
    for r in reports {
        total.merge(r);
    }
    total.interval = Duration::ZERO;
    total.active_sessions = 0;
    total
}

// ---------------------------------------------------------------------------------------
// Test client
// ---------------------------------------------------------------------------------------

/// A loopback address of the same family as `server`, port 0 (for client sockets).
pub fn loopback_like(server: SocketAddr) -> SocketAddr {
    match server.ip() {
        IpAddr::V4(_) => v4(),
        IpAddr::V6(_) => v6(),
    }
}

/// Whether this host routes 127.0.0.2 to loopback (Linux does for all of 127/8); says
/// the test is skipped when it does not.
pub fn loopback_127_0_0_2(test: &str) -> bool {
    let ok = UdpSocket::bind("127.0.0.2:0").is_ok();
    if !ok {
        eprintln!("SKIPPED: {test}: 127.0.0.2 is not a local address here");
    }
    ok
}

/// A UDP socket with the test read timeout.
pub fn socket_for(server: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind(loopback_like(server)).expect("bind client socket");
    socket.set_read_timeout(Some(WAIT)).expect("set timeout");
    socket
}

/// What the client received, one entry per datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub from: SocketAddr,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Data { block: u16, len: usize },
    Oack(Vec<(String, String)>),
    Error { code: u16, message: String },
    Other(Vec<u8>),
}

/// A completed download.
#[derive(Debug)]
pub struct Fetched {
    pub data: Vec<u8>,
    /// The OACK's options (lower-cased names), if the server sent one.
    pub oack: Option<Vec<(String, String)>>,
    /// The server's transfer ID (address and port of the session socket).
    pub server: SocketAddr,
    /// Every datagram received, in order.
    pub packets: Vec<Received>,
    /// The block size and window in effect.
    pub blksize: usize,
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

#[derive(Debug)]
pub enum ClientError {
    /// No datagram within [`WAIT`].
    Timeout {
        waiting_for: String,
    },
    Io(io::Error),
    /// The server sent an ERROR.
    Error {
        code: u16,
        message: String,
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
    pub block: u64,
    pub server: SocketAddr,
    pub bytes: usize,
}

/// A blocking TFTP read client.
pub struct Client {
    pub socket: UdpSocket,
    /// Sleep before each ACK (a deliberately slow client).
    pub pace: Option<Duration>,
    /// Expect replies from the listening port (single-port servers) instead of a new TID.
    pub single_port: bool,
}

impl Client {
    /// A client on a loopback socket of the same family as `server`.
    pub fn new(server: SocketAddr) -> Client {
        Client {
            socket: socket_for(server),
            pace: None,
            single_port: single_port(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

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
    /// `server`'s IP address and from one port other than `server`'s.
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
                    if self.single_port && from.port() != server.port() {
                        return Err(ClientError::Protocol(format!(
                            "single-port mode, but the reply came from {from}"
                        )));
                    }
                    if !self.single_port && from.port() == server.port() {
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

/// Downloads with a fresh client.
pub fn fetch(
    server: SocketAddr,
    filename: &str,
    mode: &str,
    options: &[(&str, &str)],
) -> Result<Fetched, ClientError> {
    Client::new(server).fetch(server, filename, mode, options)
}

// ---------------------------------------------------------------------------------------
// Raw datagrams
// ---------------------------------------------------------------------------------------

/// A socket for hand-made datagrams.
pub struct Raw {
    pub socket: UdpSocket,
}

impl Raw {
    /// A loopback socket of the same family as `server`, with the test read timeout.
    pub fn new(server: SocketAddr) -> Raw {
        Raw {
            socket: socket_for(server),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

    pub fn send(&self, to: SocketAddr, datagram: &[u8]) {
        self.socket.send_to(datagram, to).expect("send");
    }

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

// ---------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------

/// True when `DYNTFTP_REQUIRE_CLIENTS=1`: a missing client program fails the test.
pub fn require_clients() -> bool {
    std::env::var("DYNTFTP_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// The path of an executable `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The program's path, or `None` after a loud SKIPPED line; panics instead when clients
/// are required.
pub fn client_or_skip(program: &str, test: &str) -> Option<PathBuf> {
    match which(program) {
        Some(path) => Some(path),
        None if require_clients() => {
            panic!("{test}: {program} is not installed, and DYNTFTP_REQUIRE_CLIENTS=1")
        }
        None => {
            eprintln!(
                "SKIPPED: {test}: {program} not installed (set DYNTFTP_REQUIRE_CLIENTS=1 to make this fail)"
            );
            None
        }
    }
}
