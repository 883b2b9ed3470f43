//! The scrape endpoint (`--metrics-listen`): `GET /metrics` in the Prometheus text format
//! and `GET /healthz`, over HTTP/1.x, on one thread of its own.
//!
//! The event loop never waits for a scraper: its stats callback renders the metrics and
//! swaps the text into a [`Snapshot`]; this thread only clones the latest text out. So a
//! scrape sees the totals of the last stats report (`--stats-interval` old at most).
//!
//! What one scraper can cost is bounded: one thread, one connection at a time (others wait
//! in the listen backlog), [`CONNECTION_DEADLINE`] per connection for reading the request
//! and writing the reply, a request head of at most [`MAX_REQUEST_BYTES`] (a body is never
//! read), one request per connection (`Connection: close`).
//!
//! Requests are parsed by `httparse`, hyper's parser; the replies are fixed-form.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};

/// Time one connection may take, from accept to the last byte of the reply.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);

/// Largest request head (request line and headers) read; a longer one gets 431.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Most headers a request may have; more gets 431.
const MAX_HEADERS: usize = 32;

/// The content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The latest rendered metrics, published by the stats callback and read by the HTTP
/// thread. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Snapshot(Arc<Mutex<Arc<str>>>);

impl Snapshot {
    /// A snapshot holding `text` until the first [`publish`](Self::publish).
    pub fn new(text: String) -> Snapshot {
        Snapshot(Arc::new(Mutex::new(text.into())))
    }

    /// Replaces the text scrapes return. Holds the lock only for a pointer swap.
    pub fn publish(&self, text: String) {
        let text: Arc<str> = text.into();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    /// The latest text.
    pub fn latest(&self) -> Arc<str> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Binds the scrape endpoint's socket: before privileges are dropped, so that a port below
/// 1024 works.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("cannot listen for scrapes on {addr}: {e}"))
}

/// Serves `listener` on a new thread named `scrape`, forever.
pub fn spawn(listener: TcpListener, snapshot: Snapshot) -> Result<(), String> {
    std::thread::Builder::new()
        .name("scrape".into())
        .spawn(move || serve(&listener, &snapshot))
        .map(drop)
        .map_err(|e| format!("cannot start the scrape thread: {e}"))
}

/// Accepts and answers connections one at a time.
fn serve(listener: &TcpListener, snapshot: &Snapshot) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = answer(stream, snapshot) {
                    debug!("scrape from {peer}: {e}");
                }
            }
            Err(e) => {
                // Descriptor exhaustion and the like: do not spin on it.
                warn!("cannot accept a scrape connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads one request from `stream` and replies, within [`CONNECTION_DEADLINE`].
fn answer(mut stream: TcpStream, snapshot: &Snapshot) -> io::Result<()> {
    let deadline = Instant::now() + CONNECTION_DEADLINE;
    let reader = stream.try_clone()?;
    let reply = read_reply(&reader, snapshot, || {
        reader.set_read_timeout(Some(remaining(deadline)?))
    })?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(&reply.to_bytes())?;
    stream.flush()
}

/// Reads a request head from `stream`, at most [`MAX_REQUEST_BYTES`], calling
/// `before_read` before each read (to set its timeout), and returns the reply to it.
/// An error when the stream ends or fails first.
fn read_reply(
    mut stream: impl Read,
    snapshot: &Snapshot,
    mut before_read: impl FnMut() -> io::Result<()>,
) -> io::Result<Reply> {
    let mut head = [0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        if len == head.len() {
            return Ok(Reply::status(431, "Request Header Fields Too Large"));
        }
        before_read()?;
        let n = stream.read(&mut head[len..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        match Request::parse(&head[..len]) {
            Parsed::Partial => continue,
            Parsed::Complete(request) => return Ok(route(&request, snapshot)),
            Parsed::Bad(reply) => return Ok(reply),
        }
    }
}

/// Time left until `deadline`, or a timeout error once it has passed.
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

/// The parts of a request the endpoint looks at.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
}

/// What the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    Complete(Request),
    /// Not a request this endpoint answers: the error reply.
    Bad(Reply),
}

impl Request {
    fn parse(bytes: &[u8]) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(bytes) {
            Ok(httparse::Status::Partial) => Parsed::Partial,
            Ok(httparse::Status::Complete(_)) => Parsed::Complete(Request {
                method: request.method.unwrap_or_default().to_string(),
                path: request.path.unwrap_or_default().to_string(),
            }),
            Err(httparse::Error::TooManyHeaders) => {
                Parsed::Bad(Reply::status(431, "Request Header Fields Too Large"))
            }
            Err(_) => Parsed::Bad(Reply::status(400, "Bad Request")),
        }
    }
}

/// The reply to a complete request.
fn route(request: &Request, snapshot: &Snapshot) -> Reply {
    // The query string does not select anything.
    let path = request.path.split('?').next().unwrap_or_default();
    let head_only = request.method == "HEAD";
    if request.method != "GET" && !head_only {
        let mut reply = Reply::status(405, "Method Not Allowed");
        reply.allow = true;
        return reply;
    }
    let mut reply = match path {
        "/metrics" => Reply {
            code: 200,
            reason: "OK",
            content_type: METRICS_CONTENT_TYPE,
            body: snapshot.latest().as_bytes().to_vec(),
            allow: false,
            head_only: false,
        },
        "/healthz" => Reply::text(200, "OK", "ok\n"),
        _ => Reply::status(404, "Not Found"),
    };
    reply.head_only = head_only;
    reply
}

/// A complete HTTP/1.1 response, sent with `Connection: close`.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// Adds `Allow: GET, HEAD` (to a 405).
    allow: bool,
    /// A reply to HEAD: the headers of the GET reply, no body.
    head_only: bool,
}

