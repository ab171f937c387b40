"""Node-agent overhead on loopback: what the agents add around LiteRT's invoke.

Starts two real agents (subprocesses, loopback, 1 interpreter thread each), splits the
built-in PoseNet at a few points and prints, per k:

* in-node ratio  = median(head_s + tail_s) / median(direct invoke of the unsplit model)
  (goal <= 1.10: splitting and the by-name feeding add little compute);
* e2e ratio      = median(e2e_s) / direct invoke (loopback link, so this is the whole
  pipeline's software overhead incl. framing and two TCP hops);
* data goodput   = cut bytes / uplink_s on loopback, in Gbit/s.

Direct invoke = set_tensor + invoke + get_tensor of every output in this process.
Prints ratios, never fails on speed. Run: ``.venv/bin/python bench/agent_overhead_bench.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.deploy.agent_client import AgentClient  # noqa: E402

SAMPLES, ROUNDS, WARMUP, KS = 30, 6, 3, (0, 1, 12, 24, 31)


def start(name: str, workdir: Path, token: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodes.agent", "--name", name, "--control-listen", "127.0.0.1:0",
         "--data-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
         "--workdir", str(workdir), "--threads", "1"],
        env={**os.environ, "TESTBED_TOKEN": token}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = workdir / "agent.json"
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"agent {name} exited")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


class Direct:
    """The unsplit model invoked directly in this process (the baseline)."""

    def __init__(self, path: Path, img: np.ndarray) -> None:
        from ai_edge_litert.interpreter import Interpreter
        self.it = Interpreter(model_path=str(path), num_threads=1)
        self.it.allocate_tensors()
        self.idx = self.it.get_input_details()[0]["index"]
        self.outs = [d["index"] for d in self.it.get_output_details()]
        self.img = img
        self.times(WARMUP)

    def times(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.it.set_tensor(self.idx, self.img)
            self.it.invoke()
            for o in self.outs:
                self.it.get_tensor(o)
            out.append(time.perf_counter() - t)
        return out


def main() -> None:
    from testbed.model.splitter import split_model
    from testbed.model.zoo.posenet import build_posenet
    with tempfile.TemporaryDirectory(prefix="tbbench") as tmp:
        tmp = Path(tmp)
        path = tmp / "posenet.tflite"
        path.write_bytes(build_posenet(0))
        manifest = split_model(path, KS, tmp / "parts")
        token = secrets.token_hex(16)
        (tmp / "l").mkdir(), (tmp / "r").mkdir()
        lp, li = start("local", tmp / "l", token)
        rp, ri = start("remote", tmp / "r", token)
        local = AgentClient(*li["control"], token=token, node_name="local")
        remote = AgentClient(*ri["control"], token=token, node_name="remote")
        try:
            local.connect_peer(*ri["data"])
            img = np.random.default_rng(0).uniform(-1, 1, (1, 257, 257, 3)).astype(np.float32)
            local.set_inputs({"sub_2": img})
            baseline = Direct(path, img)
            print(f"{'k':>3} {'direct ms':>10} {'head+tail ms':>13} {'in-node':>8} {'e2e ms':>8} "
                  f"{'e2e':>6} {'cut MB':>7} {'Gbit/s':>7}")
            for split in manifest["splits"]:
                blob = lambda n: (tmp / "parts" / n).read_bytes() if n else None  # noqa: E731
                remote.load_part("tail", blob(split["tail"]), split["tail_sha256"])
                if split["head"]:
                    remote.deliver_part(local, blob(split["head"]), split["head_sha256"])
                else:
                    local.load_part("head", None)
                # Interleave agent batches with direct batches and compare medians: the
                # machine is shared, so load drifts during a run.
                local.run(1, WARMUP)
                rows, direct_t = [], []
                for _ in range(ROUNDS):
                    rows += local.run(SAMPLES // ROUNDS)
                    direct_t += baseline.times(SAMPLES // ROUNDS)
                direct = statistics.median(direct_t)
                compute = statistics.median(r["head_s"] + r["tail_s"] for r in rows)
                e2e = statistics.median(r["e2e_s"] for r in rows)
                cut = rows[0]["cut_bytes_wire"]
                up = statistics.median(r["uplink_s"] for r in rows)
                gbps = cut * 8 / up / 1e9 if cut else float("nan")
                print(f"{split['k']:>3} {direct*1e3:>10.2f} {compute*1e3:>13.2f} {compute/direct:>8.3f} "
                      f"{e2e*1e3:>8.2f} {e2e/direct:>6.3f} {cut/1e6:>7.3f} {gbps:>7.2f}")
        finally:
            for c, p in ((local, lp), (remote, rp)):
                c.shutdown()
                p.wait(10)


if __name__ == "__main__":
    main()
