//! The kernel's neighbour table (ARP for IPv4, NDP for IPv6) over rtnetlink: one
//! `RTM_GETNEIGH` dump request for one address family, its answer read into a bounded
//! buffer with a receive timeout, each entry handed to a visitor. No policy here: which
//! entries count (states, link-layer address lengths) is `crate::mac`'s decision.
//!
//! Bounds: one socket and one request per call; at most [`MAX_DATAGRAMS`] datagrams of
//! at most [`RECV_BUFFER`] bytes each (about 20,000 entries) are read, and a call waits
//! at most [`RECV_TIMEOUT`] for each of them; past either bound the call fails rather
//! than report part of the table.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The receive buffer: the kernel fills a dump datagram up to the largest buffer a
/// reader offered, capped at 32 KiB.
pub const RECV_BUFFER: usize = 32 * 1024;
/// The most datagrams one dump may take before the call gives up.
pub const MAX_DATAGRAMS: usize = 64;
/// How long one receive may wait (the kernel answers a dump at once; this bounds a stuck
/// socket).
pub const RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// The request's sequence number; replies carry it back.
const SEQUENCE: u32 = 1;
/// `sizeof(struct nlmsghdr)`.
const HEADER_LEN: usize = 16;
/// `sizeof(struct ndmsg)`.
const NDMSG_LEN: usize = 12;
/// `sizeof(struct rtattr)`.
const ATTR_HEADER_LEN: usize = 4;

/// One entry of the neighbour table, borrowed from the datagram it came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour<'a> {
    /// The interface index.
    pub ifindex: i32,
    /// The NUD state bits (`NUD_REACHABLE`, `NUD_STALE`, …).
    pub state: u16,
    /// The `NTF_*` flags (`NTF_PROXY`, `NTF_ROUTER`, …).
    pub flags: u8,
    /// The neighbour's network address (`NDA_DST`: 4 or 16 bytes), if present.
    pub destination: Option<&'a [u8]>,
    /// Its link-layer address (`NDA_LLADDR`: 6 bytes on Ethernet), if present.
    pub link_address: Option<&'a [u8]>,
}

