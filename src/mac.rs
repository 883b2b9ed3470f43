//! Ethernet (MAC) addresses of netboot clients: parsed from text, recognised in the file
//! names real clients ask for, and looked up in the kernel's neighbour table.
//!
//! [`MacAddr::from_filename`] knows the standard per-machine names:
//!
//! | client | name |
//! |---|---|
//! | PXELINUX, U-Boot `pxe`, Ironic/Foreman symlink farms | `pxelinux.cfg/01-aa-bb-cc-dd-ee-ff` (`01` is the ARP hardware type of Ethernet; any directory) |
//! | GRUB 2 (`grub_net_search_config_file`); MAAS also without `01-` | `grub/grub.cfg-01-aa-bb-cc-dd-ee-ff`, `grub.cfg-aa:bb:cc:dd:ee:ff` |
//! | pixiecore, Tinkerbell ipxedust (`macFromURI`) | `aa:bb:cc:dd:ee:ff/<file>` (a leading directory; colons or dashes) |
//! | iPXE scripts (netboot.xyz's `MAC-${mac:hexraw}.ipxe`) | `MAC-aabbccddeeff.ipxe` |
//!
//! and nothing else: ordinary names (`pxelinux.0`, `pxelinux.cfg/C0A80A05`, a UUID, a
//! Raspberry Pi serial directory, `grub.cfg-C0A80A05`) give `None`.
//!
//! [`MacAddr::neighbour`] asks the kernel which hardware address it has for an IP address
//! (ARP for IPv4, NDP for IPv6): one rtnetlink dump of that family's table. Only on-link
//! clients are there (beyond a router the table holds the router's address, not the
//! client's), and only once they have talked to this host.
//!
//! Neither is proof of identity: a client chooses its file name, and anyone on the link can
//! answer ARP or NDP for an address. Use a MAC to choose content, not to authorise.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::sys;

/// An Ethernet (EUI-48) address.
///
/// ```
/// use dyntftp::mac::MacAddr;
///
/// let mac: MacAddr = "AA-BB-CC-00-11-22".parse().unwrap();
/// assert_eq!(mac.to_string(), "aa:bb:cc:00:11:22");
/// assert_eq!(mac.dashed(), "aa-bb-cc-00-11-22");
/// assert_eq!(MacAddr::from_filename(b"pxelinux.cfg/01-aa-bb-cc-00-11-22"), Some(mac));
/// assert_eq!(MacAddr::from_filename(b"pxelinux.cfg/default"), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// The error of [`MacAddr::from_str`]: the text is not a MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseMacError;

impl fmt::Display for ParseMacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a MAC address (aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff or aabbccddeeff)")
    }
}

impl std::error::Error for ParseMacError {}

/// The neighbour states whose link-layer address is known: `NUD_REACHABLE`, `NUD_STALE`
/// (known, not confirmed lately), `NUD_DELAY`, `NUD_PROBE` (being confirmed) and
/// `NUD_PERMANENT` (set by hand). `INCOMPLETE`, `FAILED`, `NONE` and `NOARP` entries are
/// ignored.
const KNOWN_STATES: u16 =
    libc::NUD_REACHABLE | libc::NUD_STALE | libc::NUD_DELAY | libc::NUD_PROBE | libc::NUD_PERMANENT;

