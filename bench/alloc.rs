//! Heap allocations on the packet path, counted by a global allocator: a real server and a
//! minimal client (fixed buffers, no allocation of its own per packet) in one process, over
//! loopback.
//!
//! ```text
//! cargo bench --bench alloc
//! ```
//!
//! Prints allocations per DATA packet for one long transfer (where everything a session
//! allocates once is spread over thousands of packets) and allocations per session for
//! many one-block transfers. The packet path itself should allocate nothing: the figure
//! per packet tends to zero as the file grows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::packet::{write_ack, write_rrq};
use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData, ServerBuilder};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Serves every name from one shared buffer.
struct Shared(std::sync::Arc<[u8]>);

impl Handler for Shared {
    fn open(&mut self, _: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        Ok(Box::new(BytesSource::new(self.0.clone())))
    }
}

/// Downloads from `server` with `options`, acknowledging each window's last block;
/// returns the DATA packets received. Fixed buffers only.
fn download(socket: &UdpSocket, server: SocketAddr, rrq: &[u8], window: u16) -> u64 {
    let mut buf = vec![0u8; 65_536];
    let mut ack = Vec::with_capacity(4);
    socket.send_to(rrq, server).expect("send RRQ");
    let mut expected: u16 = 1;
    let mut packets = 0u64;
    let mut in_window = 0;
    loop {
        let (len, from) = socket
            .recv_from(&mut buf)
            .expect("reply within the timeout");
        match u16::from_be_bytes([buf[0], buf[1]]) {
            6 => {
                ack.clear();
                write_ack(&mut ack, 0);
                socket.send_to(&ack, from).unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    continue;
                }
                packets += 1;
                in_window += 1;
                expected = expected.wrapping_add(1);
                let last = len < 4 + 1428;
                if last || in_window == window {
                    in_window = 0;
                    ack.clear();
                    write_ack(&mut ack, block);
                    socket.send_to(&ack, from).unwrap();
                }
                if last {
                    return packets;
                }
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
}

fn main() {
    let data: std::sync::Arc<[u8]> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let small: std::sync::Arc<[u8]> = vec![7u8; 1000].into();
    for (name, data) in [("big", data), ("small", small)] {
        // The server is built on its own thread (a running server is not Send).
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = thread::spawn(move || {
            let mut server = ServerBuilder::new(Shared(data))
                .bind("127.0.0.1:0".parse().unwrap())
                .build()
                .expect("server");
            ready_tx
                .send((server.local_addr(), server.shutdown_handle()))
                .unwrap();
            server.run()
        });
        let (addr, stop) = ready.recv().expect("server started");
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rrq = Vec::new();
        write_rrq(
            &mut rrq,
            name.as_bytes(),
            "octet",
            [("blksize", "1428"), ("windowsize", "16")],
        );
        // Warm up (first-time allocations in the server: slab, wheel, buffers).
        download(&socket, addr, &rrq, 16);
        if name == "big" {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            let started = Instant::now();
            let packets = download(&socket, addr, &rrq, 16);
            let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
            println!(
                "one 32 MiB transfer (blksize 1428, windowsize 16): {packets} DATA packets, \
                 {allocations} allocations in the whole process = {:.5} per packet ({:?})",
                allocations as f64 / packets as f64,
                started.elapsed()
            );
        } else {
            let sessions = 2000;
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for _ in 0..sessions {
                download(&socket, addr, &rrq, 16);
            }
            let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
            println!(
                "{sessions} one-block sessions: {allocations} allocations = {:.1} per session",
                allocations as f64 / sessions as f64
            );
        }
        stop.shutdown();
        thread.join().unwrap().unwrap();
    }
}
