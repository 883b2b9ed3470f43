//! Client families over loopback: each firmware's request lands in its family in the
//! session statistics and the server's counters, and a file too large for a client that
//! cannot roll block numbers over (the Raspberry Pi EEPROM) is refused at once with
//! ERROR 3, while the same file goes to a client that can.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use dyntftp::{ClientFamily, Handler, Packet, ReadRequest, Reject, ResponseData};
use testkit::*;

/// A source that announces `size` bytes of zeros and serves them.
struct Zeros {
    left: u64,
    size: u64,
}

impl ResponseData for Zeros {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        buf[..n].fill(0);
        self.left -= n as u64;
        Ok(n)
    }

    fn size(&self) -> Option<u64> {
        Some(self.size)
    }
}

/// Serves `big` (one byte more than a client without rollover can read at blksize 1024)
/// and `small` (1 KiB) under any directory.
struct Sizes;

/// The largest file a client without block rollover reads at blksize 1024.
const MOST_WITHOUT_ROLLOVER: u64 = 65_535 * 1024 - 1;

impl Handler for Sizes {
    fn open(&mut self, request: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        let size = if request.filename.ends_with(b"big") {
            MOST_WITHOUT_ROLLOVER + 1
        } else {
            1024
        };
        Ok(Box::new(Zeros { left: size, size }))
    }
}

fn spawn(mode: Mode) -> ServerGuard {
    spawn_server(
        mode,
        net::v4(),
        || Box::new(Sizes),
        |b| b.stats_interval(Duration::from_millis(50)),
    )
}

/// Sends an RRQ and returns the first answer: Ok(OACK option names and where it came from)
/// or Err(ERROR code).
fn first_answer(
    raw: &Raw,
    server: &ServerGuard,
    name: &str,
    options: &[(&str, &str)],
) -> Result<(Vec<String>, SocketAddr), u16> {
    raw.rrq(server.addr, name.as_bytes(), "octet", options);
    let (datagram, from) = raw.recv();
    match Packet::parse(&datagram) {
        Ok(Packet::Oack(options)) => Ok((
            options
                .iter()
                .map(|o| String::from_utf8_lossy(o.name).into_owned())
                .collect(),
            from,
        )),
        Ok(Packet::Error { code, .. }) => Err(code.to_u16()),
        other => panic!("{name}: unexpected answer {other:?}"),
    }
}

both_modes!(a_file_too_large_for_a_client_without_rollover_is_refused_at_once);
fn a_file_too_large_for_a_client_without_rollover_is_refused_at_once(mode: Mode) {
    let mut server = spawn(mode);
    let pi = [("tsize", "0"), ("blksize", "1024")];
    // The Raspberry Pi EEPROM asking for a file of 65,535 full blocks: ERROR 3 at once.
    let raw = Raw::new(server.addr);
    assert_eq!(first_answer(&raw, &server, "1a2b3c4d/big", &pi), Err(3));
    // GRUB sends the same options for the same file: it rolls over, so it is served.
    let grub = Raw::new(server.addr);
    let (names, session) = first_answer(&grub, &server, "grub/big", &pi).expect("an OACK");
    assert_eq!(names, ["tsize", "blksize"]);
    // It was a size probe: ERROR 8 ends it.
    let mut error = Vec::new();
    dyntftp::packet::write_error(&mut error, dyntftp::ErrorCode::Unknown(8), "probe");
    grub.send(session, &error);
    // A file the Pi can read: served, and counted in its family.
    let client = Client::new(mode, server.addr);
    let got = client
        .fetch_with(
            server.addr,
            b"1a2b3c4d/start4.elf",
            "octet",
            &pi,
            &mut |_| {},
        )
        .expect("a small file");
    assert_eq!(got.data.len(), 1024);
    let sessions = server.sessions(2);
    let families: Vec<ClientFamily> = sessions.iter().map(|s| s.family).collect();
    assert!(families.contains(&ClientFamily::Grub), "{families:?}");
    assert!(
        families.contains(&ClientFamily::RaspberryPi),
        "{families:?}"
    );
    let total = sum_reports(&server.reports_until_next());
    assert_eq!(total.sessions_by_family.get("raspberry_pi"), Some(&1));
    assert_eq!(total.sessions_by_family.get("grub"), Some(&1));
    assert_eq!(total.rejected.get(&3), Some(&1), "{:?}", total.rejected);
}

/// A family, a filename and the options its firmware sends.
type Case = (
    ClientFamily,
    &'static str,
    &'static [(&'static str, &'static str)],
);

both_modes!(each_firmware_lands_in_its_family);
fn each_firmware_lands_in_its_family(mode: Mode) {
    let mut server = spawn(mode);
    let cases: [Case; 6] = [
        (
            ClientFamily::Uefi,
            "bootx64.efi",
            &[("blksize", "1468"), ("windowsize", "4")],
        ),
        (
            ClientFamily::Ipxe,
            "boot.ipxe",
            &[("blksize", "1432"), ("tsize", "0")],
        ),
        (
            ClientFamily::Pxelinux,
            "pxelinux.cfg/default",
            &[("tsize", "0"), ("blksize", "1408")],
        ),
        (
            ClientFamily::Grub,
            "grub/grub.cfg",
            &[("tsize", "0"), ("blksize", "1024")],
        ),
        (
            ClientFamily::UBoot,
            "zImage",
            &[("timeout", "5"), ("blksize", "1468")],
        ),
        (ClientFamily::Plain, "plain", &[]),
    ];
    for (family, name, options) in cases {
        let client = Client::new(mode, server.addr);
        let got = client
            .fetch_with(server.addr, name.as_bytes(), "octet", options, &mut |_| {})
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(got.data.len(), 1024, "{name}");
        if family == ClientFamily::UBoot {
            assert_eq!(
                got.oack_value("timeout"),
                Some("5"),
                "U-Boot's timeout as sent"
            );
        }
        let stats = server.next_session();
        assert_eq!(stats.family, family, "{name}");
    }
}

/// A source whose `size` panics.
struct PanicsInSize;

impl ResponseData for PanicsInSize {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }

    fn size(&self) -> Option<u64> {
        panic!("size panicked (expected by the test)")
    }
}

struct Panicky;

impl Handler for Panicky {
    fn open(&mut self, _: &ReadRequest<'_>) -> Result<Box<dyn ResponseData>, Reject> {
        Ok(Box::new(PanicsInSize))
    }
}

both_modes!(the_size_check_for_a_client_without_rollover_survives_a_panicking_source);
/// The Raspberry Pi's size check asks the source its size before the session does: a
/// panic there ends only that request, with ERROR 0.
fn the_size_check_for_a_client_without_rollover_survives_a_panicking_source(mode: Mode) {
    let server = spawn_server(mode, net::v4(), || Box::new(Panicky), |b| b);
    for _ in 0..2 {
        let raw = Raw::new(server.addr);
        let pi = [("tsize", "0"), ("blksize", "1024")];
        assert_eq!(
            first_answer(&raw, &server, "1a2b3c4d/start4.elf", &pi),
            Err(0)
        );
    }
}
