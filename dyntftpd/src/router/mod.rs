//! The router: dyntftpd's [`Handler`]. It tries the configuration file's `[[rule]]`s in
//! order on each request and answers with the first that matches (a directory, a template,
//! an HTTP repository, empty content or a refusal); when none matches, it serves the
//! `root` directory as dyntftpd always did and, with `upstream` set, fetches the names
//! missing there from the upstream URL.
//!
//! - [`rules`]: the tables (`rule`, `host`, `inventory`) read and checked at start-up;
//! - [`matcher`]: matching, socket-free;
//! - [`template`], [`url`]: what `template` and `http` rules make of a request;
//! - [`inventory`]: the machines by MAC.
//!
//! Bounds: at most [`rules::MAX_RULES`] rules, tried once each per request (glob and regex
//! matching are linear in the name); the client's MAC is looked up only when a rule that
//! needs it is tried (a `mac` or `host` match, a template or URL that uses it), at most once
//! per request; templates are bounded by [`template::RENDER_FUEL`] and
//! [`template::MAX_OUTPUT_BYTES`].

mod inventory;
mod matcher;
mod rules;
mod template;
mod url;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dyntftp::remap::{Remap, Rules};
use dyntftp::{BytesSource, ErrorCode, FsHandler, Handler, ReadRequest, Reject, ResponseData};

pub use dyntftp::mac::MacAddr;
pub use rules::{Defaults, RouterConfig};

use inventory::Inventory;
use matcher::{Captures, Facts};
use rules::{Action, Rule};
use template::{Template, TemplateVars};
use url::{UrlTemplate, UrlValues};

use crate::upstream::{self, Upstream};

/// The session label of answers from the `root` directory.
pub const ROOT_LABEL: &str = "root";
/// The session label of answers from the `upstream` fallback.
pub const UPSTREAM_LABEL: &str = "upstream";

/// The handler: the rules, then the root directory, then the upstream. Cloned once per
/// worker; the clones share the directories' caches and the templates.
#[derive(Clone)]
pub struct Router {
    rules: Vec<Rule>,
    inventory: Arc<Inventory>,
    /// The defaults' remapping, applied to names before matching.
    remap: Rules,
    root: Remap<FsHandler, Rules>,
    root_path: PathBuf,
    /// `upstream`: the URL below which names missing under `root` are fetched.
    upstream: Option<Arc<str>>,
    /// The HTTP client (`None` in a dry run, which fetches nothing).
    http: Option<Upstream>,
}

/// A request to try without serving it (`--dry-run`).
#[derive(Clone, Debug)]
pub struct DryRun {
    /// The name, as a client would send it.
    pub name: String,
    /// The client.
    pub client: SocketAddr,
    /// The address the request reaches.
    pub local: SocketAddr,
    /// The client's MAC; `None`: from the name's standard forms, if any.
    pub mac: Option<MacAddr>,
}

impl RouterConfig {
    /// Reads and checks the router's tables in the configuration file (its path and
    /// text); no file, no rules. Errors name the file, line, column, rule and key.
    pub fn read(defaults: &Defaults, file: Option<(&Path, &str)>) -> Result<RouterConfig, String> {
        match file {
            Some((path, text)) => rules::parse(path, text, defaults).map_err(|e| e.to_string()),
            None => Ok(RouterConfig {
                rules: Vec::new(),
                inventory: Inventory::default(),
            }),
        }
    }

    /// Whether a rule fetches over HTTP.
    pub fn uses_http(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.action, Action::Http(_)))
    }

    /// The rules, one per line (`# rule "NAME": MATCHES -> ACTION`, and whether it looks
    /// up the client's MAC), then the fallback:
    /// what `--check-config` prints after the settings (TOML comments, so that the output
    /// stays a valid configuration file).
    pub fn describe(&self, root: &Path, upstream: Option<&str>) -> String {
        let mut out = String::new();
        for rule in &self.rules {
            let mac = rule.matches.needs_mac() || rule.action.needs_mac();
            let _ = writeln!(
                out,
                "# rule {:?}: {} -> {}{}",
                rule.name,
                rule.matches.describe(),
                rule.action.describe(),
                if mac { " (looks up the MAC)" } else { "" }
            );
        }
        let _ = writeln!(
            out,
            "# otherwise: directory = {:?}{}",
            root.display().to_string(),
            match upstream {
                Some(url) => format!(", then upstream = {url:?}"),
                None => String::new(),
            }
        );
        if self.inventory.len() > 0 {
            let _ = writeln!(out, "# inventory: {} hosts", self.inventory.len());
        }
        out
    }
}

