//! Generated per-client content: every client that asks for `pxelinux.cfg/default` (or
//! `grub.cfg`) gets a boot configuration rendered from its own address and the server
//! address it reached, straight from memory; nothing touches the disk.
//!
//! ```text
//! cargo run --example grub_config -- 127.0.0.1:1069
//! curl tftp://127.0.0.1:1069/grub.cfg
//! ```

use dyntftp::{BytesSource, Handler, ReadRequest, Reject, ResponseData, ServerBuilder};

/// Renders boot configurations per client.
struct ConfigGenerator;

impl ConfigGenerator {
    fn render(request: &ReadRequest<'_>) -> Option<String> {
        let client = request.peer.ip();
        let server = request.local.ip();
        match &*request.filename_lossy() {
            "pxelinux.cfg/default" => Some(format!(
                "DEFAULT install\nLABEL install\n  KERNEL tftp://{server}/vmlinuz\n  \
                 APPEND initrd=tftp://{server}/initrd.img ip={client} console=ttyS0\n"
            )),
            "grub.cfg" => Some(format!(
                "set timeout=1\nmenuentry 'install {client}' {{\n  \
                 linux (tftp,{server})/vmlinuz ip={client}\n  \
                 initrd (tftp,{server})/initrd.img\n}}\n"
            )),
            _ => None,
        }
    }
}

impl Handler for ConfigGenerator {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        // BytesSource knows its size, so `tsize` is answered exactly.
        match ConfigGenerator::render(request) {
            Some(text) => Ok(Box::new(BytesSource::new(text.into_bytes()))),
            None => Err(Reject::not_found()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1069".into())
        .parse()?;
    let mut server = ServerBuilder::new(ConfigGenerator).bind(addr).build()?;
    println!("generating boot configs on {}", server.local_addr());
    server.run()?;
    Ok(())
}
