"""One boot for the whole VM tier: build (or reuse) the image, run every check.

The guest records measurements; the tests in this folder judge them. A guest
that does not power off by the deadline is killed and every VM test fails
with the console's tail, so a hang is reported, never waited on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.vm import image, qemu

# A boot with every check takes ~3 min on a quiet 2-core host and took 7.5 min
# with two busy-loops beside other engineers' work (load 8): the deadline is
# for a guest that hangs, not for a busy host.
BOOT_DEADLINE_S = float(os.environ.get("TESTBED_VM_DEADLINE", "720"))


@pytest.fixture(scope="session")
def vm_image() -> tuple[image.VmImage, float]:
    """The cached guest image (built on first use) and how long getting it took."""
    missing = [t for t in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "debugfs")
               if shutil.which(t) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"VM tier needs root and {', '.join(missing) or 'nothing else'}: "
                    "run `bash scripts/setup.sh test`")
    t0 = time.monotonic()
    img = image.ensure_image()
    return img, time.monotonic() - t0


@pytest.fixture(scope="session")
def vm_run(request, tmp_path_factory) -> dict:
    """Results of one boot: ``{"kernel", "checks": {name: {...}}, "timing": {...}}``.

    ``TESTBED_VM_RESULTS=FILE`` judges a results.json kept from an earlier boot
    instead of booting (for working on the assertions).
    """
    if os.environ.get("TESTBED_VM_RESULTS"):
        return json.loads(Path(os.environ["TESTBED_VM_RESULTS"]).read_text())
    img, t_image = request.getfixturevalue("vm_image")
    console = tmp_path_factory.mktemp("vm") / "console.log"
    run = qemu.boot(img, deadline_s=BOOT_DEADLINE_S, console_path=console)
    timing = {"image_s": round(t_image, 1), "image_built": img.build_seconds is not None,
              "boot_and_checks_s": round(run.seconds, 1)}
    print(f"\n[vm] image {img.key} ({'built' if img.build_seconds else 'cached'}, "
          f"{t_image:.0f} s), boot + checks {run.seconds:.0f} s, kernel {img.kernel_version}")
    if run.timed_out:
        finished = sorted((run.results or {}).get("checks", {}))
        pytest.fail(f"guest hung: killed after {BOOT_DEADLINE_S:.0f} s (checks finished: "
                    f"{finished or 'none'}); console tail:\n{run.console[-4000:]}")
    if not run.results or not run.results.get("done"):
        pytest.fail(f"guest ended (qemu rc {run.returncode}) without finishing its checks; "
                    f"console tail:\n{run.console[-4000:]}")
    results = dict(run.results, timing=timing)
    # Keep the raw numbers next to the console for whoever reads a failure.
    (console.parent / "results.json").write_text(json.dumps(results, indent=1))
    return results


@pytest.fixture
def check(vm_run):
    """``check(name)``: the guest's record of that check, which must have run cleanly."""
    def get(name: str) -> dict:
        got = vm_run["checks"].get(name)
        assert got is not None, f"guest did not run check {name!r}"
        assert got["ok"], f"check {name!r} raised in the guest:\n{got.get('traceback')}"
        return got
    return get
