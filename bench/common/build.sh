# Sourced by the bench scripts (bash): builds dyntftpd and the load generator
# (bench/loadgen/) in release mode, in the repository `$repo`, and sets `dyntftpd` and
# `loadgen` to the paths of their executables. A failed build ends the script.
#
#   build_server_and_loadgen NAME   # NAME: the script's name, for the error messages
#
# On a machine without a Rust toolchain, BENCH_PREBUILT=DIR names a folder that holds
# both executables, built elsewhere (`dyntftpd`, and `loadgen` copied from the path
# `cargo bench --bench loadgen --no-run` prints): nothing is built then.

build_server_and_loadgen() {
    local who=$1 build_log
    if [ -n "${BENCH_PREBUILT:-}" ]; then
        dyntftpd="$BENCH_PREBUILT/dyntftpd"
        loadgen="$BENCH_PREBUILT/loadgen"
        for bin in "$dyntftpd" "$loadgen"; do
            [ -x "$bin" ] || { echo "$who: BENCH_PREBUILT: $bin is not executable" >&2; exit 1; }
        done
        return
    fi
    cargo build --release --quiet --bin dyntftpd
    dyntftpd="$repo/target/release/dyntftpd"
    build_log=$(cargo bench --bench loadgen --no-run 2>&1) || {
        echo "$build_log" >&2
        exit 1
    }
    loadgen=$(sed -n 's/.*Executable bench\/loadgen\/main\.rs (\(.*\)).*/\1/p' <<<"$build_log" | tail -n 1)
    case "$loadgen" in
        /*) ;;
        ?*) loadgen="$repo/$loadgen" ;;
        *) echo "$who: cannot find the loadgen executable" >&2; exit 1 ;;
    esac
    [ -x "$loadgen" ] || { echo "$who: $loadgen is not executable" >&2; exit 1; }
}
