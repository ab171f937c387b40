"""Build (once, cached) the guest that proves shaping on a kernel with sch_netem.

Owns: the root file system image the VM tier boots — Debian (debootstrap, from
the same mirror apt uses on this host) with Debian's ``linux-image-cloud-amd64``
installed *inside* it, an initrd built there by initramfs-tools, python3 and the
link layer's Python dependencies — and the cache that keys it by its inputs.
Leaves booting to ``tests/vm/qemu.py`` and everything the guest runs to
``tests/vm/guest/``; the project's source is not in the image (it is copied onto a
small payload disk at each boot), so editing the project never rebuilds the image.

Why the kernel lives in the rootfs and not on the host: the modules the guest
loads (sch_netem, veth) must match the booted vmlinuz exactly; installing the
package into the same tree makes that true by construction, and it leaves the
host's /boot, /lib/modules and bootloader hooks untouched.

Run ``python -m tests.vm.image`` (as root) to build ahead of the tests; the VM
fixture calls :func:`ensure_image` lazily otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

# Bump when the build recipe changes in a way the inputs below do not show.
RECIPE_VERSION = 3
SUITE = "bookworm"
DEBIAN_PACKAGES = (
    "linux-image-cloud-amd64", "initramfs-tools", "kmod", "udev",
    "python3", "iproute2", "iputils-ping", "iperf3", "procps", "ethtool",
)
# The slice of the project's dependencies that testbed.link and nodes.udp import; their
# version ranges are read from pyproject.toml so the key follows the project.
PYTHON_DEPS = ("pyroute2", "pydantic", "pyyaml", "typer", "rich", "numpy")
# Modules the initrd must hold to find the root disk; the rest load from /lib/modules.
INITRD_MODULES = ("virtio_pci", "virtio_blk")  # ext4 is built in

# PID 1 of the guest. Kept tiny and stable (it is part of the image key): it
# mounts the payload disk and hands over to tests/vm/guest/init.sh in it.
GUEST_INIT = r"""#!/bin/sh
# testbed VM tier: PID 1. Mount the basics and the payload disk (the project's
# source + an out/ folder, made by the host per boot; this kernel has no 9p),
# run the project's guest script, then power off whatever happened (QEMU runs
# with -no-reboot and the kernel with panic=-1, so even a crash here ends the VM).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
mkdir -p /run/netns /mnt/payload
if mount -t ext4 /dev/vdb /mnt/payload; then
  sh /mnt/payload/project/tests/vm/guest/init.sh
  echo "tb-init: guest script exited with $?"
  umount /mnt/payload
else
  echo "tb-init: no payload disk"
