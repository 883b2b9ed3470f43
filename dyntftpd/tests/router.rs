//! dyntftpd's router, black-box: the daemon started with a configuration file of
//! `[[rule]]`s on 127.0.0.1 (port 0, its address read from its log), fetched from with the
//! test client. Rule precedence, glob and regex captures in templates, templates per MAC
//! and per inventory host, client and local address matches, empty and refuse answers on
//! the wire, http rules against a local repository, the fallback to the root directory,
//! the rule in the JSON session log, configuration errors, `--check-config` and
//! `--dry-run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use testkit::*;

const BIN: &str = env!("CARGO_BIN_EXE_dyntftpd");

/// A configuration directory: `dyntftpd.toml`, the root (`root/`), a directory for rules
/// (`images/`), templates and an inventory file.
struct Setup {
    dir: TempDir,
}

impl Setup {
    /// A setup whose configuration file is `root = "<dir>/root"` followed by `rules`.
    fn new(tag: &str, rules: &str) -> Setup {
        let dir = TempDir::new(tag);
        dir.write("root/pxelinux.0", b"root pxelinux\n");
        dir.write("root/shared.txt", b"root shared\n");
        dir.write("images/vmlinuz", b"image kernel\n");
        let setup = Setup { dir };
        setup.write_config(rules);
        setup
    }

    fn write_config(&self, rules: &str) {
        let root = self.dir.path().join("root");
        let text = format!("root = {:?}\n{rules}", root.display().to_string());
        self.dir.write("dyntftpd.toml", text.as_bytes());
    }

    fn write(&self, name: &str, text: &str) {
        self.dir.write(name, text.as_bytes());
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("dyntftpd.toml")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Runs `dyntftpd --config FILE ARGS` to its end.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(self.config())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("dyntftpd runs")
    }

    /// Starts the daemon on 127.0.0.1, port 0, with a JSON log.
    fn start(&self) -> Daemon {
        self.start_on("127.0.0.1")
    }

    /// Starts the daemon on `ip`, port 0, with a JSON log.
    fn start_on(&self, ip: &str) -> Daemon {
        let log = self.dir.path().join(format!("log-{ip}.json"));
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(self.config())
            .args([
                "-l",
                &format!("{ip}:0"),
                "--timeout",
                "0.25",
                "--retries",
                "3",
            ])
            .args(["--log-format", "json"]);
        let mut daemon = Daemon::spawn(command, SocketAddr::from(([127, 0, 0, 1], 0)), &log);
        daemon.addr = eventually("dyntftpd's serving line", WAIT, || {
            daemon.assert_running();
            daemon.records().iter().find_map(|r| {
                let message = r["message"].as_str()?;
                let rest = message.strip_prefix("serving ")?;
                let (_, after) = rest.split_once(" on ")?;
                after.split(' ').next()?.parse().ok()
            })
        });
        daemon
    }
}

/// What the tests read from a running dyntftpd: its JSON log, its files.
trait Served {
    /// The complete JSON lines of the log.
    fn records(&self) -> Vec<serde_json::Value>;
    /// Fetches `name`: its content, or the ERROR's code and message.
    fn get(&self, name: &str) -> Result<Vec<u8>, (u16, String)>;
    /// Fetches `name` and returns its content as text.
    fn text(&self, name: &str) -> String;
    /// Waits for the session record of `name` in the JSON log.
    fn session(&self, name: &str) -> serde_json::Value;
}

