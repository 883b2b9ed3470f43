//! The library API the router uses that branch `backend` adds (api14 §2): until it is
//! merged, the same signatures implemented here, from the filename only. Replaced by
//! `dyntftp::mac::MacAddr` and `ReadRequest::mac` on merge.

use std::fmt;

use dyntftp::ReadRequest;

/// A MAC address (api14 §2 `dyntftp::mac::MacAddr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// `aa:bb:cc:dd:ee:ff` or `aa-bb-cc-dd-ee-ff`, any case.
    pub fn parse(text: &str) -> Option<MacAddr> {
        let bytes = text.as_bytes();
        if bytes.len() != 17 {
            return None;
        }
        let sep = bytes[2];
        if sep != b':' && sep != b'-' {
            return None;
        }
        let mut mac = [0u8; 6];
        for (i, octet) in mac.iter_mut().enumerate() {
            if i > 0 && bytes[i * 3 - 1] != sep {
                return None;
            }
            let hex = std::str::from_utf8(&bytes[i * 3..i * 3 + 2]).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *octet = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(MacAddr(mac))
    }

    /// The standard filename forms: `…01-aa-bb-cc-dd-ee-ff` (PXELINUX, `grub.cfg-01-…`) at
    /// the end of the name, or a `<mac>/` first component.
    pub fn from_filename(name: &[u8]) -> Option<MacAddr> {
        let text = std::str::from_utf8(name).ok()?;
        let text = text.trim_start_matches('/');
        if let Some(first) = text.split('/').next().filter(|_| text.contains('/')) {
            if let Some(mac) = MacAddr::parse(first) {
                return Some(mac);
            }
        }
        let tail = text.get(text.len().checked_sub(20)?..)?;
        tail.strip_prefix("01-")
            .filter(|mac| mac.contains('-'))
            .and_then(MacAddr::parse)
    }

    /// `aa-bb-cc-dd-ee-ff`.
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The client's MAC (api14 §2 `ReadRequest::mac`): here from the filename only.
pub fn request_mac(request: &ReadRequest<'_>) -> Option<MacAddr> {
    MacAddr::from_filename(request.filename)
}
