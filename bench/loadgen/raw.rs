//! Raw mode (`--raw`): plain UDP datagrams between two loopback sockets, the ceiling of
//! the machine for a datagram size.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dyntftp::packet::MAX_DATAGRAM;

use crate::cli::{Output, RawConfig};
use crate::report::{fixed3, Json};
use crate::sys::cpu_times;

pub fn run_raw(config: &RawConfig) -> io::Result<()> {
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sender = std::net::UdpSocket::bind("127.0.0.1:0")?;
    sender.connect(receiver.local_addr()?)?;
    receiver.connect(sender.local_addr()?)?;
    receiver.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_times();
    let start = Instant::now();

    let size = config.size;
    let recv_stop = stop.clone();
    let recv_thread = std::thread::spawn(move || -> io::Result<u64> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut received = 0u64;
        loop {
            match receiver.recv(&mut buf) {
                Ok(n) if n == size => received += 1,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // Quiet for 200 ms after the sender stopped: everything is in.
                    if recv_stop.load(Ordering::Relaxed) {
                        return Ok(received);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });

    let payload = vec![0xA5u8; size];
    let mut sent = 0u64;
    let mut send_errors = 0u64;
    let until = start + config.seconds;
    // Sending runs on this thread; the clock is read every 256 datagrams.
    'blast: loop {
        for _ in 0..256 {
            match sender.send(&payload) {
                Ok(_) => sent += 1,
                // ENOBUFS and the like: the datagram is lost, as on a real link.
                Err(_) => send_errors += 1,
            }
        }
        if Instant::now() >= until {
            break 'blast;
        }
    }
    let send_time = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let received = recv_thread
        .join()
        .map_err(|_| io::Error::other("receiver thread panicked"))??;
    let cpu = cpu_times() - cpu_before;

    let secs = send_time.as_secs_f64();
    let per_s = received as f64 / secs;
    let mb_per_s = received as f64 * size as f64 / secs / 1e6;
    let sent_per_s = sent as f64 / secs;
    let loss = if sent == 0 {
        0.0
    } else {
        1.0 - received as f64 / sent as f64
    };
    let cpu_pct = cpu.total() / secs * 100.0;
    if config.output == Output::Kv {
        println!(
            "mode=raw size={size} seconds={secs:.3} sent={sent} send_errors={send_errors} \
             received={received} sent_per_s={sent_per_s:.1} datagrams_per_s={per_s:.1} \
             payload_mb_per_s={mb_per_s:.3} loss_ratio={loss:.6} cpu_s={:.3} \
             cpu_pct={cpu_pct:.1}",
            cpu.total()
        );
    } else if config.output == Output::Json {
        let json = Json::object()
            .str("mode", "raw")
            .raw("size", size)
            .raw("seconds", fixed3(secs))
            .raw("threads", 2)
            .raw("sent", sent)
            .raw("send_errors", send_errors)
            .raw("received", received)
            .raw("sent_per_s", format!("{sent_per_s:.1}"))
            .raw("datagrams_per_s", format!("{per_s:.1}"))
            .raw("payload_mb_per_s", fixed3(mb_per_s))
            .raw("loss_ratio", format!("{loss:.6}"))
            .cpu(cpu, cpu_pct);
        println!("{}", json.end());
    } else {
        println!(
            "config: raw UDP over loopback, {size}-byte datagrams, {secs:.2} s, \
             sender and receiver threads"
        );
        println!("sent: {sent} ({sent_per_s:.0}/s, {send_errors} send errors)");
        println!("received datagrams/s: {per_s:.0}");
        println!("received payload MB/s: {mb_per_s:.2}");
        println!("loss ratio: {:.2}%", loss * 100.0);
        println!(
            "loadgen cpu: {:.3} s (user {:.3} s, sys {:.3} s) = {cpu_pct:.1}% of wall (2 threads)",
            cpu.total(),
            cpu.user,
            cpu.sys
        );
    }
    Ok(())
}
