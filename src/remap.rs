//! Filename remapping: rewrite the requested name before the handler sees it.
//!
//! [`Remap`] wraps any [`Handler`]: for each request it runs a [`Rewrite`] on the
//! filename, then calls the inner handler with the rewritten name (the peer, addresses,
//! mode and options are unchanged). The rewrite can also refuse the request. A closure
//! is a `Rewrite`, and so is [`Rules`], a list of the rules users of tftpd-hpa's
//! `--map-file` and dnsmasq need most:
//!
//! ```
//! use dyntftp::remap::{Remap, Rules};
//! use dyntftp::FsHandler;
//!
//! # fn main() -> std::io::Result<()> {
//! # let dir = std::env::temp_dir();
//! let files = FsHandler::new(&dir)?.ignore_case(true);
//! // "/tftpboot/PXELinux.cfg\Default" is opened as "pxelinux.cfg/default".
//! let handler = Remap::new(files, Rules::new().backslash().strip_prefix("/tftpboot").lowercase());
//! # let _ = handler;
//! # Ok(())
//! # }
//! ```
//!
//! A closure gets the whole request, so it can remap by client too:
//!
//! ```
//! use dyntftp::remap::Remap;
//! use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData};
//!
//! struct Echo;
//! impl Handler for Echo {
//!     fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
//!         Ok(Box::new(BytesSource::new(req.filename.to_vec())))
//!     }
//! }
//!
//! // tftpd-hpa's `r ^pxelinux.cfg/default pxelinux.cfg/\i` (\i = the client's address).
//! let handler = Remap::new(Echo, |req: &ReadRequest<'_>, name: &mut Vec<u8>| {
//!     if name == b"pxelinux.cfg/default" {
//!         *name = format!("pxelinux.cfg/{}", req.peer.ip()).into_bytes();
//!     }
//!     Ok::<(), Reject>(())
//! });
//! # let _ = handler;
//! ```
//!
//! Where the other remapping features live: backslashes are already path separators for
//! [`FsHandler`](crate::FsHandler) (the [`Rules::backslash`] rule is for handlers that
//! match names as text); case-insensitive *lookup* (find `Boot/BCD` when asked for
//! `boot/bcd`, whatever the case on disk) is [`FsHandler::ignore_case`](crate::FsHandler::ignore_case),
//! because it needs the directory contents; per-client root directories (dnsmasq's
//! `--tftp-unique-root`) are [`FsHandler::unique_root`](crate::FsHandler::unique_root),
//! because they need to know whether a file exists.
//!
//! Statistics ([`SessionStats::filename`](crate::SessionStats)) and logs keep the name
//! the client sent.

use std::fmt;

use crate::handler::{Handler, ReadRequest, Reject};
use crate::response::ResponseData;
use crate::stats::{LogText, ServerStats, SessionStats};

/// Rewrites a requested filename in place, or refuses the request.
pub trait Rewrite {
    /// Rewrites `name` (initially the name the client sent) for `request`.
    fn rewrite(&self, request: &ReadRequest<'_>, name: &mut Vec<u8>) -> Result<(), Reject>;
}

impl<F> Rewrite for F
where
    F: Fn(&ReadRequest<'_>, &mut Vec<u8>) -> Result<(), Reject>,
{
    fn rewrite(&self, request: &ReadRequest<'_>, name: &mut Vec<u8>) -> Result<(), Reject> {
        self(request, name)
    }
}

/// One built-in rule (see [`Rules`]).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Every `\` becomes `/` (Windows clients: `\Boot\BCD`).
    Backslash,
    /// ASCII letters become lower case (dnsmasq's `--tftp-lowercase`; for trees kept in
    /// lower case, e.g. MAC-named PXELINUX configs requested in upper case).
    Lowercase,
    /// A leading path prefix is removed (`/tftpboot` turns `/tftpboot/pxelinux.0` into
    /// `pxelinux.0`). Leading separators (`/`, `\`) of the name and of the prefix are
    /// ignored, and the prefix must end at a separator or at the end of the name:
    /// `/tftpboot` does not strip anything from `/tftpboot2/x`. Case-sensitive. A name
    /// without the prefix is left alone.
    StripPrefix(Vec<u8>),
    /// Every occurrence of a byte string is replaced by another (tftpd-hpa's `rg`, without
    /// regular expressions).
    Replace {
        /// What to look for (an empty pattern does nothing).
        from: Vec<u8>,
        /// What to put instead.
        to: Vec<u8>,
    },
}

impl Rule {
    /// Applies this rule to `name`.
    pub fn apply(&self, name: &mut Vec<u8>) {
        match self {
            Rule::Backslash => {
                for b in name.iter_mut() {
                    if *b == b'\\' {
                        *b = b'/';
                    }
                }
            }
            Rule::Lowercase => name.make_ascii_lowercase(),
            Rule::StripPrefix(prefix) => {
                let is_sep = |b: &u8| *b == b'/' || *b == b'\\';
                let prefix_start = prefix.iter().position(|b| !is_sep(b));
                let Some(prefix_start) = prefix_start else {
                    return; // an empty prefix (or only separators) strips nothing
                };
                let prefix = &prefix[prefix_start..];
                let start = name.iter().position(|b| !is_sep(b)).unwrap_or(name.len());
                let rest = &name[start..];
                let Some(after) = rest.strip_prefix(prefix) else {
                    return;
                };
                if after.first().is_some_and(|b| !is_sep(b)) && !prefix.ends_with(b"/") {
                    return; // "tftpboot2" does not start with the directory "tftpboot"
                }
                let after_start = after.iter().position(|b| !is_sep(b)).unwrap_or(after.len());
                *name = after[after_start..].to_vec();
            }
            Rule::Replace { from, to } => {
                if from.is_empty() {
                    return;
                }
                let mut out = Vec::with_capacity(name.len());
                let mut rest = &name[..];
                while let Some(pos) = rest.windows(from.len()).position(|w| w == from) {
                    out.extend_from_slice(&rest[..pos]);
                    out.extend_from_slice(to);
                    rest = &rest[pos + from.len()..];
                }
                out.extend_from_slice(rest);
                *name = out;
            }
        }
    }
}

/// Built-in rules, applied in the order they were added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// No rules: names pass unchanged.
    pub fn new() -> Rules {
        Rules::default()
    }

