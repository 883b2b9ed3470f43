#!/usr/bin/env bash
# A boot storm against one dyntftpd loop: N clients start at once, each fetching the same
# file (1 MiB by default, blksize 1428), and every byte is verified. Prints, per run:
# sessions/s, aggregate MB/s, p50/p99/max session latency, the load generator's own CPU,
# the server's CPU seconds and CPU per datagram (per datagram it sent, from its metrics:
# us/dgram; per datagram the load generator received, as bench/compare.sh counts it:
# us/rcvd), and the server's memory (RSS when idle, peak RSS, and the difference per
# session).
#
#   bash bench/storm.sh            # 100, 1,000 and 10,000 clients in lock step, 10,000 with windowsize 16
#   bash bench/storm.sh --quick    # 100 and 1,000 clients
#   bash bench/storm.sh --clients 5000 --windowsize 16 --workers 2
#
# The server runs on CPU 0 and the load generator on CPU 1 (taskset), when there are two.
# The file is served from dyntftpd's memory cache (--cache), so each session holds one
# socket and nothing else; --max-sessions is set above the client count. Comparing the CPU
# per datagram of the 100-, 1,000- and 10,000-client runs shows whether the per-packet work
# grows with the number of sessions (it should not: slab, timer wheel and token lookup are
# O(1)). Every server and load generator started here is stopped by its PID.
set -euo pipefail

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

runs=()
size=$((1 << 20))
workers=1
custom_clients=""
custom_window=1
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) runs=("100 1" "1000 1" "1000 16"); shift ;;
        --clients) custom_clients="$2"; shift 2 ;;
        --windowsize) custom_window="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "storm.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ -n "$custom_clients" ]; then
    runs=("$custom_clients $custom_window")
elif [ "${#runs[@]}" -eq 0 ]; then
    runs=("100 1" "1000 1" "10000 1" "10000 16")
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

echo "building (release)..." >&2
# shellcheck source=bench/common/build.sh
. "$repo/bench/common/build.sh"
build_server_and_loadgen storm.sh
server_bin=$dyntftpd

if command -v taskset >/dev/null && [ "$(nproc 2>/dev/null || echo 1)" -ge 2 ]; then
    pin_server=(taskset -c 0)
    pin_client=(taskset -c 1)
else
    pin_server=()
    pin_client=()
fi

tmp=$(mktemp -d /tmp/dyntftp-storm.XXXXXX)
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

mkdir -p "$tmp/root"
head -c "$size" /dev/urandom >"$tmp/root/kernel"
# The server and the load generator each hold one socket per client.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

status_kib() { # PID FIELD -> KiB
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}
cpu_ticks() { # PID -> utime + stime in clock ticks
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}
metric() { # FILE NAME -> value
    awk -v n="$2" '$1 == n { print $2 }' "$1"
}
kv() { # LINE KEY -> value
    tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'
}
hz=$(getconf CLK_TCK)

cpu_model=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
echo "Machine: ${cpu_model:-unknown CPU}, $(nproc) CPUs, $(uname -sr), loopback; file $size bytes, blksize 1428, $workers worker(s)"
printf '%-8s %-6s %-9s %-11s %-8s %-25s %-9s %-10s %-10s %-8s %-9s %-9s %-10s\n' \
    clients window ok/failed sessions/s MB/s "latency ms p50/p99/max" \
    "lg CPU%" "server s" "us/dgram" "us/rcvd" "RSS idle" "RSS peak" "KiB/sess"

port_base=$((20000 + RANDOM % 20000))
for run in "${runs[@]}"; do
    read -r clients window <<<"$run"
    port=$((port_base++))
    metrics="$tmp/metrics-$port.prom"
    "${pin_server[@]}" "$server_bin" -l "127.0.0.1:$port" -r "$tmp/root" -q \
        --max-sessions $((clients + 100)) --cache $((size * 2)) --workers "$workers" \
        --max-window 64 --stats-interval 1 --metrics-file "$metrics" \
        2>"$tmp/server-$port.log" &
    server_pid=$!
    # Ready when the metrics file exists (written at start).
    for _ in $(seq 100); do
        [ -s "$metrics" ] && break
        sleep 0.05
    done
    [ -s "$metrics" ] || { echo "storm.sh: dyntftpd did not start:" >&2; cat "$tmp/server-$port.log" >&2; exit 1; }
    rss_idle=$(status_kib "$server_pid" VmRSS)
    cpu0=$(cpu_ticks "$server_pid")
    window_args=()
    if [ "$window" -gt 1 ]; then
        window_args=(--windowsize "$window")
    fi
    line=$("${pin_client[@]}" "$loadgen" --server "127.0.0.1:$port" --file kernel \
        --verify "$tmp/root/kernel" --concurrency "$clients" --count "$clients" \
        --blksize 1428 "${window_args[@]}" --kv 2>"$tmp/loadgen.err") || {
        echo "storm.sh: loadgen failed:" >&2
        cat "$tmp/loadgen.err" >&2
        exit 1
    }
    cpu1=$(cpu_ticks "$server_pid")
    rss_peak=$(status_kib "$server_pid" VmHWM)
    # The next metrics write (every second) has the final counters.
    before=$(stat -c %Y.%N "$metrics" 2>/dev/null || echo 0)
    for _ in $(seq 60); do
        sleep 0.1
        [ "$(stat -c %Y.%N "$metrics")" != "$before" ] && break
    done
    datagrams=$(metric "$metrics" dyntftp_datagrams_sent_total)
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    cpu_s=$(awk -v t=$((cpu1 - cpu0)) -v hz="$hz" 'BEGIN { printf "%.2f", t / hz }')
    us_per=$(awk -v t=$((cpu1 - cpu0)) -v hz="$hz" -v d="${datagrams:-0}" \
        'BEGIN { if (d > 0) printf "%.2f", t / hz * 1e6 / d; else print "-" }')
    received=$(kv "$line" datagrams_received)
    us_rcvd=$(awk -v t=$((cpu1 - cpu0)) -v hz="$hz" -v d="${received:-0}" \
        'BEGIN { if (d > 0) printf "%.2f", t / hz * 1e6 / d; else print "-" }')
    per_session=$(awk -v a="$rss_idle" -v b="$rss_peak" -v n="$clients" \
        'BEGIN { printf "%.1f", (b - a) / n }')
    printf '%-8s %-6s %-9s %-11s %-8s %-25s %-9s %-10s %-10s %-8s %-9s %-9s %-10s\n' \
        "$clients" "$window" "$(kv "$line" ok)/$(kv "$line" failed)" \
        "$(kv "$line" sessions_per_s)" "$(kv "$line" payload_mb_per_s)" \
        "$(kv "$line" p50_ms)/$(kv "$line" p99_ms)/$(kv "$line" max_ms)" \
        "$(kv "$line" cpu_pct)" "$cpu_s" "$us_per" "$us_rcvd" "${rss_idle}K" "${rss_peak}K" "$per_session"
    if [ "$(kv "$line" failed)" != "0" ]; then
        echo "  failures: $(kv "$line" failures)" >&2
    fi
done
