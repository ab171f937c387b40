"""CPU and memory limits for processes outside Docker, through cgroup files.

Used by the netns backend. Works with cgroup v1 (one hierarchy per controller,
``/sys/fs/cgroup/{cpu,memory}``) and cgroup v2 (``/sys/fs/cgroup`` with the
``cpu`` and ``memory`` controllers). Where the host allows neither (no
controller, read-only cgroupfs, a container without delegation) ``create``
says why and the node runs unlimited: the Node handle then reports ``cpus=None``
so results are never labelled with a limit that was not applied.

Groups are named ``testbed-<run>-<role>``. In v1 they are nested under the
calling process's own group of each hierarchy, so they stay inside whatever
limits the orchestrator itself runs under; v2 forbids controllers below a group
that has processes, so there they sit at the root. Processes and networks are
the netns backend's business; this module only creates, fills limits into,
lists and removes groups.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000


@dataclass
class Group:
    """A cgroup made for one node: its directories and the files to join it."""

    name: str
    dirs: list[str] = field(default_factory=list)
    procs_files: list[str] = field(default_factory=list)
    cpus: float | None = None
    memory_bytes: int | None = None
    how: str = "none"


def _v1_controller_dir(controller: str) -> Path | None:
    d = ROOT / controller
    return d if (d / "cgroup.procs").exists() and not (ROOT / "cgroup.controllers").exists() else None


def _own_v1_path(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path.lstrip("/")
    return ""


def _is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def quota_us(cpus: float, period_us: int) -> int:
    """CFS quota for ``cpus`` CPUs per ``period_us``; the kernel's floor is 1 ms."""
    return max(1000, int(round(cpus * period_us)))


def create(name: str, cpus: float | None, memory_bytes: int | None,
           period_us: int = CFS_PERIOD_US) -> Group:
    """Make the group(s) and write the limits. Never raises for "host does not
    allow": returns a Group with ``how`` explaining and limits left None.

    ``period_us`` is the CFS period the quota is granted in: the kernel's 100 ms
    by default; shorter periods slow a node down smoothly instead of letting it
    run at full speed until its quota is spent and then stopping it.

    A CPU group is made even without a CPU limit: the agent reads its own
    group's CPU time and throttling per sample (``nodes.cpu_account``), which
    must be the node's alone, not the orchestrator's group it would inherit."""
    g = Group(name=name)
    try:
        if _is_v2():
            _create_v2(g, cpus, memory_bytes, period_us)
        else:
            _create_v1(g, cpus, memory_bytes, period_us)
    except OSError as e:
        remove(g.dirs)
        return Group(name=name, how=f"none: cgroups not usable here ({e.strerror or e})")
    return g


def _v1_group(g: Group, controller: str) -> Path | None:
    """Make (or reuse, when co-mounted) the group's directory in one v1 hierarchy."""
    base = _v1_controller_dir(controller)
    if base is None:
        return None
    d = (base / _own_v1_path(controller) / g.name).resolve()
    if str(d) not in g.dirs:
        d.mkdir(exist_ok=True)
        g.dirs.append(str(d))
        g.procs_files.append(str(d / "cgroup.procs"))
    return d


def _create_v1(g: Group, cpus: float | None, memory_bytes: int | None, period_us: int) -> None:
    hows = []
    d = _v1_group(g, "cpu")
    _v1_group(g, "cpuacct")  # CPU time per node (its own hierarchy on some hosts)
    if cpus is not None:
        if d is None:
            raise OSError(errno.ENOENT, "no cgroup v1 cpu controller")
        _write(d / "cpu.cfs_period_us", str(period_us))
        _write(d / "cpu.cfs_quota_us", str(quota_us(cpus, period_us)))
        g.cpus = cpus
        hows.append("cpu.cfs_quota_us")
    if memory_bytes is not None:
        base = _v1_controller_dir("memory")
        if base is None:
            raise OSError(errno.ENOENT, "no cgroup v1 memory controller")
        d = _v1_group(g, "memory")
        _write(d / "memory.limit_in_bytes", str(memory_bytes))
        # No swap beyond the limit (the file exists only with swap accounting).
        if (d / "memory.memsw.limit_in_bytes").exists():
            _write(d / "memory.memsw.limit_in_bytes", str(memory_bytes))
        g.memory_bytes = memory_bytes
        hows.append("memory.limit_in_bytes")
    g.how = "cgroup v1 (" + (", ".join(hows) or "accounting only, no limits asked") + ")"


def _create_v2(g: Group, cpus: float | None, memory_bytes: int | None, period_us: int) -> None:
    available = (ROOT / "cgroup.controllers").read_text().split()
    # cpu always: its cpu.stat carries the CPU time and throttling the agent reports.
    need = ["cpu"] + (["memory"] if memory_bytes is not None else [])
    missing = [c for c in need if c not in available]
    if missing:
        raise OSError(errno.ENOTSUP, f"cgroup v2 lacks {' '.join(missing)}")
    enabled = (ROOT / "cgroup.subtree_control").read_text().split()
    for c in need:
        if c not in enabled:
            _write(ROOT / "cgroup.subtree_control", f"+{c}")
    d = ROOT / g.name
    d.mkdir(exist_ok=True)
    g.dirs.append(str(d))
    if cpus is not None:
        _write(d / "cpu.max", f"{quota_us(cpus, period_us)} {period_us}")
        g.cpus = cpus
    if memory_bytes is not None:
        _write(d / "memory.max", str(memory_bytes))
        if (d / "memory.swap.max").exists():
            _write(d / "memory.swap.max", "0")
        g.memory_bytes = memory_bytes
    g.procs_files.append(str(d / "cgroup.procs"))
    g.how = "cgroup v2 (" + (", ".join(f for f, v in (("cpu.max", cpus), ("memory.max", memory_bytes))
                                        if v is not None) or "accounting only, no limits asked") + ")"


def oom_kills(dirs: list[str]) -> int:
    """Processes the kernel's OOM killer took from these groups (v1 memory.oom_control,
    v2 memory.events: ``oom_kill N``); 0 where nothing says so."""
    total = 0
    for d in dirs:
        for name in ("memory.oom_control", "memory.events"):
            try:
                text = Path(d, name).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    total += int(value)
    return total


def pids(dirs: list[str]) -> set[int]:
    """Processes still in any of the groups."""
    out: set[int] = set()
    for d in dirs:
        try:
            out |= {int(p) for p in Path(d, "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return out


def remove(dirs: list[str], timeout_s: float = 5.0) -> list[str]:
    """rmdir the groups (their processes must be gone; the kernel refuses with
    EBUSY while a dying process lingers, so retry briefly). Returns removed dirs."""
    removed = []
    for d in dirs:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                os.rmdir(d)
                removed.append(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    return removed


def find(prefix: str) -> list[str]:
    """Group directories named ``prefix*`` where ``create`` would have put them."""
    found: list[str] = []
    if _is_v2():
        found += [str(p) for p in ROOT.glob(prefix + "*") if p.is_dir()]
        return found
    for controller in ("cpu", "cpuacct", "memory"):
        base = _v1_controller_dir(controller)
        if base is None:
            continue
        for parent in {base / _own_v1_path(controller), base}:
            found += [str(p) for p in parent.glob(prefix + "*") if p.is_dir()]
    return sorted(set(found))
