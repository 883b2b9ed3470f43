//! What a rule matches on, and the matching itself, without sockets: the requested name
//! (a glob or a regular expression, whose captures the actions use), the client's network,
//! the local address the request reached, the client's MAC address and its inventory entry.
//! A rule matches when every match it gives holds. The MAC is looked up only when a rule
//! that needs it is tried, and at most once per request ([`Facts`]).

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ipnet::IpNet;

use super::inventory::{Host, Inventory};
use dyntftp::mac::MacAddr;

/// What is known of one request, for matching and for the actions.
pub struct Facts<'a> {
    /// The name after remapping, without leading slashes.
    pub name: &'a [u8],
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The address the request reached.
    pub local: SocketAddr,
    mac_lookup: &'a dyn Fn() -> Option<MacAddr>,
    mac: OnceCell<Option<MacAddr>>,
}

impl<'a> Facts<'a> {
    /// Facts about a request; `mac_lookup` is called at most once, when first needed.
    pub fn new(
        name: &'a [u8],
        peer: SocketAddr,
        local: SocketAddr,
        mac_lookup: &'a dyn Fn() -> Option<MacAddr>,
    ) -> Facts<'a> {
        Facts {
            name,
            peer,
            local,
            mac_lookup,
            mac: OnceCell::new(),
        }
    }

    /// The client's MAC address (looked up on first use).
    pub fn mac(&self) -> Option<MacAddr> {
        *self.mac.get_or_init(self.mac_lookup)
    }

    /// Whether the MAC was looked up (for tests and the bounds).
    pub fn mac_looked_up(&self) -> bool {
        self.mac.get().is_some()
    }

    /// The client's inventory entry.
    pub fn host<'i>(&self, inventory: &'i Inventory) -> Option<&'i Host> {
        self.mac().and_then(|mac| inventory.get(&mac))
    }
}

/// A pattern on the requested name.
#[derive(Clone, Debug)]
pub enum NamePattern {
    /// A glob (`*` and `?` stay within a path component, `**` crosses them).
    Glob {
        /// As written.
        text: String,
        /// Compiled.
        matcher: globset::GlobMatcher,
    },
    /// A regular expression, unanchored unless written with `^` and `$`.
    Regex(regex::bytes::Regex),
}

impl NamePattern {
    /// Compiles a glob.
    pub fn glob(text: &str) -> Result<NamePattern, String> {
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.kind().to_string())?;
        Ok(NamePattern::Glob {
            text: text.to_string(),
            matcher: glob.compile_matcher(),
        })
    }

    /// Compiles a regular expression (at most 1 MiB compiled).
    pub fn regex(text: &str) -> Result<NamePattern, String> {
        regex::bytes::RegexBuilder::new(text)
            .size_limit(1 << 20)
            .build()
            .map(NamePattern::Regex)
            .map_err(|e| e.to_string())
    }

    /// The capture names a template or URL may use: `0`, `1`, … and the named groups.
    pub fn capture_names(&self) -> Vec<String> {
        match self {
            NamePattern::Glob { .. } => Vec::new(),
            NamePattern::Regex(regex) => regex
                .capture_names()
                .enumerate()
                .flat_map(|(i, name)| {
                    std::iter::once(i.to_string()).chain(name.map(str::to_string))
                })
                .collect(),
        }
    }

    /// The captures of `name`, or `None` when it does not match.
    fn captures(&self, name: &[u8]) -> Option<Captures> {
        match self {
            NamePattern::Glob { matcher, .. } => matcher
                .is_match(Path::new(OsStr::from_bytes(name)))
                .then(Captures::default),
            NamePattern::Regex(regex) => {
                let found = regex.captures(name)?;
                let mut captures = Captures::default();
                for (i, group) in regex.capture_names().enumerate() {
                    let text = found
                        .get(i)
                        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                        .unwrap_or_default();
                    if let Some(group) = group {
                        captures.0.insert(group.to_string(), text.clone());
                    }
                    captures.0.insert(i.to_string(), text);
                }
                Some(captures)
            }
        }
    }
}

/// A regular expression's captures by number (`0` is the whole match) and by name; a
/// group that did not take part is the empty string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captures(pub BTreeMap<String, String>);

/// `host = …`: which inventory entry the client must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMatch {
    /// Any (`host = true`).
    Known,
    /// The one with this `name`.
    Named(String),
}

/// Every match of one rule (all must hold; none given matches everything).
#[derive(Clone, Debug, Default)]
pub struct Matches {
    /// `filename` or `regex`.
    pub name: Option<NamePattern>,
    /// `client`: the client's address is in one of these networks.
    pub client: Vec<IpNet>,
    /// `local`: the request reached one of these addresses.
    pub local: Vec<IpAddr>,
    /// `mac`: the client's MAC is one of these.
    pub mac: Vec<MacAddr>,
    /// `host`.
    pub host: Option<HostMatch>,
}

