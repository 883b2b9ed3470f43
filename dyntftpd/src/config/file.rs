//! The `--config` file: TOML whose top-level keys are the settings (each value goes
//! through the flags' checks, errors name the file, line and column), and the settings
//! written back as TOML for `--check-config`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::Serialize;
use toml::Spanned;

use super::{on_off, Config, MAX_CONFIG_BYTES};

/// The settings as a configuration file, in the flags' order: what `--check-config`
/// prints, through toml's writer.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileSettings<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    listen: Vec<String>,
    root: &'a str,
    timeout: f64,
    retries: u32,
    max_blksize: u16,
    max_window: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_sessions: Option<usize>,
    rate_limit: f64,
    rate_burst: u32,
    max_per_client: u32,
    max_unverified_per_client: u32,
    progress_timeout: f64,
    window_memory: u64,
    single_port_max_blksize: u16,
    single_port_max_window: u16,
    limit_loopback: bool,
    adaptive_timeout: bool,
    udp_gso: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    busy_poll: Option<u64>,
    single_port: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    port_range: Option<String>,
    mtu_blksize: bool,
    workers: usize,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    strip_prefix: &'a [String],
    lowercase: bool,
    ignore_case: bool,
    unique_root: bool,
    cache: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    upstream_timeout: f64,
    upstream_cache: u64,
    upstream_workers: usize,
    open_timeout: f64,
    stats_interval: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<String>,
    log_format: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_file: Option<&'a str>,
    verbose: u32,
    quiet: bool,
}