impl Reply {
    fn text(code: u16, reason: &'static str, body: &str) -> Reply {
        Reply {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            allow: false,
            head_only: false,
        }
    }

    /// An error reply whose body is its reason.
    fn status(code: u16, reason: &'static str) -> Reply {
        Reply::text(code, reason, &format!("{reason}\n"))
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.code,
            self.reason,
            self.content_type,
            self.body.len(),
            if self.allow { "Allow: GET, HEAD\r\n" } else { "" },
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_to(request: &[u8], snapshot: &Snapshot) -> Reply {
        match Request::parse(request) {
            Parsed::Complete(request) => route(&request, snapshot),
            Parsed::Bad(reply) => reply,
            Parsed::Partial => panic!("partial: {request:?}"),
        }
    }

    #[test]
    fn metrics_serve_the_latest_snapshot() {
        let snapshot = Snapshot::new("a 0\n".into());
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(reply_to(get, &snapshot).body, b"a 0\n");
        snapshot.clone().publish("a 1\n".into());
        let reply = reply_to(get, &snapshot);
        assert_eq!((reply.code, reply.body.as_slice()), (200, &b"a 1\n"[..]));
        assert_eq!(reply.content_type, METRICS_CONTENT_TYPE);
        let with_query = b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n";
        assert_eq!(reply_to(with_query, &snapshot).body, b"a 1\n");
    }

    #[test]
    fn healthz_unknown_paths_and_methods() {
        let snapshot = Snapshot::new(String::new());
        let code = |request: &[u8]| reply_to(request, &snapshot).code;
        assert_eq!(code(b"GET /healthz HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(
            reply_to(b"GET /healthz HTTP/1.1\r\n\r\n", &snapshot).body,
            b"ok\n"
        );
        assert_eq!(code(b"GET / HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(code(b"GET /metrics/ HTTP/1.1\r\n\r\n"), 404);
        let post = reply_to(b"POST /metrics HTTP/1.1\r\n\r\n", &snapshot);
        assert_eq!(post.code, 405);
        assert!(String::from_utf8_lossy(&post.to_bytes()).contains("\r\nAllow: GET, HEAD\r\n"));
        assert_eq!(code(b"GARBAGE\r\n\r\n"), 400);
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        assert_eq!(
            Request::parse(b"GET /metrics HTTP/1.1\r\nHost:"),
            Parsed::Partial
        );
        assert_eq!(Request::parse(b""), Parsed::Partial);
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            request.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        assert!(matches!(Request::parse(&request), Parsed::Bad(r) if r.code == 431));
    }

    /// Yields one byte per read, as a slow client's segments arrive.
    struct ByteByByte<'a>(&'a [u8]);

    impl Read for ByteByByte<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let Some((first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            out[0] = *first;
            self.0 = rest;
            Ok(1)
        }
    }

    #[test]
    fn the_head_is_read_in_pieces_and_bounded() {
        let snapshot = Snapshot::new("a 0\n".into());
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut reads = 0;
        let reply = read_reply(ByteByByte(request), &snapshot, || {
            reads += 1;
            Ok(())
        });
        assert_eq!(reply.map(|r| r.code).ok(), Some(200));
        assert_eq!(reads, request.len());

        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(3 * MAX_REQUEST_BYTES, b'a');
        let reply = read_reply(&huge[..], &snapshot, || Ok(()));
        assert_eq!(reply.map(|r| r.code).ok(), Some(431));

        let cut = read_reply(&request[..10], &snapshot, || Ok(()));
        assert_eq!(
            cut.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::UnexpectedEof)
        );
        let timed_out = read_reply(&request[..], &snapshot, || {
            Err(io::ErrorKind::TimedOut.into())
        });
        assert_eq!(
            timed_out.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::TimedOut)
        );
    }

    #[test]
    fn replies_carry_length_and_close() {
        let reply = Reply::text(200, "OK", "ok\n");
        assert_eq!(
            reply.to_bytes(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        let snapshot = Snapshot::new("a 0\n".into());
        let head = reply_to(b"HEAD /metrics HTTP/1.1\r\n\r\n", &snapshot).to_bytes();
        let head = String::from_utf8(head).unwrap_or_default();
        assert!(head.contains("Content-Length: 4\r\n") && head.ends_with("\r\n\r\n"));
    }
}
