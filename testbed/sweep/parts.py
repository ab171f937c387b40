"""The split model's part files, written just before a configuration needs them.

Owns ``RUN_DIR/parts``: a split point's head and tail are materialised (and
verified: head then tail run once, bitwise against the whole model) the first
time a configuration uses it, and removed when the run ends unless kept, so a
sweep of a big model never writes every split point's parts before it must.
The run folder's ``manifest.json`` grows with every split point made and is
what the report reads; the splitting itself is ``testbed.model.splitter``'s.
"""

from __future__ import annotations

import contextlib
from typing import Any

from testbed.analysis.results import RunFolder
from testbed.errors import TestbedError
from testbed.sweep.plan import Plan


class Parts:
    """The parts of one run (see the module docstring)."""

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
        """Delete the part files (the manifest in the run folder stays); never raises."""
        from testbed.model.splitter import remove_parts

        if (self.dir / "manifest.json").exists():
            with contextlib.suppress(TestbedError):
                remove_parts(self.dir, [int(e["k"]) for e in self.manifest["splits"]])
            with contextlib.suppress(OSError):
                (self.dir / "manifest.json").unlink()
        with contextlib.suppress(OSError):
            self.dir.rmdir()
