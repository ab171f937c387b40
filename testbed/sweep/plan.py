"""What a run will do, resolved before anything is deployed: the plan and its order.

Owns ``SweepOptions`` (command-line overrides), ``Configuration`` (one repeat of
one split point at one profile), ``Plan`` (the experiment with its model, split
points and profiles resolved, and the order configurations are walked in), the
run folder to write into (new, or the one ``--resume`` continues), and the
input images. Measuring is ``configuration``'s; running the whole thing ``run``'s.
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.analysis.results import RunFolder
from testbed.errors import TestbedError
from testbed.experiment import Experiment

if TYPE_CHECKING:
    import numpy as np

    from testbed.link.profile import LinkProfile
    from testbed.model.graph import ModelGraph


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
    profile: LinkProfile
    split: int

    @property
    def key(self) -> tuple[int, str, int]:
        return self.repeat, self.profile.name, self.split


@dataclass
class Plan:
    """What the sweep will do, resolved before anything is deployed."""

    experiment: Experiment
    profiles: list[LinkProfile]          # in file order
    model_path: Path
    graph: ModelGraph
    splits: list[int]
    model: dict[str, Any] = field(default_factory=dict)  # the manifest's model entry (path, sha256, ...)
    n_inputs: int = 1
    seed: int = 0                        # of the shuffled order when runs.repeat > 1
    macs_per_s: float | None = None      # this host's speed on the model, once measured (estimates)

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


def pending(configurations: list[Configuration], finished: set[tuple[int, str, int]]) -> list[Configuration]:
    """The configurations still to measure, in sweep order (``--resume`` skips the rest)."""
    return [c for c in configurations if c.key not in finished]


def inputs(p: Plan) -> list[np.ndarray]:
    """The input images the samples cycle through (pre-processing is not timed)."""
    from testbed.inputs import folder_images, synthetic_images

    spec = p.experiment.input
    info = p.graph.inputs[0]
    if spec.synthetic:
        return synthetic_images(tuple(info.shape), info.dtype, spec.count, spec.seed)
    return folder_images(p.experiment.resolve_path(spec.source), tuple(info.shape), info.dtype, spec.count)


def open_run(p: Plan, options: SweepOptions) -> RunFolder:
    """A new run folder, or the one ``--resume`` names (same experiment, same model)."""
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
