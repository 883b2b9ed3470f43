//! `--shared-socket`: one socket for every client, batched with `recvmmsg`/`sendmmsg`,
//! each transfer on its own loopback address chosen per datagram with `IP_PKTINFO`.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use dyntftp::packet::MAX_DATAGRAM;
use mio::net::UdpSocket;
use mio::{Interest, Poll, Token};

use crate::sys::{set_int_option, set_rcvbuf};

/// Poll token of the shared socket (client slots use their index).
pub const SHARED_TOKEN: Token = Token(usize::MAX);

/// Receive buffer asked for on the shared socket (at least): it holds every client's
/// replies.
pub const SHARED_RCVBUF: usize = 16 << 20;

/// Datagrams one `recvmmsg` or `sendmmsg` moves at most.
const BATCH: usize = 64;

/// First and last loopback addresses handed to transfers: 127.1.0.1 to 127.254.255.254,
/// skipping every address that ends in .0 or .255.
const SHARED_FIRST: u32 = 0x7F01_0001;
const SHARED_LAST: u32 = 0x7FFE_FFFE;

/// One socket on the IPv4 wildcard address carries every client: each transfer sends
/// from its own loopback address (chosen per datagram with `IP_PKTINFO`), so the server
/// sees a distinct client per transfer, as it would from distinct machines, and the
/// replies are told apart by the address they were sent to. Datagrams move in batches
/// (`recvmmsg`, `sendmmsg`): a client that costs few system calls per transfer.
pub struct SharedSocket {
    pub socket: UdpSocket,
    /// Client slots by the address of their current transfer.
    pub by_addr: HashMap<Ipv4Addr, usize>,
    /// The next address to hand out.
    next_addr: u32,
    pub batch: RxBatch,
}

impl SharedSocket {
    pub fn open(poll: &Poll, rcvbuf: usize) -> io::Result<SharedSocket> {
        let mut socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
        set_rcvbuf(&socket, rcvbuf);
        set_int_option(&socket, libc::SOL_SOCKET, libc::SO_SNDBUF, SHARED_RCVBUF)?;
        set_int_option(&socket, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        poll.registry()
            .register(&mut socket, SHARED_TOKEN, Interest::READABLE)?;
        Ok(SharedSocket {
            socket,
            by_addr: HashMap::new(),
            next_addr: SHARED_FIRST,
            batch: RxBatch::new(),
        })
    }

    /// A loopback address no running transfer uses, now slot `id`'s. Addresses are used
    /// in turn (16 million of them), so a late datagram for an ended transfer finds no
    /// client rather than the next transfer.
    pub fn claim(&mut self, id: usize) -> Ipv4Addr {
        loop {
            let addr = self.next_addr;
            self.next_addr = if addr >= SHARED_LAST {
                SHARED_FIRST
            } else {
                addr + 1
            };
            let ip = Ipv4Addr::from(addr);
            if matches!(addr & 0xFF, 0 | 0xFF) || self.by_addr.contains_key(&ip) {
                continue;
            }
            self.by_addr.insert(ip, id);
            return ip;
        }
    }
}

/// Space for one control message carrying an `in_pktinfo` (aligned for `cmsghdr`).
type PktinfoCmsg = [u64; 4];

/// Buffers of one `recvmmsg` call. The default is empty (taken out of the shared socket
/// while its datagrams are handled); [`RxBatch::new`] allocates.
#[derive(Default)]
pub struct RxBatch {
    /// `BATCH` datagrams of up to `MAX_DATAGRAM` bytes, back to back.
    bufs: Vec<u8>,
    m: Mmsg,
}

impl RxBatch {
    fn new() -> RxBatch {
        RxBatch {
            bufs: vec![0; BATCH * MAX_DATAGRAM],
            m: Mmsg {
                // SAFETY: `sockaddr_in` is plain data for which all-zero bytes are valid.
                names: vec![unsafe { std::mem::zeroed() }; BATCH],
                controls: vec![[0; 4]; BATCH],
                iovs: Vec::with_capacity(BATCH),
                headers: Vec::with_capacity(BATCH),
            },
        }
    }

