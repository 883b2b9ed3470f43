#!/usr/bin/env bash
# dyntftpd in front of an HTTP repository (--upstream): what the deferred OACK adds to a
# first request, GETs per crowd, and the memory the cache takes under load.
#
#   bash bench/upstream.sh                 # 200 probes, a crowd of 50 for a 64 MiB file
#   bash bench/upstream.sh --clients 200 --size 16777216
#
# 1. Latency: UEFI-style size probes (RRQ tsize 0, blksize 1468, windowsize 4; the OACK is
#    answered with ERROR 8), timed from the RRQ to the OACK: for names under --root (no
#    deferral), for names the repository has never been asked for (the OACK waits for the
#    GET's headers: the deferred open), and for the same names again (cached). Printed as
#    p50/p99/max in ms; every OACK must carry the right tsize.
# 2. A crowd: N clients (bench/loadgen, every byte verified) fetch one cold file at once;
#    then again, warm. The repository's log counts the GETs of each crowd.
# 3. Memory: dyntftpd's RSS before, its peak (VmHWM) during the crowds.
#
# The repository is Python's http.server (threaded; its log line per request counts the
# GETs); python3 is needed. Every process started here is stopped by its PID.
set -euo pipefail

clients=50
size=$((64 << 20))
probes=200
while [ $# -gt 0 ]; do
    case "$1" in
        --clients) clients="$2"; shift 2 ;;
        --size) size="$2"; shift 2 ;;
        --probes) probes="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "upstream.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v python3 >/dev/null || { echo "upstream.sh: python3 is needed" >&2; exit 1; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
echo "building (release)..." >&2
# shellcheck source=bench/common/build.sh
. "$repo/bench/common/build.sh"
build_server_and_loadgen upstream.sh

tmp=$(mktemp -d /tmp/dyntftp-upstream.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

mkdir -p "$tmp/repo" "$tmp/root"
for i in $(seq "$probes"); do
    head -c 1500 /dev/urandom >"$tmp/repo/cfg-$i"
    head -c 1500 /dev/urandom >"$tmp/root/local-$i"
done
head -c "$size" /dev/urandom >"$tmp/repo/initrd"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

http_port=$((30000 + RANDOM % 10000))
(cd "$tmp/repo" && exec python3 -m http.server "$http_port" --bind 127.0.0.1) \
    2>"$tmp/http.log" >/dev/null &
pids+=($!)
tftp_port=$((http_port + 1))
"$dyntftpd" -l "127.0.0.1:$tftp_port" -r "$tmp/root" -q \
    --upstream "http://127.0.0.1:$http_port/" --max-sessions $((clients + 100)) \
    --stats-interval 1 --metrics-file "$tmp/metrics.prom" 2>"$tmp/server.log" &
server_pid=$!
pids+=("$server_pid")
for _ in $(seq 100); do
    [ -s "$tmp/metrics.prom" ] && curl -s -o /dev/null "http://127.0.0.1:$http_port/" && break
    sleep 0.05
done
[ -s "$tmp/metrics.prom" ] || { echo "upstream.sh: dyntftpd did not start:" >&2; cat "$tmp/server.log" >&2; exit 1; }

status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
gets() { grep -c "\"GET /$1 " "$tmp/http.log" || true; }
cpu_model=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
echo "Machine: ${cpu_model:-unknown CPU}, $(nproc) CPUs, $(uname -sr); loopback; repository: python3 http.server"
rss_idle=$(status_kib "$server_pid" VmRSS)

# 1. First-answer latency of size probes.
python3 - "$tftp_port" "$probes" <<'EOF'
import socket, struct, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])

def probe(name, want):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    opts = b"tsize\x000\x00blksize\x001468\x00windowsize\x004\x00"
    rrq = b"\x00\x01" + name.encode() + b"\x00octet\x00" + opts
    t0 = time.perf_counter()
    s.sendto(rrq, ("127.0.0.1", port))
    data, peer = s.recvfrom(2048)
    dt = time.perf_counter() - t0
    if data[:2] != b"\x00\x06":
        sys.exit(f"{name}: expected an OACK, got {data[:40]!r}")
    fields = data[2:].split(b"\x00")
    got = dict(zip(fields[0::2], fields[1::2]))
    if got.get(b"tsize") != str(want).encode():
        sys.exit(f"{name}: tsize {got.get(b'tsize')!r}, want {want}")
    s.sendto(b"\x00\x05\x00\x08size probe\x00", peer)
    s.close()
    return dt * 1e3

def row(label, times):
    times = sorted(times)
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print(f"  {label:<34} p50 {p(0.5):7.3f}  p99 {p(0.99):7.3f}  max {times[-1]:7.3f} ms")

print(f"First answer (RRQ to OACK) of {n} UEFI-style size probes, every OACK with tsize 1500:")
row("from --root (no deferral)", [probe(f"local-{i}", 1500) for i in range(1, n + 1)])
row("upstream, cold (OACK waits for GET)", [probe(f"cfg-{i}", 1500) for i in range(1, n + 1)])
row("upstream, cached", [probe(f"cfg-{i}", 1500) for i in range(1, n + 1)])
EOF
echo "  GETs for the $probes cold names: $(grep -c '"GET /cfg-' "$tmp/http.log" || true) (then cached: no more)"

# 2. Crowds.
crowd() { # LABEL
    local line
    line=$("$loadgen" --server "127.0.0.1:$tftp_port" --file initrd --verify "$tmp/repo/initrd" \
        --concurrency "$clients" --count "$clients" --blksize 1468 --windowsize 4 --tsize \
        --kv 2>"$tmp/loadgen.err") || { echo "upstream.sh: loadgen failed:" >&2; cat "$tmp/loadgen.err" >&2; exit 1; }
    local ok failed
    ok=$(tr ' ' '\n' <<<"$line" | awk -F= '$1 == "ok" { print $2 }')
    failed=$(tr ' ' '\n' <<<"$line" | awk -F= '$1 == "failed" { print $2 }')
    echo "  $1: $ok ok / $failed failed, GETs of initrd so far: $(gets initrd), loadgen: $line" | cut -c1-220
}
echo "A crowd of $clients clients for one $size-byte file (blksize 1468, windowsize 4, tsize):"
crowd "cold"
crowd "warm"
rss_peak=$(status_kib "$server_pid" VmHWM)
rss_now=$(status_kib "$server_pid" VmRSS)
echo "Memory: RSS ${rss_idle} KiB idle, peak ${rss_peak} KiB, ${rss_now} KiB after (file $((size >> 10)) KiB, --upstream-cache 256M)"
