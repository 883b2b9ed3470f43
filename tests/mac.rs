//! Client MAC addresses from the kernel's neighbour table (`MacAddr::neighbour`,
//! `ReadRequest::mac`). Loopback has no neighbours, so the tests make network namespaces
//! of their own (root and `ip` needed: skipped loudly without, failing instead with
//! `DYNTFTP_REQUIRE_CLIENTS=1`), joined by a veth pair, and look addresses up, or run a
//! server, on threads that entered them. The namespaces (and their devices) are deleted
//! on drop.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use dyntftp::mac::MacAddr;
use dyntftp::packet::Options;
use dyntftp::{BytesSource, Handler, Notifier, ReadRequest, Reject, ResponseData};
use testkit::*;

/// Runs each `ip -n <ns>` command of `steps`, panicking with the first failure.
fn setup(ns: &NetNs, steps: &[&str]) {
    for step in steps {
        let args: Vec<&str> = step.split_whitespace().collect();
        ns.ip(&args)
            .unwrap_or_else(|e| panic!("setting up {}: {e}", ns.name()));
    }
}

fn mac(text: &str) -> MacAddr {
    MacAddr::parse(text).expect("a MAC address")
}

/// Looks `ips` up in `ns`'s neighbour table: one answer per address.
fn lookup(ns: &NetNs, ips: &[&str]) -> Vec<Option<MacAddr>> {
    let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
    in_namespace(ns.name(), move || {
        ips.into_iter().map(MacAddr::neighbour).collect()
    })
}

#[test]
fn the_neighbour_table_gives_the_mac_of_known_neighbours_only() {
    let test = "the_neighbour_table_gives_the_mac_of_known_neighbours_only";
    let Some(ns) = NetNs::create_or_skip("mac4", test) else {
        return;
    };
    setup(
        &ns,
        &[
            "link add v0 type veth peer name v1",
            "link set v0 up",
            "link set v1 up",
            "addr add 10.233.0.1/24 dev v0",
            "neigh add 10.233.0.2 lladdr 02:00:00:e9:00:02 dev v0 nud permanent",
            "neigh add 10.233.0.3 lladdr 02:00:00:e9:00:03 dev v0 nud stale",
            "neigh add 10.233.0.4 lladdr 02:00:00:e9:00:04 dev v0 nud reachable",
            "neigh add 10.233.0.5 dev v0 nud incomplete",
            "neigh add 10.233.0.6 lladdr 02:00:00:e9:00:06 dev v0 nud failed",
            "neigh add 10.233.0.7 lladdr 00:00:00:00:00:00 dev v0 nud permanent",
            "neigh add 10.233.0.8 lladdr 02:00:00:e9:00:08 dev v0 nud noarp",
        ],
    );
    assert_eq!(
        lookup(
            &ns,
            &[
                "10.233.0.2",
                "10.233.0.3",
                "10.233.0.4",
                "::ffff:10.233.0.2", // IPv4-mapped: looked up as IPv4
                "10.233.0.5",        // incomplete
                "10.233.0.6",        // failed
                "10.233.0.7",        // all zero
                "10.233.0.8",        // noarp
                "10.233.0.9",        // not in the table
                "10.234.0.2",        // not on any link
                "127.0.0.1",
            ]
        ),
        [
            Some(mac("02:00:00:e9:00:02")),
            Some(mac("02:00:00:e9:00:03")),
            Some(mac("02:00:00:e9:00:04")),
            Some(mac("02:00:00:e9:00:02")),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        ]
    );

    if !ipv6_or_skip(test) {
        return;
    }
    setup(
        &ns,
        &[
            "addr add fd00:e9::1/64 dev v0 nodad",
            "neigh add fd00:e9::2 lladdr 02:00:00:e9:60:02 dev v0 nud permanent",
            "neigh add fd00:e9::3 lladdr 02:00:00:e9:60:03 dev v0 nud stale",
            "neigh add fd00:e9::4 dev v0 nud incomplete",
            // One link-local address on two links: which machine is meant is unknown.
            "neigh add fe80::99 lladdr 02:00:00:e9:60:a0 dev v0 nud permanent",
            "neigh add fe80::99 lladdr 02:00:00:e9:60:a1 dev v1 nud permanent",
            // … unless both links see the same machine.
            "neigh add fe80::98 lladdr 02:00:00:e9:60:b0 dev v0 nud permanent",
            "neigh add fe80::98 lladdr 02:00:00:e9:60:b0 dev v1 nud stale",
        ],
    );
    assert_eq!(
        lookup(
            &ns,
            &[
                "fd00:e9::2",
                "fd00:e9::3",
                "fd00:e9::4",
                "fd00:e9::9",
                "fe80::99",
                "fe80::98",
                "::1",
                "10.233.0.2", // IPv4 entries are still there
            ]
        ),
        [
            Some(mac("02:00:00:e9:60:02")),
            Some(mac("02:00:00:e9:60:03")),
            None,
            None,
            None,
            Some(mac("02:00:00:e9:60:b0")),
            None,
            Some(mac("02:00:00:e9:00:02")),
        ]
    );
}

