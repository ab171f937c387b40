"""The record of what the shaper added, so cleanup removes exactly that.

Owns: one small JSON file per shaped interface under ``/run/testbed/link/``
(tmpfs: gone after a reboot, like the qdiscs it describes; override with
``TESTBED_STATE_DIR``), written atomically *before* the kernel is touched and
removed after ``clear``. A crashed run leaves its files behind; ``testbed
netem clear --all`` (``Shaper.clear_recorded``) reads them and removes our
root qdiscs, recognised by the fixed handle recorded here, and nothing else.

Leaves to others: the qdiscs themselves (``testbed.link.shaper``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from testbed.link.target import Target


def state_dir(override: str | Path | None = None) -> Path:
    """Where records live: ``override``, ``$TESTBED_STATE_DIR``, or ``/run/testbed/link``."""
    return Path(override or os.environ.get("TESTBED_STATE_DIR") or "/run/testbed/link")


def path_for(target: Target, folder: Path) -> Path:
    return folder / f"{target.key}.json"


def write(target: Target, folder: Path, record: dict[str, Any]) -> Path:
    """Atomically (re)write the record of ``target``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = path_for(target, folder)
    where = {"dev": target.dev, "netns": target.netns, "pid": target.pid}
    if target.ingress:
        where["ingress"] = True
    data = {"target": where,
            "netns_inode": target.namespace_inode(), **record}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def read(target: Target, folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path_for(target, folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove(target: Target, folder: Path) -> None:
    try:
        path_for(target, folder).unlink()
    except FileNotFoundError:
        pass


def records(folder: Path) -> list[tuple[Target, dict[str, Any]]]:
    """Every readable record in ``folder``."""
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            t = data["target"]
            out.append((Target(t["dev"], netns=t.get("netns"), pid=t.get("pid"),
                                      ingress=bool(t.get("ingress"))), data))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
