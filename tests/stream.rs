//! The streaming source over loopback: a handler that feeds each session from a producer
//! thread through `stream::channel`, with a buffer much smaller than the files.

use std::io::{self, Write};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use dyntftp::{stream, Handler, Outcome, Packet, ReadRequest, Reject, ResponseData};
use testkit::*;

/// The buffer between producer and session: a few blocks, so the producer is throttled by
/// the client all along.
const CAPACITY: usize = 4096;

/// What each producer thread reports when it stops: the file name and the result of its
/// last write.
type Report = (String, io::Result<()>);

/// Serves, per file name, a stream produced on its own thread:
/// - `plain`: the data, size unknown;
/// - `sized`: the data, with its size announced in `open` (so `tsize` is answered);
/// - `fail`: 10,000 bytes, then `fail`;
/// - `drop`: 10,000 bytes, then the writer is dropped without `finish`;
/// - `endless`: writes until the session goes away.
struct StreamHandler {
    data: Vec<u8>,
    reports: mpsc::Sender<Report>,
}

impl Handler for StreamHandler {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let name = req.filename_lossy().into_owned();
        let (mut writer, source) = stream::channel(req.notifier, CAPACITY);
        let data = self.data.clone();
        match name.as_str() {
            "plain" | "fail" | "drop" | "endless" => {}
            "sized" => writer.set_size(data.len() as u64),
            _ => return Err(Reject::not_found()),
        }
        let reports = self.reports.clone();
        thread::spawn(move || {
            let result = (|| -> io::Result<()> {
                match name.as_str() {
                    "plain" | "sized" => {
                        // Pieces that do not line up with blocks or the buffer.
                        for piece in data.chunks(1000) {
                            writer.write_all(piece)?;
                        }
                        writer.finish();
                    }
                    "fail" => {
                        writer.write_all(&data[..10_000])?;
                        writer.fail(io::Error::other("upstream broke"));
                    }
                    "drop" => {
                        writer.write_all(&data[..10_000])?;
                        drop(writer);
                    }
                    _ => loop {
                        // Bounded by the session: it ends within the test's wait.
                        writer.send(vec![b'z'; 700])?;
                    },
                }
                Ok(())
            })();
            let _ = reports.send((name, result));
        });
        Ok(Box::new(source))
    }
}

fn spawn_stream(data: Vec<u8>) -> (ServerGuard, mpsc::Receiver<Report>) {
    let (tx, rx) = mpsc::channel();
    let server = spawn_server(
        Mode::OwnPort,
        v4(),
        move || Box::new(StreamHandler { data, reports: tx }),
        |b| {
            b.timeout(Duration::from_millis(200))
                .retries(2)
                .source_timeout(Duration::from_secs(10))
        },
    );
    (server, rx)
}

fn report(rx: &mpsc::Receiver<Report>) -> Report {
    rx.recv_timeout(WAIT).expect("the producer thread reports")
}

#[test]
fn a_stream_is_served_whole_through_a_small_buffer() {
    let data = pseudo_random(400_000, 61);
    let (mut server, reports) = spawn_stream(data.clone());
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[("blksize", "1428")],
        &[("blksize", "1428"), ("windowsize", "8"), ("tsize", "0")],
    ];
    for options in cases {
        let got = fetch(Mode::OwnPort, server.addr, "plain", "octet", options).unwrap();
        assert!(got.data == data, "{options:?}: wrong bytes");
        // The size was never announced: no tsize in the OACK.
        assert_eq!(got.oack_value("tsize"), None, "{options:?}");
        let stats = server.next_session();
        assert_eq!(stats.outcome, Outcome::Completed, "{options:?}");
        assert_eq!(stats.transfer.bytes_read, data.len() as u64);
        let (name, result) = report(&reports);
        assert_eq!(name, "plain");
        result.unwrap();
    }
}

#[test]
fn a_size_announced_in_open_answers_tsize() {
    let data = pseudo_random(100_000, 62);
    let (mut server, reports) = spawn_stream(data.clone());
    let got = fetch(
        Mode::OwnPort,
        server.addr,
        "sized",
        "octet",
        &[("tsize", "0"), ("blksize", "1024")],
    )
    .unwrap();
    assert_eq!(got.oack_value("tsize"), Some("100000"));
    assert!(got.data == data);
    assert_eq!(server.next_session().outcome, Outcome::Completed);
    report(&reports).1.unwrap();
    // In netascii the translated size is unknown: tsize is left out, the stream still
    // flows (its raw bytes are checked against the announced size).
    let got = fetch(
        Mode::OwnPort,
        server.addr,
        "sized",
        "netascii",
        &[("tsize", "0")],
    )
    .unwrap();
    assert_eq!(got.oack, None);
    assert!(got.data == to_netascii(&data));
    assert_eq!(server.next_session().outcome, Outcome::Completed);
    report(&reports).1.unwrap();
}

#[test]
fn a_failed_or_abandoned_stream_ends_with_error_0_after_its_data() {
    let data = pseudo_random(50_000, 63);
    let (mut server, reports) = spawn_stream(data.clone());
    for name in ["fail", "drop"] {
        let client = Client::new(server.mode, server.addr);
        let mut received = 0;
        let err = client
            .fetch_with(server.addr, name.as_bytes(), "octet", &[], &mut |p| {
                received = p.bytes
            })
            .unwrap_err();
        match &err {
            ClientError::Error {
                code: 0, message, ..
            } => {
                assert_eq!(message, "error reading file", "{name}")
            }
            other => panic!("{name}: expected ERROR 0, got {other:?}"),
        }
        // Every full block of what was written came first (the partial last one is
        // never sent: a short block would look like a successful end).
        assert_eq!(received, 10_000 / 512 * 512, "{name}");
        let stats = server.next_session();
        assert_eq!(stats.outcome, Outcome::ReadFailed, "{name}");
        let (reported, result) = report(&reports);
        assert_eq!(reported, name);
        result.unwrap();
    }
}

#[test]
fn the_producer_stops_when_the_client_goes_away() {
    let (mut server, reports) = spawn_stream(Vec::new());
    let raw = Raw::new(server.addr);
    raw.rrq(server.addr, b"endless", "octet", &[]);
    let (datagram, _) = raw.recv();
    assert!(matches!(
        Packet::parse(&datagram),
        Ok(Packet::Data { block: 1, .. })
    ));
    // Never acknowledge: the session times out, drops its source, and the producer,
    // blocked on a full buffer, gets BrokenPipe.
    let stats = server.next_session();
    assert_eq!(stats.outcome, Outcome::TimedOut);
    let (name, result) = report(&reports);
    assert_eq!(name, "endless");
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn streams_run_side_by_side() {
    let data = pseudo_random(200_000, 64);
    let (mut server, reports) = spawn_stream(data.clone());
    let addr = server.addr;
    let clients: Vec<_> = (0..8)
        .map(|i| {
            thread::spawn(move || {
                let name = if i % 2 == 0 { "plain" } else { "sized" };
                fetch(
                    Mode::OwnPort,
                    addr,
                    name,
                    "octet",
                    &[("blksize", "1428"), ("tsize", "0")],
                )
                .map(|f| f.data)
                .map_err(|e| format!("{e:?}"))
            })
        })
        .collect();
    for client in clients {
        assert!(client.join().unwrap().unwrap() == data);
    }
    for stats in server.sessions(8) {
        assert_eq!(stats.outcome, Outcome::Completed);
    }
    for _ in 0..8 {
        report(&reports).1.unwrap();
    }
}
