"""Saying how long a run will take and how far along it is.

Owns the run's estimate (``testbed.sweep.estimate``: from a previous run of the
same experiment where it measured a configuration, else from the plan, with
the measured per-layer times once the run has them), the progress bar whose
ETA is that estimate corrected phase by phase as configurations finish (not
rich's extrapolation: configurations differ by 100×), and the timing record
the next run's estimate reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from testbed.analysis.results import RunFolder
from testbed.sweep import estimate as est
from testbed.sweep.plan import Plan, SweepOptions

Estimates = dict[tuple[int, str, int], dict[str, float]]


def progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
                    console=console, disable=not enabled, transient=False)


@dataclass
class Timing:
    """The run's estimate, corrected as it goes, and what it really took."""

    eta: est.Eta
    source: str                           # "the plan ..." or the previous run it came from
    started: float = field(default_factory=time.monotonic)
    setup_s: float | None = None

    def remaining_s(self) -> float:
        return self.eta.remaining_s()

    def human_remaining(self) -> str:
        return est.human(self.remaining_s())

    def record(self) -> dict[str, Any]:
        """For environment.json: what the run took and where its estimate came from."""
        now = time.monotonic()
        return {"setup_s": self.setup_s, "sweep_s": now - self.started - (self.setup_s or 0.0),
                "total_s": now - self.started, "estimate_source": self.source}


def estimate(p: Plan, run: RunFolder, options: SweepOptions, finished: set[tuple[int, str, int]],
             backend: str, parallel: bool, layers: list[dict[str, Any]] | None = None
             ) -> tuple[Estimates, str, float]:
    """Per-configuration phase estimates for what is left, where they came from,
    and the setup seconds still ahead (deploy + per-layer profiling)."""
    exp = p.experiment
    shape = est.shape_for(exp, p.graph, p.profiles, p.splits, backend=backend, done=finished,
                          parallel_nodes=parallel, macs_per_s=_macs_per_s(p),
                          host_cpus=len(os.sched_getaffinity(0)))
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
    if p.macs_per_s is None:
        p.macs_per_s = est.host_macs_per_s(p.model_path, sum(layer.macs for layer in p.graph.layers))
    return p.macs_per_s
