"""Which process owns a run, so ``cleanup()`` without a run id spares live runs.

Every backend records an owner tag (``<pid>:<start time>`` of the orchestrator
process, the start time guarding against pid reuse) with what it creates: a
Docker label, a field of the netns state file. ``cleanup(None)`` removes only
runs whose owner is gone; ``cleanup(run_id)`` removes the named run regardless.
"""

from __future__ import annotations

import os

LABEL = "testbed.owner"


def _start_time(pid: int) -> str | None:
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    # Field 22 (starttime) counted after the ")" closing the command name.
    return stat.rsplit(")", 1)[1].split()[19]


def tag(pid: int | None = None) -> str:
    """Owner tag of ``pid`` (default: this process)."""
    pid = pid or os.getpid()
    return f"{pid}:{_start_time(pid) or '?'}"


def alive(owner: str | None) -> bool:
    """True when the process named by an owner tag still runs (not a reused pid)."""
    if not owner or ":" not in owner:
        return False
    pid, _, start = owner.partition(":")
    try:
        return _start_time(int(pid)) == start
    except ValueError:
        return False