impl Matches {
    /// Whether the MAC is needed to tell whether this rule matches.
    pub fn needs_mac(&self) -> bool {
        !self.mac.is_empty() || self.host.is_some()
    }

    /// The captures when every match holds for `facts`, else `None`. The address checks
    /// come first, then the name, then the MAC (the only one that may cost a lookup).
    pub fn check(&self, facts: &Facts<'_>, inventory: &Inventory) -> Option<Captures> {
        let peer = facts.peer.ip().to_canonical();
        if !self.client.is_empty() && !self.client.iter().any(|net| net.contains(&peer)) {
            return None;
        }
        let local = facts.local.ip().to_canonical();
        if !self.local.is_empty() && !self.local.contains(&local) {
            return None;
        }
        let captures = match &self.name {
            Some(pattern) => pattern.captures(facts.name)?,
            None => Captures::default(),
        };
        if !self.mac.is_empty() && !facts.mac().is_some_and(|mac| self.mac.contains(&mac)) {
            return None;
        }
        match &self.host {
            None => {}
            Some(HostMatch::Known) => facts.host(inventory).map(|_| ())?,
            Some(HostMatch::Named(name)) => facts
                .host(inventory)
                .filter(|host| host.name.as_deref() == Some(name.as_str()))
                .map(|_| ())?,
        }
        Some(captures)
    }

