"""Measuring one configuration: parts in place, KPIs, warm-up, samples, ideals.

Owns what happens between "this split point at this profile" and its result
rows: the tail handed to the remote over the control plane, the head delivered
to the local node over the shaped downlink (timed), part KPIs (once per part,
in a fresh process on its node; both nodes at once when they have CPUs of
their own), warm-up on each node without the link, samples bounded by time,
the framing-aware ideal of every transfer, and per-layer latency (once per run
per node). Every step is charged to a phase of the configuration's clock.
When the nodes do not share a clock (an ssh remote) the remote's offset is
measured before and after (``testbed.deploy.clock``), handed to the agents for the
one-way times, and recorded with its uncertainty and drift.
How the nodes time things is the agents'; how rows are written ``results``'.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from testbed.analysis.results import ConfigurationResult, RunFolder, ideal_transfer_s
from testbed.experiment import Runs
from testbed.sweep import data_path
from testbed.sweep.phases import PhaseClock
from testbed.sweep.placement import NodePair
from testbed.sweep.plan import Configuration, Plan

if TYPE_CHECKING:
    from testbed.deploy.agent_client import AgentClient
    from testbed.link.link import Link
    from testbed.link.profile import Direction, LinkProfile
    from testbed.metrics import SweepMetrics
    from testbed.sweep.android import PhoneHead
    from testbed.sweep.parts import Parts

# Extra samples taken to reach min_seconds are asked for in batches sized from
# the time per sample so far, at most this many per control round trip.
_MAX_BATCH = 50
DIRECTIONS = ("uplink", "downlink")


@dataclass(frozen=True)
class Deadlines:
    """How long each step of a configuration may take before its node counts as
    hung: three times its estimate plus a margin (the estimate knows the bytes,
    the rate and the samples), instead of one fixed bound for every configuration."""

    load_s: float = 120.0
    delivery_s: float = 600.0
    kpi_s: float = 900.0
    warmup_s: float = 600.0
    run_s: float = 3600.0

    @classmethod
    def from_estimate(cls, phases: dict[str, float] | None) -> Deadlines:
        if not phases:
            return cls()

        def bound(*names: str, margin: float = 30.0) -> float:
            return 3.0 * sum(phases.get(n, 0.0) for n in names) + margin

        return cls(load_s=bound("tail_load", "head_load", margin=60.0), delivery_s=bound("delivery", "head_load"),
                   kpi_s=bound("kpi", margin=120.0), warmup_s=bound("warmup", margin=60.0),
                   run_s=bound("sampling", "warmup"))


# --------------------------------------------------------------------------- the link as results see it

def _constant(prof: LinkProfile, direction: str) -> Direction | None:
    """The direction's parameters when they hold for the whole configuration
    (None for an unshaped direction or a time-varying trace)."""
    schedule = prof.schedule(direction)
    return schedule[0][1] if len(schedule) == 1 else None


def ideal(prof: LinkProfile, direction: str, payload: Any, mss: Any, mtu: Any) -> float | None:
    """Framing-aware ideal time of ``payload`` bytes in one direction (None: no ideal)."""
    d = _constant(prof, direction)
    if d is None or not payload:
        return None
    return ideal_transfer_s(int(payload), d.rate_bps, d.delay_s, mss, mtu)


def add_ideals(prof: LinkProfile, sample: dict[str, Any]) -> None:
    """Each direction's ideal time and measured ÷ ideal, into the sample row."""
    for direction, sent in (("uplink", "uplink_bytes"), ("downlink", "downlink_bytes")):
        best = ideal(prof, direction, sample.get(sent), sample.get(f"{direction}_mss"), sample.get(f"{direction}_mtu"))
        measured = sample.get(f"{direction}_s")
        sample[f"{direction}_ideal_s"] = best
        sample[f"{direction}_over_ideal"] = measured / best if best and measured else None


def loss_pct(d: Direction | None) -> float | None:
    """Random loss in percent (None when no loss or a Gilbert-Elliott/state model)."""
    loss = d.loss if d is not None else None
    return loss.random_pct if loss is not None else None


