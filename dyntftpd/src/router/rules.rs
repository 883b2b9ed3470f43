//! The router's tables in the configuration file, read and checked at start-up: the
//! ordered `[[rule]]` array, the `[host."MAC"]` tables and `inventory = "PATH"`. Other
//! keys belong to the settings and are left alone here.
//!
//! Every error names the file, the line, the rule (its name, or `rule-N`) and the key.
//! Relative paths (`directory`, `template`, `inventory`) are relative to the directory of
//! the configuration file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use dyntftp::remap::{Remap, Rules};
use dyntftp::{ErrorCode, FsHandler, Reject};
use serde::Deserialize;
use toml::Spanned;

use super::inventory::Inventory;
use super::matcher::{HostMatch, Matches, NamePattern};
use super::template::Template;
use super::url::UrlTemplate;
use dyntftp::mac::MacAddr;

/// The most rules a file may have: matching costs one pass over them per request.
pub const MAX_RULES: usize = 1000;
/// The longest `refuse` message (it must fit in one ERROR datagram of any client).
pub const MAX_REFUSE_MESSAGE: usize = 200;

/// A configuration error: the file and what is wrong (with the line, rule and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub why: String,
}

impl ConfigError {
    /// An error in `file`.
    pub fn new(file: &Path, why: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            position: None,
            why: why.into(),
        }
    }

    /// An error at byte `offset` of `file`'s `text`.
    pub fn at(file: &Path, text: &str, offset: usize, why: impl Into<String>) -> ConfigError {
        ConfigError {
            position: Some(line_and_column(text, offset)),
            ..ConfigError::new(file, why)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(
                f,
                "{}: line {line}, column {column}: {}",
                self.file.display(),
                self.why
            ),
            None => write!(f, "{}: {}", self.file.display(), self.why),
        }
    }
}

/// Reads a template or inventory file of at most `max` bytes (see
/// [`config::read_bounded`](crate::config::read_bounded)).
pub fn read_bounded(path: &Path, max: u64) -> Result<String, ConfigError> {
    crate::config::read_bounded(path, max)
        .map_err(|why| ConfigError::new(path, format!("cannot read: {why}")))
}

/// The settings the rules start from: today's `root` and remapping options.
#[derive(Clone, Debug, Default)]
pub struct Defaults {
    /// `root`.
    pub root: PathBuf,
    /// `ignore-case`, for the root.
    pub ignore_case: bool,
    /// `unique-root`, for the root.
    pub unique_root: bool,
    /// `lowercase`: before matching.
    pub lowercase: bool,
    /// `strip-prefix`: before matching.
    pub strip_prefix: Vec<String>,
    /// `cache`, for the root.
    pub cache: u64,
}

impl Defaults {
    /// The remapping every name goes through before matching: backslashes, then case,
    /// then prefixes (so that prefixes match however the client wrote them).
    pub fn remap(&self) -> Rules {
        let mut rules = Rules::new().backslash();
        if self.lowercase {
            rules = rules.lowercase();
        }
        for prefix in &self.strip_prefix {
            rules = rules.strip_prefix(prefix.as_bytes());
        }
        rules
    }
}

