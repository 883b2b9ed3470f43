//! MTU-sized blocks (`ServerBuilder::mtu_blksize`): a client asking for the largest
//! blksize over a 1500-byte link gets what fits one unfragmented datagram there (IPv4
//! 1468, IPv6 1448), and with the clamp off what it asked for. The link is a veth pair
//! between two network namespaces the test creates (root and `ip` needed: skipped loudly
//! without, failing instead with `DYNTFTP_REQUIRE_CLIENTS=1`); the server's and the
//! client's sockets are made on threads that entered those namespaces. Loopback, with its
//! 65536-byte MTU, keeps the largest blksize.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};

use dyntftp::Packet;
use testkit::*;

/// 70,000 bytes: DATA 1 is a full block at any block size.
const FILE_LEN: usize = 70_000;

/// Runs `ip` with `args`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two network namespaces joined by a veth pair with a 1500-byte MTU (`veth0` in the
/// server's, `veth1` in the client's), removed (with the pair) on drop.
struct Link {
    server_ns: String,
    client_ns: String,
}

impl Link {
    /// The namespaces for test `tag` with the given addresses (prefix length included),
    /// or `None` after a loud SKIPPED line (a panic when clients are required).
    fn create(tag: &str, server: &[&str], client: &[&str]) -> Option<Link> {
        let skip = |why: String| {
            if require_clients() {
                panic!("{tag}: {why}, and DYNTFTP_REQUIRE_CLIENTS=1");
            }
            eprintln!("SKIPPED: {tag}: {why} (set DYNTFTP_REQUIRE_CLIENTS=1 to make this fail)");
        };
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip("network namespaces need root".into());
            return None;
        }
        if which("ip").is_none() {
            skip("ip (iproute2) is not installed".into());
            return None;
        }
        let id = std::process::id();
        let link = Link {
            server_ns: format!("dyntftp-{tag}-{id}-s"),
            client_ns: format!("dyntftp-{tag}-{id}-c"),
        };
        let (s, c) = (link.server_ns.as_str(), link.client_ns.as_str());
        let mut steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", s],
            vec!["netns", "add", c],
            vec![
                "-n", s, "link", "add", "veth0", "mtu", "1500", "type", "veth", "peer", "name",
                "veth1", "mtu", "1500", "netns", c,
            ],
        ];
        for addr in server {
            steps.push(vec!["-n", s, "addr", "add", addr, "dev", "veth0", "nodad"]);
        }
        for addr in client {
            steps.push(vec!["-n", c, "addr", "add", addr, "dev", "veth1", "nodad"]);
        }
        steps.push(vec!["-n", s, "link", "set", "veth0", "up"]);
        steps.push(vec!["-n", c, "link", "set", "veth1", "up"]);
        for step in steps {
            if let Err(e) = ip(&step) {
                // `link` drops here: what was made is removed.
                skip(format!("cannot set up the namespaces: {e}"));
                return None;
            }
        }
        Some(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.server_ns, &self.client_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A server on `bind` in namespace `ns`, serving `big.bin`, with the MTU clamp `clamp`.
fn server_in(ns: &str, bind: SocketAddr, root: &TempDir, clamp: bool) -> ServerGuard {
    let root = root.path().to_path_buf();
    in_namespace(ns, move || {
        spawn_fs_with(Mode::OwnPort, bind, &root, move |b| b.mtu_blksize(clamp))
    })
}

/// A client socket on `addr` in namespace `ns`.
fn client_in(ns: &str, addr: IpAddr) -> Raw {
    let socket = in_namespace(ns, move || UdpSocket::bind((addr, 0)).expect("bind client"));
    socket.set_read_timeout(Some(WAIT)).expect("set timeout");
    Raw { socket }
}

/// Asks `server` for `big.bin` with blksize 65464 and returns the blksize of the OACK,
/// after checking that DATA 1 is that large; then ends the transfer with an ERROR.
fn granted_blksize(client: &Raw, server: SocketAddr) -> usize {
    client.rrq(server, b"big.bin", "octet", &[("blksize", "65464")]);
    let (oack, tid) = client.recv();
    let blksize = match Packet::parse(&oack) {
        Ok(Packet::Oack(options)) => options
            .iter()
            .find(|o| o.name.eq_ignore_ascii_case(b"blksize"))
            .and_then(|o| std::str::from_utf8(o.value).ok()?.parse::<usize>().ok())
            .expect("blksize in the OACK"),
        other => panic!("expected an OACK from {tid}, got {other:?}"),
    };
    client.ack(tid, 0);
    let (block, data, from) = client.expect_data();
    assert_eq!((block, data.len(), from), (1, blksize, tid));
    // ERROR 0: the client gives up; the server ends the session.
    client.send(tid, b"\x00\x05\x00\x00done\x00");
    blksize
}

#[test]
fn ipv4_blocks_fit_a_1500_byte_link_unless_the_clamp_is_off() {
    let Some(link) = Link::create("mtu4", &["10.231.0.1/24"], &["10.231.0.2/24"]) else {
        return;
    };
    let root = TempDir::new("mtu4");
    root.write("big.bin", &pseudo_random(FILE_LEN, 4));
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let clamped = server_in(&link.server_ns, any, &root, true);
    let unclamped = server_in(&link.server_ns, any, &root, false);
    let client = client_in(&link.client_ns, "10.231.0.2".parse().unwrap());
    let to = |server: &ServerGuard| SocketAddr::from(([10, 231, 0, 1], server.port()));
    assert_eq!(granted_blksize(&client, to(&clamped)), 1500 - 20 - 8 - 4);
    // Off: what was asked, in fragments the client's kernel reassembles.
    assert_eq!(granted_blksize(&client, to(&unclamped)), 65464);
    drop((clamped, unclamped));
    drop(link);
}

#[test]
fn ipv6_blocks_fit_a_1500_byte_link_and_so_do_ipv4_ones_on_a_dual_stack_listener() {
    // A host without IPv6 skips, as the loopback suites do.
    if !ipv6_or_skip("mtu6") {
        return;
    }
    let Some(link) = Link::create(
        "mtu6",
        &["fd00:dead:16::1/64", "10.232.0.1/24"],
        &["fd00:dead:16::2/64", "10.232.0.2/24"],
    ) else {
        return;
    };
    let root = TempDir::new("mtu6");
    root.write("big.bin", &pseudo_random(FILE_LEN, 6));
    let server = server_in(&link.server_ns, "[::]:0".parse().unwrap(), &root, true);
    let v6 = client_in(&link.client_ns, "fd00:dead:16::2".parse().unwrap());
    let server_v6 = SocketAddr::new("fd00:dead:16::1".parse().unwrap(), server.port());
    assert_eq!(granted_blksize(&v6, server_v6), 1500 - 40 - 8 - 4);
    let v4 = client_in(&link.client_ns, "10.232.0.2".parse().unwrap());
    let server_v4 = SocketAddr::from(([10, 232, 0, 1], server.port()));
    assert_eq!(granted_blksize(&v4, server_v4), 1500 - 20 - 8 - 4);
    drop(server);
    drop(link);
}

#[test]
fn loopback_keeps_the_largest_blksize() {
    let root = TempDir::new("mtu-lo");
    root.write("big.bin", &pseudo_random(FILE_LEN, 1));
    let server = spawn_fs(Mode::OwnPort, v4(), root.path());
    let client = Raw::new(server.addr);
    assert_eq!(granted_blksize(&client, server.addr), 65464);
}