/// Dumps the neighbour table of `family` (`libc::AF_INET` or `libc::AF_INET6`) and calls
/// `visit` with each entry, in the kernel's order. Fails when the socket cannot be made
/// (no netlink), the kernel refuses, an answer is malformed or a bound is reached.
pub fn for_each_neighbour(
    family: libc::c_int,
    mut visit: impl FnMut(&Neighbour<'_>),
) -> io::Result<()> {
    let socket = netlink_socket()?;
    send_dump_request(&socket, family)?;
    let mut buffer = vec![0u8; RECV_BUFFER];
    for _ in 0..MAX_DATAGRAMS {
        let len = recv_from_kernel(&socket, &mut buffer)?;
        match parse_datagram(&buffer[..len], &mut visit)? {
            Progress::More => {}
            Progress::Done => return Ok(()),
        }
    }
    Err(io::Error::other(format!(
        "neighbour table larger than {MAX_DATAGRAMS} datagrams"
    )))
}

/// The dump request: a `nlmsghdr` and an `ndmsg` naming the family, in native byte order.
fn dump_request(family: libc::c_int) -> [u8; HEADER_LEN + NDMSG_LEN] {
    let mut request = [0u8; HEADER_LEN + NDMSG_LEN];
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    request[0..4].copy_from_slice(&((HEADER_LEN + NDMSG_LEN) as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&libc::RTM_GETNEIGH.to_ne_bytes());
    request[6..8].copy_from_slice(&flags.to_ne_bytes());
    request[8..12].copy_from_slice(&SEQUENCE.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in this socket's port. ndm_family comes next; the rest
    // of the ndmsg (interface, state, flags, type) stays zero: the whole table.
    request[HEADER_LEN] = family as u8;
    request
}

/// Whether the dump goes on after a datagram.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"))
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

/// Netlink's 4-byte alignment.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Reads the messages of one datagram of the dump's answer, calling `visit` with each
/// neighbour; `Done` at `NLMSG_DONE`, an error at `NLMSG_ERROR` or a malformed message.
fn parse_datagram(datagram: &[u8], visit: &mut impl FnMut(&Neighbour<'_>)) -> io::Result<Progress> {
    let mut rest = datagram;
    while rest.len() >= HEADER_LEN {
        let len = u32_at(rest, 0) as usize;
        if len < HEADER_LEN || len > rest.len() {
            return Err(malformed("message length out of bounds"));
        }
        let kind = u16_at(rest, 4);
        let sequence = u32_at(rest, 8);
        let payload = &rest[HEADER_LEN..len];
        rest = &rest[align(len).min(rest.len())..];
        if sequence != SEQUENCE {
            continue; // not an answer to this request
        }
        match kind {
            k if k == libc::NLMSG_DONE as u16 => return Ok(Progress::Done),
            k if k == libc::NLMSG_ERROR as u16 => {
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("four bytes")))
                    .ok_or_else(|| malformed("short error message"))?;
                return Err(if code < 0 {
                    io::Error::from_raw_os_error(-code)
                } else {
                    malformed("acknowledgement instead of a dump")
                });
            }
            libc::RTM_NEWNEIGH => visit(&parse_neighbour(payload)?),
            _ => {} // NLMSG_NOOP and the like
        }
    }
    Ok(Progress::More)
}

/// One `RTM_NEWNEIGH` payload: an `ndmsg` and its attributes.
fn parse_neighbour(payload: &[u8]) -> io::Result<Neighbour<'_>> {
    if payload.len() < NDMSG_LEN {
        return Err(malformed("short neighbour message"));
    }
    let mut neighbour = Neighbour {
        ifindex: i32::from_ne_bytes(payload[4..8].try_into().expect("four bytes")),
        state: u16_at(payload, 8),
        flags: payload[10],
        destination: None,
        link_address: None,
    };
    let mut attributes = &payload[NDMSG_LEN..];
    while attributes.len() >= ATTR_HEADER_LEN {
        let len = u16_at(attributes, 0) as usize;
        if len < ATTR_HEADER_LEN || len > attributes.len() {
            return Err(malformed("attribute length out of bounds"));
        }
        let value = &attributes[ATTR_HEADER_LEN..len];
        match u16_at(attributes, 2) {
            libc::NDA_DST => neighbour.destination = Some(value),
            libc::NDA_LLADDR => neighbour.link_address = Some(value),
            _ => {}
        }
        attributes = &attributes[align(len).min(attributes.len())..];
    }
    Ok(neighbour)
}

/// A close-on-exec `NETLINK_ROUTE` socket whose receives wait at most [`RECV_TIMEOUT`].
fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: RECV_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given length from a pointer to a live
    // local.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// The kernel's netlink address (port 0).
fn kernel_address() -> libc::sockaddr_nl {
    // SAFETY: all-zero bytes are a valid sockaddr_nl (port 0, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    kernel
}

fn send_dump_request(socket: &OwnedFd, family: libc::c_int) -> io::Result<()> {
    let request = dump_request(family);
    let kernel = kernel_address();
    // SAFETY: sendto reads `request.len()` bytes from the live array and a sockaddr_nl of
    // the given length from a live local.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    match sent {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize != request.len() => Err(malformed("short send")),
        _ => Ok(()),
    }
}

