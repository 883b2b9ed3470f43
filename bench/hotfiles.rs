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
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use dyntftp::packet::{write_ack, write_rrq};
use dyntftp::{CacheStats, FsHandler, Packet, ServerBuilder};
use testkit::{pseudo_random, sys};

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
    let mut args = std::env::args().skip(1);
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
            "--window" => config.window = value("--window").max(1),
            "--bench" => {} // passed by `cargo bench`
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

/// Fetches `name` and checks it equals `want`.
fn fetch(server: SocketAddr, name: &str, want: &[u8], config: &Config) -> io::Result<()> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let (blksize, window) = (config.blksize.to_string(), config.window.to_string());
    let mut packet = Vec::new();
    write_rrq(
        &mut packet,
        name.as_bytes(),
        "octet",
        [
            ("blksize", blksize.as_str()),
            ("windowsize", window.as_str()),
        ],
    );
    socket.send_to(&packet, server)?;
    let mut buf = vec![0u8; 65536];
    let mut got: Vec<u8> = Vec::with_capacity(want.len());
    let mut expected: u16 = 1;
    let mut in_window = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            return Err(io::Error::other("transfer took over 120 s"));
        }
        let (len, from) = socket.recv_from(&mut buf)?;
        let ack = |block: u16| {
            let mut ack = Vec::new();
            write_ack(&mut ack, block);
            socket.send_to(&ack, from).map(|_| ())
        };
        match Packet::parse(&buf[..len]) {
            Ok(Packet::Oack(_)) => ack(0)?,
            Ok(Packet::Data { block, data }) if block == expected => {
                got.extend_from_slice(data);
                let last = data.len() < config.blksize;
                in_window += 1;
                if last || in_window == config.window {
                    ack(block)?;
                    in_window = 0;
                }
                if last {
                    break;
                }
                expected = expected.wrapping_add(1);
            }
            Ok(Packet::Data { .. }) => {
                ack(expected.wrapping_sub(1))?;
                in_window = 0;
            }
            Ok(Packet::Error { message, .. }) => {
                return Err(io::Error::other(
                    String::from_utf8_lossy(message).into_owned(),
                ))
            }
            _ => return Err(io::Error::other("unexpected packet")),
        }
    }
    if got != want {
        return Err(io::Error::other("wrong bytes"));
    }
    Ok(())
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
    let config = Arc::new(Config { ..*config });
    let clients: Vec<_> = (0..config.clients)
        .map(|_| {
            let (want, config) = (Arc::clone(want), Arc::clone(&config));
            thread::spawn(move || {
                for _ in 0..config.rounds {
                    fetch(addr, "vmlinuz", &want, &config).expect("fetch");
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
