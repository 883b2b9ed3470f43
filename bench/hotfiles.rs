//! The hot-file cache of `FsHandler` in a boot storm: many clients fetch the same file at
//! once from an in-process server over loopback, first without the cache (every session
//! reads the file), then with it (one read, shared bytes).
//!
//! ```text
//! cargo bench --bench hotfiles -- [--clients N] [--rounds R] [--size MIB] [--blksize B] [--window W]
//! ```
//!
//! Prints, per mode: wall time, aggregate payload rate, the server thread's CPU time
//! (what the cache saves is server work; on loopback the clients share the same cores)
//! and the cache counters. Every byte received is verified. The file stays in the page
//! cache in both modes, so the difference is the per-block `read` system calls and copies
//! from the page cache, not disk I/O: with a cold page cache or a slow disk the cache
//! gains more.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::client::{Event, ReadTransfer, Request, Settings};
use dyntftp::{CacheStats, FsHandler, Mode, ServerBuilder};
use testkit::{client::drive, pseudo_random, sys};

#[path = "common/args.rs"]
mod args;

struct Config {
    clients: usize,
    rounds: usize,
    size: usize,
    blksize: usize,
    window: usize,
}

fn parse_args() -> Config {
    let mut config = Config {
        clients: 32,
        rounds: 4,
        size: 8 << 20,
        blksize: 1428,
        window: 16,
    };
    let mut args = args::args().into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--clients" => config.clients = value("--clients").max(1),
            "--rounds" => config.rounds = value("--rounds").max(1),
            "--size" => config.size = value("--size") << 20,
            "--blksize" => config.blksize = value("--blksize").clamp(8, 65464),
            "--window" => config.window = value("--window").clamp(1, 65535),
            "-h" | "--help" => {
                println!(
                    "cargo bench --bench hotfiles -- [--clients N] [--rounds R] [--size MIB] \
                     [--blksize B] [--window W]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    config
}

/// The clients' settings: each block is compared as it arrives, nothing is kept.
const CLIENT: Settings = Settings {
    timeout: Duration::from_secs(1),
    retries: 5,
    linger: 0,
    keep_payload: false,
};

/// Fetches `request` and checks it equals `want`.
fn fetch(server: SocketAddr, request: &Request, want: &[u8]) -> io::Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(CLIENT.timeout))?;
    let mut transfer = ReadTransfer::new(Instant::now(), server, request, CLIENT);
    let mut buf = vec![0u8; 65536];
    let mut same = true;
    drive(&socket, &mut transfer, &mut buf, |transfer, event| {
        if let Event::Data(payload) = event {
            let offset = (transfer.bytes() - payload.len() as u64) as usize;
            same &= want.get(offset..offset + payload.len()) == Some(payload);
        }
        ControlFlow::Continue(())
    })?;
    match transfer.outcome() {
        Some(Ok(len)) if same && len == want.len() as u64 => Ok(()),
        Some(Ok(_)) => Err(io::Error::other("wrong bytes")),
        Some(Err(e)) => Err(io::Error::other(e.to_string())),
        None => Err(io::Error::other("the transfer did not end")),
    }
}

struct Run {
    wall: Duration,
    server_cpu: Duration,
    cache: CacheStats,
}

fn run(root: &Path, cache_bytes: u64, want: &Arc<Vec<u8>>, config: &Config) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let server_thread = {
        let (root, stop) = (root.to_path_buf(), Arc::clone(&stop));
        thread::spawn(move || {
            let handler = FsHandler::new(&root).unwrap().cache(cache_bytes);
            let mut server = ServerBuilder::new(handler)
                .bind("127.0.0.1:0".parse().unwrap())
                .max_window(64)
                .build()
                .unwrap();
            ready_tx.send(server.local_addr()).unwrap();
            let start = sys::thread_cpu();
            while !stop.load(Ordering::SeqCst) {
                server.run_once(Some(Duration::from_millis(20))).unwrap();
            }
            (sys::thread_cpu() - start, server.handler().cache_stats())
        })
    };
    let addr = ready_rx.recv().unwrap();
    let start = Instant::now();
    let request = Request::new("vmlinuz", Mode::Octet)
        .blksize(config.blksize as u16)
        .windowsize(config.window as u16);
    let rounds = config.rounds;
    let clients: Vec<_> = (0..config.clients)
        .map(|_| {
            let (want, request) = (Arc::clone(want), request.clone());
            thread::spawn(move || {
                for _ in 0..rounds {
                    fetch(addr, &request, &want).expect("fetch");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    let wall = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (server_cpu, cache) = server_thread.join().unwrap();
    Run {
        wall,
        server_cpu,
        cache,
    }
}

fn main() {
    let config = parse_args();
    let root = std::env::temp_dir().join(format!("dyntftp-hotfiles-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let want = Arc::new(pseudo_random(config.size, 1));
    std::fs::write(root.join("vmlinuz"), want.as_slice()).unwrap();
    let total = (config.size * config.clients * config.rounds) as f64;
    println!(
        "{} clients x {} rounds of one {} MiB file, blksize {}, windowsize {}",
        config.clients,
        config.rounds,
        config.size >> 20,
        config.blksize,
        config.window
    );
    for (label, cache_bytes) in [
        ("no cache", 0u64),
        ("cache", 4 * config.size as u64),
        ("no cache", 0),
        ("cache", 4 * config.size as u64),
    ] {
        let r = run(&root, cache_bytes, &want, &config);
        println!(
            "{label:>9}: wall {:7.1} ms, {:7.1} MB/s, server CPU {:7.1} ms ({:.2} ms per 100 MB), \
             cache hits {} loads {}",
            r.wall.as_secs_f64() * 1e3,
            total / r.wall.as_secs_f64() / 1e6,
            r.server_cpu.as_secs_f64() * 1e3,
            r.server_cpu.as_secs_f64() * 1e3 / (total / 1e8),
            r.cache.hits,
            r.cache.loads
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
