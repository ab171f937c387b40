"""A run of samples on the local node: warm-up + samples one at a time (single mode),
or a stream at a frame rate (``nodes.stream``).

Owns the run's bookkeeping around the per-sample halves of ``nodes.pipeline``: the
handshake (``plan_run``), the fidelity references (the uncompressed split on the same
inputs), the early stop at ``max_seconds``, where the call's time went (phases), and
each sample's downlink retransmissions (the remote's counter between two results).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np

from nodes import protocol as P
from nodes.cpu_account import CpuAccount
from nodes.part import Part
from nodes.pipeline import LocalLink, Observe, Plan, RunResult, RunSpec, StepError, add_fidelity, plan_run, sample
from nodes.stream import run_stream


def run_samples(link: LocalLink | None, part: Part | None,
                inputs: Sequence[Mapping[str, np.ndarray]], spec: RunSpec,
                observe: Observe = lambda part, s: None,
                cpu: CpuAccount | None = None) -> RunResult:
    """Run warm-up + samples (or a stream, ``spec.mode``).

    Single mode stops early (after at least one sample) once ``max_seconds`` have
    passed since the call began. ``cpu`` (this node's cgroup counters) adds
    ``local_cpu_s`` and the throttling columns to every row. ``part`` is this
    node's part (the head in topology 1, the tail in 2 and 3).
    """
    if not inputs:
        raise StepError("no input set: call set_inputs first")
    cpu = cpu if cpu is not None else CpuAccount(None, None, None)
    start = time.monotonic()
    plan = plan_run(link, part, list(inputs[0]), spec)
    try:
        refs = _references(link, part, inputs, spec, plan, cpu) if spec.fidelity else None
        planned = time.monotonic()
        if spec.mode == "stream":
            return run_stream(link, part, inputs, spec, plan, cpu, observe, refs, started=start,
                              planned=planned)
        return _single(link, part, inputs, spec, plan, cpu, observe, refs, start, planned)
    finally:
        plan.close()


def _single(link: LocalLink | None, part: Part | None, inputs: Sequence[Mapping[str, np.ndarray]],
            spec: RunSpec, plan: Plan, cpu: CpuAccount, observe: Observe,
            refs: list[dict[str, np.ndarray]] | None, start: float, planned: float) -> RunResult:
    warmed = planned
    rows: list[dict[str, Any]] = []
    final: dict[str, np.ndarray] = {}
    marks: list[int | None] = []  # the remote's retransmission count before each result
    for i in range(spec.warmup + spec.samples):
        idx = i % len(inputs)
        row, out = sample(link, part, inputs[idx], plan, i, idx, observe, cpu)
        final = out if out is not None else final
        marks.append(row.pop("_remote_retrans", None))
        if i + 1 == spec.warmup:
            warmed = time.monotonic()
        if i >= spec.warmup:
            row["sample"] = i - spec.warmup
            row["_run_index"] = i
            add_fidelity(row, refs, idx, out, spec.input_size)
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


def _references(link: LocalLink | None, part: Part | None, inputs: Sequence[Mapping[str, np.ndarray]],
                spec: RunSpec, plan: Plan, cpu: CpuAccount) -> list[dict[str, np.ndarray]]:
    """Final outputs of the uncompressed split (raw, TCP) for every input: the fidelity reference."""
    ref_plan = dataclasses.replace(plan, choose=lambda n: "raw", codec="raw", input_encoding="raw", udp=None)
    refs = []
    for idx, feed in enumerate(inputs):
        _, out = sample(link, part, feed, ref_plan, -1 - idx, idx, lambda p, s: None, cpu)
        refs.append({n: np.array(a) for n, a in (out or {}).items()})
    return refs
