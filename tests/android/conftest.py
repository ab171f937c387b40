"""Fixtures for the Android path: a private adb server and device doubles connected to it.

Everything in front of the double is real: Debian's ``adb`` as server (on a free port,
with a temporary HOME so no adb key or setting of the user's is touched), ``adb connect``,
adbutils and the testbed. Each double is a subprocess (``tests.android.adb_double``) with
its own device root; teardown disconnects and stops it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def adb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator["object"]:
    if shutil.which("adb") is None and not os.environ.get("ADBUTILS_ADB_PATH"):
        pytest.skip("no adb binary (apt-get install adb; scripts/setup.sh does)")
    from testbed.android.adb import Adb

    home = tmp_path_factory.mktemp("adb-home")
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("TESTBED_ADB_PORT",)}
    os.environ["TESTBED_ADB_PORT"] = str(port)
    # the server's adb key lives in a temporary HOME, not in the user's ~/.android
    adb = Adb(port, keep_server=False, server_env={"HOME": str(home)})
    adb.ensure_server()
    try:
        yield adb
    finally:
        adb.kill_server()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Double:
    def __init__(self, adb: object, root: Path, args: list[str], port: int | None = None) -> None:
        self.adb, self.root, self.args = adb, root, args
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def serial(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *extra: str, connect: bool = True) -> "Double":
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.android.adb_double", "--root", str(self.root),
                                      "--port", str(self.port), *self.args, *extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), line + (self.proc.stderr.read() if self.proc.poll() is not None else "")
        if connect:
            self.adb.connect(self.serial)       # the real `adb connect`
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.adb.disconnect(self.serial)
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def ls(self) -> list[str]:
        d = self.root / "data/local/tmp"
        return sorted(os.listdir(d)) if d.is_dir() else []


@pytest.fixture
def double(adb_server: object, tmp_path: Path) -> Iterator[Callable[..., Double]]:
    made: list[Double] = []

    def make(*args: str, root: Path | None = None, port: int | None = None, connect: bool = True) -> Double:
        d = Double(adb_server, root or tmp_path / f"phone{len(made)}", list(args), port)
        d.root.mkdir(parents=True, exist_ok=True)
        made.append(d)
        return d.start(connect=connect)

    yield make
    for d in made:
        d.stop()


@pytest.fixture(scope="session")
def posenet_parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PoseNet (built-in) split at 3 and 31, written once."""
    from testbed.model.splitter import materialize
    from testbed.model.zoo import resolve

    out = tmp_path_factory.mktemp("parts")
    materialize(resolve({"builtin": "posenet"}), [3, 31], out)
    return out


@pytest.fixture
def benchmark_binary(tmp_path: Path) -> Callable[..., Path]:
    from tests.android.bm_double import make_binary

    def make(variant: dict | None = None, abi: str = "arm64-v8a", name: str = "benchmark_model") -> Path:
        return make_binary(tmp_path / name, variant, abi)

    return make
