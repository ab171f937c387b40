"""The node agent: ``python -m nodes.agent --name N --control-listen H:P --data-listen H:P
--metrics-listen H:P --workdir DIR [--lease-s S]`` with the run token in env ``TESTBED_TOKEN``.

Three listeners, one process:

* **control** (TCP, the node's control address, never the shaped link): the
  orchestrator's requests, one frame each (``nodes.protocol``), every one carrying the
  run token, checked before the payload is read (``protocol.admit_request``).
  Operations: ``health``, ``lease``, ``clock``, ``load_part``, ``stage_part``, ``fetch_part``,
  ``connect_peer``, ``disconnect_peer``, ``set_inputs``, ``run``, ``outputs``, ``kpis``,
  ``profile_layers``, ``shutdown``.
* **data** (TCP, the node's data address, shaped): the peer agent's frames, after the
  mutual challenge-response handshake (``protocol.data_handshake_remote``), served by
  ``nodes.answer.serve_data_connection``.
* **metrics** (HTTP, control side): ``nodes.agent_metrics``.

Every listener is a ``nodes.serving`` server: a listen backlog of 128, a cap on open
and on not-yet-authenticated connections, and a total deadline to authenticate (10 s
control, 30 s data, 10 s per /metrics request). An authenticated control connection
idle for ``CONTROL_IDLE_S`` is closed, except the lease holder's (``nodes.lease``:
with ``--lease-s`` the agent exits once nobody has held its lease for that long, so it
does not outlive its orchestrator). Arguments of every operation are checked for type
and range; a bad one is a ``node`` error reply, never a traceback.

A listening port of 0 picks a free port; the agent then writes the bound addresses to
``WORKDIR/agent.json`` (and prints them as one ``READY {...}`` line on stdout) so a
launcher can find them. A frame that does not parse, or a request without the token,
gets an error reply, that connection is closed, and the agent keeps serving.

The agent imports numpy, LiteRT, psutil/prometheus_client and the standard library only,
never ``testbed``. Part files are written to ``WORKDIR/parts`` because the KPI
benchmark re-reads them in a fresh process (``nodes.benchmark``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from prometheus_client import CollectorRegistry

from nodes import answer, pipeline, runs, serving
from nodes import protocol as P
from nodes.addresses import parse_host_port
from nodes.agent_metrics import METRICS_LIMITS, AgentMetrics
from nodes.agent_metrics import serve as serve_metrics
from nodes.cpu_account import CpuAccount
from nodes.lease import EXIT_LEASE_EXPIRED, Lease, keep_alive
from nodes.part import Part, sha256_of
from nodes.pipeline import RunSpec, StepError
from nodes.zygote import Zygote, ZygoteError

ROLES = ("head", "tail", "full")
log = logging.getLogger("nodes.agent")
#: Parts kept for delivery to the peer (oldest dropped first), by count and by bytes.
MAX_STAGED = 4
MAX_STAGED_BYTES = P.MAX_PAYLOAD_BYTES
#: Connection caps per port. Legitimate use: the orchestrator's client, its lease and a
#: probe per node on control; one link (plus a reconnect) on data.
CONTROL_LIMITS = serving.Limits(max_conns=32, max_preauth=16, preauth_s=P.CONTROL_PREAUTH_S)
DATA_LIMITS = serving.Limits(max_conns=8, max_preauth=4, preauth_s=P.DATA_PREAUTH_S)
#: Ranges of operation arguments: far above any experiment, far below "pins the node
#: for a year".
MAX_SAMPLES = 1_000_000
MAX_RUNS = 100_000
MAX_THREADS = 256
MAX_LAYER_MODELS = 4096
MAX_INPUT_SETS = 1024
MAX_CONNECT_S = 600.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port), for argparse."""
    return parse_host_port(text)


# ------------------------------------------------------------------------- argument checks
# Each raises StepError naming the argument and its range: a node error reply, one line.

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise StepError(f"{name} must be an integer in {lo}..{hi}, got {P.shorten(value)}")
    return value


def _opt_int(value: Any, name: str, lo: int, hi: int) -> int | None:
    return None if value is None else _int(value, name, lo, hi)