    /// Receives up to `BATCH` datagrams without blocking; `WouldBlock` when none.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.m.iovs.clear();
        for chunk in self.bufs.chunks_exact_mut(MAX_DATAGRAM) {
            self.m.iovs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            });
        }
        self.m.fill_headers(std::mem::size_of::<PktinfoCmsg>());
        // SAFETY: every header points into `names`, `iovs`, `controls` and `bufs`, which
        // are neither moved nor resized until the call returns; the lengths given are
        // those of the buffers.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.m.headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Datagram `i` of the last batch: its bytes, its source and the address it was sent
    /// to (from `IP_PKTINFO`).
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr, Option<Ipv4Addr>) {
        let hdr = &self.m.headers[i];
        let len = (hdr.msg_len as usize).min(MAX_DATAGRAM);
        let data = &self.bufs[i * MAX_DATAGRAM..][..len];
        let name = &self.m.names[i];
        let from = SocketAddr::from((
            Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
            u16::from_be(name.sin_port),
        ));
        let mut to = None;
        // SAFETY: the header's control fields describe `controls[i]`, as filled in by the
        // kernel; CMSG_FIRSTHDR/NXTHDR stay within `msg_controllen`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&hdr.msg_hdr);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IP && (*cmsg).cmsg_type == libc::IP_PKTINFO {
                    let info: libc::in_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    to = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
                }
                cmsg = libc::CMSG_NXTHDR(&hdr.msg_hdr, cmsg);
            }
        }
        (data, from, to)
    }
}

/// The arrays behind one `recvmmsg` or `sendmmsg` call: an address, a control buffer,
/// one `iovec` and a header per datagram.
#[derive(Default)]
struct Mmsg {
    names: Vec<libc::sockaddr_in>,
    controls: Vec<PktinfoCmsg>,
    iovs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl Mmsg {
    /// Sets `headers` to one `mmsghdr` per entry of `names`, `iovs` and `controls` (of
    /// equal lengths), each with one buffer and `control_len` bytes of control data. The
    /// headers point into the other arrays: those must not change until the system call.
    fn fill_headers(&mut self, control_len: usize) {
        self.headers.clear();
        let entries = self
            .names
            .iter_mut()
            .zip(&mut self.iovs)
            .zip(&mut self.controls);
        for ((name, iov), control) in entries {
            // SAFETY: `msghdr` is plain data for which all-zero bytes are valid.
            let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
            hdr.msg_name = (name as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = iov;
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = control_len;
            self.headers.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
    }
}

/// Datagrams queued by shared-socket clients, sent in batches.
#[derive(Default)]
pub struct Outbox {
    /// Destination, source address and the range of the datagram in `bytes`.
    queued: Vec<(SocketAddrV4, Ipv4Addr, std::ops::Range<usize>)>,
    bytes: Vec<u8>,
    m: Mmsg,
}

impl Outbox {
    /// Queues `datagram` from `from` (a loopback address) to `to`. Only IPv4 servers reach
    /// here (checked with the flags).
    pub fn queue(&mut self, datagram: &[u8], from: Ipv4Addr, to: SocketAddr) {
        let SocketAddr::V4(to) = to else {
            return;
        };
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.queued.push((to, from, start..self.bytes.len()));
    }

    /// Sends everything queued, `BATCH` datagrams per `sendmmsg`. A datagram the kernel
    /// refuses for want of buffer space is lost, as on a real link (the timers recover):
    /// returns how many were. Other errors end the run.
    pub fn send_all(&mut self, socket: &UdpSocket) -> io::Result<u64> {
        use std::os::fd::AsRawFd;
        let mut lost = 0;
        let mut next = 0;
        while next < self.queued.len() {
            let chunk = &self.queued[next..self.queued.len().min(next + BATCH)];
            self.m.names.clear();
            self.m.controls.clear();
            self.m.iovs.clear();
            for (to, from, range) in chunk {
                // SAFETY: `sockaddr_in` is plain data for which all-zero bytes are valid.
                let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                name.sin_family = libc::AF_INET as libc::sa_family_t;
                name.sin_port = to.port().to_be();
                name.sin_addr.s_addr = u32::from(*to.ip()).to_be();
                self.m.names.push(name);
                let mut control: PktinfoCmsg = [0; 4];
                // SAFETY: `control` is aligned for `cmsghdr` and large enough for one
                // header and an `in_pktinfo` (CMSG_SPACE(12) = 32 bytes on Linux).
                unsafe {
                    let cmsg = control.as_mut_ptr().cast::<libc::cmsghdr>();
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    (*cmsg).cmsg_len =
                        libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(*from).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                }
                self.m.controls.push(control);
                self.m.iovs.push(libc::iovec {
                    iov_base: self.bytes[range.clone()].as_ptr() as *mut libc::c_void,
                    iov_len: range.len(),
                });
            }
            // SAFETY: pure arithmetic on a length.
            let control_len =
                unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) };
            self.m.fill_headers(control_len as usize);
            // SAFETY: every header points into `names`, `iovs`, `controls` and `bytes`,
            // which are neither moved nor resized until the call returns; the datagram
            // bytes are only read.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.m.headers.as_mut_ptr(),
                    self.m.headers.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        // The first datagram of the chunk is lost; go on after it.
                        lost += 1;
                        next += 1;
                    }
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            } else {
                next += sent as usize;
            }
        }
        self.queued.clear();
        self.bytes.clear();
        Ok(lost)
    }
}
