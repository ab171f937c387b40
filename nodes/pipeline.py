"""The sample flow across the data plane, and its timings.

Local side (``LocalLink`` + ``run_samples``): run the head on the input, encode the cut
tensors, send them up; wait for the remote's result frame, decode it. Remote side
(``serve_data_connection``): decode, run the tail, encode the outputs plus every
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
delay is symmetric).

Which tensors cross: local sends ``head outputs + model inputs the tail reads`` (exactly
the manifest's cut); the remote tells its tail's inputs in the ``ready`` frame. The
remote returns its tail outputs plus received tensors that are model outputs: those the
tail does not read, plus any named in ``model_outputs``. With no head (k = 0) the input
itself crosses, encoded with ``input_encoding``; with no tail (k = N) nothing crosses.

This module owns the data-plane conversation; ``nodes.agent`` owns the servers, the
loaded parts and the control operations; ``nodes.protocol`` owns the frame format.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from nodes import protocol as P
from nodes.codecs import IMAGE_CODECS
from nodes.cpu_account import NO_SNAPSHOT, CpuAccount, CpuSnapshot
from nodes.part import Part, sha256_of

CODECS = P.codec_registry(IMAGE_CODECS)
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


class RemoteState(Protocol):
    """What the remote side of a data connection needs from its agent."""

    token: str
    name: str
    cpu: CpuAccount

    def tail(self) -> Part | None: ...
    def staged(self, sha256: str) -> bytes | None: ...
    def tail_lock(self) -> threading.Lock: ...
    def observe(self, part: str, seconds: float, role: str | None = None) -> None: ...


# --------------------------------------------------------------------------- remote side

def serve_data_connection(conn: socket.socket, state: RemoteState) -> None:
    """Serve one authenticated data connection until the peer closes it or sends garbage.

    The caller (``nodes.agent``) has already run the data-link handshake
    (``protocol.data_handshake_remote``). Every frame is admitted by
    ``protocol.admit_data_frame`` before its payload is read. A frame that does not
    parse gets an ``error`` frame back and the connection is closed; the agent keeps
    serving.
    """
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stamped = P.enable_kernel_stamps(conn)
    model_outputs: set[str] = set()
    cpu_mark = state.cpu.snapshot()  # the window of the next sample starts here
    try:
        while True:
            frame = P.recv_frame(conn, kernel_stamps=stamped, admit=P.admit_data_frame)
            h = frame.header
            kind = h.get("kind")
            if kind == "ping":
                P.send_frame(conn, {"kind": "pong", "t": now()})
            elif kind == "begin":
                mo = h.get("model_outputs") or []
                if not isinstance(mo, list) or not all(isinstance(x, str) for x in mo):
                    raise P.FrameError("'model_outputs' must be a list of names")
                model_outputs = set(mo)
                tail = state.tail()
                P.send_frame(conn, {"kind": "ready",
                                    "tail_inputs": tail.input_names if tail else None,
                                    "tail_outputs": tail.output_names if tail else None,
                                    "link": link_facts(conn)})
                cpu_mark = state.cpu.snapshot()
            elif kind == "tensors":
                cpu_mark = _answer_sample(conn, frame, state, model_outputs, cpu_mark)
            elif kind == "fetch":
                _answer_fetch(conn, h, state)
            elif kind == "stats":
                P.send_frame(conn, {"kind": "stats", "retrans": retransmits(conn)})
            else:
                raise P.FrameError(f"unknown data frame kind {kind!r}")
    except P.PeerClosed:
        pass
    except P.FrameError as e:
        log.warning("data: refused a frame: %s", e)
        _try_send(conn, {"kind": "error", "error": f"refused: {e}"})
    except OSError:
        pass  # peer vanished (reset, timeout): nothing to answer
    finally:
        conn.close()


def _try_send(conn: socket.socket, header: dict[str, Any]) -> None:
    try:
        P.send_frame(conn, header)
    except OSError:
        pass


def _answer_sample(conn: socket.socket, frame: P.Frame, state: RemoteState,
                   model_outputs: set[str], cpu_mark: CpuSnapshot) -> CpuSnapshot:
    """Run the tail on one sample and send the result; returns the CPU counters
    read just before sending, where the next sample's window starts."""
    t_rx = frame.t_last_ns
    cut = P.decode_tensors(frame.header.get("tensors"), frame.payload, CODECS)
    t_dec = now()
    tail = state.tail()
    if tail is None:
        _try_send(conn, {"kind": "error", "error": "no tail part loaded on the remote"})
        return cpu_mark
    try:
        with state.tail_lock():
            t_tail0 = now()
            out = tail.run(cut)
            t_tail = now()
    except (KeyError, ValueError) as e:
        _try_send(conn, {"kind": "error", "error": f"tail: {e}"})
        return cpu_mark
    state.observe("tail", (t_tail - t_tail0) / 1e9, role="remote")
    back = dict(out)
    for name, arr in cut.items():
        if name in model_outputs or name not in tail.input_names:
            back[name] = arr  # a view into this frame's payload, alive until sent
    descs, bufs, _ = P.encode_tensors(back, CODECS)
    t_enc = now()
    cpu_now = state.cpu.snapshot()
    stamps = {"rx_first": frame.t_first_ns, "rx_arrived": frame.t_arrived_ns, "rx_last": t_rx,
              "decoded": t_dec, "tail_start": t_tail0, "tail_done": t_tail, "encoded": t_enc}
    retrans = retransmits(conn)  # before this result: its own retransmissions count in the next mark
    stamps["tx"] = now()
    P.send_frame(conn, {"kind": "result", "seq": frame.header.get("seq"), "tensors": descs,
                        "t": stamps, "cpu": cpu_now.since(cpu_mark), "retrans": retrans}, bufs)
    return cpu_now