impl Served for Daemon {
    /// The complete JSON lines of the log.
    fn records(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Fetches `name`: its content, or the ERROR's code and message. The request carries
    /// options, so that it is large enough for the messages (the server sends no ERROR
    /// larger than the request it answers).
    fn get(&self, name: &str) -> Result<Vec<u8>, (u16, String)> {
        let options = [("blksize", "1468"), ("timeout", "1"), ("windowsize", "1")];
        match fetch(Mode::OwnPort, self.addr, name, "octet", &options) {
            Ok(got) => Ok(got.data),
            Err(ClientError::Error { code, message, .. }) => Err((code, message)),
            Err(e) => panic!("{name}: {e:?}\n{}", self.log()),
        }
    }

    /// Fetches `name` and returns its content as text.
    fn text(&self, name: &str) -> String {
        let data = self
            .get(name)
            .unwrap_or_else(|e| panic!("{name}: {e:?}\n{}", self.log()));
        String::from_utf8(data).unwrap()
    }

    /// Waits for the session record of `name` in the JSON log.
    fn session(&self, name: &str) -> serde_json::Value {
        eventually(&format!("the session log of {name}"), WAIT, || {
            self.records()
                .into_iter()
                .find(|r| r["type"] == "session" && r["filename"] == name)
        })
    }
}

#[test]
fn the_first_matching_rule_answers_and_the_rest_falls_back_to_root() {
    let setup = Setup::new(
        "router-precedence",
        r#"
[[rule]]
name = "first"
filename = "boot/*.cfg"
refuse = { code = 2, message = "first rule" }

[[rule]]
name = "second"
filename = "boot/**"
refuse = { code = 2, message = "second rule" }

[[rule]]
name = "images"
filename = "images/*"
directory = "images"
strip-prefix = ["images"]
"#,
    );
    let daemon = setup.start();
    assert_eq!(daemon.get("boot/a.cfg"), Err((2, "first rule".into())));
    assert_eq!(daemon.get("boot/a.img"), Err((2, "second rule".into())));
    assert_eq!(daemon.get("boot/x/a.cfg"), Err((2, "second rule".into())));
    assert_eq!(daemon.text("images/vmlinuz"), "image kernel\n");
    // No rule: the root directory, as without rules, with its ERROR 1.
    assert_eq!(daemon.text("pxelinux.0"), "root pxelinux\n");
    assert_eq!(daemon.text("/shared.txt"), "root shared\n");
    assert_eq!(daemon.get("missing"), Err((1, "file not found".into())));
    // The rule that answered is in the session log (refusals start no session).
    assert_eq!(daemon.session("images/vmlinuz")["rule"], "images");
    assert_eq!(daemon.session("pxelinux.0")["rule"], "root");
}

#[test]
fn templates_see_glob_and_regex_captures_and_the_request() {
    let setup = Setup::new(
        "router-captures",
        r#"
[[rule]]
name = "menu"
regex = '^menus/(?P<arch>[a-z0-9_]+)/(\w+)\.ipxe$'
template = "menu.j2"

[[rule]]
name = "any-cfg"
filename = "cfg/*.cfg"
template = "cfg.j2"
"#,
    );
    setup.write(
        "menu.j2",
        "arch={{ captures.arch }} second={{ captures['2'] }} whole={{ captures['0'] }}\n",
    );
    setup.write(
        "cfg.j2",
        "file={{ filename }} ip={{ ip }} server={{ server }} captures={{ captures | length }}\n",
    );
    let daemon = setup.start();
    assert_eq!(
        daemon.text("menus/x86_64/boot.ipxe"),
        "arch=x86_64 second=boot whole=menus/x86_64/boot.ipxe\n"
    );
    assert_eq!(
        daemon.text("/cfg/node.cfg"),
        "file=cfg/node.cfg ip=127.0.0.1 server=127.0.0.1 captures=0\n"
    );
    // A name the regex does not match falls through to the root.
    assert_eq!(
        daemon.get("menus/X/boot.ipxe"),
        Err((1, "file not found".into()))
    );
}

#[test]
fn templates_per_mac_and_per_inventory_host() {
    let setup = Setup::new(
        "router-mac",
        r#"
inventory = "hosts.toml"

[[rule]]
name = "known-host"
filename = "pxelinux.cfg/01-*"
host = true
template = "host.j2"

[[rule]]
name = "by-mac"
filename = "pxelinux.cfg/01-*"
mac = ["02:00:00:00:00:99"]
template = "mac.j2"

[[rule]]
name = "unknown"
filename = "pxelinux.cfg/01-*"
refuse = { code = 1, message = "unknown machine" }

[host."AA-BB-CC-DD-EE-01"]
name = "node1"
role = "compute"
"#,
    );
    setup.write(
        "hosts.toml",
        "[host.\"aa:bb:cc:dd:ee:02\"]\nname = \"node2\"\nrole = \"storage\"\n",
    );
    setup.write(
        "host.j2",
        "host={{ host.name }} role={{ host.role }} mac={{ mac }} dashed={{ mac_dashed }}\n",
    );
    setup.write("mac.j2", "only for {{ mac }}\n");
    let daemon = setup.start();
    // Loopback has no neighbour entry: the MAC comes from the PXELINUX file name.
    assert_eq!(
        daemon.text("pxelinux.cfg/01-aa-bb-cc-dd-ee-01"),
        "host=node1 role=compute mac=aa:bb:cc:dd:ee:01 dashed=aa-bb-cc-dd-ee-01\n"
    );
    assert_eq!(
        daemon.text("pxelinux.cfg/01-aa-bb-cc-dd-ee-02"),
        "host=node2 role=storage mac=aa:bb:cc:dd:ee:02 dashed=aa-bb-cc-dd-ee-02\n"
    );
    assert_eq!(
        daemon.text("pxelinux.cfg/01-02-00-00-00-00-99"),
        "only for 02:00:00:00:00:99\n"
    );
    assert_eq!(
        daemon.get("pxelinux.cfg/01-02-00-00-00-00-98"),
        Err((1, "unknown machine".into()))
    );
    assert_eq!(
        daemon.session("pxelinux.cfg/01-aa-bb-cc-dd-ee-02")["rule"],
        "known-host"
    );
    assert_eq!(
        daemon.session("pxelinux.cfg/01-02-00-00-00-00-99")["rule"],
        "by-mac"
    );
}

#[test]
fn client_networks_and_local_addresses_select_rules() {
    let setup = Setup::new(
        "router-addresses",
        r#"
[[rule]]
name = "other-net"
client = ["10.0.0.0/8", "fd00::/8"]
refuse = { code = 2, message = "other network" }

[[rule]]
name = "other-local"
local = ["127.0.0.2", "::1"]
refuse = { code = 2, message = "other address" }

[[rule]]
name = "loopback"
client = ["127.0.0.0/8"]
local = ["127.0.0.1"]
filename = "who"
template = "who.j2"
"#,
    );
    setup.write("who.j2", "{{ ip }} reached {{ server }}\n");
    let daemon = setup.start();
    // Neither of the first two rules holds for 127.0.0.1 → 127.0.0.1.
    assert_eq!(daemon.text("who"), "127.0.0.1 reached 127.0.0.1\n");
    assert_eq!(daemon.text("pxelinux.0"), "root pxelinux\n");
    // Reached at 127.0.0.2 (where the host has it), the second rule holds.
    if loopback_127_0_0_2("client_networks_and_local_addresses_select_rules") {
        let other = setup.start_on("127.0.0.2");
        assert_eq!(other.get("who"), Err((2, "other address".into())));
    }
}

#[test]
fn empty_and_refuse_answer_on_the_wire() {
    let setup = Setup::new(
        "router-empty-refuse",
        r#"
[[rule]]
filename = "**/*.lst"
empty = true

[[rule]]
name = "no-windows"
regex = '(?i)^boot/bcd$'
refuse = { code = 2, message = "no Windows here" }

[[rule]]
filename = "old/*"
refuse = { code = 1 }
"#,
    );
    let daemon = setup.start();
    let got = fetch(
        Mode::OwnPort,
        daemon.addr,
        "grub/x86_64-efi/command.lst",
        "octet",
        &[("tsize", "0")],
    )
    .unwrap();
    assert!(got.data.is_empty());
    assert_eq!(got.oack_value("tsize"), Some("0"));
    // Backslashes are separators before matching, as for the root.
    assert_eq!(
        daemon.get("\\Boot\\BCD"),
        Err((2, "no Windows here".into()))
    );
    assert_eq!(daemon.get("old/x"), Err((1, "file not found".into())));
    assert_eq!(
        daemon.session("grub/x86_64-efi/command.lst")["rule"],
        "rule-1"
    );
}

/// An HTTP repository on 127.0.0.1 that answers every GET with the path it was asked
/// for, and records the paths.
struct EchoRepository {
    addr: SocketAddr,
    paths: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoRepository {
    fn start() -> EchoRepository {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind HTTP");
        let addr = server.server_addr().to_ip().expect("an IP listener");
        let paths = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopping) = (Arc::clone(&paths), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(20)) else {
                    continue;
                };
                let path = request.url().to_owned();
                log.lock().unwrap().push(path.clone());
                let body = format!("GET {path}\n");
                let _ = request.respond(tiny_http::Response::from_string(body));
            }
        });
        EchoRepository {
            addr,
            paths,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoRepository {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn http_rules_and_the_upstream_fetch_templated_urls() {
    let repo = EchoRepository::start();
    let setup = Setup::new(
        "router-http",
        &format!(
            r#"
upstream = "http://{addr}/fallback"

[[rule]]
name = "per-mac"
regex = '^(?P<mac>[0-9a-f-]{{17}})/(?P<file>.+)$'
http = "http://{addr}/machines/{{mac_dashed}}/{{file}}?ip={{ip}}"

[[rule]]
name = "boot"
filename = "boot/**"
http = "http://{addr}/repo/{{path}}"
"#,
            addr = repo.addr
        ),
    );
    let daemon = setup.start();
    assert_eq!(
        daemon.text("aa-bb-cc-dd-ee-01/grub x.cfg"),
        "GET /machines/aa-bb-cc-dd-ee-01/grub%20x.cfg?ip=127.0.0.1\n"
    );
    assert_eq!(
        daemon.text("boot/efi/../vmlinuz"),
        "GET /repo/boot/vmlinuz\n"
    );
    // Not a rule's, not under root: the upstream, with the name joined to its URL.
    assert_eq!(daemon.text("pxelinux.0"), "root pxelinux\n");
    assert_eq!(daemon.text("extra/initrd"), "GET /fallback/extra/initrd\n");
    assert_eq!(daemon.session("extra/initrd")["rule"], "upstream");
    assert_eq!(daemon.session("boot/efi/../vmlinuz")["rule"], "boot");
    // A name that climbs above the URL is refused, and reaches no repository.
    assert_eq!(
        daemon.get("boot/../../x"),
        Err((2, "access violation".into()))
    );
    assert!(!repo.paths.lock().unwrap().iter().any(|p| p.contains("/x")));
}

/// Runs `dyntftpd --config FILE --check-config`; returns (exit code, stdout, stderr).
fn check(setup: &Setup) -> (Option<i32>, String, String) {
    let out = setup.run(&["--check-config"]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn configuration_errors_name_file_line_rule_and_key() {
    let setup = Setup::new("router-errors", "");
    let file = setup.config().display().to_string();
    // Line 1 is root = …; the rules start on line 2.
    for (rules, want) in [
        (
            "[[rule]]\nname = \"a\"\nfilename = \"x\"\ndirectory = \"images\"\ntemplate = \"t.j2\"\n",
            "line 6, column 1: rule \"a\": template: a rule has one action, and this one has directory and template",
        ),
        (
            "[[rule]]\nfilename = \"x\"\nempty = true\nbogus = 3\n",
            "line 5, column 1: rule \"rule-1\": unknown field `bogus`, expected one of `name`",
        ),
        (
            "[[rule]]\nempty = true\n[[rule]]\nregex = \"a(b\"\nempty = true\n",
            "line 5, column 1: rule \"rule-2\": regex: regex parse error",
        ),
        (
            "[[rule]]\nfilename = \"a/[b\"\nempty = true\n",
            "line 3, column 1: rule \"rule-1\": filename: unclosed character class; missing ']'",
        ),
        (
            "[[rule]]\nclient = [\"10.0.0.0/40\"]\nempty = true\n",
            "line 3, column 1: rule \"rule-1\": client: \"10.0.0.0/40\" is not a network (e.g. 10.0.0.0/8, fd00::/8) or an address",
        ),
        (
            "[[rule]]\nmac = [\"aa:bb:cc\"]\nempty = true\n",
            "line 3, column 1: rule \"rule-1\": mac: \"aa:bb:cc\" is not a MAC address (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)",
        ),
        (
            "[[rule]]\nname = \"gone\"\ndirectory = \"no-such-dir\"\n",
            "line 4, column 1: rule \"gone\": directory: cannot serve ",
        ),
        (
            "[[rule]]\ntemplate = \"broken.j2\"\n",
            "line 3, column 1: rule \"rule-1\": template: syntax error: unexpected end of input",
        ),
        (
            "[[rule]]\nrefuse = { code = 12, message = \"x\" }\n",
            "line 3, column 1: rule \"rule-1\": refuse: code 12 is not a TFTP error code (0 to 7)",
        ),
        (
            "[host.\"node1\"]\nrole = \"x\"\n",
            "host \"node1\": not a MAC address (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)",
        ),
    ] {
        setup.write("broken.j2", "{% if x %}\n");
        setup.write_config(rules);
        let (code, _, err) = check(&setup);
        assert_eq!(code, Some(2), "{rules}: {err}");
        let want = format!("dyntftpd: {file}: {want}");
        assert!(err.starts_with(&want), "{rules}\n got: {err}\nwant: {want}");
        // Start-up refuses the same, before serving.
        let out = setup.run(&["-l", "127.0.0.1:0"]);
        assert_eq!(out.status.code(), Some(2), "{rules}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with(&want));
    }
}

#[test]
fn check_config_prints_the_rules_after_the_settings() {
    let setup = Setup::new(
        "router-check",
        r#"
[[rule]]
name = "grub"
filename = "grub/grub.cfg-01-*"
host = true
template = "grub.j2"

[[rule]]
client = ["10.0.0.0/8"]
refuse = { code = 2, message = "no" }

[host."aa:bb:cc:dd:ee:01"]
name = "node1"
"#,
    );
    setup.write("grub.j2", "set default={{ host.name }}\n");
    let (code, out, err) = check(&setup);
    assert_eq!(code, Some(0), "{err}");
    let root = setup.path("root");
    let grub = setup.path("grub.j2");
    let tail: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("# rule"))
        .collect();
    assert_eq!(
        tail,
        [
            format!("# rule \"grub\": filename = \"grub/grub.cfg-01-*\", host = true -> template = {grub:?} (looks up the MAC)"),
            "# rule \"rule-2\": client = [\"10.0.0.0/8\"] -> refuse = { code = 2, message = \"no\" }".to_string(),
            format!("# otherwise: directory = {root:?}"),
            "# inventory: 1 hosts".to_string(),
        ]
    );
    // The settings come first; the rules are comments, so the output still reads back as
    // the same settings.
    assert!(out.starts_with(&format!("root = {root:?}\n")), "{out}");
}

#[test]
fn dry_run_shows_the_rule_and_the_answer_without_serving() {
    let setup = Setup::new(
        "router-dry-run",
        r#"
inventory = "hosts.toml"

[[rule]]
name = "per-mac"
regex = '^pxelinux\.cfg/01-(?P<mac>[0-9a-f-]{17})$'
template = "pxe.j2"

[[rule]]
name = "lab"
client = ["10.1.0.0/16"]
filename = "images/*"
directory = "images"
strip-prefix = ["images"]

[[rule]]
name = "repo"
filename = "boot/**"
http = "http://repo.example/{mac}/{path}"
"#,
    );
    setup.write(
        "hosts.toml",
        "[host.\"aa:bb:cc:dd:ee:01\"]\nname = \"node1\"\n",
    );
    setup.write("pxe.j2", "default {{ host.name }} from {{ server }}\n");
    let run = |args: &[&str]| {
        let out = setup.run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let rendered = "default node1 from 10.0.0.1\n";
    assert_eq!(
        run(&[
            "--dry-run",
            "pxelinux.cfg/01-aa-bb-cc-dd-ee-01",
            "-l",
            "10.0.0.1:69"
        ]),
        format!(
            "request: \"pxelinux.cfg/01-aa-bb-cc-dd-ee-01\" from 127.0.0.1:0 to 10.0.0.1:69\n\
             name: \"pxelinux.cfg/01-aa-bb-cc-dd-ee-01\"\n\
             rule: \"per-mac\" (number 1)\n\
             capture 0: \"pxelinux.cfg/01-aa-bb-cc-dd-ee-01\"\n\
             capture 1: \"aa-bb-cc-dd-ee-01\"\n\
             capture mac: \"aa-bb-cc-dd-ee-01\"\n\
             template {}: {} bytes\n\
             {rendered}\
             mac: aa:bb:cc:dd:ee:01\n",
            setup.path("pxe.j2"),
            rendered.len()
        )
    );
    let images = setup.path("images");
    assert_eq!(
        run(&[
            "--dry-run",
            "images/vmlinuz",
            "--dry-run-client",
            "10.1.2.3"
        ]),
        format!(
            "request: \"images/vmlinuz\" from 10.1.2.3:0 to 127.0.0.1:69\n\
             name: \"images/vmlinuz\"\n\
             rule: \"lab\" (number 2)\n\
             directory: {images}\n\
             file: {images}/vmlinuz\n\
             answer: 13 bytes\n\
             mac: not needed\n"
        )
    );
    // Another client: no rule, the root (where the file is missing).
    let root = setup.path("root");
    assert_eq!(
        run(&["--dry-run", "images/vmlinuz"]),
        format!(
            "request: \"images/vmlinuz\" from 127.0.0.1:0 to 127.0.0.1:69\n\
             name: \"images/vmlinuz\"\n\
             rule: none matches\n\
             directory: {root}\n\
             file: {root}/images/vmlinuz\n\
             answer: ERROR 1 (file not found): file not found\n"
        )
    );
    assert!(run(&[
        "--dry-run",
        "boot/x",
        "--dry-run-mac",
        "02-00-00-00-00-07",
        "--dry-run-local",
        "10.0.0.9"
    ])
    .contains("\nhttp: GET http://repo.example/02%3A00%3A00%3A00%3A00%3A07/boot/x\nmac: 02:00:00:00:00:07\n"));
}

#[test]
fn a_failing_template_is_error_0_with_one_warning() {
    let setup = Setup::new(
        "router-template-errors",
        r#"
[[rule]]
name = "huge"
filename = "huge"
template = "huge.j2"

[[rule]]
name = "broken"
filename = "broken"
template = "broken.j2"
"#,
    );
    // More than the 1 MiB a rendering may write.
    setup.write(
        "huge.j2",
        "{% for i in range(3000) %}{{ 'x' * 1000 }}{% endfor %}",
    );
    setup.write("broken.j2", "{{ host.name.missing() }}\n");
    let daemon = setup.start();
    for name in ["huge", "broken", "huge", "broken"] {
        assert_eq!(
            daemon.get(name),
            Err((0, "template error".into())),
            "{name}"
        );
    }
    // One warning per template within ten seconds, whatever clients do.
    let warnings = |template: &str| {
        let prefix = format!("template {}", setup.path(template));
        daemon
            .records()
            .iter()
            .filter(|r| r["level"] == "WARN")
            .filter(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&prefix))
            })
            .count()
    };
    eventually("the warnings", WAIT, || {
        (warnings("huge.j2") == 1 && warnings("broken.j2") == 1).then_some(())
    });
    assert_eq!(warnings("huge.j2"), 1, "{}", daemon.log());
}