fi
sync
echo o > /proc/sysrq-trigger
sleep 10
"""


@dataclass(frozen=True)
class VmImage:
    """A built guest: boot ``kernel`` + ``initrd`` with ``disk`` as /dev/vda."""

    key: str
    kernel: Path
    initrd: Path
    disk: Path
    kernel_version: str
    build_seconds: float | None  # None when it came from the cache


def cache_root() -> Path:
    """Where images live; outside the work tree so a fresh clone reuses them."""
    env = os.environ.get("TESTBED_VM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "testbed" / "vm"


def mirror_from_sources(texts: list[str], suite: str = SUITE) -> str | None:
    """The first enabled Debian URI serving ``suite`` in apt source files' texts
    (deb822 ``.sources`` stanzas or one-line ``deb URI suite ...``)."""
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Enabled:\s*no", stanza, re.M | re.I):
                continue
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.*)$", stanza, re.M)
            types = re.search(r"^Types:\s*(.*)$", stanza, re.M)
            if uris and suites and suite in suites.group(1).split() and (
                    types is None or "deb" in types.group(1).split()):
                return uris.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m.group(2) == suite:
                return m.group(1)
    return None


def apt_mirror() -> str:
    """The Debian mirror apt is configured with here (debootstrap must use the same).

    ``TESTBED_VM_MIRROR`` overrides; with no Debian source for the suite (e.g.
    an Ubuntu host) it falls back to deb.debian.org.
    """
    env = os.environ.get("TESTBED_VM_MIRROR")
    if env:
        return env
    texts: list[str] = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.is_file() and path.suffix in ("", ".list", ".sources"):
            texts.append(path.read_text(errors="replace"))
    return mirror_from_sources(texts) or "http://deb.debian.org/debian"


def python_requirements() -> list[str]:
    """The link layer's dependencies with the version ranges pyproject.toml gives them."""
    text = (PROJECT / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11
        deps = tomllib.loads(text)["project"]["dependencies"]
    except ModuleNotFoundError:  # 3.10: the quoted requirement strings are enough
        deps = re.findall(r'^\s*"([A-Za-z0-9_.-]+[^"]*)",?\s*$', text, re.M)
    wanted = []
    for name in PYTHON_DEPS:
        match = [d for d in deps if re.match(rf"{name}\b", d.strip(), re.I)]
        wanted.append(match[0].split(";")[0].strip() if match else name)
    return wanted


def image_key() -> str:
    """Hash of everything that goes into the image."""
    inputs = {
        "recipe": RECIPE_VERSION, "suite": SUITE, "debs": sorted(DEBIAN_PACKAGES),
        "python": python_requirements(), "init": GUEST_INIT, "initrd": INITRD_MODULES,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, **kw)


def _build(work: Path, log) -> dict:
    root = work / "rootfs"
    debs = cache_root() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(["debootstrap", "--variant=minbase", f"--cache-dir={debs}",
          "--include=" + ",".join(DEBIAN_PACKAGES), SUITE, str(root), apt_mirror()], log)

    # The initrd only has to find /dev/vda; "dep" sizing would look at the
    # build host's hardware, so name the modules instead.
    conf = root / "etc/initramfs-tools"
    (conf / "conf.d/testbed").write_text("MODULES=list\n")
    (conf / "modules").write_text("\n".join(INITRD_MODULES) + "\n")
    versions = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(versions) != 1:
        raise RuntimeError(f"expected one guest kernel, found {versions}")
    kver = versions[0]
    _run(["chroot", str(root), "update-initramfs", "-c", "-k", kver], log)
    if not (root / f"lib/modules/{kver}/kernel/net/sched/sch_netem.ko").exists():
        raise RuntimeError(f"guest kernel {kver} has no sch_netem.ko")

    # Python deps as binary wheels for the guest's python, installed by the
    # host's pip (which already knows how to reach PyPI here) into a plain
    # directory the guest puts on PYTHONPATH: no network or pip in the guest.
    pyver = sorted(p.name[len("python"):] for p in (root / "usr/bin").glob("python3.*")
                   if re.fullmatch(r"python3\.\d+", p.name))[-1]
    target = root / "opt/tbdeps"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
          "--target", str(target), "--only-binary=:all:", "--implementation", "cp",
          "--python-version", pyver, "--abi", f"cp{pyver.replace('.', '')}",
          "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux_2_28_x86_64", *python_requirements()], log)

    init = root / "sbin/tb-init"
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    (root / "etc/hostname").write_text("tbvm\n")
    # Nothing in the guest needs apt's lists or the downloaded .debs.
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)

    out = work / "out"
    out.mkdir()
    shutil.copy2(root / f"boot/vmlinuz-{kver}", out / "vmlinuz")
    shutil.copy2(root / f"boot/initrd.img-{kver}", out / "initrd.img")
    used = int(subprocess.run(["du", "-sxm", str(root)], check=True, capture_output=True,
                              text=True).stdout.split()[0])
    size_mb = int(used * 1.3) + 200
    _run(["mkfs.ext4", "-q", "-F", "-L", "tbroot", "-d", str(root), str(out / "disk.img"),
          f"{size_mb}M"], log)
    return {"kernel_version": kver, "python": pyver, "disk_mb": size_mb}


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load(done: Path, key: str, seconds: float | None) -> VmImage:
    meta = json.loads((done / "meta.json").read_text())
    return VmImage(key=key, kernel=done / "vmlinuz", initrd=done / "initrd.img",
                   disk=done / "disk.img", kernel_version=meta["kernel_version"],
                   build_seconds=seconds)


def ensure_image(log_path: Path | None = None) -> VmImage:
    """Return the cached image for the current inputs, building it first if needed.

    Needs root (debootstrap, chroot) and network access to the Debian mirror and
    PyPI. Concurrent callers wait on a lock; a failed build leaves nothing behind
    but its log (``<cache>/build-<key>.log``).
    """
    key = image_key()
    root = cache_root()
    done = root / key
    if (done / "meta.json").exists():
        return _load(done, key, None)
    with _locked(root / f"{key}.lock"):
        if (done / "meta.json").exists():
            return _load(done, key, None)
        work = root / f"build-{key}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log_path = log_path or root / f"build-{key}.log"
        start = time.monotonic()
        try:
            with open(log_path, "w") as log:
                meta = _build(work, log)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as e:
            shutil.rmtree(work, ignore_errors=True)
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"VM image build failed ({e}); log {log_path}:\n{tail}") from e
        seconds = time.monotonic() - start
        meta["build_seconds"] = round(seconds, 1)
        (work / "out" / "meta.json").write_text(json.dumps(meta, indent=2))
        # The rootfs tree is only the source of disk.img; drop it, keep the image.
        shutil.rmtree(work / "rootfs", ignore_errors=True)
        os.replace(work / "out", done)
        shutil.rmtree(work, ignore_errors=True)
        # Older keys are dead weight (a few hundred MB each).
        for old in root.iterdir():
            if old.is_dir() and old.name not in (key, "debs") and re.fullmatch(r"[0-9a-f]{16}", old.name):
                shutil.rmtree(old, ignore_errors=True)
        return _load(done, key, seconds)


if __name__ == "__main__":
    image = ensure_image()
    print(json.dumps({"key": image.key, "disk": str(image.disk), "kernel": image.kernel_version,
                      "build_seconds": image.build_seconds}))
