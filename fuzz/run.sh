#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60), one after the other, starting from the
# hand-made seeds. Exits non-zero when a target crashes (the input is saved under
# fuzz/artifacts/<target>/). Works from the repository root or from fuzz/.
#
#   bash fuzz/run.sh [SECONDS] [TARGET...]
set -uo pipefail

seconds="${1:-60}"
shift || true
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$fuzz_dir")"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: cargo-fuzz not found, installing it" >&2
    cargo install cargo-fuzz --locked || exit 1
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(parse_packet session server)
fi

# cargo-fuzz needs nightly flags (sanitizers); RUSTC_BOOTSTRAP lets stable rustc take them.
export RUSTC_BOOTSTRAP=1

failed=()
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    seeds="fuzz/seeds/$target"
    mkdir -p "$corpus"
    if [ -d "$seeds" ]; then
        cp -n "$seeds"/* "$corpus"/ 2>/dev/null || true
    fi
    echo "=== fuzz/run.sh: $target for ${seconds}s"
    if ! cargo fuzz run "$target" "$corpus" "$seeds" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
        echo "=== fuzz/run.sh: $target FAILED (see fuzz/artifacts/$target/)" >&2
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz/run.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz/run.sh: no crashes"
