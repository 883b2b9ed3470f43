//! The cost of a missing name with `--ignore-case` (finding F10 of the security review):
//! a directory of many MAC-named files, as `pxelinux.cfg/` holds at a large site, and a
//! run of requests for names that exist in no case, as PXELINUX sends at every boot.
//! Each request goes through `FsHandler`'s `Handler::open`, what the server's loop calls.
//!
//! ```text
//! cargo bench --bench ignore_case -- [--entries N] [--misses M] [--rounds R]
//! ```
//!
//! Prints, with ignore-case off and on: the first miss (on: the directory is listed into
//! its index), then the CPU time per miss over `--misses` missing names, per round; and,
//! with it on, per lookup of existing names asked in the wrong case. Before measuring, it
//! waits until the directory has settled (an index built within 2.1 s of the directory's
//! last change lists it again for every miss, in case two changes shared a timestamp).

use std::path::Path;
use std::time::Duration;

use dyntftp::packet::Options;
use dyntftp::{FsHandler, Handler, Mode, Notifier, ReadRequest};
use testkit::sys;

#[path = "common/args.rs"]
mod args;

struct Config {
    entries: usize,
    misses: usize,
    rounds: usize,
}

fn parse_args() -> Config {
    let mut config = Config {
        entries: 20_000,
        misses: 1000,
        rounds: 3,
    };
    let mut args = args::args().into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--entries" => config.entries = value("--entries").max(1),
            "--misses" => config.misses = value("--misses").max(1),
            "--rounds" => config.rounds = value("--rounds").max(1),
            "-h" | "--help" => {
                println!(
                    "cargo bench --bench ignore_case -- [--entries N] [--misses M] [--rounds R]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    config
}

/// The file name of entry `i`: a MAC address in PXELINUX's form, lower case.
fn mac_name(i: usize) -> String {
    format!(
        "01-52-54-00-{:02x}-{:02x}-{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

/// Opens every name in `names` through `handler`; returns the thread CPU time and how
/// many were found.
fn open_all(handler: &mut FsHandler, names: &[Vec<u8>]) -> (Duration, usize) {
    let notifier = Notifier::detached();
    let start = sys::thread_cpu();
    let mut found = 0;
    for name in names {
        let request = ReadRequest {
            peer: "192.0.2.1:1000".parse().unwrap(),
            local: "192.0.2.2:69".parse().unwrap(),
            filename: name,
            mode: Mode::Octet,
            options: Options::EMPTY,
            notifier: &notifier,
            notes: &dyntftp::SessionNotes::default(),
            now: std::time::Instant::now(),
        };
        found += usize::from(handler.open(&request).is_ok());
    }
    (sys::thread_cpu() - start, found)
}

fn micros_each(total: Duration, count: usize) -> f64 {
    total.as_secs_f64() * 1e6 / count as f64
}

fn measure(root: &Path, ignore_case: bool, config: &Config) {
    let label = if ignore_case {
        "ignore-case on "
    } else {
        "ignore-case off"
    };
    let mut handler = FsHandler::new(root).unwrap().ignore_case(ignore_case);
    // Missing in every case: a MAC beyond the directory's, asked in upper case.
    let missing: Vec<Vec<u8>> = (0..config.misses)
        .map(|i| {
            format!(
                "pxelinux.cfg/{}",
                mac_name(config.entries + i).to_uppercase()
            )
        })
        .map(String::into_bytes)
        .collect();
    let (first, found) = open_all(&mut handler, &missing[..1]);
    assert_eq!(found, 0);
    println!("{label}: first miss {:9.1} us", first.as_secs_f64() * 1e6);
    for round in 1..=config.rounds {
        let (cpu, found) = open_all(&mut handler, &missing);
        assert_eq!(found, 0);
        println!(
            "{label}: round {round}: {} misses, {:7.2} us CPU per miss",
            config.misses,
            micros_each(cpu, config.misses)
        );
    }
    if ignore_case {
        let present: Vec<Vec<u8>> = (0..config.misses)
            .map(|i| mac_name(i * config.entries / config.misses))
            .map(|name| format!("PXELINUX.CFG/{}", name.to_uppercase()).into_bytes())
            .collect();
        let (cpu, found) = open_all(&mut handler, &present);
        assert_eq!(found, config.misses, "every name found ignoring case");
        println!(
            "{label}: {} names found by case, {:7.2} us CPU each",
            config.misses,
            micros_each(cpu, config.misses)
        );
    }
}

fn main() {
    let config = parse_args();
    let root = std::env::temp_dir().join(format!("dyntftp-ignore-case-{}", std::process::id()));
    let dir = root.join("pxelinux.cfg");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..config.entries {
        std::fs::write(dir.join(mac_name(i)), b"DEFAULT local\n").unwrap();
    }
    let settle = Duration::from_millis(2200);
    println!(
        "{} entries in pxelinux.cfg/; waiting {settle:?} for the directory to settle",
        config.entries
    );
    std::thread::sleep(settle);
    measure(&root, false, &config);
    measure(&root, true, &config);
    let _ = std::fs::remove_dir_all(&root);
}
