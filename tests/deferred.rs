//! Deferred open over loopback: a handler that answers every request with a `Deferred`
//! source and hands the `Opener` to the test, which completes it when it likes — as a
//! backend on another thread would, once it knows the size or that the name is missing.

use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use dyntftp::deferred::{deferred, Opener};
use dyntftp::{
    BytesSource, Handler, Outcome, Packet, ReadRequest, Reject, ResponseData, ServerBuilder,
    SessionStats,
};
use testkit::*;

/// Hands each request's opener to the test, with the requested name.
#[derive(Clone)]
struct Held {
    openers: Sender<(String, Opener)>,
}

impl Handler for Held {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let (opener, source) = deferred(req.notifier);
        req.set_label("held");
        let _ = self
            .openers
            .send((req.filename_lossy().into_owned(), opener));
        Ok(Box::new(source))
    }
}

fn spawn_held(mode: Mode, open_timeout: Duration) -> (ServerGuard, Receiver<(String, Opener)>) {
    let (tx, rx) = mpsc::channel();
    let server = spawn_server(
        mode,
        v4(),
        move || Box::new(Held { openers: tx }),
        move |b| b.open_timeout(open_timeout),
    );
    (server, rx)
}

fn next_opener(openers: &Receiver<(String, Opener)>) -> (String, Opener) {
    openers.recv_timeout(WAIT).expect("the handler was asked")
}

/// Fetches `name` with `options` on a thread: the test completes the open meanwhile.
fn fetch_later(
    server: &ServerGuard,
    name: &str,
    options: &'static [(&'static str, &'static str)],
) -> thread::JoinHandle<Result<Fetched, ClientError>> {
    let (mode, addr, name) = (server.mode, server.addr, name.to_owned());
    thread::spawn(move || fetch(mode, addr, &name, "octet", options))
}

fn the_first_answer_waits_for_the_open_and_carries_its_size(mode: Mode) {
    let data = pseudo_random(300_000, 141);
    let (mut server, openers) = spawn_held(mode, Duration::from_secs(10));
    let options = &[("tsize", "0"), ("blksize", "1468"), ("windowsize", "4")];
    let client = fetch_later(&server, "kernel", options);
    let (name, opener) = next_opener(&openers);
    assert_eq!(name, "kernel");
    opener.open(Box::new(BytesSource::new(data.clone())));
    let got = client.join().unwrap().expect("the transfer completes");
    assert_eq!(got.oack_value("tsize"), Some("300000"));
    assert_eq!(got.oack_value("blksize"), Some("1468"));
    assert_eq!(got.oack_value("windowsize"), Some("4"));
    assert!(got.data == data, "wrong bytes");
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed);
    assert_eq!(stats.label.as_deref(), Some("held"));
    // `open_wait` may be `None`: the test can complete the opener before `open` has even
    // returned, and the session then finds the source open at once (the unit tests in
    // session/opening.rs time the wait).
    assert_eq!(stats.transfer.negotiated.tsize, Some(300_000));
}

fn a_refusal_after_the_wait_is_the_clients_error(mode: Mode) {
    let (mut server, openers) = spawn_held(mode, Duration::from_secs(10));
    let client = fetch_later(&server, "missing", &[("tsize", "0")]);
    next_opener(&openers).1.refuse(Reject::not_found());
    match client.join().unwrap() {
        Err(ClientError::Error { code, message, .. }) => {
            assert_eq!((code, message.as_str()), (1, "file not found"))
        }
        other => panic!("expected ERROR 1, got {other:?}"),
    }
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Refused);
    assert_eq!(stats.transfer.packets_sent, 0, "no OACK before the ERROR");
    // An opener dropped without an answer refuses with ERROR 0: the source failed.
    let client = fetch_later(&server, "dropped", &[]);
    drop(next_opener(&openers));
    match client.join().unwrap() {
        Err(ClientError::Error { code: 0, .. }) => {}
        other => panic!("expected ERROR 0, got {other:?}"),
    }
    assert_eq!(server.next_session().outcome, Outcome::ReadFailed);
}

fn an_open_that_never_completes_gets_error_0_at_the_open_timeout(mode: Mode) {
    let (mut server, openers) = spawn_held(mode, Duration::from_millis(300));
    let client = fetch_later(&server, "stalled", &[("tsize", "0")]);
    let (_, opener) = next_opener(&openers);
    match client.join().unwrap() {
        Err(ClientError::Error { code, message, .. }) => {
            assert_eq!((code, message.as_str()), (0, "timed out opening file"))
        }
        other => panic!("expected ERROR 0, got {other:?}"),
    }
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::SourceStalled);
    assert!(
        stats.duration >= Duration::from_millis(300),
        "{:?}",
        stats.duration
    );
    // The session is gone: the backend can tell, and a late answer is harmless.
    assert!(opener.is_abandoned());
    opener.open(Box::new(BytesSource::new(&b"late"[..])));
}

/// Sends a request for `name` from `raw`.
fn request(raw: &Raw, to: SocketAddr, name: &[u8], options: &[(&str, &str)]) {
    raw.rrq(to, name, "octet", options);
}

