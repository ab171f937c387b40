"""The remote's half of a sample: serving one data connection.

Answers what the local side (``nodes.pipeline``) sends: ``begin`` fixes the run
(topology, which tensors go back, the UDP path), each ``tensors`` or ``trigger``
frame runs this node's part (the tail in topology 1, the head in 2 and 3) and
sends the result down with the remote's stamps (the timing contract is
``nodes.pipeline``'s docstring), ``fetch`` sends a staged part, ``stats`` the
connection's retransmissions, ``ping`` the remote's clock.

Leaves to others: the servers and the loaded parts (``nodes.agent``, seen through
``RemoteState``), the frame format (``nodes.protocol``), the shared halves of the
flow (``nodes.pipeline``: running a part, tensors over TCP or UDP).
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from nodes import protocol as P
from nodes import udp
from nodes.cpu_account import CpuAccount, CpuSnapshot
from nodes.part import Part
from nodes.pipeline import (
    CODECS,
    ON_LOSS,
    TOPOLOGIES,
    UdpPeer,
    link_facts,
    now,
    part_run,
    recv_tensors,
    retransmits,
    send_tensors,
)

log = logging.getLogger("nodes.agent")


class RemoteState(Protocol):
    """What the remote side of a data connection needs from its agent."""

    token: str
    name: str
    cpu: CpuAccount
    inputs: list[dict[str, np.ndarray]]  # topology 3: the source is here

    def tail(self) -> Part | None: ...
    def part(self, role: str) -> Part | None: ...
    def staged(self, sha256: str) -> bytes | None: ...
    def tail_lock(self) -> threading.Lock: ...
    def observe(self, part: str, seconds: float, role: str | None = None) -> None: ...


@dataclass
class Session:
    """The remote's view of one run, fixed by ``begin``."""

    topology: int = 1
    model_outputs: set[str] = field(default_factory=set)
    want: list[str] | None = None  # topologies 2/3: the tensors the local's tail reads
    udp: UdpPeer | None = None

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
            self.udp = None


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
    session = Session()
    cpu_mark = state.cpu.snapshot()  # the window of the next sample starts here
    try:
        while True:
            frame = P.recv_frame(conn, kernel_stamps=stamped, admit=P.admit_data_frame)
            h = frame.header
            kind = h.get("kind")
            if kind == "ping":
                P.send_frame(conn, {"kind": "pong", "t": now()})
            elif kind == "begin":
                session.close()
                session = _begin(conn, h, state)
                cpu_mark = state.cpu.snapshot()
            elif kind in ("tensors", "trigger"):
                cpu_mark = _answer_sample(conn, frame, state, session, cpu_mark)
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
        session.close()
        conn.close()


def _begin(conn: socket.socket, h: Mapping[str, Any], state: RemoteState) -> Session:
    mo, want = h.get("model_outputs") or [], h.get("want")
    if not isinstance(mo, list) or not all(isinstance(x, str) for x in mo):
        raise P.FrameError("'model_outputs' must be a list of names")
    if want is not None and (not isinstance(want, list) or not all(isinstance(x, str) for x in want)):
        raise P.FrameError("'want' must be a list of names or null")
    topology = h.get("topology", 1)
    if topology not in TOPOLOGIES:
        raise P.FrameError(f"'topology' must be one of {TOPOLOGIES}")
    session = Session(topology, set(mo), want)
    part = state.part("tail" if topology == 1 else "head")
    reply: dict[str, Any] = {"kind": "ready", "link": link_facts(conn),
                             "tail_inputs": part.input_names if part else None,
                             "tail_outputs": part.output_names if part else None}
    if isinstance(h.get("udp"), dict):
        session.udp, reply["udp"] = _udp_remote(conn, h["udp"], state.token)
        if topology == 1:  # the cut comes up to this node
            session.udp.listen()
    P.send_frame(conn, reply)
    return session


def _udp_remote(conn: socket.socket, u: Mapping[str, Any], token: str) -> tuple[UdpPeer, dict[str, Any]]:
    """The remote's UDP socket for a run, connected to the port the local announced."""
    try:
        nonce_l = bytes.fromhex(u["nonce"])
        port = int(u["port"])
        rate = u.get("rate_bps")
        on_loss, frame_s = u.get("on_loss", "zero"), float(u.get("frame_s", 0.1))
    except (KeyError, TypeError, ValueError) as e:
        raise P.FrameError(f"bad udp setup: {e}") from e
    if len(nonce_l) != 16 or not 0 < port < 65536 or on_loss not in ON_LOSS or not 0 <= frame_s <= 60:
        raise P.FrameError("bad udp setup: nonce, port, on_loss or frame_s out of range")
    if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0):
        raise P.FrameError("bad udp setup: rate_bps")
    sock = udp.open_socket(conn.getsockname()[0])
    sock.connect((conn.getpeername()[0], port))
    nonce_r = udp.nonce()
    peer = UdpPeer(sock, udp.session_key(token, nonce_l, nonce_r), link_facts(conn)["mtu"], rate, on_loss, frame_s)
    return peer, {"nonce": nonce_r.hex(), "port": sock.getsockname()[1]}


