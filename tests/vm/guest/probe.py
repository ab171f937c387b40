"""Traffic for the guest's measurements: ICMP ping and a TCP source/sink.

Owns: putting packets on the shaped veth and timing them. Runs as its own
process inside one namespace (``ip netns exec NS python3 -m
tests.vm.guest.probe ...``) and prints one JSON object on stdout. All clocks
are CLOCK_MONOTONIC, which is system-wide, so times from different namespaces
and from the stepper compare directly.

Subcommands:
  ping HOST N INTERVAL_S         N ICMP echoes; per-probe send time and RTT (None = lost)
  sink PORT                      accept one TCP connection, read to EOF, report a timeline
  source HOST PORT SECONDS       send as fast as TCP allows for SECONDS, then close
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import time

PAD = 56              # bytes of ICMP payload after the sequence number
SO_TIMESTAMPNS = 35   # Linux; also the SCM type of the ancillary timestamp


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(host: str, count: int, interval_s: float, linger_s: float = 1.5) -> dict:
    """ICMP echo ``count`` times every ``interval_s``; RTT per probe, None when lost.

    The peer's kernel answers (no user space there), and the reply's arrival
    time is the kernel's receive timestamp (SO_TIMESTAMPNS), so the RTT holds
    no scheduling delay of this process on the way back: under TCG that delay
    is milliseconds and would swamp a 2 ms tolerance.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.setblocking(False)
    ident = os.getpid() & 0xFFFF
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent = [0.0] * count           # CLOCK_MONOTONIC, comparable across processes
    sent_real = [0.0] * count      # CLOCK_REALTIME, the clock of kernel timestamps
    rtt: list[float | None] = [None] * count
    start = time.monotonic()
    seq, end = 0, None
    while True:
        now = time.monotonic()
        if seq < count and now >= start + seq * interval_s:
            body = struct.pack("!I", seq) + b"\0" * PAD
            head = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(head + body), ident, seq & 0xFFFF) + body
            sent[seq] = time.monotonic()
            sent_real[seq] = time.time()
            sock.sendto(packet, (host, 0))
            seq += 1
            continue
        if seq >= count and end is None:
            end = now + linger_s
        if end is not None and now >= end:
            break
        wake = start + seq * interval_s if seq < count else end
        for _ in sel.select(max(0.0, wake - now)):
            while True:
                try:
                    data, anc, _, _ = sock.recvmsg(2048, 256)
                except BlockingIOError:
                    break
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, who = struct.unpack_from("!BBHH", data, ihl)
                if kind != 0 or who != ident:
                    continue
                (n,) = struct.unpack_from("!I", data, ihl + 8)
                stamp = next((struct.unpack("qq", d[:16]) for lvl, typ, d in anc
                              if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), None)
                got = stamp[0] + stamp[1] * 1e-9 if stamp else time.time()
                if n < count and rtt[n] is None:
                    rtt[n] = got - sent_real[n]
    return {"sent": sent, "rtt": rtt, "interval_s": interval_s}


def sink(port: int, bucket_s: float = 0.1) -> dict:
    """One TCP connection read to EOF; bytes per ``bucket_s`` from the first byte."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = srv.accept()
    total, first, last = 0, None, None
    buckets: list[int] = []
    error = None
    try:
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            now = time.monotonic()
            if first is None:
                first = now
            last = now
            total += len(data)
            i = int((now - first) / bucket_s)
            buckets.extend([0] * (i + 1 - len(buckets)))
            buckets[i] += len(data)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    conn.close()
    return {"bytes": total, "first": first, "last": last, "bucket_s": bucket_s,
            "buckets": buckets, "error": error}


def source(host: str, port: int, seconds: float) -> dict:
    """Send for ``seconds``; an error (reset, broken pipe) is reported, not raised."""
    sock = socket.create_connection((host, port), timeout=10)
    chunk = b"\0" * (1 << 16)
    sent, error = 0, None
    start = stopped = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            sent += sock.send(chunk)
        stopped = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the sink to finish reading (it closes at EOF)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return {"bytes": sent, "start": start, "stopped": stopped, "end": time.monotonic(), "error": error}


def main(argv: list[str]) -> None:
    cmd, rest = argv[0], argv[1:]
    if cmd == "ping":
        out = ping(rest[0], int(rest[1]), float(rest[2]))
    elif cmd == "sink":
        out = sink(int(rest[0]))
    elif cmd == "source":
        out = source(rest[0], int(rest[1]), float(rest[2]))
    else:
        raise SystemExit(f"unknown probe command {cmd!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
