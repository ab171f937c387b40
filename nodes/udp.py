"""RTP-style delivery of one direction's cut tensors over UDP: packetised, paced, authenticated, lossy.

With ``transport: udp`` the frame that carries the cut (the uplink ``tensors`` frame in
topology 1, the downlink ``result`` frame in topologies 2 and 3) still sends its small
JSON header over the TCP data link, with ``udp: {frame, packets, bytes, deadline_s}`` and
no payload; the payload goes as datagrams, never retransmitted:

    MAGIC "TBU1" | frame u32 | seq u32 | count u32 | offset u32 | total u32 | tag (16 B) | bytes

Each datagram carries at most ``payload_size(mtu)`` bytes, so it fits the path MTU
without IP fragmentation. ``tag`` is HMAC-SHA256 (truncated to 16 bytes) over the rest
of the datagram, keyed by ``session_key(token, nonce_local, nonce_remote)``: the run
token never crosses, both nonces are fresh per run (exchanged in ``begin``/``ready`` on
the authenticated TCP link), so a datagram from another run, a replay of an earlier
run or a forgery is dropped unread. The sender paces datagrams at the configured rate
of its direction (wire bytes incl. IP/UDP/Ethernet headers), so the shaper's queue is
not overrun by a burst; unpaced when the direction has no rate.

The receiver (``Receiver``) drains its socket in a thread into per-frame buffers (a
jitter buffer: in a stream the next frame's datagrams arrive while this node is still
busy with the current one); for the announced frame it waits until all datagrams
arrived, the deadline (counted from the header's arrival) passes, or the next frame
has started arriving and nothing of this one came for ``REORDER_S``; what is missing is
left as zero bytes and reported (``Received.lost``, per-byte mask). What happens to a tensor with holes
(zero-filled or the frame dropped, ``on_loss``) is ``nodes.pipeline``'s decision.

Socket buffers: the receiver asks for 4 MiB; an unprivileged process gets at most the
host's ``net.core.rmem_max``, and datagrams that overflow it are lost like any other
(counted as lost: that is what UDP does to a receiver that is too slow).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"TBU1"
HEAD = struct.Struct("!4sIIIII")
TAG_BYTES = 16
#: IPv4 + UDP headers, and the Ethernet header the shaper counts.
IP_UDP_BYTES, L2_BYTES = 28, 14
MAX_DEADLINE_S = 60.0
RCVBUF_BYTES = 4 * 2**20
#: A frame whose successor has started arriving is given up after this long without
#: a datagram of its own (before its deadline).
REORDER_S = 0.01
#: The pacer lets this many bytes go at once before it sleeps (a few datagrams).
PACING_BURST_BYTES = 16 * 1024


def payload_size(mtu: int | None) -> int:
    """Tensor bytes per datagram at this path MTU (1,432 at 1,500)."""
    return max(256, (mtu or 1500) - IP_UDP_BYTES - HEAD.size - TAG_BYTES)


def session_key(token: str, nonce_local: bytes, nonce_remote: bytes) -> bytes:
    return hmac.digest(token.encode("ascii"), b"udp|" + nonce_local + b"|" + nonce_remote, "sha256")


def _tag(key: bytes, head: bytes, data: memoryview) -> bytes:
    return hmac.digest(key, head + bytes(data), "sha256")[:TAG_BYTES]


def open_socket(host: str) -> socket.socket:
    """A UDP socket bound to ``host`` (the node's data address), ephemeral port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RCVBUF_BYTES)
    except OSError:
        pass
    sock.bind((host, 0))
    return sock


@dataclass
class Sent:
    packets: int
    wire_bytes: int


def send(sock: socket.socket, key: bytes, frame_id: int, views: list[memoryview], mtu: int | None,
         rate_bps: float | None) -> Sent:
    """Send one frame's payload (the concatenation of ``views``) as paced datagrams."""
    data = _joined(views)
    total = data.nbytes
    size = payload_size(mtu)
    count = max(1, -(-total // size))
    start, sent_bits, wire = time.monotonic(), 0.0, 0
    for seq in range(count):
        chunk = data[seq * size:(seq + 1) * size]
        head = HEAD.pack(MAGIC, frame_id & 0xFFFFFFFF, seq, count, seq * size, total)
        packet = head + _tag(key, head, chunk) + bytes(chunk)
        if rate_bps:
            _pace(start, sent_bits, rate_bps)
        try:
            sock.send(packet)
        except OSError:
            pass  # a full socket buffer or an ICMP error: a lost datagram, like the network's
        on_wire = len(packet) + IP_UDP_BYTES + L2_BYTES
        sent_bits += on_wire * 8
        wire += on_wire
    return Sent(count, wire)


def _pace(start: float, sent_bits: float, rate_bps: float) -> None:
    ahead = start + (sent_bits - PACING_BURST_BYTES * 8) / rate_bps - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)


def _joined(views: list[memoryview]) -> memoryview:
    if len(views) == 1:
        return memoryview(views[0]).cast("B")
    return memoryview(b"".join(bytes(memoryview(v).cast("B")) for v in views))


@dataclass
class Received:
    """One frame as gathered: payload (holes zeroed), which bytes arrived, counts."""

    payload: bytearray
    have: np.ndarray  # bool per byte
    packets: int
    received: int
    t_last_ns: int | None = None

    @property
    def lost(self) -> int:
        return self.packets - self.received

    def complete(self, start: int, end: int) -> bool:
        return bool(self.have[start:end].all())


@dataclass
class _Partial:
    total: int
    count: int
    frame: Received = field(init=False)
    seen: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.frame = Received(bytearray(self.total), np.zeros(self.total, dtype=bool), self.count, 0)
        self.seen = np.zeros(self.count, dtype=bool)


class Receiver:
    """A jitter buffer: a thread drains the socket into per-frame buffers, so datagrams
    of the next frames (a stream keeps sending while this node is busy) are kept, not
    lost. Only authenticated datagrams are kept; frames older than the last one taken
    are late and dropped; at most ``MAX_FRAMES`` frames and ``MAX_HELD_BYTES`` are held."""

    MAX_FRAMES = 16
    MAX_HELD_BYTES = 1 << 30

    def __init__(self, sock: socket.socket, key: bytes, clock: Any = time.monotonic_ns) -> None:
        self.sock, self.key, self.clock = sock, key, clock
        self.rejected = 0
        self._frames: dict[int, _Partial] = {}
        self._floor = 0  # frames below this were taken (or given up): late
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="udp-rx", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _drain(self) -> None:
        buf = bytearray(65536)
        view = memoryview(buf)
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                n = self.sock.recv_into(buf)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                if self.sock.fileno() < 0:
                    return
                continue  # ICMP errors surface here; the datagram is lost
            if not self._keep(view[:n]):
                self.rejected += 1

    def _keep(self, packet: memoryview) -> bool:
        if packet.nbytes < HEAD.size + TAG_BYTES:
            return False
        head = bytes(packet[:HEAD.size])
        magic, fid, seq, count, offset, total = HEAD.unpack(head)
        tag, chunk = bytes(packet[HEAD.size:HEAD.size + TAG_BYTES]), packet[HEAD.size + TAG_BYTES:]
        if magic != MAGIC or not hmac.compare_digest(tag, _tag(self.key, head, chunk)):
            return False  # garbage, another run's, or forged
        if seq >= count or offset + chunk.nbytes > total or count > total // 64 + 2:
            return False
        with self._cond:
            part = self._partial(fid, count, total)
            if part is None or part.seen[seq]:
                return False
            part.frame.payload[offset:offset + chunk.nbytes] = chunk
            part.frame.have[offset:offset + chunk.nbytes] = True
            part.seen[seq] = True
            part.frame.received += 1
            part.frame.t_last_ns = self.clock()
            self._cond.notify_all()
        return True

    def _partial(self, fid: int, count: int, total: int) -> _Partial | None:
        part = self._frames.get(fid)
        if part is not None:
            return part if (part.count, part.total) == (count, total) else None
        held = sum(p.total for p in self._frames.values())
        if fid < self._floor or len(self._frames) >= self.MAX_FRAMES or held + total > self.MAX_HELD_BYTES:
            return None
        part = self._frames[fid] = _Partial(total, count)
        return part

    def _overtaken(self, fid: int, part: _Partial | None) -> bool:
        """A later frame has started arriving and nothing came for this one for
        ``REORDER_S``: what is missing is lost (a jitter buffer's playout decision;
        the sender sends frames in order, paced)."""
        if not any(f > fid for f in self._frames):
            return False
        last = part.frame.t_last_ns if part is not None else None
        return last is None or self.clock() - last > REORDER_S * 1e9

    def receive(self, frame_id: int, total: int, packets: int, deadline_s: float) -> Received:
        """The datagrams of ``frame_id`` once all ``packets`` arrived or ``deadline_s`` passed."""
        end = time.monotonic() + min(max(deadline_s, 0.001), MAX_DEADLINE_S)
        fid = frame_id & 0xFFFFFFFF
        with self._cond:
            while True:
                part = self._frames.get(fid)
                if part is not None and part.frame.received >= packets or self._overtaken(fid, part):
                    break
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, REORDER_S))
            part = self._frames.pop(fid, None)
            self._floor = max(self._floor, fid + 1)
            for old in [f for f in self._frames if f < self._floor]:
                del self._frames[old]
        if part is None or (part.count, part.total) != (packets, total):
            return Received(bytearray(total), np.zeros(total, dtype=bool), packets, 0)
        return part.frame


def nonce() -> bytes:
    return secrets.token_bytes(16)