def link_columns(prof: LinkProfile) -> dict[str, Any]:
    """The configured link as summary.csv records it (a trace: its base values)."""
    out: dict[str, Any] = {}
    for direction in DIRECTIONS:
        d = getattr(prof, direction)
        out[f"{direction}_rate_bps"] = d.rate_bps if d is not None else None
        out[f"{direction}_delay_s"] = d.delay_s if d is not None else None
        out[f"{direction}_loss_pct"] = loss_pct(d)
    return out


# --------------------------------------------------------------------------- samples

def take_samples(nodes: NodePair, runs: Runs, input_encoding: str, codec: str, n_inputs: int,
                 model_outputs: list[str], clock: PhaseClock, parts: tuple[bool, bool],
                 path: dict[str, Any] | None = None, stream: dict[str, Any] | None = None,
                 deadlines: Deadlines = Deadlines(), clock_offset_ns: int | None = None) -> list[dict[str, Any]]:
    """Warm-up, then ``runs.samples`` samples, stopped early (after at least one)
    once ``max_seconds`` have passed; then more, in batches, while under
    ``min_seconds``. The agent enforces ``max_seconds`` itself, so a slow
    low-bandwidth configuration costs one control round trip, not one per sample.

    Warm-up invokes each part ``runs.warmup`` times on its own node (first
    invokes pack weights, fill caches) without sending anything: the link needs
    no warming (a rate-limited TCP connection is at full rate from the first
    segment), and at low rates a warm-up sample through it took seconds.

    ``path`` holds the data-path arguments (``data_path.run_args``: topology,
    transport, stream ...); a stream's totals are put into ``stream``."""
    t0 = time.monotonic()
    path = path or {}
    (ue_has, ue_role), (net_has, net_role) = parts_on_nodes(parts, path.get("topology", 1))
    if runs.warmup:
        with clock("warmup"):
            nodes.both((lambda: nodes.local.warm(ue_role, runs.warmup, timeout=deadlines.warmup_s))
                       if ue_has else None,
                       (lambda: nodes.remote.warm(net_role, runs.warmup, timeout=deadlines.warmup_s))
                       if net_has else None)
    with clock("sampling"):
        result = nodes.local.run_detailed(samples=runs.samples, warmup=0, codec=codec,
                                          input_encoding=input_encoding, max_seconds=runs.max_seconds,
                                          model_outputs=model_outputs, timeout=deadlines.run_s,
                                          clock_offset_ns=clock_offset_ns, **path)
    clock.add("warmup", result["phases"].get("handshake_s", 0.0), taken_from="sampling")
    samples = result["samples"]
    if stream is not None:
        stream.update(result.get("stream") or {})
    # the agent cycles through the inputs from the first sample of each call
    for s in samples:
        s.setdefault("input_index", s.get("sample", 0) % n_inputs)
    while samples and "stream" not in path:
        elapsed = time.monotonic() - t0
        if elapsed >= runs.min_seconds or elapsed >= runs.max_seconds:
            break
        per_sample = elapsed / len(samples)
        want = max(1, min(_MAX_BATCH, int((runs.min_seconds - elapsed) / per_sample) + 1))
        with clock("sampling"):
            more = nodes.local.run_detailed(samples=want, warmup=0, codec=codec, input_encoding=input_encoding,
                                            max_seconds=runs.max_seconds - elapsed, model_outputs=model_outputs,
                                            timeout=deadlines.run_s, clock_offset_ns=clock_offset_ns,
                                            **path)["samples"]
        for s in more:
            s["input_index"] = s.get("sample", 0) % n_inputs
        samples += more
    for i, s in enumerate(samples):
        s["sample"] = i
        # the agent names bytes per direction; the results name them after what they carry
        if "result_bytes_wire" not in s and "downlink_bytes" in s:
            s["result_bytes_wire"] = s["downlink_bytes"]
    return samples


