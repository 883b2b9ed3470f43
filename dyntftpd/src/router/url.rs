//! `http` URL templates: `http://repo/boot/{path}?mac={mac}`. Placeholders are `{path}`
//! (the remapped name, `/` kept), `{ip}` (the client's address), `{port}` (its port),
//! `{mac}` (`aa:bb:cc:dd:ee:ff`), `{mac_dashed}` and the capture names and numbers of the
//! rule's `regex`. Everything put into the URL is percent-encoded but the unreserved
//! characters (RFC 3986). `{path}` is split and confined as a directory's names are
//! ([`dyntftp::fs::components`]: `..` cannot climb above it), and a capture that is `.` or
//! `..` is refused, so that a client's name cannot reach outside the URL's path.

use std::fmt::Write as _;

use dyntftp::fs::components;
use dyntftp::Reject;
use percent_encoding::percent_encode;

use crate::upstream::url::UNRESERVED;

use super::matcher::Captures;
use dyntftp::mac::MacAddr;

/// One piece of a URL template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Path,
    Ip,
    Port,
    Mac,
    MacDashed,
    Capture(String),
}

/// A compiled URL template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlTemplate {
    text: String,
    pieces: Vec<Piece>,
}

/// What a URL is made of for one request.
pub struct UrlValues<'a> {
    /// The remapped name.
    pub path: &'a [u8],
    /// The client's address and port.
    pub peer: std::net::SocketAddr,
    /// The client's MAC, when known.
    pub mac: Option<MacAddr>,
    /// The rule's captures.
    pub captures: &'a Captures,
}

impl UrlTemplate {
    /// Compiles `text`, which must start with `http://` or `https://`; `captures` are the
    /// capture names the rule's regex defines.
    pub fn parse(text: &str, captures: &[String]) -> Result<UrlTemplate, String> {
        if !(text.starts_with("http://") || text.starts_with("https://")) {
            return Err(format!("{text:?} is not an http:// or https:// URL"));
        }
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("unmatched '}}' in {text:?}"));
            }
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unmatched '{{' in {text:?}"))?;
            let name = &rest[open + 1..open + close];
            pieces.push(match name {
                "path" => Piece::Path,
                "ip" => Piece::Ip,
                "port" => Piece::Port,
                "mac" => Piece::Mac,
                "mac_dashed" => Piece::MacDashed,
                _ if captures.iter().any(|c| c == name) => Piece::Capture(name.to_string()),
                _ => {
                    return Err(format!(
                        "unknown placeholder {{{name}}} (expected path, ip, port, mac, mac_dashed or a capture of the rule's regex)"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(UrlTemplate {
            text: text.to_string(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the URL needs the client's MAC.
    pub fn uses_mac(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Mac | Piece::MacDashed))
    }

    /// The URL for one request, or the refusal: ERROR 1 when the template uses the MAC
    /// and the client's is not known, the directory's refusals for `{path}`, ERROR 2 for a
    /// capture that is `.` or `..`.
    pub fn render(&self, values: &UrlValues<'_>) -> Result<String, Reject> {
        let mut url = String::with_capacity(self.text.len() + values.path.len() * 3);
        let mac = || values.mac.ok_or_else(Reject::not_found);
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => url.push_str(text),
                Piece::Path => {
                    for (i, part) in components(values.path)?.into_iter().enumerate() {
                        if i > 0 {
                            url.push('/');
                        }
                        let _ = write!(url, "{}", percent_encode(part, UNRESERVED));
                    }
                }
                Piece::Ip => {
                    let ip = values.peer.ip().to_canonical().to_string();
                    let _ = write!(url, "{}", percent_encode(ip.as_bytes(), UNRESERVED));
                }
                Piece::Port => {
                    let _ = write!(url, "{}", values.peer.port());
                }
                Piece::Mac => {
                    let text = mac()?.to_string();
                    let _ = write!(url, "{}", percent_encode(text.as_bytes(), UNRESERVED));
                }
                Piece::MacDashed => url.push_str(&mac()?.dashed()),
                Piece::Capture(name) => {
                    let value = values.captures.0.get(name).map_or("", String::as_str);
                    if value == "." || value == ".." {
                        return Err(Reject::access_violation());
                    }
                    let _ = write!(url, "{}", percent_encode(value.as_bytes(), UNRESERVED));
                }
            }
        }
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(
        template: &str,
        path: &str,
        captures: &[(&str, &str)],
        mac: Option<MacAddr>,
    ) -> Result<String, u16> {
        let names: Vec<String> = captures.iter().map(|(k, _)| k.to_string()).collect();
        let template = UrlTemplate::parse(template, &names).unwrap();
        let captures = Captures(
            captures
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        template
            .render(&UrlValues {
                path: path.as_bytes(),
                peer: "10.0.0.5:2070".parse().unwrap(),
                mac,
                captures: &captures,
            })
            .map_err(|reject| reject.code.to_u16())
    }

    #[test]
    fn placeholders_are_filled_and_encoded() {
        let mac = Some(MacAddr([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01]));
        assert_eq!(
            render("http://repo/boot/{path}?ip={ip}&port={port}&mac={mac}", "grub/a b#?.cfg", &[], mac)
                .unwrap(),
            "http://repo/boot/grub/a%20b%23%3F.cfg?ip=10.0.0.5&port=2070&mac=aa%3Abb%3Acc%3Add%3Aee%3A01"
        );
        assert_eq!(
            render(
                "https://r/{mac_dashed}/{serial}",
                "x",
                &[("serial", "ab/cd")],
                mac
            )
            .unwrap(),
            "https://r/aa-bb-cc-dd-ee-01/ab%2Fcd"
        );
    }

    #[test]
    fn path_is_confined_and_a_missing_mac_is_refused() {
        // Resolved as a directory resolves names: never above the URL's path.
        assert_eq!(
            render("http://r/b/{path}", "a/../c", &[], None).unwrap(),
            "http://r/b/c"
        );
        assert_eq!(
            render("http://r/b/{path}", "/./c//d", &[], None).unwrap(),
            "http://r/b/c/d"
        );
        assert_eq!(
            render("http://r/b/{path}", "a/..b", &[], None).unwrap(),
            "http://r/b/a/..b"
        );
        assert_eq!(
            render("http://r/b/{path}", "../etc/passwd", &[], None),
            Err(2)
        );
        assert_eq!(render("http://r/x/{c}", "y", &[("c", "..")], None), Err(2));
        assert_eq!(render("http://r/{mac}", "y", &[], None), Err(1));
    }

    #[test]
    fn bad_templates_are_refused() {
        for (text, why) in [
            ("ftp://r/{path}", "not an http:// or https:// URL"),
            ("http://r/{nope}", "unknown placeholder {nope}"),
            ("http://r/{path", "unmatched '{'"),
            ("http://r/path}", "unmatched '}'"),
        ] {
            let err = UrlTemplate::parse(text, &[]).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        let t = UrlTemplate::parse("http://r/{mac}", &[]).unwrap();
        assert!(t.uses_mac());
        assert!(!UrlTemplate::parse("http://r/{path}", &[])
            .unwrap()
            .uses_mac());
    }
}
