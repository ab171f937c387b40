"""Traffic for the guest's measurements: ICMP ping and a TCP source/sink.

Owns: putting packets on the shaped veth and timing them. Runs as its own
process inside one namespace (``ip netns exec NS python3 -m
tests.vm.guest.probe ...``) and prints one JSON object on stdout. All clocks
are CLOCK_MONOTONIC, which is system-wide, so times from different namespaces
and from the stepper compare directly.

Subcommands:
  ping HOST N INTERVAL_S         N ICMP echoes; per-probe send time and RTT (None = lost)
                                 (a "ready" line first, when the first probe is due)
  sink PORT                      accept one TCP connection, read to EOF, report a timeline
  source HOST PORT SECONDS       send as fast as TCP allows for SECONDS, then close
                                 (a "connected" line first)
  lateness MAX_SECONDS           sleep 5-40 ms over and over until SIGUSR1 (or MAX_SECONDS);
                                 how late each sleep ended
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

PAD = 56              # bytes of ICMP payload after the sequence number
SO_TIMESTAMPNS = 35   # Linux; also the SCM type of the ancillary timestamp
SINK_BUCKET_S = 0.01  # fine enough for the judge to re-bin into any interval it needs
# The sleeps the lateness probe cycles through: the delays the checks set
# (netem holds packets on hrtimers of these lengths).
LATENESS_SLEEPS_S = (0.005, 0.010, 0.020, 0.030, 0.040)
_PR_SET_TIMERSLACK = 29


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
    # Python starts in ~1 s under TCG, several on a loaded host: callers wait
    # for this line instead of guessing how long to sleep.
    print(json.dumps({"ready": True}), flush=True)
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
            _read_replies(sock, ident, sent_real, rtt)
    # A reply the kernel queued while this process waited for a CPU past the
    # linger is no loss (a starved guest once reported 78 % for 10 %): read
    # what is queued once more; its kernel timestamp is still exact.
    _read_replies(sock, ident, sent_real, rtt)
    return {"sent": sent, "rtt": rtt, "interval_s": interval_s}


def _read_replies(sock: socket.socket, ident: int, sent_real: list[float], rtt: list[float | None]) -> None:
    """Read every queued echo reply of ours into ``rtt`` (non-blocking)."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(2048, 256)
        except BlockingIOError:
            return
        ihl = (data[0] & 0x0F) * 4
        kind, _, _, who = struct.unpack_from("!BBHH", data, ihl)
        if kind != 0 or who != ident:
            continue
        (n,) = struct.unpack_from("!I", data, ihl + 8)
        stamp = next((struct.unpack("qq", d[:16]) for lvl, typ, d in anc
                      if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS), None)
        got = stamp[0] + stamp[1] * 1e-9 if stamp else time.time()
        if n < len(rtt) and rtt[n] is None:
            rtt[n] = got - sent_real[n]


def sink(port: int, bucket_s: float = SINK_BUCKET_S) -> dict:
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
    # The segment payload actually used (MSS less TCP options such as
    # timestamps): what the judge's framing-aware ideal goodput needs.
    mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    print(json.dumps({"connected": True}), flush=True)  # the caller times from here, not from exec
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
    return {"bytes": sent, "start": start, "stopped": stopped, "end": time.monotonic(), "error": error,
            "mss": mss}


def lateness(max_seconds: float) -> dict:
    """How late sleeps of the checks' durations end, until SIGUSR1 or ``max_seconds``.

    Runs beside a measurement so it sees the same load: under TCG a host
    that deschedules a vCPU thread makes every guest timer late, and that
    is the host's doing, not the shaper's. What this process sees is what a
    Python thread waking on a timer sees (the trace stepper); the kernel's
    side of the same sleeps is read from the kernel's trace
    (``guest/timers.py``). Timer slack is set to 1 ns because the kernel's
    qdisc timers have none.
    """
    ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    stop = []
    # A sleep interrupted by the signal resumes (PEP 475): no sample is cut short.
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(True))
    print(json.dumps({"ready": True}), flush=True)
    at, slept, late = [], [], []
    end = time.monotonic() + max_seconds
    i = 0
    while not stop and time.monotonic() < end:
        d = LATENESS_SLEEPS_S[i % len(LATENESS_SLEEPS_S)]
        i += 1
        t = time.monotonic()
        time.sleep(d)
        at.append(t)
        slept.append(d)
        late.append(time.monotonic() - t - d)
    return {"at": at, "sleep_s": slept, "late_s": late}