    /// Adds any rule.
    pub fn push(mut self, rule: Rule) -> Rules {
        self.rules.push(rule);
        self
    }

    /// Adds [`Rule::Backslash`].
    pub fn backslash(self) -> Rules {
        self.push(Rule::Backslash)
    }

    /// Adds [`Rule::Lowercase`].
    pub fn lowercase(self) -> Rules {
        self.push(Rule::Lowercase)
    }

    /// Adds [`Rule::StripPrefix`].
    pub fn strip_prefix(self, prefix: impl Into<Vec<u8>>) -> Rules {
        self.push(Rule::StripPrefix(prefix.into()))
    }

    /// Adds [`Rule::Replace`].
    pub fn replace(self, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> Rules {
        self.push(Rule::Replace {
            from: from.into(),
            to: to.into(),
        })
    }

    /// True when there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Applies every rule, in order, to `name`.
    pub fn apply(&self, name: &mut Vec<u8>) {
        for rule in &self.rules {
            rule.apply(name);
        }
    }
}

impl Rewrite for Rules {
    fn rewrite(&self, _request: &ReadRequest<'_>, name: &mut Vec<u8>) -> Result<(), Reject> {
        self.apply(name);
        Ok(())
    }
}

/// A handler that rewrites each requested filename, then asks `inner` (see the [module
/// docs](self)). The statistics callbacks are passed through.
#[derive(Clone)]
pub struct Remap<H, R = Rules> {
    inner: H,
    rewrite: R,
}

impl<H: Handler, R: Rewrite> Remap<H, R> {
    /// Wraps `inner`, rewriting names with `rewrite`.
    pub fn new(inner: H, rewrite: R) -> Remap<H, R> {
        Remap { inner, rewrite }
    }

    /// The wrapped handler.
    pub fn inner(&self) -> &H {
        &self.inner
    }

    /// The wrapped handler, mutably.
    pub fn inner_mut(&mut self) -> &mut H {
        &mut self.inner
    }
}

impl<H: Handler, R: Rewrite> Handler for Remap<H, R> {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let mut name = request.filename.to_vec();
        self.rewrite.rewrite(request, &mut name)?;
        if name != request.filename {
            log::debug!(
                "{}: {} remapped to {}",
                request.peer,
                LogText(request.filename),
                LogText(&name)
            );
        }
        let remapped = ReadRequest {
            filename: &name,
            ..*request
        };
        self.inner.open(&remapped)
    }

    fn session_finished(&mut self, stats: &SessionStats) {
        self.inner.session_finished(stats)
    }

    fn server_stats(&mut self, stats: &ServerStats) {
        self.inner.server_stats(stats)
    }
}

