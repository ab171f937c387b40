"""The sample flow across the data plane, and its timings.

Local side (``LocalLink``; a run of samples is ``nodes.runs``): run the head on the input, encode the cut
tensors, send them up; wait for the remote's result frame, decode it. Remote side
(``nodes.answer.serve_data_connection``): decode, run the tail, encode the outputs plus every
received cut tensor that is a model output, send them down. Both sides stamp
``time.monotonic_ns`` (CLOCK_MONOTONIC); the remote's stamps travel back in the result
header so the local side computes every timing of the measurement contract:

=================  =================================================================
``head_s``         set inputs + invoke + read outputs of the head part (0 at k = 0)
``encode_s``       encoding the cut tensors (raw: a memoryview; PNG/JPEG: real work)
``uplink_s``       first byte out at local -> last byte received by the remote's kernel
``remote_rx_lag_s``  remote: kernel received the last byte -> the agent had read it
``remote_decode_s``  remote: decoding the cut tensors
``tail_s``         remote: invoke of the tail part
``remote_encode_s``  remote: encoding the result
``downlink_s``     first byte out at remote -> last byte received by the local kernel
``local_rx_lag_s``   local: kernel received the last byte -> the agent had read it
``decode_s``       local: decoding the result
``e2e_s``          start of head -> final output decoded locally
=================  =================================================================

"Last byte in" is the kernel's receive timestamp of the last segment
(SO_TIMESTAMPNS), so the link times hold no scheduling delay of the receiving
process; that delay (a throttled or busy node reading late) is reported on its
own as ``*_rx_lag_s``. Without kernel stamps the lag is 0 and the link time
ends when the process read the byte, as before.

Per sample each side also reports its cgroup's CPU counters over the sample
(``nodes.cpu_account``): ``local_cpu_s``, ``local_throttled_periods``,
``local_throttled_s`` and the same for ``remote_`` (the remote's window runs from
its previous result to this one). With them, the maximum segment size and MTU of
each direction's socket (``uplink_mss`` ...), from which the orchestrator
computes the framing-aware ideal transfer time.

Clocks: two nodes on one host (containers, namespaces) share CLOCK_MONOTONIC, so the
one-way times are exact differences (``clock: shared``). That is detected at hello
(same ``boot_id`` and same time namespace) unless the orchestrator says otherwise.
Otherwise the remote's clock offset is estimated NTP-style from the fastest of a few
small ping round trips at the start of every run, one-way times are corrected with it
and marked ``clock: derived`` (their sum is exact; the split assumes the ping's path
delay is symmetric). The orchestrator may hand in an offset it measured itself
(``RunSpec.offset_ns``, over the unshaped control plane, with a known uncertainty:
``testbed.deploy.clock``); it is then used as given, the rows ``derived``.

Which tensors cross: local sends ``head outputs + model inputs the tail reads`` (exactly
the manifest's cut); the remote tells its tail's inputs in the ``ready`` frame. The
remote returns its tail outputs plus received tensors that are model outputs: those the
tail does not read, plus any named in ``model_outputs``. With no head (k = 0) the input
itself crosses, encoded with ``input_encoding``; with no tail (k = N) nothing crosses.

**Topologies** (``RunSpec.topology``; clause 2 of the evaluation framework):

1. source and head on the UE (local), tail on the remote: the cut goes *up* (above);
2. source on the UE, head on the remote, tail on the UE: the input goes up (with
   ``input_encoding``), the remote runs the head, the cut comes *down* (with ``codec``)
   and the local runs the tail;
3. source and head on the remote, tail on the UE: the local sends a small ``trigger``
   (which input), the remote takes that input from its own inputs, runs the head and
   sends the cut down. ``e2e_s`` runs from the remote's head start (clock-corrected)
   to the tail's output on the UE; ``uplink_s`` is 0 (the trigger is not data).

In every topology ``head_s`` / ``tail_s`` are the invokes of the head and tail part
wherever they run, ``encode_s`` the local's encoding, ``remote_encode_s`` the remote's,
and ``head_cpu_s`` / ``tail_cpu_s`` the CPU time (user + sys) the node running that
part used during the invoke (its cgroup's counter; the process's when there is none).

**Codecs** (``nodes.tensor_codecs``) apply where the cut is produced: the local in
topology 1, the remote in 2 and 3 (the codec travels in every frame, so the same link
can carry a reference pass and the measured samples). **Fidelity**
(``RunSpec.fidelity``): before the samples, each input runs once uncompressed (raw,
TCP): those final outputs are the reference every sample on that input is compared
with (``nodes.fidelity``). **UDP** (``RunSpec.transport``): the frame carrying the
cut sends its payload as datagrams (``nodes.udp``); missing bytes are zero-filled or
the sample is dropped (``on_loss``). **Streams** are ``nodes.stream``'s, which drives
the two halves of a sample here (``send_half`` / ``receive_half``) from two threads.

This module owns the data-plane conversation's local side and what both sides share
(running a part, tensors over TCP or UDP, link facts); ``nodes.answer`` the remote's
side; ``nodes.agent`` the servers, the loaded parts and the control operations;
``nodes.protocol`` the frame format.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from nodes import protocol as P
from nodes import udp
from nodes.codecs import IMAGE_CODECS
from nodes.cpu_account import NO_SNAPSHOT, CpuAccount, CpuSnapshot
from nodes.fidelity import compare, json_safe
from nodes.part import Part, sha256_of
from nodes.tensor_codecs import CodecRegistry, parse_chain

CODECS = CodecRegistry(IMAGE_CODECS)
TOPOLOGIES = (1, 2, 3)
TRANSPORTS = ("tcp", "udp")
ON_LOSS = ("zero", "drop")
log = logging.getLogger("nodes.agent")
PING_COUNT = 8
#: A data-plane read or write that stalls this long means the peer is gone. Generous:
#: one frame at 1 Mbit/s of a 13 MB PoseNet head takes ~100 s.
IO_TIMEOUT_S = 900.0
now = time.monotonic_ns


class StepError(Exception):
    """An operation failed for a reason the caller should read (sent back as an error)."""


def clock_identity() -> dict[str, str]:
    """What decides whether two processes share CLOCK_MONOTONIC: boot and time namespace."""
    ident = {}
    try:
        ident["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        ident["boot_id"] = ""
    try:
        import os
        ident["timens"] = os.readlink("/proc/self/ns/time")
    except OSError:
        ident["timens"] = ""  # kernel without time namespaces: all share one
    return ident


def same_clock(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    return bool(a.get("boot_id")) and a.get("boot_id") == b.get("boot_id") \
        and a.get("timens") == b.get("timens")


# Linux socket options for the path MTU of a connected socket.
_IP_MTU = getattr(socket, "IP_MTU", 14)


def link_facts(sock: socket.socket) -> dict[str, int | None]:
    """Maximum segment size and path MTU of a connected TCP socket (None: unknown).

    Together they give the bytes each full segment occupies on the wire, which
    the framing-aware ideal transfer time needs (1448 + 52 + 14 on Ethernet with
    TCP timestamps)."""
    out: dict[str, int | None] = {"mss": None, "mtu": None}
    try:
        out["mss"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    except OSError:
        pass
    if sock.family == socket.AF_INET:
        try:
            out["mtu"] = sock.getsockopt(socket.IPPROTO_IP, _IP_MTU)
        except OSError:
            pass
    return out


_TCPI_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in Linux's struct tcp_info


def retransmits(sock: socket.socket) -> int | None:
    """Segments this socket has retransmitted so far (None where TCP_INFO lacks it).

    A sample's retransmissions are the link's loss as TCP saw it: netem loss, a
    queue overflow, or the interface going down and up (a link flap)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _TCPI_TOTAL_RETRANS + 4:
        return None
    return int.from_bytes(info[_TCPI_TOTAL_RETRANS:_TCPI_TOTAL_RETRANS + 4], "little")