/// Receives one datagram from the kernel (port 0) into `buffer`: its length. A datagram
/// longer than the buffer, or one from another sender, is an error.
fn recv_from_kernel(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: all-zero bytes are a valid sockaddr_nl.
        let mut from: libc::sockaddr_nl = unsafe { zeroed() };
        let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: recvfrom writes at most `buffer.len()` bytes into the live buffer and at
        // most `from_len` bytes into the live sockaddr_nl; with MSG_TRUNC it returns the
        // datagram's full length, which may exceed the buffer (checked below).
        let received = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if received < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        let len = received as usize;
        if len > buffer.len() {
            return Err(malformed("datagram larger than the receive buffer"));
        }
        if from.nl_pid != 0 {
            continue; // not the kernel: ignored (non-root senders cannot reach us anyway)
        }
        return Ok(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `kind` with `payload`, padded to the alignment.
    fn message(kind: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
        let len = HEADER_LEN + payload.len();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(libc::NLM_F_MULTI as u16).to_ne_bytes());
        bytes.extend_from_slice(&sequence.to_ne_bytes());
        bytes.extend_from_slice(&1234u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align(bytes.len()), 0);
        bytes
    }

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((ATTR_HEADER_LEN + value.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align(bytes.len()), 0);
        bytes
    }

    fn neighbour_payload(ifindex: i32, state: u16, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = vec![libc::AF_INET as u8, 0, 0, 0];
        bytes.extend_from_slice(&ifindex.to_ne_bytes());
        bytes.extend_from_slice(&state.to_ne_bytes());
        bytes.extend_from_slice(&[0, 1]);
        for attribute in attributes {
            bytes.extend_from_slice(attribute);
        }
        bytes
    }

    /// An entry as the tests compare it: interface, state, destination, link address.
    type Seen = (i32, u16, Vec<u8>, Vec<u8>);

    fn collect(datagram: &[u8]) -> (io::Result<Progress>, Vec<Seen>) {
        let mut seen = Vec::new();
        let progress = parse_datagram(datagram, &mut |n: &Neighbour<'_>| {
            seen.push((
                n.ifindex,
                n.state,
                n.destination.unwrap_or_default().to_vec(),
                n.link_address.unwrap_or_default().to_vec(),
            ))
        });
        (progress, seen)
    }

    #[test]
    fn the_request_asks_for_a_dump_of_one_family() {
        let request = dump_request(libc::AF_INET6);
        assert_eq!(u32_at(&request, 0) as usize, request.len());
        assert_eq!(u16_at(&request, 4), libc::RTM_GETNEIGH);
        assert_eq!(
            u16_at(&request, 6),
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16
        );
        assert_eq!(request[HEADER_LEN], libc::AF_INET6 as u8);
        assert!(request[HEADER_LEN + 1..].iter().all(|&b| b == 0));
    }

    #[test]
    fn entries_are_visited_and_done_ends_the_dump() {
        let mut datagram = message(
            libc::RTM_NEWNEIGH,
            SEQUENCE,
            &neighbour_payload(
                3,
                libc::NUD_REACHABLE,
                &[
                    attribute(libc::NDA_DST, &[10, 0, 0, 2]),
                    attribute(99, &[1, 2, 3]), // unknown: skipped
                    attribute(libc::NDA_LLADDR, &[2, 0, 0, 0, 0, 2]),
                ],
            ),
        );
        // A failed entry: no link-layer address.
        datagram.extend(message(
            libc::RTM_NEWNEIGH,
            SEQUENCE,
            &neighbour_payload(
                3,
                libc::NUD_FAILED,
                &[attribute(libc::NDA_DST, &[10, 0, 0, 3])],
            ),
        ));
        let (progress, seen) = collect(&datagram);
        assert_eq!(progress.unwrap(), Progress::More);
        assert_eq!(
            seen,
            vec![
                (
                    3,
                    libc::NUD_REACHABLE,
                    vec![10, 0, 0, 2],
                    vec![2, 0, 0, 0, 0, 2]
                ),
                (3, libc::NUD_FAILED, vec![10, 0, 0, 3], vec![]),
            ]
        );
        datagram.extend(message(
            libc::NLMSG_DONE as u16,
            SEQUENCE,
            &0i32.to_ne_bytes(),
        ));
        // Anything after DONE is not read.
        datagram.extend(message(libc::RTM_NEWNEIGH, SEQUENCE, &[0; 3]));
        assert_eq!(collect(&datagram).0.unwrap(), Progress::Done);
    }

    #[test]
    fn errors_and_malformed_messages_fail_the_dump() {
        let error = message(
            libc::NLMSG_ERROR as u16,
            SEQUENCE,
            &(-libc::EPERM).to_ne_bytes(),
        );
        let got = collect(&error).0.unwrap_err();
        assert_eq!(got.raw_os_error(), Some(libc::EPERM));
        // A length past the datagram's end.
        let mut long = message(libc::RTM_NEWNEIGH, SEQUENCE, &neighbour_payload(1, 2, &[]));
        long[0] = 200;
        assert!(collect(&long).0.is_err());
        // A length below the header's.
        let mut short = long.clone();
        short[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(collect(&short).0.is_err());
        // A neighbour message shorter than an ndmsg.
        assert!(collect(&message(libc::RTM_NEWNEIGH, SEQUENCE, &[0; 8]))
            .0
            .is_err());
        // An attribute running past its message.
        let mut payload = neighbour_payload(1, 2, &[attribute(libc::NDA_DST, &[1, 2, 3, 4])]);
        payload[NDMSG_LEN..NDMSG_LEN + 2].copy_from_slice(&64u16.to_ne_bytes());
        assert!(collect(&message(libc::RTM_NEWNEIGH, SEQUENCE, &payload))
            .0
            .is_err());
    }

    #[test]
    fn other_sequences_are_skipped() {
        let stray = message(
            libc::RTM_NEWNEIGH,
            SEQUENCE + 1,
            &neighbour_payload(1, 2, &[attribute(libc::NDA_DST, &[1, 2, 3, 4])]),
        );
        let (progress, seen) = collect(&stray);
        assert_eq!(progress.unwrap(), Progress::More);
        assert!(seen.is_empty());
    }

    #[test]
    fn the_host_table_can_be_dumped() {
        // Whatever is in it: the request is accepted and the dump ends. Loopback has no
        // entries, so this only shows the round trip works; tests/mac.rs looks up real
        // entries in a namespace of its own.
        for family in [libc::AF_INET, libc::AF_INET6] {
            for_each_neighbour(family, |_| {}).expect("neighbour dump");
        }
    }
}
