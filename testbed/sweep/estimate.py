"""How long a run will take: before it starts, and while it runs.

Owns the duration model, phase by phase as the sweep accounts for time
(``results.PHASES``), so an estimate can be compared with, and corrected by,
what each phase really took:

- **from the plan** (``testbed check``, the run's start line): per configuration,
  head delivery = framing-aware wire bytes at the downlink rate, part KPIs
  once per split point, warm-up and samples from the compute and transfer time
  of one sample (samples stop after ``max_seconds``, stretch to
  ``min_seconds``), plus measured per-configuration overheads; compute time from
  each layer's MACs at this host's measured speed, scaled by the node's CPU
  share; once the run has profiled its layers, from those per-layer times;
- **from a previous run** of the same experiment (same name, model and nodes):
  its per-configuration phase times, where it measured the same configuration;
- **live** (``Eta``): every phase's estimate is multiplied by that phase's
  measured ÷ estimated ratio over the configurations done so far, so a link
  slower than planned corrects the delivery and sampling estimates only.

Loss, jitter and TCP dynamics are not modelled; a time-varying profile counts
its mean rate. Reads nothing but the plan and result files; runs nothing but
(optionally) the model once, to measure this host's speed.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from testbed.analysis.results import PHASES, RunFolder, wire_bytes

# Measured on the flagship (2-core host, docker): per-configuration costs that do
# not scale with the model or the link.
SETUP_S = {"docker": 8.0, "netns": 4.0}     # deploy, health, connect, teardown
IMAGE_BUILD_S = 240.0                        # building the node image once (docker)
LAYER_OVERHEAD_S = 0.03                      # per layer per node: build, load, warm a one-layer model
KPI_OVERHEAD_S = 0.25                        # per part: fork a fresh process, load, measure memory
CONFIG_OVERHEAD_S = {"tail_load": 0.02, "head_load": 0.01, "write": 0.005, "other": 0.01, "link": 0.0}
SAMPLE_OVERHEAD_S = 0.002                    # control and framing per sample
DISK_BYTES_PER_S = 4e8                       # writing and loading part files
DEFAULT_MACS_PER_S = 2e10                    # FP32 MACs/s of one core, when nothing was measured


@dataclass(frozen=True)
class LinkShape:
    """One profile as the estimate sees it (base values; a trace's mean rate)."""

    name: str
    uplink_bps: float | None
    uplink_delay_s: float
    downlink_bps: float | None
    downlink_delay_s: float


@dataclass(frozen=True)
class RunShape:
    """The plan reduced to the numbers the estimate reads."""

    backend: str                          # docker | netns
    build_image: bool                     # docker: the node image must be built first
    layer_macs: tuple[int, ...]           # per layer, in execution order
    layer_param_bytes: tuple[int, ...]
    cut_bytes: dict[int, int]             # split point -> bytes crossing the uplink
    result_bytes: int                     # model outputs, crossing the downlink
    links: tuple[LinkShape, ...]
    splits: tuple[int, ...]
    done: frozenset[tuple[Any, ...]]      # finished configurations: (repeat, profile, split)
    warmup: int
    samples: int
    min_seconds: float
    max_seconds: float
    kpi_runs: int
    layer_runs: int
    local_parallelism: float              # min(cpus, threads) of the node
    remote_parallelism: float
    repeat: int = 1
    stream_s: float | None = None         # runs.mode stream: each configuration streams this long
    parallel_nodes: bool = True           # both nodes on disjoint CPUs: KPIs, warm-up, layers at once
    macs_per_s: float = DEFAULT_MACS_PER_S
    # per-layer seconds measured on each node (layers.csv), replacing MACs when known
    local_layer_s: tuple[float, ...] | None = None
    remote_layer_s: tuple[float, ...] | None = None

    @property
    def configurations(self) -> list[tuple[int, LinkShape, int]]:
        return [(r, link, k) for r in range(self.repeat) for link in self.links for k in self.splits
                if (r, link.name, k) not in self.done and (link.name, k) not in self.done]

    def compute_s(self, node: str, layers: range) -> float:
        measured = self.local_layer_s if node == "local" else self.remote_layer_s
        if measured is not None:
            return sum(measured[i] for i in layers)
        share = self.local_parallelism if node == "local" else self.remote_parallelism
        return sum(self.layer_macs[i] for i in layers) / (self.macs_per_s * max(share, 0.01))


def _transfer_s(nbytes: float, bps: float | None, delay_s: float) -> float:
    if not nbytes:
        return 0.0
    return (wire_bytes(int(nbytes), None, None) * 8 / bps if bps else 0.0) + delay_s


def configuration_phases(shape: RunShape, link: LinkShape, k: int, kpis: bool) -> dict[str, float]:
    """Estimated seconds per phase of one configuration."""
    n = len(shape.layer_macs)
    head_s, tail_s = shape.compute_s("local", range(0, k)), shape.compute_s("remote", range(k, n))
    crossing = 0.0 if k == n else (_transfer_s(shape.cut_bytes.get(k, 0) + 256, link.uplink_bps, link.uplink_delay_s)
                                   + _transfer_s(shape.result_bytes + 256, link.downlink_bps, link.downlink_delay_s))
    per_sample = head_s + tail_s + crossing + SAMPLE_OVERHEAD_S
    count = min(shape.samples, math.floor(shape.max_seconds / per_sample) + 1) if per_sample > 0 else shape.samples
    sampling = max(count * per_sample, min(shape.min_seconds, shape.max_seconds))
    if shape.stream_s is not None:  # a stream lasts its duration (and drains), whatever the samples say
        sampling = shape.stream_s + per_sample
    head_bytes, tail_bytes = sum(shape.layer_param_bytes[:k]), sum(shape.layer_param_bytes[k:])
    phases = dict.fromkeys(PHASES, 0.0)
    phases.update(CONFIG_OVERHEAD_S)
    phases["split"] = (head_bytes + tail_bytes) / DISK_BYTES_PER_S
    phases["tail_load"] += tail_bytes / DISK_BYTES_PER_S
    phases["head_load"] += head_bytes / DISK_BYTES_PER_S
    phases["delivery"] = _transfer_s(head_bytes, link.downlink_bps, link.downlink_delay_s)
    both = max if shape.parallel_nodes else (lambda a, b: a + b)
    phases["warmup"] = shape.warmup * both(head_s, tail_s)
    phases["sampling"] = sampling
    if kpis:
        runs = shape.kpi_runs + max(1, shape.warmup) + 1

        def kpi(part_s: float, share: float) -> float:
            return (KPI_OVERHEAD_S / min(1.0, max(share, 0.01)) + runs * part_s) if part_s else 0.0

        phases["kpi"] = both(kpi(head_s, shape.local_parallelism) if k else 0.0,
                             kpi(tail_s, shape.remote_parallelism) if k < n else 0.0)
    return phases


def layer_profile_s(shape: RunShape) -> float:
    """Per-layer profiling of both nodes at the start of the run."""
    n = len(shape.layer_macs)
    runs = shape.layer_runs + max(1, shape.warmup)
    per_node = [sum(runs * shape.compute_s(node, range(i, i + 1)) + LAYER_OVERHEAD_S / min(1.0, max(share, 0.01))
                    for i in range(n))
                for node, share in (("local", shape.local_parallelism), ("remote", shape.remote_parallelism))]
    return max(per_node) if shape.parallel_nodes else sum(per_node)


def setup_s(shape: RunShape) -> float:
    return SETUP_S.get(shape.backend, SETUP_S["docker"]) + (IMAGE_BUILD_S if shape.build_image else 0.0)


def plan_estimates(shape: RunShape) -> dict[tuple[int, str, int], dict[str, float]]:
    """Phases of every configuration still to run, in sweep order (KPIs at the first one of each k)."""
    out: dict[tuple[int, str, int], dict[str, float]] = {}
    kpis_done: set[int] = {k for key in shape.done for k in key[-1:]}
    for r, link, k in shape.configurations:
        out[(r, link.name, k)] = configuration_phases(shape, link, k, kpis=k not in kpis_done)
        kpis_done.add(k)
    return out


def estimate_duration(shape: RunShape) -> float:
    """Seconds a run of ``shape`` is expected to take, start to finish."""
    return setup_s(shape) + layer_profile_s(shape) + sum(sum(p.values()) for p in plan_estimates(shape).values())


# ------------------------------------------------------------------------- calibration

def host_macs_per_s(model_path: str | Path, macs: int, max_macs: float = 5e10) -> float:
    """FP32 MACs per second of one core of this host, from timing the model once
    with LiteRT (1 thread). A model too large to time quickly gets the default."""
    if not macs or macs > max_macs:
        return DEFAULT_MACS_PER_S
    try:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        with _quiet_stderr():  # LiteRT announces its delegate once per process on fd 2
            interp = Interpreter(model_path=str(model_path), num_threads=1)
            interp.allocate_tensors()
        for d in interp.get_input_details():
            interp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
        interp.invoke()  # the first invoke packs weights: not representative
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            interp.invoke()
            best = min(best, time.perf_counter() - t)
        return macs / best if best > 0 else DEFAULT_MACS_PER_S
    except Exception:  # an estimate must never stop a run: fall back to the default speed
        return DEFAULT_MACS_PER_S


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (native code prints there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def with_layers(shape: RunShape, layers: Iterable[dict[str, Any]]) -> RunShape:
    """The shape with compute times taken from a run's measured per-layer latencies."""
    by_node: dict[str, dict[int, float]] = {}
    for row in layers:
        if row.get("mean_s") is not None:
            by_node.setdefault(row["node"], {})[int(row["layer"])] = float(row["mean_s"])
    n = len(shape.layer_macs)

    def series(node: str) -> tuple[float, ...] | None:
        got = by_node.get(node, {})
        return tuple(got[i] for i in range(n)) if len(got) == n else None

    return replace(shape, local_layer_s=series("local") or shape.local_layer_s,
                   remote_layer_s=series("remote") or shape.remote_layer_s)


def previous_run(output_dir: Path, name: str, model_sha256: str | None, nodes: Any,
                 exclude: Path | None = None) -> RunFolder | None:
    """The newest finished-or-not run folder of the same experiment, model and
    nodes under ``output_dir`` with per-phase accounting, or None."""
    if not output_dir.is_dir():
        return None
    best: tuple[float, RunFolder] | None = None
    for folder in output_dir.iterdir():
        if not folder.is_dir() or (exclude is not None and folder.resolve() == exclude.resolve()):
            continue
        run = RunFolder(folder)
        try:
            cfg = run.config() or {}
            rows = run.summary()
        except Exception:  # an unreadable folder is simply not a usable previous run
            continue
        if cfg.get("name") != name or not rows or rows[0].get("phase_sampling_s") is None:
            continue
        if model_sha256 and (cfg.get("resolved_model") or {}).get("sha256") != model_sha256:
            continue
        if nodes is not None and cfg.get("nodes") != nodes:
            continue
        mtime = (folder / "summary.csv").stat().st_mtime
        if best is None or mtime > best[0]:
            best = (mtime, run)
    return best[1] if best else None


def from_previous(estimates: dict[tuple[int, str, int], dict[str, float]],
                  previous: RunFolder) -> tuple[dict[tuple[int, str, int], dict[str, float]], int]:
    """Replace each estimate by what ``previous`` measured for the same (profile, split)
    (median over its repeats; KPIs only where it measured them too). Configurations it
    did not measure keep their plan estimate scaled by the previous run's overall ratio.
    Returns the estimates and how many came from the previous run."""
    measured: dict[tuple[str, int], list[dict[str, float]]] = {}
    for row in previous.summary():
        measured.setdefault((row["profile"], row["split"]), []).append(
            {p: float(row.get(f"phase_{p}_s") or 0.0) for p in PHASES})
    plan_total = actual_total = 0.0
    out, matched = {}, 0
    for key, phases in estimates.items():
        rows = measured.get(key[1:])
        if not rows:
            continue
        got = {p: sorted(r[p] for r in rows)[len(rows) // 2] for p in PHASES}
        if not phases.get("kpi"):
            got["kpi"] = 0.0  # the previous run measured KPIs here; this one will not
        plan_total += sum(phases.values())
        actual_total += sum(got.values())
        out[key] = got
        matched += 1
    scale = actual_total / plan_total if plan_total > 0 else 1.0
    for key, phases in estimates.items():
        out.setdefault(key, {p: v * scale for p, v in phases.items()})
    return {key: out[key] for key in estimates}, matched


# ------------------------------------------------------------------------- live ETA

@dataclass
class Eta:
    """Remaining time of a sweep from per-configuration, per-phase estimates.

    Each phase's estimates are scaled by its measured ÷ estimated ratio over the
    configurations done so far. The ratio starts from a prior worth ``prior_s``
    seconds of estimate at 1.0, so one odd configuration cannot swing it."""

    estimates: dict[tuple[int, str, int], dict[str, float]]
    prior_s: float = 5.0
    _actual: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _expected: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    _done: set[tuple[int, str, int]] = field(default_factory=set)

    def ratio(self, phase: str) -> float:
        expected = self._expected[phase] + self.prior_s
        return (self._actual[phase] + self.prior_s) / expected if expected > 0 else 1.0

    def finished(self, key: tuple[int, str, int], actual: dict[str, float]) -> None:
        """Record what a configuration's phases really took."""
        planned = self.estimates.get(key, {})
        for phase in PHASES:
            self._actual[phase] += actual.get(phase, 0.0)
            self._expected[phase] += planned.get(phase, 0.0)
        self._done.add(key)

    def remaining_s(self) -> float:
        return sum(v * self.ratio(p) for key, phases in self.estimates.items() if key not in self._done
                   for p, v in phases.items())


def human(seconds: float) -> str:
    """``95`` → ``1 min 35 s``; ``4000`` → ``1 h 07 min``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


# ------------------------------------------------------------------------- from an experiment

def _mean_rate(prof: Any, direction: str) -> float | None:
    rates = [d.rate_bps for _, d in prof.schedule(direction) if d.rate_bps]
    return sum(rates) / len(rates) if rates else None


def _delay(prof: Any, direction: str) -> float:
    steps = prof.schedule(direction)
    return steps[0][1].delay_s if steps else 0.0


def _share(cfg: Any, host_cpus: int) -> float:
    cpus = cfg.cpus if cfg.cpus is not None else float(host_cpus)
    return min(cpus, float(cfg.threads or 1))


def shape_for(exp: Any, graph: Any, profiles: list[Any], splits: list[int], *, backend: str,
              done: Iterable[tuple[Any, ...]] = (), build_image: bool = False, parallel_nodes: bool = True,
              macs_per_s: float = DEFAULT_MACS_PER_S, host_cpus: int = 1) -> RunShape:
    """The run an experiment describes, as the estimate sees it."""
    links = tuple(LinkShape(p.name, _mean_rate(p, "uplink"), _delay(p, "uplink"),
                            _mean_rate(p, "downlink"), _delay(p, "downlink")) for p in profiles)
    return RunShape(
        backend=backend, build_image=build_image,
        layer_macs=tuple(layer.macs for layer in graph.layers),
        layer_param_bytes=tuple(layer.param_bytes for layer in graph.layers),
        cut_bytes={k: sum(t.bytes for t in graph.cut(k)) for k in splits},
        result_bytes=sum(t.bytes for t in graph.outputs), links=links, splits=tuple(splits),
        done=frozenset(tuple(d) for d in done), warmup=exp.runs.warmup, samples=exp.runs.samples,
        min_seconds=exp.runs.min_seconds, max_seconds=exp.runs.max_seconds, kpi_runs=exp.runs.kpi_runs,
        layer_runs=exp.runs.layer_runs, local_parallelism=_share(exp.nodes.local, host_cpus),
        remote_parallelism=_share(exp.nodes.remote, host_cpus), repeat=exp.runs.repeat,
        stream_s=exp.runs.duration if exp.runs.mode == "stream" else None,
        parallel_nodes=parallel_nodes, macs_per_s=macs_per_s)