def parts_on_nodes(parts: tuple[bool, bool], topology: int) -> tuple[tuple[bool, str], tuple[bool, str]]:
    """((UE has a part, its role), (remote has a part, its role)) from (has head, has tail)."""
    has_head, has_tail = parts
    net_role, ue_role = data_path.roles(topology)
    has = {"head": has_head, "tail": has_tail}
    return (has[ue_role], ue_role), (has[net_role], net_role)


# --------------------------------------------------------------------------- KPIs

KpiCache = dict[tuple[int, str], dict[str, Any]]


def _kpis(client: AgentClient, role: str, runs: Runs, threads: int | None, timeout: float) -> dict[str, Any]:
    return client.kpis(role=role, runs=runs.kpi_runs, warmup=max(1, runs.warmup), threads=threads, timeout=timeout)


def kpis_from(run: RunFolder) -> KpiCache:
    """KPIs measured by an earlier session of a resumed run (measured once per part)."""
    from testbed.analysis.results import KPI_COLUMNS

    out: KpiCache = {}
    for row in run.parts():
        if row.get("kpi_profile") == row.get("profile"):
            out[(row["split"], row["part"])] = {**{c: row.get(c) for c in KPI_COLUMNS},
                                                "kpi_profile": row["kpi_profile"]}
    return out


def _part_rows(p: Plan, nodes: NodePair, c: Configuration, entry: dict[str, Any], head: bytes | None,
               tail: bytes | None, delivery_s: float | None, kpis: KpiCache, metrics: SweepMetrics,
               clock: PhaseClock, deadlines: Deadlines, phone: PhoneHead | None = None) -> list[dict[str, Any]]:
    """parts.csv rows of the configuration, measuring KPIs the first time a part is seen
    (with a phone as the local node, the head's KPIs are the phone's: ``testbed.sweep.android``)."""
    exp, k = p.experiment, c.split
    if phone is not None and head is not None:
        if k not in phone.measured:
            with clock("kpi"):
                phone.head(k, head)
        kpis.setdefault((k, "head"), {**phone.kpis(k), "kpi_profile": c.profile.name})
    roles = (("head", "local", nodes.local, head, entry["head_sha256"], exp.nodes.local.threads),
             ("tail", "remote", nodes.remote, tail, entry["tail_sha256"], exp.nodes.remote.threads))
    if exp.topology != 1:  # the head runs in the network, the tail on the UE
        roles = (("head", "remote", nodes.remote, head, entry["head_sha256"], exp.nodes.remote.threads),
                 ("tail", "local", nodes.local, tail, entry["tail_sha256"], exp.nodes.local.threads))
    jobs: list[Callable[[], Any] | None] = [
        (lambda cl=client, r=role, t=threads: _kpis(cl, r, exp.runs, t, deadlines.kpi_s))
        if data is not None and (k, role) not in kpis else None
        for role, _, client, data, _, threads in roles]
    if any(jobs):
        with clock("kpi"):
            got = nodes.both(*jobs)  # the head's on the local node while the tail's on the remote
        for (role, *_), kp in zip(roles, got):
            if kp is not None:
                kpis[(k, role)] = {**kp, "kpi_profile": c.profile.name}
    rows = []
    for role, node_name, _, data, sha, _ in roles:
        if data is None:
            continue
        kp = kpis[(k, role)]
        metrics.set_part(node_name, role, k, kp, file_bytes=len(data))
        if phone is not None and role == "head":
            node_name = "phone"
        rows.append({"part": role, "node": node_name, "file_bytes": len(data), "sha256": sha,
                     "delivery_s": delivery_s if node_name == "local" else None, **kp})
    return rows


# --------------------------------------------------------------------------- one configuration

def shaped_at(nodes: NodePair) -> dict[str, str]:
    """Where each direction is shaped, as results record it: ``local-egress``,
    ``remote-egress`` or ``local-ingress`` (an IFB on this host: an ssh remote's downlink)."""
    dep = getattr(nodes, "dep", None)
    down = getattr(getattr(dep, "remote", None), "shaping", None)
    return {"uplink_shaped_at": "local-egress",
            "downlink_shaped_at": "local-ingress" if getattr(down, "ingress", False) else "remote-egress"}


