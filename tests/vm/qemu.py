"""Boot the VM tier's guest once under QEMU (TCG) and collect what it wrote.

Owns: the payload disk (the project's source + an empty ``out/``, made fresh
per boot because the Debian cloud kernel has no 9p), the QEMU command line,
the deadline, and reading results back. Leaves building the image to
``tests/vm/image.py`` and what the guest does to ``tests/vm/guest/``.

The root disk is attached with ``snapshot=on`` so the cached image is never
written; results come back through the payload disk, read with ``debugfs``
(no host-side mount needed). The guest powers itself off; QEMU runs with
``-no-reboot`` and the kernel with ``panic=-1`` so a crashed guest also ends
the process; a hung one is killed at the deadline and reported as such.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.image import PROJECT, VmImage

# What the guest needs of the project: the link layer (and what it imports),
# the data path's UDP delivery (nodes/udp.py), the shipped profiles and traces,
# the guest scripts themselves, and the judge's framing/token-bucket arithmetic
# (the guest chooses rates with it).
PAYLOAD_PATHS = ("testbed", "nodes", "netem_profiles", "tests/__init__.py", "tests/vm/__init__.py",
                 "tests/vm/judge.py", "tests/vm/guest")


@dataclass(frozen=True)
class BootResult:
    """What one boot produced."""

    results: dict | None     # out/results.json, None if the guest never wrote it
    console: str             # serial console (kernel + guest output)
    guest_log: str           # out/guest.log
    seconds: float
    timed_out: bool
    returncode: int | None


def _make_payload(staging: Path, disk: Path, extra: dict[str, str]) -> None:
    project = staging / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in PAYLOAD_PATHS:
        src = PROJECT / rel
        if src.is_dir():
            shutil.copytree(src, project / rel, ignore=ignore)
        elif src.exists():
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / rel)
    out = staging / "out"
    out.mkdir()
    (out / "args.json").write_text(json.dumps(extra))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(staging), str(disk), "64M"],
                   check=True, capture_output=True)


def _debugfs_cat(disk: Path, path: str) -> str | None:
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0 or "File not found" in done.stderr:
        return None
    return done.stdout


def boot(image: VmImage, *, deadline_s: float = 600, memory_mb: int = 1024, cpus: int = 2,
         args: dict | None = None, console_path: Path | None = None) -> BootResult:
    """Boot the guest, let it run ``tests/vm/guest/init.sh``, return what it wrote.

    ``args`` reaches the guest as ``out/args.json``. ``console_path`` (optional)
    receives the serial console as it is written, for watching a slow boot.
    """
    with tempfile.TemporaryDirectory(prefix="tbvm-") as tmp:
        tmpdir = Path(tmp)
        payload = tmpdir / "payload.img"
        _make_payload(tmpdir / "staging", payload, args or {})
        console = console_path or tmpdir / "console.log"
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", str(cpus),
            "-m", str(memory_mb), "-no-reboot", "-nodefaults", "-display", "none",
            "-serial", f"file:{console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 root=/dev/vda rw panic=-1 init=/sbin/tb-init "
                       "loglevel=4 net.ifnames=0",
            "-drive", f"file={image.disk},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={payload},if=virtio,format=raw",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        timed_out = False
        try:
            qemu_out, _ = proc.communicate(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            qemu_out, _ = proc.communicate()
        seconds = time.monotonic() - start
        text = console.read_text(errors="replace") if console.exists() else ""
        if qemu_out:
            text += "\n[qemu] " + qemu_out.decode(errors="replace")
        raw = _debugfs_cat(payload, "/out/results.json")
        results = None
        if raw:
            try:
                results = json.loads(raw)
            except json.JSONDecodeError:
                results = None
        return BootResult(results=results, console=text,
                          guest_log=_debugfs_cat(payload, "/out/guest.log") or "",
                          seconds=seconds, timed_out=timed_out,
                          returncode=None if timed_out else proc.returncode)
