//! Loopback addresses for servers and client sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// `127.0.0.1:0`.
pub fn v4() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// `[::1]:0`.
pub fn v6() -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, 0))
}

/// True when `::1` can be bound; prints a loud SKIPPED line otherwise.
pub fn ipv6_or_skip(test: &str) -> bool {
    match UdpSocket::bind(v6()) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: {test}: cannot bind [::1] ({e}); IPv6 loopback unavailable");
            false
        }
    }
}

/// A loopback address of the same family as `server`, port 0 (for client sockets).
pub fn loopback_like(server: SocketAddr) -> SocketAddr {
    match server.ip() {
        IpAddr::V4(_) => v4(),
        IpAddr::V6(_) => v6(),
    }
}

/// Whether this host routes 127.0.0.2 to loopback (Linux does for all of 127/8); says
/// the test is skipped when it does not.
pub fn loopback_127_0_0_2(test: &str) -> bool {
    let ok = UdpSocket::bind("127.0.0.2:0").is_ok();
    if !ok {
        eprintln!("SKIPPED: {test}: 127.0.0.2 is not a local address here");
    }
    ok
}