impl Router {
    /// Builds the router from its tables, the defaults (whose `root` it opens), the
    /// `upstream` URL and the HTTP client for `http` rules and the upstream (`None`: the
    /// router only describes what it would fetch, for the dry run).
    pub fn new(
        config: RouterConfig,
        defaults: &Defaults,
        upstream: Option<&str>,
        http: Option<Upstream>,
    ) -> Result<Router, String> {
        let RouterConfig { rules, inventory } = config;
        let root = FsHandler::new(&defaults.root)
            .map_err(|e| format!("cannot serve {}: {e}", defaults.root.display()))?
            .ignore_case(defaults.ignore_case)
            .unique_root(defaults.unique_root)
            .cache(defaults.cache);
        Ok(Router {
            rules,
            inventory: Arc::new(inventory),
            remap: defaults.remap(),
            root: Remap::new(root, defaults.remap()),
            root_path: defaults.root.clone(),
            upstream: upstream.map(Arc::from),
            http,
        })
    }

    /// The first rule that matches, with its captures.
    fn choose(&self, facts: &Facts<'_>) -> Option<(usize, Captures)> {
        self.rules.iter().enumerate().find_map(|(i, rule)| {
            rule.matches
                .check(facts, &self.inventory)
                .map(|captures| (i, captures))
        })
    }

    /// What the dry run prints: the rule that would answer and what it would answer.
    pub fn dry_run(&self, query: &DryRun) -> String {
        let mut name = query.name.as_bytes().to_vec();
        self.remap.apply(&mut name);
        let matched = trim_leading_slashes(&name);
        let lookup = || {
            query
                .mac
                .or_else(|| MacAddr::from_filename(query.name.as_bytes()))
        };
        let facts = Facts::new(matched, query.client, query.local, &lookup);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "request: {:?} from {} to {}",
            query.name, query.client, query.local
        );
        let _ = writeln!(out, "name: {:?}", String::from_utf8_lossy(matched));
        let Some((i, captures)) = self.choose(&facts) else {
            let _ = writeln!(out, "rule: none matches");
            dry_run_directory(
                &mut out,
                self.root.inner(),
                &self.remap,
                &self.root_path,
                query,
            );
            if let Some(base) = &self.upstream {
                let _ = write!(out, "if not found there: ");
                match upstream::join(base, matched) {
                    Ok(url) => {
                        let _ = writeln!(out, "http: GET {url}");
                    }
                    Err(reject) => {
                        let _ = writeln!(out, "answer: {reject}");
                    }
                }
            }
            return out;
        };
        let rule = &self.rules[i];
        let _ = writeln!(out, "rule: {:?} (number {})", rule.name, i + 1);
        for (key, value) in &captures.0 {
            let _ = writeln!(out, "capture {key}: {value:?}");
        }
        match &rule.action {
            Action::Directory {
                path, files, remap, ..
            } => dry_run_directory(&mut out, files.inner(), remap, path, query),
            Action::Template(template) => {
                let vars = self.template_vars(&facts, &captures, template);
                match template.render(&vars) {
                    Ok(text) => {
                        let _ = writeln!(
                            out,
                            "template {}: {} bytes",
                            template.path().display(),
                            text.len()
                        );
                        out.push_str(&String::from_utf8_lossy(&text));
                        if !text.ends_with(b"\n") {
                            out.push('\n');
                        }
                    }
                    Err(e) => {
                        let _ =
                            writeln!(out, "template {}: ERROR 0: {e}", template.path().display());
                    }
                }
            }
            Action::Http(url) => dry_run_url(&mut out, url, &facts, &captures),
            Action::Empty => out.push_str("answer: 0 bytes\n"),
            Action::Refuse(reject) => {
                let _ = writeln!(out, "answer: {reject}");
            }
        }
        let _ = writeln!(
            out,
            "mac: {}",
            match (facts.mac_looked_up(), facts.mac()) {
                (false, _) => "not needed".to_string(),
                (true, Some(mac)) => mac.to_string(),
                (true, None) => "unknown".to_string(),
            }
        );
        out
    }

    /// A template's variables for a request; the MAC only when the template uses it.
    fn template_vars(
        &self,
        facts: &Facts<'_>,
        captures: &Captures,
        template: &Template,
    ) -> TemplateVars {
        let mac = template.uses_mac().then(|| facts.mac()).flatten();
        TemplateVars {
            ip: facts.peer.ip().to_canonical().to_string(),
            port: facts.peer.port(),
            mac: mac.map(|m| m.to_string()),
            mac_dashed: mac.map(|m| m.dashed()),
            server: facts.local.ip().to_canonical().to_string(),
            filename: String::from_utf8_lossy(facts.name).into_owned(),
            captures: captures.0.clone(),
            host: mac
                .and_then(|m| self.inventory.get(&m))
                .map(|h| h.table.clone()),
        }
    }

    /// Fetches `url` through the HTTP client.
    fn fetch(&self, url: &str, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        match &self.http {
            Some(http) => http.open(url, request),
            // Only a dry run has no client, and it does not serve.
            None => Err(Reject::new(ErrorCode::NotDefined, "no HTTP client")),
        }
    }
}