def _opt_seconds(value: Any, name: str, hi: float) -> float | None:
    if value is None:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not 0 <= value <= hi):
        raise StepError(f"{name} must be a number of seconds in 0..{hi:g}, got {P.shorten(value)}")
    return float(value)


def _opt_bool(value: Any, name: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise StepError(f"{name} must be true, false or null, got {P.shorten(value)}")
    return value


def _text(value: Any, name: str, max_chars: int = 64) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        raise StepError(f"{name} must be a string of 1..{max_chars} characters, "
                        f"got {P.shorten(value)}")
    return value


def _names(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > P.MAX_TENSORS:
        raise StepError(f"{name} must be a list of at most {P.MAX_TENSORS} tensor names")
    return [_text(v, name, P.MAX_NAME_CHARS) for v in value]


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise StepError(f"sha256 must be 64 lowercase hex digits, got {P.shorten(value)}")
    return value


def _role(value: Any) -> str:
    if value not in ROLES:
        raise StepError(f"role must be one of {ROLES}, not {P.shorten(value)}")
    return value


def _threads(value: Any) -> int | None:
    return _opt_int(value, "threads", 1, MAX_THREADS)


#: A clock offset handed in by the orchestrator: a year either way is far beyond any
#: two CLOCK_MONOTONICs of machines that are up.
MAX_OFFSET_NS = 365 * 24 * 3600 * 10**9


def _data_path(args: dict[str, Any]) -> dict[str, Any]:
    """Checked data-path arguments of ``run`` (topology, transport, loss, fidelity)."""
    unknown = set(args) - {"topology", "transport", "on_loss", "rate_bps", "fidelity", "input_size"}
    if unknown:
        raise StepError(f"bad arguments: unknown {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "topology" in args:
        out["topology"] = _int(args["topology"], "topology", 1, 3)
    for name, allowed in (("transport", pipeline.TRANSPORTS), ("on_loss", pipeline.ON_LOSS)):
        if name in args:
            if args[name] not in allowed:
                raise StepError(f"{name} must be one of {allowed}, got {P.shorten(args[name])}")
            out[name] = args[name]
    if args.get("rate_bps") is not None:
        out["rate_bps"] = float(_int(args["rate_bps"], "rate_bps", 1, 2**40))
    if "fidelity" in args:
        out["fidelity"] = bool(_opt_bool(args["fidelity"], "fidelity"))
    if args.get("input_size") is not None:
        out["input_size"] = _int(args["input_size"], "input_size", 1, P.MAX_DIM)
    return out


def _stream(stream: Any) -> dict[str, Any]:
    """``stream: {fps, duration_s, queue}`` of ``run`` (None: single mode)."""
    if stream is None:
        return {}
    if not isinstance(stream, dict) or set(stream) - {"fps", "duration_s", "queue"}:
        raise StepError("stream must be an object with fps, duration_s and queue")
    fps = _opt_seconds(stream.get("fps", 30.0), "stream.fps", 10_000.0)
    duration = _opt_seconds(stream.get("duration_s", 10.0), "stream.duration_s", 24 * 3600.0)
    if not fps or not duration or fps * duration > MAX_SAMPLES:
        raise StepError(f"stream: fps and duration_s must be positive, at most {MAX_SAMPLES} frames")
    return {"mode": "stream", "fps": fps, "duration_s": duration,
            "queue": _int(stream.get("queue", 2), "stream.queue", 1, 10_000)}


class Agent:
    """State of one node: loaded parts, staged parts, the peer link, inputs, last outputs."""

    def __init__(self, name: str, token: str, workdir: Path, threads: int | None = None,
                 registry: CollectorRegistry | None = None, lease_s: float | None = None,
                 idle_s: float = P.CONTROL_IDLE_S) -> None:
        if not P.valid_token(token):
            raise ValueError("the run token must be 1..256 printable ASCII characters")
        self.name, self.token, self.threads = name, token, threads
        self.workdir = workdir
        (workdir / "parts").mkdir(parents=True, exist_ok=True)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = AgentMetrics(self.registry, name)
        self.parts: dict[str, Part] = {}
        self._staged: dict[str, bytes | bytearray] = {}
        self._state_lock = threading.Lock()  # parts / staged / link swaps
        self._tail_lock = threading.Lock()
        self._run_lock = threading.Lock()  # one run/fetch at a time on the link
        self.link: pipeline.LocalLink | None = None
        self.inputs: list[dict[str, np.ndarray]] = []
        self.last_outputs: dict[str, np.ndarray] = {}
        self.started = time.monotonic()
        self.stop = threading.Event()
        # This node's cgroup CPU counters, reported per sample (throttling, CPU time).
        self.cpu = CpuAccount.find()
        self._zygote: Zygote | None = None  # started at the first KPI request
        self._zygote_lock = threading.Lock()
        self.lease = Lease(lease_s)
        self.idle_s = idle_s
        self.refusals = serving.RateLimitedLog(log)

    # RemoteState for answer.serve_data_connection
    def tail(self) -> Part | None:
        return self.parts.get("tail")

    def part(self, role: str) -> Part | None:
        return self.parts.get(role)

    def staged(self, sha256: str) -> bytes | bytearray | None:
        return self._staged.get(sha256)

    def tail_lock(self) -> threading.Lock:
        return self._tail_lock

    def observe(self, part: str, seconds: float, role: str | None = None) -> None:
        self.metrics.inference(part, seconds)
        if role:
            self.metrics.sample_served(role)

    # ------------------------------------------------------------------ data plane
    def handle_data(self, conn: socket.socket, ctx: serving.Conn | None = None) -> None:
        """One data connection: the mutual handshake, then the pipeline's conversation."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        welcome = {"node": self.name, **pipeline.clock_identity()}
        try:
            P.data_handshake_remote(conn, self.token, welcome)
        except P.PeerClosed:
            conn.close()
            return
        except P.FrameError as e:
            self.refusals.warning("data: refused %s: %s", serving.peer_name(conn), e)
            self._refuse(conn, {"kind": "error", "error": f"refused: {e}"})
            return
        except OSError:
            conn.close()
            return
        if ctx is not None:
            ctx.authenticated()
        answer.serve_data_connection(conn, self)

    @staticmethod
    def _refuse(conn: socket.socket, header: dict[str, Any]) -> None:
        try:
            P.send_frame(conn, header)
        except OSError:
            pass
        serving.linger_close(conn)

    # ------------------------------------------------------------------ control plane
    def handle_control(self, conn: socket.socket, ctx: serving.Conn | None = None) -> None:
        """Serve control requests on one connection until it closes, idles out or
        misbehaves. The token and the payload rule are checked before the payload is
        read; a refusal is answered (kind ``protocol``) and closes the connection."""
        admit = P.admit_request(self.token)
        holding = False
        conn.settimeout(self.idle_s)  # idle between requests, or stalled mid-frame
        try:
            while not self.stop.is_set():
                try:
                    frame = P.recv_frame(conn, admit=admit)
                except P.PeerClosed:
                    return
                except P.FrameError as e:
                    self.refusals.warning("control: refused a frame from %s: %s",
                                          serving.peer_name(conn), e)
                    self._refuse(conn, P.error_header(f"refused: {e}", kind="protocol"))
                    return
                if ctx is not None:
                    ctx.authenticated()
                op, args = P.parse_request(frame.header, self.token)
                if op == "lease" and not args and not holding:
                    holding = True
                    self.lease.take()
                    keep_alive(conn)  # the holder idles by design: no read timeout
                header, blobs = self._execute(op, args, frame.payload)
                del frame  # the payload can be large: do not keep it across the reply
                try:
                    P.send_frame(conn, header, blobs)
                except P.FrameError as e:  # nothing was sent: say why instead of vanishing
                    P.send_frame(conn, P.error_header(f"{op}: reply cannot be framed: {e}"))
                if op == "shutdown":
                    self.stop.set()
                    return
        except OSError:
            pass  # the orchestrator went away mid-reply, or the connection idled out
        finally:
            if holding:
                self.lease.drop()
                if self.lease.grace_s is not None and not self.stop.is_set():
                    log.warning("control: the lease holder is gone; exiting in %g s unless "
                                "a new lease is taken", self.lease.grace_s)
            conn.close()

    def _execute(self, op: str, args: dict[str, Any], payload: bytearray,
                 ) -> tuple[dict[str, Any], list[Any]]:
        """Run one operation; every failure becomes an error header."""
        try:
            result, blobs = self.dispatch(op, args, payload)
            return P.ok_reply(result, blobs)  # a large result goes in the payload
        except (StepError, P.FrameError, KeyError, ValueError, OSError, RuntimeError,
                subprocess.SubprocessError) as e:
            # expected failures (bad input, a part LiteRT refuses, a KPI child that
            # failed or timed out): one line back, no traceback in the log
            return P.error_header(f"{op}: {e}"), []
        except Exception as e:  # a bug or a runtime failure: report, keep serving
            log.exception("control: %s failed", op)
            return P.error_header(f"{op}: {type(e).__name__}: {e}"), []

    def dispatch(self, op: str, args: dict[str, Any], payload: bytearray,
                 ) -> tuple[Any, list[Any]]:
        handler = getattr(self, f"op_{op}", None) if op in OPERATIONS else None
        if handler is None:
            raise StepError(f"unknown operation {P.shorten(op)}")
        try:
            inspect.signature(handler).bind(payload, **args)
        except TypeError as e:  # unknown or missing argument names
            raise StepError(f"bad arguments: {e}") from None
        return handler(payload, **args)

    def op_lease(self, payload: bytearray) -> tuple[Any, list[Any]]:
        """Hold the agent's lease on this connection (see ``nodes.lease``)."""
        return {"grace_s": self.lease.grace_s, "holders": self.lease.holders}, []

    def op_clock(self, payload: bytearray) -> tuple[Any, list[Any]]:
        """This node's CLOCK_MONOTONIC now (ns): one NTP-style exchange for the
        orchestrator's clock-offset estimate (``testbed.deploy.clock``)."""
        return {"t_ns": pipeline.now()}, []

    def op_health(self, payload: bytearray) -> tuple[Any, list[Any]]:
        return {"name": self.name, "pid": os.getpid(),
                "uptime_s": time.monotonic() - self.started,
                "parts": {r: p.describe() for r, p in self.parts.items()},
                "staged": sorted(self._staged), "peer": self.link is not None,
                "inputs": len(self.inputs), "cpu_account": self.cpu.describe(),
                "lease_holders": self.lease.holders,
                **pipeline.clock_identity()}, []

    def op_load_part(self, payload: bytearray, role: str, sha256: str | None = None,
                     threads: int | None = None, present: bool = True) -> tuple[Any, list[Any]]:
        """Load (or with ``present=False`` unload) the part for ``role``."""
        role = _role(role)
        if not _opt_bool(present, "present"):
            with self._state_lock:
                self.parts.pop(role, None)
            return {"role": role, "loaded": False}, []
        part = self._install(role, payload, _sha256(sha256), _threads(threads))
        return {"role": role, "loaded": True, **part.describe()}, []

    def _install(self, role: str, data: bytes | bytearray, sha256: str,
                 threads: int | None) -> Part:
        got = sha256_of(data)
        if got != sha256:
            raise StepError(f"part refused: sha256 {got} does not match expected {sha256}")
        path = self.workdir / "parts" / f"{role}-{got[:16]}.tflite"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        part = Part(path, got, threads if threads is not None else self.threads)
        with self._state_lock:
            old = self.parts.get(role)
            self.parts[role] = part
        if old is not None and old.path != path:
            old.path.unlink(missing_ok=True)
        return part

    def op_stage_part(self, payload: bytearray, sha256: str) -> tuple[Any, list[Any]]:
        """Keep a part to hand to the peer on ``fetch`` (model delivery over the downlink).

        At most MAX_STAGED parts and MAX_STAGED_BYTES in all are kept, oldest dropped
        first: staging is repeated per configuration and must not add up."""
        sha256 = _sha256(sha256)
        got = sha256_of(payload)
        if got != sha256:
            raise StepError(f"staged part refused: sha256 {got} != expected {sha256}")
        with self._state_lock:
            self._staged.pop(sha256, None)
            self._staged[sha256] = payload  # the receive buffer itself: no second copy
            while (len(self._staged) > MAX_STAGED
                   or sum(len(b) for b in self._staged.values()) > MAX_STAGED_BYTES):
                self._staged.pop(next(iter(self._staged)))
        return {"sha256": sha256, "bytes": len(payload)}, []

    def op_fetch_part(self, payload: bytearray, sha256: str, role: str = "head",
                      threads: int | None = None, clock_shared: bool | None = None,
                      clock_offset_ns: int | None = None) -> tuple[Any, list[Any]]:
        """Pull a staged part from the peer over the shaped downlink, time it, load it."""
        sha256, role, threads = _sha256(sha256), _role(role), _threads(threads)
        clock_shared = _opt_bool(clock_shared, "clock_shared")
        offset = _opt_int(clock_offset_ns, "clock_offset_ns", -MAX_OFFSET_NS, MAX_OFFSET_NS)
        with self._run_lock:
            link = self._need_link()
            with self._link_guard():
                data, timing = pipeline.fetch_part(link, sha256, clock_shared, offset)
        t0 = time.monotonic()
        self._install(role, data, sha256, threads)
        timing["load_s"] = time.monotonic() - t0
        return timing, []

    @contextlib.contextmanager
    def _link_guard(self) -> Iterator[None]:
        """Drop the data link when it breaks mid-conversation: after a half-read frame
        or a reset the stream is out of step, so the next run must reconnect."""
        try:
            yield
        except (P.FrameError, OSError) as e:
            if self.link is not None:
                self.link.close()
                self.link = None
            raise StepError(f"data link to the peer lost ({e}); connect_peer again") from e

    def _need_link(self) -> pipeline.LocalLink:
        if self.link is None:
            raise StepError("no peer connected: call connect_peer first")
        return self.link

    def op_connect_peer(self, payload: bytearray, host: str, port: int,
                        timeout: float = 10.0) -> tuple[Any, list[Any]]:
        host, port = _text(host, "host", 255), _int(port, "port", 1, 65535)
        timeout = _opt_seconds(timeout, "timeout", MAX_CONNECT_S) or 10.0
        with self._run_lock:
            if self.link is not None:
                self.link.close()
                self.link = None
            self.link = pipeline.LocalLink(host, port, self.token, timeout)
        return {"peer": self.link.peer_name, "clock_shared": self.link.clock_shared}, []

    def op_disconnect_peer(self, payload: bytearray) -> tuple[Any, list[Any]]:
        with self._run_lock:
            if self.link is not None:
                self.link.close()
            self.link = None
        return {"peer": None}, []

    def op_set_inputs(self, payload: bytearray, sets: Any) -> tuple[Any, list[Any]]:
        """Inputs for the samples (cycled): ``sets`` = list of sizes per input set,
        ``tensors`` in each set described like data-plane tensors (raw codec)."""
        if not isinstance(sets, list) or not 0 < len(sets) <= MAX_INPUT_SETS:
            raise StepError(f"'sets' must be a list of 1..{MAX_INPUT_SETS} input sets")
        if not all(isinstance(s, dict) for s in sets):
            raise StepError("each input set must be an object")
        # protocol.admit_request already checked the sizes add up to the payload
        blobs = P.split_blobs(payload, [s.get("payload_bytes") for s in sets])
        inputs = []
        for s, blob in zip(sets, blobs):
            arrays = P.decode_tensors(s.get("tensors"), blob, P.codec_registry())
            if not arrays:
                raise StepError("an input set without tensors")
            inputs.append({n: np.array(a) for n, a in arrays.items()})
        self.inputs = inputs
        return {"sets": len(inputs), "names": sorted(inputs[0])}, []

    def op_run(self, payload: bytearray, samples: int, warmup: int = 0, codec: str = "raw",
               input_encoding: str = "raw", model_outputs: list[str] | None = None,
               clock_shared: bool | None = None, max_seconds: float | None = None,
               clock_offset_ns: int | None = None,
               stream: dict[str, Any] | None = None, **data_path: Any,
               ) -> tuple[Any, list[Any]]:
        """Samples (or a stream) through the data plane; ``data_path`` holds the
        keys of ``_data_path`` (topology, transport, on_loss, rate_bps, fidelity,
        input_size); ``clock_offset_ns`` (remote - local) when the orchestrator
        measured it (an ssh remote's clock)."""
        spec = RunSpec(_int(samples, "samples", 1, MAX_SAMPLES),
                       _int(warmup, "warmup", 0, MAX_SAMPLES), _text(codec, "codec"),
                       _text(input_encoding, "input_encoding"),
                       _names(model_outputs, "model_outputs"),
                       _opt_bool(clock_shared, "clock_shared"),
                       _opt_seconds(max_seconds, "max_seconds", 30 * 24 * 3600.0),
                       offset_ns=_opt_int(clock_offset_ns, "clock_offset_ns", -MAX_OFFSET_NS, MAX_OFFSET_NS),
                       **_data_path(data_path), **_stream(stream))
        role = "head" if spec.topology == 1 else "tail"
        with self._run_lock, self._link_guard():
            result = runs.run_samples(
                self.link, self.parts.get(role), self.inputs, spec,
                observe=lambda part, s: self.metrics.inference(part, s), cpu=self.cpu)
        for _ in range(len(result.rows) + spec.warmup):
            self.metrics.sample_served("local")
        self.last_outputs = {n: np.array(a) for n, a in result.final.items()}
        return {"samples": result.rows, "phases": result.phases, "stream": result.stream}, []

    def op_outputs(self, payload: bytearray) -> tuple[Any, list[Any]]:
        """The final outputs of the last sample, as raw tensors in the payload."""
        descs, bufs, _ = P.encode_tensors(self.last_outputs, P.codec_registry())
        return {"tensors": descs}, bufs

    def op_kpis(self, payload: bytearray, role: str, runs: int = 20, warmup: int = 3,
                threads: int | None = None) -> tuple[Any, list[Any]]:
        """benchmark_model-style KPIs of a loaded part, measured in a fresh process
        (forked from the zygote, which spares the child Python's imports)."""
        role = _role(role)
        runs, warmup = _int(runs, "runs", 1, MAX_RUNS), _int(warmup, "warmup", 0, MAX_RUNS)
        threads = _threads(threads)
        part = self.parts.get(role)
        if part is None:
            raise StepError(f"no {role} part loaded")
        t = threads if threads is not None else part.threads
        try:
            return self.zygote().measure(str(part.path), runs, warmup, t), []
        except ZygoteError as e:
            raise StepError(str(e)) from e

    def zygote(self) -> Zygote:
        with self._zygote_lock:
            if self._zygote is None:
                self._zygote = Zygote()
            return self._zygote

    def op_warm(self, payload: bytearray, role: str, count: int = 1) -> tuple[Any, list[Any]]:
        """Invoke the loaded ``role`` part ``count`` times on fixed inputs: warm-up of
        the interpreter (first invokes pack weights) without crossing the link."""
        role, count = _role(role), _int(count, "count", 0, 10_000)
        part = self.parts.get(role)
        if part is None:
            raise StepError(f"no {role} part loaded")
        feed = part.fixed_inputs()
        t0 = time.monotonic()
        for _ in range(count):
            part.run(feed)
        return {"role": role, "count": count, "seconds": time.monotonic() - t0}, []

    def op_profile_layers(self, payload: bytearray, sizes: list[int], runs: int = 20,
                          warmup: int = 3, threads: int | None = None) -> tuple[Any, list[Any]]:
        """Per-layer latency on this node: one-layer models in the payload, back to back."""
        from nodes.benchmark import time_layers
        if not isinstance(sizes, list) or not 0 < len(sizes) <= MAX_LAYER_MODELS:
            raise StepError(f"'sizes' must list 1..{MAX_LAYER_MODELS} model sizes")
        runs, warmup = _int(runs, "runs", 1, MAX_RUNS), _int(warmup, "warmup", 0, MAX_RUNS)
        threads = _threads(threads)
        models = [bytes(b) for b in P.split_blobs(payload, sizes)]
        t = threads if threads is not None else self.threads
        return {"layers": time_layers(models, runs, warmup, t)}, []

    def op_shutdown(self, payload: bytearray) -> tuple[Any, list[Any]]:
        return {"stopping": True}, []


#: The operations a request may name (``op_<name>`` methods of Agent).
OPERATIONS = frozenset(n[3:] for n in dir(Agent) if n.startswith("op_"))


# ------------------------------------------------------------------------- process

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m nodes.agent", description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--control-listen", required=True, type=parse_listen)
    ap.add_argument("--data-listen", required=True, type=parse_listen)
    ap.add_argument("--metrics-listen", required=True, type=parse_listen)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=None,
                    help="interpreter threads (default: the runtime's choice)")
    ap.add_argument("--lease-s", type=float, default=None,
                    help="exit once no orchestrator has held a lease for this long "
                         "(default: no lease, run until told to stop)")
    ap.add_argument("--preauth-s", type=float, default=None,
                    help=f"seconds a control connection has to authenticate (default "
                         f"{P.CONTROL_PREAUTH_S:g}); the data handshake and a /metrics request "
                         f"get their own default ({P.DATA_PREAUTH_S:g}, "
                         f"{METRICS_LIMITS.preauth_s:g}) or this, whichever is smaller")
    ap.add_argument("--idle-s", type=float, default=P.CONTROL_IDLE_S,
                    help=f"close an authenticated control connection idle this long "
                         f"(default {P.CONTROL_IDLE_S:g})")
    args = ap.parse_args(argv)
    for name in ("lease_s", "preauth_s", "idle_s"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            ap.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return args


def _servers(agent: Agent, args: argparse.Namespace) -> list[Any]:
    """The three listeners (raises OSError when an address cannot be bound)."""
    limits = {"control": CONTROL_LIMITS, "data": DATA_LIMITS, "metrics": METRICS_LIMITS}
    if args.preauth_s is not None:  # shorter deadlines (tests); never longer ones
        limits = {k: dataclasses.replace(v, preauth_s=min(v.preauth_s, args.preauth_s))
                  if k != "control" else dataclasses.replace(v, preauth_s=args.preauth_s)
                  for k, v in limits.items()}
    busy = "refused: too many connections, try again"
    control = serving.TCPServer(args.control_listen, agent.handle_control, limits["control"],
                                "control", P.pack_header(P.error_header(busy, kind="busy"), 0))
    data = serving.TCPServer(args.data_listen, agent.handle_data, limits["data"], "data",
                             P.pack_header({"kind": "error", "error": busy}, 0))
    mhost, mport = args.metrics_listen
    return [control, data, serve_metrics(agent.registry, mhost, mport, limits["metrics"])]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    token = os.environ.get("TESTBED_TOKEN", "")
    if not token:
        print("nodes.agent: TESTBED_TOKEN is not set; refusing to start without a run token",
              file=sys.stderr)
        return 2
    if not P.valid_token(token):
        print("nodes.agent: TESTBED_TOKEN must be 1..256 printable ASCII characters without "
              "spaces", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s agent {args.name}: %(levelname)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    agent = Agent(args.name, token, args.workdir, args.threads, lease_s=args.lease_s,
                  idle_s=args.idle_s)
    try:
        control, data, metrics = _servers(agent, args)
    except OSError as e:
        print(f"nodes.agent {args.name}: cannot listen: {e}", file=sys.stderr)
        return 1
    for s in (control, data):
        serving.start(s)
    ready = {"name": args.name, "pid": os.getpid(),
             "control": [args.control_listen[0], control.server_address[1]],
             "data": [args.data_listen[0], data.server_address[1]],
             "metrics": [args.metrics_listen[0], metrics.server_port]}
    tmp = args.workdir / "agent.json.tmp"
    tmp.write_text(json.dumps(ready))
    tmp.replace(args.workdir / "agent.json")
    print("READY " + json.dumps(ready), flush=True)
    log.info("serving: %s (lease: %s)", ready,
             f"{args.lease_s:g} s" if args.lease_s else "none")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    status = 0
    while not agent.stop.wait(0.1):
        if agent.lease.expired():
            log.warning("nobody has held the lease for %g s: the orchestrator is gone; exiting",
                        args.lease_s)
            status = EXIT_LEASE_EXPIRED
            break
    time.sleep(0.05)  # let the shutdown reply leave
    for s in (control, data):
        s.shutdown()
        s.server_close()
    # The metrics server polls like the others, but the process is about to exit:
    # close its socket instead of waiting for shutdown().
    metrics.server_close()
    if agent.link is not None:
        agent.link.close()
    if agent._zygote is not None:
        agent._zygote.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
