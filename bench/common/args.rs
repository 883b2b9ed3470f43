//! The command line of a bench: shared by the benches that take flags.

/// The command-line arguments without the program name, and without the `--bench` that
/// `cargo bench` appends when it runs a bench that has no test harness.
pub fn args() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|arg| arg != "--bench")
        .collect()
}
