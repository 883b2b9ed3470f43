//! Test files: temporary directories, the standard root every loopback suite serves, and
//! deterministic contents.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::rng::Rng;

/// A small text file (one block).
pub const SMALL: &[u8] = b"Hello from dyntftp!\nThis is a small file, one block long.\n";

/// Deterministic pseudo-random bytes ([`Rng`]), different for each seed.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; len];
    Rng::new(seed).fill(&mut out);
    out
}

/// The 3 MiB pseudo-random file, generated once per process.
pub fn big() -> &'static [u8] {
    static BIG: OnceLock<Vec<u8>> = OnceLock::new();
    BIG.get_or_init(|| pseudo_random(3 << 20, 0xd1ce))
}

/// Text with LF, CR LF and bare CR (also across a 512-byte boundary), for netascii.
pub fn text() -> Vec<u8> {
    // 511 plain bytes then CR: on the wire the CR ends block 1 and its NUL opens block 2.
    let mut t = vec![b'x'; 511];
    t.push(b'\r');
    t.extend_from_slice(b"\n\n\rline one\nline two\r\nbare\rcarriage return\n");
    for i in 0..200 {
        t.extend_from_slice(format!("row {i}\n").as_bytes());
    }
    t
}

/// RFC 764 netascii, computed independently of the crate: LF → CR LF, CR → CR NUL.
pub fn to_netascii(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() * 2);
    for &b in raw {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

/// A unique temporary directory, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/dyntftp-<tag>-<pid>-<n>`, `n` counting the directories of this
    /// process.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("dyntftp-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` to `name` (relative; parent directories are created).
    pub fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.path.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        fs::write(&path, data).expect("write test file");
        path
    }

    /// A directory inside this one.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        fs::create_dir_all(&path).expect("create subdir");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The standard files every root gets, with their contents.
pub fn standard_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("small.txt", SMALL.to_vec()),
        ("empty.bin", Vec::new()),
        ("512.bin", pseudo_random(512, 1)),
        ("1024.bin", pseudo_random(1024, 2)),
        ("big.bin", big().to_vec()),
        ("text.txt", text()),
        ("dir/nested.bin", pseudo_random(3000, 3)),
    ]
}

/// A temporary root holding [`standard_files`].
pub fn standard_root() -> TempDir {
    let dir = TempDir::new("root");
    for (name, data) in standard_files() {
        dir.write(name, &data);
    }
    dir
}

/// The contents of a standard file.
pub fn content(name: &str) -> Vec<u8> {
    standard_files()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| d)
        .unwrap_or_else(|| panic!("no standard file {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netascii_reference() {
        assert_eq!(to_netascii(b"a\nb\rc\r\n"), b"a\r\nb\r\0c\r\0\r\n");
    }

    #[test]
    fn pseudo_random_is_deterministic_per_seed() {
        assert_eq!(pseudo_random(1000, 1), pseudo_random(1000, 1));
        assert_ne!(pseudo_random(1000, 1), pseudo_random(1000, 2));
        assert_eq!(pseudo_random(1000, 1)[..999], pseudo_random(999, 1)[..]);
    }

    #[test]
    fn temp_dirs_are_apart_and_removed() {
        let a = TempDir::new("testkit");
        let b = TempDir::new("testkit");
        assert_ne!(a.path(), b.path());
        let file = a.write("x/y.bin", b"y");
        assert_eq!(fs::read(&file).unwrap(), b"y");
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }
}
