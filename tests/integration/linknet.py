"""Two network namespaces joined by a veth, and timed TCP transfers across it.

Owns: test/bench plumbing for the link layer — namespaces and a veth pair with
unique ``tb`` + random names (so helpers working in parallel on this machine
never collide), removed on exit even after a failure, and a TCP transfer timed
on one clock (both sockets live in this process: pyroute2 creates each in its
namespace). Used by tests/integration/test_link_shaper.py and bench/link_bench.py.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pyroute2 import IPRoute, netns

ADDR_A, ADDR_B, PREFIX = "10.99.0.1", "10.99.0.2", 30


@dataclass
class Pair:
    """``ns_a``/``dev_a`` (the "local" end) and ``ns_b``/``dev_b``."""

    ns_a: str
    ns_b: str
    dev_a: str
    dev_b: str
    addr_a: str = ADDR_A
    addr_b: str = ADDR_B


def _configure(ns: str, dev: str, addr: str) -> None:
    with IPRoute(netns=ns, flags=0) as ipr:
        idx = ipr.link_lookup(ifname=dev)[0]
        ipr.addr("add", index=idx, address=addr, prefixlen=PREFIX)
        ipr.link("set", index=idx, state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")


@contextmanager
def veth_pair() -> Iterator[Pair]:
    """Make two namespaces and a veth between them; remove all on exit."""
    tag = secrets.token_hex(3)
    pair = Pair(f"tb{tag}a", f"tb{tag}b", f"tb{tag}va", f"tb{tag}vb")
    made: list[str] = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            netns.create(ns)
            made.append(ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=pair.dev_a, kind="veth", peer=pair.dev_b)
            for dev, ns in ((pair.dev_a, pair.ns_a), (pair.dev_b, pair.ns_b)):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], net_ns_fd=ns)
        _configure(pair.ns_a, pair.dev_a, pair.addr_a)
        _configure(pair.ns_b, pair.dev_b, pair.addr_b)
        yield pair
    finally:
        # Removing a namespace destroys its end of the veth, which takes the
        # peer with it; a veth never moved lives in the host: remove it too.
        with IPRoute() as ipr:
            for dev in (pair.dev_a, pair.dev_b):
                for idx in ipr.link_lookup(ifname=dev):
                    try:
                        ipr.link("del", index=idx)
                    except Exception:
                        pass
        for ns in made:
            try:
                netns.remove(ns)
            except OSError:
                pass


def ns_socket(ns: str) -> socket.socket:
    return netns.create_socket(ns, socket.AF_INET, socket.SOCK_STREAM, flags=0)


@dataclass
class Transfer:
    nbytes: int
    seconds: float          # first byte sent -> last byte received
    connect_s: float        # TCP handshake time (≈ one RTT)


def tcp_transfer(pair: Pair, nbytes: int, timeout: float = 60.0) -> Transfer:
    """Send ``nbytes`` from ns_a to ns_b over a fresh TCP connection and time it."""
    server = ns_socket(pair.ns_b)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((pair.addr_b, 0))
    server.listen(1)
    server.settimeout(timeout)
    port = server.getsockname()[1]
    done: dict[str, float] = {}

    def receive() -> None:
        conn, _ = server.accept()
        conn.settimeout(timeout)
        got = 0
        with conn:
            while got < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
        done["end"], done["got"] = time.monotonic(), got

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    client = ns_socket(pair.ns_a)
    client.settimeout(timeout)
    payload = b"\x5a" * nbytes
    try:
        t0 = time.monotonic()
        client.connect((pair.addr_b, port))
        t1 = time.monotonic()
        client.sendall(payload)
        thread.join(timeout)
    finally:
        client.close()
        server.close()
    if done.get("got") != nbytes:
        raise RuntimeError(f"transfer incomplete: {done.get('got')} of {nbytes} bytes")
    return Transfer(nbytes, done["end"] - t1, t1 - t0)


def ping_rtt(pair: Pair, count: int = 5) -> float:
    """Median TCP-handshake RTT from ns_a to ns_b (no ICMP tooling needed)."""
    rtts = sorted(tcp_transfer(pair, 1).connect_s for _ in range(count))
    return rtts[len(rtts) // 2]


def iperf3_goodput(pair: Pair, seconds: float = 3.0) -> float:
    """iperf3 goodput (bit/s, receiver side) from ns_a to ns_b."""
    server = subprocess.Popen(["ip", "netns", "exec", pair.ns_b, "iperf3", "-s", "-1", "-B", pair.addr_b],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import json

        for _ in range(50):
            out = subprocess.run(["ip", "netns", "exec", pair.ns_a, "iperf3", "-c", pair.addr_b, "-t",
                                  str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
            try:
                result = json.loads(out.stdout)
            except ValueError:
                result = {"error": out.stderr}
            if "error" not in result:
                return float(result["end"]["sum_received"]["bits_per_second"])
            time.sleep(0.1)  # server not listening yet
        raise RuntimeError(f"iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    finally:
        server.kill()
        server.wait()
