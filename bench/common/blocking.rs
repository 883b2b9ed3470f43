//! A [`ReadTransfer`] driven over a blocking `std` UDP socket: the client loop of the
//! benches that run their clients on threads.

use std::io;
use std::net::UdpSocket;
use std::ops::ControlFlow;
use std::time::Instant;

use dyntftp::client::{Event, ReadTransfer};

/// Runs `transfer` over `socket` until it ends (see [`ReadTransfer::outcome`]), receiving
/// into `buf` (65,536 bytes hold any datagram). `on_event` sees every event as it comes
/// and may [`abort`](ReadTransfer::abort) the transfer, or return `Break` to vanish: stop
/// at once and send nothing more.
///
/// The socket's read timeout is how long a silent server is waited for before the
/// transfer's timer is looked at: set it to about the client's timeout. Nothing here
/// allocates.
pub fn drive(
    socket: &UdpSocket,
    transfer: &mut ReadTransfer,
    buf: &mut [u8],
    mut on_event: impl FnMut(&mut ReadTransfer, Event<'_>) -> ControlFlow<()>,
) -> io::Result<()> {
    loop {
        if let Some(transmit) = transfer.poll_transmit() {
            socket.send_to(transmit.contents, transmit.destination)?;
        }
        if transfer.outcome().is_some() {
            return Ok(());
        }
        let received = socket.recv_from(buf);
        let now = Instant::now();
        match received {
            Ok((len, from)) => {
                if let Some(event) = transfer.handle_datagram(now, from, &buf[..len]) {
                    if on_event(transfer, event).is_break() {
                        return Ok(());
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
        if transfer.deadline().is_some_and(|deadline| now >= deadline) {
            transfer.handle_timeout(now);
        }
    }
}
