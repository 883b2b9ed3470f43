# Sourced by the bench scripts (bash): builds dyntftpd and the load generator
# (bench/loadgen/) in release mode, in the repository `$repo`, and sets `dyntftpd` and
# `loadgen` to the paths of their executables. A failed build ends the script.
#
#   build_server_and_loadgen NAME   # NAME: the script's name, for the error messages

build_server_and_loadgen() {
    local who=$1 build_log
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