fn repeated_requests_are_absorbed_while_the_open_waits(mode: Mode) {
    let (mut server, openers) = spawn_held(mode, Duration::from_secs(10));
    let raw = Raw::new(server.addr);
    let options = [("tsize", "0"), ("blksize", "1024")];
    request(&raw, server.addr, b"grub.cfg", &options);
    let (_, opener) = next_opener(&openers);
    // The client gives up on its first request and sends it again, twice.
    request(&raw, server.addr, b"grub.cfg", &options);
    request(&raw, server.addr, b"grub.cfg", &options);
    opener.open(Box::new(BytesSource::new(&b"set timeout=5\n"[..])));
    let (datagram, from) = raw.recv();
    match Packet::parse(&datagram).unwrap() {
        Packet::Oack(options) => {
            let tsize = options.iter().find(|o| o.name == b"tsize").unwrap();
            assert_eq!(tsize.value, b"14");
        }
        other => panic!("expected the OACK, got {other:?}"),
    }
    raw.ack(from, 0);
    let (block, payload, _) = raw.expect_data();
    assert_eq!((block, payload.as_slice()), (1, &b"set timeout=5\n"[..]));
    raw.ack(from, 1);
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::Completed);
    // One session, one open: the repeats reached it (counted there, unless admission
    // had already taken one for a burst of the same request).
    assert!(
        openers.try_recv().is_err(),
        "a repeat opened a second source"
    );
    assert!(
        (1..=2).contains(&stats.transfer.repeated_requests),
        "{}",
        stats.transfer.repeated_requests
    );
}

both_modes!(
    the_first_answer_waits_for_the_open_and_carries_its_size,
    a_refusal_after_the_wait_is_the_clients_error,
    an_open_that_never_completes_gets_error_0_at_the_open_timeout,
    repeated_requests_are_absorbed_while_the_open_waits,
);

/// EDK2's size probe: `tsize 0` (with its blksize and windowsize), the OACK, ERROR 8;
/// then the read. Each request is opened (and could be answered) on its own.
#[test]
fn a_uefi_size_probe_gets_the_size_then_the_read_gets_the_file() {
    let data = pseudo_random(70_000, 142);
    let (mut server, openers) = spawn_held(Mode::OwnPort, Duration::from_secs(10));
    let raw = Raw::new(server.addr);
    let probe = [("blksize", "1468"), ("windowsize", "4"), ("tsize", "0")];
    request(&raw, server.addr, b"bootx64.efi", &probe);
    next_opener(&openers)
        .1
        .open(Box::new(BytesSource::new(data.clone())));
    let (datagram, from) = raw.recv();
    let Packet::Oack(options) = Packet::parse(&datagram).unwrap() else {
        panic!("expected the OACK");
    };
    let tsize = options.iter().find(|o| o.name == b"tsize").unwrap();
    assert_eq!(tsize.value, b"70000");
    raw.send(from, b"\x00\x05\x00\x08aborted\x00");
    assert_eq!(server.next_session().outcome, Outcome::Probe);

    let client = fetch_later(
        &server,
        "bootx64.efi",
        &[("blksize", "1468"), ("windowsize", "4")],
    );
    next_opener(&openers)
        .1
        .open(Box::new(BytesSource::new(data.clone())));
    assert!(client.join().unwrap().unwrap().data == data);
    assert_eq!(server.next_session().outcome, Outcome::Completed);
}

/// Several event loops: the opener wakes the worker that holds the session.
#[test]
fn workers_complete_deferred_opens_on_their_own_loops() {
    let (tx, openers) = mpsc::channel();
    let (sessions_tx, sessions) = mpsc::channel::<SessionStats>();
    #[derive(Clone)]
    struct Recorded {
        held: Held,
        sessions: Sender<SessionStats>,
    }
    impl Handler for Recorded {
        fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
            self.held.open(req)
        }
        fn session_finished(&mut self, stats: &SessionStats) {
            let _ = self.sessions.send(stats.clone());
        }
    }
    let handler = Recorded {
        held: Held { openers: tx },
        sessions: sessions_tx,
    };
    let pool = ServerBuilder::new(handler)
        .bind(v4())
        .shutdown_grace(Duration::from_millis(300))
        .build_workers(2)
        .expect("build workers");
    let addr = pool.local_addrs()[0];
    let handle = pool.shutdown_handle();
    let thread = thread::spawn(move || pool.run().map_err(|e| e.to_string()));
    let data = pseudo_random(50_000, 143);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let name = format!("file{i}");
            thread::spawn(move || fetch(Mode::OwnPort, addr, &name, "octet", &[("tsize", "0")]))
        })
        .collect();
    for _ in 0..8 {
        let (_, opener) = next_opener(&openers);
        opener.open(Box::new(BytesSource::new(data.clone())));
    }
    for client in clients {
        let got = client.join().unwrap().expect("served");
        assert_eq!(got.oack_value("tsize"), Some("50000"));
        assert!(got.data == data);
    }
    for _ in 0..8 {
        let stats = sessions.recv_timeout(WAIT).expect("a finished session");
        assert_eq!(stats.outcome, Outcome::Completed);
    }
    handle.shutdown();
    assert_eq!(thread.join().unwrap(), Ok(()));
}
