//! Real firmware netbooting from the `dyntftpd` binary, in qemu, each test in both modes
//! (with and without `--single-port`):
//!
//! - SeaBIOS with qemu's iPXE NIC ROM (e1000): DHCP names `boot.ipxe`, an iPXE script
//!   that fetches and runs a 1 MiB script over IPv4 and a small one over IPv6 and prints
//!   what they set on the serial console.
//! - OVMF's own UEFI PXE (virtio-net without an option ROM, so no iPXE): DHCP names GRUB's
//!   network image `grubnetx64.efi` for client architectures 7 and 9; GRUB reads
//!   `/grub/grub.cfg`, which sources a 1 MiB script (1,024 blocks of 1,024 bytes: the
//!   transfer ends with an empty DATA), prints what it set, and halts the machine.
//!
//! Each test has a network namespace of its own (`dyntftp-fw-<pid>-<n>`) with a tap
//! device, dnsmasq as the DHCP server (DNS off, TFTP off, and IPv6 router advertisements,
//! without which iPXE waits ~13 s for IPv6 autoconfiguration), dyntftpd on 10.77.0.1:69
//! and [fd77::1]:69 with JSON logs, and the guest. The test passes when the markers
//! appear on the serial console, with values only the guest can have produced (its
//! address, tokens read from the 1 MiB files); dyntftpd's log shows every session
//! completed (or, for EDK2's `tsize` probe, aborted as a probe; or, for a guest that
//! halted before its last ACK left, final_ack_missing) with the whole file read
//! and the options granted as asked; and qemu's capture of the guest's traffic shows every
//! DATA and OACK came from port 69 in single-port mode and from other ports otherwise.
//!
//! qemu runs under KVM when a probe boot under KVM prints its marker within 10 s (on some
//! hosts /dev/kvm exists but guests crawl, then stop with "KVM internal error"), under TCG
//! otherwise; `DYNTFTP_QEMU_ACCEL=kvm|tcg` overrides the probe. Every boot is bounded by
//! [`BOOT_DEADLINE`]; every process is killed and every namespace deleted on drop.
//!
//! Missing qemu, dnsmasq, firmware files, tap devices or namespaces (not root) skip the
//! tests with a loud `SKIPPED:` line, unless `DYNTFTP_REQUIRE_CLIENTS=1` (CI), which
//! makes them failures.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use testkit::pcap;
use testkit::*;

const DYNTFTPD: &str = env!("CARGO_BIN_EXE_dyntftpd");

/// The server's addresses on the tap device, and the guest's (DHCP gives it to the MAC).
const SERVER_V4: &str = "10.77.0.1";
const SERVER_V6: &str = "fd77::1";
const GUEST_V4: &str = "10.77.0.2";
const GUEST_MAC: &str = "52:54:00:77:00:02";
const TAP: &str = "tap0";

/// The longest a boot may take until its last marker (TCG on a busy machine; a boot
/// takes about 10 s here).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// The longest the KVM probe may take: TCG boots it in about 5 s, so a KVM slower than
/// this is no use either (on one host here it took 19 s, then stopped with "KVM internal
/// error").
const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a machine may take to stop after a boot loader's `halt`.
const POWER_OFF_DEADLINE: Duration = Duration::from_secs(30);
/// The longest dnsmasq, dyntftpd or a session record may take to appear in a log.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// How long the session records may take after the guest stopped: a client that halts
/// right after its last byte (GRUB) may leave its session waiting for a final ACK that
/// never comes, which ends it after the retransmission schedule (31 s).
const RECORDS_DEADLINE: Duration = Duration::from_secs(45);

/// Size of the big script each boot loader fetches and runs.
const PAYLOAD_LEN: usize = 1 << 20;
/// Number of tokens spread over it.
const TOKENS: usize = 16;

