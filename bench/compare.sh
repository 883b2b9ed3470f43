#!/usr/bin/env bash
# Compares dyntftpd with the classic TFTP servers on this machine, over loopback.
#
#   bench/compare.sh [--runs N] [--quick] [--markdown] [--servers LIST] [--loss-limit SECS]
#                    [--port-base PORT] [--cpu-quota PCT] [--firmware-cases] [--cases IDS]
#
# It builds dyntftpd (release) and the load generator (bench/loadgen/), generates the
# files in a temporary root, starts every server on its own loopback port serving that
# root, runs one fixed matrix with every transfer verified byte for byte (each case
# against every server back to back, so that a row compares servers measured within
# seconds of each other on a noisy machine), stops the servers, and prints one table:
# the median of the runs for every server and the ratio to dyntftpd. Then the physical ceiling: plain UDP datagrams on loopback of the
# same sizes (blksize + 4). Servers that are not installed are skipped with a note;
# dyntftpd always runs. Progress goes to stderr, the report to stdout.
#
# Servers and their configuration (each on 127.0.0.1, each allowed blksize up to 65464,
# enough concurrency for 256 clients, no per-transfer logging, default timeouts of 1 s):
#   dyntftpd   target/release/dyntftpd -l 127.0.0.1:PORT -r ROOT -q --max-window 64
#              (max blksize 65464 and max sessions from the fd limit are its defaults)
#   dyntftpd-baseline  another build of dyntftpd with the same flags as dyntftpd, named
#              by the DYNTFTPD_BASELINE environment variable (e.g. one built from an older
#              commit): compares two builds within one run. Only when asked for with
#              --servers.
#   dyntftpd-tuned  the same with --single-port --cache 64M: every transfer served from
#              the listening socket (no socket per transfer) and files kept in memory;
#              with --single-port-max-blksize 65464 --single-port-max-window 64, what an
#              operator whose network drops forged sources (BCP 38) may set, so that the
#              large-block and large-window rows compare like with like
#   tftpd-hpa  in.tftpd -L -a 127.0.0.1:PORT -s -B 65464 -u nobody ROOT
#              (-L foreground, -s chroot into ROOT: needs root; one process per transfer;
#              no -v, so nothing is logged per transfer; it does not know windowsize)
#   atftpd     atftpd --daemon --no-fork --port PORT --bind-address 127.0.0.1
#              --maxthread 1024 --verbose=4 --logfile /dev/null [--user nobody.nogroup] ROOT
#              (one thread per transfer; the default cap of 100 threads would refuse the
#              256-client case; --verbose=4 drops the per-transfer notices)
#   dnsmasq    dnsmasq -k --port=0 --conf-file=/dev/null --no-resolv --no-hosts --pid-file=
#              --listen-address=127.0.0.1 --bind-interfaces --enable-tftp --tftp-root=ROOT
#              --tftp-max=8192 --edns-packet-max=65535 --log-facility=/dev/null
#              (--port=0: no DNS. dnsmasq has no option for the TFTP port: it always
#              listens on 69, so it runs on 127.0.0.1:69 and only as root and when that
#              port is free. Its largest blksize is its packet buffer, sized from
#              --edns-packet-max: with the default of 1232 it grants at most 2263.
#              --tftp-max defaults to 50 transfers (8192: the 4,096-client firmware
#              cases). It logs every transfer: to /dev/null.
#              It does not know windowsize.)
#
# Installing the servers (Debian/Ubuntu). tftpd-hpa and atftpd conflict as packages (both
# ship /usr/sbin/in.tftpd), so atftpd's binary is unpacked next to them without
# installing the package; dnsmasq-base is the binary without the DNS daemon service:
#   apt-get install --no-install-recommends tftpd-hpa dnsmasq-base libpcre2-8-0 libwrap0
#   apt-get download atftpd && dpkg-deb -x atftpd_*.deb /opt/atftpd
#   ln -s /opt/atftpd/usr/sbin/atftpd /usr/local/sbin/atftpd
# The tftpd-hpa package's postinst tries to start the daemon on port 69 through
# invoke-rc.d (in containers, policy-rc.d usually denies it). If it did start, find it
# with `ss -ulpn 'sport = :69'` and stop that one PID (or `service tftpd-hpa stop`);
# this script never uses the system services: it starts every server itself and kills
# exactly the PIDs it started when it exits. Binaries can be named with the IN_TFTPD,
# ATFTPD and DNSMASQ environment variables.
#
# Pinning: servers run on CPU 0 (taskset -c 0; tftpd-hpa's children and atftpd's threads
# inherit it), the load generator on CPU 1; the raw UDP ceiling uses both (its sender
# and receiver threads stand for the server and the client). On a 1-CPU machine nothing
# is pinned.
#
# The matrix (--quick: 8 MiB instead of 32 MiB, shorter runs, one run):
#   1 MiB, blksize 512 (no options): 5 transfers one after another, MB/s
#   32 MiB at blksize 1428, 8192, 65464, each without windowsize and with windowsize 16
#     and 64: 3 transfers one after another, MB/s. A server that leaves windowsize out of
#     its OACK is shown as "ignores ws"; a smaller blksize than asked as "bs=N".
#   64 clients fetching 1 KiB files for 5 s: sessions/s
#   256 clients fetching 1 MiB at blksize 1428, 512 transfers: aggregate MB/s
#   (these two with the load generator's --shared-socket: one client socket, a loopback
#   address per transfer, batched system calls, so that the clients cost less CPU than
#   the server they measure)
#   32 MiB, blksize 1428, windowsize 16 asked, with 0 %, 1 % and 5 % of the DATA/OACK
#     packets dropped by the client: one transfer, verified MB/s; a transfer still
#     running after --loss-limit seconds (default 20) is cut, and its row shows the
#     verified bytes per second up to the cut, marked "(cut)".
#   Raw UDP ceiling, 1432- and 8196-byte datagrams (blksize 1428 and 8192 + 4), 3 s each.
# Every case also reports the load generator's own CPU (max over servers and runs) and
# each server's CPU over the same time (median), so one can see which side was the limit,
# and a second table: each server's CPU time per datagram the load generator received
# (server CPU over the case divided by the DATA/OACK/ERROR datagrams that reached the
# clients; median, in microseconds; lower is better).
#
# --firmware-cases: instead of the matrix above, what network-boot firmware does (lock
# step: iPXE asks for blksize 1432, GRUB 1024, shim none, i.e. 512; EDK2 asks for 1468
# and windowsize 4), each with 1, 256 and 4,096 clients:
#   lock step at blksize 512, 1024, 1432, 1468, and blksize 1468 windowsize 4;
#   1 client: 1 MiB transfers one after another for 2 s (the last one finishes);
#   256 and 4,096 clients (load generator's --shared-socket): every client fetches 1 MiB
#     over and over, and the case is cut after 3 s (256) or 5 s (4,096): the figure is
#     the verified bytes per second delivered, marked "(cut)", over the whole case
#     (request storm and slow start included). Each case is bounded in time.
#   After a cut case the script waits (at most 6 s) until the server has been idle for a
#   second, so that its retransmissions to abandoned clients do not count in the next case.
#   The ratios are to dnsmasq when it runs (to dyntftpd otherwise). No raw UDP ceiling.
#
# --cases IDS: only the cases with these ids (comma-separated, e.g. small64,many256; the
# ids are the first column of `cases` below), and no raw UDP ceiling.
#
# --cpu-quota PCT: each server (with its threads and children) runs in its own cgroup
# limited to PCT % of one CPU (cgroup v2 cpu.max "QUOTA 100000", or cgroup v1
# cpu.cfs_quota_us with cpu.cfs_period_us 100000, whichever this machine has for the cpu
# controller), so that the load generator, with a whole CPU, is never the limit: what is
# measured is how much a server does with a fixed share of a core. The groups are made
# under the cgroup root as compare.sh.PID/SERVER (and removed on exit); the report says
# which kind was used. The server's CPU is then the cgroup's own counter (v2 cpu.stat
# usage_usec, v1 cpuacct.usage), which counts its threads and children, exited ones too.
# Needs root (or a delegated cgroup).
#
# Needs bash, awk, cargo, taskset (optional), ss (optional, for readiness checks).
# `bash -n bench/compare.sh` checks its syntax.