#[test]
fn a_large_neighbour_table_is_read_to_the_end() {
    let test = "a_large_neighbour_table_is_read_to_the_end";
    let Some(ns) = NetNs::create_or_skip("macbig", test) else {
        return;
    };
    setup(
        &ns,
        &[
            "link add v0 type veth peer name v1",
            "link set v0 up",
            "addr add 10.235.0.1/16 dev v0",
        ],
    );
    // 2,000 entries: many dump datagrams; the one asked for comes last.
    let mut batch = String::new();
    for i in 0..2000u32 {
        let (hi, lo) = (i / 250 + 1, i % 250 + 1);
        batch += &format!(
            "neigh add 10.235.{hi}.{lo} lladdr 02:00:00:eb:{:02x}:{:02x} dev v0 nud permanent\n",
            hi, lo
        );
    }
    let dir = TempDir::new("macbig");
    let file = dir.path().join("neigh.batch");
    std::fs::write(&file, batch).unwrap();
    setup(&ns, &[&format!("-batch {}", file.display())]);
    assert_eq!(
        lookup(&ns, &["10.235.1.1", "10.235.8.250", "10.235.9.1"]),
        [
            Some(mac("02:00:00:eb:01:01")),
            Some(mac("02:00:00:eb:08:fa")),
            None
        ]
    );
}

/// Answers every request with what `ReadRequest::mac` says: the MAC, or `none`.
struct ShowMac;

impl Handler for ShowMac {
    fn open(&mut self, req: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let text = req.mac().map_or("none".to_string(), |mac| mac.to_string());
        Ok(Box::new(BytesSource::new(text.into_bytes())))
    }
}