/// Where qemu may find its iPXE ROM for the e1000 (Debian's ipxe-qemu: the first).
const E1000_ROMS: [&str; 3] = [
    "/usr/lib/ipxe/qemu/efi-e1000.rom",
    "/usr/share/qemu/efi-e1000.rom",
    "/usr/share/ipxe/qemu/efi-e1000.rom",
];
/// GRUB's network image with every module built in (Debian: grub-efi-amd64-bin).
const GRUB_NET: &str = "/usr/lib/grub/x86_64-efi/monolithic/grubnetx64.efi";
/// OVMF's code and variable store, split for pflash (Debian: ovmf), newest layout first.
const OVMF_PAIRS: [(&str, &str); 2] = [
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

// ---------------------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------------------

/// The programs every firmware test runs.
struct Tools {
    qemu: PathBuf,
    dnsmasq: PathBuf,
}

fn tools_or_skip(test: &str) -> Option<Tools> {
    let qemu = system_program("qemu-system-x86_64").or_else(|| {
        skip_missing(
            test,
            "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)",
        )
    })?;
    let dnsmasq = system_program("dnsmasq")
        .or_else(|| skip_missing(test, "dnsmasq is not installed (Debian: dnsmasq-base)"))?;
    if !Path::new("/dev/net/tun").exists() {
        return skip_missing(test, "/dev/net/tun is missing (no tap devices)");
    }
    Some(Tools { qemu, dnsmasq })
}

/// `path` when it exists, else `None` after [`skip_missing`].
fn file_or_skip(test: &str, path: &str, package: &str) -> Option<PathBuf> {
    let path = PathBuf::from(path);
    if path.is_file() {
        Some(path)
    } else {
        skip_missing(
            test,
            &format!("{} is missing (Debian: {package})", path.display()),
        )
    }
}

/// `-accel kvm` when a probe boot works under KVM, else `-accel tcg`; decided once.
fn accel(qemu: &Path) -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        let (accel, why) = match std::env::var("DYNTFTP_QEMU_ACCEL").as_deref() {
            Ok("kvm") => ("kvm", "DYNTFTP_QEMU_ACCEL=kvm".to_string()),
            Ok("tcg") => ("tcg", "DYNTFTP_QEMU_ACCEL=tcg".to_string()),
            Ok(other) => panic!("DYNTFTP_QEMU_ACCEL={other:?}: expected kvm or tcg"),
            Err(_) => match probe_kvm(qemu) {
                Ok(()) => ("kvm", "a probe boot worked under KVM".to_string()),
                Err(why) => ("tcg", why),
            },
        };
        eprintln!("firmware tests: qemu -accel {accel} ({why})");
        accel
    })
}