def _clock_check(nodes: NodePair) -> Any:
    """A before/after offset check when the remote keeps its own clock, else None."""
    dep = getattr(nodes, "dep", None)
    if dep is None or getattr(dep.remote, "clock_shared", True):
        return None
    from testbed.deploy.clock import ClockCheck

    return ClockCheck(nodes.local, nodes.remote)


def run_configuration(p: Plan, nodes: NodePair, link: Link, c: Configuration, kpis: KpiCache,
                      metrics: SweepMetrics, clock: PhaseClock, parts: Parts,
                      deadlines: Deadlines = Deadlines(), phone: PhoneHead | None = None) -> ConfigurationResult:
    """Measure one configuration; every step charged to ``clock``, bounded by ``deadlines``. With
    ``phone`` the head is also measured on the phone and e2e composed (``testbed.sweep.android``).

    Raises:
        NodeError / ProtocolError: a node died, hung past its deadline or failed a step.
    """
    exp = p.experiment
    prof, k = c.profile, c.split
    clocks = _clock_check(nodes)
    offset = clocks.start().offset_ns if clocks is not None else None
    phone_before = phone.state() if phone is not None else None
    phone_measured = phone is not None and head_needs_phone(phone, k)
    with clock("split"):
        entry = parts.entry(k)
        head, tail = parts.read(entry["head"]), parts.read(entry["tail"])
    delivery_s, delivery_ideal_s = _place_parts(p, nodes, prof, k, entry, {"head": head, "tail": tail},
                                                metrics, clock, deadlines, offset)
    part_rows = _part_rows(p, nodes, c, entry, head, tail, delivery_s, kpis, metrics, clock, deadlines, phone)

    t_sampling = time.monotonic()
    stream: dict[str, Any] = {}
    samples = take_samples(nodes, exp.runs, exp.input_encoding, exp.codec, p.n_inputs,
                           [o.name for o in p.graph.outputs], clock, (head is not None, tail is not None),
                           data_path.run_args(p, prof), stream, deadlines, clock_offset_ns=offset)
    sampling_s = time.monotonic() - t_sampling
    if clocks is not None:
        clocks.finish()
    if phone is not None:
        phone.compose(samples, k, c.key)
    for s in samples:
        s.setdefault("codec", exp.codec)
        s.setdefault("input_encoding", exp.input_encoding)
        s["emulation_uplink"] = link.emulation["uplink"]
        s["emulation_downlink"] = link.emulation["downlink"]
        add_ideals(prof, s)
        if clocks is not None:
            s.update(clocks.sample_columns())
        metrics.observe_sample(k, prof.name, s)

    summary = {
        "codec": exp.codec, "input_encoding": exp.input_encoding,
        "emulation_uplink": link.emulation["uplink"], "emulation_downlink": link.emulation["downlink"],
        **link_columns(prof), "warmup": exp.runs.warmup,
        "head_file_bytes": entry.get("head_bytes"), "tail_file_bytes": entry.get("tail_bytes"),
        "delivery_s": delivery_s, "delivery_ideal_s": delivery_ideal_s, "sampling_s": sampling_s,
        **shaped_at(nodes), **(clocks.summary_columns() if clocks is not None else {}),
        **data_path.summary_columns(p, prof, samples, stream),
    }
    if phone is not None:
        summary.update(phone.summary(k, phone_before, phone.state(), phone_measured))
    return ConfigurationResult(profile=prof.name, split=k, samples=samples, summary=summary, parts=part_rows,
                               repeat=c.repeat)


def head_needs_phone(phone: PhoneHead, k: int) -> bool:
    """The phone benchmarks head part ``k`` in this configuration (not measured before)."""
    return k > 0 and k not in phone.measured


