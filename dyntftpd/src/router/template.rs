//! `template` actions: a minijinja template, read and compiled at start-up, rendered per
//! request on the event loop into memory.
//!
//! Whitespace as Ansible renders Jinja: the template's last newline is kept, and the
//! newline after a block tag (`{% if … %}`, `{% endfor %}`) is removed.
//!
//! Bounds: the source is at most [`MAX_TEMPLATE_BYTES`]; one rendering does at most
//! [`RENDER_FUEL`] steps of minijinja's machine and writes at most [`MAX_OUTPUT_BYTES`]
//! (more is an error, answered with ERROR 0). Templates cannot read files: minijinja is
//! built without its loader and without `include`/`import`/`extends` support.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minijinja::Environment;
use serde::Serialize;

use super::rules::read_bounded;

/// The largest template file read.
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// The most a rendering may write.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// The most steps one rendering may take (minijinja's fuel): far more than any boot
/// configuration needs, a few milliseconds of work.
pub const RENDER_FUEL: u64 = 200_000;
/// At most one warning per template this often; the rest are counted.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The variables a template sees.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TemplateVars {
    /// The client's address.
    pub ip: String,
    /// The client's port.
    pub port: u16,
    /// The client's MAC, `aa:bb:cc:dd:ee:ff`, when known.
    pub mac: Option<String>,
    /// The same, `aa-bb-cc-dd-ee-ff`.
    pub mac_dashed: Option<String>,
    /// The local address the request reached.
    pub server: String,
    /// The name, after remapping.
    pub filename: String,
    /// The rule's regex captures, by number and name.
    pub captures: BTreeMap<String, String>,
    /// The client's inventory entry.
    pub host: Option<toml::Table>,
}

/// A compiled template.
#[derive(Clone)]
pub struct Template {
    name: String,
    path: PathBuf,
    env: Arc<Environment<'static>>,
    uses_mac: bool,
    warnings: Arc<Mutex<Warnings>>,
}

/// The warning limiter's state.
#[derive(Default)]
struct Warnings {
    last: Option<Instant>,
    suppressed: u64,
}

/// Why a rendering failed.
#[derive(Debug)]
pub struct RenderError(String);

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Template {
    /// Reads and compiles the template at `path`.
    pub fn load(path: &Path) -> Result<Template, String> {
        let source = read_bounded(path, MAX_TEMPLATE_BYTES).map_err(|e| e.why)?;
        Template::compile(path, source)
    }

    /// Compiles `source`, read from `path`.
    pub fn compile(path: &Path, source: String) -> Result<Template, String> {
        // Named by its path, so that minijinja's messages say "(in PATH:LINE)".
        let name = path.display().to_string();
        let mut env = Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.set_recursion_limit(64);
        // As Ansible renders Jinja: the last newline stays, and a line holding only a
        // block tag ({% if %}, {% for %}) leaves no empty line.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .trim_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.add_template_owned(name.clone(), source)
            .map_err(|e| e.to_string())?;
        let uses_mac = env
            .get_template(&name)
            .map_err(|e| e.to_string())?
            .undeclared_variables(false)
            .iter()
            .any(|v| matches!(v.as_str(), "mac" | "mac_dashed" | "host"));
        Ok(Template {
            name,
            path: path.to_path_buf(),
            env: Arc::new(env),
            uses_mac,
            warnings: Arc::default(),
        })
    }

    /// The template's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the template uses `mac`, `mac_dashed` or `host` (so needs the MAC).
    pub fn uses_mac(&self) -> bool {
        self.uses_mac
    }

    /// Renders for one request.
    pub fn render(&self, vars: &TemplateVars) -> Result<Vec<u8>, RenderError> {
        let template = self
            .env
            .get_template(&self.name)
            .map_err(|e| RenderError(e.to_string()))?;
        let mut out = Bounded(Vec::new());
        match template.render_captured_to(
            minijinja::Value::from(minijinja::value::Serde(vars)),
            &mut out,
        ) {
            Ok(_) => Ok(out.0),
            Err(_) if out.0.len() > MAX_OUTPUT_BYTES => Err(RenderError(format!(
                "the output exceeds {MAX_OUTPUT_BYTES} bytes"
            ))),
            Err(e) => Err(RenderError(e.to_string())),
        }
    }

    /// Logs a rendering failure: at most one warning per template every ten seconds,
    /// with the count of those left out.
    pub fn warn(&self, error: &RenderError) {
        let now = Instant::now();
        let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        match warnings.last {
            Some(last) if now.duration_since(last) < WARN_EVERY => warnings.suppressed += 1,
            _ => {
                let suppressed = std::mem::take(&mut warnings.suppressed);
                warnings.last = Some(now);
                let more = match suppressed {
                    0 => String::new(),
                    n => format!(" ({n} more since the last warning)"),
                };
                log::warn!("template {}: {error}{more}", self.path.display());
            }
        }
    }
}

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct Bounded(Vec<u8>);

impl io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT_BYTES {
            // Marks the overflow for render().
            self.0.resize(MAX_OUTPUT_BYTES + 1, 0);
            return Err(io::Error::other("output too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> Template {
        Template::compile(Path::new("t.j2"), source.to_string()).unwrap()
    }

    fn vars() -> TemplateVars {
        TemplateVars {
            ip: "10.0.0.5".into(),
            port: 2070,
            mac: Some("aa:bb:cc:dd:ee:01".into()),
            mac_dashed: Some("aa-bb-cc-dd-ee-01".into()),
            server: "10.0.0.1".into(),
            filename: "grub/grub.cfg".into(),
            captures: [("1".to_string(), "x".to_string())].into(),
            host: Some("name = \"node1\"\nrole = \"compute\"\n".parse().unwrap()),
        }
    }

    #[test]
    fn renders_every_variable() {
        let t = template(
            "{{ ip }}:{{ port }} {{ mac }} {{ mac_dashed }} {{ server }} {{ filename }} {{ captures['1'] }} {{ host.name }}/{{ host.role }}",
        );
        assert!(t.uses_mac());
        let out = t.render(&vars()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "10.0.0.5:2070 aa:bb:cc:dd:ee:01 aa-bb-cc-dd-ee-01 10.0.0.1 grub/grub.cfg x node1/compute"
        );
        assert!(!template("{{ ip }}").uses_mac());
    }

    #[test]
    fn output_and_work_are_bounded() {
        let big = template("{% for i in range(100000) %}{{ filename }}{{ filename }}{% endfor %}");
        let err = big.render(&vars()).unwrap_err();
        assert!(err.0.contains("exceeds") || err.0.contains("fuel"), "{err}");
        let long = template(
            "{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}",
        );
        assert!(long.render(&vars()).unwrap_err().0.contains("fuel"));
        let wide = template("{{ 'x' * 2000000 }}");
        assert!(wide.render(&vars()).is_err());
    }

    #[test]
    fn templates_cannot_reach_files() {
        let compile = |source: &str| {
            Template::compile(Path::new("t.j2"), source.into())
                .err()
                .unwrap_or_else(|| panic!("{source}: compiled"))
        };
        for statement in ["include", "import", "extends"] {
            let err = compile(&format!("{{% {statement} '/etc/passwd' %}}"));
            assert!(
                err.contains(&format!("unknown statement {statement}")),
                "{err}"
            );
        }
        let err = compile("x\n{% if %}");
        assert!(
            err.starts_with("syntax error") && err.contains("(in t.j2:2)"),
            "{err}"
        );
    }
}