/// One `[[rule]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RuleSpec {
    name: Option<String>,
    filename: Option<String>,
    regex: Option<String>,
    client: Option<Vec<String>>,
    local: Option<Vec<String>>,
    mac: Option<Vec<String>>,
    host: Option<HostSpec>,
    directory: Option<String>,
    ignore_case: Option<bool>,
    unique_root: Option<bool>,
    lowercase: Option<bool>,
    strip_prefix: Option<Vec<String>>,
    cache: Option<Bytes>,
    template: Option<String>,
    http: Option<String>,
    empty: Option<bool>,
    refuse: Option<RefuseSpec>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HostSpec {
    Known(bool),
    Named(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Bytes {
    Count(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefuseSpec {
    code: u16,
    message: Option<String>,
}

/// The router's part of the file, strictly.
#[derive(Deserialize)]
struct Tables {
    #[serde(default)]
    rule: Vec<Spanned<RuleSpec>>,
    #[serde(default)]
    host: toml::Table,
    inventory: Option<Spanned<String>>,
}

/// The router's part of the file, any content: where each rule and key is, for error
/// messages.
#[derive(Deserialize)]
struct RuleSpans {
    #[serde(default)]
    rule: Vec<Spanned<BTreeMap<Spanned<String>, toml::Value>>>,
}

/// Where a rule is in the file: its table, its name and its keys.
struct RulePlace {
    span: Range<usize>,
    name: String,
    keys: Vec<(String, usize)>,
}

/// What a rule does.
#[derive(Clone)]
pub enum Action {
    /// Serve a directory.
    Directory {
        /// The directory.
        path: PathBuf,
        /// Its handler, with the remapping (the defaults', then the rule's).
        files: Remap<FsHandler, Rules>,
        /// That remapping.
        remap: Rules,
        /// The options, as `--check-config` prints them.
        options: String,
    },
    /// Render a template.
    Template(Template),
    /// Fetch from an HTTP repository.
    Http(UrlTemplate),
    /// Answer zero bytes.
    Empty,
    /// Refuse with this error.
    Refuse(Reject),
}

impl Action {
    /// Whether answering needs the client's MAC.
    pub fn needs_mac(&self) -> bool {
        match self {
            Action::Template(template) => template.uses_mac(),
            Action::Http(url) => url.uses_mac(),
            _ => false,
        }
    }

    /// The action as `key = value`, for `--check-config`.
    pub fn describe(&self) -> String {
        match self {
            Action::Directory { path, options, .. } => {
                format!("directory = {:?}{options}", path.display().to_string())
            }
            Action::Template(t) => format!("template = {:?}", t.path().display().to_string()),
            Action::Http(url) => format!("http = {:?}", url.as_str()),
            Action::Empty => "empty = true".into(),
            Action::Refuse(reject) => format!(
                "refuse = {{ code = {}, message = {:?} }}",
                reject.code.to_u16(),
                reject.message
            ),
        }
    }
}

/// One checked rule.
#[derive(Clone)]
pub struct Rule {
    /// Its `name`, or `rule-N` (1-based).
    pub name: String,
    /// What it matches.
    pub matches: Matches,
    /// What it does.
    pub action: Action,
}

/// Everything the router's tables define.
pub struct RouterConfig {
    /// The rules, in order.
    pub rules: Vec<Rule>,
    /// The machines.
    pub inventory: Inventory,
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// Reads the router's tables from the configuration file `file`'s `text`.
pub fn parse(file: &Path, text: &str, defaults: &Defaults) -> Result<RouterConfig, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let base = file.parent().unwrap_or(Path::new("."));
    let places: Vec<RulePlace> = match toml::from_str::<RuleSpans>(text) {
        Ok(spans) => spans
            .rule
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let name = rule
                    .get_ref()
                    .iter()
                    .find(|(key, _)| key.get_ref() == "name")
                    .and_then(|(_, value)| value.as_str())
                    .map_or_else(|| format!("rule-{}", i + 1), str::to_string);
                let keys = rule
                    .get_ref()
                    .keys()
                    .map(|key| (key.get_ref().clone(), key.span().start))
                    .collect();
                RulePlace {
                    span: rule.span(),
                    name,
                    keys,
                }
            })
            .collect(),
        Err(e) => return Err(toml_error(file, text, &e, &[])),
    };
    let tables: Tables = toml::from_str(text).map_err(|e| toml_error(file, text, &e, &places))?;
    if tables.rule.len() > MAX_RULES {
        return Err(ConfigError::new(
            file,
            format!("{} rules, more than {MAX_RULES}", tables.rule.len()),
        ));
    }
    let mut inventory = Inventory::default();
    inventory.add_tables(file, tables.host)?;
    if let Some(path) = &tables.inventory {
        let path = base.join(path.get_ref());
        inventory.add_file(&path)?;
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(tables.rule.len());
    for (i, spec) in tables.rule.into_iter().enumerate() {
        let start = spec.span().start;
        let spec = spec.into_inner();
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("rule-{}", i + 1));
        let keys = places.get(i).map(|p| p.keys.as_slice()).unwrap_or_default();
        // At the key, or at the rule's table when the key is not in it.
        let at = |key: &str, why: String| {
            let offset = keys
                .iter()
                .find(|(k, _)| k == key)
                .map_or(start, |(_, offset)| *offset);
            ConfigError::at(file, text, offset, format!("rule {name:?}: {key}: {why}"))
        };
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(at("name", "expected 1 to 64 printable characters".into()));
        }
        if rules.iter().any(|r| r.name == name) {
            return Err(at("name", format!("{name:?} names an earlier rule too")));
        }
        let rule = check_rule(spec, base, defaults, &inventory, &at)?;
        rules.push(Rule { name, ..rule });
    }
    Ok(RouterConfig { rules, inventory })
}

/// A TOML or serde error as `FILE:LINE: rule "NAME": KEY: message`, with the rule when
/// the error is inside one and the key when the line has one.
fn toml_error(file: &Path, text: &str, e: &toml::de::Error, rules: &[RulePlace]) -> ConfigError {
    let message = e.message().trim_end();
    let Some(span) = e.span() else {
        return ConfigError::new(file, message);
    };
    let (line, _) = line_and_column(text, span.start);
    // The rule whose table the error is in: the last to start before it, when no other
    // table starts in between.
    let rule = rules
        .iter()
        .rev()
        .find(|place| place.span.start <= span.start)
        .filter(|place| {
            let between = text.get(place.span.start..span.start).unwrap_or_default();
            !between
                .lines()
                .skip(1)
                .any(|line| line.trim_start().starts_with('['))
        })
        .map(|place| format!("rule {:?}: ", place.name))
        .unwrap_or_default();
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    let key = match line_text.split_once('=') {
        Some((key, _)) if !message.contains("field `") => format!("{}: ", key.trim()),
        _ => String::new(),
    };
    ConfigError::at(file, text, span.start, format!("{rule}{key}{message}"))
}

/// Checks one rule (all but its name).
fn check_rule(
    spec: RuleSpec,
    base: &Path,
    defaults: &Defaults,
    inventory: &Inventory,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Rule, ConfigError> {
    let mut matches = Matches::default();
    match (&spec.filename, &spec.regex) {
        (Some(_), Some(_)) => return Err(at("regex", "give filename or regex, not both".into())),
        (Some(glob), None) => {
            matches.name = Some(NamePattern::glob(glob).map_err(|e| at("filename", e))?)
        }
        (None, Some(regex)) => {
            matches.name = Some(NamePattern::regex(regex).map_err(|e| at("regex", e))?)
        }
        (None, None) => {}
    }
    for net in spec.client.iter().flatten() {
        let parsed = net
            .parse::<ipnet::IpNet>()
            .or_else(|_| net.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                at(
                    "client",
                    format!("{net:?} is not a network (e.g. 10.0.0.0/8, fd00::/8) or an address"),
                )
            })?;
        matches.client.push(canonical_net(parsed));
    }
    for addr in spec.local.iter().flatten() {
        let parsed = addr
            .parse::<IpAddr>()
            .map_err(|_| at("local", format!("{addr:?} is not an IP address")))?;
        matches.local.push(parsed.to_canonical());
    }
    for mac in spec.mac.iter().flatten() {
        matches.mac.push(MacAddr::parse(mac).ok_or_else(|| {
            at("mac", format!("{mac:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)"))
        })?);
    }
    matches.host = match spec.host {
        None => None,
        Some(HostSpec::Known(true)) => Some(HostMatch::Known),
        Some(HostSpec::Known(false)) => {
            return Err(at("host", "expected true or a host name".into()))
        }
        Some(HostSpec::Named(name)) if inventory.has_name(&name) => Some(HostMatch::Named(name)),
        Some(HostSpec::Named(name)) => {
            return Err(at(
                "host",
                format!("no host in the inventory is named {name:?}"),
            ))
        }
    };
    let given: Vec<&str> = [
        ("directory", spec.directory.is_some()),
        ("template", spec.template.is_some()),
        ("http", spec.http.is_some()),
        ("empty", spec.empty.is_some()),
        ("refuse", spec.refuse.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, given)| given.then_some(key))
    .collect();
    match given[..] {
        [] => {
            return Err(at(
                "action",
                "expected one of directory, template, http, empty or refuse".into(),
            ))
        }
        [_] => {}
        _ => {
            return Err(at(
                given[1],
                format!(
                    "a rule has one action, and this one has {}",
                    given.join(" and ")
                ),
            ))
        }
    }
    if spec.directory.is_none() {
        for (key, given) in [
            ("ignore-case", spec.ignore_case.is_some()),
            ("unique-root", spec.unique_root.is_some()),
            ("lowercase", spec.lowercase.is_some()),
            ("strip-prefix", spec.strip_prefix.is_some()),
            ("cache", spec.cache.is_some()),
        ] {
            if given {
                return Err(at(key, "only with directory".into()));
            }
        }
    }
    let action = if let Some(dir) = &spec.directory {
        let path = base.join(dir);
        let cache = match &spec.cache {
            None => 0,
            Some(Bytes::Count(n)) => *n,
            Some(Bytes::Text(text)) => crate::config::bytes(text).ok_or_else(|| {
                at(
                    "cache",
                    format!("{text:?} is not a byte count (e.g. 0, 65536, 512K, 256M or 2G)"),
                )
            })?,
        };
        let (ignore_case, unique_root, lowercase) = (
            spec.ignore_case.unwrap_or(false),
            spec.unique_root.unwrap_or(false),
            spec.lowercase.unwrap_or(false),
        );
        let files = FsHandler::new(&path)
            .map_err(|e| at("directory", format!("cannot serve {}: {e}", path.display())))?
            .ignore_case(ignore_case)
            .unique_root(unique_root)
            .cache(cache);
        let mut remap = defaults.remap();
        if lowercase {
            remap = remap.lowercase();
        }
        let strip = spec.strip_prefix.unwrap_or_default();
        for prefix in &strip {
            remap = remap.strip_prefix(prefix.as_bytes());
        }
        let mut options = String::new();
        for (key, on) in [
            ("ignore-case", ignore_case),
            ("unique-root", unique_root),
            ("lowercase", lowercase),
        ] {
            if on {
                options += &format!(", {key} = true");
            }
        }
        if !strip.is_empty() {
            options += &format!(", strip-prefix = {strip:?}");
        }
        if cache > 0 {
            options += &format!(", cache = {cache}");
        }
        Action::Directory {
            path,
            files: Remap::new(files, remap.clone()),
            remap,
            options,
        }
    } else if let Some(template) = &spec.template {
        Action::Template(Template::load(&base.join(template)).map_err(|e| at("template", e))?)
    } else if let Some(url) = &spec.http {
        let captures = matches
            .name
            .as_ref()
            .map(NamePattern::capture_names)
            .unwrap_or_default();
        Action::Http(UrlTemplate::parse(url, &captures).map_err(|e| at("http", e))?)
    } else if let Some(empty) = spec.empty {
        if !empty {
            return Err(at("empty", "expected true (leave it out otherwise)".into()));
        }
        Action::Empty
    } else if let Some(refuse) = spec.refuse {
        Action::Refuse(refusal(refuse).map_err(|e| at("refuse", e))?)
    } else {
        unreachable!("one action was found above");
    };
    Ok(Rule {
        name: String::new(),
        matches,
        action,
    })
}

/// An IPv4-mapped IPv6 network as the IPv4 network it is (clients are compared in their
/// canonical form).
fn canonical_net(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// `refuse = { code, message }`: codes 0 to 7, the standard text by default.
fn refusal(spec: RefuseSpec) -> Result<Reject, String> {
    let standard = [
        "not defined",
        "file not found",
        "access violation",
        "disk full or allocation exceeded",
        "illegal TFTP operation",
        "unknown transfer ID",
        "file already exists",
        "no such user",
    ];
    let Some(default) = standard.get(usize::from(spec.code)) else {
        return Err(format!(
            "code {} is not a TFTP error code (0 to 7)",
            spec.code
        ));
    };
    let message = spec.message.unwrap_or_else(|| default.to_string());
    if message.len() > MAX_REFUSE_MESSAGE || message.contains('\0') {
        return Err(format!(
            "the message must have at most {MAX_REFUSE_MESSAGE} bytes and no NUL"
        ));
    }
    Ok(Reject::new(ErrorCode::from_u16(spec.code), message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with a template and a served directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let path =
                std::env::temp_dir().join(format!("dyntftpd-rules-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(path.join("images")).unwrap();
            std::fs::write(path.join("grub.j2"), "set host={{ host.name }}\n").unwrap();
            std::fs::write(
                path.join("hosts.toml"),
                "[host.\"aa:bb:cc:dd:ee:02\"]\nname = \"node2\"\n",
            )
            .unwrap();
            Dir(path)
        }

        fn file(&self) -> PathBuf {
            self.0.join("dyntftpd.toml")
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn parse_text(dir: &Dir, text: &str) -> Result<RouterConfig, String> {
        parse(&dir.file(), text, &Defaults::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn every_action_and_match_is_read() {
        let dir = Dir::new("all");
        let config = parse_text(
            &dir,
            r#"
root = "/srv/tftp"
listen = ["0.0.0.0:69"]
inventory = "hosts.toml"

[[rule]]
name = "grub"
filename = "grub/grub.cfg-01-*"
host = true
template = "grub.j2"

[[rule]]
regex = '^images/(?P<rest>.*)$'
client = ["10.0.0.0/8", "fd00::/8", "192.168.1.1"]
local = ["10.0.0.1"]
directory = "images"
strip-prefix = ["images"]
cache = "1M"

[[rule]]
mac = ["AA-BB-CC-DD-EE-01"]
http = "http://repo/{mac}/{path}"

[[rule]]
filename = "**/*.lst"
empty = true

[[rule]]
host = "node1"
refuse = { code = 2, message = "not for you" }

[host."aa:bb:cc:dd:ee:01"]
name = "node1"
"#,
        )
        .unwrap();
        let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["grub", "rule-2", "rule-3", "rule-4", "rule-5"]);
        assert_eq!(config.inventory.len(), 2);
        let described: Vec<String> = config
            .rules
            .iter()
            .map(|r| format!("{} -> {}", r.matches.describe(), r.action.describe()))
            .collect();
        let images = dir.0.join("images").display().to_string();
        let grub = dir.0.join("grub.j2").display().to_string();
        assert_eq!(
            described,
            [
                format!("filename = \"grub/grub.cfg-01-*\", host = true -> template = {grub:?}"),
                format!("regex = \"^images/(?P<rest>.*)$\", client = [\"10.0.0.0/8\", \"fd00::/8\", \"192.168.1.1/32\"], local = [\"10.0.0.1\"] -> directory = {images:?}, strip-prefix = [\"images\"], cache = 1048576"),
                "mac = [\"aa:bb:cc:dd:ee:01\"] -> http = \"http://repo/{mac}/{path}\"".to_string(),
                "filename = \"**/*.lst\" -> empty = true".to_string(),
                "host = \"node1\" -> refuse = { code = 2, message = \"not for you\" }".to_string(),
            ]
        );
        assert!(config.rules[0].action.needs_mac());
        assert!(config.rules[2].action.needs_mac());
        assert!(!config.rules[1].action.needs_mac());
    }

    #[test]
    fn errors_name_the_file_line_rule_and_key() {
        let dir = Dir::new("errors");
        let file = dir.file().display().to_string();
        for (text, want) in [
            (
                "[[rule]]\nname = \"a\"\nbogus = 1\nempty = true\n",
                "line 3, column 1: rule \"a\": unknown field `bogus`, expected one of",
            ),
            (
                "[[rule]]\nempty = true\n[[rule]]\nfilename = 3\nempty = true\n",
                "line 4, column 12: rule \"rule-2\": filename: invalid type: integer `3`, expected a string",
            ),
            (
                "[[rule]]\nfilename = \"a\"\n",
                "line 1, column 1: rule \"rule-1\": action: expected one of directory, template, http, empty or refuse",
            ),
            (
                "[[rule]]\nname = \"two\"\nempty = true\nrefuse = { code = 1 }\n",
                "line 4, column 1: rule \"two\": refuse: a rule has one action, and this one has empty and refuse",
            ),
            (
                "[[rule]]\nfilename = \"a[\"\nempty = true\n",
                "line 2, column 1: rule \"rule-1\": filename: unclosed character class; missing ']'",
            ),
            (
                "[[rule]]\nregex = \"(\"\nempty = true\n",
                "line 2, column 1: rule \"rule-1\": regex: regex parse error",
            ),
            (
                "[[rule]]\nclient = [\"10.0.0.0/33\"]\nempty = true\n",
                "line 2, column 1: rule \"rule-1\": client: \"10.0.0.0/33\" is not a network",
            ),
            (
                "[[rule]]\nlocal = [\"10.0.0\"]\nempty = true\n",
                "line 2, column 1: rule \"rule-1\": local: \"10.0.0\" is not an IP address",
            ),
            (
                "[[rule]]\nmac = [\"aa:bb\"]\nempty = true\n",
                "line 2, column 1: rule \"rule-1\": mac: \"aa:bb\" is not a MAC address",
            ),
            (
                "[[rule]]\nhost = \"nobody\"\nempty = true\n",
                "line 2, column 1: rule \"rule-1\": host: no host in the inventory is named \"nobody\"",
            ),
            (
                "[[rule]]\ndirectory = \"missing\"\n",
                "line 2, column 1: rule \"rule-1\": directory: cannot serve",
            ),
            (
                "[[rule]]\ntemplate = \"missing.j2\"\n",
                "line 2, column 1: rule \"rule-1\": template: ",
            ),
            (
                "[[rule]]\nhttp = \"http://r/{nope}\"\n",
                "line 2, column 1: rule \"rule-1\": http: unknown placeholder {nope}",
            ),
            (
                "[[rule]]\nempty = true\nignore-case = true\n",
                "line 3, column 1: rule \"rule-1\": ignore-case: only with directory",
            ),
            (
                "[[rule]]\nrefuse = { code = 9 }\n",
                "line 2, column 1: rule \"rule-1\": refuse: code 9 is not a TFTP error code (0 to 7)",
            ),
            (
                "[[rule]]\nname = \"x\"\nempty = true\n[[rule]]\nname = \"x\"\nempty = true\n",
                "line 5, column 1: rule \"x\": name: \"x\" names an earlier rule too",
            ),
            (
                "[host.\"zz\"]\nname = \"a\"\n",
                "host \"zz\": not a MAC address",
            ),
        ] {
            let err = parse_text(&dir, text).err().unwrap_or_else(|| panic!("{text}: accepted"));
            let want = format!("{file}: {want}");
            assert!(err.starts_with(&want), "{text}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn the_rule_count_is_bounded() {
        let dir = Dir::new("many");
        let rule = "[[rule]]\nempty = true\n";
        assert_eq!(
            parse_text(&dir, &rule.repeat(MAX_RULES))
                .unwrap()
                .rules
                .len(),
            MAX_RULES
        );
        let err = parse_text(&dir, &rule.repeat(MAX_RULES + 1)).err().unwrap();
        assert!(err.ends_with(": 1001 rules, more than 1000"), "{err}");
    }

    #[test]
    fn a_bad_template_names_its_line() {
        let dir = Dir::new("template");
        std::fs::write(dir.0.join("bad.j2"), "ok\n{% if %}\n").unwrap();
        let err = parse_text(&dir, "[[rule]]\ntemplate = \"bad.j2\"\n")
            .err()
            .unwrap();
        let bad = dir.0.join("bad.j2").display().to_string();
        assert!(
            err.contains("rule \"rule-1\": template: syntax error: unexpected end of block"),
            "{err}"
        );
        assert!(err.contains(&format!("(in {bad}:2)")), "{err}");
    }
}
