"""Fuzz both agent ports of a real agent with 5,000 hostile frames of 12 kinds.

One ``python -m nodes.agent`` on loopback; a seeded generator builds frames of these
kinds (each on a fresh connection, four senders in parallel):

=====================  ==============================================================
truncated              a valid prefix and part of the header, then close
oversized              header length or payload length past the protocol's bounds
wrong magic            anything but ``TBF1`` in the prefix (HTTP, TLS, zeros)
bad json               random bytes, invalid UTF-8, a list, NaN
deep nesting           up to 30,000 levels of ``[``/``{"a":``
bad token              missing, wrong, lone surrogate, non-ASCII, huge
pre-auth payload       hello / unauthenticated requests declaring up to 512 MiB
valid then garbage     an authenticated request (or a full data handshake), then junk
random bytes           os.urandom of any length
bad handshake          hello without/with a bad nonce, auth with a wrong proof
bad arguments          authenticated requests with wrong types, ranges, names
bad descriptors        set_inputs / tensors with lying shapes, dtypes, byte counts
=====================  ==============================================================

The agent must stay up, log no traceback, answer a valid authenticated request and
complete a valid data-link handshake afterwards, and its RSS and fd count must stay
flat: the baseline is measured in this test after a warm-up of the same fuzz (2,000
frames: the allocator's per-thread arenas fill up to a plateau within about that
many), RSS may grow at most 5 % over it in the remaining 3,000 (and never peak above
1.5x; one pre-auth allocation of a declared payload would be 10x), and the fds must
come back to it. Bounded: 5,000 frames, about 10 s on two cores.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import psutil
import pytest

from nodes import protocol as P
from tests.integration.agentproc import AgentProc

pytestmark = pytest.mark.integration

FRAMES = 5000
WARMUP = 2000
SENDERS = 4
MiB = 1 << 20


def _frame(header: bytes, payload: bytes = b"", plen: int | None = None,
           magic: bytes = P.MAGIC, hlen: int | None = None) -> bytes:
    return (P.PREFIX.pack(magic, len(header) if hlen is None else hlen,
                          len(payload) if plen is None else plen) + header + payload)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: surrogates travel as \\udXXX


class Fuzzer:
    """Builds one hostile exchange per call: (port, bytes to send, then-step or None)."""

    def __init__(self, token: str, seed: int = 12) -> None:
        self.token, self.rng = token, random.Random(seed)
        self.kinds: list[tuple[str, Callable[[], tuple]]] = [
            ("truncated", self.truncated), ("oversized", self.oversized),
            ("wrong magic", self.wrong_magic), ("bad json", self.bad_json),
            ("deep nesting", self.deep), ("bad token", self.bad_token),
            ("pre-auth payload", self.preauth_payload),
            ("valid then garbage", self.valid_then_garbage), ("random bytes", self.random),
            ("bad handshake", self.bad_handshake), ("bad arguments", self.bad_args),
            ("bad descriptors", self.bad_descs),
        ]

    def port(self) -> str:
        return self.rng.choice(("control", "data"))

    def valid_request(self, op: str = "health", plen: int = 0, **args) -> bytes:
        return P.pack_header(P.request_header(op, self.token, **args), plen)

    def truncated(self):
        whole = self.valid_request() if self.rng.random() < 0.5 else P.pack_header(
            {"kind": "hello", "nonce": "00" * 32}, 0)
        return self.port(), whole[:self.rng.randrange(1, len(whole))], None

    def oversized(self):
        r = self.rng.random()
        if r < 0.4:
            data = _frame(b"{}", plen=P.MAX_PAYLOAD_BYTES + self.rng.randrange(1, 2**40))
        elif r < 0.8:
            data = _frame(b"", hlen=self.rng.choice([0, 1, P.MAX_HEADER_BYTES + 1, 2**32 - 1]))
        else:  # an authenticated part past the bound (pack_header would refuse it)
            data = _frame(_json(P.request_header("load_part", self.token)),
                          plen=P.MAX_PAYLOAD_BYTES + 1)
        return self.port(), data, None

    def wrong_magic(self):
        magic = self.rng.choice([b"HTTP", b"\x16\x03\x01\x02", b"\0\0\0\0", b"TBF2", b"tbf1"])
        return self.port(), _frame(b"{}", magic=magic), None

    def bad_json(self):
        body = self.rng.choice([
            os.urandom(self.rng.randrange(2, 300)), b"\xff\xfe\xfd", b"[1,2,3]", b'"str"',
            b'{"op":"health","token":NaN}', b'{"a":Infinity}', b"{" * 10, b"{}" * 100,
            b'{"op":"health"' + b" " * 1000])
        return self.port(), _frame(body), None

    def deep(self):
        depth = self.rng.choice([33, 100, 1000, 5000, 30000])
        body = (b"[" * depth if self.rng.random() < 0.5
                else b'{"a":' * depth + b"1" + b"}" * depth)
        if len(body) > P.MAX_HEADER_BYTES:
            body = body[:P.MAX_HEADER_BYTES]
        return self.port(), _frame(body), None

    def bad_token(self):
        token = self.rng.choice([None, "", "wrong", "\ud800", self.token + "\udfff",
                                 "t\u00e9", "x" * 100_000, 5, [self.token], self.token[:-1]])
        header = {"op": self.rng.choice(["health", "shutdown", "run", "load_part"]), "args": {}}
        if token is not None:
            header["token"] = token
        body = _json(header)[:P.MAX_HEADER_BYTES]
        return "control", _frame(body), None

    def preauth_payload(self):
        plen = self.rng.choice([1, 4096, 64 * MiB, 512 * MiB])
        if self.rng.random() < 0.5:
            header = {"kind": "hello", "nonce": "00" * 32} if self.rng.random() < 0.7 else {
                "kind": self.rng.choice(["tensors", "part", "fetch", "ping"])}
            return "data", _frame(_json(header), plen=plen) + b"\0" * 1024, None
        header = {"op": self.rng.choice(["load_part", "stage_part", "set_inputs"]),
                  "token": "wrong", "args": {}}
        return "control", _frame(_json(header), plen=plen) + b"\0" * 1024, None

    def valid_then_garbage(self):
        garbage = self.rng.choice([os.urandom(64), _frame(b"{oops"), b"GET / HTTP/1.0\r\n\r\n",
                                   _frame(b"[" * 5000)])
        if self.rng.random() < 0.5:
            return "control", self.valid_request(), garbage
        return "data", "handshake", garbage

    def random(self):
        return self.port(), os.urandom(self.rng.randrange(1, 5000)), None

    def bad_handshake(self):
        choice = self.rng.randrange(5)
        if choice == 0:
            return "data", _frame(_json({"kind": "hello"})), None
        if choice == 1:
            return "data", _frame(_json({"kind": "hello", "nonce": "\ud800" * 64})), None
        if choice == 2:
            return "data", _frame(_json({"kind": "hello", "token": self.token})), None
        if choice == 3:
            return "data", _frame(_json({"kind": "auth", "proof": "00" * 32})), None
        return "data", "bad proof", None

    def bad_args(self):
        op = self.rng.choice(sorted({"health", "run", "kpis", "load_part", "stage_part",
                                     "fetch_part", "connect_peer", "set_inputs", "profile_layers",
                                     "outputs", "nope", "__init__", "\ud800"}))
        junk = [None, -1, 0, 2**70, 1.5, float("inf"), "x", [], {}, [1, "a"], {"a": [1]},
                "\ud800", True]
        names = ["samples", "warmup", "role", "sha256", "runs", "threads", "host", "port",
                 "timeout", "sets", "sizes", "model_outputs", "codec", "max_seconds", "zzz"]
        args = {self.rng.choice(names): self.rng.choice(junk)
                for _ in range(self.rng.randrange(0, 4))}
        header = P.request_header(op, self.token, **args)
        body = json.dumps(header, allow_nan=True).encode()  # inf becomes Infinity: refused
        return "control", _frame(body), None

    def bad_descs(self):
        desc = {"name": self.rng.choice(["x", "", "\ud800", "n" * 600]),
                "dtype": self.rng.choice(["float32", "object", "V8", "<U4", "uint8", 5]),
                "shape": self.rng.choice([[2], [2**40, 0], [-1], [2**31, 2**31], "x",
                                          [1] * 9, [1, 2, 2, 1]]),
                "codec": self.rng.choice(["raw", "png", "jpeg", "zstd", ""]),
                "nbytes": self.rng.choice([0, 4, 8, -1, 2**40, "8"])}
        payload = os.urandom(8)
        if self.rng.random() < 0.5:
            args = {"sets": [{"tensors": [desc], "payload_bytes": 8}]}
            return "control", self.valid_request("set_inputs", plen=8, **args) + payload, None
        frame = _frame(_json({"kind": "tensors", "seq": 1, "tensors": [desc]}), payload)
        return "data", "handshake", frame

    def next(self) -> tuple[str, str, object, object]:
        name, make = self.kinds[self.rng.randrange(len(self.kinds))]
        return (name, *make())


def _handshake(sock: socket.socket, token: str) -> None:
    P.data_handshake_local(sock, token)


def _exchange(agent: AgentProc, token: str, port: str, first, then) -> None:
    """One connection: send, read what comes back (if anything), close. Never raises."""
    address = agent.control if port == "control" else agent.data
    try:
        with socket.create_connection(address, timeout=3) as s:
            if first == "handshake":
                _handshake(s, token)
            elif first == "bad proof":
                P.send_frame(s, {"kind": "hello", "nonce": secrets.token_hex(32)})
                P.recv_frame(s)
                P.send_frame(s, {"kind": "auth", "proof": secrets.token_hex(32)})
            else:
                s.sendall(first)
                if then is not None:
                    P.recv_frame(s)  # the valid request's answer
            if then is not None:
                s.sendall(then)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # the refusal (or EOF) — the agent is done with us
                pass
    except (OSError, P.FrameError):
        pass  # refused, reset, timed out: all fine for a fuzzer


class Watch:
    """Samples the agent's RSS every 20 ms in the background; keeps the peak."""

    def __init__(self, ps: psutil.Process) -> None:
        self.ps, self.peak, self.stop = ps, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.ps.memory_info().rss)
            except psutil.Error:
                return

    def close(self) -> int:
        self.stop.set()
        self.thread.join(2)
        return self.peak


