"""What a run records about where it ran: ``environment.json``.

Owns the facts a reader needs to trust or compare a run — host, versions,
backend and node limits, link capabilities, model identity, the CPU
assignment, the order seed — and, at the end, what the run took beside where
its estimate came from. A resumed run appends its own record under ``resumed``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.analysis.results import RunFolder
from testbed.sweep.plan import Plan, SweepOptions

if TYPE_CHECKING:
    from testbed.deploy import Deployment
    from testbed.deploy.cpus import CpuPlan
    from testbed.link.shaper import Capabilities

PACKAGES = ("splitbed", "ai-edge-litert", "numpy", "pyroute2", "docker", "prometheus-client", "pydantic")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def environment(p: Plan, run_id: str, dep: Deployment, caps: Capabilities, options: SweepOptions,
                cpus: CpuPlan, remote_caps: Capabilities | None = None) -> dict[str, Any]:
    """The facts of this session of the run (see the module docstring); ``remote_caps``:
    the remote kernel's, when the downlink is shaped there (shape_at: remote)."""
    exp = p.experiment
    remote = {"remote_link_capabilities": {k: getattr(remote_caps, k) for k in ("netem", "htb", "tbf", "kernel")}} \
        if remote_caps is not None else {}
    return {
        "run_id": run_id,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "system": platform.system(), "machine": platform.machine(),
                 "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "versions": {d: _version(d) for d in PACKAGES},
        "backend_requested": options.backend or exp.nodes.backend,
        **dep.environment(),  # backend, backend_reason, nodes (limits, image id, ...)
        "link_capabilities": {k: getattr(caps, k) for k in ("netem", "htb", "tbf")},
        **remote,
        "model": {"path": str(p.model_path), **{k: p.model.get(k) for k in ("sha256", "layers", "bytes")}},
        "threads": {"local": exp.nodes.local.threads, "remote": exp.nodes.remote.threads},
        "cpu_assignment": cpus.as_dict(),
        "order_seed": p.seed if exp.runs.repeat > 1 else None,
    }


def record(run: RunFolder, env: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Write this session's environment (under ``resumed`` when continuing ``old``)."""
    if old:
        env = {**old, "resumed": [*old.get("resumed", []), env]}
    run.write_environment(env)
    return env


def record_timing(run: RunFolder, timing: dict[str, Any]) -> None:
    """What the run took, beside where its estimate came from (``timing``)."""
    env = run.environment()
    if env.get("resumed"):
        env["resumed"][-1]["timing"] = timing
    else:
        env["timing"] = timing
    run.write_environment(env)