# --------------------------------------------------------------------------- shared helpers

def part_run(part: Part, feed: Mapping[str, np.ndarray], cpu: CpuAccount,
             ) -> tuple[dict[str, np.ndarray], int, int, float | None]:
    """Invoke a part; returns (outputs, start ns, end ns, CPU seconds its node used meanwhile)."""
    c0, p0 = cpu.snapshot().usage_ns, time.process_time_ns()
    t0 = now()
    out = part.run(feed)
    t1 = now()
    c1 = cpu.snapshot().usage_ns
    used = (c1 - c0) if c0 is not None and c1 is not None else time.process_time_ns() - p0
    return out, t0, t1, max(0, used) / 1e9


@dataclass
class UdpPeer:
    """One side's UDP path for a run: socket (connected to the peer), key, how to send."""

    sock: socket.socket
    key: bytes
    mtu: int | None = None
    rate_bps: float | None = None   # pacing of what this side sends
    on_loss: str = "zero"
    deadline_s: float = 0.1        # added to the ideal transfer time (a frame period)
    frames: int = 0
    receiver: udp.Receiver | None = None  # on the side the cut comes to

    def listen(self) -> "UdpPeer":
        self.receiver = udp.Receiver(self.sock, self.key)
        return self

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        try:
            self.sock.close()
        except OSError:
            pass

    def deadline_for(self, nbytes: int) -> float:
        """How long the receiver waits after the header: the payload's time at the paced
        rate (plus the link's delay, which the header has already paid) + a frame period."""
        wire = nbytes + -(-max(nbytes, 1) // udp.payload_size(self.mtu)) * (udp.HEAD.size + 58)
        return min(udp.MAX_DEADLINE_S, (wire * 8 / self.rate_bps if self.rate_bps else 0.0) + self.deadline_s)


def send_tensors(sock: socket.socket, header: dict[str, Any], bufs: list[Any], path: UdpPeer | None,
                 ) -> tuple[int, int | None]:
    """Send a tensors/result frame, its payload over UDP when ``path`` is given.

    Returns (bytes on the wire, datagrams sent or None over TCP)."""
    if path is None:
        return P.send_frame(sock, header, bufs), None
    nbytes = sum(memoryview(b).nbytes for b in bufs)
    path.frames += 1
    packets = max(1, -(-nbytes // udp.payload_size(path.mtu)))
    header = {**header, "udp": {"frame": path.frames, "packets": packets, "bytes": nbytes,
                                "deadline_s": path.deadline_for(nbytes)}}
    tcp = P.send_frame(sock, header, [])
    sent = udp.send(path.sock, path.key, path.frames, [memoryview(b) for b in bufs], path.mtu, path.rate_bps)
    return tcp + sent.wire_bytes, sent.packets


def recv_tensors(frame: P.Frame, path: UdpPeer | None,
                 ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """Decode a tensors/result frame's tensors, gathering a UDP payload first.

    Returns (arrays or None when the frame is dropped for loss, UDP facts)."""
    meta = frame.header.get("udp")
    if meta is None:
        return P.decode_tensors(frame.header.get("tensors"), frame.payload, CODECS), {}
    if path is None or path.receiver is None or not isinstance(meta, dict):
        raise P.FrameError("a UDP frame on a run without a UDP path")
    frame_id, packets, nbytes = (_bounded_int(meta.get(k), k) for k in ("frame", "packets", "bytes"))
    deadline = meta.get("deadline_s")
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or not 0 <= deadline <= 3600:
        raise P.FrameError("udp.deadline_s must be a number of seconds")
    descs = P.parse_descs(frame.header.get("tensors"))
    if sum(d.nbytes for d in descs) != nbytes or packets > nbytes // 64 + 2:
        raise P.FrameError("udp frame: descriptors, byte count and packet count disagree")
    t_start = now()
    got = path.receiver.receive(frame_id, nbytes, packets, float(deadline))
    arrived = got.t_last_ns or frame.t_last_ns
    # the last datagram may have arrived before this thread got to the frame (a lag, like
    # TCP's receive lag); waiting for datagrams that never came is the deadline's cost:
    # both reported on their own, never as decoding
    ready = max(t_start, arrived)
    waited = (now() - ready) if got.lost else 0
    facts = {"packets_sent": packets, "packets_lost": got.lost, "udp_wait_s": max(0, waited) / 1e9,
             "t_udp_last": arrived, "t_udp_ready": ready}
    if got.lost and path.on_loss == "drop":
        return None, facts
    return _decode_with_holes(descs, got), facts


def _bounded_int(v: Any, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= P.MAX_PAYLOAD_BYTES:
        raise P.FrameError(f"udp.{name} must be an integer in 0..{P.MAX_PAYLOAD_BYTES}")
    return v


def _decode_with_holes(descs: list[P.TensorDesc], got: udp.Received) -> dict[str, np.ndarray]:
    """Decode each tensor; elements whose bytes were lost become zeros (a compressed or
    image-coded tensor with any hole becomes all zeros: its bytes decode to nothing)."""
    out: dict[str, np.ndarray] = {}
    view = memoryview(got.payload)
    offset = 0
    for d in descs:
        end = offset + d.nbytes
        if got.complete(offset, end):
            out[d.name] = CODECS[d.codec].decode(view[offset:end], d)
        else:
            out[d.name] = _zero_filled(d, view[offset:end], got.have[offset:end])
        offset = end
    return out


def _zero_filled(d: P.TensorDesc, data: memoryview, have: np.ndarray) -> np.ndarray:
    zeros = np.zeros(d.shape, dtype=d.dtype)
    try:
        chain = parse_chain(d.codec)
    except ValueError:
        return zeros  # png/jpeg
    if chain.compressor is not None or zeros.size == 0:
        return zeros
    side = 8 * d.shape[-1] if chain.lossy == "int8-per-channel" and d.params.get("q") != "none" else 0
    if side and not have[:side].all():
        return zeros
    arr = np.array(CODECS[d.codec].decode(data, d))  # a writable copy
    width = (have.size - side) // max(1, arr.size)
    ok = have[side:side + width * arr.size].reshape(arr.size, width).all(axis=1)
    arr.reshape(-1)[~ok] = 0
    return arr


# --------------------------------------------------------------------------- local side

@dataclass
class Plan:
    """What one run sends and expects, fixed by the begin/ready handshake."""

    cut: list[str]
    remote: bool
    offset_ns: int = 0  # remote clock - local clock
    clock: str = "shared"
    choose: Callable[[str], str] = field(default=lambda name: "raw")
    link: dict[str, int | None] = field(default_factory=dict)  # mss/mtu per direction
    topology: int = 1
    udp: UdpPeer | None = None
    codec: str = "raw"
    input_encoding: str = "raw"
    model_outputs: frozenset[str] = frozenset()

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()


class LocalLink:
    """The local node's data connection to the remote (one per connect_peer)."""

    def __init__(self, host: str, port: int, token: str, timeout: float = 10.0,
                 io_timeout: float = IO_TIMEOUT_S):
        self.address = (host, port)
        self.token = token
        self.lock = threading.Lock()
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise StepError(f"cannot connect to peer data port {host}:{port}: {e}") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:  # mutual proof of the token; the token itself never crosses the link
            welcome = P.data_handshake_local(self.sock, token)
        except (P.FrameError, OSError) as e:
            self.close()
            raise StepError(f"data link to {host}:{port} refused: {e}") from e
        self.stamped = P.enable_kernel_stamps(self.sock)
        self.peer_name = welcome.get("node")
        self.clock_shared = same_clock(clock_identity(), welcome)
        self.sock.settimeout(io_timeout)

    def expect(self, kind: str) -> P.Frame:
        frame = P.recv_frame(self.sock, clock=now, kernel_stamps=self.stamped,
                             admit=P.admit_data_frame)
        got = frame.header.get("kind")
        if got == "error":
            raise StepError(f"peer: {frame.header.get('error')}")
        if got != kind:
            raise P.FrameError(f"expected {kind!r} from peer, got {got!r}")
        return frame

    def estimate_offset(self) -> int:
        """Remote clock minus local clock (ns), from the fastest of PING_COUNT pings."""
        best: tuple[int, int] | None = None
        for _ in range(PING_COUNT):
            t0 = now()
            P.send_frame(self.sock, {"kind": "ping"})
            t_remote = int(self.expect("pong").header["t"])
            t1 = now()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, t_remote - (t0 + t1) // 2)
        assert best is not None
        return best[1]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class RunSpec:
    samples: int
    warmup: int = 0
    codec: str = "raw"
    input_encoding: str = "raw"
    model_outputs: Sequence[str] = ()
    clock_shared: bool | None = None
    max_seconds: float | None = None
    offset_ns: int | None = None  # remote - local, measured by the orchestrator: use as given
    topology: int = 1
    transport: str = "tcp"
    on_loss: str = "zero"
    rate_bps: float | None = None   # UDP: pacing rate of the direction the cut takes
    fidelity: bool = False          # compare every sample with the uncompressed split
    input_size: int | None = None   # model input height (keypoint scaling)
    mode: str = "single"
    fps: float = 30.0
    duration_s: float = 10.0
    queue: int = 2


def plan_run(link: LocalLink | None, part: Part | None, input_names: Sequence[str],
             spec: RunSpec) -> Plan:
    """Handshake with the remote and fix what crosses, which codec, which clock.

    ``part`` is this node's part: the head in topology 1, the tail in 2 and 3."""
    for name in (spec.codec, spec.input_encoding):
        if name not in CODECS:
            raise StepError(f"unknown codec {name!r} (have {sorted(CODECS)} and chains of "
                            "fp16/int8/int8-per-channel with zstd[:level]/lz4)")
    base = {"topology": spec.topology, "codec": spec.codec, "input_encoding": spec.input_encoding,
            "model_outputs": frozenset(spec.model_outputs)}
    if link is None:
        if part is None or spec.topology == 3:
            raise StepError("no part loaded here and no peer connected: nothing to run")
        return Plan(cut=[], remote=False, **base)
    begin: dict[str, Any] = {"kind": "begin", "model_outputs": list(spec.model_outputs),
                             "topology": spec.topology}
    if spec.topology != 1:
        begin["want"] = part.input_names if part is not None else None
    sock = nonce_l = None
    if spec.transport == "udp":
        sock, nonce_l = udp.open_socket(link.sock.getsockname()[0]), udp.nonce()
        begin["udp"] = {"nonce": nonce_l.hex(), "port": sock.getsockname()[1], "on_loss": spec.on_loss,
                        "frame_s": 1.0 / spec.fps, "rate_bps": spec.rate_bps if spec.topology != 1 else None}
    try:
        P.send_frame(link.sock, begin)
        ready = link.expect("ready").header
        path = _udp_local(link, sock, nonce_l, ready, spec) if sock is not None else None
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    plan = _plan_from_ready(link, part, input_names, spec, ready, base)
    plan.udp = path
    if not plan.remote and path is not None:
        path.close()
        plan.udp = None
    return plan


def _udp_local(link: LocalLink, sock: socket.socket, nonce_l: bytes, ready: Mapping[str, Any],
               spec: RunSpec) -> UdpPeer:
    u = ready.get("udp")
    if not isinstance(u, dict):
        raise StepError("the remote did not set up the UDP path")
    try:
        nonce_r, port = bytes.fromhex(u["nonce"]), int(u["port"])
    except (KeyError, TypeError, ValueError) as e:
        raise P.FrameError(f"bad udp reply: {e}") from e
    sock.connect((link.sock.getpeername()[0], port))
    mtu = link_facts(link.sock)["mtu"]
    rate = spec.rate_bps if spec.topology == 1 else None
    peer = UdpPeer(sock, udp.session_key(link.token, nonce_l, nonce_r), mtu, rate, spec.on_loss, 1.0 / spec.fps)
    return peer.listen() if spec.topology != 1 else peer  # topologies 2/3: the cut comes down here


def _plan_from_ready(link: LocalLink, part: Part | None, input_names: Sequence[str], spec: RunSpec,
                     ready: Mapping[str, Any], base: dict[str, Any]) -> Plan:
    remote_inputs = ready.get("tail_inputs")
    if remote_inputs is None and spec.topology != 3:  # nothing runs remote: everything stays local
        if part is None:
            raise StepError("neither a part here nor one on the remote is loaded")
        return Plan(cut=[], remote=False, **base)
    if spec.topology == 1:
        head_out = part.output_names if part else []
        cut = list(head_out) + [n for n in input_names if n in remote_inputs and n not in head_out]
        missing = [n for n in remote_inputs if n not in cut]
        if missing:
            raise StepError(f"the remote tail needs {missing}, which neither the head outputs "
                            f"nor the inputs provide (have {cut})")
    elif spec.topology == 2:
        cut = [n for n in input_names if n in remote_inputs]
    else:
        cut = []
    shared = link.clock_shared if spec.clock_shared is None else spec.clock_shared
    if spec.offset_ns is not None:
        shared, offset = False, spec.offset_ns
    else:
        offset = 0 if shared else link.estimate_offset()
    inputs = set(input_names)
    choose = (lambda n: spec.input_encoding if n in inputs else spec.codec)
    up, down = link_facts(link.sock), ready.get("link") or {}
    facts = {"uplink_mss": up["mss"], "uplink_mtu": up["mtu"],
             "downlink_mss": _int_or_none(down.get("mss")), "downlink_mtu": _int_or_none(down.get("mtu"))}
    return Plan(cut=cut, remote=True, offset_ns=offset, clock="shared" if shared else "derived",
                choose=choose, link=facts, **base)


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


@dataclass
class RunResult:
    """What one ``run`` produced: the samples, the last final outputs, and where the
    call's time went (``handshake_s`` begin/ready + clock offset + reference pass,
    ``warmup_s``, ``sampling_s``), so the orchestrator can account for every phase.
    ``stream`` holds a stream run's totals (``nodes.stream``), empty otherwise."""

    rows: list[dict[str, Any]]
    final: dict[str, np.ndarray]
    phases: dict[str, float]
    stream: dict[str, Any] = field(default_factory=dict)


Observe = Callable[[str, float], None]


def add_fidelity(row: dict[str, Any], refs: list[dict[str, np.ndarray]] | None, idx: int,
                 out: Mapping[str, np.ndarray] | None, input_size: int | None) -> None:
    if refs is not None and out is not None:
        row.update(json_safe(compare(refs[idx], out, input_size)))


def sample(link: LocalLink | None, part: Part | None, feed: Mapping[str, np.ndarray], plan: Plan,
           seq: int, index: int, observe: Observe, cpu: CpuAccount,
           ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """One sample, start to end (final outputs None when the frame was dropped for loss)."""
    if not plan.remote:
        return _local_only(part, feed, plan, observe, cpu)
    assert link is not None
    pending = send_half(link, part, feed, plan, seq, index, observe, cpu)
    return receive_half(link, part, plan, pending, observe, cpu)


def _local_only(part: Part | None, feed: Mapping[str, np.ndarray], plan: Plan, observe: Observe,
                cpu: CpuAccount) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    assert part is not None
    before = cpu.snapshot()
    out, t0, t1, used = part_run(part, feed, cpu)
    role = "head" if plan.topology == 1 else "tail"
    observe(role, (t1 - t0) / 1e9)
    row = _row(e2e_s=t1 - t0, clock="shared", **{f"{role}_s": t1 - t0})
    row.update(cut_bytes_raw=sum(a.nbytes for a in out.values()) if role == "head" else 0,
               cut_bytes_wire=0, uplink_bytes=0, downlink_bytes=0, uplink_retrans=0, topology=plan.topology,
               **{f"{role}_cpu_s": used})
    row.update(_cpu_columns("local", cpu, before))
    return row, out


@dataclass
class Pending:
    """A sample whose first half (up to the first byte out) is done."""

    seq: int
    index: int
    feed: Mapping[str, np.ndarray]
    t0: int
    t_sent: int
    cpu_before: CpuSnapshot
    row: dict[str, Any]
    arrival_ns: int | None = None  # streams: when the frame arrived at the source
    retrans_before: int | None = None  # segments the data socket had retransmitted before this send


def send_half(link: LocalLink, part: Part | None, feed: Mapping[str, np.ndarray], plan: Plan, seq: int,
              index: int, observe: Observe, cpu: CpuAccount) -> Pending:
    """Topology 1: head, encode, send the cut; 2: encode and send the input; 3: send a trigger."""
    before = cpu.snapshot()
    t0 = now()
    fields: dict[str, Any] = {}
    if plan.topology == 3:
        retrans_before = retransmits(link.sock)
        up = P.send_frame(link.sock, {"kind": "trigger", "seq": seq, "input": index, "codec": plan.codec,
                                      "input_encoding": plan.input_encoding, "udp_reply": plan.udp is not None})
        return Pending(seq, index, feed, t0, t0, before, {"uplink_bytes": up, "encode_s": 0.0},
                       retrans_before=retrans_before)
    head_out: dict[str, np.ndarray] = {}
    t1 = t0
    if plan.topology == 1 and part is not None:
        head_out, t0, t1, fields["head_cpu_s"] = part_run(part, feed, cpu)
        observe("head", (t1 - t0) / 1e9)
        fields["head_s"] = (t1 - t0) / 1e9
    tensors = [(n, head_out[n] if n in head_out else feed[n]) for n in plan.cut]
    descs, bufs, raw = P.encode_tensors(tensors, CODECS, plan.choose)
    retrans_before = retransmits(link.sock)
    t2 = now()  # encoding done = first byte about to go out
    header: dict[str, Any] = {"kind": "tensors", "seq": seq, "tensors": descs}
    if plan.topology == 2:
        header.update(codec=plan.codec, input_encoding=plan.input_encoding, udp_reply=plan.udp is not None)
    up, packets = send_tensors(link.sock, header, bufs, plan.udp if plan.topology == 1 else None)
    fields.update(encode_s=(t2 - t1) / 1e9, uplink_bytes=up)
    if plan.topology == 1:
        fields.update(cut_bytes_raw=raw, cut_bytes_wire=sum(d["nbytes"] for d in descs),
                      codec=",".join(sorted({d["codec"] for d in descs})) or "raw")
        if packets is not None:
            fields["packets_sent"] = packets
    return Pending(seq, index, feed, t0, t2, before, fields, retrans_before=retrans_before)


def receive_half(link: LocalLink, part: Part | None, plan: Plan, pending: Pending, observe: Observe,
                 cpu: CpuAccount) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Wait for the sample's result frame; topologies 2/3 then run the tail here."""
    frame = link.expect("result")
    retrans_after = retransmits(link.sock)
    st = _stamps(frame.header.get("t"))
    down_udp = plan.udp if plan.topology != 1 else None
    got, facts = recv_tensors(frame, down_udp) if not frame.header.get("dropped") else (None, {})
    t_last = facts.pop("t_udp_ready", None) or frame.t_last_ns
    arrived = facts.pop("t_udp_last", None) or frame.t_arrived_ns
    t_dec = now()
    off = plan.offset_ns
    row = _row(clock=plan.clock)
    row.update(pending.row)
    wait_here = float(facts.get("udp_wait_s") or 0.0)
    wait_there = _nonneg((frame.header.get("udp_rx") or {}).get("udp_wait_s")) or 0.0
    row.update(remote_rx_lag_s=(st["rx_last"] - st["rx_arrived"]) / 1e9,
               remote_decode_s=(st["decoded"] - st["rx_last"]) / 1e9 - wait_there,
               downlink_s=(arrived - (st["tx"] - off)) / 1e9, local_rx_lag_s=(t_last - arrived) / 1e9,
               decode_s=(t_dec - t_last) / 1e9 - wait_here, udp_wait_s=wait_here + wait_there,
               downlink_bytes=frame.wire_bytes + _udp_wire(frame, facts),
               topology=plan.topology, transport="udp" if plan.udp is not None else "tcp")
    if plan.topology != 3:
        row["uplink_s"] = (st["rx_arrived"] - off - pending.t_sent) / 1e9
    elif "run_start" in st:  # the trigger waited at the remote for the head (streams)
        row["remote_queue_s"] = max(0, st["run_start"] - st["rx_last"]) / 1e9
    final, t_end = _finish(frame, got, part, plan, pending, row, observe, cpu, t_dec)
    e2e_start = pending.t0 if plan.topology != 3 else st["run_start"] - off
    row["e2e_s"] = (t_end - e2e_start) / 1e9 if final is not None else None
    row.update(_loss_columns(frame, facts, row))
    row.update(_cpu_columns("local", cpu, pending.cpu_before))
    row.update(_remote_cpu(frame.header.get("cpu")))
    row.update(plan.link)
    before = pending.retrans_before
    row["uplink_retrans"] = (retrans_after - before) if None not in (before, retrans_after) else None
    row["_remote_retrans"] = frame.header.get("retrans")
    return row, final


def _finish(frame: P.Frame, got: dict[str, np.ndarray] | None, part: Part | None, plan: Plan,
            pending: Pending, row: dict[str, Any], observe: Observe, cpu: CpuAccount, t_dec: int,
            ) -> tuple[dict[str, np.ndarray] | None, int]:
    """Row fields from the remote's part and the local tail; the final outputs."""
    h = frame.header
    st = _stamps(h.get("t"))
    run_s = (st["run_done"] - st["run_start"]) / 1e9 if "run_start" in st else 0.0
    enc_s = (st["encoded"] - st["run_done"]) / 1e9 if "run_done" in st else 0.0
    remote_role = "tail" if plan.topology == 1 else "head"
    row.update({f"{remote_role}_s": run_s, f"{remote_role}_cpu_s": _nonneg(h.get("part_cpu_s")),
                "remote_encode_s": enc_s})
    if got is None:
        return None, t_dec
    if plan.topology == 1:
        return got, t_dec
    descs = P.parse_descs(h.get("tensors"))
    row.update(cut_bytes_raw=_nonneg_int(h.get("raw_bytes")), cut_bytes_wire=sum(d.nbytes for d in descs),
               codec=",".join(sorted({d.codec for d in descs})) or "raw")
    if part is None:
        return got, t_dec
    feed = {**{n: a for n, a in pending.feed.items() if n in part.input_names}, **got}
    out, t_a, t_b, row["tail_cpu_s"] = part_run(part, feed, cpu)
    observe("tail", (t_b - t_a) / 1e9)
    row["tail_s"] = (t_b - t_a) / 1e9
    reads = set(part.input_names)
    final = dict(out)
    final.update({n: a for n, a in got.items() if n in plan.model_outputs or n not in reads})
    return final, t_b


def _stamps(st: Any) -> dict[str, int]:
    if not isinstance(st, dict):
        raise P.FrameError("result frame lacks timestamps")
    out = {}
    for k in ("rx_first", "rx_arrived", "rx_last", "decoded", "run_start", "run_done", "encoded", "tx"):
        v = st.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v
    if not {"rx_arrived", "rx_last", "decoded", "tx"} <= set(out):
        raise P.FrameError("result frame lacks timestamps")
    out["rx_arrived"] = min(out["rx_arrived"], out["rx_last"])
    return out


def _udp_wire(frame: P.Frame, facts: Mapping[str, Any]) -> int:
    """Wire bytes of a UDP payload (datagram headers included), 0 over TCP."""
    if not facts or "udp" not in frame.header:
        return 0
    u = frame.header["udp"]
    return int(u["bytes"]) + int(u["packets"]) * (udp.HEAD.size + udp.TAG_BYTES + udp.IP_UDP_BYTES + udp.L2_BYTES)


def _loss_columns(frame: P.Frame, facts: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    rx = facts or frame.header.get("udp_rx") or {}
    sent = row.get("packets_sent", rx.get("packets_sent"))
    lost = rx.get("packets_lost")
    return {"packets_sent": sent if isinstance(sent, int) else None,
            "packets_lost": lost if isinstance(lost, int) else None,
            "dropped": bool(frame.header.get("dropped")) or (facts and row.get("e2e_s") is None) or False}


def _nonneg(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def _nonneg_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _cpu_columns(prefix: str, cpu: CpuAccount | None, before: CpuSnapshot) -> dict[str, Any]:
    deltas = cpu.snapshot().since(before) if cpu is not None else NO_SNAPSHOT.since(NO_SNAPSHOT)
    return {f"{prefix}_{k}": v for k, v in deltas.items()}


def _remote_cpu(reported: Any) -> dict[str, Any]:
    """The remote's CPU deltas from the result header, each checked (None when absent)."""
    got = reported if isinstance(reported, dict) else {}
    out: dict[str, Any] = {}
    for key in ("cpu_s", "throttled_periods", "throttled_s", "runq_wait_s"):
        v = got.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        out[f"remote_{key}"] = v if ok else None
    return out


TIMING_KEYS = ("head_s", "encode_s", "uplink_s", "remote_rx_lag_s", "remote_decode_s", "tail_s",
               "remote_encode_s", "downlink_s", "local_rx_lag_s", "decode_s", "e2e_s")


def _row(clock: str, **ns: int) -> dict[str, Any]:
    row: dict[str, Any] = {k: ns.get(k, 0) / 1e9 for k in TIMING_KEYS}
    row["clock"] = clock
    row["codec"] = "none"
    return row


def fetch_part(link: LocalLink, sha256: str, clock_shared: bool | None = None,
               offset_ns: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """Pull a staged part from the remote over the downlink; returns (bytes, timing).

    ``delivery_s`` runs from the remote's first byte out to the last byte in here.
    ``offset_ns`` (remote - local, measured by the orchestrator) is used as given.
    """
    shared = link.clock_shared if clock_shared is None else clock_shared
    if offset_ns is not None:
        shared, offset = False, offset_ns
    else:
        offset = 0 if shared else link.estimate_offset()
    t_req = now()
    P.send_frame(link.sock, {"kind": "fetch", "sha256": sha256})
    frame = link.expect("part")
    data = bytes(frame.payload)
    got = sha256_of(data)
    if got != sha256:
        raise StepError(f"delivered part has sha256 {got}, expected {sha256}")
    t_tx = int(frame.header.get("t_tx", 0))
    facts = link_facts(link.sock)  # one veth: the same MSS and MTU both ways
    return data, {"delivery_s": (frame.t_arrived_ns - (t_tx - offset)) / 1e9,
                  "delivery_rx_lag_s": (frame.t_last_ns - frame.t_arrived_ns) / 1e9,
                  "mss": facts["mss"], "mtu": facts["mtu"],
                  "request_to_loaded_s": (now() - t_req) / 1e9,
                  "bytes": len(data), "wire_bytes": frame.wire_bytes,
                  "clock": "shared" if shared else "derived"}