def _try_send(conn: socket.socket, header: dict[str, Any]) -> None:
    try:
        P.send_frame(conn, header)
    except OSError:
        pass


def _answer_sample(conn: socket.socket, frame: P.Frame, state: RemoteState, session: Session,
                   cpu_mark: CpuSnapshot) -> CpuSnapshot:
    """Run this node's part on one sample and send the result; returns the CPU counters
    read just before sending, where the next sample's window starts."""
    h = frame.header
    up_udp = session.udp if session.topology == 1 else None
    if h.get("kind") == "trigger":
        received, facts = _source_input(h, state, session), {}
    else:
        received, facts = recv_tensors(frame, up_udp)
    udp_ready = facts.pop("t_udp_ready", None)
    arrived = facts.pop("t_udp_last", None)
    stamps = {"rx_first": frame.t_first_ns, "rx_arrived": arrived or frame.t_arrived_ns,
              "rx_last": udp_ready or frame.t_last_ns, "decoded": now()}
    if received is None:  # dropped for loss (on_loss: drop)
        retrans = retransmits(conn)
        stamps["tx"] = now()
        P.send_frame(conn, {"kind": "result", "seq": h.get("seq"), "tensors": [], "dropped": True,
                            "t": stamps, "udp_rx": facts, "retrans": retrans})
        return cpu_mark
    role = "tail" if session.topology == 1 else "head"
    part = state.part(role)
    if part is None and session.topology == 1:
        _try_send(conn, {"kind": "error", "error": "no tail part loaded on the remote"})
        return cpu_mark
    try:
        out, stamps["run_start"], stamps["run_done"], part_cpu = _run_part(part, received, state)
    except (KeyError, ValueError) as e:
        _try_send(conn, {"kind": "error", "error": f"{role}: {e}"})
        return cpu_mark
    if part is not None:
        state.observe(role, (stamps["run_done"] - stamps["run_start"]) / 1e9, role="remote")
    back, codec = _outgoing(session, part, received, out, h)
    descs, bufs, raw = P.encode_tensors(back, CODECS, codec)
    stamps["encoded"] = now()
    cpu_now = state.cpu.snapshot()
    retrans = retransmits(conn)  # before this result: its own retransmissions count in the next mark
    stamps["tx"] = now()
    header = {"kind": "result", "seq": h.get("seq"), "tensors": descs, "t": stamps, "raw_bytes": raw,
              "cpu": cpu_now.since(cpu_mark), "part_cpu_s": part_cpu, "udp_rx": facts, "retrans": retrans}
    down_udp = session.udp if session.topology != 1 and h.get("udp_reply") else None
    send_tensors(conn, header, bufs, down_udp)
    return cpu_now


def _source_input(h: Mapping[str, Any], state: RemoteState, session: Session) -> dict[str, np.ndarray]:
    """Topology 3: the sample's input is this node's own (the source is here)."""
    if session.topology != 3:
        raise P.FrameError("a trigger frame outside topology 3")
    idx = h.get("input")
    if not state.inputs:
        raise P.FrameError("topology 3 needs inputs on the remote: set_inputs there first")
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(state.inputs):
        raise P.FrameError(f"trigger: input index must be in 0..{len(state.inputs) - 1}")
    return state.inputs[idx]


def _run_part(part: Part | None, feed: Mapping[str, np.ndarray], state: RemoteState,
              ) -> tuple[dict[str, np.ndarray], int, int, float | None]:
    if part is None:  # topology 2/3 at k = 0: nothing to run, the input itself crosses
        t = now()
        return {}, t, t, None
    with state.tail_lock():
        return part_run(part, feed, state.cpu)


def _outgoing(session: Session, part: Part | None, received: Mapping[str, np.ndarray],
              out: dict[str, np.ndarray], h: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Callable[[str], str]]:
    """What goes back down, and each tensor's codec.

    Topology 1: the tail's outputs plus received tensors that are model outputs
    (raw). Topologies 2/3: the head's outputs plus the inputs the local's tail reads
    (inputs with ``input_encoding``, the rest with the frame's ``codec``)."""
    back = dict(out)
    if session.topology == 1:
        reads = set(part.input_names) if part is not None else set()
        for name, arr in received.items():
            if name in session.model_outputs or name not in reads:
                back[name] = arr  # a view into this frame's payload, alive until sent
        return back, lambda n: "raw"
    want = set(session.want or ()) | session.model_outputs  # no tail on the UE: just the final outputs
    for name, arr in received.items():
        if name not in back and name in want:
            back[name] = arr
    codec, enc = str(h.get("codec") or "raw"), str(h.get("input_encoding") or "raw")
    for name in (codec, enc):
        if name not in CODECS:
            raise P.FrameError(f"unknown codec {name!r}")
    return back, (lambda n: enc if n in received else codec)


def _answer_fetch(conn: socket.socket, h: Mapping[str, Any], state: RemoteState) -> None:
    sha = h.get("sha256")
    data = state.staged(sha) if isinstance(sha, str) else None
    if data is None:
        _try_send(conn, {"kind": "error", "error": f"no part with sha256 {sha} staged"})
        return
    P.send_frame(conn, {"kind": "part", "sha256": sha, "t_tx": now()}, [data])