#[test]
fn a_server_learns_the_mac_of_an_on_link_client_from_its_first_request() {
    let test = "a_server_learns_the_mac_of_an_on_link_client_from_its_first_request";
    let Some(server_ns) = NetNs::create_or_skip("macsrv", test) else {
        return;
    };
    let Some(client_ns) = NetNs::create_or_skip("maccli", test) else {
        return;
    };
    let v6 = ipv6_or_skip(test);
    let link = format!(
        "link add v0 type veth peer name v1 address 02:00:00:ec:00:01 netns {}",
        client_ns.name()
    );
    setup(
        &server_ns,
        &[&link, "addr add 10.236.0.1/24 dev v0", "link set v0 up"],
    );
    setup(
        &client_ns,
        &["addr add 10.236.0.2/24 dev v1", "link set v1 up"],
    );
    if v6 {
        setup(&server_ns, &["addr add fd00:ec::1/64 dev v0 nodad"]);
        setup(&client_ns, &["addr add fd00:ec::2/64 dev v1 nodad"]);
    }
    // Dual stack: IPv4 clients come in IPv4-mapped and are looked up as IPv4.
    let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().unwrap();
    let mut server = in_namespace(server_ns.name(), move || {
        spawn_server(Mode::OwnPort, bind, || Box::new(ShowMac), |b| b)
    });
    let fetch_from = |client_ip: &str, server_ip: &str, name: &str| {
        let client_ip: IpAddr = client_ip.parse().unwrap();
        let socket = in_namespace(client_ns.name(), move || {
            UdpSocket::bind((client_ip, 0)).expect("bind client")
        });
        socket.set_read_timeout(Some(WAIT)).expect("set timeout");
        let client = Client {
            socket,
            pace: None,
            mode: Mode::OwnPort,
        };
        let to = SocketAddr::new(server_ip.parse().unwrap(), server.port());
        let fetched = client.fetch(to, name, "octet", &[]).expect("fetch");
        String::from_utf8(fetched.data).unwrap()
    };
    // The client resolved the server's address first (ARP, NDP), and the server's kernel
    // kept the client's address from that: the neighbour table wins over the file name.
    assert_eq!(
        fetch_from("10.236.0.2", "10.236.0.1", "a"),
        "02:00:00:ec:00:01"
    );
    assert_eq!(
        fetch_from(
            "10.236.0.2",
            "10.236.0.1",
            "pxelinux.cfg/01-0a-00-00-00-00-01"
        ),
        "02:00:00:ec:00:01"
    );
    if v6 {
        assert_eq!(
            fetch_from("fd00:ec::2", "fd00:ec::1", "a"),
            "02:00:00:ec:00:01"
        );
    }
    // What the handler looked up is the session's, for its log line.
    for stats in server.sessions(if v6 { 3 } else { 2 }) {
        assert_eq!(stats.mac, Some(mac("02:00:00:ec:00:01")), "{stats:?}");
    }
    drop(server);
}

#[test]
fn off_link_requests_fall_back_to_the_file_name() {
    // Over loopback the kernel has no neighbour entry: only the name can tell.
    let notifier = Notifier::detached();
    // Each request its own notes: they keep the MAC once looked up.
    let request = |peer: &str, filename: &'static [u8]| ReadRequest {
        peer: peer.parse().unwrap(),
        local: "127.0.0.1:69".parse().unwrap(),
        filename,
        mode: dyntftp::Mode::Octet,
        options: Options::parse(b"").unwrap(),
        notifier: &notifier,
        notes: Box::leak(Box::default()),
        now: std::time::Instant::now(),
    };
    let named = Some(mac("aa:bb:cc:00:11:22"));
    assert_eq!(
        request("127.0.0.1:1000", b"pxelinux.cfg/01-aa-bb-cc-00-11-22").mac(),
        named
    );
    assert_eq!(
        request("[::1]:1000", b"grub/grub.cfg-01-aa-bb-cc-00-11-22").mac(),
        named
    );
    assert_eq!(
        request("127.0.0.1:1000", b"aa:bb:cc:00:11:22/ipxe.efi").mac(),
        named
    );
    assert_eq!(request("127.0.0.1:1000", b"pxelinux.0").mac(), None);
    // Looked up once per request: the notes keep the answer, for a second caller and
    // for the session's statistics.
    let notes = dyntftp::handler::SessionNotes::default();
    let req = ReadRequest {
        notes: &notes,
        ..request("127.0.0.1:1000", b"pxelinux.cfg/01-aa-bb-cc-00-11-22")
    };
    assert_eq!(notes.mac(), None);
    assert_eq!(req.mac(), named);
    assert_eq!(notes.mac(), named);
    let renamed = ReadRequest {
        filename: b"pxelinux.0",
        ..req
    };
    assert_eq!(renamed.mac(), named, "the same request's answer");
}