def _answer_fetch(conn: socket.socket, h: Mapping[str, Any], state: RemoteState) -> None:
    sha = h.get("sha256")
    data = state.staged(sha) if isinstance(sha, str) else None
    if data is None:
        _try_send(conn, {"kind": "error", "error": f"no part with sha256 {sha} staged"})
        return
    P.send_frame(conn, {"kind": "part", "sha256": sha, "t_tx": now()}, [data])


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


class LocalLink:
    """The local node's data connection to the remote (one per connect_peer)."""

    def __init__(self, host: str, port: int, token: str, timeout: float = 10.0,
                 io_timeout: float = IO_TIMEOUT_S):
        self.address = (host, port)
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


def plan_run(link: LocalLink | None, head: Part | None, input_names: Sequence[str],
             spec: RunSpec) -> Plan:
    """Handshake with the remote and fix what crosses, which codec, which clock."""
    for name in (spec.codec, spec.input_encoding):
        if name not in CODECS:
            raise StepError(f"unknown codec {name!r} (have {sorted(CODECS)})")
    if link is None:
        if head is None:
            raise StepError("no head part loaded and no peer connected: nothing to run")
        return Plan(cut=[], remote=False)
    P.send_frame(link.sock, {"kind": "begin", "model_outputs": list(spec.model_outputs)})
    ready = link.expect("ready").header
    tail_inputs = ready.get("tail_inputs")
    if tail_inputs is None:  # k = N: everything stays local
        if head is None:
            raise StepError("neither a head here nor a tail on the remote is loaded")
        return Plan(cut=[], remote=False)
    head_out = head.output_names if head else []
    cut = list(head_out) + [n for n in input_names if n in tail_inputs and n not in head_out]
    missing = [n for n in tail_inputs if n not in cut]
    if missing:
        raise StepError(f"the remote tail needs {missing}, which neither the head outputs "
                        f"nor the inputs provide (have {cut})")
    shared = link.clock_shared if spec.clock_shared is None else spec.clock_shared
    offset = 0 if shared else link.estimate_offset()
    inputs = set(input_names)
    choose = (lambda n: spec.input_encoding if n in inputs else spec.codec)
    up, down = link_facts(link.sock), ready.get("link") or {}
    facts = {"uplink_mss": up["mss"], "uplink_mtu": up["mtu"],
             "downlink_mss": _int_or_none(down.get("mss")), "downlink_mtu": _int_or_none(down.get("mtu"))}
    return Plan(cut=cut, remote=True, offset_ns=offset,
                clock="shared" if shared else "derived", choose=choose, link=facts)


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


@dataclass
class RunResult:
    """What one ``run`` produced: the samples, the last final outputs, and where the
    call's time went (``handshake_s`` begin/ready + clock offset, ``warmup_s``,
    ``sampling_s``), so the orchestrator can account for every phase."""

    rows: list[dict[str, Any]]
    final: dict[str, np.ndarray]
    phases: dict[str, float]


def run_samples(link: LocalLink | None, head: Part | None,
                inputs: Sequence[Mapping[str, np.ndarray]], spec: RunSpec,
                observe: Callable[[str, float], None] = lambda part, s: None,
                cpu: CpuAccount | None = None) -> RunResult:
    """Run warm-up + samples.

    Stops early (after at least one sample) once ``max_seconds`` have passed since
    the call began. ``cpu`` (this node's cgroup counters) adds ``local_cpu_s`` and
    the throttling columns to every row.
    """
    if not inputs:
        raise StepError("no input set: call set_inputs first")
    start = time.monotonic()
    plan = plan_run(link, head, list(inputs[0]), spec)
    planned = warmed = time.monotonic()
    rows: list[dict[str, Any]] = []
    final: dict[str, np.ndarray] = {}
    marks: list[int | None] = []  # the remote's retransmission count before each result
    for i in range(spec.warmup + spec.samples):
        row, final = _one_sample(link, head, inputs[i % len(inputs)], plan, i, observe, cpu)
        marks.append(row.pop("_remote_retrans", None))
        if i + 1 == spec.warmup:
            warmed = time.monotonic()
        if i >= spec.warmup:
            row["sample"] = i - spec.warmup
            row["_run_index"] = i
            rows.append(row)
            if spec.max_seconds is not None and time.monotonic() - start > spec.max_seconds:
                break
    end = time.monotonic()
    _downlink_retrans(link, plan, rows, marks)
    return RunResult(rows, final, {"handshake_s": planned - start, "warmup_s": warmed - planned,
                                   "sampling_s": end - warmed})


