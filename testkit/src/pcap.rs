//! The UDP datagrams of a packet capture: the classic pcap format over Ethernet, as
//! qemu's `filter-dump` writes it, read back so that a test can see which ports a guest
//! really talked to. IPv4 and IPv6 (without extension headers); other frames are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A UDP datagram seen in a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Its source address and port.
    pub src: SocketAddr,
    /// Its destination address and port.
    pub dst: SocketAddr,
    /// The start of its payload, as much as the capture kept.
    pub payload: Vec<u8>,
}

impl Datagram {
    /// The first two payload bytes as a big-endian number: a TFTP datagram's opcode.
    pub fn opcode(&self) -> Option<u16> {
        Some(u16::from_be_bytes(self.payload.get(..2)?.try_into().ok()?))
    }
}

const MAGIC_MICROS: u32 = 0xa1b2_c3d4;
const MAGIC_NANOS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;

/// The UDP datagrams in `capture`, in order, or why it is not a pcap of Ethernet
/// frames. A record cut short by the end of the file (a writer still running) ends it.
pub fn udp_datagrams(capture: &[u8]) -> Result<Vec<Datagram>, String> {
    let header = capture.get(..24).ok_or("shorter than a pcap header")?;
    let magic = u32::from_le_bytes(header[..4].try_into().unwrap());
    let word: fn([u8; 4]) -> u32 = if magic == MAGIC_MICROS || magic == MAGIC_NANOS {
        u32::from_le_bytes
    } else if magic.swap_bytes() == MAGIC_MICROS || magic.swap_bytes() == MAGIC_NANOS {
        u32::from_be_bytes
    } else {
        return Err(format!("not a pcap file (magic {magic:#x})"));
    };
    let linktype = word(header[20..24].try_into().unwrap());
    if linktype != LINKTYPE_ETHERNET {
        return Err(format!("link type {linktype}, not Ethernet"));
    }
    let mut datagrams = Vec::new();
    let mut rest = &capture[24..];
    while rest.len() >= 16 {
        let captured = word(rest[8..12].try_into().unwrap()) as usize;
        let Some(frame) = rest.get(16..16 + captured) else {
            break;
        };
        datagrams.extend(udp_in_frame(frame));
        rest = &rest[16 + captured..];
    }
    Ok(datagrams)
}

/// The UDP datagram an Ethernet frame carries, if any.
fn udp_in_frame(frame: &[u8]) -> Option<Datagram> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(14..)?;
    let (src, dst, udp) = match ethertype {
        0x0800 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            if ip.get(9)? != &17 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::from(Ipv4Addr::from(src)),
                IpAddr::from(Ipv4Addr::from(dst)),
                ip.get(header_len..)?,
            )
        }
        0x86dd => {
            if ip.get(6)? != &17 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (
                IpAddr::from(Ipv6Addr::from(src)),
                IpAddr::from(Ipv6Addr::from(dst)),
                ip.get(40..)?,
            )
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes(udp.get(at..at + 2)?.try_into().ok()?));
    Some(Datagram {
        src: SocketAddr::new(src, port(0)?),
        dst: SocketAddr::new(dst, port(2)?),
        payload: udp.get(8..).unwrap_or_default().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with an IPv4 (or IPv6) UDP datagram.
    fn frame(v6: bool, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        let mut udp = Vec::new();
        udp.extend_from_slice(&src.port().to_be_bytes());
        udp.extend_from_slice(&dst.port().to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) if !v6 => {
                f.extend_from_slice(&[0x08, 0x00]);
                // Version 4 with 4 bytes of options: a 24-byte header.
                let mut ip = vec![0x46, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&[1, 1, 1, 1]);
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&[0x86, 0xdd]);
                let mut ip = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                f.extend_from_slice(&ip);
            }
            _ => unreachable!(),
        }
        f.extend_from_slice(&udp);
        f
    }

    fn pcap(frames: &[Vec<u8>], big_endian: bool, keep: usize) -> Vec<u8> {
        let word = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut out = Vec::new();
        out.extend_from_slice(&word(MAGIC_MICROS));
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&word(LINKTYPE_ETHERNET));
        for f in frames {
            let kept = f.len().min(keep);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&word(kept as u32));
            out.extend_from_slice(&word(f.len() as u32));
            out.extend_from_slice(&f[..kept]);
        }
        out
    }

    #[test]
    fn reads_udp_over_ipv4_and_ipv6_and_skips_the_rest() {
        let a: SocketAddr = "10.77.0.1:69".parse().unwrap();
        let b: SocketAddr = "10.77.0.2:2000".parse().unwrap();
        let c: SocketAddr = "[fd77::1]:40000".parse().unwrap();
        let d: SocketAddr = "[fd77::2]:1234".parse().unwrap();
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06, 0, 1]);
        let frames = [
            frame(false, a, b, &[0, 6, b'x']),
            arp,
            frame(true, c, d, &[0, 3, 0, 1, 9, 9]),
        ];
        for big_endian in [false, true] {
            let got = udp_datagrams(&pcap(&frames, big_endian, 1500)).unwrap();
            assert_eq!(got.len(), 2);
            assert_eq!((got[0].src, got[0].dst, got[0].opcode()), (a, b, Some(6)));
            assert_eq!(got[0].payload, [0, 6, b'x']);
            assert_eq!((got[1].src, got[1].dst, got[1].opcode()), (c, d, Some(3)));
        }
        // Truncated records keep the headers; a record cut by the end of the file ends it.
        let short = pcap(&frames, false, 14 + 40 + 8 + 2);
        let got = udp_datagrams(&short).unwrap();
        assert_eq!(got[1].payload, [0, 3]);
        let cut = &short[..short.len() - 3];
        assert_eq!(udp_datagrams(cut).unwrap().len(), 1);
        assert!(udp_datagrams(b"not a capture at all, no").is_err());
    }
}
