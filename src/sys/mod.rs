//! The socket and process calls std does not offer, over libc, each behind a safe
//! function with the `unsafe` blocks and their `// SAFETY:` comments inside.
//!
//! - [`net`]: UDP sockets with options set before `bind` (dual stack, SO_REUSEPORT,
//!   IP_PKTINFO / IPV6_RECVPKTINFO), buffer sizes, `recvmsg` that reports the address a
//!   datagram was sent to, `sendmsg` from a chosen source address and with UDP generic
//!   segmentation offload (UDP_SEGMENT).
//! - [`process`]: the file-descriptor limit.
//!
//! No policy, no mio and no clock here: the driver (`server`) wraps these sockets.
//! Everything is re-exported at this level, so callers write `sys::bind_listener`.

mod net;
mod process;

pub use net::{
    bind_ephemeral, bind_listener, enable_pktinfo, recv_with_destination, send_from, send_segments,
    set_recv_buffer, set_send_buffer, unmap, unmap_socket, Received,
};
pub use process::raise_fd_limit;
