//! UDP sockets beyond std: options set before `bind` (dual stack, SO_REUSEPORT,
//! destination-address reporting), session sockets bound (to a port of a list, or any)
//! and connected to their peer, an interface's MTU, buffer sizes, `recvmsg` that reports
//! the address a datagram was sent to, `sendmsg` from a chosen source address (PKTINFO)
//! and with UDP generic segmentation offload, and the conversions between std and C
//! socket addresses.

use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Creates a non-blocking, close-on-exec UDP socket bound to `addr`, with destination
/// address reporting enabled (IP_PKTINFO / IPV6_RECVPKTINFO). An unspecified IPv6 address
/// (`[::]`) is bound dual-stack (IPV6_V6ONLY off), so one socket serves IPv4 and IPv6.
/// With `reuse_port`, SO_REUSEPORT is set first: several such sockets share the address,
/// and the kernel hands each sender's datagrams to one of them, by a hash of the
/// addresses and ports.
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<UdpSocket> {
    let socket = new_socket(addr)?;
    let fd = socket.as_raw_fd();
    if reuse_port {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    match addr {
        SocketAddr::V4(_) => setsockopt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?,
        SocketAddr::V6(v6) => {
            let only = if v6.ip().is_unspecified() { 0 } else { 1 };
            setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, only)?;
            setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        }
    }
    bind(fd, addr)?;
    Ok(socket)
}

/// Creates a non-blocking, close-on-exec UDP socket bound to `addr` (port 0 for a new
/// ephemeral port: a session's transfer ID), connected to `peer`: the kernel delivers only `peer`'s
/// datagrams to it (anyone else's get the kernel's ICMP port unreachable), sends need no
/// address (and reuse a cached route), and an ICMP error from `peer` (port unreachable:
/// nobody listens there) comes back as `ECONNREFUSED` from the next receive or send. An
/// IPv4 peer of an IPv6 socket is connected to as an IPv4-mapped address.
pub fn bind_connected(addr: SocketAddr, peer: SocketAddr) -> io::Result<UdpSocket> {
    bind_connected_in(addr, [addr.port()], peer)
}

/// [`bind_connected`] on the first of `ports` free on `addr`'s address (`addr`'s own port
/// is ignored): one socket, a `bind` per port until one succeeds. A port in use
/// (`EADDRINUSE`) moves on to the next; any other error is returned at once. When every
/// port is in use (or `ports` is empty), the error is `EADDRINUSE`.
pub fn bind_connected_in(
    addr: SocketAddr,
    ports: impl IntoIterator<Item = u16>,
    peer: SocketAddr,
) -> io::Result<UdpSocket> {
    let socket = new_socket(addr)?;
    let fd = socket.as_raw_fd();
    let mut bound = false;
    for port in ports {
        let mut at = addr;
        at.set_port(port);
        match bind(fd, at) {
            Ok(()) => {
                bound = true;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
            Err(e) => return Err(e),
        }
    }
    if !bound {
        return Err(io::Error::from_raw_os_error(libc::EADDRINUSE));
    }
    socket.connect(peer_of_family(addr, peer))?;
    Ok(socket)
}

/// `peer` as a socket of `bound`'s family connects to it: an IPv4 peer of an IPv6 socket
/// as an IPv4-mapped address.
pub fn peer_of_family(bound: SocketAddr, peer: SocketAddr) -> SocketAddr {
    match (bound, peer) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (_, peer) => peer,
    }
}

/// Dissolves a UDP socket's association with its peer (`connect` to `AF_UNSPEC`). A
/// socket bound to port 0 also gives its port back: it receives nothing until it is
/// connected again, which binds it to a new random ephemeral port on the same address.
/// Datagrams queued before stay queued, and a pending error stays pending.
pub fn disconnect(socket: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: all-zero is a valid sockaddr; only its family (AF_UNSPEC, 0) is read.
    let unspecified: libc::sockaddr = unsafe { zeroed() };
    // SAFETY: `unspecified` is a sockaddr of the length given.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            &unspecified,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Enables destination-address reporting on an already bound socket (one handed to the
/// server pre-bound, e.g. by systemd). Errors are ignored by the caller: the listener's
/// own address is used then.
pub fn enable_pktinfo(socket: &UdpSocket) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    match socket.local_addr()? {
        SocketAddr::V4(_) => setsockopt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1),
        SocketAddr::V6(_) => setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1),
    }
}