# --- the data path's UDP delivery (nodes/udp.py) ----------------------------------------

def _udp_pattern(total: int) -> bytes:
    return bytes(i % 251 for i in range(total))


def udp_sink(host: str, key_hex: str, frames: int, total: int, deadline_s: float) -> dict:
    """Receive ``frames`` frames with the project's jitter buffer; per frame what
    arrived, whether the holes are zero and the rest intact, how long it waited.
    Prints the port, then starts on a line on stdin (as the data path starts a
    frame's deadline when its header arrives, not before the sender exists)."""
    import numpy as np

    from nodes import udp

    sock = udp.open_socket(host)
    receiver = udp.Receiver(sock, bytes.fromhex(key_hex))
    packets = -(-total // udp.payload_size(None))
    expect = np.frombuffer(_udp_pattern(total), dtype=np.uint8)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    sys.stdin.readline()  # "go": the source is up (imports under TCG take seconds)
    rows = []
    try:
        for fid in range(frames):
            t0 = time.monotonic()
            got = receiver.receive(fid, total, packets, deadline_s)
            waited = time.monotonic() - t0
            data = np.frombuffer(bytes(got.payload), dtype=np.uint8)
            holes_zero = bool((data[~got.have] == 0).all())
            intact = bool((data[got.have] == expect[got.have]).all())
            rows.append({"frame": fid, "packets": got.packets, "received": got.received, "lost": got.lost,
                         "holes_zero": holes_zero, "intact": intact, "waited_s": waited})
    finally:
        receiver.close()
        sock.close()
    return {"frames": rows, "rejected": receiver.rejected, "packets_per_frame": packets}


def udp_source(host: str, port: int, key_hex: str, frames: int, total: int, rate_bps: float,
               gap_s: float) -> dict:
    """Send ``frames`` frames paced at ``rate_bps``, ``gap_s`` apart, and one forged datagram;
    prints ``ready`` and starts on a line on stdin."""
    from nodes import udp

    sock = udp.open_socket("0.0.0.0")
    sock.connect((host, port))
    view = memoryview(_udp_pattern(total))
    forged = udp.HEAD.pack(udp.MAGIC, 0, 0, 1, 0, 16) + bytes(udp.TAG_BYTES) + bytes(16)
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the sink is receiving
    sock.send(forged)  # a datagram without the run's key: must be dropped unread
    sent = 0
    for fid in range(frames):
        sent += udp.send(sock, bytes.fromhex(key_hex), fid, [view], None, rate_bps).packets
        time.sleep(gap_s)
    sock.close()
    return {"packets_sent": sent}


def main(argv: list[str]) -> None:
    cmd, rest = argv[0], argv[1:]
    if cmd == "ping":
        out = ping(rest[0], int(rest[1]), float(rest[2]))  # printed after its "ready" line
    elif cmd == "sink":
        out = sink(int(rest[0]))
    elif cmd == "source":
        out = source(rest[0], int(rest[1]), float(rest[2]))
    elif cmd == "lateness":
        out = lateness(float(rest[0]))
    elif cmd == "udp_sink":
        out = udp_sink(rest[0], rest[1], int(rest[2]), int(rest[3]), float(rest[4]))
    elif cmd == "udp_source":
        out = udp_source(rest[0], int(rest[1]), rest[2], int(rest[3]), int(rest[4]), float(rest[5]),
                         float(rest[6]))
    else:
        raise SystemExit(f"unknown probe command {cmd!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