impl<H: fmt::Debug, R: fmt::Debug> fmt::Debug for Remap<H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remap")
            .field("inner", &self.inner)
            .field("rewrite", &self.rewrite)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Notifier;
    use crate::packet::{ErrorCode, Mode, Options};
    use crate::response::BytesSource;

    fn applied(rules: &Rules, name: &[u8]) -> Vec<u8> {
        let mut name = name.to_vec();
        rules.apply(&mut name);
        name
    }

    #[test]
    fn rules_vectors() {
        let backslash = Rules::new().backslash();
        assert_eq!(applied(&backslash, b"\\Boot\\BCD"), b"/Boot/BCD");
        let lower = Rules::new().lowercase();
        assert_eq!(
            applied(&lower, b"PXELINUX.CFG/01-AA-BB\xc3\x89"),
            b"pxelinux.cfg/01-aa-bb\xc3\x89"
        );
        let strip = Rules::new().strip_prefix("/tftpboot");
        let cases: &[(&[u8], &[u8])] = &[
            (b"/tftpboot/pxelinux.0", b"pxelinux.0"),
            (b"tftpboot/pxelinux.0", b"pxelinux.0"),
            (b"//tftpboot//a/b", b"a/b"),
            (b"\\tftpboot\\x", b"x"),
            (b"/tftpboot", b""),
            (b"/tftpboot2/x", b"/tftpboot2/x"),
            (b"/srv/tftpboot/x", b"/srv/tftpboot/x"),
            (b"/TFTPBOOT/x", b"/TFTPBOOT/x"),
            (b"x", b"x"),
            (b"", b""),
        ];
        for (name, want) in cases {
            assert_eq!(applied(&strip, name), *want, "{}", name.escape_ascii());
        }
        // A prefix ending in "/" is a directory already.
        assert_eq!(
            applied(&Rules::new().strip_prefix("tftp/"), b"tftp/x"),
            b"x"
        );
        assert_eq!(applied(&Rules::new().strip_prefix("/"), b"/x"), b"/x");
        let replace = Rules::new().replace("..", "").replace("ab", "xyz");
        assert_eq!(applied(&replace, b"a..bab/abab"), b"xyzxyz/xyzxyz");
        assert_eq!(applied(&Rules::new().replace("", "x"), b"abc"), b"abc");
        // Order matters: rules run as added.
        let both = Rules::new().backslash().strip_prefix("Boot").lowercase();
        assert_eq!(applied(&both, b"\\Boot\\BCD"), b"bcd");
        assert!(Rules::new().is_empty() && !both.is_empty());
    }

    /// Serves the name it was asked for, and records it.
    #[derive(Debug, Default)]
    struct Echo {
        seen: Vec<Vec<u8>>,
    }

    impl Handler for Echo {
        fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
            self.seen.push(req.filename.to_vec());
            Ok(Box::new(BytesSource::new(req.filename.to_vec())))
        }
    }

    fn open<H: Handler>(h: &mut H, peer: &str, name: &[u8]) -> Result<Vec<u8>, Reject> {
        let notifier = Notifier::detached();
        let req = ReadRequest {
            peer: peer.parse().unwrap(),
            local: "192.0.2.1:69".parse().unwrap(),
            filename: name,
            mode: Mode::Octet,
            options: Options::EMPTY,
            notifier: &notifier,
            notes: &crate::handler::SessionNotes::default(),
            now: std::time::Instant::now(),
        };
        let mut source = h.open(&req)?;
        let mut buf = vec![0u8; 256];
        let n = source.read(&mut buf).unwrap();
        Ok(buf[..n].to_vec())
    }

    #[test]
    fn remap_rewrites_before_the_inner_handler() {
        let mut h = Remap::new(Echo::default(), Rules::new().backslash().lowercase());
        assert_eq!(
            open(&mut h, "192.0.2.9:1", b"\\Boot\\BCD").unwrap(),
            b"/boot/bcd"
        );
        assert_eq!(h.inner().seen, [b"/boot/bcd".to_vec()]);
        h.inner_mut().seen.clear();

        // A closure sees the request and can refuse.
        let mut h = Remap::new(
            Echo::default(),
            |req: &ReadRequest<'_>, name: &mut Vec<u8>| {
                if name.starts_with(b"private/") {
                    return Err(Reject::access_violation());
                }
                if name == b"pxelinux.cfg/default" {
                    *name = format!("pxelinux.cfg/{}", req.peer.ip()).into_bytes();
                }
                Ok(())
            },
        );
        assert_eq!(
            open(&mut h, "192.0.2.9:1", b"pxelinux.cfg/default").unwrap(),
            b"pxelinux.cfg/192.0.2.9"
        );
        assert_eq!(
            open(&mut h, "192.0.2.9:1", b"private/x").unwrap_err().code,
            ErrorCode::AccessViolation
        );
        assert_eq!(
            h.inner().seen.len(),
            1,
            "a refused request never reaches the handler"
        );
    }
}