/// Boots SeaBIOS and the e1000's iPXE ROM under KVM with qemu's user network serving a
/// one-line script; Ok when its marker reaches the serial console.
fn probe_kvm(qemu: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let dir = TempDir::new("kvm-probe");
    dir.write("probe.ipxe", b"#!ipxe\necho DYNTFTP-KVM-${platform}-OK\n");
    let tftp = format!(
        "user,id=n0,tftp={},bootfile=probe.ipxe",
        dir.path().display()
    );
    let mut command = Command::new(qemu);
    command
        .args(["-accel", "kvm", "-m", "256", "-nographic", "-nodefaults"])
        .args(["-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-netdev", &tftp, "-device", "e1000,netdev=n0", "-boot", "n"]);
    let mut probe = Background::spawn(command, "qemu (KVM probe)", &dir.path().join("qemu.log"));
    let marker = "DYNTFTP-KVM-pcbios-OK";
    let failure = "KVM internal error";
    let console = probe.wait_for(KVM_PROBE_DEADLINE, "marker", |log| {
        log.contains(marker) || log.contains(failure)
    });
    probe.stop();
    match console {
        Ok(console) if console.contains(marker) => Ok(()),
        Ok(_) => Err(format!("a probe boot under KVM stopped: {failure}")),
        Err(e) => Err(format!("a probe boot under KVM failed: {}", first_line(&e))),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// What the boot loaders fetch
// ---------------------------------------------------------------------------------------

/// A boot-loader script of exactly `len` bytes: filler comment lines of pseudo-random
/// hex, and [`TOKENS`] lines, spread evenly, that set `c0`, `c1`, … to 8-hex-digit
/// tokens (`set_line(i, token)` writes one). Returns the script and the tokens joined.
fn token_script(
    header: &str,
    set_line: fn(usize, &str) -> String,
    len: usize,
    seed: u64,
) -> (Vec<u8>, String) {
    let mut rng = Rng::new(seed);
    let mut script = header.to_string();
    let mut tokens = String::new();
    let filler = |rng: &mut Rng| format!("# {:016x}{:016x}\n", rng.next_u64(), rng.next_u64());
    for i in 0..TOKENS {
        let end = len * (i + 1) / TOKENS - 200;
        loop {
            let line = filler(&mut rng);
            if script.len() + line.len() > end {
                break;
            }
            script.push_str(&line);
        }
        let token = format!("{:08x}", rng.next_u64() as u32);
        script.push_str(&set_line(i, &token));
        tokens.push_str(&token);
    }
    // One comment line pads it to the exact length.
    let pad = len - script.len();
    assert!((2..=256).contains(&pad), "{pad}");
    script.push('#');
    script.push_str(&"x".repeat(pad - 2));
    script.push('\n');
    assert_eq!(script.len(), len);
    (script.into_bytes(), tokens)
}

/// `${c0}${c1}…`: the tokens as the boot loader expands them.
fn token_variables() -> String {
    (0..TOKENS).map(|i| format!("${{c{i}}}")).collect()
}

/// The console with line breaks removed: both boot loaders wrap lines at 80 columns.
fn unwrapped(console: &str) -> String {
    console
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n'))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The lab: a namespace with a tap device, dnsmasq and dyntftpd
// ---------------------------------------------------------------------------------------

/// A network namespace with the server side of a netboot running in it. Fields drop in
/// order: the daemons are killed before the namespace is deleted.
struct Lab {
    dyntftpd: Background,
    dnsmasq: Background,
    /// The CPU quota the daemons and the guest share, when the test starves them.
    quota: Option<CpuQuota>,
    ns: NetNs,
    /// Logs, the DHCP lease file, OVMF's variable store.
    work: TempDir,
}

/// A finished boot: what the serial console showed, and how qemu ended (`None`: it was
/// still running when the test had seen enough, and was killed).
struct Boot {
    console: String,
    status: Option<ExitStatus>,
    /// The UDP datagrams to and from the guest.
    datagrams: Vec<pcap::Datagram>,
}

/// dnsmasq as the DHCP server only (`--port=0`: no DNS; no `--enable-tftp`), in the
/// foreground, on the tap device.
fn dnsmasq_args(leases: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-daemon",
        "--conf-file=/dev/null",
        "--port=0",
        "--log-facility=-",
        "--bind-interfaces",
        // Offer at once, without pinging the address for 3 s first.
        "--no-ping",
        // Client architectures 7 and 9 (RFC 4578) are x86-64 UEFI: GRUB for them, the
        // iPXE script for the rest.
        "--dhcp-match=set:efi64,option:client-arch,7",
        "--dhcp-match=set:efi64,option:client-arch,9",
        // Router advertisements: iPXE finishes its IPv6 configuration on the first one
        // instead of waiting ~13 s for it.
        "--enable-ra",
        "--dhcp-range=fd77::,ra-only",
    ]
    .map(String::from)
    .into();
    args.extend([
        format!("--interface={TAP}"),
        format!("--dhcp-leasefile={}", leases.display()),
        format!("--dhcp-range={GUEST_V4},{GUEST_V4},255.255.255.0,1h"),
        format!("--dhcp-host={GUEST_MAC},{GUEST_V4}"),
        format!("--dhcp-boot=tag:efi64,grubnetx64.efi,,{SERVER_V4}"),
        format!("--dhcp-boot=tag:!efi64,boot.ipxe,,{SERVER_V4}"),
    ]);
    args
}

impl Lab {
    /// Starts dnsmasq and dyntftpd (serving `root` in `mode`) in a new namespace, each
    /// ready when this returns; `None` when namespaces or tap devices are unavailable.
    fn start(test: &str, tools: &Tools, mode: Mode, root: &Path) -> Option<Lab> {
        let ns = NetNs::create_or_skip("fw", test)?;
        if let Err(e) = ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]) {
            return skip_missing(test, &format!("cannot create a tap device: {e}"));
        }
        let v4 = format!("{SERVER_V4}/24");
        let v6 = format!("{SERVER_V6}/64");
        for args in [
            &["addr", "add", &v4, "dev", TAP][..],
            &["addr", "add", &v6, "dev", TAP, "nodad"],
            &["link", "set", TAP, "up"],
        ] {
            ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
        }
        let work = TempDir::new("fw-work");

        let mut dhcp = ns.command(&tools.dnsmasq);
        dhcp.args(dnsmasq_args(&work.path().join("leases")));
        let mut dnsmasq = Background::spawn(dhcp, "dnsmasq", &work.path().join("dnsmasq.log"));
        dnsmasq.expect_in_log("DHCP, IP range", START_DEADLINE);

        let mut server = ns.command(Path::new(DYNTFTPD));
        server
            .args(["-l", &format!("{SERVER_V4}:69")])
            .args(["-l", &format!("[{SERVER_V6}]:69")])
            .arg("-r")
            .arg(root)
            .args(["-v", "--log-format", "json"])
            .args(mode.is_single_port().then_some("--single-port"));
        let mut dyntftpd = Background::spawn(server, "dyntftpd", &work.path().join("dyntftpd.log"));
        dyntftpd.expect_in_log("serving ", START_DEADLINE);
        Some(Lab {
            dyntftpd,
            dnsmasq,
            quota: None,
            ns,
            work,
        })
    }

    /// Puts dnsmasq, dyntftpd and the guests booted from now on under `quota`.
    fn starve(&mut self, quota: CpuQuota) {
        quota.add(self.dnsmasq.pid());
        quota.add(self.dyntftpd.pid());
        self.quota = Some(quota);
    }

    /// Boots a guest with `firmware_args` (firmware, NIC) on the tap device, until the
    /// unwrapped console contains `marker` (a failure after [`BOOT_DEADLINE`], or when
    /// qemu exits before); then, when the boot loader `powers_off`, waits for qemu to exit
    /// by itself, and kills it otherwise. qemu records the guest's traffic
    /// (`filter-dump`, headers only).
    fn boot(
        &mut self,
        qemu: &Path,
        firmware_args: &[String],
        marker: &str,
        powers_off: bool,
    ) -> Boot {
        // Without the virtio-net header, which filter-dump would write before each frame.
        let netdev = format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vnet_hdr=off");
        let capture = self.work.path().join("guest.pcap");
        let dump = format!(
            "filter-dump,id=dump0,netdev=n0,maxlen=128,file={}",
            capture.display()
        );
        let mut command = self.ns.command(qemu);
        command
            .args([
                "-accel",
                accel(qemu),
                "-m",
                "256",
                "-nographic",
                "-nodefaults",
            ])
            .args(["-monitor", "none", "-serial", "stdio", "-no-reboot"])
            .args(["-netdev", &netdev, "-object", &dump])
            .args(firmware_args)
            .args(["-boot", "n"]);
        let mut guest = Background::spawn(command, "qemu", &self.work.path().join("qemu.log"));
        if let Some(quota) = &self.quota {
            quota.add(guest.pid());
        }
        guest
            .wait_for(BOOT_DEADLINE, &format!("{marker:?}"), |console| {
                unwrapped(console).contains(marker)
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        let status = if powers_off {
            guest.wait_exit(POWER_OFF_DEADLINE)
        } else {
            None
        };
        guest.stop();
        let capture = std::fs::read(&capture).unwrap_or_default();
        Boot {
            console: guest.log(),
            status,
            datagrams: pcap::udp_datagrams(&capture)
                .unwrap_or_else(|e| panic!("the guest's capture: {e}")),
        }
    }

    /// dnsmasq's and dyntftpd's logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- dnsmasq:\n{}\n--- dyntftpd:\n{}",
            self.dnsmasq.log(),
            self.dyntftpd.log()
        )
    }

    /// dyntftpd's session records, once there is one for each of `files` (bounded).
    fn sessions(&mut self, files: &[&str]) -> Vec<Value> {
        let records = |log: &str| -> Vec<Value> {
            log.lines()
                .filter(|line| line.starts_with('{'))
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .filter(|record: &Value| record["type"] == "session")
                .collect()
        };
        let log = self
            .dyntftpd
            .wait_for(RECORDS_DEADLINE, "a session record of each file", |log| {
                let sessions = records(log);
                files
                    .iter()
                    .all(|file| sessions.iter().any(|s| s["filename"] == *file))
            })
            .unwrap_or_else(|e| panic!("{e}"));
        records(&log)
    }

    /// Checks every session record: completed (or EDK2's `tsize` probe), by the guest, to
    /// port 69, with the options the client asked for acknowledged as asked; and
    /// one completed session per `(file, size)` that read the whole file. Returns, for the
    /// test's output, what each file's client asked for and how many packets it got.
    fn check_sessions(&mut self, files: &[(&str, usize)]) -> Vec<String> {
        let names: Vec<&str> = files.iter().map(|(name, _)| *name).collect();
        let sessions = self.sessions(&names);
        let all = || format!("{sessions:#?}\n{}", self.logs());
        for s in &sessions {
            let outcome = s["outcome"].as_str().unwrap_or_default();
            // final_ack_missing: the guest halted before the last ACK (or GRUB's closing
            // ERROR) left it; it had every byte (checked below).
            assert!(
                ["completed", "final_ack_missing", "probe"].contains(&outcome),
                "a session ended {outcome}:\n{}",
                all()
            );
            let peer = s["peer"].as_str().unwrap_or_default();
            assert!(
                peer.starts_with(&format!("{GUEST_V4}:")) || peer.starts_with("[fd77::"),
                "peer {peer}: not the guest\n{}",
                all()
            );
            let local = s["local"].as_str().unwrap_or_default();
            assert!(
                local == format!("{SERVER_V4}:69") || local == format!("[{SERVER_V6}]:69"),
                "request to {local}\n{}",
                all()
            );
            if outcome == "probe" {
                continue;
            }
            let acked = &s["transfer"]["negotiated"]["acked"];
            for pair in s["requested"].as_array().into_iter().flatten() {
                let (name, value) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
                if name == "blksize" || name == "windowsize" {
                    assert_eq!(
                        acked[name].to_string(),
                        value,
                        "{name} not granted as asked in {s}"
                    );
                }
            }
        }
        let mut asked = Vec::new();
        for (name, size) in files {
            let done = sessions
                .iter()
                .find(|s| {
                    s["filename"] == *name
                        && (s["outcome"] == "completed" || s["outcome"] == "final_ack_missing")
                })
                .unwrap_or_else(|| panic!("no completed session of {name}:\n{}", all()));
            assert_eq!(
                done["transfer"]["bytes_read"].as_u64(),
                Some(*size as u64),
                "{name}: not the whole file:\n{done}"
            );
            let t = &done["transfer"];
            asked.push(format!(
                "{name}: asked {}, {} packets ({} resent)",
                done["requested"], t["packets_sent"], t["packets_resent"]
            ));
        }
        asked
    }
}

