"""Running an experiment: every split point at every link profile, measured and recorded.

Owns the order of work and its bookkeeping: resolve and split the model, deploy
the two nodes, shape each direction (uplink at the local node's data egress,
downlink at the remote's), walk the configurations profile-outer / split-inner
so the link changes in place and nodes are reused, and for each configuration
deliver the head over the shaped downlink, load the parts, warm up, take
samples bounded by time, measure part KPIs (once per part, in a fresh worker),
and append everything to the run folder. Per-layer latency is profiled once per
run per node. Ctrl-C or SIGTERM stops the run, tears everything down, keeps the
results and raises ``Interrupted`` (exit 130).

It leaves *how* to the parts: ``testbed.deploy`` (nodes and teardown),
``testbed.link`` (shapers), ``testbed.model`` (splitting), the agent client
(protocol, timing inside the nodes), ``testbed.analysis.results`` (files) and
``testbed.metrics`` (Prometheus).
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from testbed.errors import ConfigError, Interrupted, TestbedError
from testbed.experiment import Experiment, load_experiment, parse_host_port, resolved_dict
from testbed.analysis.results import PHASES, ConfigurationResult, RunFolder, ideal_transfer_s

# Extra samples taken to reach min_seconds are asked for in batches sized from
# the time per sample so far, at most this many per control round trip.
_MAX_BATCH = 50


@dataclass(frozen=True)
class SweepOptions:
    """Command-line overrides of the experiment (None: the experiment's value)."""

    resume: Path | None = None
    metrics_listen: str | None = None
    backend: str | None = None
    output: Path | None = None
    progress: bool = True
    keep_parts: bool = False             # leave the part files in RUN_DIR/parts after the run


@dataclass(frozen=True)
class Configuration:
    """One point of the sweep: a repeat of one split point at one link profile."""

    repeat: int
    profile: Any                         # testbed.link.profile.LinkProfile
    split: int

    @property
    def key(self) -> tuple[int, str, int]:
        return self.repeat, self.profile.name, self.split


@dataclass
class Plan:
    """What the sweep will do, resolved before anything is deployed."""

    experiment: Experiment
    profiles: list[Any]                  # testbed.link.profile.LinkProfile, in file order
    model_path: Path
    graph: Any                           # testbed.model.graph.ModelGraph
    splits: list[int]
    model: dict[str, Any] = field(default_factory=dict)  # the manifest's model entry (path, sha256, ...)
    n_inputs: int = 1
    seed: int = 0                        # of the shuffled order when runs.repeat > 1

    @property
    def configurations(self) -> list[Configuration]:
        """Profile outer, split inner, so the link changes in place once per profile
        and repeat. With several repeats each one walks profiles and split points
        in its own shuffled order (``seed`` + repeat), recorded in config.yaml."""
        repeats = self.experiment.runs.repeat
        out = []
        for r in range(repeats):
            profiles, splits = list(self.profiles), list(self.splits)
            if repeats > 1:
                rng = random.Random(self.seed + r)
                rng.shuffle(profiles)
            for prof in profiles:
                order = list(splits)
                if repeats > 1:
                    rng.shuffle(order)
                out += [Configuration(r, prof, k) for k in order]
        return out


# --------------------------------------------------------------------------- signals

class _Signals:
    """SIGTERM behaves like Ctrl-C; once either arrived, further ones are ignored
    so the teardown they started cannot itself be interrupted half-way."""

    def __init__(self, console: Console) -> None:
        self.console, self.stopping = console, False
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handler(self, signum: int, _frame: Any) -> None:
        if os.getpid() != self._pid:
            # A forked helper (pyroute2 runs netlink in other namespaces from a
            # forked child and ends it with SIGTERM) inherited this handler: die
            # as the default would, instead of running the sweep's shutdown path.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.stopping:
            self.console.print("[yellow]still tearing down; please wait[/yellow]")
            return
        self.stopping = True
        raise KeyboardInterrupt

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; Ctrl-C goes there anyway
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- planning

def plan(experiment: Experiment) -> Plan:
    """Resolve the model, its layers, the split points and the profiles; no side effects on nodes."""
    from testbed.model.graph import ModelGraph
    from testbed.model.splitter import model_entry
    from testbed.model.zoo import resolve

    profiles = experiment.load_profiles()
    model_path = Path(resolve(experiment.model.as_spec()))
    graph = ModelGraph.from_file(model_path)
    seed = experiment.runs.seed if experiment.runs.seed is not None else secrets.randbelow(2**31)
    return Plan(experiment, profiles, model_path, graph, experiment.split_points(graph.num_layers), seed=seed,
                model=model_entry(graph))


class _Parts:
    """The model's parts, written into ``RUN_DIR/parts`` just before a configuration
    needs them (``splitter.materialize``: only the missing ones, each verified by
    running head then tail once) and removed when the run ends unless kept: a sweep
    of a big model never holds every split point's parts at once before it must.

    ``manifest`` accumulates the entries made so far and is written to the run
    folder each time it grows, so the report finds every measured split point."""

    def __init__(self, p: Plan, run: RunFolder) -> None:
        self.plan, self.run = p, run
        self.dir = run.path / "parts"
        old = run.manifest()
        self.manifest: dict[str, Any] = old if old.get("model") else {"model": None, "splits": []}

    def entry(self, k: int) -> dict[str, Any]:
        """The manifest entry of split point ``k``, its part files present in ``self.dir``."""
        from testbed.model.splitter import materialize

        (entry,) = materialize(self.plan.graph, [k], self.dir)
        if self.manifest.get("model") is None:
            self.manifest["model"] = self.plan.model
        splits = {int(e["k"]): e for e in self.manifest["splits"]}
        if splits.get(k) != entry:
            splits[k] = entry
            self.manifest["splits"] = [splits[x] for x in sorted(splits)]
            self.run.write_manifest(self.manifest)
        return entry

    def read(self, name: str | None) -> bytes | None:
        return None if name is None else (self.dir / name).read_bytes()

    def remove(self) -> None:
        """Delete the part files (the manifest in the run folder stays)."""
        from testbed.model.splitter import remove_parts

        if (self.dir / "manifest.json").exists():
            with contextlib.suppress(TestbedError):
                remove_parts(self.dir, [int(e["k"]) for e in self.manifest["splits"]])
            for leftover in ("manifest.json",):
                with contextlib.suppress(OSError):
                    (self.dir / leftover).unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()


def _inputs(p: Plan) -> list[Any]:
    from testbed.inputs import folder_images, synthetic_images

    spec = p.experiment.input
    info = p.graph.inputs[0]
    if spec.synthetic:
        return synthetic_images(tuple(info.shape), info.dtype, spec.count, spec.seed)
    return folder_images(p.experiment.resolve_path(spec.source), tuple(info.shape), info.dtype, spec.count)


# --------------------------------------------------------------------------- environment

def _environment(p: Plan, run_id: str, dep: Any, caps: Any, options: SweepOptions,
                 cpu_plan: Any, model: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break

    return {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "system": platform.system(), "machine": platform.machine(),
                 "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": {d: version(d) for d in ("splitbed", "ai-edge-litert", "numpy", "pyroute2", "docker",
                                             "prometheus-client", "pydantic")},
        "backend_requested": options.backend or p.experiment.nodes.backend,
        **dep.environment(),  # backend, backend_reason, nodes (limits, image id, ...)
        "link_capabilities": {k: getattr(caps, k) for k in ("netem", "htb", "tbf") if hasattr(caps, k)},
        "model": {"path": str(p.model_path), **{k: model.get(k) for k in ("sha256", "layers", "bytes")}},
        "threads": {"local": p.experiment.nodes.local.threads, "remote": p.experiment.nodes.remote.threads},
        "cpu_assignment": cpu_plan.as_dict(),
        "order_seed": p.seed if p.experiment.runs.repeat > 1 else None,
    }


# --------------------------------------------------------------------------- link

class _Link:
    """Both directions' shapers: uplink at the local node's data egress, downlink
    at the remote's. A new profile changes the qdiscs in place (the shaper keeps
    its root); a time-varying profile (trace) is driven by a stepper thread."""

    def __init__(self, dep: Any) -> None:
        from testbed.link.shaper import Shaper

        self.shapers = {"uplink": Shaper(dep.local.shaping), "downlink": Shaper(dep.remote.shaping)}
        self.emulation = {"uplink": "none", "downlink": "none"}
        self._steppers: list[Any] = []

    def capabilities(self) -> Any:
        return self.shapers["uplink"].capabilities()

    def check(self, profiles: list[Any]) -> None:
        """Refuse, before anything is measured, a profile this kernel cannot
        honour (e.g. delay or loss without sch_netem); the shaper's message
        says what is missing and how to get it."""
        for prof in profiles:
            for direction, shaper in self.shapers.items():
                for _, d in prof.schedule(direction):
                    try:
                        shaper.plan(d)
                    except TestbedError as e:
                        raise type(e)(f"profile {prof.name!r} {direction}: {e}") from None

    def _stop_steppers(self) -> None:
        for stepper in self._steppers:
            stepper.stop()
        self._steppers = []

    def apply(self, prof: Any) -> None:
        from testbed.link.stepper import Stepper

        self._stop_steppers()
        for direction, shaper in self.shapers.items():
            schedule = prof.schedule(direction)
            if not schedule:
                shaper.clear()
                self.emulation[direction] = "none"
            elif len(schedule) > 1:
                self._steppers.append(Stepper.for_profile(shaper, prof, direction).start())
                self.emulation[direction] = shaper.emulation or "none"
            else:
                self.emulation[direction] = shaper.apply(schedule[0][1], prof.name)

    def clear(self) -> None:
        """Remove the shaping (teardown removes the interfaces anyway; this keeps
        a host-side target clean too). Never raises: it runs during teardown."""
        with contextlib.suppress(Exception):
            self._stop_steppers()
        for shaper in self.shapers.values():
            with contextlib.suppress(Exception):
                shaper.clear()
            with contextlib.suppress(Exception):
                shaper.close()


def _loss_pct(d: Any) -> float | None:
    """Random loss in percent (None when no loss or a Gilbert-Elliott/state model)."""
    loss = getattr(d, "loss", None) if d is not None else None
    return getattr(loss, "random_pct", None) if loss is not None else None


def _constant(prof: Any, direction: str) -> Any:
    """The direction's parameters when they hold for the whole configuration
    (None for an unshaped direction or a time-varying trace)."""
    schedule = prof.schedule(direction)
    return schedule[0][1] if len(schedule) == 1 else None


def _ideal(prof: Any, direction: str, payload: Any, mss: Any, mtu: Any) -> float | None:
    d = _constant(prof, direction)
    if d is None or not payload:
        return None
    return ideal_transfer_s(int(payload), getattr(d, "rate_bps", None), getattr(d, "delay_s", None), mss, mtu)


def _add_ideals(prof: Any, sample: dict[str, Any]) -> None:
    """Framing-aware ideal of each direction's transfer, and measured ÷ ideal."""
    for direction, sent in (("uplink", "uplink_bytes"), ("downlink", "downlink_bytes")):
        ideal = _ideal(prof, direction, sample.get(sent), sample.get(f"{direction}_mss"),
                       sample.get(f"{direction}_mtu"))
        measured = sample.get(f"{direction}_s")
        sample[f"{direction}_ideal_s"] = ideal
        sample[f"{direction}_over_ideal"] = measured / ideal if ideal and measured else None


def _link_columns(prof: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for direction in ("uplink", "downlink"):
        d = getattr(prof, direction)
        out[f"{direction}_rate_bps"] = getattr(d, "rate_bps", None) if d is not None else None
        out[f"{direction}_delay_s"] = getattr(d, "delay_s", None) if d is not None else None
        out[f"{direction}_loss_pct"] = _loss_pct(d)
    return out


# --------------------------------------------------------------------------- metrics

class _NoMetrics:
    """Stands in when metrics are off (serving failed is an error, not this)."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


@contextlib.contextmanager
def _metrics(exp: Experiment, run_name: str, listen: str, console: Console) -> Iterator[Any]:
    from prometheus_client import CollectorRegistry

    from testbed.metrics import SweepMetrics, serve

    registry = CollectorRegistry()
    m = SweepMetrics(registry, exp.name, run_name, pushgateway=exp.metrics.pushgateway)
    host, port = parse_host_port(listen)
    server = serve(registry, host, port)
    console.print(f"metrics: {server.url}")
    try:
        yield m, server
    finally:
        with contextlib.suppress(Exception):
            m.finished()
        server.close()


# --------------------------------------------------------------------------- one configuration

@dataclass
class _Nodes:
    dep: Any
    local: Any       # AgentClient
    remote: Any      # AgentClient
    # Both nodes may work at once (KPIs, warm-up, per-layer profiles) only when
    # they run on disjoint CPUs: otherwise one would slow the other's measurement.
    parallel: bool = False

    def both(self, on_local: Callable[[], Any] | None, on_remote: Callable[[], Any] | None) -> tuple[Any, Any]:
        """Run the two nodes' jobs, at once when ``parallel``; None for no job."""
        if not self.parallel or on_local is None or on_remote is None:
            return (on_local() if on_local else None), (on_remote() if on_remote else None)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2, thread_name_prefix="node") as pool:
            a, b = pool.submit(on_local), pool.submit(on_remote)
            return a.result(), b.result()


class PhaseClock:
    """Wall time of one configuration, by phase (``results.PHASES``).

    ``with clock("delivery"): ...`` adds the block's time to a phase; ``add``
    moves time measured elsewhere (the agent's warm-up) between phases. What no
    phase claimed is ``other``, so the phases add up to ``wall_s`` exactly."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] += time.monotonic() - t

    def add(self, phase: str, seconds: float, taken_from: str | None = None) -> None:
        seconds = max(0.0, seconds)
        if taken_from is not None:
            seconds = min(seconds, self.seconds[taken_from])
            self.seconds[taken_from] -= seconds
        self.seconds[phase] += seconds

    def close(self) -> dict[str, float]:
        """``wall_s`` and one ``phase_<name>_s`` column per phase."""
        wall = time.monotonic() - self.start
        self.seconds["other"] = max(0.0, wall - sum(v for k, v in self.seconds.items() if k != "other"))
        return {"wall_s": wall, **{f"phase_{k}_s": v for k, v in self.seconds.items()}}


def _take_samples(nodes: _Nodes, runs: Any, input_encoding: str, codec: str, n_inputs: int,
                  model_outputs: list[str], clock: PhaseClock, parts: tuple[bool, bool]) -> list[dict[str, Any]]:
    """Warm-up, then ``runs.samples`` samples, stopped early (after at least one)
    once ``max_seconds`` have passed; then more, in batches, while under
    ``min_seconds``. The agent enforces ``max_seconds`` itself, so a slow
    low-bandwidth configuration costs one control round trip, not one per sample.

    Warm-up invokes each part ``runs.warmup`` times on its own node (first
    invokes pack weights, fill caches) without sending anything: the link needs
    no warming (a rate-limited TCP connection is at full rate from the first
    segment), and at low rates a warm-up sample through it took seconds."""
    t0 = time.monotonic()
    has_head, has_tail = parts
    if runs.warmup:
        with clock("warmup"):
            nodes.both((lambda: nodes.local.warm("head", runs.warmup)) if has_head else None,
                       (lambda: nodes.remote.warm("tail", runs.warmup)) if has_tail else None)
    with clock("sampling"):
        result = nodes.local.run_detailed(samples=runs.samples, warmup=0, codec=codec,
                                          input_encoding=input_encoding, max_seconds=runs.max_seconds,
                                          model_outputs=model_outputs)
    clock.add("warmup", result["phases"].get("handshake_s", 0.0), taken_from="sampling")
    samples = result["samples"]
    # the agent cycles through the inputs from the first sample of each call
    for s in samples:
        s["input_index"] = s.get("sample", 0) % n_inputs
    while samples:
        elapsed = time.monotonic() - t0
        if elapsed >= runs.min_seconds or elapsed >= runs.max_seconds:
            break
        per_sample = elapsed / len(samples)
        want = max(1, min(_MAX_BATCH, int((runs.min_seconds - elapsed) / per_sample) + 1))
        with clock("sampling"):
            more = nodes.local.run(samples=want, warmup=0, codec=codec, input_encoding=input_encoding,
                                   max_seconds=runs.max_seconds - elapsed, model_outputs=model_outputs)
        for s in more:
            s["input_index"] = s.get("sample", 0) % n_inputs
        samples += more
    for i, s in enumerate(samples):
        s["sample"] = i
        # the agent names bytes per direction; the results name them after what they carry
        if "result_bytes_wire" not in s and "downlink_bytes" in s:
            s["result_bytes_wire"] = s["downlink_bytes"]
    return samples


def _kpis(client: Any, role: str, runs: Any, threads: int | None) -> dict[str, Any]:
    return client.kpis(role=role, runs=runs.kpi_runs, warmup=max(1, runs.warmup), threads=threads)


def _run_configuration(p: Plan, nodes: _Nodes, link: _Link, c: Configuration,
                       measured_kpis: dict[tuple[int, str], dict[str, Any]], metrics: Any,
                       clock: PhaseClock, parts: _Parts) -> ConfigurationResult:
    exp = p.experiment
    prof, k = c.profile, c.split
    with clock("split"):
        entry = parts.entry(k)
        head, tail = parts.read(entry["head"]), parts.read(entry["tail"])
    # The tail lives in the network: the orchestrator hands it to the remote node
    # over the (unshaped) control plane. The head is delivered from the remote to
    # the local node over the shaped downlink, as the scenario delivers the split
    # model from the network to the device; that delivery is timed by the agents.
    with clock("tail_load"):
        nodes.remote.load_part("tail", tail, entry["tail_sha256"], threads=exp.nodes.remote.threads)
    delivery_s = delivery_ideal_s = None
    if head is not None:
        with clock("delivery"):
            timing = nodes.remote.deliver_part(nodes.local, head, entry["head_sha256"], role="head",
                                               threads=exp.nodes.local.threads)
        clock.add("head_load", float(timing.get("load_s") or 0.0), taken_from="delivery")
        delivery_s = float(timing["delivery_s"])
        delivery_ideal_s = _ideal(prof, "downlink", timing.get("wire_bytes"), timing.get("mss"), timing.get("mtu"))
        metrics.observe_delivery(k, prof.name, delivery_s, size_bytes=len(head))
    else:
        with clock("head_load"):
            nodes.local.load_part("head", None)

    parts_rows = []
    roles = (("head", "local", nodes.local, head, entry["head_sha256"], exp.nodes.local.threads),
             ("tail", "remote", nodes.remote, tail, entry["tail_sha256"], exp.nodes.remote.threads))
    jobs = [(lambda c=client, r=role, t=threads: _kpis(c, r, exp.runs, t))
            if data is not None and (k, role) not in measured_kpis else None
            for role, _, client, data, _, threads in roles]
    if any(jobs):
        with clock("kpi"):
            got = nodes.both(*jobs)  # the head's on the local node while the tail's on the remote
        for (role, *_), kp in zip(roles, got):
            if kp is not None:
                measured_kpis[(k, role)] = {**kp, "kpi_profile": prof.name}
    for role, node_name, client, data, sha, threads in roles:
        if data is None:
            continue
        kp = measured_kpis[(k, role)]
        metrics.set_part(node_name, role, k, kp, file_bytes=len(data))
        parts_rows.append({"part": role, "node": node_name, "file_bytes": len(data), "sha256": sha,
                           "delivery_s": delivery_s if role == "head" else None, **kp})

    t_sampling = time.monotonic()
    samples = _take_samples(nodes, exp.runs, exp.input_encoding, exp.codec, p.n_inputs,
                            [o.name for o in p.graph.outputs], clock, (head is not None, tail is not None))
    sampling_s = time.monotonic() - t_sampling
    for s in samples:
        s.setdefault("codec", exp.codec)
        s.setdefault("input_encoding", exp.input_encoding)
        s["emulation_uplink"] = link.emulation["uplink"]
        s["emulation_downlink"] = link.emulation["downlink"]
        _add_ideals(prof, s)
        metrics.observe_sample(k, prof.name, s)

    summary = {
        "codec": exp.codec, "input_encoding": exp.input_encoding,
        "emulation_uplink": link.emulation["uplink"], "emulation_downlink": link.emulation["downlink"],
        **_link_columns(prof), "warmup": exp.runs.warmup,
        "head_file_bytes": entry.get("head_bytes"), "tail_file_bytes": entry.get("tail_bytes"),
        "delivery_s": delivery_s, "delivery_ideal_s": delivery_ideal_s, "sampling_s": sampling_s,
    }
    return ConfigurationResult(profile=prof.name, split=k, samples=samples, summary=summary, parts=parts_rows,
                               repeat=c.repeat)


# --------------------------------------------------------------------------- layers

def _profile_layers(p: Plan, nodes: _Nodes, run: RunFolder, metrics: Any) -> None:
    """Per-layer latency on each node under its limits, once per run."""
    from testbed.model.layers import one_layer_models

    done = run.layer_nodes()
    targets = [(n, c, cfg) for n, c, cfg in (("local", nodes.local, p.experiment.nodes.local),
                                             ("remote", nodes.remote, p.experiment.nodes.remote))
               if n not in done]
    if not targets:
        return
    models = one_layer_models(p.model_path)
    runs = p.experiment.runs

    def job(client: Any, cfg: Any) -> Callable[[], Any]:
        return lambda: client.profile_layers(models, runs=runs.layer_runs, warmup=max(1, runs.warmup),
                                             threads=cfg.threads)

    jobs = {n: job(c, cfg) for n, c, cfg in targets}
    results = dict(zip(("local", "remote"), nodes.both(jobs.get("local"), jobs.get("remote"))))
    for node_name, client, cfg in targets:
        stats = results[node_name]
        rows = []
        for layer, st in zip(p.graph.layers, stats):
            rows.append({"node": node_name, "layer": layer.index, "op": layer.op,
                         "output_bytes": layer.output_bytes, "params": layer.params,
                         "param_bytes": layer.param_bytes, "macs": layer.macs,
                         "mean_s": st.get("mean_s"), "std_s": st.get("std_s"), "p50_s": st.get("p50_s"),
                         "p90_s": st.get("p90_s"), "runs": p.experiment.runs.layer_runs,
                         "threads": cfg.threads, "cpus": cfg.cpus})
        run.append_layers(rows)
        metrics.set_layers(node_name, rows)


# --------------------------------------------------------------------------- the run

def _progress(console: Console, enabled: bool) -> Progress:
    # The ETA is the estimate's (per-phase, corrected as phases are measured), not
    # rich's extrapolation of configurations done: configurations differ by 100x.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                    console=console, disable=not enabled, transient=False)


@dataclass
class _Timing:
    """The run's own estimate and what it really took, for the start line, the
    ETA, and environment.json (the next run's estimate reads it)."""

    eta: Any                              # testbed.sweep.estimate.Eta
    source: str                           # "the plan" or the previous run it came from
    started: float = field(default_factory=time.monotonic)
    setup_s: float | None = None

    def remaining_s(self) -> float:
        return self.eta.remaining_s()


def _estimate(p: Plan, run: RunFolder, options: SweepOptions, finished: set[tuple[int, str, int]],
              backend: str, parallel: bool, layers: list[dict[str, Any]] | None = None) -> tuple[Any, str, float]:
    """Per-configuration phase estimates for what is left: from a previous run of the
    same experiment where it measured the configuration, else from the plan (with the
    measured per-layer times once known). Returns (estimates, source, setup seconds)."""
    from testbed.sweep import estimate as est

    exp = p.experiment
    shape = est.shape_for(exp, p.graph, p.profiles, p.splits, backend=backend, done=finished,
                          parallel_nodes=parallel, macs_per_s=_macs_per_s(p), host_cpus=len(os.sched_getaffinity(0)))
    if layers:
        shape = est.with_layers(shape, layers)
    estimates = est.plan_estimates(shape)
    source = "the plan" + (" and this run's per-layer profile" if layers else "")
    parent = options.output if options.output is not None else exp.resolve_path(exp.output)
    previous = est.previous_run(run.path.parent if options.resume else parent, exp.name, p.model.get("sha256"),
                                (run.config() or {}).get("nodes"), exclude=run.path)
    if previous is not None:
        estimates, matched = est.from_previous(estimates, previous)
        if matched:
            source = f"{previous.path.name} ({matched} of {len(estimates)} configurations measured there)"
    setup = 0.0 if layers else est.setup_s(shape) + est.layer_profile_s(shape)
    return estimates, source, setup


def _macs_per_s(p: Plan) -> float:
    from testbed.sweep.estimate import host_macs_per_s

    if "macs_per_s" not in p.model:
        p.model["macs_per_s"] = host_macs_per_s(p.model_path, sum(layer.macs for layer in p.graph.layers))
    return float(p.model["macs_per_s"])


def _open_run(p: Plan, options: SweepOptions) -> RunFolder:
    exp = p.experiment
    if options.resume is not None:
        run = RunFolder.open(options.resume)
        old = run.config()
        if old.get("name") != exp.name:
            raise TestbedError(f"{options.resume}: run of experiment {old.get('name')!r}, not {exp.name!r}")
        sha = (old.get("resolved_model") or {}).get("sha256")
        if sha and sha != p.model.get("sha256"):
            raise TestbedError(f"{options.resume}: recorded with another model (sha256 {sha[:12]}…)")
        return run
    parent = options.output if options.output is not None else exp.resolve_path(exp.output)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(5):
        name = f"{exp.name}-{stamp}" + (f"-{attempt}" if attempt else "")
        try:
            return RunFolder.create(parent, name)
        except FileExistsError:
            continue
    raise TestbedError(f"cannot create a run folder under {parent}")


def _publish_targets(exp: Experiment, run_name: str, metrics: Any, server: Any, dep: Any) -> Any:
    """Tell a ``testbed monitor`` Prometheus (if any) what to scrape; returns the undo."""
    from testbed.metrics.monitor import publish_targets, remove_targets

    agents = {n.name: f"{n.metrics_host}:{n.metrics_port}" for n in (dep.local, dep.remote)}
    try:
        local = "127.0.0.1" if server.host in ("0.0.0.0", "", "::") else server.host
        path = publish_targets(run_name, exp.name, f"{local}:{server.port}", agents)
    except OSError:
        return lambda: None  # no monitor folder to write to: nothing scrapes this run

    def undo() -> None:
        # A short run ends between two scrapes: record the end and let one more
        # scrape happen, or the last configuration never reaches Prometheus.
        metrics.finished()
        server.wait_for_scrape()
        remove_targets(path)

    return undo


def _node_spec(cfg: Any, cpuset: tuple[int, ...] | None) -> Any:
    from testbed.deploy import NodeSpec

    return NodeSpec(cpus=cfg.cpus, memory_bytes=cfg.memory, threads=cfg.threads, cpuset=cpuset,
                    cpu_period_us=int(round(cfg.cpu_period * 1e6)))


def _cpu_plan(exp: Experiment) -> Any:
    from testbed.deploy.cpus import plan_cpus

    n = exp.nodes
    return plan_cpus(n.local.cpus, n.remote.cpus, mode=n.pinning, local_set=n.local.cpu_list,
                     remote_set=n.remote.cpu_list)


@contextlib.contextmanager
def _pinned(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run this thread (and the threads it starts: metrics server, progress,
    steppers) on ``cpus``, off the local node's cores; restore afterwards."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_experiment(path: str | Path, options: SweepOptions = SweepOptions(),
                   console: Console | None = None) -> Path:
    """Run the experiment at ``path``; returns the run folder.

    Raises:
        ConfigError: the experiment or a profile is wrong (nothing was started).
        ShapingError / NodeError / ProtocolError: a part failed (everything torn down).
        Interrupted: Ctrl-C or SIGTERM (everything torn down, results kept; exit 130).
    """
    console = console or Console(stderr=True)
    signals = _Signals(console)
    run: RunFolder | None = None
    try:
        with signals:
            # --- PREFLIGHT (testbed.sweep.preflight, owned by the input-hardening work): every check of
            # `testbed check` -- files, model, split points, profiles, backend, kernel, ports, disk --
            # before anything is created; raises PreflightError listing every problem. Keep it first.
            from testbed.sweep.preflight import require
            require(path, options)
            # --- end PREFLIGHT
            exp = load_experiment(path)
            listen = options.metrics_listen or exp.metrics.listen
            try:
                parse_host_port(listen)
            except ValueError as e:
                raise ConfigError(str(e), field="--metrics-listen") from None
            if options.backend is not None and options.backend not in ("auto", "docker", "netns"):
                raise ConfigError(f"expected auto, docker or netns, got {options.backend!r}", field="--backend")
            p = plan(exp)
            run = _open_run(p, options)
            _run(p, run, options, listen, console)
    except KeyboardInterrupt:
        where = f"; results so far in {run.path} (continue with: testbed run {path} --resume {run.path})" \
            if run is not None else ""
        raise Interrupted(f"interrupted; everything torn down{where}") from None
    return run.path


def _run(p: Plan, run: RunFolder, options: SweepOptions, listen: str, console: Console) -> None:
    """Split, deploy, sweep; everything deployed is torn down on the way out."""
    exp = p.experiment
    finished = run.finished()
    measured_kpis = _kpis_from(run)
    old_seed = (run.config() or {}).get("order_seed") if options.resume is not None else None
    if old_seed is not None:
        p.seed = int(old_seed)  # a resumed run keeps its recorded order
    config = resolved_dict(exp, p.splits, model=dict(p.model), profiles=p.profiles)
    config["order_seed"] = p.seed if exp.runs.repeat > 1 else None
    run.write_config(config)
    todo = pending(p.configurations, finished)
    total = len(p.configurations)
    console.print(f"run folder: {run.path}  ({total} configurations, {total - len(todo)} already done)")
    if not todo:
        return
    from testbed.sweep.estimate import Eta, human

    cpu_plan = _cpu_plan(exp)
    disjoint = bool(cpu_plan.local and cpu_plan.remote and not set(cpu_plan.local) & set(cpu_plan.remote))
    guess_backend = options.backend or exp.nodes.backend
    estimates, source, setup = _estimate(p, run, options, finished, guess_backend if guess_backend != "auto"
                                         else "docker", disjoint)
    timing = _Timing(Eta(estimates), source)
    console.print(f"estimate: about {human(setup + timing.remaining_s())} (from {source})")
    inputs = _inputs(p)
    p.n_inputs = len(inputs)
    run_id = secrets.token_hex(3)
    token = secrets.token_urlsafe(24)
    backend = options.backend or exp.nodes.backend
    from testbed.deploy import deploy

    with contextlib.ExitStack() as stack:
        stack.enter_context(_pinned(cpu_plan.orchestrator))
        metrics, server = stack.enter_context(_metrics(exp, run.path.name, listen, console))
        dep = stack.enter_context(deploy(run_id, _node_spec(exp.nodes.local, cpu_plan.local),
                                         _node_spec(exp.nodes.remote, cpu_plan.remote),
                                         backend=backend, token=token))
        console.print(f"backend: {dep.backend}  run id: {run_id}")
        for note in cpu_plan.notes:
            console.print(f"cpus: {note}")
        stack.callback(_publish_targets(exp, run.path.name, metrics, server, dep))
        link = _Link(dep)
        stack.callback(link.clear)
        link.check(p.profiles)
        env = _environment(p, run_id, dep, link.capabilities(), options, cpu_plan, p.model)
        old_env = run.environment()
        if old_env:
            env = {**old_env, "resumed": [*old_env.get("resumed", []), env]}
        run.write_environment(env)
        nodes = _Nodes(dep, dep.local.client(token), dep.remote.client(token), parallel=disjoint)
        for client in (nodes.local, nodes.remote):
            stack.callback(client.close)
            client.health()
        nodes.local.set_inputs([{p.graph.inputs[0].name: a} for a in inputs])
        nodes.local.connect_peer(dep.remote.data_host, dep.remote.data_port)
        parts = _Parts(p, run)
        if not options.keep_parts:
            stack.callback(parts.remove)
        _profile_layers(p, nodes, run, metrics)
        timing.setup_s = time.monotonic() - timing.started
        estimates, source, _ = _estimate(p, run, options, finished, dep.backend, disjoint, layers=run.layers())
        timing.eta, timing.source = Eta(estimates), source
        _sweep(p, nodes, link, run, todo, total, measured_kpis, metrics, console, options, parts, timing)
        _record_timing(run, timing, env)


def _record_timing(run: RunFolder, timing: _Timing, env: dict[str, Any]) -> None:
    """What the run took, beside what was estimated, in environment.json."""
    env = run.environment() or env
    record = {"setup_s": timing.setup_s, "sweep_s": time.monotonic() - timing.started - (timing.setup_s or 0.0),
              "total_s": time.monotonic() - timing.started, "estimate_source": timing.source}
    if env.get("resumed"):
        env["resumed"][-1]["timing"] = record
    else:
        env["timing"] = record
    run.write_environment(env)


def pending(configurations: list[Configuration], finished: set[tuple[int, str, int]]) -> list[Configuration]:
    """The configurations still to measure, in sweep order (``--resume`` skips the rest)."""
    return [c for c in configurations if c.key not in finished]


def _kpis_from(run: RunFolder) -> dict[tuple[int, str], dict[str, Any]]:
    """KPIs measured by an earlier session of a resumed run (measured once per part)."""
    from testbed.analysis.results import KPI_COLUMNS

    out: dict[tuple[int, str], dict[str, Any]] = {}
    for row in run.parts():
        if row.get("kpi_profile") == row.get("profile"):
            out[(row["split"], row["part"])] = {**{c: row.get(c) for c in KPI_COLUMNS},
                                                "kpi_profile": row["kpi_profile"]}
    return out


def _sweep(p: Plan, nodes: _Nodes, link: _Link, run: RunFolder, todo: list[Configuration], total: int,
           measured_kpis: dict[tuple[int, str], dict[str, Any]], metrics: Any, console: Console,
           options: SweepOptions, parts: _Parts, timing: _Timing) -> None:
    from testbed.sweep.estimate import human

    done = total - len(todo)
    current_profile = None
    with _progress(console, options.progress) as bar:
        task = bar.add_task("starting", total=total, completed=done, eta=human(timing.remaining_s()))
        metrics.set_progress(done, total)
        start = time.monotonic()
        for c in todo:
            prof, k = c.profile, c.split
            # Each configuration's clock starts where the previous one's ended, so
            # the sweep's whole time is accounted for, between configurations too.
            clock = PhaseClock(start)
            if prof is not current_profile:
                with clock("link"):
                    link.apply(prof)
                current_profile = prof
                for direction in ("uplink", "downlink"):
                    d = getattr(prof, direction)
                    metrics.set_link(direction, prof.name, getattr(d, "rate_bps", None) if d else None,
                                     getattr(d, "delay_s", None) if d else None,
                                     _loss_pct(d),
                                     jitter_s=getattr(d, "jitter_s", None) if d else None,
                                     emulation=link.emulation[direction])
            where = f"repeat {c.repeat + 1}/{p.experiment.runs.repeat}  " if p.experiment.runs.repeat > 1 else ""
            bar.update(task, description=f"{where}{prof.name}  k={k}")
            eta = timing.remaining_s()
            metrics.configuration_started(k, prof.name, total=total, done=done, eta_s=eta)
            result = _run_configuration(p, nodes, link, c, measured_kpis, metrics, clock, parts)
            with clock("write"):
                run.write_rows(result)
            result.summary.update(clock.close())
            run.commit(result)
            metrics.add_phases(prof.name, clock.seconds)
            timing.eta.finished(c.key, clock.seconds)
            start = time.monotonic()
            done += 1
            bar.update(task, completed=done, eta=human(timing.remaining_s()))
            try:
                metrics.configuration_done(k, prof.name, done=done, eta_s=timing.remaining_s())
            except TestbedError as e:  # a Pushgateway that is down must not stop a measurement
                console.print(f"[yellow]warning:[/yellow] {e}")
        bar.update(task, description="done")
    console.print(f"done: {run.path}")
