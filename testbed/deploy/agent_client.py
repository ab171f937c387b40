"""The orchestrator's handle on one node agent's control plane.

One TCP connection to the agent's control address (never the shaped link), one request
frame per call (``nodes.protocol``), each carrying the run token. Errors come back as:

* ``ProtocolError`` — the agent refused the frame (bad token, garbage), answered
  something that does not parse or does not have the expected shape, or the request
  itself cannot be encoded (e.g. a token that is not printable ASCII);
* ``NodeError(node=...)`` — the agent is unreachable, busy (connection cap), timed
  out, closed the connection, or the operation failed on the node (the node's
  message is in the error).

Nothing else escapes: every failure of the socket or the framing is one of the two.
The agent closes a control connection idle for ``protocol.CONTROL_IDLE_S``; the client
reconnects before reusing a connection idle for half that, or one the agent closed.
``Lease`` holds an agent's lease (``nodes.lease``): the agent exits when the process
holding it is gone.

Per-sample dicts returned by ``run`` carry the measurement contract's timings in
seconds — ``head_s, encode_s, uplink_s, remote_decode_s, tail_s, remote_encode_s,
downlink_s, decode_s, e2e_s`` — plus ``cut_bytes_raw`` (decoded size of what crossed
the uplink), ``cut_bytes_wire`` (its size after the codec), ``uplink_bytes`` /
``downlink_bytes`` (whole frames incl. headers), ``codec``, ``clock``
(``shared``/``derived``) and ``sample`` (0-based, warm-up excluded). At k = N nothing
crosses: link timings and wire bytes are 0 and ``cut_bytes_raw`` is the outputs' size.

This module owns the client side only; the agent is ``nodes.agent``.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from nodes import protocol as P
from testbed.errors import NodeError, ProtocolError

DEFAULT_TIMEOUT_S = 30.0


class AgentClient:
    """Control-plane client of one agent.

    Args:
        host, port: the agent's control address.
        token: the run token (the agent's ``TESTBED_TOKEN``).
        node_name: used in error messages (``node local: ...``).
        timeout: seconds to wait for a reply to quick operations; ``run``,
            ``deliver_part``/``fetch_part``, ``kpis`` and ``profile_layers`` take their own.
    """

    def __init__(self, host: str, port: int, token: str, node_name: str = "",
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.host, self.port, self.token = host, int(port), token
        self.node_name = node_name or f"{host}:{port}"
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._last_used = 0.0
        self._lock = threading.Lock()
        if not P.valid_token(token):
            # Refused here rather than sent: the agent would refuse it anyway.
            raise ProtocolError(f"node {self.node_name}: the run token must be 1..."
                                f"{P.MAX_TOKEN_CHARS} printable ASCII characters without spaces")

    # ----------------------------------------------------------------- plumbing
    def _connect(self) -> socket.socket:
        if self._sock is not None and self._stale(self._sock):
            self._drop()
        if self._sock is None:
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as e:
                raise NodeError(f"cannot reach agent control {self.host}:{self.port}: {e}",
                                node=self.node_name) from e
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def _stale(self, sock: socket.socket) -> bool:
        """True when the cached connection should not be reused: idle long enough that
        the agent may close it any moment, or already closed (or reset) by the agent.
        Between requests nothing is due from the agent, so anything readable means EOF."""
        if time.monotonic() - self._last_used > P.CONTROL_IDLE_S / 2:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def call(self, op: str, buffers: Sequence[Any] = (), timeout: float | None = None,
             **args: Any) -> tuple[Any, bytearray]:
        """One request/reply; returns (result, reply payload). Raises NodeError/ProtocolError."""
        with self._lock:
            frame = self._exchange(op, buffers, timeout, args)
        h = frame.header
        if h.get("ok") is True:
            try:
                return P.reply_result(frame)  # the result may travel in the payload
            except P.FrameError as e:
                raise ProtocolError(f"node {self.node_name}: {op}: {e}") from e
        message = str(h.get("error", "unspecified error"))
        if h.get("kind") == "protocol":
            raise ProtocolError(f"node {self.node_name}: {message}")
        raise NodeError(message, node=self.node_name)

    def _exchange(self, op: str, buffers: Sequence[Any], timeout: float | None,
                  args: Mapping[str, Any]) -> P.Frame:
        """Send one request, read one reply (under the lock); maps every failure."""
        wait = timeout if timeout is not None else self.timeout
        if wait is not None and not (isinstance(wait, (int, float)) and wait > 0):
            raise ProtocolError(f"node {self.node_name}: {op}: reply timeout must be > 0 s "
                                f"or None, got {wait!r}")
        sock = self._connect()
        sock.settimeout(wait)
        try:
            try:
                P.send_frame(sock, P.request_header(op, self.token, **args), buffers)
            except OSError:
                # The agent may have refused the request before its payload and closed:
                # its reason is worth more than "broken pipe".
                refusal = self._read_refusal(sock)
                if refusal is None:
                    raise
                frame = refusal
            else:
                frame = P.recv_frame(sock)
        except P.PeerClosed as e:
            self._drop()
            raise NodeError(f"{op}: agent closed the control connection", node=self.node_name) from e
        except P.FrameError as e:
            self._drop()
            raise ProtocolError(f"node {self.node_name}: {op}: {e}") from e
        except socket.timeout as e:
            self._drop()  # a late reply would desynchronise the connection
            raise NodeError(f"{op}: no reply within {sock.gettimeout()} s",
                            node=self.node_name) from e
        except OSError as e:
            self._drop()
            raise NodeError(f"{op}: {e}", node=self.node_name) from e
        except (TypeError, ValueError) as e:  # buffers that are not bytes-like
            self._drop()
            raise ProtocolError(f"node {self.node_name}: {op}: cannot encode request: {e}") from e
        self._last_used = time.monotonic()
        if frame.header.get("ok") is not True and frame.header.get("kind") != "node":
            self._drop()  # after a refusal the agent closes the connection; start afresh
        return frame

    @staticmethod
    def _read_refusal(sock: socket.socket) -> P.Frame | None:
        try:
            sock.settimeout(1.0)
            frame = P.recv_frame(sock)
        except (P.FrameError, OSError):
            return None
        return frame if frame.header.get("ok") is False else None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- operations
    def _field(self, result: Any, key: str, op: str, kind: type) -> Any:
        """``result[key]`` when the reply has that shape, else ProtocolError."""
        value = result.get(key) if isinstance(result, dict) else None
        if not isinstance(value, kind):
            raise ProtocolError(f"node {self.node_name}: {op}: reply lacks {key!r} "
                                f"({kind.__name__})")
        return value

    def _object(self, op: str, timeout: float | None = None, buffers: Sequence[Any] = (),
                **args: Any) -> dict[str, Any]:
        """A call whose result must be a JSON object."""
        result = self.call(op, buffers, timeout=timeout, **args)[0]
        if not isinstance(result, dict):
            raise ProtocolError(f"node {self.node_name}: {op}: reply is not an object")
        return result

    def clock(self, timeout: float | None = None) -> int:
        """The agent's CLOCK_MONOTONIC (ns) when it handled the request (one exchange
        of ``testbed.deploy.clock``'s offset estimate)."""
        t = self._object("clock", timeout).get("t_ns")
        if not isinstance(t, int) or isinstance(t, bool):
            raise ProtocolError(f"node {self.node_name}: clock: reply lacks 't_ns' (int)")
        return t

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """Name, pid, uptime, loaded parts (role -> sha256, bytes, inputs, outputs), peer."""
        return self._object("health", timeout=timeout)

    def load_part(self, role: str, data: bytes | None, sha256: str | None = None,
                  threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Load ``data`` as the ``head``/``tail``/``full`` part; the agent refuses a
        sha256 mismatch. ``data=None`` unloads the role (k = 0 has no head, k = N no tail)."""
        if data is None:
            return self._object("load_part", timeout, role=role, present=False)
        return self._object("load_part", timeout, [data], role=role, sha256=sha256,
                            threads=threads)

    def connect_peer(self, host: str, port: int, timeout: float | None = None) -> dict[str, Any]:
        """Open this (local) agent's data connection to the remote's data address.
        Returns {"peer": name, "clock_shared": bool}."""
        return self._object("connect_peer", timeout, host=host, port=int(port))

    def stage_part(self, data: bytes, sha256: str, timeout: float | None = None) -> dict[str, Any]:
        """Hand the (remote) agent a part to deliver to its peer later."""
        return self._object("stage_part", timeout, [data], sha256=sha256)

    def fetch_part(self, sha256: str, role: str = "head", threads: int | None = None,
                   clock_shared: bool | None = None, timeout: float | None = 600.0,
                   clock_offset_ns: int | None = None) -> dict[str, Any]:
        """(Local) pull a staged part from the peer over the shaped downlink and load it.
        Returns {"delivery_s", "bytes", "wire_bytes", "load_s", "request_to_loaded_s", "clock"}.
        ``clock_offset_ns``: remote - local clock measured by the caller, used as given."""
        args: dict[str, Any] = {"clock_offset_ns": clock_offset_ns} if clock_offset_ns is not None else {}
        return self._object("fetch_part", timeout, sha256=sha256, role=role, threads=threads,
                            clock_shared=clock_shared, **args)

    def deliver_part(self, to_peer: "AgentClient", data: bytes, sha256: str, role: str = "head",
                     threads: int | None = None, clock_shared: bool | None = None,
                     timeout: float | None = 600.0, clock_offset_ns: int | None = None) -> dict[str, Any]:
        """Model delivery: call on the REMOTE's client; the part goes remote -> local over
        the shaped downlink (``to_peer`` is the local's client, already connected to this
        node with ``connect_peer``), timed, and is loaded there as ``role``."""
        self.stage_part(data, sha256)
        return to_peer.fetch_part(sha256, role=role, threads=threads,
                                  clock_shared=clock_shared, timeout=timeout, clock_offset_ns=clock_offset_ns)

    def set_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
                   timeout: float | None = None) -> dict[str, Any]:
        """The model inputs (by input tensor NAME) samples use; a list is cycled through.
        Pre-processing happens before this, so it is not timed."""
        sets = [inputs] if isinstance(inputs, Mapping) else list(inputs)
        meta, buffers = [], []
        try:
            for s in sets:
                descs, bufs, _ = P.encode_tensors({n: np.asarray(a) for n, a in s.items()},
                                                  P.codec_registry())
                meta.append({"tensors": descs,
                             "payload_bytes": sum(d["nbytes"] for d in descs)})
                buffers.extend(bufs)
        except P.FrameError as e:
            raise ProtocolError(f"node {self.node_name}: set_inputs: {e}") from e
        return self._object("set_inputs", timeout, buffers, sets=meta)

    def run(self, samples: int, warmup: int = 0, *,
            inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
            codec: str = "raw", input_encoding: str = "raw",
            model_outputs: Sequence[str] = (), clock_shared: bool | None = None,
            max_seconds: float | None = None, timeout: float | None = 3600.0,
            clock_offset_ns: int | None = None) -> list[dict[str, Any]]:
        """(Local) run ``warmup`` + ``samples`` samples; returns one timing dict per sample.

        Args:
            inputs: set the inputs first (else those of the last ``set_inputs``).
            codec: codec of the cut tensors (``raw``).
            input_encoding: codec of model inputs crossing the link (k = 0): raw|png|jpeg.
            model_outputs: names of the model's outputs; needed only when a cut tensor
                is both a model output and read by the tail (DAGs).
            clock_shared: None = detect (same boot id and time namespace).
            max_seconds: stop after this long (at least one sample is kept).
            clock_offset_ns: remote - local clock measured by the caller (``testbed.deploy.clock``);
                the agent then uses it instead of its own estimate (rows ``derived``).
        """
        return self.run_detailed(samples, warmup, inputs=inputs, codec=codec, input_encoding=input_encoding,
                                 model_outputs=model_outputs, clock_shared=clock_shared,
                                 max_seconds=max_seconds, timeout=timeout,
                                 clock_offset_ns=clock_offset_ns)["samples"]

    def run_detailed(self, samples: int, warmup: int = 0, *,
                     inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
                     codec: str = "raw", input_encoding: str = "raw",
                     model_outputs: Sequence[str] = (), clock_shared: bool | None = None,
                     max_seconds: float | None = None, timeout: float | None = 3600.0,
                     clock_offset_ns: int | None = None, **data_path: Any) -> dict[str, Any]:
        """Like ``run``, returning ``{"samples": [...], "phases": {"handshake_s",
        "warmup_s", "sampling_s"}, "stream": {...}}``: where the call's time went on the node.

        ``data_path`` (optional, see ``nodes.agent._data_path``): ``topology`` (1..3),
        ``transport`` (tcp|udp), ``on_loss`` (zero|drop), ``rate_bps`` (UDP pacing),
        ``fidelity`` (compare with the uncompressed split), ``input_size``, and
        ``stream={"fps", "duration_s", "queue"}`` for a stream run. ``clock_offset_ns``
        as in ``run``."""
        if inputs is not None:
            self.set_inputs(inputs)
        extra = {k: v for k, v in data_path.items() if v is not None}
        if clock_offset_ns is not None:
            extra["clock_offset_ns"] = int(clock_offset_ns)
        result = self.call("run", timeout=timeout, samples=int(samples), warmup=int(warmup),
                           codec=codec, input_encoding=input_encoding,
                           model_outputs=list(model_outputs), clock_shared=clock_shared,
                           max_seconds=max_seconds, **extra)[0]
        rows = self._field(result, "samples", "run", list)
        if not all(isinstance(r, dict) for r in rows):
            raise ProtocolError(f"node {self.node_name}: run: a sample row is not an object")
        if not isinstance(result.setdefault("phases", {}), dict):
            raise ProtocolError(f"node {self.node_name}: run: 'phases' is not an object")
        return result

    def outputs(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Final outputs (by name) of the last sample run on this (local) node."""
        result, payload = self.call("outputs", timeout=timeout)
        try:
            descs = self._field(result, "tensors", "outputs", list)
            arrays = P.decode_tensors(descs, payload, P.codec_registry())
        except (P.FrameError, KeyError, TypeError) as e:
            raise ProtocolError(f"node {self.node_name}: outputs: {e}") from e
        return {n: np.array(a) for n, a in arrays.items()}

    def kpis(self, role: str, runs: int = 20, warmup: int = 3, threads: int | None = None,
             timeout: float | None = 900.0) -> dict[str, Any]:
        """benchmark_model KPIs of the loaded ``role`` part, measured in a fresh process on
        the node: init_s, first_s, warmup_mean_s, steady_mean_s, steady_std_s,
        steady_p50_s, steady_p90_s, init_memory_bytes, peak_memory_bytes."""
        return self._object("kpis", timeout, role=role, runs=runs, warmup=warmup,
                            threads=threads)

    def warm(self, role: str, count: int, timeout: float | None = 600.0) -> dict[str, Any]:
        """Invoke the loaded ``role`` part ``count`` times on the node (no link involved)."""
        return self._object("warm", timeout, role=role, count=int(count))

    def profile_layers(self, models: Sequence[bytes], runs: int = 20, warmup: int = 3,
                       threads: int | None = None, timeout: float | None = 1800.0,
                       ) -> list[dict[str, Any]]:
        """Latency of each one-layer model on this node: list of {mean_s, p50_s, p90_s, std_s}."""
        result = self.call("profile_layers", list(models), timeout=timeout,
                           sizes=[len(m) for m in models], runs=runs, warmup=warmup,
                           threads=threads)[0]
        return self._field(result, "layers", "profile_layers", list)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Ask the agent to exit; an agent already gone is fine."""
        try:
            self.call("shutdown", timeout=timeout)
        except NodeError:
            pass
        finally:
            self.close()


class Lease:
    """Holds one agent's lease (``nodes.lease``) for as long as this object is open.

    A dedicated control connection that sends ``lease`` once and then stays open,
    idle: the agent counts it as its orchestrator. Closing it (``close()``, or this
    process dying, SIGKILL included) starts the agent's grace period, after which it
    exits. Nothing needs to run in the background: the agent learns of the loss from
    the connection closing (or from TCP keepalive if the host vanishes).
    """

    def __init__(self, host: str, port: int, token: str, node_name: str = "",
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._client = AgentClient(host, port, token, node_name, timeout)
        self.info = self._client.call("lease")[0]

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
