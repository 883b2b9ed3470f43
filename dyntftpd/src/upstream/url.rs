//! Turning a TFTP filename into a repository URL, and into a header value.

use dyntftp::Reject;
use percent_encoding::{percent_encode, AsciiSet, CONTROLS, NON_ALPHANUMERIC};

/// Kept as they are in a path segment: RFC 3986's unreserved characters.
pub(crate) const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encoded in a header value: control characters, `%` itself (and, as always, every byte
/// above 0x7e).
const HEADER_UNSAFE: &AsciiSet = &CONTROLS.add(b'%');

/// `base` followed by the filename's components, each percent-encoded: a name can only
/// add path segments below `base` (`..` cannot climb above it, control characters are
/// refused — the same confinement as a directory, [`dyntftp::fs::components`]).
pub fn join(base: &str, filename: &[u8]) -> Result<String, Reject> {
    let parts = dyntftp::fs::components(filename)?;
    if parts.is_empty() {
        return Err(Reject::not_found());
    }
    let mut url = base.trim_end_matches('/').to_owned();
    for part in parts {
        url.push('/');
        url.extend(percent_encode(part, UNRESERVED));
    }
    Ok(url)
}

/// The filename as a header value: printable ASCII as is, anything else (control
/// characters, bytes above 0x7e, `%` itself) percent-encoded, so no request can inject a
/// header line.
pub fn header_value(filename: &[u8]) -> String {
    percent_encode(filename, HEADER_UNSAFE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_encoded_segments_below_the_base() {
        assert_eq!(
            join("http://repo/boot/", b"\\images//x86/vmlinuz").unwrap(),
            "http://repo/boot/images/x86/vmlinuz"
        );
        assert_eq!(
            join("http://repo", b"a b/c?d#e%f").unwrap(),
            "http://repo/a%20b/c%3Fd%23e%25f"
        );
        assert_eq!(join("http://repo", b"x/../y").unwrap(), "http://repo/y");
    }

    #[test]
    fn names_cannot_leave_the_base() {
        assert!(join("http://repo/boot", b"../etc/passwd").is_err());
        assert!(join("http://repo/boot", b"a\nb").is_err());
        assert!(join("http://repo/boot", b"/").is_err());
        assert!(join("http://repo/boot", b".").is_err());
    }

    #[test]
    fn header_values_carry_no_control_characters() {
        assert_eq!(header_value(b"pxelinux.cfg/01-aa"), "pxelinux.cfg/01-aa");
        assert_eq!(header_value(b"a\r\nX: y%\xff"), "a%0D%0AX: y%25%FF");
    }
}