set -euo pipefail

runs=3
quick=0
markdown=0
servers_wanted="dyntftpd,dyntftpd-tuned,tftpd-hpa,atftpd,dnsmasq"
loss_limit=20
port_base=17300
cmdline="bench/compare.sh${*:+ $*}"

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    echo "  --runs N          repeat the matrix N times and print medians (default 3)"
    echo "  --quick           smoke run: 8 MiB files, short runs, --runs 1 unless given"
    echo "  --markdown        print the table as Markdown (for the README)"
    echo "  --servers LIST    comma-separated subset of: $servers_wanted,dyntftpd-baseline"
    echo "  --loss-limit SECS cut the lossy transfers after SECS (default 20)"
    echo "  --port-base PORT  first loopback port used (default 17300; dnsmasq uses 69)"
    echo "  --cpu-quota PCT   run every server in a cgroup capped at PCT % of one CPU"
    echo "  --firmware-cases  lock-step (and EDK2 windowsize 4) cases with 1, 256, 4096 clients"
    echo "  --cases IDS       only these cases (comma-separated ids, e.g. small64,many256)"
}

runs_given=0
loss_given=0
cpu_quota=""
firmware=0
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="${2:?--runs needs a value}"; runs_given=1; shift 2 ;;
        --quick) quick=1; shift ;;
        --markdown) markdown=1; shift ;;
        --servers) servers_wanted="${2:?--servers needs a value}"; shift 2 ;;
        --loss-limit) loss_limit="${2:?--loss-limit needs a value}"; loss_given=1; shift 2 ;;
        --port-base) port_base="${2:?--port-base needs a value}"; shift 2 ;;
        --cpu-quota) cpu_quota="${2:?--cpu-quota needs a value}"; shift 2 ;;
        --firmware-cases) firmware=1; shift ;;
        --cases) only="${2:?--cases needs a value}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$runs" in ''|*[!0-9]*|0) echo "compare.sh: --runs must be a positive integer" >&2; exit 2 ;; esac
case "$loss_limit" in ''|*[!0-9]*|0) echo "compare.sh: --loss-limit must be a positive integer" >&2; exit 2 ;; esac
case "$port_base" in ''|*[!0-9]*) echo "compare.sh: --port-base must be a port number" >&2; exit 2 ;; esac
if [ -n "$cpu_quota" ]; then
    case "$cpu_quota" in ''|*[!0-9]*|0) echo "compare.sh: --cpu-quota must be a percentage from 1 to 100" >&2; exit 2 ;; esac
    [ "$cpu_quota" -le 100 ] || { echo "compare.sh: --cpu-quota must be a percentage from 1 to 100" >&2; exit 2; }
fi
if [ "$quick" = 1 ] && [ "$runs_given" = 0 ]; then
    runs=1
fi
if [ "$quick" = 1 ]; then
    big_mib=8; small_secs=1; many_count=256; raw_secs=1
    [ "$loss_given" = 1 ] || loss_limit=5
else
    big_mib=32; small_secs=5; many_count=512; raw_secs=3
fi

