//! Client families: which firmware or boot loader most likely sent a read request, told
//! from the options it asked for (each boot ROM and loader has its own fixed set) and, for
//! the Raspberry Pi, from its file names. The guess names a bounded label for logs and
//! metrics and selects the few policies some clients need.
//!
//! | family | recognised by |
//! |---|---|
//! | `u_boot` | `timeout` is the first option (U-Boot's legacy stack always sends it first) |
//! | `uefi` | `blksize` 1468 (IPv4) or 1448 (IPv6): EDK2 and vendor UEFI PXE |
//! | `ipxe` | `blksize` 1432 |
//! | `pxelinux` | `blksize` 1408 |
//! | `raspberry_pi` | `blksize` 1024 and a Raspberry Pi boot file name (a serial-number directory such as `1a2b3c4d/`, or `bootcode.bin`, `start4.elf`, …) |
//! | `grub` | `blksize` 1024 otherwise |
//! | `pxe_rom` | `blksize` 1456, or `tsize` alone: legacy BIOS PXE ROMs |
//! | `shim` | `blksize` 512 (hard-coded in shim) |
//! | `u_root` | `blksize` 1450 with a `windowsize` |
//! | `plain` | no options at all (RFC 1350 clients) |
//! | `other` | anything else |
//!
//! A guess, not an identity: a client can claim any family by sending its options. So a
//! family only ever makes the server stricter (a refusal up front instead of a failure
//! half-way), never more permissive.
//!
//! What the server does with it:
//!
//! - The Raspberry Pi boot EEPROM cannot roll block numbers over: a file that needs more
//!   than 65,535 blocks at the granted block size (64 MiB at 1024) would fail at block
//!   65,536, so it is refused at once with ERROR 3 (see [`ClientFamily::wraps_block_numbers`]).
//! - Option answers need no policy: the OACK carries only options the client asked for, and
//!   a `timeout` is echoed with the value sent (U-Boot aborts on any other), which
//!   negotiation already guarantees for every family.

use crate::packet::Options;

/// The client families; see the [module documentation](self).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientFamily {
    /// UEFI PXE (EDK2, vendor firmware).
    Uefi,
    /// iPXE.
    Ipxe,
    /// PXELINUX / lpxelinux (syslinux).
    Pxelinux,
    /// GRUB 2's network stack.
    Grub,
    /// U-Boot's legacy network stack.
    UBoot,
    /// The Raspberry Pi 4/5 boot EEPROM.
    RaspberryPi,
    /// A legacy BIOS PXE ROM (PXE 2.1).
    PxeRom,
    /// shim (Secure Boot).
    Shim,
    /// u-root / LinuxBoot.
    URoot,
    /// A client that asked for no option (RFC 1350).
    Plain,
    /// None of the above.
    Other,
}

/// Raspberry Pi boot files the EEPROM asks for by name.
const RASPBERRY_PI_FILES: [&[u8]; 8] = [
    b"bootcode.bin",
    b"start4.elf",
    b"start4x.elf",
    b"start.elf",
    b"fixup4.dat",
    b"fixup.dat",
    b"config.txt",
    b"recovery.elf",
];

impl ClientFamily {
    /// Every family once, in a fixed order (for metrics).
    pub const ALL: [ClientFamily; 11] = [
        ClientFamily::Uefi,
        ClientFamily::Ipxe,
        ClientFamily::Pxelinux,
        ClientFamily::Grub,
        ClientFamily::UBoot,
        ClientFamily::RaspberryPi,
        ClientFamily::PxeRom,
        ClientFamily::Shim,
        ClientFamily::URoot,
        ClientFamily::Plain,
        ClientFamily::Other,
    ];

