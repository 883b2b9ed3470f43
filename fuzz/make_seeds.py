#!/usr/bin/env python3
"""Writes the hand-made seeds under fuzz/seeds/ (run from anywhere; overwrites them).

The session program format is documented at the top of fuzz_targets/session.rs.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    path = os.path.join(HERE, "seeds", target, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# parse_packet: one file per opcode, then malformed datagrams.
rrq = b"\x00\x01boot/pxelinux.0\x00octet\x00blksize\x001428\x00tsize\x000\x00windowsize\x0016\x00timeout\x003\x00"
packets = {
    "rrq_options": rrq,
    "rrq_netascii_utimeout": b"\x00\x01a.txt\x00NetASCII\x00utimeout\x0050000\x00BLKSIZE\x0065464\x00",
    "rrq_nul_padding": b"\x00\x01f\x00octet\x00blksize\x00512\x00\x00\x00\x00",
    "wrq": b"\x00\x02upload.bin\x00octet\x00",
    "data": b"\x00\x03\x00\x01hello, world",
    "data_empty": b"\x00\x03\xff\xff",
    "ack": b"\x00\x04\x00\x07",
    "error": b"\x00\x05\x00\x01File not found\x00",
    "error_no_nul": b"\x00\x05\x00\x63sloppy",
    "error_junk_after_nul": b"\x00\x05\x00\x08probe\x00junk",
    "oack": b"\x00\x06blksize\x001428\x00tsize\x00123456\x00",
    "bad_empty": b"",
    "bad_one_byte": b"\x00",
    "bad_unknown_opcode": b"\x00\x09\x00\x01",
    "bad_no_filename_nul": b"\x00\x01file",
    "bad_no_mode_nul": b"\x00\x01file\x00octet",
    "bad_no_value_nul": b"\x00\x01f\x00octet\x00blksize\x00512",
    "bad_empty_filename": b"\x00\x01\x00octet\x00",
    "bad_empty_mode": b"\x00\x01f\x00\x00",
    "bad_dangling_option": b"\x00\x01f\x00octet\x00blksize\x00",
    "bad_empty_option_name": b"\x00\x01f\x00octet\x00\x00x\x00",
    "bad_ack_trailing": b"\x00\x04\x00\x01\x00",
    "bad_ack_short": b"\x00\x04\x00",
    "bad_oack_dangling": b"\x00\x06a\x00",
    "rrq_600_bytes": b"\x00\x01" + b"a" * 600 + b"\x00octet\x00timeout\x003\x00",
}
for name, data in packets.items():
    write("parse_packet", name, data)

# session programs.
DATAGRAM, ACK, ACK_SEEN, ERROR, ADVANCE, TO_DEADLINE, SOURCE_READY, ABORT, ACK_LATEST = range(9)
NETASCII, SCRIPTED, RAW, TSIZE, MAIL, UNKNOWN_SIZE = 1, 2, 4, 8, 0x10, 0x20


def header(flags=0, retries=5, timeout=99, source_timeout=9, max_blksize=0, max_window=0,
           max_window_bytes=0):
    return struct.pack(">BBBBHBB", flags, retries, timeout, source_timeout, max_blksize,
                       max_window, max_window_bytes)


def options(blksize=0, windowsize=0, timeout=0, utimeout=0):
    return struct.pack(">HHBB", blksize, windowsize, timeout, utimeout)


def raw_options(raw):
    return bytes([len(raw)]) + raw


def source(length, motif=b""):
    return struct.pack(">HB", length, len(motif)) + motif


def script(ops):
    return bytes([len(ops)]) + bytes(ops)


def ev(tag, *args):
    out = bytes([tag])
    for a in args:
        out += a if isinstance(a, bytes) else bytes([a])
    return out


def u16(v):
    return struct.pack(">H", v)


write("session", "lockstep_no_options",
      header() + options() + source(1200)
      + ev(ACK_LATEST) + ev(ACK_LATEST) + ev(ACK_LATEST))
write("session", "oack_tsize_blksize",
      header(TSIZE) + options(blksize=512) + source(1100, b"hello\n")
      + ev(ACK, u16(0)) + ev(ACK, u16(1)) + ev(ACK, u16(1)) + ev(ACK, u16(2)) + ev(ACK, u16(3)))
write("session", "window4_lost_block",
      header() + options(blksize=8, windowsize=4) + source(100)
      + ev(ACK, u16(0)) + ev(ACK, u16(2)) + ev(ACK_LATEST) + ev(ADVANCE, u16(1000))
      + ev(ACK_LATEST) + ev(ACK_LATEST) + ev(ACK_LATEST))
write("session", "error8_after_oack_probe",
      header(TSIZE) + options() + source(3000) + ev(ERROR, u16(8)))
write("session", "error_after_oack",
      header() + options(blksize=1428) + source(3000) + ev(ERROR, u16(1)) + ev(ACK, u16(0)))
write("session", "timeouts_exhausted",
      header(retries=2) + options(windowsize=2) + source(2000)
      + ev(TO_DEADLINE) + ev(TO_DEADLINE) + ev(TO_DEADLINE) + ev(TO_DEADLINE))
write("session", "final_ack_missing",
      header(retries=1, timeout=0) + options() + source(10)
      + ev(ADVANCE, u16(10)) + ev(ADVANCE, u16(20)))
write("session", "raw_options",
      header(RAW, max_window=8)
      + raw_options(b"BLKSIZE\x001428\x00windowsize\x0016\x00tsize\x000\x00foo\x00bar\x00")
      + source(4096) + ev(ACK, u16(0)) + ev(ACK_SEEN, 3) + ev(ACK_LATEST) + ev(ACK_LATEST))
write("session", "netascii_scripted_would_block",
      header(NETASCII | SCRIPTED, source_timeout=50) + options(blksize=16) + source(200, b"ab\r\ncd\re\n")
      + script([3, 0x10, 3, 0x08, 4, 7, 4, 0x21])
      + ev(ACK, u16(0)) + ev(SOURCE_READY) + ev(ACK_LATEST) + ev(SOURCE_READY) + ev(ACK_LATEST)
      + ev(ADVANCE, u16(2000)) + ev(ACK_LATEST) + ev(ACK_LATEST) + ev(SOURCE_READY)
      + ev(ACK_LATEST) * 20)
write("session", "source_stalls",
      header(SCRIPTED | UNKNOWN_SIZE, source_timeout=2) + options() + source(50)
      + script([3, 3, 3, 3]) + ev(ADVANCE, u16(100)) + ev(TO_DEADLINE) + ev(TO_DEADLINE))
write("session", "read_error",
      header(SCRIPTED) + options(blksize=8) + source(64) + script([0, 6])
      + ev(ACK_LATEST) + ev(ACK_LATEST))
write("session", "garbage_then_data_packet",
      header() + options() + source(700)
      + ev(DATAGRAM, 1, b"\x00") + ev(DATAGRAM, 4, b"\x00\x04\x00\x09")
      + ev(DATAGRAM, 6, b"\x00\x03\x00\x01hi"))
write("session", "abort_midway",
      header(MAIL) + options(windowsize=3) + source(4000) + ev(ACK_LATEST) + ev(ABORT) + ev(ACK_LATEST))

# Regression input for a bug found while writing the seeds (see fuzz/README.md): in
# netascii mode, a source that returns Interrupted after a short read makes
# Netascii::read drop the bytes it had already translated into the caller's buffer.
write("session", "crash-netascii-interrupted-loses-bytes",
      header(NETASCII | SCRIPTED) + options() + source(4, b"a\n") + script([0, 5]) + ev(ACK_LATEST))

# server: steps (format at the top of fuzz_targets/server.rs). Files: 0 small, 1 multi,
# 2 empty, 3 block, 4 stall, 5 fail. Option sets 0..=7 as in OPTION_SETS there.
TO_LISTENER, TO_SESSION, RRQ, ACK, PAUSE = range(5)


def step(peer, op, *args):
    out = bytes([peer | (op << 2)])
    for a in args:
        out += a if isinstance(a, bytes) else bytes([a])
    return out


def datagram(peer, data, session=False):
    return step(peer, TO_SESSION if session else TO_LISTENER, len(data), data)


def rrq_step(peer, file, option_set):
    return step(peer, RRQ, file, option_set)


def ack_step(peer, back=0):
    return step(peer, ACK, back)


write("server", "lockstep_multi", rrq_step(0, 1, 0) + ack_step(0) * 7)
write("server", "oack_window", rrq_step(1, 1, 3) + ack_step(1) * 4)
write("server", "tsize_probe",
      rrq_step(0, 0, 1) + datagram(0, b"\x00\x05\x00\x08probe\x00", session=True))
write("server", "stall_then_pause", rrq_step(2, 4, 0) + step(2, PAUSE, 3) * 3)
write("server", "fail_source", rrq_step(3, 5, 0) + ack_step(3) * 3)
write("server", "garbage_listener",
      datagram(0, b"") + datagram(1, b"\x00") + datagram(2, b"\x00\x04\x00\x01")
      + datagram(3, b"\x00\x02f\x00octet\x00") + datagram(0, b"\x00\x01small\x00mail\x00"))
write("server", "four_peers",
      rrq_step(0, 1, 0) + rrq_step(1, 1, 3) + rrq_step(2, 0, 1) + rrq_step(3, 3, 2)
      + ack_step(0) + ack_step(1) + ack_step(2) + ack_step(3) + step(0, PAUSE, 3)
      + ack_step(0) + ack_step(1))
write("server", "timeouts", rrq_step(0, 1, 2) + step(0, PAUSE, 3) * 6)
write("server", "bad_options", rrq_step(0, 1, 7) + ack_step(0) * 3)
write("server", "data_in_session",
      rrq_step(0, 1, 0) + datagram(0, b"\x00\x03\x00\x01xx", session=True))
