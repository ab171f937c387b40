"""The node agent: ``python -m nodes.agent --name N --control-listen H:P --data-listen H:P
--metrics-listen H:P --workdir DIR`` with the run token in env ``TESTBED_TOKEN``.

Three listeners, one process:

* **control** (TCP, the node's control address, never the shaped link): the
  orchestrator's requests, one frame each (``nodes.protocol``), every one carrying the
  run token. Operations: ``health``, ``load_part``, ``stage_part``, ``fetch_part``,
  ``connect_peer``, ``set_inputs``, ``run``, ``outputs``, ``kpis``, ``profile_layers``,
  ``shutdown``.
* **data** (TCP, the node's data address, shaped): the peer agent's frames
  (``nodes.pipeline.serve_data_connection``).
* **metrics** (HTTP, control side): ``nodes.agent_metrics``.

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
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry

from nodes import protocol as P
from nodes import pipeline
from nodes.agent_metrics import AgentMetrics, serve as serve_metrics
from nodes.cpu_account import CpuAccount
from nodes.zygote import Zygote, ZygoteError
from nodes.part import Part, sha256_of
from nodes.pipeline import RunSpec, StepError

ROLES = ("head", "tail", "full")
log = logging.getLogger("nodes.agent")
MAX_STAGED = 4  # parts kept for delivery; older ones are dropped


def _peer(conn: socket.socket) -> str:
    try:
        return "%s:%s" % conn.getpeername()[:2]
    except OSError:
        return "?"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handle: Callable[[socket.socket], None]):
        self.handle_conn = handle
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.handle_conn(self.request)  # type: ignore[attr-defined]


class Agent:
    """State of one node: loaded parts, staged parts, the peer link, inputs, last outputs."""

    def __init__(self, name: str, token: str, workdir: Path, threads: int | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        if not token:
            raise ValueError("empty run token")
        self.name, self.token, self.threads = name, token, threads
        self.workdir = workdir
        (workdir / "parts").mkdir(parents=True, exist_ok=True)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = AgentMetrics(self.registry, name)
        self.parts: dict[str, Part] = {}
        self._staged: dict[str, bytes] = {}
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

    # RemoteState for pipeline.serve_data_connection
    def tail(self) -> Part | None:
        return self.parts.get("tail")

    def staged(self, sha256: str) -> bytes | None:
        return self._staged.get(sha256)

    def tail_lock(self) -> threading.Lock:
        return self._tail_lock

    def observe(self, part: str, seconds: float, role: str | None = None) -> None:
        self.metrics.inference(part, seconds)
        if role:
            self.metrics.sample_served(role)

    # ------------------------------------------------------------------ control plane
    def handle_control(self, conn: socket.socket) -> None:
        """Serve control requests on one connection until it closes or misbehaves."""
        try:
            while not self.stop.is_set():
                try:
                    frame = P.recv_frame(conn, before_payload=lambda h: P.check_token(h, self.token))
                    op, args = P.parse_request(frame.header, self.token)
                except P.PeerClosed:
                    return
                except P.FrameError as e:
                    log.warning("control: refused a frame from %s: %s", _peer(conn), e)
                    P.send_frame(conn, P.error_header(f"refused: {e}", kind="protocol"))
                    return
                try:
                    result, blobs = self.dispatch(op, args, frame.payload)
                    header = P.ok_header(result)
                except (StepError, P.FrameError, KeyError, ValueError, OSError) as e:
                    header, blobs = P.error_header(f"{op}: {e}"), []
                except Exception as e:  # a bug or a runtime failure: report, keep serving
                    log.exception("control: %s failed", op)
                    header, blobs = P.error_header(f"{op}: {type(e).__name__}: {e}"), []
                P.send_frame(conn, header, blobs)
                if op == "shutdown":
                    self.stop.set()
                    return
        except OSError:
            pass  # the orchestrator went away mid-reply
        finally:
            conn.close()

    def dispatch(self, op: str, args: dict[str, Any], payload: bytearray,
                 ) -> tuple[Any, list[Any]]:
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise StepError(f"unknown operation {op!r}")
        return handler(payload, **args)

    def op_health(self, payload: bytearray) -> tuple[Any, list[Any]]:
        return {"name": self.name, "pid": os.getpid(),
                "uptime_s": time.monotonic() - self.started,
                "parts": {r: p.describe() for r, p in self.parts.items()},
                "staged": sorted(self._staged), "peer": self.link is not None,
                "inputs": len(self.inputs), "cpu_account": self.cpu.describe(),
                **pipeline.clock_identity()}, []

    def op_load_part(self, payload: bytearray, role: str, sha256: str | None = None,
                     threads: int | None = None, present: bool = True) -> tuple[Any, list[Any]]:
        """Load (or with ``present=False`` unload) the part for ``role``."""
        if role not in ROLES:
            raise StepError(f"role must be one of {ROLES}, not {role!r}")
        if not present:
            with self._state_lock:
                self.parts.pop(role, None)
            return {"role": role, "loaded": False}, []
        part = self._install(role, payload, sha256, threads)
        return {"role": role, "loaded": True, **part.describe()}, []

    def _install(self, role: str, data: bytes | bytearray, sha256: str | None,
                 threads: int | None) -> Part:
        got = sha256_of(data)
        if sha256 is None or got != sha256:
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
        """Keep a part to hand to the peer on ``fetch`` (model delivery over the downlink)."""
        got = sha256_of(payload)
        if got != sha256:
            raise StepError(f"staged part refused: sha256 {got} != expected {sha256}")
        with self._state_lock:
            self._staged[sha256] = bytes(payload)
            while len(self._staged) > MAX_STAGED:
                self._staged.pop(next(iter(self._staged)))
        return {"sha256": sha256, "bytes": len(payload)}, []

    def op_fetch_part(self, payload: bytearray, sha256: str, role: str = "head",
                      threads: int | None = None, clock_shared: bool | None = None,
                      ) -> tuple[Any, list[Any]]:
        """Pull a staged part from the peer over the shaped downlink, time it, load it."""
        with self._run_lock:
            link = self._need_link()
            with self._link_guard():
                data, timing = pipeline.fetch_part(link, sha256, clock_shared)
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
        with self._run_lock:
            if self.link is not None:
                self.link.close()
                self.link = None
            self.link = pipeline.LocalLink(host, int(port), self.token, timeout)
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
        if not isinstance(sets, list) or not sets:
            raise StepError("'sets' must be a non-empty list")
        blobs = P.split_blobs(payload, [int(s.get("payload_bytes", -1)) if isinstance(s, dict)
                                        else -1 for s in sets])
        inputs = []
        for s, blob in zip(sets, blobs):
            arrays = P.decode_tensors(s.get("tensors"), blob, P.codec_registry())
            inputs.append({n: np.array(a) for n, a in arrays.items()})
        self.inputs = inputs
        return {"sets": len(inputs), "names": sorted(inputs[0])}, []

    def op_run(self, payload: bytearray, samples: int, warmup: int = 0, codec: str = "raw",
               input_encoding: str = "raw", model_outputs: list[str] | None = None,
               clock_shared: bool | None = None, max_seconds: float | None = None,
               ) -> tuple[Any, list[Any]]:
        if int(samples) < 1 or int(warmup) < 0:
            raise StepError("samples must be >= 1 and warmup >= 0")
        spec = RunSpec(int(samples), int(warmup), codec, input_encoding,
                       list(model_outputs or []), clock_shared, max_seconds)
        with self._run_lock, self._link_guard():
            result = pipeline.run_samples(
                self.link, self.parts.get("head"), self.inputs, spec,
                observe=lambda part, s: self.metrics.inference(part, s), cpu=self.cpu)
        for _ in range(len(result.rows) + spec.warmup):
            self.metrics.sample_served("local")
        self.last_outputs = {n: np.array(a) for n, a in result.final.items()}
        return {"samples": result.rows, "phases": result.phases}, []

    def op_outputs(self, payload: bytearray) -> tuple[Any, list[Any]]:
        """The final outputs of the last sample, as raw tensors in the payload."""
        descs, bufs, _ = P.encode_tensors(self.last_outputs, P.codec_registry())
        return {"tensors": descs}, bufs

    def op_kpis(self, payload: bytearray, role: str, runs: int = 20, warmup: int = 3,
                threads: int | None = None) -> tuple[Any, list[Any]]:
        """benchmark_model-style KPIs of a loaded part, measured in a fresh process
        (forked from the zygote, which spares the child Python's imports)."""
        part = self.parts.get(role)
        if part is None:
            raise StepError(f"no {role} part loaded")
        t = threads if threads is not None else part.threads
        try:
            return self.zygote().measure(str(part.path), int(runs), int(warmup), t), []
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
        part = self.parts.get(role)
        if part is None:
            raise StepError(f"no {role} part loaded")
        count = int(count)
        if not 0 <= count <= 10_000:
            raise StepError("count must be 0..10000")
        feed = part.fixed_inputs()
        t0 = time.monotonic()
        for _ in range(count):
            part.run(feed)
        return {"role": role, "count": count, "seconds": time.monotonic() - t0}, []

    def op_profile_layers(self, payload: bytearray, sizes: list[int], runs: int = 20,
                          warmup: int = 3, threads: int | None = None) -> tuple[Any, list[Any]]:
        """Per-layer latency on this node: one-layer models in the payload, back to back."""
        from nodes.benchmark import time_layers
        models = [bytes(b) for b in P.split_blobs(payload, sizes)]
        t = threads if threads is not None else self.threads
        return {"layers": time_layers(models, int(runs), int(warmup), t)}, []

    def op_shutdown(self, payload: bytearray) -> tuple[Any, list[Any]]:
        return {"stopping": True}, []


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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    token = os.environ.get("TESTBED_TOKEN", "")
    if not token:
        print("nodes.agent: TESTBED_TOKEN is not set; refusing to start without a run token",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s agent {args.name}: %(levelname)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    agent = Agent(args.name, token, args.workdir, args.threads)
    try:
        control = _Server(args.control_listen, agent.handle_control)
        data = _Server(args.data_listen, lambda c: pipeline.serve_data_connection(c, agent))
        mhost, mport = args.metrics_listen
        metrics = serve_metrics(agent.registry, mhost, mport)
    except OSError as e:
        print(f"nodes.agent {args.name}: cannot listen: {e}", file=sys.stderr)
        return 1
    servers = [control, data]
    for s in servers:
        # a short poll interval: shutdown() waits up to one interval per server
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    ready = {"name": args.name, "pid": os.getpid(),
             "control": [args.control_listen[0], control.server_address[1]],
             "data": [args.data_listen[0], data.server_address[1]],
             "metrics": [mhost, metrics.server_port]}
    tmp = args.workdir / "agent.json.tmp"
    tmp.write_text(json.dumps(ready))
    tmp.replace(args.workdir / "agent.json")
    print("READY " + json.dumps(ready), flush=True)
    log.info("serving: %s", ready)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    while not agent.stop.wait(0.1):
        pass
    time.sleep(0.05)  # let the shutdown reply leave
    for s in servers:
        s.shutdown()
        s.server_close()
    # The metrics server's thread is a daemon polling every 0.5 s; the process is
    # about to exit, so close its socket instead of waiting for shutdown().
    metrics.server_close()
    if agent.link is not None:
        agent.link.close()
    if agent._zygote is not None:
        agent._zygote.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
