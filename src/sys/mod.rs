//! The system calls std does not offer, over libc, each behind a safe function: every
//! `unsafe` block of the library is in this module, next to its `// SAFETY:` comment.
//!
//! - [`net`]: UDP sockets with options set before `bind` (dual stack, SO_REUSEPORT,
//!   IP_PKTINFO / IPV6_RECVPKTINFO), buffer sizes, `recvmsg` that reports the address a
//!   datagram was sent to, `sendmsg` from a chosen source address and with UDP generic
//!   segmentation offload (UDP_SEGMENT), session sockets bound in a list of ports, an
//!   interface's MTU (SIOCGIFMTU).
//! - [`fs`]: `openat`, `openat2`, `fstatat` and `fdopendir`/`readdir` relative to a
//!   directory descriptor, for the confinement in `crate::fs`.
//! - [`process`]: the file-descriptor limit.
//! - [`neigh`]: the kernel's neighbour table (ARP, NDP) over rtnetlink, for `crate::mac`.
//! - [`timer`]: a one-shot `timerfd`, for waits finer than a poll timeout's milliseconds.
//!
//! No policy, no mio and no clock here: the driver (`server`) wraps these sockets, and
//! `crate::fs` decides what may be opened. Everything is re-exported at this level, so
//! callers write `sys::bind_listener` or `sys::openat2`.

mod fs;
mod neigh;
mod net;
mod process;
mod timer;

pub use fs::{for_each_entry, lstat_at, openat, openat2};
pub use neigh::for_each_neighbour;
pub use net::{
    bind_connected, bind_connected_in, bind_listener, disconnect, enable_pktinfo, interface_mtu,
    peer_of_family, recv_batch_with_destination, send_batch_from, send_from, send_segments,
    set_recv_buffer, set_send_buffer, unmap, unmap_socket, Outgoing, Received, MAX_BATCH,
};
pub use process::raise_fd_limit;
pub use timer::{read_timer, set_timer, timer_fd};

#[cfg(test)]
pub use fs::{mkfifo, mknod_char};
#[cfg(test)]
pub use process::running_as_root;