note() { echo "compare.sh: $*" >&2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# ---------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------
note "building dyntftpd and the load generator (release)"
# shellcheck source=bench/common/build.sh
. "$repo/bench/common/build.sh"
build_server_and_loadgen compare.sh

# ---------------------------------------------------------------------------------------
# Temporary root, cleanup of exactly the processes started here
# ---------------------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/dyntftp-compare.XXXXXX")
declare -A pid_of=() # server name -> PID of the running server started here
cg_dirs=()            # cgroup directories made here (parents first)
cleanup() {
    local s i d
    for s in "${!pid_of[@]}"; do
        kill "${pid_of[$s]}" 2>/dev/null || true
        wait "${pid_of[$s]}" 2>/dev/null || true
    done
    # The groups, children before parents; a group empties a moment after its last
    # process exits (bounded: 2 s each).
    for ((i = ${#cg_dirs[@]} - 1; i >= 0; i--)); do
        d=${cg_dirs[$i]}
        [ -d "$d" ] || continue
        for _ in $(seq 20); do
            rmdir "$d" 2>/dev/null && break
            sleep 0.1
        done
        [ -d "$d" ] && echo "compare.sh: could not remove cgroup $d" >&2
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

root="$tmp/root"
mkdir -p "$root"
chmod 755 "$tmp" "$root" # the servers drop to nobody and must reach the files
head -c 1024 /dev/urandom >"$root/small"
head -c $((1024 * 1024)) /dev/urandom >"$root/medium"
head -c $((big_mib * 1024 * 1024)) /dev/urandom >"$root/big"
chmod 644 "$root"/*

# One socket per client and per server session: allow plenty of descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if command -v taskset >/dev/null && [ "$(nproc 2>/dev/null || echo 1)" -ge 2 ]; then
    pin_server=(taskset -c 0)
    pin_loadgen=(taskset -c 1)
    pin_raw=(taskset -c 0,1)
    pinning="servers on CPU 0, load generator on CPU 1"
else
    pin_server=()
    pin_loadgen=()
    pin_raw=()
    pinning="not pinned (fewer than 2 CPUs or no taskset)"
fi

# ---------------------------------------------------------------------------------------
# CPU quota (--cpu-quota): one cgroup per server under compare.sh.PID
# ---------------------------------------------------------------------------------------
cg_kind=""      # v2 or v1
cg_cpu_base=""  # compare.sh.PID in the hierarchy with the cpu controller
cg_acct_base="" # compare.sh.PID in the hierarchy with cpuacct (v1; = cg_cpu_base on v2)
cg_name="compare.sh.$$"
quota_note="no CPU quota"
if [ -n "$cpu_quota" ]; then
    period=100000
    quota=$((cpu_quota * period / 100))
    if [ -f /sys/fs/cgroup/cgroup.controllers ] &&
        grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
        # cgroup v2 (unified): enable cpu for the children of the root and of our group.
        cg_kind=v2
        cg_cpu_base="/sys/fs/cgroup/$cg_name"
        cg_acct_base="$cg_cpu_base"
        grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control ||
            echo +cpu >/sys/fs/cgroup/cgroup.subtree_control ||
            { echo "compare.sh: cannot enable the cpu controller in /sys/fs/cgroup" >&2; exit 1; }
        mkdir "$cg_cpu_base" || { echo "compare.sh: cannot create $cg_cpu_base (needs root)" >&2; exit 1; }
        cg_dirs+=("$cg_cpu_base")
        echo +cpu >"$cg_cpu_base/cgroup.subtree_control" ||
            { echo "compare.sh: cannot enable cpu in $cg_cpu_base" >&2; exit 1; }
    else
        # cgroup v1: the cpu hierarchy for the quota, cpuacct (often the same one) for
        # the usage counter.
        v1_cpu=$(awk '$3 == "cgroup" && $4 ~ /(^|,)cpu(,|$)/ { print $2; exit }' /proc/mounts)
        v1_acct=$(awk '$3 == "cgroup" && $4 ~ /(^|,)cpuacct(,|$)/ { print $2; exit }' /proc/mounts)
        if [ -z "$v1_cpu" ] || [ ! -f "$v1_cpu/cpu.cfs_quota_us" ]; then
            echo "compare.sh: --cpu-quota: no cgroup v2 cpu controller and no cgroup v1 cpu hierarchy with cpu.cfs_quota_us" >&2
            exit 1
        fi
        cg_kind=v1
        cg_cpu_base="$v1_cpu/$cg_name"
        mkdir "$cg_cpu_base" || { echo "compare.sh: cannot create $cg_cpu_base (needs root)" >&2; exit 1; }
        cg_dirs+=("$cg_cpu_base")
        if [ -n "$v1_acct" ] && [ "$v1_acct" != "$v1_cpu" ]; then
            cg_acct_base="$v1_acct/$cg_name"
            mkdir "$cg_acct_base" && cg_dirs+=("$cg_acct_base") || cg_acct_base=""
        else
            cg_acct_base="$cg_cpu_base"
        fi
    fi
    quota_note="each server in its own cgroup ($cg_kind, $cg_cpu_base/SERVER) capped at $cpu_quota % of one CPU ($quota us per $period us)"
    note "CPU quota: $quota_note"
fi

# Makes the cgroup of server $1 and sets cg_procs to the files a process writes its PID
# to in order to join it (empty without --cpu-quota). Not in a subshell: it records the
# directories it makes in cg_dirs, for the cleanup.
cg_procs=""
cg_make() {
    cg_procs=""
    [ -n "$cg_kind" ] || return 0
    local d="$cg_cpu_base/$1"
    if [ ! -d "$d" ]; then
        mkdir "$d" || return 1
        cg_dirs+=("$d")
    fi
    if [ "$cg_kind" = v2 ]; then
        echo "$quota $period" >"$d/cpu.max" || return 1
    else
        echo "$period" >"$d/cpu.cfs_period_us" || return 1
        echo "$quota" >"$d/cpu.cfs_quota_us" || return 1
    fi
    cg_procs="$d/cgroup.procs"
    if [ "$cg_kind" = v1 ] && [ -n "$cg_acct_base" ] && [ "$cg_acct_base" != "$cg_cpu_base" ]; then
        local a="$cg_acct_base/$1"
        if [ ! -d "$a" ]; then
            mkdir "$a" && cg_dirs+=("$a")
        fi
        [ -d "$a" ] && cg_procs="$cg_procs $a/cgroup.procs"
    fi
}

# CPU time (ns) of the cgroup of server $1, or nothing.
cg_usage_ns() {
    [ -n "$cg_kind" ] && [ -n "$cg_acct_base" ] || return 0
    if [ "$cg_kind" = v2 ]; then
        awk '$1 == "usage_usec" { printf "%.0f\n", $2 * 1000 }' "$cg_acct_base/$1/cpu.stat" 2>/dev/null
    else
        cat "$cg_acct_base/$1/cpuacct.usage" 2>/dev/null
    fi
}

# ---------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------
in_tftpd=${IN_TFTPD:-$(command -v in.tftpd || true)}
atftpd=${ATFTPD:-$(command -v atftpd || true)}
dnsmasq=${DNSMASQ:-$(command -v dnsmasq || true)}
is_root=0
[ "$(id -u)" = 0 ] && is_root=1

port_in_use() {
    command -v ss >/dev/null && [ -n "$(ss -Hlun "sport = :$1" 2>/dev/null)" ]
}

# Prints why server $1 cannot run here, or nothing when it can.
unavailable() {
    case "$1" in
        dyntftpd|dyntftpd-tuned) ;;
        dyntftpd-baseline)
            if [ -z "${DYNTFTPD_BASELINE:-}" ]; then echo "DYNTFTPD_BASELINE is not set"
            elif [ ! -x "$DYNTFTPD_BASELINE" ]; then echo "$DYNTFTPD_BASELINE is not executable"
            fi ;;
        tftpd-hpa)
            if [ -z "$in_tftpd" ]; then echo "in.tftpd not installed"
            elif [ "$is_root" = 0 ]; then echo "in.tftpd -s needs root (chroot)"
            elif ! "$in_tftpd" -V 2>&1 | grep -q 'tftp-hpa'; then
                echo "$in_tftpd is not tftp-hpa's in.tftpd"
            fi ;;
        atftpd) [ -n "$atftpd" ] || echo "atftpd not installed" ;;
        dnsmasq)
            if [ -z "$dnsmasq" ]; then echo "dnsmasq not installed"
            elif [ "$is_root" = 0 ]; then echo "dnsmasq serves TFTP only on port 69: needs root"
            elif port_in_use 69; then echo "port 69 is in use"
            fi ;;
        *) echo "unknown server" ;;
    esac
}

version_of() {
    case "$1" in
        dyntftpd) "$dyntftpd" --version 2>&1 | head -n 1 ;;
        dyntftpd-baseline) echo "$("$DYNTFTPD_BASELINE" --version 2>&1 | head -n 1) ($DYNTFTPD_BASELINE)" ;;
        dyntftpd-tuned) echo "$("$dyntftpd" --version 2>&1 | head -n 1) --single-port --cache 64M (single-port caps lifted)" ;;
        tftpd-hpa) "$in_tftpd" -V 2>&1 | head -n 1 ;;
        atftpd) "$atftpd" -V 2>&1 | head -n 1 ;;
        dnsmasq) "$dnsmasq" --version 2>&1 | head -n 1 | sed 's/ *Copyright.*//' ;;
    esac
}

port_of() {
    case "$1" in
        dyntftpd) echo "$port_base" ;;
        tftpd-hpa) echo $((port_base + 1)) ;;
        atftpd) echo $((port_base + 2)) ;;
        dnsmasq) echo 69 ;;
        dyntftpd-tuned) echo $((port_base + 3)) ;;
        dyntftpd-baseline) echo $((port_base + 4)) ;;
    esac
}

