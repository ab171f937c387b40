"""CPU accounting of the node's own cgroup: CPU time used and CFS throttling.

A node runs under a CPU quota (``--cpus``), and a quota shows up in timings in
two ways the timings alone cannot tell apart from a slow link or a slow model:
the node's threads are *throttled* (not run at all until the next CFS period),
and they compete for the CPU time they are given. So the agent reads its own
cgroup's counters around every sample and reports the deltas: CPU time used,
periods in which it was throttled, time spent throttled.

Where the counters live depends on the cgroup version and on where the agent
runs: ``/proc/self/cgroup`` names the group, ``/proc/self/mountinfo`` says where
each hierarchy is mounted and which part of it the mount shows (a container sees
its own group as the root of the mount). Both are read once, at start:

- cgroup v2: ``<mount>/<group>/cpu.stat`` (``usage_usec``, ``nr_throttled``,
  ``throttled_usec``);
- cgroup v1: ``cpu.stat`` of the ``cpu`` hierarchy (``nr_throttled``,
  ``throttled_time`` in ns) and ``cpuacct.usage`` (ns) of the ``cpuacct`` one.

Beside the group's counters, the run-queue wait of the calling thread
(``/proc/thread-self/schedstat``): time it was ready to run but another task
had the CPU. Throttling explains time lost to the node's own quota; the wait
explains time lost to anything else sharing its cores (another node, the
orchestrator, an unrelated process on the host).

A counter that cannot be found is reported as None, never as 0: results must
not claim "no throttling" where nothing was measured. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative counters at one moment (None: not available here)."""

    usage_ns: int | None
    throttled_periods: int | None
    throttled_ns: int | None
    wait_ns: int | None = None  # run-queue wait of the thread that took the snapshot

    def since(self, before: "CpuSnapshot") -> dict[str, float | int | None]:
        """Deltas from ``before`` to this snapshot, in result units (s, count)."""
        def delta(a: int | None, b: int | None) -> int | None:
            return None if a is None or b is None else max(0, a - b)

        usage = delta(self.usage_ns, before.usage_ns)
        throttled = delta(self.throttled_ns, before.throttled_ns)
        wait = delta(self.wait_ns, before.wait_ns)
        return {"cpu_s": None if usage is None else usage / 1e9,
                "throttled_periods": delta(self.throttled_periods, before.throttled_periods),
                "throttled_s": None if throttled is None else throttled / 1e9,
                "runq_wait_s": None if wait is None else wait / 1e9}


NO_SNAPSHOT = CpuSnapshot(None, None, None, None)


def thread_wait_ns() -> int | None:
    """Run-queue wait of the calling thread so far (schedstat's second field), ns."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class CpuAccount:
    """Where this process's cgroup counters are; ``snapshot()`` reads them."""

    cpu_stat: Path | None        # v1 cpu hierarchy or v2 group: cpu.stat
    cpuacct_usage: Path | None   # v1 only: cpuacct.usage (ns)
    version: int | None          # 1, 2 or None (nothing found)

    @classmethod
    def find(cls, proc: Path = Path("/proc/self")) -> "CpuAccount":
        """Locate the counters of the group ``proc`` (default: this process) is in."""
        try:
            groups = parse_proc_cgroup((proc / "cgroup").read_text())
            mounts = parse_mountinfo((proc / "mountinfo").read_text())
        except OSError:
            return cls(None, None, None)
        # Hybrid hosts mount an empty v2 hierarchy beside the v1 controllers: where
        # the cpu controller is a v1 one, its counters are the node's.
        if "cpu" in groups and "cpu" in mounts:
            stat = _existing(_group_dir(mounts["cpu"], groups["cpu"]) / "cpu.stat")
            usage = None
            if "cpuacct" in groups and "cpuacct" in mounts:
                usage = _existing(_group_dir(mounts["cpuacct"], groups["cpuacct"]) / "cpuacct.usage")
            if stat or usage:
                return cls(stat, usage, 1)
        if "" in groups and "cgroup2" in mounts:
            stat = _existing(_group_dir(mounts["cgroup2"], groups[""]) / "cpu.stat")
            if stat is not None:
                return cls(stat, None, 2)
        return cls(None, None, None)

    def snapshot(self) -> CpuSnapshot:
        """Read the counters now (two small file reads; ~20 us)."""
        wait = thread_wait_ns()
        if self.version == 2:
            fields = _read_fields(self.cpu_stat)
            usage = fields.get("usage_usec")
            throttled = fields.get("throttled_usec")
            return CpuSnapshot(None if usage is None else usage * 1000, fields.get("nr_throttled"),
                               None if throttled is None else throttled * 1000, wait)
        fields = _read_fields(self.cpu_stat)
        usage = _read_int(self.cpuacct_usage)
        return CpuSnapshot(usage, fields.get("nr_throttled"), fields.get("throttled_time"), wait)

    def describe(self) -> dict[str, str | int | None]:
        return {"cgroup_version": self.version, "cpu_stat": str(self.cpu_stat) if self.cpu_stat else None,
                "cpuacct_usage": str(self.cpuacct_usage) if self.cpuacct_usage else None}


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` → {controller: group path}; v2's unified entry is ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out[""] = path
        for c in controllers.split(","):
            if c and not c.startswith("name="):
                out[c] = path
    return out


@dataclass(frozen=True)
class Mount:
    """One cgroup mount: what part of the hierarchy it shows (``root``) and where."""

    root: str
    point: Path


def parse_mountinfo(text: str) -> dict[str, Mount]:
    """cgroup mounts from ``/proc/PID/mountinfo`` → {controller or "cgroup2": Mount}.

    Fields: ``id parent major:minor root mountpoint options ... - fstype source superoptions``.
    """
    out: dict[str, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        fstype, superopts = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            out.setdefault("cgroup2", Mount(root, point))
        elif fstype == "cgroup":
            for opt in superopts:
                if opt in ("cpu", "cpuacct", "cpuset", "memory"):
                    out.setdefault(opt, Mount(root, point))
    return out


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _group_dir(mount: Mount, group: str) -> Path:
    """The directory of ``group`` under a mount that shows ``mount.root`` of the hierarchy.

    A container's mount shows its own group as ``/``: ``/proc/self/cgroup`` still
    names the full path (``/docker/<id>``), which must be taken relative to the root.
    """
    root = mount.root.rstrip("/")
    rel = group[len(root):] if root and (group == root or group.startswith(root + "/")) else group
    return mount.point / rel.lstrip("/")


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _read_fields(path: Path | None) -> dict[str, int]:
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