impl Boot {
    /// Checks that the server sent every DATA and OACK from port 69 in single-port mode,
    /// and none from it otherwise; returns how many DATA the guest received.
    fn check_transfer_ports(&self, mode: Mode) -> usize {
        let server = |ip: IpAddr| {
            ip == SERVER_V4.parse::<IpAddr>().unwrap() || ip == SERVER_V6.parse::<IpAddr>().unwrap()
        };
        let replies: Vec<&pcap::Datagram> = self
            .datagrams
            .iter()
            .filter(|d| server(d.src.ip()) && matches!(d.opcode(), Some(3 | 6)))
            .collect();
        let from_69 = replies.iter().filter(|d| d.src.port() == 69).count();
        let expected = if mode.is_single_port() {
            replies.len()
        } else {
            0
        };
        assert_eq!(
            from_69,
            expected,
            "{mode:?}: {from_69} of {} DATA/OACK from port 69",
            replies.len()
        );
        replies.iter().filter(|d| d.opcode() == Some(3)).count()
    }
}

// ---------------------------------------------------------------------------------------
// SeaBIOS + iPXE
// ---------------------------------------------------------------------------------------

both_modes!(seabios_ipxe_boots_a_script_and_fetches_1_mib_over_v4_and_a_file_over_v6);
fn seabios_ipxe_boots_a_script_and_fetches_1_mib_over_v4_and_a_file_over_v6(mode: Mode) {
    let test = "seabios_ipxe_boots";
    let Some(tools) = tools_or_skip(test) else {
        return;
    };
    if !E1000_ROMS.iter().any(|rom| Path::new(rom).is_file()) {
        skip_missing::<()>(
            test,
            "qemu's iPXE ROM efi-e1000.rom (Debian: ipxe-qemu) is missing",
        );
        return;
    }
    let root = TempDir::new("fw-ipxe");
    let (payload, tokens) = token_script(
        "#!ipxe\n",
        |i, token| format!("set c{i} {token}\n"),
        PAYLOAD_LEN,
        0x1b0e,
    );
    root.write("payload.ipxe", &payload);
    let v6_token = format!("{:08x}", Rng::new(0x6e7).next_u64() as u32);
    let v6_script = format!("#!ipxe\nset v6 {v6_token}\n");
    root.write("v6.ipxe", v6_script.as_bytes());
    // iPXE stops a script at the first command that fails, so the last line also says
    // that every fetch before it worked.
    let boot = format!(
        "#!ipxe\n\
         imgfetch --name payload tftp://{SERVER_V4}/payload.ipxe\n\
         imgstat\n\
         imgexec payload\n\
         echo DYNTFTP-PAYLOAD {vars}.\n\
         imgfetch --name v6 tftp://[{SERVER_V6}]/v6.ipxe\n\
         imgexec v6\n\
         echo DYNTFTP-IPXE-V6 ${{v6}}.\n\
         echo DYNTFTP-IPXE-OK [${{net0/ip}}]\n",
        vars = token_variables()
    );
    root.write("boot.ipxe", boot.as_bytes());

    let Some(mut lab) = Lab::start(test, &tools, mode, root.path()) else {
        return;
    };
    // The e1000's default option ROM is qemu's iPXE.
    let nic = vec![
        "-device".to_string(),
        format!("e1000,netdev=n0,mac={GUEST_MAC}"),
    ];
    let done = format!("DYNTFTP-IPXE-OK [{GUEST_V4}]");
    let booted = lab.boot(&tools.qemu, &nic, &done, false);
    let console = unwrapped(&booted.console);
    for want in [
        "iPXE",
        &format!("payload : {PAYLOAD_LEN} bytes"),
        &format!("DYNTFTP-PAYLOAD {tokens}."),
        &format!("DYNTFTP-IPXE-V6 {v6_token}."),
    ] {
        assert!(
            console.contains(want),
            "{want:?} not on the console:\n{}",
            booted.console
        );
    }
    let asked = lab.check_sessions(&[
        ("boot.ipxe", boot.len()),
        ("payload.ipxe", PAYLOAD_LEN),
        ("v6.ipxe", v6_script.len()),
    ]);
    let data = booted.check_transfer_ports(mode);
    assert!(data > PAYLOAD_LEN / 1500, "{data} DATA in the capture");
    eprintln!("SeaBIOS + iPXE ({mode:?}), {data} DATA, asked: {asked:#?}");
}