# Starts server $1 in the background on its port; records its PID in pid_of.
start_server() {
    local name=$1 port
    port=$(port_of "$name")
    if port_in_use "$port"; then
        note "port $port is in use: cannot start $name"
        return 1
    fi
    local log="$tmp/$name.log"
    # The command prefix: pinning, then (--cpu-quota) a shell that joins the server's
    # cgroup and execs the server, so that it runs in the group from its first
    # instruction (same PID, threads and children inherit the group).
    local pre=("${pin_server[@]}")
    if [ -n "$cg_kind" ]; then
        cg_make "$name" || { note "cannot make the cgroup of $name"; return 1; }
        pre+=(env "CG_PROCS=$cg_procs" sh -c \
            'for f in $CG_PROCS; do echo $$ >"$f" || exit 97; done; unset CG_PROCS; exec "$@"' sh)
    fi
    case "$name" in
        dyntftpd)
            "${pre[@]}" "$dyntftpd" -l "127.0.0.1:$port" -r "$root" -q \
                --max-window 64 >"$log" 2>&1 &
            ;;
        dyntftpd-baseline)
            "${pre[@]}" "$DYNTFTPD_BASELINE" -l "127.0.0.1:$port" -r "$root" -q \
                --max-window 64 >"$log" 2>&1 &
            ;;
        dyntftpd-tuned)
            "${pre[@]}" "$dyntftpd" -l "127.0.0.1:$port" -r "$root" -q \
                --max-window 64 --single-port --cache 64M \
                --single-port-max-blksize 65464 --single-port-max-window 64 >"$log" 2>&1 &
            ;;
        tftpd-hpa)
            "${pre[@]}" "$in_tftpd" -L -a "127.0.0.1:$port" -s -B 65464 -u nobody \
                "$root" >"$log" 2>&1 &
            ;;
        atftpd)
            local user=()
            [ "$is_root" = 1 ] && user=(--user nobody.nogroup)
            "${pre[@]}" "$atftpd" --daemon --no-fork --port "$port" \
                --bind-address 127.0.0.1 --maxthread 1024 --verbose=4 \
                --logfile /dev/null "${user[@]}" "$root" >"$log" 2>&1 &
            ;;
        dnsmasq)
            "${pre[@]}" "$dnsmasq" -k --port=0 --conf-file=/dev/null --no-resolv \
                --no-hosts --pid-file= --listen-address=127.0.0.1 --bind-interfaces \
                --enable-tftp --tftp-root="$root" --tftp-max=8192 \
                --edns-packet-max=65535 --log-facility=/dev/null >"$log" 2>&1 &
            ;;
    esac
    pid_of[$name]=$!
    # Ready when the port is bound (bounded: 5 s).
    local i
    for i in $(seq 50); do
        if ! kill -0 "${pid_of[$name]}" 2>/dev/null; then
            note "$name exited at startup: $(tr '\n' ' ' <"$log")"
            wait "${pid_of[$name]}" 2>/dev/null || true
            unset "pid_of[$name]"
            return 1
        fi
        if command -v ss >/dev/null; then
            port_in_use "$port" && return 0
        elif [ "$i" -ge 10 ]; then
            return 0 # no ss: give it one second
        fi
        sleep 0.1
    done
    note "$name did not bind port $port within 5 s"
    stop_server "$name"
    return 1
}