    /// The family a request most likely comes from.
    pub fn classify(filename: &[u8], options: Options<'_>) -> ClientFamily {
        let mut first = true;
        let mut blksize = None;
        let mut windowsize = false;
        let mut tsize = false;
        let mut count = 0;
        for option in options {
            count += 1;
            let name = option.name;
            if first && name.eq_ignore_ascii_case(b"timeout") {
                return ClientFamily::UBoot;
            }
            first = false;
            if name.eq_ignore_ascii_case(b"blksize") && blksize.is_none() {
                blksize = Some(
                    std::str::from_utf8(option.value)
                        .ok()
                        .and_then(|v| v.parse::<u32>().ok()),
                );
            } else if name.eq_ignore_ascii_case(b"windowsize") {
                windowsize = true;
            } else if name.eq_ignore_ascii_case(b"tsize") {
                tsize = true;
            }
        }
        match blksize {
            None if count == 0 => ClientFamily::Plain,
            None if tsize && count == 1 => ClientFamily::PxeRom,
            Some(Some(1468 | 1448)) => ClientFamily::Uefi,
            Some(Some(1432)) => ClientFamily::Ipxe,
            Some(Some(1408)) => ClientFamily::Pxelinux,
            Some(Some(1024)) if is_raspberry_pi_file(filename) => ClientFamily::RaspberryPi,
            Some(Some(1024)) => ClientFamily::Grub,
            Some(Some(1456)) => ClientFamily::PxeRom,
            Some(Some(512)) => ClientFamily::Shim,
            Some(Some(1450)) if windowsize => ClientFamily::URoot,
            _ => ClientFamily::Other,
        }
    }

    /// The label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientFamily::Uefi => "uefi",
            ClientFamily::Ipxe => "ipxe",
            ClientFamily::Pxelinux => "pxelinux",
            ClientFamily::Grub => "grub",
            ClientFamily::UBoot => "u_boot",
            ClientFamily::RaspberryPi => "raspberry_pi",
            ClientFamily::PxeRom => "pxe_rom",
            ClientFamily::Shim => "shim",
            ClientFamily::URoot => "u_root",
            ClientFamily::Plain => "plain",
            ClientFamily::Other => "other",
        }
    }

    /// Whether the client rolls block numbers over from 65,535 to 0 and so can read files
    /// of any size. The Raspberry Pi EEPROM cannot (rpi-eeprom #720, #375).
    pub fn wraps_block_numbers(self) -> bool {
        self != ClientFamily::RaspberryPi
    }
}

/// Whether the largest file a client that cannot roll block numbers over can read at
/// `blksize` is smaller than `size`: it reads at most 65,535 blocks, the last of which
/// must be shorter than `blksize`.
pub fn too_large_without_rollover(size: u64, blksize: u16) -> bool {
    // Blocks needed: size / blksize full ones, then one shorter (possibly empty).
    size / u64::from(blksize.max(1)) + 1 > u64::from(u16::MAX)
}