// ---------------------------------------------------------------------------------------
// OVMF UEFI PXE + GRUB
// ---------------------------------------------------------------------------------------

both_modes!(ovmf_pxe_chains_grub_which_reads_its_config_and_1_mib_and_halts);
fn ovmf_pxe_chains_grub_which_reads_its_config_and_1_mib_and_halts(mode: Mode) {
    ovmf_pxe_chains_grub("ovmf_pxe_chains_grub", mode, None);
}

/// The same boot with qemu, dnsmasq and dyntftpd sharing half of one CPU (a boot storm
/// on an oversubscribed host): the guest takes its packets late, in bursts between the
/// quota's pauses. EDK2 answers every resend it did not need with a duplicate ACK, and
/// before the session's time-based resends backed off until it measured a round trip,
/// GRUB's download (windowsize 4) drew 40–90 times the file and never finished. Now it
/// must finish with at most twice its blocks sent.
#[test]
fn ovmf_pxe_chains_grub_with_everything_starved_of_cpu() {
    let test = "ovmf_pxe_chains_grub_with_everything_starved_of_cpu";
    let Some(quota) = CpuQuota::create_or_skip("ovmf", test, 50) else {
        return;
    };
    ovmf_pxe_chains_grub(test, Mode::OwnPort, Some(quota));
}