# Stops server $1 if this script started it (that PID only).
stop_server() {
    local pid=${pid_of[$1]:-}
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        local i
        for i in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        unset "pid_of[$1]"
    fi
}

# ---------------------------------------------------------------------------------------
# The matrix: id, unit, label, loadgen arguments (after --server and --verify-dir)
# ---------------------------------------------------------------------------------------
cases() {
    local b w n
    if [ "$firmware" = 1 ]; then
        # Lock step as iPXE, GRUB, shim ask (512: no options, as shim), and EDK2's
        # blksize 1468 windowsize 4; 1 client, then 256 and 4,096 clients cut after 3 and
        # 5 s.
        for n in 1 256 4096; do
            for b in 512 1024 1432 1468 1468w4; do
                local opts="--blksize ${b%w4}" label="blksize ${b%w4}, lock step"
                [ "$b" = 512 ] && { opts=""; label="blksize 512 (no options), lock step"; }
                [ "$b" = 1468w4 ] && { opts="--blksize 1468 --windowsize 4"; label="blksize 1468, windowsize 4"; }
                if [ "$n" = 1 ]; then
                    printf '%s\t%s\t%s\t%s\n' "fw${b}c1" MB/s \
                        "1 client, 1 MiB, $label, 2 s" "--file medium --duration 2 $opts"
                else
                    local secs=3
                    [ "$n" = 4096 ] && secs=5
                    printf '%s\t%s\t%s\t%s\n' "fw${b}c$n" "MB/s" \
                        "$n clients, 1 MiB, $label, cut at $secs s" \
                        "--file medium --concurrency $n --duration $secs --time-limit $secs $opts --shared-socket"
                fi
            done
        done
        return
    fi
    printf '%s\t%s\t%s\t%s\n' one512 MB/s "1 MiB, 1 client, blksize 512 (no options)" \
        "--file medium --count 5"
    for b in 1428 8192 65464; do
        for w in - 16 64; do
            if [ "$w" = - ]; then
                printf '%s\t%s\t%s\t%s\n' "b$b" MB/s \
                    "$big_mib MiB, 1 client, blksize $b" "--file big --count 3 --blksize $b"
            else
                printf '%s\t%s\t%s\t%s\n' "b${b}w$w" MB/s \
                    "$big_mib MiB, 1 client, blksize $b, windowsize $w" \
                    "--file big --count 3 --blksize $b --windowsize $w"
            fi
        done
    done
    printf '%s\t%s\t%s\t%s\n' small64 sessions/s "64 clients, 1 KiB files, ${small_secs} s" \
        "--file small --concurrency 64 --duration $small_secs --shared-socket"
    printf '%s\t%s\t%s\t%s\n' many256 MB/s \
        "256 clients, 1 MiB, blksize 1428 ($many_count transfers)" \
        "--file medium --concurrency 256 --count $many_count --blksize 1428 --shared-socket"
    local d
    for d in 0 1 5; do
        printf '%s\t%s\t%s\t%s\n' "loss$d" MB/s \
            "$big_mib MiB, blksize 1428, windowsize 16, $d % drop" \
            "--file big --count 1 --blksize 1428 --windowsize 16 --drop $d --seed 1 --time-limit $loss_limit"
    done
}

# The cases asked for with --cases (all without it).
selected_cases() {
    cases | awk -F'\t' -v only="$only" 'only == "" || index("," only ",", "," $1 ",")'
}

# Waits until server $1 has no child processes left (tftpd-hpa forks one per transfer;
# after a case whose clients gave up they go on retrying for a while), so that they do
# not take CPU 0 from the next server measured. Bounded: 60 s.
settle() {
    local pid=${pid_of[$1]:-} i
    [ -n "$pid" ] && command -v pgrep >/dev/null || return 0
    for i in $(seq 600); do
        [ -z "$(pgrep -P "$pid" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    note "  $1 still has child processes after 60 s"
}

# Value of key $1 in the key=value line $2.
kv() {
    awk -v k="$1" '{ for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) {
        print substr($i, length(k) + 2); exit } }' <<<"$2"
}

results="$tmp/results" # lines: server case run value flag loadgen_cpu_pct server_cpu_pct us_per_datagram
: >"$results"

hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
# CPU time (ns) used so far by server $1's process $2, or nothing when it cannot be
# known. dyntftpd and dnsmasq are single-threaded: /proc/PID/schedstat counts their
# time on CPU in nanoseconds. atftpd's transfers run in threads: /proc/PID/stat's user
# and system time (clock ticks) counts them all; it is also the fallback. tftpd-hpa's
# run in child processes that it lets the kernel reap (SIGCHLD ignored), which adds
# their time nowhere: not measured.
#
# With --cpu-quota, the server's cgroup counts the CPU time of all its processes and
# threads, exited ones included: that counter is used for every server. Without it,
# dyntftpd's and dnsmasq's threads are summed (/proc/PID/task/*/schedstat).
cpu_ns() {
    local c
    c=$(cg_usage_ns "$1")
    if [ -n "$c" ]; then
        echo "$c"
        return
    fi
    case "$1" in
        tftpd-hpa) return ;;
        dyntftpd|dyntftpd-tuned|dyntftpd-baseline|dnsmasq)
            if compgen -G "/proc/$2/task/*/schedstat" >/dev/null; then
                cat /proc/"$2"/task/*/schedstat 2>/dev/null | awk '{ t += $1 } END { printf "%.0f\n", t }'
                return
            fi ;;
    esac
    if [ -r "/proc/$2/stat" ]; then
        sed 's/^.*) //' "/proc/$2/stat" |
            awk -v hz="$hz" '{ printf "%.0f\n", ($12 + $13) * 1e9 / hz }'
    fi
}

# Runs case $2 (arguments $4) against server $1 on run $3 and records one result line.
run_case() {
    local server=$1 id=$2 run=$3 args=$4 port line status=0
    port=$(port_of "$server")
    local limit=()
    case "$args" in *--time-limit*) ;; *) limit=(--time-limit 300) ;; esac
    local cpu0="" ns0 cpu1="" ns1 server_cpu=- us_per=-
    # Clients on 127.0.0.2: late datagrams of other programs on this machine, sent to a
    # 127.0.0.1 port a client has just reused, cannot pass for its server's reply. (The
    # shared socket picks its own addresses, from 127.1.0.1.)
    local bind=(--bind 127.0.0.2)
    case "$args" in *--shared-socket*) bind=() ;; esac
    cpu0=$(cpu_ns "$server" "${pid_of[$server]}")
    ns0=$(date +%s%N)
    # shellcheck disable=SC2086 # $args is a list of words by design
    line=$("${pin_loadgen[@]}" "$loadgen" --server "127.0.0.1:$port" "${bind[@]}" \
        --verify-dir "$root" \
        $args "${limit[@]}" --kv 2>"$tmp/loadgen.err") || status=$?
    ns1=$(date +%s%N)
    cpu1=$(cpu_ns "$server" "${pid_of[$server]}")
    if [ -n "$cpu0" ] && [ -n "$cpu1" ]; then
        server_cpu=$(awk -v c="$((cpu1 - cpu0))" -v ns="$((ns1 - ns0))" \
            'BEGIN { printf "%.1f", (ns > 0 ? c / ns * 100 : 0) }')
    fi
    if [ -z "$line" ] || [ "$status" -gt 1 ]; then
        echo "$server $id $run - error:loadgen-exit-$status - -" >>"$results"
        note "  $server $id: loadgen failed: $(tr '\n' ' ' <"$tmp/loadgen.err")"
        return
    fi
    # flag: "ok", or tags joined by commas: fail:REASONS, cut, nows, bs=N
    local value flag="" failures
    local dgrams
    dgrams=$(kv datagrams_received "$line")
    if [ -n "$cpu0" ] && [ -n "$cpu1" ] && [ -n "$dgrams" ] && [ "$dgrams" != - ] && [ "$dgrams" -gt 0 ]; then
        us_per=$(awk -v c="$((cpu1 - cpu0))" -v d="$dgrams" 'BEGIN { printf "%.3f", c / d / 1000 }')
    fi
    case "$id" in
        small64) value=$(kv sessions_per_s "$line") ;;
        loss*|fw*) value=$(kv delivered_mb_per_s "$line") ;;
        *) value=$(kv payload_mb_per_s "$line") ;;
    esac
    failures=$(kv failures "$line")
    local want_bs
    want_bs=$(awk '{ for (i = 1; i < NF; i++) if ($i == "--blksize") print $(i + 1) }' <<<"$args")
    if [ "$failures" = "time_limit:1" ] && [ "${id#loss}" != "$id" ]; then
        flag="cut"
    elif [ "${id#fw}" != "$id" ] && [ "$failures" != - ]; then
        # Firmware cases end by the cut: time_limit failures are expected; any other
        # failure (a client that gave up) is shown as lost, and the figures still count.
        local other
        other=$(tr ',' '\n' <<<"$failures" | grep -v '^time_limit:' | paste -sd+ - || true)
        case ",$failures" in *,time_limit:*) flag="cut" ;; esac
        [ -n "$other" ] && flag="$flag,lost:$other"
    elif [ "$failures" != - ]; then
        flag="fail:$failures"
    fi
    case "$args" in
        *--windowsize*)
            if [ "$(kv windowsize_acknowledged "$line")" = no ]; then flag="$flag,nows"; fi ;;
    esac
    if [ -n "$want_bs" ] && [ "$(kv negotiated_blksize "$line")" != "$want_bs" ]; then
        flag="$flag,bs=$(kv negotiated_blksize "$line")"
    fi
    flag=${flag#,}
    flag=${flag:-ok}
    echo "$server $id $run $value $flag $(kv cpu_pct "$line") $server_cpu $us_per" >>"$results"
    note "  $server $id: $value ($flag, loadgen cpu $(kv cpu_pct "$line") %, server cpu $server_cpu %, $us_per us/datagram of $dgrams)"
    if [ "${id#fw}" != "$id" ] && [ "$flag" != ok ]; then
        quiesce "$server"
    fi
}

# After a cut case: waits until server $1 has used under 5 ms of CPU in a second (its
# retransmissions to the abandoned clients are over), at most 6 s.
quiesce() {
    local pid=${pid_of[$1]:-} a b
    [ -n "$pid" ] || return 0
    a=$(cpu_ns "$1" "$pid")
    [ -n "$a" ] || return 0
    for _ in $(seq 6); do
        sleep 1
        b=$(cpu_ns "$1" "$pid")
        [ -n "$b" ] || return 0
        [ $((b - a)) -lt 5000000 ] && return 0
        a=$b
    done
    note "  $1 still busy 6 s after the case"
}

# ---------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------
servers=()
skipped=()
for s in dyntftpd dyntftpd-baseline dyntftpd-tuned tftpd-hpa atftpd dnsmasq; do
    case ",$servers_wanted," in *",$s,"*) ;; *) [ "$s" = dyntftpd ] || continue ;; esac
    why=$(unavailable "$s")
    if [ -n "$why" ]; then
        skipped+=("$s: $why")
        note "skipping $s: $why"
    else
        servers+=("$s")
    fi
done

# All servers of a run are up at once, each idle while another is measured, and every
# case runs against each server back to back (in an order that rotates with the run):
# on a shared, noisy machine, the servers compared in one row were measured within
# seconds of each other.
for run in $(seq "$runs"); do
    note "run $run/$runs: starting ${servers[*]}"
    order=()
    for s in "${servers[@]}"; do
        if start_server "$s"; then
            order+=("$s")
        else
            echo "$s - $run - error:start - -" >>"$results"
        fi
    done
    if [ ${#order[@]} -eq 0 ]; then
        note "no server started"
        continue
    fi
    shift_by=$(((run - 1) % ${#order[@]}))
    order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
    while IFS=$'\t' read -r id _unit _label args; do
        for s in "${order[@]}"; do
            if [ -z "${pid_of[$s]:-}" ] || ! kill -0 "${pid_of[$s]}" 2>/dev/null; then
                note "  $s is not running: skipping $id"
                echo "$s $id $run - error:server-died - -" >>"$results"
                continue
            fi
            run_case "$s" "$id" "$run" "$args"
            settle "$s"
        done
    done < <(selected_cases)
    for s in "${order[@]}"; do
        stop_server "$s"
    done
    [ "$firmware" = 1 ] && continue # the raw ceiling says nothing about a capped server
    [ -n "$only" ] && continue
    for size in 1432 8196; do
        line=$("${pin_raw[@]}" "$loadgen" --raw "$size" --raw-seconds "$raw_secs" --kv)
        echo "raw raw$size $run $(kv payload_mb_per_s "$line") ok $(kv cpu_pct "$line") -" >>"$results"
        note "  raw UDP $size B: $(kv payload_mb_per_s "$line") MB/s"
    done
done

# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit (modified)"
fi
echo "Machine: ${cpu_model:-unknown CPU}, $(nproc 2>/dev/null || echo '?') CPUs, $(uname -sr), loopback"
echo "dyntftpd $commit; $pinning; medians of $runs run(s); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "CPU quota: $quota_note"
echo "Command: $cmdline"
for s in "${servers[@]}"; do
    echo "  $s: $(version_of "$s") on 127.0.0.1:$(port_of "$s")"
done
for s in "${skipped[@]}"; do
    echo "  skipped $s"
done
echo

{
    printf 'case\tunit'
    for s in "${servers[@]}"; do printf '\t%s' "$s"; done
    printf '\tloadgen CPU\tserver CPU\n'
    selected_cases | cut -f1-3
    if [ "$firmware" = 0 ] && [ -z "$only" ]; then
        printf 'raw1432\tMB/s\traw UDP ceiling, 1432-byte datagrams\n'
        printf 'raw8196\tMB/s\traw UDP ceiling, 8196-byte datagrams\n'
    fi
} >"$tmp/rows"
# Ratios are to dnsmasq in the firmware cases when it ran, to dyntftpd otherwise.
base_server=dyntftpd
if [ "$firmware" = 1 ]; then
    for s in "${servers[@]}"; do [ "$s" = dnsmasq ] && base_server=dnsmasq; done
fi
# First table: server CPU per datagram the clients received (the figure that decides how
# many lock-step clients one core serves), then the table of rates.
awk -F'\t' -v results="$results" -v md="$markdown" -v base_server="$base_server" '
    function median(list,    n, v, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++) {
            t = v[i] + 0
            for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]
            v[j + 1] = t
        }
        if (n == 0) return ""
        return (n % 2) ? v[(n + 1) / 2] + 0 : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    BEGIN {
        while ((getline line < results) > 0) {
            split(line, f, " ")
            if (f[5] ~ /(^|,)error/ || f[8] == "" || f[8] == "-") continue
            us[f[1] SUBSEP f[2]] = us[f[1] SUBSEP f[2]] " " f[8]
        }
    }
    NR == 1 {
        nservers = NF - 4
        for (i = 3; i < NF - 1; i++) server[i - 2] = $i
        row[++nrows] = "case"
        for (i = 1; i <= nservers; i++) row[nrows] = row[nrows] "\t" server[i] " (us)"
        next
    }
    $1 ~ /^raw/ { next }
    {
        id = $1; line = $3
        base = median(us[base_server SUBSEP id])
        for (i = 1; i <= nservers; i++) {
            m = median(us[server[i] SUBSEP id])
            cell = (m == "" ? "-" : sprintf("%.2f", m))
            if (m != "" && server[i] != base_server && base != "" && base + 0 > 0)
                cell = cell sprintf(" (%.2fx)", m / base)
            line = line "\t" cell
        }
        row[++nrows] = line
    }
    END {
        print "Server CPU per datagram received by the clients, microseconds (lower is better;"
        print "(ratio to " base_server "): below 1 the server spends less CPU per datagram):"
        print ""
        ncols = split(row[1], h, "\t")
        for (r = 1; r <= nrows; r++) {
            n = split(row[r], c, "\t")
            for (k = 1; k <= n; k++) if (length(c[k]) > w[k]) w[k] = length(c[k])
        }
        for (r = 1; r <= nrows; r++) {
            n = split(row[r], c, "\t")
            out = ""
            for (k = 1; k <= ncols; k++) {
                if (md == 1) out = out "| " c[k] " "
                else out = out sprintf(k == 1 ? "%-" w[k] "s" : "  %-" w[k] "s", c[k])
            }
            if (md == 1) out = out "|"
            else sub(/ +$/, "", out)
            print out
            if (r == 1 && md == 1) {
                sep = "|"
                for (k = 1; k <= ncols; k++) sep = sep (k == 1 ? "---|" : "--:|")
                print sep
            }
        }
        print ""
    }' <"$tmp/rows"

awk -F'\t' -v OFS='\t' -v results="$results" -v md="$markdown" -v limit="$loss_limit" \
    -v base_server="$base_server" -v mode=value <"$tmp/rows" '
    function median(list,    n, v, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++) {       # insertion sort, numerically
            t = v[i] + 0
            for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]
            v[j + 1] = t
        }
        if (n == 0) return ""
        return (n % 2) ? v[(n + 1) / 2] + 0 : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    function fmt(x) { return x >= 100 ? sprintf("%.0f", x) : x >= 10 ? sprintf("%.1f", x) : sprintf("%.2f", x) }
    BEGIN {
        while ((getline line < results) > 0) {
            split(line, f, " ")
            key = f[1] SUBSEP f[2]
            if (f[5] ~ /(^|,)(fail|error)/) {
                # A failed run counts apart; the median is over the runs that passed.
                nfail[key]++
                if (index(why[key], f[5]) == 0) why[key] = why[key] (why[key] == "" ? "" : "; ") f[5]
                next_line = 1
            } else if (f[4] != "-") vals[key] = vals[key] " " f[4]
            runs_seen[f[3]] = 1
            # Tags of the passing runs, each once.
            n = split(f[5], t, ",")
            for (k = 1; k <= n && !next_line; k++)
                if (t[k] != "ok" && index("," flag[key] ",", "," t[k] ",") == 0)
                    flag[key] = flag[key] (flag[key] == "" ? "" : ",") t[k]
            next_line = 0
            if (f[6] != "-" && f[6] + 0 > cpu[f[2]] + 0) cpu[f[2]] = f[6]
            if (f[7] != "-") scpu[f[1] SUBSEP f[2]] = scpu[f[1] SUBSEP f[2]] " " f[7]
        }
    }
    NR == 1 {
        nservers = NF - 4
        for (i = 3; i < NF - 1; i++) server[i - 2] = $i
        nrows = 0
        header = "case" OFS "unit"
        for (i = 1; i <= nservers; i++) header = header OFS server[i]
        header = header OFS "loadgen CPU" OFS "server CPU"
        row[++nrows] = header
        next
    }
    {
        id = $1; line = $3 OFS $2
        if (id ~ /^raw/) {
            m = median(vals["raw" SUBSEP id])
            line = line OFS (m == "" ? "-" : fmt(m) " (ceiling)")
            for (i = 2; i <= nservers; i++) line = line OFS ""
        } else {
            base = median(vals[base_server SUBSEP id])
            bflag = flag[base_server SUBSEP id]
            if (base == "") bflag = bflag ",fail"
            for (i = 1; i <= nservers; i++) {
                key = server[i] SUBSEP id
                m = median(vals[key]); fl = "," flag[key] ","
                # Drop rows and firmware rows: a server without windowsize still has a
                # figure (in lock step), marked [no ws].
                lossy = (id ~ /^(loss|fw)/)
                if (key in nfail) notes[++nnotes] = server[i] " / " $3 ": " nfail[key] " run(s) failed: " why[key]
                if (m == "" && (key in nfail)) cell = "FAIL"
                else if (fl ~ /,nows,/ && !lossy) cell = "ignores ws"
                else if (m == "") cell = "-"
                else {
                    cell = fmt(m)
                    if (server[i] != base_server && base != "" && base + 0 > 0 && bflag !~ /(fail|error)/ && (lossy || bflag !~ /nows/))
                        cell = cell sprintf(" (%.2fx)", m / base)
                    if (fl ~ /,cut,/) cell = cell " (cut)"
                    if (fl ~ /,nows,/) cell = cell " [no ws]"
                    if (match(fl, /,bs=[0-9]+,/)) cell = cell " [" substr(fl, RSTART + 1, RLENGTH - 2) "]"
                    if (key in nfail) cell = cell " [" nfail[key] " failed]"
                    if (match(fl, /,lost:[^,]*,/)) cell = cell " [gave up: " substr(fl, RSTART + 6, RLENGTH - 7) "]"
                }
                line = line OFS cell
            }
        }
        line = line OFS (id in cpu ? sprintf("%.0f %%", cpu[id]) : "-")
        cpus = ""
        for (i = 1; i <= nservers; i++) {
            m = median(scpu[server[i] SUBSEP id])
            cpus = cpus (i > 1 ? " / " : "") (m == "" ? "-" : sprintf("%.0f", m))
        }
        line = line OFS (id ~ /^raw/ ? "-" : cpus " %")
        row[++nrows] = line
    }
    END {
        ncols = split(row[1], h, OFS)
        for (r = 1; r <= nrows; r++) {
            n = split(row[r], c, OFS)
            for (k = 1; k <= n; k++) if (length(c[k]) > w[k]) w[k] = length(c[k])
        }
        for (r = 1; r <= nrows; r++) {
            n = split(row[r], c, OFS)
            out = ""
            for (k = 1; k <= ncols; k++) {
                if (md == 1) out = out "| " c[k] " "
                else out = out sprintf(k == 1 ? "%-" w[k] "s" : "  %-" w[k] "s", c[k])
            }
            if (md == 1) out = out "|"
            else sub(/ +$/, "", out)
            print out
            if (r == 1 && md == 1) {
                sep = "|"
                for (k = 1; k <= ncols; k++) sep = sep (k <= 2 ? "---|" : "--:|")
                print sep
            }
        }
        print ""
        print "Cells: median value, (ratio to " base_server "). \"ignores ws\": the server left windowsize out"
        print "of its OACK (so the row would repeat the one without windowsize); in the drop rows"
        print "such a server runs with windowsize 1, marked [no ws]. [bs=N]: it granted a smaller"
        print "blksize. (cut): the lossy transfer was still running after " limit " s (a firmware"
        print "case: its clients were cut at the end of the case); the figure is the verified"
        print "bytes per second until then. loadgen CPU: the load generator'"'"'s own"
        print "CPU time as a share of wall time (max over servers and runs; two threads for the"
        print "raw ceiling); near 100 % it, not the server, would be the limit. server CPU: each"
        print "server'"'"'s CPU time over the same wall time (median, in the order of the columns;"
        print "with its threads; - when unknown); near 100 % the server is the limit."
        print "[N failed]: N runs of that cell failed (reasons below); the median is over the others."
        print "[gave up: REASON:N]: N clients of a firmware case failed for REASON before the cut."
        for (k = 1; k <= nnotes; k++) print "Failure: " notes[k]
    }'
