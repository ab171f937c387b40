"""A node's own cgroup CPU counters: found from /proc the way the agent finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodes.cpu_account import CpuAccount, CpuSnapshot, Mount, _group_dir, parse_mountinfo, parse_proc_cgroup

pytestmark = pytest.mark.unit

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
# What a container sees: its own group is the root of the mount.
V1_CONTAINER_MOUNTINFO = """\
700 690 0:29 /docker/abc123 /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct
"""
V2_MOUNTINFO = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_proc_cgroup_names_each_controllers_group():
    groups = parse_proc_cgroup("12:cpu,cpuacct:/docker/abc123\n4:memory:/x\n1:name=systemd:/y\n0::/z\n")
    assert groups == {"cpu": "/docker/abc123", "cpuacct": "/docker/abc123", "memory": "/x", "": "/z"}


def test_mountinfo_maps_controllers_to_mounts():
    mounts = parse_mountinfo(V1_MOUNTINFO)
    assert mounts["cpu"] == mounts["cpuacct"] == Mount("/", Path("/sys/fs/cgroup/cpu,cpuacct"))
    assert "cgroup2" not in mounts and mounts["memory"].point == Path("/sys/fs/cgroup/memory")
    assert parse_mountinfo(V2_MOUNTINFO)["cgroup2"] == Mount("/", Path("/sys/fs/cgroup"))


def test_a_container_sees_its_group_as_the_mount_root():
    mount = parse_mountinfo(V1_CONTAINER_MOUNTINFO)["cpu"]
    assert _group_dir(mount, "/docker/abc123") == Path("/sys/fs/cgroup/cpu,cpuacct")
    host = parse_mountinfo(V1_MOUNTINFO)["cpu"]
    assert _group_dir(host, "/docker/abc123") == Path("/sys/fs/cgroup/cpu,cpuacct/docker/abc123")


def test_v2_counters_are_read_from_the_groups_cpu_stat(tmp_path):
    group = tmp_path / "cg" / "testbed-x-local"
    group.mkdir(parents=True)
    (group / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
                                    "nr_periods 10\nnr_throttled 3\nthrottled_usec 2500\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/testbed-x-local\n")
    (proc / "mountinfo").write_text(f"29 23 0:26 / {tmp_path / 'cg'} rw - cgroup2 cgroup2 rw\n")
    account = CpuAccount.find(proc)
    assert account.version == 2
    snap = account.snapshot()
    assert (snap.usage_ns, snap.throttled_periods, snap.throttled_ns) == (1_500_000, 3, 2_500_000)
    assert snap.wait_ns is not None  # this thread's schedstat
    snap = CpuSnapshot(1_500_000, 3, 2_500_000, 1_000)
    later = CpuSnapshot(usage_ns=4_500_000, throttled_periods=5, throttled_ns=12_500_000, wait_ns=501_000)
    assert later.since(snap) == {"cpu_s": 0.003, "throttled_periods": 2, "throttled_s": 0.01, "runq_wait_s": 0.0005}


def test_missing_counters_are_none_not_zero(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/nowhere\n")
    (proc / "mountinfo").write_text("")
    account = CpuAccount.find(proc)
    assert account.version is None
    got = account.snapshot().since(account.snapshot())
    assert {k: got[k] for k in ("cpu_s", "throttled_periods", "throttled_s")} == {
        "cpu_s": None, "throttled_periods": None, "throttled_s": None}


def _v1_cpu_dirs() -> tuple[Path, Path] | None:
    cpu, acct = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuacct")
    if os.geteuid() != 0 or not (cpu / "cpu.stat").exists() or not (acct / "cpuacct.usage").exists():
        return None
    return cpu, acct


def test_a_throttled_process_sees_its_own_throttling():
    """A real process in a real group with a 10 % quota, spinning for 0.5 s:
    its own CpuAccount reports throttled periods and time, and CPU time near
    its quota — read from /proc the way the agent does inside a node."""
    dirs = _v1_cpu_dirs()
    if dirs is None:
        pytest.fail("needs root and cgroup v1 cpu/cpuacct hierarchies (this host's layout); "
                    "the v2 path is covered by test_v2_counters_are_read_from_the_groups_cpu_stat")
    name = f"testbed-unit-{os.getpid()}"
    groups = [d / name for d in dirs]
    for g in groups:
        g.mkdir(exist_ok=True)
    (groups[0] / "cpu.cfs_period_us").write_text("100000")
    (groups[0] / "cpu.cfs_quota_us").write_text("10000")
    code = ("import sys, time, json\nfrom nodes.cpu_account import CpuAccount\n"
            "a = CpuAccount.find(); s0 = a.snapshot(); t = time.monotonic()\n"
            "while time.monotonic() - t < 0.5: pass\n"
            "print(json.dumps(a.snapshot().since(s0)))\n")
    join = "; ".join(f"echo $$ > {g / 'cgroup.procs'}" for g in groups)
    try:
        out = subprocess.run(["sh", "-c", f"{join}; exec {sys.executable} -c \"$0\"", code],
                             capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[2], check=True).stdout
    finally:
        for g in groups:
            for _ in range(50):
                try:
                    g.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
    import json
    got = json.loads(out)
    assert got["throttled_periods"] >= 2 and got["throttled_s"] > 0.1, got
    # 10 % of 0.5 s of wall time: far below what an unthrottled spin would use
    assert 0 < got["cpu_s"] < 0.3, got


def test_run_queue_wait_counts_time_another_task_held_the_cpu():
    """A thread spinning on a CPU that another process also spins on waits for
    it about half the time, and its snapshot says so; without that process it
    waits much less (only for whatever else the host runs there)."""
    from nodes.cpu_account import thread_wait_ns

    cpu = min(os.sched_getaffinity(0))
    before_affinity = os.sched_getaffinity(0)

    def spin(seconds: float) -> float:
        before = thread_wait_ns()
        t = time.monotonic()
        while time.monotonic() - t < seconds:
            pass
        return (thread_wait_ns() - before) / 1e9

    os.sched_setaffinity(0, {cpu})
    try:
        alone = spin(0.2)
        hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
        try:
            time.sleep(0.1)
            shared = spin(0.4)
        finally:
            hog.kill()
            hog.wait()
    finally:
        os.sched_setaffinity(0, before_affinity)
    # As fractions of the spinning time: whatever else shares this CPU makes the
    # thread wait in both windows; the hog must add a good part of its fair share.
    assert shared / 0.4 > alone / 0.2 + 0.15, (alone, shared)