/// OVMF's own PXE boots GRUB, which reads its config and a 1 MiB file, then halts; with
/// `quota`, under that CPU quota.
fn ovmf_pxe_chains_grub(test: &str, mode: Mode, quota: Option<CpuQuota>) {
    let Some(tools) = tools_or_skip(test) else {
        return;
    };
    let Some((code, vars)) = OVMF_PAIRS
        .iter()
        .find(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())
        .or_else(|| {
            skip_missing(
                test,
                "OVMF_CODE*.fd and OVMF_VARS*.fd (Debian: ovmf) are missing",
            )
        })
    else {
        return;
    };
    let Some(grub) = file_or_skip(test, GRUB_NET, "grub-efi-amd64-bin") else {
        return;
    };
    let root = TempDir::new("fw-grub");
    let grub_image = std::fs::read(&grub).unwrap();
    root.write("grubnetx64.efi", &grub_image);
    let (payload, tokens) = token_script(
        "# sourced by grub.cfg\n",
        |i, token| format!("set c{i}={token}\n"),
        PAYLOAD_LEN,
        0x6b0b,
    );
    root.write("payload.cfg", &payload);
    // The monolithic image's prefix is (tftp,<server>)/grub: it asks for /grub/grub.cfg
    // (after the /grub/x86_64-efi/*.lst module lists, which it does without).
    let config = format!(
        "serial --unit=0 --speed=115200\n\
         terminal_output serial\n\
         source /payload.cfg\n\
         echo DYNTFTP-PAYLOAD {vars}.\n\
         echo DYNTFTP-GRUB-OK [$net_default_ip]\n\
         halt\n",
        vars = token_variables()
    );
    root.write("grub/grub.cfg", config.as_bytes());

    let Some(mut lab) = Lab::start(test, &tools, mode, root.path()) else {
        return;
    };
    let starved = quota.is_some();
    if let Some(quota) = quota {
        lab.starve(quota);
    }
    // OVMF writes its variable store: each boot gets a copy.
    let vars_copy = lab.work.path().join("OVMF_VARS.fd");
    std::fs::copy(vars, &vars_copy).unwrap();
    let firmware = vec![
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
        "-drive".to_string(),
        format!("if=pflash,format=raw,unit=1,file={}", vars_copy.display()),
        // An empty romfile: no iPXE ROM, so the firmware's own PXE boots.
        "-device".to_string(),
        format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile="),
    ];
    let done = format!("DYNTFTP-GRUB-OK [{GUEST_V4}]");
    let booted = lab.boot(&tools.qemu, &firmware, &done, true);
    let console = unwrapped(&booted.console);
    for want in [
        "Start PXE over IPv4",
        "NBP file downloaded successfully",
        &format!("DYNTFTP-PAYLOAD {tokens}."),
    ] {
        assert!(
            console.contains(want),
            "{want:?} not on the console:\n{}",
            booted.console
        );
    }
    assert!(!console.contains("iPXE"), "iPXE ran:\n{}", booted.console);
    assert!(
        booted.status.is_some_and(|s| s.success()),
        "GRUB's halt did not stop the machine ({:?}):\n{}",
        booted.status,
        booted.console
    );
    let asked = lab.check_sessions(&[
        ("grubnetx64.efi", grub_image.len()),
        ("/grub/grub.cfg", config.len()),
        ("/payload.cfg", PAYLOAD_LEN),
    ]);
    // EDK2 transfers with a window (RFC 7440): the one firmware here that does.
    assert!(
        asked[0].contains("\"windowsize\""),
        "OVMF asked for no window: {asked:?}"
    );
    let data = booted.check_transfer_ports(mode);
    assert!(data > PAYLOAD_LEN / 1500, "{data} DATA in the capture");
    eprintln!("OVMF + GRUB ({mode:?}, starved: {starved}), {data} DATA, asked: {asked:#?}");
    if starved {
        let blocks = grub_image.len() as u64 / 1468 + 1;
        let sessions = lab.sessions(&["grubnetx64.efi"]);
        let sent = sessions
            .iter()
            .filter(|s| s["filename"] == "grubnetx64.efi" && s["outcome"] != "probe")
            .map(|s| s["transfer"]["packets_sent"].as_u64().unwrap_or(u64::MAX))
            .max()
            .unwrap_or_default();
        assert!(
            sent <= 2 * blocks,
            "{sent} packets sent for the {blocks} blocks of grubnetx64.efi:\n{}",
            lab.logs()
        );
    }
}

#[test]
fn token_scripts_have_the_exact_length_and_every_token() {
    let (script, tokens) = token_script("#!ipxe\n", |i, t| format!("set c{i} {t}\n"), 100_000, 1);
    assert_eq!(script.len(), 100_000);
    let text = String::from_utf8(script).unwrap();
    assert!(text.starts_with("#!ipxe\n") && text.ends_with('\n'));
    assert_eq!(tokens.len(), 8 * TOKENS);
    for i in 0..TOKENS {
        let token = &tokens[8 * i..8 * i + 8];
        assert!(text.contains(&format!("\nset c{i} {token}\n")), "c{i}");
    }
    assert!(text
        .lines()
        .all(|l| l.starts_with('#') || l.starts_with("set c")));
    assert_eq!(unwrapped("a\r\nb\n\rc"), "abc");
}