/// The MTU of the network interface with index `ifindex`, in the network namespace of
/// `socket` (any socket: it only carries the requests), with the ioctls SIOCGIFNAME (the
/// interface's name) and SIOCGIFMTU. An unknown index is an error (`ENODEV`).
pub fn interface_mtu(socket: &impl AsRawFd, ifindex: u32) -> io::Result<u32> {
    let fd = socket.as_raw_fd();
    let index =
        libc::c_int::try_from(ifindex).map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))?;
    // SAFETY: all-zero is a valid ifreq (an empty name, a zero union).
    let mut request: libc::ifreq = unsafe { zeroed() };
    request.ifr_ifru.ifru_ifindex = index;
    // SAFETY: SIOCGIFNAME reads `ifr_ifindex` and writes a NUL-terminated name of at most
    // IFNAMSIZ bytes into `ifr_name` of the ifreq the pointer points to, which lives here.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFNAME as _, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU reads the name and writes `ifr_mtu` of the same live ifreq.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFMTU as _, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU, a c_int.
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Sets the socket's send buffer size (the kernel may clamp it).
pub fn set_send_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = bytes.min(i32::MAX as usize) as libc::c_int;
    setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, bytes)
}

/// One datagram received with [`recv_batch_with_destination`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Payload length.
    pub len: usize,
    /// The sender, with IPv4-mapped IPv6 addresses turned back into IPv4.
    pub peer: SocketAddr,
    /// The address the datagram was sent to, when the kernel reported it (IPv4-mapped
    /// turned into IPv4), and the interface index it arrived on.
    pub destination: Option<(IpAddr, u32)>,
    /// True when the datagram was longer than the buffer.
    pub truncated: bool,
}

/// Receives up to `bufs.len()` (at most [`MAX_BATCH`]) queued datagrams with one
/// `recvmmsg` call, without waiting, each with its sender and destination address:
/// datagram `i` goes into `bufs[i]` and what is known of it into `got[i]`. Returns how
/// many came; fewer than asked means the queue was empty when the call returned (a
/// datagram that arrives later wakes an edge-triggered poll again). `WouldBlock` when
/// none was queued.
pub fn recv_batch_with_destination(
    socket: &impl AsRawFd,
    bufs: &mut [Vec<u8>],
    got: &mut [Option<Received>],
) -> io::Result<usize> {
    let count = bufs.len().min(got.len()).min(MAX_BATCH);
    // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero
    // bytes are a valid value.
    let mut names: [libc::sockaddr_storage; MAX_BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    // 128 bytes per datagram, 8-aligned: room for one PKTINFO control message.
    let mut controls = [[MaybeUninit::<u64>::uninit(); 16]; MAX_BATCH];
    for i in 0..count {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: bufs[i].len(),
        };
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        hdr.msg_control = controls[i].as_mut_ptr().cast();
        hdr.msg_controllen = size_of_val(&controls[i]) as _;
    }
    // SAFETY: the first `count` headers point to live buffers (names, iovecs, `bufs`,
    // control buffers) of the lengths given with them; no timeout is passed.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            count as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for i in 0..n {
        let hdr = &msgs[i].msg_hdr;
        got[i] = sockaddr_to_std(&names[i]).map(|peer| Received {
            len: (msgs[i].msg_len as usize).min(bufs[i].len()),
            peer: unmap_socket(peer),
            destination: destination_of(hdr),
            truncated: hdr.msg_flags & libc::MSG_TRUNC != 0,
        });
    }
    Ok(n)
}

/// The most datagrams [`recv_batch_with_destination`] takes, and [`send_batch_from`]
/// sends, with one call.
pub const MAX_BATCH: usize = 32;