def _settle(ps: psutil.Process, fds: int | None = None, timeout: float = 15.0) -> tuple[int, int]:
    """(rss, fds) once the agent's open connections are gone (fds stop falling)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = ps.num_fds()
        if (fds is not None and now <= fds) or (fds is None and now == last):
            break
        last = now
        time.sleep(0.25)
    return ps.memory_info().rss, ps.num_fds()


def _blast(agent: AgentProc, token: str, fuzzer: Fuzzer, n: int, seen: dict) -> None:
    jobs = []
    for _ in range(n):
        name, port, first, then = fuzzer.next()
        seen[name] = seen.get(name, 0) + 1
        jobs.append((port, first, then))
    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(lambda j: _exchange(agent, token, *j), jobs))


def test_fuzz_both_ports(tmp_path):
    token = secrets.token_hex(16)
    agent = AgentProc("fuzzed", tmp_path, token, "--preauth-s", "2")
    try:
        ps = psutil.Process(agent.proc.pid)
        fuzzer, seen = Fuzzer(token), {}
        t0 = time.monotonic()
        _blast(agent, token, fuzzer, WARMUP, seen)
        rss0, fds0 = _settle(ps)
        watch = Watch(ps)
        _blast(agent, token, fuzzer, FRAMES - WARMUP, seen)
        peak = watch.close()
        rss1, fds1 = _settle(ps, fds0)
        elapsed = time.monotonic() - t0
        print(f"fuzz: {sum(seen.values())} frames of {len(seen)} kinds in {elapsed:.1f} s; "
              f"RSS {rss0 >> 20} -> {rss1 >> 20} MiB (peak {peak >> 20}), fds {fds0} -> {fds1}; "
              f"{json.dumps(seen)}")

        assert agent.proc.poll() is None, agent.log()[-3000:]
        assert len(seen) >= 8 and sum(seen.values()) == FRAMES
        assert agent.client.health()["name"] == "fuzzed"  # a valid authenticated request
        with socket.create_connection(agent.data, timeout=5) as s:  # a valid handshake
            assert P.data_handshake_local(s, token)["node"] == "fuzzed"
        log = agent.log()
        assert "Traceback" not in log, log[-3000:]
        assert fds1 <= fds0, (fds0, fds1)
        assert rss1 <= rss0 * 1.05, (rss0, rss1)
        assert peak <= rss0 * 1.5, (rss0, peak)
    finally:
        agent.stop()
