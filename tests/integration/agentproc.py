"""A real node agent as a subprocess on loopback, for the agent tests and benches.

``AgentProc(name, workdir, token, *extra_args)`` starts ``python -m nodes.agent`` with
every port on 127.0.0.1:0, waits for ``agent.json`` and opens an ``AgentClient`` on it.
The agent's stderr goes to ``workdir/agent.stderr`` (a file, not a pipe: a pipe nobody
drains would block the agent once 64 KiB of log accumulate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from testbed.deploy.agent_client import AgentClient

REPO = Path(__file__).resolve().parents[2]


class AgentProc:
    def __init__(self, name: str, workdir: Path, token: str, *extra_args: str,
                 threads: int = 1) -> None:
        self.workdir = Path(workdir)
        self.stderr_path = self.workdir / "agent.stderr"
        env = {**os.environ, "TESTBED_TOKEN": token, "PYTHONPATH": str(REPO)}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nodes.agent", "--name", name,
                 "--control-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0",
                 "--metrics-listen", "127.0.0.1:0", "--workdir", str(workdir),
                 "--threads", str(threads), *extra_args],
                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        ready = self.workdir / "agent.json"
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent {name} did not start: {self.log()[-2000:]}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        self.client = AgentClient(*self.info["control"], token=token, node_name=name)

    @property
    def control(self) -> tuple[str, int]:
        return tuple(self.info["control"])  # type: ignore[return-value]

    @property
    def data(self) -> tuple[str, int]:
        return tuple(self.info["data"])  # type: ignore[return-value]

    @property
    def metrics(self) -> tuple[str, int]:
        return tuple(self.info["metrics"])  # type: ignore[return-value]

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.client.shutdown()
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