/// The URL for a request, or the refusal when it cannot be made.
fn url_for(url: &UrlTemplate, facts: &Facts<'_>, captures: &Captures) -> Result<String, Reject> {
    let mac = url.uses_mac().then(|| facts.mac()).flatten();
    url.render(&UrlValues {
        path: facts.name,
        peer: facts.peer,
        mac,
        captures,
    })
}

fn dry_run_url(out: &mut String, url: &UrlTemplate, facts: &Facts<'_>, captures: &Captures) {
    match url_for(url, facts, captures) {
        Ok(url) => {
            let _ = writeln!(out, "http: GET {url}");
        }
        Err(reject) if url.uses_mac() && facts.mac().is_none() => {
            let _ = writeln!(out, "answer: {reject} (the URL needs the client's MAC)");
        }
        Err(reject) => {
            let _ = writeln!(out, "answer: {reject}");
        }
    }
}

/// The dry run of a directory: the file the name resolves to, and its size or the error
/// a client would get.
fn dry_run_directory(
    out: &mut String,
    files: &FsHandler,
    remap: &Rules,
    dir: &Path,
    query: &DryRun,
) {
    let mut name = query.name.as_bytes().to_vec();
    remap.apply(&mut name);
    let relative = String::from_utf8_lossy(trim_leading_slashes(&name)).into_owned();
    let _ = writeln!(out, "directory: {}", dir.display());
    let _ = writeln!(out, "file: {}", dir.join(&relative).display());
    match files.open_file_for(query.client.ip(), &name) {
        Ok(file) => {
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = writeln!(out, "answer: {size} bytes");
        }
        Err(reject) => {
            let _ = writeln!(out, "answer: {reject}");
        }
    }
}

/// `name` without its leading slashes.
fn trim_leading_slashes(name: &[u8]) -> &[u8] {
    let start = name.iter().position(|b| *b != b'/').unwrap_or(name.len());
    &name[start..]
}

impl Handler for Router {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let mut name = request.filename.to_vec();
        self.remap.apply(&mut name);
        let lookup = || request.mac();
        let facts = Facts::new(
            trim_leading_slashes(&name),
            request.peer,
            request.local,
            &lookup,
        );
        let Some((i, captures)) = self.choose(&facts) else {
            request.set_label(ROOT_LABEL);
            return match self.root.open(request) {
                Err(reject) if reject.code == ErrorCode::FileNotFound => match &self.upstream {
                    Some(base) => {
                        request.set_label(UPSTREAM_LABEL);
                        self.fetch(&upstream::join(base, facts.name)?, request)
                    }
                    None => Err(reject),
                },
                other => other,
            };
        };
        request.set_label(&self.rules[i].name);
        match &self.rules[i].action {
            Action::Template(template) => {
                let vars = self.template_vars(&facts, &captures, template);
                match template.render(&vars) {
                    Ok(text) => Ok(Box::new(BytesSource::new(text))),
                    Err(e) => {
                        template.warn(&e);
                        Err(Reject::new(ErrorCode::NotDefined, "template error"))
                    }
                }
            }
            Action::Http(url) => self.fetch(&url_for(url, &facts, &captures)?, request),
            Action::Empty => Ok(Box::new(BytesSource::new(Vec::new()))),
            Action::Refuse(reject) => {
                // A refusal starts no session, so no session line names the rule.
                log::debug!(
                    "{}: rule {:?} refuses {:?}: {reject}",
                    request.peer,
                    self.rules[i].name,
                    String::from_utf8_lossy(facts.name)
                );
                Err(reject.clone())
            }
            Action::Directory { .. } => match &mut self.rules[i].action {
                Action::Directory { files, .. } => files.open(request),
                _ => unreachable!("matched as a directory above"),
            },
        }
    }
}
