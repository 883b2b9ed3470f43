//! The static file server from fbtftp's README, rewritten for dyntftp: serve a directory,
//! print every session's statistics and the server counters.
//!
//! ```text
//! cargo run --example static_files -- 127.0.0.1:1069 /var/tftproot
//! ```

use std::time::Duration;

use dyntftp::{
    FsHandler, Handler, ReadRequest, Reject, ResponseData, ServerBuilder, ServerStats, SessionStats,
};

/// Serves files through [`FsHandler`] (confined to the root) and prints statistics.
struct StaticHandler {
    files: FsHandler,
}

impl Handler for StaticHandler {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        self.files.open(request)
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        println!(
            "{} fetched {:?}: {} bytes, {} packets ({} resent), outcome {}",
            stats.peer,
            stats.filename,
            stats.transfer.bytes_read,
            stats.transfer.packets_sent,
            stats.transfer.packets_resent,
            stats.outcome.as_str()
        );
    }

    fn server_stats(&mut self, stats: &ServerStats) {
        println!("server stats over {:?}: {stats:?}", stats.interval);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:1069".into())
        .parse()?;
    let root = args.next().unwrap_or_else(|| ".".into());
    let mut server = ServerBuilder::new(StaticHandler {
        files: FsHandler::new(&root)?,
    })
    .bind(addr)
    .retries(3)
    .timeout(Duration::from_secs(5))
    .stats_interval(Duration::from_secs(60))
    .build()?;
    println!("serving {root} on {}", server.local_addr());
    server.run()?;
    Ok(())
}
