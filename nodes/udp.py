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

The receiver gathers datagrams of the announced frame until all arrived or the deadline
(counted from the header's arrival) passes; what is missing is left as zero bytes and
reported (``Received.lost``, per-byte mask). What happens to a tensor with holes
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
    rejected: int = 0  # datagrams that failed the tag or did not belong to this frame
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.packets - self.received

    def complete(self, start: int, end: int) -> bool:
        return bool(self.have[start:end].all())


def receive(sock: socket.socket, key: bytes, frame_id: int, total: int, packets: int, deadline_s: float,
            clock: Any = time.monotonic_ns) -> Received:
    """Gather the datagrams of ``frame_id`` until all ``packets`` arrived or ``deadline_s`` passed."""
    out = Received(bytearray(total), np.zeros(total, dtype=bool), packets, 0)
    seen = np.zeros(packets, dtype=bool)
    end = time.monotonic() + min(max(deadline_s, 0.001), MAX_DEADLINE_S)
    buf = bytearray(65536)
    view = memoryview(buf)
    while out.received < packets:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            n = sock.recv_into(buf)
        except (socket.timeout, BlockingIOError):
            break
        except OSError:
            continue  # ICMP errors surface here; the datagram is lost
        if not _accept(out, seen, key, frame_id, total, packets, view[:n]):
            out.rejected += 1
            continue
        out.t_last_ns = clock()
    return out


def _accept(out: Received, seen: np.ndarray, key: bytes, frame_id: int, total: int, packets: int,
            packet: memoryview) -> bool:
    if packet.nbytes < HEAD.size + TAG_BYTES:
        return False
    head = bytes(packet[:HEAD.size])
    magic, fid, seq, count, offset, tot = HEAD.unpack(head)
    if magic != MAGIC or fid != frame_id & 0xFFFFFFFF or count != packets or tot != total or seq >= packets:
        return False  # another frame's straggler, or garbage
    tag, chunk = bytes(packet[HEAD.size:HEAD.size + TAG_BYTES]), packet[HEAD.size + TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(key, head, chunk)) or offset + chunk.nbytes > total or seen[seq]:
        return False
    out.payload[offset:offset + chunk.nbytes] = chunk
    out.have[offset:offset + chunk.nbytes] = True
    seen[seq] = True
    out.received += 1
    return True


def nonce() -> bytes:
    return secrets.token_bytes(16)