/// `NTF_PROXY`: a proxy-ARP/NDP entry (an address this host answers for), not a neighbour.
const NTF_PROXY: u8 = 0x08;

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff` (one separator throughout, two
    /// hex digits per byte) or 12 bare hex digits `aabbccddeeff`, in any case.
    pub fn parse(text: &str) -> Option<MacAddr> {
        Self::parse_bytes(text.as_bytes(), b":-")
    }

    /// [`MacAddr::parse`] on bytes, with the separators allowed (`b":-"`, `b"-"`, …).
    fn parse_bytes(text: &[u8], separators: &[u8]) -> Option<MacAddr> {
        let mut mac = [0u8; 6];
        match text.len() {
            12 => {
                for (byte, pair) in mac.iter_mut().zip(text.chunks_exact(2)) {
                    *byte = hex_pair(pair)?;
                }
            }
            17 => {
                let separator = text[2];
                if !separators.contains(&separator) {
                    return None;
                }
                for (i, byte) in mac.iter_mut().enumerate() {
                    let at = i * 3;
                    if i > 0 && text[at - 1] != separator {
                        return None;
                    }
                    *byte = hex_pair(&text[at..at + 2])?;
                }
            }
            _ => return None,
        }
        Some(MacAddr(mac))
    }

    /// The MAC address in a per-machine file name, in the standard forms real netboot
    /// clients send (see the [module documentation](self)); `None` for any other name,
    /// and for a group (multicast) address, which no client has. A leading `/` is
    /// ignored. The hex digits may be in any case.
    pub fn from_filename(name: &[u8]) -> Option<MacAddr> {
        Self::in_filename(trim_leading_slashes(name)).filter(|mac| !mac.is_group())
    }

    /// [`MacAddr::from_filename`] before the unicast check.
    fn in_filename(name: &[u8]) -> Option<MacAddr> {
        let last = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
        // PXELINUX, U-Boot pxe: 01-aa-bb-cc-dd-ee-ff.
        if let Some(mac) = strip_prefix_ignore_case(last, b"01-").and_then(Self::parse_dashed) {
            return Some(mac);
        }
        // GRUB: grub.cfg-01-aa-bb-cc-dd-ee-ff; MAAS also grub.cfg-aa:bb:cc:dd:ee:ff.
        if let Some(rest) = last.strip_prefix(b"grub.cfg-") {
            let mac = strip_prefix_ignore_case(rest, b"01-")
                .and_then(Self::parse_dashed)
                .or_else(|| Self::parse_separated(rest));
            if mac.is_some() {
                return mac;
            }
        }
        // iPXE: MAC-aabbccddeeff.ipxe.
        if let Some(hex) = strip_prefix_ignore_case(last, b"mac-")
            .and_then(|rest| strip_suffix_ignore_case(rest, b".ipxe"))
            .filter(|hex| hex.len() == 12)
        {
            return Self::parse_bytes(hex, b"");
        }
        // pixiecore, ipxedust: aa:bb:cc:dd:ee:ff/<file>.
        let (first, rest) = split_first_component(name)?;
        if rest.is_empty() {
            return None;
        }
        Self::parse_separated(first)
    }

    /// Exactly `aa-bb-cc-dd-ee-ff` (dashes).
    fn parse_dashed(text: &[u8]) -> Option<MacAddr> {
        (text.len() == 17).then(|| Self::parse_bytes(text, b"-"))?
    }

    /// Exactly `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff` (no bare hex).
    fn parse_separated(text: &[u8]) -> Option<MacAddr> {
        (text.len() == 17).then(|| Self::parse_bytes(text, b":-"))?
    }

    /// A group (multicast or broadcast) address: the low bit of the first byte set. No
    /// client has one.
    fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// `aa-bb-cc-dd-ee-ff`: lower case with dashes, as in PXELINUX and GRUB file names.
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }

    /// The kernel's neighbour table entry for `ip` (ARP for IPv4, NDP for IPv6; an
    /// IPv4-mapped IPv6 address is looked up as IPv4): the client's own hardware address
    /// when it is on a link of this host and has talked to it.
    ///
    /// `None` when the table has no usable entry: none at all, only incomplete or failed
    /// ones, an all-zero address, a non-Ethernet address, or different addresses for the
    /// same IP on different interfaces (an IPv6 link-local address reused on two links);
    /// also when netlink is unavailable or the table is larger than the bound.
    ///
    /// Cost: one rtnetlink `RTM_GETNEIGH` dump of one family per call, synchronous. The
    /// kernel answers at once from memory; the reply is read into one 32 KiB buffer, at
    /// most 64 datagrams (about 20,000 entries), waiting at most 200 ms per datagram. Call
    /// it only when the answer is needed, and at most once per request.
    pub fn neighbour(ip: IpAddr) -> Option<MacAddr> {
        let ip = sys::unmap(ip);
        let (family, wanted): (libc::c_int, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (libc::AF_INET, v4.octets().to_vec()),
            IpAddr::V6(v6) => (libc::AF_INET6, v6.octets().to_vec()),
        };
        let mut found: Option<MacAddr> = None;
        let mut ambiguous = false;
        sys::for_each_neighbour(family, |entry| {
            if entry.destination != Some(&wanted[..]) {
                return;
            }
            if let Some(mac) = usable_link_address(entry.state, entry.flags, entry.link_address) {
                match found {
                    None => found = Some(mac),
                    Some(previous) if previous != mac => ambiguous = true,
                    Some(_) => {}
                }
            }
        })
        .ok()?;
        if ambiguous {
            None
        } else {
            found
        }
    }
}

/// The MAC address of a neighbour entry in `state` with `flags` and `link_address`, if
/// the entry counts: a known state, not a proxy entry, 6 bytes, not all zero.
fn usable_link_address(state: u16, flags: u8, link_address: Option<&[u8]>) -> Option<MacAddr> {
    if state & KNOWN_STATES == 0 || flags & NTF_PROXY != 0 {
        return None;
    }
    let bytes: [u8; 6] = link_address?.try_into().ok()?;
    (bytes != [0; 6]).then_some(MacAddr(bytes))
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    Some(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?)
}

fn trim_leading_slashes(name: &[u8]) -> &[u8] {
    let start = name.iter().position(|&b| b != b'/').unwrap_or(name.len());
    &name[start..]
}

fn strip_prefix_ignore_case<'a>(text: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn strip_suffix_ignore_case<'a>(text: &'a [u8], suffix: &[u8]) -> Option<&'a [u8]> {
    let split = text.len().checked_sub(suffix.len())?;
    text[split..]
        .eq_ignore_ascii_case(suffix)
        .then(|| &text[..split])
}

/// The first path component and what follows its `/`; `None` without a `/`.
fn split_first_component(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let slash = name.iter().position(|&b| b == b'/')?;
    Some((&name[..slash], &name[slash + 1..]))
}

impl fmt::Display for MacAddr {
    /// `aa:bb:cc:dd:ee:ff`, lower case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    /// [`MacAddr::parse`].
    fn from_str(text: &str) -> Result<MacAddr, ParseMacError> {
        MacAddr::parse(text).ok_or(ParseMacError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0xaa, 0xbb, 0xcc, 0x00, 0x11, 0x22]);

    #[test]
    fn parses_colons_dashes_and_bare_hex_in_any_case() {
        for text in [
            "aa:bb:cc:00:11:22",
            "AA:BB:CC:00:11:22",
            "aa-bb-cc-00-11-22",
            "Aa-bB-cc-00-11-22",
            "aabbcc001122",
            "AABBCC001122",
        ] {
            assert_eq!(MacAddr::parse(text), Some(MAC), "{text}");
            assert_eq!(text.parse::<MacAddr>(), Ok(MAC), "{text}");
        }
    }

    #[test]
    fn rejects_anything_else() {
        for text in [
            "",
            "aa:bb:cc:00:11",
            "aa:bb:cc:00:11:22:33",
            "aa:bb:cc-00-11-22", // mixed separators
            "aa.bb.cc.00.11.22",
            "aabb.cc00.1122",
            "a:b:c:0:1:2",
            "aa:bb:cc:00:11:2g",
            "aabbcc00112",
            "aabbcc0011223",
            " aa:bb:cc:00:11:22",
            "aa:bb:cc:00:11:22 ",
            "+a:bb:cc:00:11:22",
            "é:bb:cc:00:11:22a", // 17 bytes of UTF-8, not hex
        ] {
            assert_eq!(MacAddr::parse(text), None, "{text:?}");
            assert_eq!(text.parse::<MacAddr>(), Err(ParseMacError), "{text:?}");
        }
    }

    #[test]
    fn displays_lower_case_with_colons_or_dashes() {
        let mac = MacAddr([0x0a, 0xff, 0, 1, 0x10, 0xab]);
        assert_eq!(mac.to_string(), "0a:ff:00:01:10:ab");
        assert_eq!(mac.dashed(), "0a-ff-00-01-10-ab");
        assert_eq!(MacAddr::parse(&mac.to_string()), Some(mac));
        assert_eq!(MacAddr::parse(&mac.dashed()), Some(mac));
    }

    #[test]
    fn finds_the_mac_in_the_standard_per_machine_names() {
        for name in [
            // PXELINUX (any prefix directory), U-Boot pxe
            &b"pxelinux.cfg/01-aa-bb-cc-00-11-22"[..],
            b"/pxelinux.cfg/01-aa-bb-cc-00-11-22",
            b"bios/pxelinux.cfg/01-AA-BB-CC-00-11-22",
            b"01-aa-bb-cc-00-11-22",
            // GRUB 2, and MAAS's form without 01-
            b"grub/grub.cfg-01-aa-bb-cc-00-11-22",
            b"boot/grub2/grub.cfg-01-aa-bb-cc-00-11-22",
            b"grub.cfg-01-aa-bb-cc-00-11-22",
            b"grub/grub.cfg-aa:bb:cc:00:11:22",
            b"grub/grub.cfg-aa-bb-cc-00-11-22",
            // pixiecore / ipxedust: the MAC as a leading directory
            b"aa:bb:cc:00:11:22/0",
            b"aa-bb-cc-00-11-22/ipxe.efi",
            b"/AA:BB:CC:00:11:22/snp.efi",
            // netboot.xyz's iPXE per-machine script
            b"MAC-aabbcc001122.ipxe",
            b"menus/MAC-AABBCC001122.ipxe",
        ] {
            assert_eq!(
                MacAddr::from_filename(name),
                Some(MAC),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn ordinary_names_carry_no_mac() {
        // Names from shared/reference/netboot-platforms.md and the firmware it describes.
        for name in [
            &b""[..],
            b"/",
            b"pxelinux.0",
            b"lpxelinux.0",
            b"ldlinux.c32",
            b"pxelinux.cfg/default",
            b"pxelinux.cfg/C0A80A05",
            b"pxelinux.cfg/C0A80A0",
            b"pxelinux.cfg/C",
            b"pxelinux.cfg/564d4c2e-3a1f-b2b9-7c55-1d6d6b1e8a2f",
            b"pxelinux.cfg/01-aa-bb-cc-00-11",
            b"pxelinux.cfg/01-aa-bb-cc-00-11-22-33",
            b"pxelinux.cfg/01-aa-bb-cc-00-11-2g",
            b"pxelinux.cfg/01-aa:bb:cc:00:11:22",
            b"pxelinux.cfg/06-aa-bb-cc-00-11-22",
            b"pxelinux.cfg/01-aa-bb-cc-00-11-22.bak",
            b"grub/grub.cfg",
            b"grub/grub.cfg-C0A80A05",
            b"grub.cfg-0A000005",
            b"grub/grub.cfg-01-aa-bb-cc-00-11",
            b"grub/x86_64-efi/command.lst",
            b"grub/x86_64-efi/normal.mod",
            b"grubx64.efi",
            b"shimx64.efi",
            b"bootx64.efi",
            b"undionly.kpxe",
            b"snponly.efi",
            b"ipxe.efi",
            b"autoexec.ipxe",
            b"boot.ipxe",
            b"MAC-.ipxe",
            b"MAC-aabbcc00112.ipxe",
            b"MAC-aabbcc001122.ipxe.bak",
            b"HOSTNAME-node1.ipxe",
            b"1a2b3c4d/start4.elf",
            b"1a2b3c4d/config.txt",
            b"bootcode.bin",
            b"aabbcc001122/ipxe.efi", // a bare 12-digit directory is not taken
            b"aa:bb:cc:00:11:22",     // a MAC alone is not a per-machine file name
            b"aa:bb:cc:00:11:22/",
            b"images/ubuntu/24.04/vmlinuz",
            b"boot/initrd.img",
            b"Boot/BCD",
            b"boot/bcd",
            b"sources/boot.wim",
            b"\xff\xfe/01-\xff",
            // Group (multicast, broadcast) addresses are no client's.
            b"pxelinux.cfg/01-01-00-5e-00-00-01",
            b"grub/grub.cfg-01-aa-bb-cc-00-11", // not 01:aa:bb:cc:00:11
            b"ff:ff:ff:ff:ff:ff/ipxe.efi",
            b"MAC-333300000001.ipxe",
        ] {
            assert_eq!(
                MacAddr::from_filename(name),
                None,
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn only_known_neighbour_states_with_a_real_address_count() {
        let lladdr = &MAC.0[..];
        for state in [
            libc::NUD_REACHABLE,
            libc::NUD_STALE,
            libc::NUD_DELAY,
            libc::NUD_PROBE,
            libc::NUD_PERMANENT,
        ] {
            assert_eq!(usable_link_address(state, 0, Some(lladdr)), Some(MAC));
        }
        for state in [
            libc::NUD_INCOMPLETE,
            libc::NUD_FAILED,
            libc::NUD_NONE,
            libc::NUD_NOARP,
        ] {
            assert_eq!(usable_link_address(state, 0, Some(lladdr)), None);
        }
        let reachable = libc::NUD_REACHABLE;
        assert_eq!(
            usable_link_address(reachable, NTF_PROXY, Some(lladdr)),
            None
        );
        assert_eq!(usable_link_address(reachable, 0, None), None);
        assert_eq!(usable_link_address(reachable, 0, Some(&[0; 6])), None);
        assert_eq!(usable_link_address(reachable, 0, Some(&[1; 20])), None); // InfiniBand
        assert_eq!(usable_link_address(reachable, 0, Some(&[1; 4])), None); // a tunnel
    }

    #[test]
    fn loopback_has_no_neighbour() {
        assert_eq!(MacAddr::neighbour("127.0.0.1".parse().unwrap()), None);
        assert_eq!(MacAddr::neighbour("::1".parse().unwrap()), None);
    }
}