    /// The matches as `key = value` pairs, for `--check-config` (`any` for none).
    pub fn describe(&self) -> String {
        let mut out = Vec::new();
        match &self.name {
            Some(NamePattern::Glob { text, .. }) => out.push(format!("filename = {text:?}")),
            Some(NamePattern::Regex(regex)) => out.push(format!("regex = {:?}", regex.as_str())),
            None => {}
        }
        let list = |items: Vec<String>| {
            let mut text = String::from("[");
            for (i, item) in items.iter().enumerate() {
                let _ = write!(text, "{}{item:?}", if i > 0 { ", " } else { "" });
            }
            text + "]"
        };
        if !self.client.is_empty() {
            out.push(format!(
                "client = {}",
                list(self.client.iter().map(|n| n.to_string()).collect())
            ));
        }
        if !self.local.is_empty() {
            out.push(format!(
                "local = {}",
                list(self.local.iter().map(|a| a.to_string()).collect())
            ));
        }
        if !self.mac.is_empty() {
            out.push(format!(
                "mac = {}",
                list(self.mac.iter().map(|m| m.to_string()).collect())
            ));
        }
        match &self.host {
            Some(HostMatch::Known) => out.push("host = true".into()),
            Some(HostMatch::Named(name)) => out.push(format!("host = {name:?}")),
            None => {}
        }
        if out.is_empty() {
            "any".into()
        } else {
            out.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MAC: MacAddr = MacAddr([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01]);

    fn inventory() -> Inventory {
        let mut inventory = Inventory::default();
        inventory
            .add_tables(
                Path::new("f"),
                "[\"aa:bb:cc:dd:ee:01\"]\nname = \"node1\"\n"
                    .parse::<toml::Table>()
                    .unwrap(),
            )
            .unwrap();
        inventory
    }

    /// Checks `matches` against a request for `name` from `peer` to `local`, whose MAC
    /// lookup answers `mac`; returns the captures and how many lookups were made.
    fn check(
        matches: &Matches,
        name: &str,
        peer: &str,
        local: &str,
        mac: Option<MacAddr>,
    ) -> (Option<Captures>, usize) {
        let lookups = Cell::new(0);
        let lookup = || {
            lookups.set(lookups.get() + 1);
            mac
        };
        let facts = Facts::new(
            name.as_bytes(),
            peer.parse().unwrap(),
            local.parse().unwrap(),
            &lookup,
        );
        let captures = matches.check(&facts, &inventory());
        // A second use of the MAC never looks it up again.
        let _ = facts.mac();
        let _ = facts.mac();
        (captures, lookups.get())
    }

    #[test]
    fn glob_keeps_star_within_a_component() {
        let matches = Matches {
            name: Some(NamePattern::glob("grub/grub.cfg-01-*").unwrap()),
            ..Matches::default()
        };
        let (hit, _) = check(
            &matches,
            "grub/grub.cfg-01-aa",
            "10.0.0.5:1",
            "10.0.0.1:69",
            None,
        );
        assert_eq!(hit, Some(Captures::default()));
        let (miss, _) = check(
            &matches,
            "grub/grub.cfg-01-a/b",
            "10.0.0.5:1",
            "10.0.0.1:69",
            None,
        );
        assert_eq!(miss, None);
        let star = Matches {
            name: Some(NamePattern::glob("images/**").unwrap()),
            ..Matches::default()
        };
        assert!(
            check(&star, "images/a/b/c", "10.0.0.5:1", "10.0.0.1:69", None)
                .0
                .is_some()
        );
    }

    #[test]
    fn regex_captures_by_number_and_name() {
        let matches = Matches {
            name: Some(NamePattern::regex(r"^pxelinux\.cfg/01-(?P<mac>[0-9a-f-]{17})$").unwrap()),
            ..Matches::default()
        };
        let (captures, lookups) = check(
            &matches,
            "pxelinux.cfg/01-aa-bb-cc-dd-ee-01",
            "10.0.0.5:1",
            "10.0.0.1:69",
            None,
        );
        let captures = captures.unwrap().0;
        assert_eq!(captures["mac"], "aa-bb-cc-dd-ee-01");
        assert_eq!(captures["1"], "aa-bb-cc-dd-ee-01");
        assert_eq!(captures["0"], "pxelinux.cfg/01-aa-bb-cc-dd-ee-01");
        // Matching by name alone never needs the MAC (only the forced uses above).
        assert_eq!(lookups, 1);
        assert!(!matches.needs_mac());
        assert_eq!(
            NamePattern::regex("^(a)(?P<b>b)$").unwrap().capture_names(),
            ["0", "1", "2", "b"]
        );
    }

    #[test]
    fn client_and_local_addresses() {
        let matches = Matches {
            client: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            local: vec!["10.0.0.1".parse().unwrap()],
            ..Matches::default()
        };
        assert!(check(&matches, "x", "10.1.2.3:1", "10.0.0.1:69", None)
            .0
            .is_some());
        // An IPv4-mapped IPv6 client counts as IPv4.
        assert!(check(
            &matches,
            "x",
            "[::ffff:10.1.2.3]:1",
            "[::ffff:10.0.0.1]:69",
            None
        )
        .0
        .is_some());
        assert!(check(&matches, "x", "192.168.1.1:1", "10.0.0.1:69", None)
            .0
            .is_none());
        assert!(check(&matches, "x", "10.1.2.3:1", "10.0.0.2:69", None)
            .0
            .is_none());
    }

    #[test]
    fn mac_and_host_matches_look_the_mac_up_once() {
        let by_mac = Matches {
            mac: vec![MAC],
            ..Matches::default()
        };
        assert!(by_mac.needs_mac());
        let (hit, lookups) = check(&by_mac, "x", "10.0.0.5:1", "10.0.0.1:69", Some(MAC));
        assert!(hit.is_some());
        assert_eq!(lookups, 1);
        assert!(check(&by_mac, "x", "10.0.0.5:1", "10.0.0.1:69", None)
            .0
            .is_none());
        let known = Matches {
            host: Some(HostMatch::Known),
            ..Matches::default()
        };
        assert!(check(&known, "x", "10.0.0.5:1", "10.0.0.1:69", Some(MAC))
            .0
            .is_some());
        let other = MacAddr([2, 0, 0, 0, 0, 1]);
        assert!(check(&known, "x", "10.0.0.5:1", "10.0.0.1:69", Some(other))
            .0
            .is_none());
        let named = |name: &str| Matches {
            host: Some(HostMatch::Named(name.into())),
            ..Matches::default()
        };
        assert!(
            check(&named("node1"), "x", "10.0.0.5:1", "10.0.0.1:69", Some(MAC))
                .0
                .is_some()
        );
        assert!(
            check(&named("node2"), "x", "10.0.0.5:1", "10.0.0.1:69", Some(MAC))
                .0
                .is_none()
        );
    }

    #[test]
    fn a_failed_address_match_skips_the_mac_lookup() {
        let matches = Matches {
            client: vec!["10.0.0.0/8".parse().unwrap()],
            mac: vec![MAC],
            ..Matches::default()
        };
        let lookups = Cell::new(0);
        let lookup = || {
            lookups.set(lookups.get() + 1);
            Some(MAC)
        };
        let facts = Facts::new(
            b"x",
            "192.168.0.1:1".parse().unwrap(),
            "10.0.0.1:69".parse().unwrap(),
            &lookup,
        );
        assert!(matches.check(&facts, &inventory()).is_none());
        assert!(!facts.mac_looked_up());
        assert_eq!(lookups.get(), 0);
    }

    #[test]
    fn describe_lists_the_matches() {
        let matches = Matches {
            name: Some(NamePattern::glob("a/*").unwrap()),
            client: vec!["10.0.0.0/8".parse().unwrap()],
            host: Some(HostMatch::Known),
            ..Matches::default()
        };
        assert_eq!(
            matches.describe(),
            "filename = \"a/*\", client = [\"10.0.0.0/8\"], host = true"
        );
        assert_eq!(Matches::default().describe(), "any");
    }
}