def _downlink_retrans(link: LocalLink | None, plan: Plan, rows: list[dict[str, Any]],
                      marks: list[int | None]) -> None:
    """Each sample's downlink retransmissions: the remote's count just before the
    next result went out (the local sends the next sample only once it has the
    whole result, so every retransmission of this result happened before) minus
    its count before this one; after the last sample the remote is asked."""
    final = None
    if link is not None and plan.remote and rows:
        P.send_frame(link.sock, {"kind": "stats"})
        got = link.expect("stats").header.get("retrans")
        final = got if isinstance(got, int) and not isinstance(got, bool) else None
    marks = [*marks, final]
    for row in rows:
        i = row.pop("_run_index")
        before, after = marks[i], marks[i + 1]
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in (before, after))
        row["downlink_retrans"] = max(0, after - before) if ok and plan.remote else (0 if not plan.remote else None)


def _one_sample(link: LocalLink | None, head: Part | None, feed: Mapping[str, np.ndarray],
                plan: Plan, seq: int, observe: Callable[[str, float], None],
                cpu: CpuAccount | None = None,
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    cpu_before = cpu.snapshot() if cpu is not None else NO_SNAPSHOT
    t0 = now()
    head_out = head.run(feed) if head is not None else {}
    t1 = now()
    if head is not None:
        observe("head", (t1 - t0) / 1e9)
    if not plan.remote:
        raw = sum(a.nbytes for a in head_out.values())
        row = _row(head_s=t1 - t0, e2e_s=t1 - t0, clock="shared")
        row.update(cut_bytes_raw=raw, cut_bytes_wire=0, uplink_bytes=0, downlink_bytes=0, uplink_retrans=0)
        row.update(_cpu_columns("local", cpu, cpu_before))
        return row, head_out
    assert link is not None
    tensors = [(n, head_out[n] if n in head_out else feed[n]) for n in plan.cut]
    descs, bufs, raw = P.encode_tensors(tensors, CODECS, plan.choose)
    wire = sum(d["nbytes"] for d in descs)
    sent_before = retransmits(link.sock)
    t2 = now()  # encoding done = first byte about to go out
    up = P.send_frame(link.sock, {"kind": "tensors", "seq": seq, "tensors": descs}, bufs)
    frame = link.expect("result")
    sent_after = retransmits(link.sock)
    final = P.decode_tensors(frame.header.get("tensors"), frame.payload, CODECS)
    t_dec = now()
    st = frame.header.get("t", {})
    off = plan.offset_ns
    try:
        rx, dec, t_a, t_b, enc, tx = (int(st[k]) for k in
                                      ("rx_last", "decoded", "tail_start", "tail_done",
                                       "encoded", "tx"))
        arrived = int(st.get("rx_arrived", rx))
    except (KeyError, TypeError, ValueError) as e:
        raise P.FrameError(f"result frame lacks timestamps: {e}") from e
    arrived = min(arrived, rx)
    row = _row(head_s=t1 - t0 if head is not None else 0, encode_s=t2 - t1,
               uplink_s=(arrived - off) - t2, remote_rx_lag_s=rx - arrived,
               remote_decode_s=dec - rx, tail_s=t_b - t_a, remote_encode_s=enc - t_b,
               downlink_s=frame.t_arrived_ns - (tx - off),
               local_rx_lag_s=frame.t_last_ns - frame.t_arrived_ns,
               decode_s=t_dec - frame.t_last_ns, e2e_s=t_dec - t0, clock=plan.clock)
    row.update(cut_bytes_raw=raw, cut_bytes_wire=wire, uplink_bytes=up,
               downlink_bytes=frame.wire_bytes,
               codec=",".join(sorted({d["codec"] for d in descs})) or "raw")
    row.update(_cpu_columns("local", cpu, cpu_before))
    row.update(_remote_cpu(frame.header.get("cpu")))
    row.update(plan.link)
    row["uplink_retrans"] = (sent_after - sent_before) if None not in (sent_before, sent_after) else None
    row["_remote_retrans"] = frame.header.get("retrans")
    return row, final


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
               ) -> tuple[bytes, dict[str, Any]]:
    """Pull a staged part from the remote over the downlink; returns (bytes, timing).

    ``delivery_s`` runs from the remote's first byte out to the last byte in here.
    """
    shared = link.clock_shared if clock_shared is None else clock_shared
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