/// The destination address and interface a received message's PKTINFO control message
/// reports, IPv4-mapped turned into IPv4.
fn destination_of(msg: &libc::msghdr) -> Option<(IpAddr, u32)> {
    let mut destination = None;
    // SAFETY: `msg` was filled by the kernel; the CMSG macros walk its control buffer
    // within msg_controllen, and each data pointer is read unaligned with the size the
    // level and type promise.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if header.cmsg_level == libc::IPPROTO_IP && header.cmsg_type == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                let ip = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                destination = Some((IpAddr::V4(ip), info.ipi_ifindex as u32));
            } else if header.cmsg_level == libc::IPPROTO_IPV6
                && header.cmsg_type == libc::IPV6_PKTINFO
            {
                let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                destination = Some((unmap(IpAddr::V6(ip)), info.ipi6_ifindex));
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    destination
}

/// Sends `buf` to `peer` from `socket`, with source address `source` (and its interface)
/// when given: how a listener bound to a wildcard address answers from the address a
/// client sent to (IP_PKTINFO / IPV6_PKTINFO). On an IPv6 socket an IPv4 peer and source
/// are sent as IPv4-mapped addresses (a dual-stack socket). With `segment`, `buf` goes
/// out as datagrams of that many bytes, as with [`send_segments`].
pub fn send_from(
    socket: &impl AsRawFd,
    v6_socket: bool,
    buf: &[u8],
    peer: SocketAddr,
    source: Option<(IpAddr, u32)>,
    segment: Option<u16>,
) -> io::Result<usize> {
    let (peer, pktinfo) = addressing(v6_socket, peer, source)?;
    send_msg(socket, buf, Some(peer), pktinfo, segment)
}

/// One datagram of a [`send_batch_from`]: its bytes, its peer and its source address.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    /// The datagram.
    pub buf: &'a [u8],
    /// Where it goes.
    pub peer: SocketAddr,
    /// The source address (and interface) it is sent from, as for [`send_from`].
    pub source: Option<(IpAddr, u32)>,
}

/// Sends up to [`MAX_BATCH`] datagrams, each as [`send_from`] would, with one `sendmmsg`.
/// Returns how many went, from the first: fewer than given when the next one failed (its
/// error comes back when it is the first of a call). An error only when the first one
/// failed.
pub fn send_batch_from<'a>(
    socket: &impl AsRawFd,
    v6_socket: bool,
    datagrams: impl IntoIterator<Item = Outgoing<'a>>,
) -> io::Result<usize> {
    // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero
    // bytes are a valid value.
    let mut names: [(libc::sockaddr_storage, libc::socklen_t); MAX_BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    let mut controls = [[MaybeUninit::<u64>::uninit(); CONTROL_WORDS]; MAX_BATCH];
    let mut count = 0;
    for datagram in datagrams.into_iter().take(MAX_BATCH) {
        let (peer, pktinfo) = match addressing(v6_socket, datagram.peer, datagram.source) {
            Ok(addressing) => addressing,
            Err(e) if count == 0 => return Err(e),
            Err(_) => break,
        };
        let i = count;
        count += 1;
        names[i] = std_to_sockaddr(peer);
        iovs[i] = libc::iovec {
            iov_base: datagram.buf.as_ptr() as *mut libc::c_void,
            iov_len: datagram.buf.len(),
        };
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&mut names[i].0 as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = names[i].1;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        set_control(hdr, &mut controls[i], pktinfo, None);
    }
    // SAFETY: the first `count` headers point to live buffers (names, iovecs, the
    // datagrams, control buffers) of the lengths given with them.
    let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), count as _, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends `buf` to `peer` (`None`: the peer a connected socket is connected to, which
/// spares the kernel a route lookup) as several datagrams of `segment` bytes (the last may
/// be shorter) in one system call, with UDP generic segmentation offload (UDP_SEGMENT,
/// Linux 4.18+): the kernel cuts the buffer into datagrams, on the way out or, on
/// loopback, on the way in. Errors such as `EIO`, `EINVAL` or `ENOPROTOOPT` mean the
/// kernel or device cannot: the caller then sends the datagrams one by one.
pub fn send_segments(
    socket: &impl AsRawFd,
    buf: &[u8],
    segment: u16,
    peer: Option<SocketAddr>,
) -> io::Result<usize> {
    send_msg(socket, buf, peer, None, Some(segment))
}

/// A source address for a send, as a control message.
#[derive(Clone, Copy)]
enum Pktinfo {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

/// The peer as `socket` (IPv6 or not) takes it, and the PKTINFO for `source`: on an IPv6
/// socket, IPv4 addresses become IPv4-mapped ones.
fn addressing(
    v6_socket: bool,
    peer: SocketAddr,
    source: Option<(IpAddr, u32)>,
) -> io::Result<(SocketAddr, Option<Pktinfo>)> {
    let peer = match (v6_socket, peer) {
        (true, SocketAddr::V4(v4)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (_, peer) => peer,
    };
    let pktinfo = match (source, v6_socket) {
        (None, _) => None,
        (Some((ip, ifindex)), true) => {
            let ip6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            Some(Pktinfo::V6(libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip6.octets(),
                },
                ipi6_ifindex: if ip.is_ipv4() { 0 } else { ifindex },
            }))
        }
        (Some((IpAddr::V4(v4), _)), false) => Some(Pktinfo::V4(libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(v4).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        })),
        (Some((IpAddr::V6(_), _)), false) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "IPv6 source on an IPv4 socket",
            ))
        }
    };
    Ok((peer, pktinfo))
}