def _place_parts(p: Plan, nodes: NodePair, prof: LinkProfile, k: int, entry: dict[str, Any],
                 blobs: dict[str, bytes | None], metrics: SweepMetrics, clock: PhaseClock,
                 deadlines: Deadlines, clock_offset_ns: int | None = None,
                 ) -> tuple[float | None, float | None]:
    """The network's part to the remote over the control plane; the UE's part
    delivered remote -> local over the shaped downlink (timed), as the scenario
    delivers the split model from the network to the device. Topology 1: head on
    the UE; 2 and 3: tail on the UE. Returns (delivery_s, its ideal)."""
    exp = p.experiment
    net_role, ue_role = data_path.roles(exp.topology)
    with clock("tail_load"):
        if exp.topology != 1:  # a remote keeps its parts across configurations: one role each
            nodes.remote.load_part(ue_role, None, timeout=deadlines.load_s)
        nodes.remote.load_part(net_role, blobs[net_role], entry[f"{net_role}_sha256"],
                               threads=exp.nodes.remote.threads, timeout=deadlines.load_s)
    ue_part = blobs[ue_role]
    if ue_part is None:
        with clock("head_load"):
            nodes.local.load_part(ue_role, None, timeout=deadlines.load_s)
        return None, None
    with clock("delivery"):
        timing = nodes.remote.deliver_part(nodes.local, ue_part, entry[f"{ue_role}_sha256"], role=ue_role,
                                           threads=exp.nodes.local.threads, timeout=deadlines.delivery_s,
                                           clock_offset_ns=clock_offset_ns)
    clock.add("head_load", float(timing.get("load_s") or 0.0), taken_from="delivery")
    delivery_s = float(timing["delivery_s"])
    metrics.observe_delivery(k, prof.name, delivery_s, size_bytes=len(ue_part))
    return delivery_s, ideal(prof, "downlink", timing.get("wire_bytes"), timing.get("mss"), timing.get("mtu"))


# --------------------------------------------------------------------------- layers

def profile_layers(p: Plan, nodes: NodePair, run: RunFolder, metrics: SweepMetrics,
                   phone: PhoneHead | None = None) -> None:
    """Per-layer latency on each node under its limits, once per run (both at once when allowed).
    With a phone, the local node's layers are the phone's (the whole model with op profiling)."""
    from testbed.model.layers import one_layer_models

    done = run.layer_nodes()
    if phone is not None and "local" not in done:
        rows = phone.layer_rows(p.model_path.read_bytes())
        run.append_layers(rows)
        metrics.set_layers("local", [r for r in rows if r.get("mean_s") is not None])
        done = done | {"local"}
    targets = [(n, cfg) for n, cfg in (("local", p.experiment.nodes.local), ("remote", p.experiment.nodes.remote))
               if n not in done]
    if not targets:
        return
    models = one_layer_models(p.model_path)
    runs = p.experiment.runs
    clients = {"local": nodes.local, "remote": nodes.remote}

    def job(name: str, threads: int | None) -> Callable[[], Any]:
        return lambda: clients[name].profile_layers(models, runs=runs.layer_runs, warmup=max(1, runs.warmup),
                                                    threads=threads)

    jobs = {n: job(n, cfg.threads) for n, cfg in targets}
    results = dict(zip(("local", "remote"), nodes.both(jobs.get("local"), jobs.get("remote"))))
    for node_name, cfg in targets:
        rows = [{"node": node_name, "layer": layer.index, "op": layer.op,
                 "output_bytes": layer.output_bytes, "params": layer.params,
                 "param_bytes": layer.param_bytes, "macs": layer.macs,
                 "mean_s": st.get("mean_s"), "std_s": st.get("std_s"), "p50_s": st.get("p50_s"),
                 "p90_s": st.get("p90_s"), "runs": runs.layer_runs, "threads": cfg.threads, "cpus": cfg.cpus}
                for layer, st in zip(p.graph.layers, results[node_name])]
        run.append_layers(rows)
        metrics.set_layers(node_name, rows)
