//! MTU-sized blocks: the largest block size that fits one unfragmented datagram on the
//! interface a request arrived on, and a cache of the interfaces' MTUs (looked up by the
//! caller, through `sys::interface_mtu`). Socket-free: the lookup is a closure, the time
//! an argument.
//!
//! Firmware often cannot reassemble IP fragments, so a block larger than the path allows
//! fails there, or only after retries. dnsmasq clamps blksize to the interface's MTU by
//! default; so does the server ([`ServerBuilder::mtu_blksize`](super::ServerBuilder::mtu_blksize)).
//! Loopback's MTU (65536) allows every block size.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use crate::options::MAX_BLKSIZE;
use crate::packet::DATA_HEADER_LEN;

/// How long an interface's MTU (or the failure to learn it) is trusted: interfaces come,
/// go and change their MTU while the server runs.
pub(crate) const MTU_REFRESH: Duration = Duration::from_secs(5);

/// The most interfaces remembered; past it the cache starts over (it only saves ioctls).
const MAX_INTERFACES: usize = 1024;

/// The smallest block size the clamp grants: what a client gets without the option, so
/// asking for larger blocks never yields smaller ones (only links with an MTU below 544,
/// which IPv6 does not allow and IPv4 networks do not use, would need less).
pub(crate) const MIN_MTU_BLKSIZE: u16 = 512;

/// IPv4 header without options.
const IPV4_HEADER_LEN: u32 = 20;
/// IPv6 header without extension headers.
const IPV6_HEADER_LEN: u32 = 40;
const UDP_HEADER_LEN: u32 = 8;

/// The largest block whose DATA datagram fits an `mtu`-byte IP packet of the given
/// family: the MTU less the IP (IPv4 20, IPv6 40), UDP (8) and TFTP (4) headers, within
/// [`MIN_MTU_BLKSIZE`]..=65464.
pub(crate) fn blksize_for_mtu(mtu: u32, ipv6: bool) -> u16 {
    let ip = if ipv6 {
        IPV6_HEADER_LEN
    } else {
        IPV4_HEADER_LEN
    };
    let headers = ip + UDP_HEADER_LEN + DATA_HEADER_LEN as u32;
    let blksize = mtu.saturating_sub(headers);
    blksize.clamp(u32::from(MIN_MTU_BLKSIZE), u32::from(MAX_BLKSIZE)) as u16
}

/// The interfaces' MTUs by index, each refreshed after [`MTU_REFRESH`].
#[derive(Debug, Default)]
pub(crate) struct MtuCache {
    /// The MTU (`None`: it could not be learned) and when it was looked up.
    interfaces: HashMap<u32, (Option<u32>, Instant)>,
}

impl MtuCache {
    /// An empty cache.
    pub(crate) fn new() -> MtuCache {
        MtuCache::default()
    }

    /// The largest block size for a request of the given family that arrived at `now`
    /// on interface `ifindex`, from its MTU: the cached one, or `lookup(ifindex)` when it
    /// is older than [`MTU_REFRESH`] or unknown. `None` when the interface is unknown
    /// (index 0) or its MTU cannot be learned: no clamp then.
    pub(crate) fn max_blksize(
        &mut self,
        now: Instant,
        ifindex: u32,
        ipv6: bool,
        lookup: impl FnOnce(u32) -> io::Result<u32>,
    ) -> Option<u16> {
        if ifindex == 0 {
            return None;
        }
        let fresh = self
            .interfaces
            .get(&ifindex)
            .filter(|(_, at)| now.saturating_duration_since(*at) < MTU_REFRESH);
        let mtu = match fresh {
            Some(&(mtu, _)) => mtu,
            None => {
                let mtu = match lookup(ifindex) {
                    Ok(mtu) => Some(mtu),
                    Err(e) => {
                        log::debug!("no MTU for interface {ifindex}: {e}");
                        None
                    }
                };
                if self.interfaces.len() >= MAX_INTERFACES {
                    self.interfaces.clear();
                }
                self.interfaces.insert(ifindex, (mtu, now));
                mtu
            }
        };
        mtu.map(|mtu| blksize_for_mtu(mtu, ipv6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_leave_room_for_the_ip_udp_and_tftp_headers() {
        // Ethernet: what EDK2 and dnsmasq use.
        assert_eq!(blksize_for_mtu(1500, false), 1468);
        assert_eq!(blksize_for_mtu(1500, true), 1448);
        // Jumbo frames, a VXLAN overlay, PPPoE.
        assert_eq!(blksize_for_mtu(9000, false), 8968);
        assert_eq!(blksize_for_mtu(9000, true), 8948);
        assert_eq!(blksize_for_mtu(1450, false), 1418);
        assert_eq!(blksize_for_mtu(1492, true), 1440);
        // IPv6's minimum MTU.
        assert_eq!(blksize_for_mtu(1280, true), 1228);
        // Loopback: every block size fits.
        assert_eq!(blksize_for_mtu(65536, false), 65464);
        assert_eq!(blksize_for_mtu(65536, true), 65464);
        assert_eq!(blksize_for_mtu(u32::MAX, true), 65464);
        // Never below what a client gets without asking.
        assert_eq!(blksize_for_mtu(576, false), 544);
        assert_eq!(blksize_for_mtu(544, false), 512);
        assert_eq!(blksize_for_mtu(68, false), 512);
        assert_eq!(blksize_for_mtu(0, true), 512);
    }

    #[test]
    fn mtus_are_cached_per_interface_and_looked_up_again_after_the_refresh() {
        let mut cache = MtuCache::new();
        let start = Instant::now();
        let mut lookups = Vec::new();
        let mut ask = |cache: &mut MtuCache, at: Duration, ifindex: u32, mtu: io::Result<u32>| {
            cache.max_blksize(start + at, ifindex, false, |i| {
                lookups.push(i);
                mtu
            })
        };
        assert_eq!(ask(&mut cache, Duration::ZERO, 2, Ok(1500)), Some(1468));
        // Cached: a lookup would say 9000.
        assert_eq!(ask(&mut cache, MTU_REFRESH / 2, 2, Ok(9000)), Some(1468));
        assert_eq!(ask(&mut cache, Duration::ZERO, 3, Ok(9000)), Some(8968));
        // Refreshed: the interface's MTU changed.
        assert_eq!(ask(&mut cache, MTU_REFRESH, 2, Ok(9000)), Some(8968));
        // A failed lookup means no clamp, and is not retried before the refresh either.
        let gone = || Err(io::Error::from_raw_os_error(libc::ENODEV));
        assert_eq!(ask(&mut cache, Duration::ZERO, 4, gone()), None);
        assert_eq!(ask(&mut cache, MTU_REFRESH / 2, 4, Ok(1500)), None);
        assert_eq!(ask(&mut cache, MTU_REFRESH, 4, Ok(1500)), Some(1468));
        // Index 0: the kernel did not say; nothing looked up.
        assert_eq!(ask(&mut cache, Duration::ZERO, 0, Ok(1500)), None);
        assert_eq!(lookups, [2, 3, 2, 4, 4]);
        // The family decides the headers, not the cache.
        assert_eq!(
            cache.max_blksize(start + MTU_REFRESH, 2, true, |_| unreachable!()),
            Some(8948)
        );
    }
}
