"""Traffic for the guest's measurements: UDP echo/ping and a TCP source/sink.

Owns: putting packets on the shaped veth and timing them. Runs as its own
process inside one namespace (``ip netns exec NS python3 -m
tests.vm.guest.probe ...``) and prints one JSON object on stdout. All clocks
are CLOCK_MONOTONIC, which is system-wide, so times from different namespaces
and from the stepper compare directly.

Subcommands:
  echo PORT                      UDP echo server until killed
  ping HOST PORT N INTERVAL_S    N probes; per-probe send time and RTT (None = lost)
  sink PORT                      accept one TCP connection, read to EOF, report a timeline
  source HOST PORT SECONDS       send as fast as TCP allows for SECONDS, then close
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time

HEADER = struct.Struct("!Id")  # sequence number, send time
PAD = 64                       # bytes of payload per probe


def echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    while True:
        data, addr = sock.recvfrom(2048)
        sock.sendto(data, addr)


def ping(host: str, port: int, count: int, interval_s: float, linger_s: float = 1.5) -> dict:
    """Send ``count`` probes every ``interval_s``; RTT per probe, None when lost."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent = [0.0] * count
    rtt: list[float | None] = [None] * count
    start = time.monotonic()
    seq = 0
    end = None
    while True:
        now = time.monotonic()
        if seq < count and now >= start + seq * interval_s:
            sent[seq] = now
            sock.send(HEADER.pack(seq, now) + b"\0" * PAD)
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
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                got = time.monotonic()
                n, t0 = HEADER.unpack_from(data)
                if n < count and rtt[n] is None:
                    rtt[n] = got - t0
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
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            sent += sock.send(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the sink to finish reading (it closes at EOF)
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return {"bytes": sent, "start": start, "end": time.monotonic(), "error": error}


def main(argv: list[str]) -> None:
    cmd, rest = argv[0], argv[1:]
    if cmd == "echo":
        echo(int(rest[0]))
        return
    if cmd == "ping":
        out = ping(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    elif cmd == "sink":
        out = sink(int(rest[0]))
    elif cmd == "source":
        out = source(rest[0], int(rest[1]), float(rest[2]))
    else:
        raise SystemExit(f"unknown probe command {cmd!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
