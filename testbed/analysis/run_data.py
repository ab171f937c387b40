"""A run folder read back for the report: typed rows plus the few derived facts
every figure needs (profile order, split points, anchors, input size).

Reads result files only, through ``testbed.analysis.results`` (which owns names and
columns), so a report can be rebuilt from a copied folder. Draws nothing
(``testbed.analysis.plots``) and writes nothing (``testbed.analysis.report``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.analysis.results import E2E_PARTS, SUMMARY, TIMINGS, RunFolder
from testbed.errors import TestbedError

# Names of the SA4 evaluation framework's metrics (TR 26.927 split-inference KPIs),
# used as labels so the report reads in the framework's words.
SA4 = {
    "file_bytes": "split model file size",
    "cut_bytes_raw": "intermediate data size (raw)",
    "cut_bytes_wire": "intermediate data size (on the wire)",
    "bitrate": "intermediate data bitrate",
    "head_s": "local inference time",
    "tail_s": "remote inference time",
    "e2e_s": "end-to-end latency",
    "encode_s": "encode time",
    "decode_s": "decode time",
    "uplink_s": "intermediate data delivery time (uplink)",
    "downlink_s": "result delivery time (downlink)",
    "delivery_s": "split model delivery time",
    "memory": "memory (init / peak)",
}

# The stacked-time order: everything that adds up to e2e, in the order it happens.
STACK = E2E_PARTS


@dataclass
class RunData:
    """Everything one run folder holds, typed."""

    path: Path
    label: str
    summary: list[dict[str, Any]]         # one row per (profile, split), repeats pooled
    samples: list[dict[str, Any]]
    parts: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    environment: dict[str, Any]
    config: dict[str, Any]
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    repeat_rows: list[dict[str, Any]] = field(default_factory=list)  # summary.csv as written

    @classmethod
    def load(cls, path: str | Path, label: str | None = None) -> "RunData":
        """Read a run folder.

        Raises:
            TestbedError: not a run folder, or no finished configuration in it.
        """
        folder = RunFolder(path)
        if not folder.path.is_dir():
            raise TestbedError(f"{folder.path}: no such run folder")
        if not (folder.path / SUMMARY).is_file():
            raise TestbedError(f"{folder.path}: no {SUMMARY}; not a run folder or no configuration finished")
        repeat_rows = folder.summary()
        if not repeat_rows:
            raise TestbedError(f"{folder.path / SUMMARY}: no finished configuration")
        samples = folder.samples()
        from testbed.analysis.results import pool_repeats
        summary = pool_repeats(repeat_rows, samples)
        config = {}
        try:
            config = folder.config() or {}
        except (OSError, ValueError):
            pass
        return cls(folder.path, label or folder.path.name, summary, samples, folder.parts(),
                   folder.layers(), folder.environment(), config, folder.manifest(), repeat_rows=repeat_rows)

    @property
    def repeats(self) -> int:
        """How many times the sweep was repeated in this folder."""
        return len({r.get("repeat") or 0 for r in self.repeat_rows}) or 1

    # --- derived ------------------------------------------------------------

    @property
    def profiles(self) -> list[str]:
        """Profiles in the order they were swept."""
        return list(dict.fromkeys(r["profile"] for r in self.summary))

    @property
    def splits(self) -> list[int]:
        return sorted({r["split"] for r in self.summary})

    @property
    def num_layers(self) -> int | None:
        n = (self.manifest.get("model") or {}).get("layers")
        if n is not None:
            return int(n)
        nodes = {r["node"] for r in self.layers}
        counts = [sum(1 for r in self.layers if r["node"] == n) for n in nodes]
        return max(counts) if counts else None

    @property
    def topology(self) -> int:
        """The data-path topology of the run (1 for runs written before topologies)."""
        return int(next((r["topology"] for r in self.summary if r.get("topology")), 1))

    @property
    def anchors(self) -> dict[str, int]:
        """``network`` and ``device`` anchors among the measured points: k = 0 and k = N
        in topology 1; the other way round in topologies 2 and 3, where the head runs in
        the network (k = 0: everything on the UE; k = N: everything in the network)."""
        n = self.num_layers
        ks = {"network": 0, "device": n} if self.topology == 1 else {"network": n, "device": 0}
        return {name: k for name, k in ks.items() if k is not None and k in self.splits}

    @property
    def input_bytes(self) -> int | None:
        """Size of the raw model input (what crosses the uplink at k = 0 with raw encoding)."""
        for s in self.manifest.get("splits", []):
            if int(s["k"]) == 0:
                return int(sum(t["bytes"] for t in s.get("cut", [])))
        inputs = (self.manifest.get("model") or {}).get("inputs")
        if inputs:
            return int(sum(t.get("bytes", 0) for t in inputs))
        for r in self.summary:
            if r["split"] == 0 and r.get("cut_bytes_raw"):
                return int(r["cut_bytes_raw"])
        return None

    def config_rows(self, profile: str) -> list[dict[str, Any]]:
        return sorted((r for r in self.summary if r["profile"] == profile), key=lambda r: r["split"])

    def row(self, profile: str, split: int) -> dict[str, Any] | None:
        return next((r for r in self.summary if r["profile"] == profile and r["split"] == split), None)

    def stat(self, row: dict[str, Any], timing: str, stat: str) -> float | None:
        """A timing statistic from a summary row; p10 falls back to the samples
        when an older summary lacks it."""
        v = row.get(f"{timing}_{stat}_s")
        if v is None and stat in ("p10", "p90", "p50"):
            import numpy as np
            vals = [s[f"{timing}_s"] for s in self.samples
                    if s["profile"] == row["profile"] and s["split"] == row["split"]
                    and s.get(f"{timing}_s") is not None]
            if vals:
                v = float(np.percentile(vals, {"p10": 10, "p50": 50, "p90": 90}[stat]))
        return v

    def emulation(self) -> str:
        vals = sorted({f"{r.get('emulation_uplink') or '-'}/{r.get('emulation_downlink') or '-'}"
                       for r in self.summary})
        return ", ".join(vals)


def timing_columns() -> tuple[str, ...]:
    return tuple(f"{t}_s" for t in TIMINGS)