/// A path as the file writes it (paths come from UTF-8 arguments and files).
fn path_text(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

impl Config {
    /// The settings as a TOML configuration file (what `--check-config` prints), which
    /// reads back as the same settings.
    pub fn to_toml(&self) -> Result<String, String> {
        let settings = FileSettings {
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
            root: path_text(&self.root),
            timeout: self.timeout.as_secs_f64(),
            retries: self.retries,
            max_blksize: self.max_blksize,
            max_window: self.max_window,
            max_sessions: self.max_sessions,
            rate_limit: self.rate_limit,
            rate_burst: self.rate_burst,
            max_per_client: self.max_per_client,
            max_unverified_per_client: self.max_unverified_per_client,
            progress_timeout: self.progress_timeout.as_secs_f64(),
            window_memory: self.window_memory,
            single_port_max_blksize: self.single_port_max_blksize,
            single_port_max_window: self.single_port_max_window,
            limit_loopback: self.limit_loopback,
            adaptive_timeout: self.adaptive_timeout,
            udp_gso: self.udp_gso,
            busy_poll: self.busy_poll,
            single_port: self.single_port,
            port_range: self.port_range.map(|(low, high)| format!("{low}:{high}")),
            mtu_blksize: self.mtu_blksize,
            workers: self.workers,
            strip_prefix: &self.strip_prefix,
            lowercase: self.lowercase,
            ignore_case: self.ignore_case,
            unique_root: self.unique_root,
            cache: self.cache,
            upstream: self.upstream.as_deref(),
            upstream_timeout: self.upstream_timeout.as_secs_f64(),
            upstream_cache: self.upstream_cache,
            upstream_workers: self.upstream_workers,
            open_timeout: self.open_timeout.as_secs_f64(),
            stats_interval: self.stats_interval.as_secs_f64(),
            user: self.user.as_deref(),
            metrics_file: self.metrics_file.as_deref().map(path_text),
            metrics_listen: self.metrics_listen.map(|a| a.to_string()),
            log_format: self.log_format.as_str(),
            log_file: self.log_file.as_deref().map(path_text),
            verbose: self.verbose,
            quiet: self.quiet,
        };
        toml::to_string(&settings).map_err(|e| format!("cannot print the settings: {e}"))
    }

    /// Applies a TOML configuration file's text; errors start with `path` and the line
    /// and column.
    pub(super) fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), String> {
        let at = |offset: usize, why: String| {
            let (line, column) = line_and_column(text, offset);
            format!("{}: line {line}, column {column}: {why}", path.display())
        };
        let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
            toml::from_str(text).map_err(|e| {
                let offset = e.span().map_or(0, |span| span.start);
                let mut why = e.message().trim_end().to_string();
                if let Some(hint) = toml_hint(text, offset, &why) {
                    why.push_str(&hint);
                }
                at(offset, why)
            })?;
        // In the order of the file, so that the first mistake is the one reported.
        let mut entries: Vec<_> = table.into_iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        for (key, value) in entries {
            let name = key.get_ref().as_str();
            if ROUTER_KEYS.contains(&name) {
                continue;
            }
            let Some(kind) = kind(name) else {
                return Err(at(key.span().start, format!("unknown key {name:?}")));
            };
            let offset = value.span().start;
            let value = value.into_inner();
            let Some(texts) = kind.texts(&value) else {
                return Err(at(
                    offset,
                    format!(
                        "invalid value for {name}: {value} (expected {})",
                        kind.expected()
                    ),
                ));
            };
            for (text, shown) in texts {
                self.set(name, &text, name, &shown)
                    .map_err(|why| at(offset, why))?;
            }
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of the byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text_before(text, offset);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

/// The text before byte `offset` (or before the character it falls in).
fn text_before(text: &str, offset: usize) -> &str {
    let end = (0..=offset.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    &text[..end]
}

/// How to fix a TOML syntax error (`message` at `offset`) on a line that sets a known
/// setting, where a file of the old `key = value` format fails: an unquoted string, or a
/// repeatable setting given on several lines.
fn toml_hint(text: &str, offset: usize, message: &str) -> Option<String> {
    let line_start = text_before(text, offset).rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let (key, value) = line.split_once('=')?;
    let (key, value) = (key.trim(), value.trim());
    let kind = kind(key)?;
    if message == "duplicate key" && matches!(kind, Kind::List) {
        return Some(format!(
            " ({key} takes several values as one array, e.g. {key} = [\"a\", \"b\"])"
        ));
    }
    let unquoted = !value.is_empty() && !value.starts_with(['"', '\'', '[', '{']);
    if !unquoted || !matches!(kind, Kind::Text | Kind::List | Kind::Bytes | Kind::OnOff) {
        return None;
    }
    let string = toml::Value::String(value.to_string());
    let fixed = match kind {
        Kind::List => toml::Value::Array(vec![string]),
        _ => string,
    };
    Some(format!(
        " (the configuration file is TOML, no longer `key = value` lines: strings are \
         quoted, e.g. {key} = {fixed})"
    ))
}

/// What a setting's value may be in the file. Every value goes through
/// [`Config::set`], as the flags' do: the file and the flags refuse the same.
#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    /// A string.
    Text,
    /// A string, or an array of strings (a repeatable flag).
    List,
    /// An integer.
    Integer,
    /// An integer or a float (seconds, a rate).
    Number,
    /// An integer, or a string with a K, M or G suffix.
    Bytes,
    /// A boolean (`true` or `false`).
    Flag,
    /// A boolean, or the flag's own `"on"` or `"off"`.
    OnOff,
}

impl Kind {
    /// The flag texts `value` stands for, each with the value as the file shows it; `None`
    /// if `value` is of the wrong type.
    fn texts(self, value: &toml::Value) -> Option<Vec<(String, String)>> {
        use toml::Value as V;
        let one = |text: String| Some(vec![(text, value.to_string())]);
        match (self, value) {
            (Kind::List, V::Array(items)) => items
                .iter()
                .map(|item| Some((item.as_str()?.to_string(), item.to_string())))
                .collect(),
            (Kind::Text | Kind::List | Kind::Bytes | Kind::OnOff, V::String(s)) => one(s.clone()),
            (Kind::Integer | Kind::Number | Kind::Bytes, V::Integer(n)) => one(n.to_string()),
            (Kind::Number, V::Float(x)) => one(x.to_string()),
            (Kind::Flag, V::Boolean(on)) => one(on.to_string()),
            (Kind::OnOff, V::Boolean(on)) => one(on_off(*on).to_string()),
            _ => None,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Text => "a string",
            Kind::List => "a string or an array of strings",
            Kind::Integer => "an integer",
            Kind::Number => "a number",
            Kind::Bytes => "an integer or a string such as \"64M\"",
            Kind::Flag => "true or false",
            Kind::OnOff => "true or false (or \"on\" or \"off\")",
        }
    }
}

/// The settings a configuration file may hold (every flag but `--config`,
/// `--check-config`, `--help` and `--version`), with the type of each value.
pub(super) const SETTINGS: [(&str, Kind); 41] = [
    ("listen", Kind::List),
    ("root", Kind::Text),
    ("timeout", Kind::Number),
    ("retries", Kind::Integer),
    ("max-blksize", Kind::Integer),
    ("max-window", Kind::Integer),
    ("max-sessions", Kind::Integer),
    ("rate-limit", Kind::Number),
    ("rate-burst", Kind::Integer),
    ("max-per-client", Kind::Integer),
    ("max-unverified-per-client", Kind::Integer),
    ("limit-loopback", Kind::Flag),
    ("progress-timeout", Kind::Number),
    ("window-memory", Kind::Bytes),
    ("single-port-max-blksize", Kind::Integer),
    ("single-port-max-window", Kind::Integer),
    ("adaptive-timeout", Kind::OnOff),
    ("udp-gso", Kind::OnOff),
    ("busy-poll", Kind::Integer),
    ("single-port", Kind::Flag),
    ("port-range", Kind::Text),
    ("mtu-blksize", Kind::OnOff),
    ("workers", Kind::Integer),
    ("ignore-case", Kind::Flag),
    ("unique-root", Kind::Flag),
    ("lowercase", Kind::Flag),
    ("strip-prefix", Kind::List),
    ("cache", Kind::Bytes),
    ("upstream", Kind::Text),
    ("upstream-timeout", Kind::Number),
    ("upstream-cache", Kind::Bytes),
    ("upstream-workers", Kind::Integer),
    ("open-timeout", Kind::Number),
    ("stats-interval", Kind::Number),
    ("user", Kind::Text),
    ("verbose", Kind::Integer),
    ("quiet", Kind::Flag),
    ("metrics-file", Kind::Text),
    ("metrics-listen", Kind::Text),
    ("log-format", Kind::Text),
    ("log-file", Kind::Text),
];

/// The top-level keys that belong to the router, which reads them from
/// [`Config::config_file`]: accepted here, not checked.
const ROUTER_KEYS: [&str; 3] = ["rule", "inventory", "host"];

/// The type of the setting `key`; `None` if there is no such setting.
pub(super) fn kind(key: &str) -> Option<Kind> {
    SETTINGS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
}

/// Reads a configuration file: a regular file (not a device, FIFO or directory, which
/// could block or never end) of at most [`MAX_CONFIG_BYTES`], in UTF-8.
pub(super) fn read_config_file(path: &Path) -> Result<String, String> {
    read_bounded(path, MAX_CONFIG_BYTES)
        .map_err(|why| format!("cannot read {}: {why}", path.display()))
}

/// Reads a regular file (not a device, FIFO or directory, which could block or never end)
/// of at most `max` bytes, in UTF-8: the configuration file, and the templates and
/// inventory it names. The error says why, without the path.
pub(crate) fn read_bounded(path: &Path, max: u64) -> Result<String, String> {
    // Non-blocking: opening a FIFO without a writer would wait forever.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let metadata = file.metadata().map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".into());
    }
    if metadata.len() > max {
        return Err(format!(
            "{} bytes, more than the {max} this file may have",
            metadata.len()
        ));
    }
    let mut text = String::new();
    // Bounded again, in case the file grows while it is read.
    File::take(file, max + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > max {
        return Err("the file grew past the size limit".into());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let text = "ab\né = 1\n";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 3), (2, 1));
        assert_eq!(line_and_column(text, 6), (2, 3));
        // Inside a character: that character's column.
        assert_eq!(line_and_column(text, 4), (2, 1));
        assert_eq!(line_and_column(text, 100), (3, 1));
    }
}