/// A serial-number directory (eight hex digits, then `/`) or a known boot file name.
fn is_raspberry_pi_file(filename: &[u8]) -> bool {
    let name = filename.strip_prefix(b"/").unwrap_or(filename);
    let serial = name.len() > 9 && name[8] == b'/' && name[..8].iter().all(u8::is_ascii_hexdigit);
    let base = name.rsplit(|&b| b == b'/').next().unwrap_or(name);
    serial || RASPBERRY_PI_FILES.contains(&base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{negotiate, Limits};

    fn options(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (name, value) in pairs {
            raw.extend_from_slice(name.as_bytes());
            raw.push(0);
            raw.extend_from_slice(value.as_bytes());
            raw.push(0);
        }
        raw
    }

    /// What each client sends (netboot-platforms.md §3), by family.
    /// A family, a filename and the options its client sends.
    type Signature = (
        ClientFamily,
        &'static str,
        Vec<(&'static str, &'static str)>,
    );

    fn signatures() -> Vec<Signature> {
        use ClientFamily::*;
        vec![
            (
                Uefi,
                "bootx64.efi",
                vec![("tsize", "0"), ("blksize", "1468"), ("windowsize", "4")],
            ),
            (
                Uefi,
                "bootx64.efi",
                vec![("blksize", "1468"), ("windowsize", "4")],
            ),
            (
                Uefi,
                "bootx64.efi",
                vec![("tsize", "0"), ("blksize", "1448")],
            ),
            (
                Ipxe,
                "undionly.kpxe",
                vec![("blksize", "1432"), ("tsize", "0")],
            ),
            (
                Pxelinux,
                "pxelinux.cfg/default",
                vec![("tsize", "0"), ("blksize", "1408")],
            ),
            (
                Grub,
                "grub/grub.cfg",
                vec![("tsize", "0"), ("blksize", "1024")],
            ),
            (
                UBoot,
                "zImage",
                vec![("timeout", "5"), ("tsize", "0"), ("blksize", "1468")],
            ),
            (
                RaspberryPi,
                "1a2b3c4d/start4.elf",
                vec![("tsize", "0"), ("blksize", "1024")],
            ),
            (
                RaspberryPi,
                "bootcode.bin",
                vec![("tsize", "0"), ("blksize", "1024")],
            ),
            (PxeRom, "pxelinux.0", vec![("tsize", "0")]),
            (PxeRom, "pxelinux.0", vec![("blksize", "1456")]),
            (
                Shim,
                "grubx64.efi",
                vec![("blksize", "512"), ("tsize", "0")],
            ),
            (
                URoot,
                "kernel",
                vec![("blksize", "1450"), ("windowsize", "64")],
            ),
            (Plain, "file", vec![]),
            (
                Other,
                "file",
                vec![("blksize", "8192"), ("windowsize", "16")],
            ),
            (Other, "file", vec![("blksize", "junk")]),
        ]
    }

    #[test]
    fn each_clients_requests_land_in_its_family() {
        for (family, filename, pairs) in signatures() {
            let raw = options(&pairs);
            let options = Options::parse(&raw).unwrap();
            assert_eq!(
                ClientFamily::classify(filename.as_bytes(), options),
                family,
                "{filename} {pairs:?}"
            );
        }
    }

    #[test]
    fn labels_are_distinct_and_every_family_is_listed_once() {
        let mut labels: Vec<_> = ClientFamily::ALL.iter().map(|f| f.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ClientFamily::ALL.len());
        for (family, _, _) in signatures() {
            assert!(ClientFamily::ALL.contains(&family));
        }
    }

    #[test]
    fn no_family_gets_an_option_it_did_not_ask_for_and_timeouts_come_back_as_sent() {
        for (family, _, pairs) in signatures() {
            let raw = options(&pairs);
            let negotiated = negotiate(
                Options::parse(&raw).unwrap(),
                &Limits::default(),
                Some(1 << 20),
            );
            for (kind, value) in &negotiated.acked {
                let asked = pairs
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(kind.name()))
                    .unwrap_or_else(|| panic!("{family:?}: {} not asked for", kind.name()));
                if kind.name() == "timeout" {
                    assert_eq!(asked.1, value.to_string(), "{family:?}: timeout echoed");
                }
            }
        }
    }

    #[test]
    fn files_too_large_for_a_client_without_rollover() {
        // 65,535 blocks: 65,534 full ones and a shorter last one.
        let most = 65_535 * 1024 - 1;
        assert!(!too_large_without_rollover(most, 1024));
        assert!(too_large_without_rollover(most + 1, 1024));
        assert!(too_large_without_rollover(64 << 20, 1024));
        assert!(!too_large_without_rollover(0, 1024));
        assert!(!too_large_without_rollover(100, 8));
        assert!(!ClientFamily::RaspberryPi.wraps_block_numbers());
        assert!(ClientFamily::Grub.wraps_block_numbers());
    }

    #[test]
    fn raspberry_pi_names() {
        assert!(is_raspberry_pi_file(b"1a2b3c4d/start4.elf"));
        assert!(is_raspberry_pi_file(b"/DEADBEEF/kernel8.img"));
        assert!(is_raspberry_pi_file(b"start4.elf"));
        assert!(!is_raspberry_pi_file(b"grub/grub.cfg"));
        assert!(!is_raspberry_pi_file(b"1a2b3c4g/kernel8.img"));
        assert!(!is_raspberry_pi_file(b"12345678/"));
    }
}
