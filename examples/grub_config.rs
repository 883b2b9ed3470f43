//! Boot configurations generated per client, as fbtftp did in production for GRUB: every
//! machine gets a config rendered from its own address (and the server address it
//! reached), served from memory with an exact `tsize`; nothing is written to disk.
//!
//! ```text
//! cargo run --example grub_config -- --listen 127.0.0.1:6969 --host 127.0.0.1=node17
//! curl tftp://127.0.0.1:6969/grub.cfg
//! curl tftp://127.0.0.1:6969/pxelinux.cfg/default
//! ```
//!
//! Names served:
//!
//! - `grub.cfg`, `grub/grub.cfg`, `boot/grub/grub.cfg`: a GRUB 2 menu;
//! - `pxelinux.cfg/default`, and `pxelinux.cfg/<HEX>` when `<HEX>` is the client's IPv4
//!   address in upper-case hex (PXELINUX asks for `01-<mac>` first, then its address in
//!   hex, then shorter hex prefixes, then `default`: the MAC and prefix forms get
//!   ERROR 1 so it moves on).
//!
//! `--host IP=NAME` (repeatable) names known machines; they boot into `NAME`'s profile,
//! unknown ones into the installer.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData, ServerBuilder};

/// Renders boot configurations per client.
struct ConfigGenerator {
    hosts: HashMap<IpAddr, String>,
    kernel: String,
    initrd: String,
}

impl ConfigGenerator {
    fn render(&self, request: &ReadRequest<'_>) -> Option<String> {
        let client = request.peer.ip().to_canonical();
        let server = request.local.ip().to_canonical();
        let (kernel, initrd) = (&self.kernel, &self.initrd);
        let (label, role) = match self.hosts.get(&client) {
            Some(name) => (name.as_str(), format!("hostname={name}")),
            None => ("install", "auto-install".to_string()),
        };
        let name = request.filename_lossy();
        let name = name.trim_start_matches('/');
        match name {
            "grub.cfg" | "grub/grub.cfg" | "boot/grub/grub.cfg" => Some(format!(
                "# generated for {client} by dyntftp\n\
                 set timeout=3\n\
                 set default=0\n\
                 menuentry '{label} ({client})' {{\n\
                 \x20 linux (tftp,{server})/{kernel} ip={client} {role} console=ttyS0\n\
                 \x20 initrd (tftp,{server})/{initrd}\n\
                 }}\n"
            )),
            _ => {
                let file = name.strip_prefix("pxelinux.cfg/")?;
                let own_hex = match client {
                    IpAddr::V4(v4) => Some(format!("{:08X}", u32::from(v4))),
                    IpAddr::V6(_) => None,
                };
                if file != "default" && Some(file) != own_hex.as_deref() {
                    return None;
                }
                Some(format!(
                    "# generated for {client} by dyntftp\n\
                     DEFAULT {label}\n\
                     LABEL {label}\n\
                     \x20 KERNEL {kernel}\n\
                     \x20 APPEND initrd={initrd} ip={client} {role} tftp={server}\n"
                ))
            }
        }
    }
}

impl Handler for ConfigGenerator {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        // BytesSource knows its size, so `tsize` is answered exactly.
        match self.render(request) {
            Some(text) => Ok(Box::new(BytesSource::new(text.into_bytes()))),
            None => Err(Reject::not_found()),
        }
    }
}

fn main() {
    let mut opts = getopts::Options::new();
    opts.optopt(
        "l",
        "listen",
        "address to listen on (default 127.0.0.1:6969)",
        "ADDR:PORT",
    );
    opts.optmulti(
        "",
        "host",
        "a known machine and its name (repeatable)",
        "IP=NAME",
    );
    opts.optopt(
        "",
        "kernel",
        "kernel path in the configs (default vmlinuz)",
        "PATH",
    );
    opts.optopt(
        "",
        "initrd",
        "initrd path in the configs (default initrd.img)",
        "PATH",
    );
    opts.optflag("h", "help", "print this help");
    let usage = opts.usage("Usage: grub_config [--listen ADDR:PORT] [--host IP=NAME]...");
    let matches = match opts.parse(std::env::args().skip(1)) {
        Ok(m) => m,
        Err(e) => fail(&format!("{e}\n{usage}")),
    };
    if matches.opt_present("help") {
        println!("{usage}");
        return;
    }
    let listen: SocketAddr = matches
        .opt_str("listen")
        .unwrap_or_else(|| "127.0.0.1:6969".into())
        .parse()
        .unwrap_or_else(|_| fail("--listen: expected ADDR:PORT"));
    let mut hosts = HashMap::new();
    for host in matches.opt_strs("host") {
        let parsed = host
            .split_once('=')
            .and_then(|(ip, name)| Some((ip.parse::<IpAddr>().ok()?, name.to_string())));
        match parsed {
            Some((ip, name)) if !name.is_empty() => hosts.insert(ip.to_canonical(), name),
            _ => fail(&format!("--host: expected IP=NAME, got {host:?}")),
        };
    }
    let generator = ConfigGenerator {
        hosts,
        kernel: matches
            .opt_str("kernel")
            .unwrap_or_else(|| "vmlinuz".into()),
        initrd: matches
            .opt_str("initrd")
            .unwrap_or_else(|| "initrd.img".into()),
    };
    let mut server = match ServerBuilder::new(generator).bind(listen).build() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("grub_config: {e}");
            std::process::exit(1);
        }
    };
    // The first line on stdout says where we listen (tests read it to learn the port).
    println!("listening on {}", server.local_addr());
    let _ = std::io::stdout().flush();
    if let Err(e) = server.run() {
        eprintln!("grub_config: {e}");
        std::process::exit(1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("grub_config: {message}");
    std::process::exit(2);
}
