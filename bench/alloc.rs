//! Heap allocations on the packet path, counted by a global allocator: a real server and a
//! client (the library's `ReadTransfer` over a blocking socket, with fixed buffers: no
//! allocation of its own per packet or per transfer) in one process, over loopback.
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
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Instant;

use dyntftp::client::{ReadTransfer, Request, Settings};
use dyntftp::{Mode, ServerBuilder};
use testkit::{client::drive, SharedBytes};

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

/// The client's settings: the payload is counted, not kept (nothing allocated per
/// transfer).
const CLIENT: Settings = Settings {
    timeout: std::time::Duration::from_secs(1),
    retries: 5,
    linger: 0,
    keep_payload: false,
};

/// Downloads `request` from `server` and checks it got `len` bytes; returns the DATA
/// packets received in order. Fixed buffers only.
fn download(
    socket: &UdpSocket,
    server: SocketAddr,
    request: &Request,
    len: usize,
    buf: &mut [u8],
) -> u64 {
    let mut transfer = ReadTransfer::new(Instant::now(), server, request, CLIENT);
    drive(socket, &mut transfer, buf, |_, _| ControlFlow::Continue(())).expect("I/O");
    assert_eq!(transfer.outcome(), Some(Ok(len as u64)), "{transfer:?}");
    transfer.blocks()
}

fn main() {
    let data: std::sync::Arc<[u8]> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
    let small: std::sync::Arc<[u8]> = vec![7u8; 1000].into();
    let mut buf = vec![0u8; 65_536];
    for (name, data) in [("big", data), ("small", small)] {
        let len = data.len();
        // The server is built on its own thread (a running server is not Send).
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = thread::spawn(move || {
            let mut server = ServerBuilder::new(SharedBytes(data))
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
        socket.set_read_timeout(Some(CLIENT.timeout)).unwrap();
        let request = Request::new(name, Mode::Octet).blksize(1428).windowsize(16);
        // Warm up (first-time allocations in the server: slab, wheel, buffers).
        download(&socket, addr, &request, len, &mut buf);
        if name == "big" {
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            let started = Instant::now();
            let packets = download(&socket, addr, &request, len, &mut buf);
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
                download(&socket, addr, &request, len, &mut buf);
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