/// 8-byte words of a send's control buffer: 80 bytes, room for a PKTINFO and a
/// UDP_SEGMENT message.
const CONTROL_WORDS: usize = 10;

/// Writes the control messages of a send (a PKTINFO, a UDP_SEGMENT) into `control` and
/// points `msg` at them; nothing when there are none.
fn set_control(
    msg: &mut libc::msghdr,
    control: &mut [MaybeUninit<u64>; CONTROL_WORDS],
    pktinfo: Option<Pktinfo>,
    segment: Option<u16>,
) {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = |len: usize| unsafe { libc::CMSG_SPACE(len as u32) } as usize;
    let first = match pktinfo {
        None => 0,
        Some(Pktinfo::V4(_)) => space(size_of::<libc::in_pktinfo>()),
        Some(Pktinfo::V6(_)) => space(size_of::<libc::in6_pktinfo>()),
    };
    let total = first + segment.map_or(0, |_| space(size_of::<u16>()));
    if total == 0 {
        return;
    }
    assert!(total <= size_of_val(control), "control messages too large");
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = total as _;
    // Zeroed, so that CMSG_NXTHDR reads a defined length in the second header.
    // SAFETY: the buffer holds at least `total` bytes.
    unsafe { std::ptr::write_bytes(control.as_mut_ptr().cast::<u8>(), 0, total) };
    // SAFETY: the control buffer holds `total` bytes (checked above), room for the
    // cmsghdrs and their data; CMSG_FIRSTHDR and CMSG_NXTHDR stay within
    // `msg_controllen`, and each header is filled before the next is looked up.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(msg);
        match pktinfo {
            Some(Pktinfo::V4(info)) => {
                put_cmsg(header, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
                header = libc::CMSG_NXTHDR(msg, header);
            }
            Some(Pktinfo::V6(info)) => {
                put_cmsg(header, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
                header = libc::CMSG_NXTHDR(msg, header);
            }
            None => {}
        }
        if let Some(segment) = segment {
            put_cmsg(header, libc::SOL_UDP, libc::UDP_SEGMENT, segment);
        }
    }
}

/// Fills one control message header and its data (written unaligned, with the size
/// CMSG_LEN announces).
///
/// # Safety
///
/// `header` must point to a control buffer with room for the header and `T`.
unsafe fn put_cmsg<T: Copy>(
    header: *mut libc::cmsghdr,
    level: libc::c_int,
    kind: libc::c_int,
    data: T,
) {
    // SAFETY: the caller promises room for the header and its data.
    unsafe {
        (*header).cmsg_level = level;
        (*header).cmsg_type = kind;
        (*header).cmsg_len = libc::CMSG_LEN(size_of::<T>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<T>(), data);
    }
}

/// `sendmsg` of `buf` to `peer` (`None`: a connected socket's peer) with a PKTINFO
/// control message and, with `segment`, a UDP_SEGMENT one.
fn send_msg(
    socket: &impl AsRawFd,
    buf: &[u8],
    peer: Option<SocketAddr>,
    pktinfo: Option<Pktinfo>,
    segment: Option<u16>,
) -> io::Result<usize> {
    let mut control = [MaybeUninit::<u64>::uninit(); CONTROL_WORDS];
    let mut named = peer.map(std_to_sockaddr);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    if let Some((storage, name_len)) = named.as_mut() {
        msg.msg_name = (storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = *name_len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    set_control(&mut msg, &mut control, pktinfo, segment);
    // SAFETY: every pointer in `msg` points to a live buffer of the length given with it.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sets the socket's receive buffer size: beyond `net.core.rmem_max` when the process may
/// (SO_RCVBUFFORCE, with CAP_NET_ADMIN: dyntftpd binds before dropping privileges), else
/// as much as that limit allows.
pub fn set_recv_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    let fd = socket.as_raw_fd();
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as IPv4; anything else unchanged.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// [`unmap`] for a socket address (the port is kept).
pub fn unmap_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(unmap(addr.ip()), addr.port())
}

fn new_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    Ok(unsafe { UdpSocket::from_raw_fd(fd) })
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int whose address and size are passed together.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = std_to_sockaddr(addr);
    // SAFETY: `storage` holds a sockaddr of the family of `addr`, `len` bytes long.
    let rc = unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn std_to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Receives one datagram into `buf`, waiting at most 5 s for it.
    fn wait_recv(socket: &UdpSocket, buf: &mut [u8]) -> Received {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut bufs = vec![vec![0u8; buf.len()]];
        let mut got = [None];
        loop {
            match recv_batch_with_destination(socket, &mut bufs, &mut got) {
                Ok(1) => {
                    let r = got[0].expect("an IP sender");
                    buf[..r.len].copy_from_slice(&bufs[0][..r.len]);
                    return r;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => panic!("no datagram within the timeout: {other:?}"),
            }
        }
    }

    #[test]
    fn a_batch_takes_what_is_queued_in_order_with_each_destination() {
        // The wildcard address: 127.0.0.2 reaches it too.
        let listener = bind_listener("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = ["127.0.0.1", "127.0.0.2", "127.0.0.1"];
        for (i, to) in sent.iter().enumerate() {
            client.send_to(&[i as u8; 3], (*to, port)).unwrap();
        }
        let mut bufs = vec![vec![0u8; 16]; 8];
        let mut got = [None; 8];
        let mut received = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while received.len() < sent.len() && std::time::Instant::now() < deadline {
            match recv_batch_with_destination(&listener, &mut bufs, &mut got) {
                Ok(n) => {
                    for (buf, r) in bufs.iter().zip(&got).take(n) {
                        let r = r.expect("an IP sender");
                        received.push((buf[0], r.destination.unwrap().0, r.len));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<(u8, IpAddr, usize)> = sent
            .iter()
            .enumerate()
            .map(|(i, to)| (i as u8, to.parse().unwrap(), 3))
            .collect();
        assert_eq!(received, want);
        let e = recv_batch_with_destination(&listener, &mut bufs, &mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn ipv4_listener_reports_destination() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .send_to(b"hello", listener.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 16];
        let r = wait_recv(&listener, &mut buf);
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.peer, client.local_addr().unwrap());
        assert_eq!(
            r.destination.map(|d| d.0),
            Some("127.0.0.1".parse().unwrap())
        );
        assert!(!r.truncated);
    }

    #[test]
    fn dual_stack_listener_unmaps_ipv4_and_reports_the_real_destination() {
        let listener = match bind_listener("[::]:0".parse().unwrap(), false) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: no IPv6 here ({e})");
                return;
            }
        };
        let port = listener.local_addr().unwrap().port();
        // 127.0.0.2 is a loopback address too: the reply must come from it, not .1.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", ("127.0.0.2", port)).unwrap();
        let mut buf = [0u8; 16];
        let r = wait_recv(&listener, &mut buf);
        assert_eq!(r.peer, client.local_addr().unwrap());
        assert_eq!(
            r.destination.map(|d| d.0),
            Some("127.0.0.2".parse().unwrap())
        );
        let session = UdpSocket::bind(SocketAddr::new(r.destination.unwrap().0, 0)).unwrap();
        assert_eq!(session.local_addr().unwrap().ip().to_string(), "127.0.0.2");
    }

    #[test]
    fn segments_arrive_as_separate_datagrams() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = Vec::new();
        for i in 0..5u8 {
            buf.extend(std::iter::repeat_n(i, if i == 4 { 30 } else { 100 }));
        }
        match send_segments(&sender, &buf, 100, Some(receiver.local_addr().unwrap())) {
            Ok(n) => assert_eq!(n, buf.len()),
            Err(e) => {
                eprintln!("SKIPPED: no UDP GSO here: {e}");
                return;
            }
        }
        let mut got = [0u8; 200];
        for i in 0..5u8 {
            let n = receiver.recv(&mut got).unwrap();
            let want = if i == 4 { 30 } else { 100 };
            assert_eq!(&got[..n], vec![i; want].as_slice(), "datagram {i}");
        }
        // The same from a connected socket, without an address.
        let connected = bind_connected(
            "127.0.0.1:0".parse().unwrap(),
            receiver.local_addr().unwrap(),
        )
        .unwrap();
        assert_eq!(
            send_segments(&connected, &buf, 100, None).unwrap(),
            buf.len()
        );
        for i in 0..5u8 {
            let (n, from) = receiver.recv_from(&mut got).unwrap();
            assert_eq!(from, connected.local_addr().unwrap());
            assert_eq!(got[..n][0], i, "datagram {i}");
        }
    }

    #[test]
    fn a_connected_socket_hears_only_its_peer_and_reports_a_closed_port() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        let session =
            bind_connected("127.0.0.1:0".parse().unwrap(), peer.local_addr().unwrap()).unwrap();
        session.set_nonblocking(false).unwrap();
        session
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let to = session.local_addr().unwrap();
        // The stranger's datagram is dropped by the kernel; the peer's, sent after it,
        // is the first to arrive.
        stranger.send_to(b"stranger", to).unwrap();
        peer.send_to(b"peer", to).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = session.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"peer"[..], peer.local_addr().unwrap())
        );
        // The peer goes away: the next send draws an ICMP port unreachable, which the
        // following receive reports (and the socket forgets).
        drop(peer);
        session.send(b"anyone there?").unwrap();
        let e = session.recv(&mut buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
    }

    #[test]
    fn a_disconnected_socket_gives_its_port_back_and_connects_again_on_a_new_one() {
        let first = UdpSocket::bind("127.0.0.1:0").unwrap();
        let second = UdpSocket::bind("127.0.0.1:0").unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let session =
            bind_connected("127.0.0.2:0".parse().unwrap(), first.local_addr().unwrap()).unwrap();
        let old = session.local_addr().unwrap();
        first.send_to(b"queued", old).unwrap();
        disconnect(&session).unwrap();
        // No port any more: nothing can reach it. What was queued stays queued.
        assert_eq!(
            session.local_addr().unwrap(),
            "127.0.0.2:0".parse().unwrap()
        );
        let mut buf = [0u8; 16];
        session.set_nonblocking(false).unwrap();
        session
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(session.recv(&mut buf).unwrap(), 6);
        // Connected again: a new ephemeral port on the address it was bound to.
        session.connect(second.local_addr().unwrap()).unwrap();
        let new = session.local_addr().unwrap();
        assert_eq!(new.ip(), old.ip());
        assert_ne!(new.port(), 0);
        session.send(b"hello").unwrap();
        let (n, from) = second.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], new));
    }

    #[test]
    fn an_ipv4_peer_of_a_dual_stack_socket_is_connected_mapped() {
        let session =
            match bind_connected("[::]:0".parse().unwrap(), "127.0.0.1:9".parse().unwrap()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("SKIPPED: no IPv6 here ({e})");
                    return;
                }
            };
        assert_eq!(
            session.peer_addr().unwrap(),
            "[::ffff:127.0.0.1]:9".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn segments_from_a_chosen_source_address() {
        let listener = bind_listener("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = listener.local_addr().unwrap().port();
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let buf: Vec<u8> = (0..250u32).map(|i| (i / 100) as u8).collect();
        let source = Some(("127.0.0.2".parse().unwrap(), 0));
        let to = receiver.local_addr().unwrap();
        match send_from(&listener, false, &buf, to, source, Some(100)) {
            Ok(n) => assert_eq!(n, buf.len()),
            Err(e) => {
                eprintln!("SKIPPED: no UDP GSO here: {e}");
                return;
            }
        }
        let mut got = [0u8; 200];
        for (i, want) in [100, 100, 50].into_iter().enumerate() {
            let (n, from) = receiver.recv_from(&mut got).unwrap();
            assert_eq!(from, SocketAddr::from(([127, 0, 0, 2], port)));
            assert_eq!(&got[..n], vec![i as u8; want].as_slice(), "datagram {i}");
        }
    }

    #[test]
    fn a_batch_goes_to_each_peer_from_its_source_address() {
        let listener = bind_listener("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = listener.local_addr().unwrap().port();
        let receivers: Vec<UdpSocket> = (0..2)
            .map(|_| {
                let r = UdpSocket::bind("127.0.0.1:0").unwrap();
                r.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                r
            })
            .collect();
        let to = |i: usize| receivers[i].local_addr().unwrap();
        let from = |last: u8| Some((IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0));
        let batch = [
            Outgoing {
                buf: b"one",
                peer: to(0),
                source: from(2),
            },
            Outgoing {
                buf: b"two",
                peer: to(1),
                source: from(3),
            },
            Outgoing {
                buf: b"three",
                peer: to(0),
                source: None,
            },
        ];
        assert_eq!(send_batch_from(&listener, false, batch).unwrap(), 3);
        let mut got = [0u8; 16];
        let mut next = |i: usize| {
            let (n, from) = receivers[i].recv_from(&mut got).unwrap();
            (got[..n].to_vec(), from)
        };
        let at = |ip: [u8; 4]| SocketAddr::from((ip, port));
        assert_eq!(next(0), (b"one".to_vec(), at([127, 0, 0, 2])));
        assert_eq!(next(1), (b"two".to_vec(), at([127, 0, 0, 3])));
        // No source given: the kernel picks the route's, 127.0.0.1 on loopback.
        assert_eq!(next(0), (b"three".to_vec(), at([127, 0, 0, 1])));
    }

    #[test]
    fn a_batch_stops_before_a_datagram_it_cannot_address() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let v6_source = Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 0));
        let good = Outgoing {
            buf: b"good",
            peer: to,
            source: None,
        };
        let bad = Outgoing {
            buf: b"bad",
            peer: to,
            source: v6_source,
        };
        assert_eq!(
            send_batch_from(&listener, false, [good, bad, good]).unwrap(),
            1
        );
        let e = send_batch_from(&listener, false, [bad, good]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_session_socket_takes_the_first_free_port_of_a_list() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let taken = UdpSocket::bind(any).unwrap();
        let free = UdpSocket::bind(any).unwrap();
        let (taken_port, free_port) = (
            taken.local_addr().unwrap().port(),
            free.local_addr().unwrap().port(),
        );
        drop(free);
        let session = bind_connected_in(any, [taken_port, free_port], peer).unwrap();
        assert_eq!(session.local_addr().unwrap().port(), free_port);
        // Every port in use: EADDRINUSE, also for no port at all.
        let e = bind_connected_in(any, [taken_port, free_port], peer).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
        let e = bind_connected_in(any, [], peer).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
    }

    #[test]
    fn the_loopback_interface_has_an_mtu_and_index_zero_none() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(socket) = UdpSocket::bind(addr) else {
                eprintln!("SKIPPED: cannot bind {addr}");
                continue;
            };
            // Loopback is interface 1 on Linux; its MTU is 65536 unless changed, and
            // never below IPv6's minimum.
            let mtu = interface_mtu(&socket, 1).unwrap();
            assert!(mtu >= 1280, "{mtu}");
            let e = interface_mtu(&socket, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
            assert!(interface_mtu(&socket, u32::MAX).is_err());
        }
    }

    #[test]
    fn truncation_is_reported() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .send_to(&[1u8; 100], listener.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 10];
        assert!(wait_recv(&listener, &mut buf).truncated);
    }
}
