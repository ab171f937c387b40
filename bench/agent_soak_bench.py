"""Agent soak: 2,000 samples in one configuration; do the agents' RSS and fds stay flat?

Starts two real agents (subprocesses on loopback, 1 interpreter thread each, each
holding a lease like a deployment does), splits the built-in PoseNet at ``--k``
(default 12: a real head on the local node, a real tail on the remote, 0.3 MB of cut
tensors up and PoseNet's outputs down per sample), delivers the head over the data
link, warms up, then runs ``--samples`` samples in one configuration (same parts,
link and inputs), in ``run`` requests of ``--batch`` samples — the sweep asks for
extra samples in batches the same way. RSS, open fds and threads of both agents are
read with psutil at the start (after one warm-up batch), in the middle and at the end,
between batches, so the numbers compare like with like.

``--batch 2000`` runs all samples in ONE request instead; the middle point is then
taken while it runs (progress from the remote's /metrics,
``testbed_agent_samples_served_total``), and the local agent's end point includes
the rows of that request it just built and sent (~2 KB per sample), which the
allocator keeps — growth that is the request's size, not a leak.

Prints the points and the ratios middle/start and end/start per agent (goal: within
1.05). Never fails on numbers; a bench, not a test.
Run: ``.venv/bin/python bench/agent_soak_bench.py [--samples 2000] [--batch 100] [--k 12]``.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.deploy.agent_client import Lease  # noqa: E402
from tests.integration.agentproc import AgentProc  # noqa: E402


def served(agent: AgentProc) -> float:
    """Samples the agent served so far, from its own /metrics."""
    host, port = agent.metrics
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("testbed_agent_samples_served_total{"))


def snapshot(agents: dict[str, AgentProc]) -> dict[str, tuple[int, int, int]]:
    """(RSS bytes, open fds, threads) per agent."""
    out = {}
    for name, a in agents.items():
        ps = psutil.Process(a.proc.pid)
        out[name] = (ps.memory_info().rss, ps.num_fds(), ps.num_threads())
    return out


def in_batches(agents: dict[str, AgentProc], samples: int, batch: int) -> tuple[dict, list]:
    local = agents["local"].client
    local.run(batch)  # one batch first: the allocator has then seen a reply of this size
    points, rows = {"start": snapshot(agents)}, []
    while len(rows) < samples:
        rows += local.run(min(batch, samples - len(rows)), timeout=6 * 3600.0)
        if "middle" not in points and len(rows) >= samples // 2:
            points["middle"] = snapshot(agents)
    points["end"] = snapshot(agents)
    return points, rows


def one_request(agents: dict[str, AgentProc], samples: int) -> tuple[dict, list]:
    local = agents["local"].client
    base_served = served(agents["remote"])
    points, result = {"start": snapshot(agents)}, {}
    runner = threading.Thread(target=lambda: result.update(
        rows=local.run(samples, timeout=6 * 3600.0)))
    runner.start()
    while runner.is_alive():
        runner.join(0.25)
        if "middle" not in points and runner.is_alive():
            try:
                done = served(agents["remote"]) - base_served
            except OSError:
                continue
            if done >= samples / 2:
                points["middle"] = snapshot(agents)
    points["end"] = snapshot(agents)
    return points, result.get("rows", [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--k", type=int, default=12, help="split point of PoseNet (0..31)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100,
                    help="samples per run request (>= --samples: all in one request)")
    args = ap.parse_args()

    from testbed.model.splitter import split_model
    from testbed.model.zoo.posenet import build_posenet

    with tempfile.TemporaryDirectory(prefix="tbsoak") as tmp:
        tmp = Path(tmp)
        path = tmp / "posenet.tflite"
        path.write_bytes(build_posenet(0))
        split = split_model(path, [args.k], tmp / "parts")["splits"][0]
        token = secrets.token_hex(16)
        (tmp / "l").mkdir(), (tmp / "r").mkdir()
        agents = {"local": AgentProc("local", tmp / "l", token, "--lease-s", "30"),
                  "remote": AgentProc("remote", tmp / "r", token, "--lease-s", "30")}
        local, remote = agents["local"].client, agents["remote"].client
        leases = [Lease(*a.control, token=token, node_name=n) for n, a in agents.items()]
        try:
            blob = lambda n: (tmp / "parts" / n).read_bytes() if n else None  # noqa: E731
            local.connect_peer(*agents["remote"].data)
            remote.load_part("tail", blob(split["tail"]), split["tail_sha256"])
            if split["head"]:
                remote.deliver_part(local, blob(split["head"]), split["head_sha256"])
            else:
                local.load_part("head", None)
            img = np.random.default_rng(0).uniform(-1, 1, (1, 257, 257, 3)).astype(np.float32)
            local.set_inputs({"sub_2": img})
            local.run(1, args.warmup)
            t0 = time.monotonic()
            if args.batch >= args.samples:
                points, rows = one_request(agents, args.samples)
            else:
                points, rows = in_batches(agents, args.samples, args.batch)
            wall = time.monotonic() - t0
        finally:
            for lease in leases:
                lease.close()
            for a in agents.values():
                a.stop()

    e2e = sorted(r["e2e_s"] for r in rows)
    how = "one request" if args.batch >= args.samples else f"requests of {args.batch}"
    print(f"PoseNet k={args.k}: {len(rows)} samples in {how}, {wall:.1f} s "
          f"(e2e p50 {e2e[len(e2e) // 2] * 1e3:.1f} ms, cut {rows[0]['cut_bytes_wire'] / 1e6:.2f} MB)")
    print(f"{'agent':<7} {'point':<7} {'RSS MiB':>8} {'fds':>5} {'threads':>8} "
          f"{'RSS ratio':>10} {'fd ratio':>9}")
    for name in agents:
        rss0, fd0, _ = points["start"][name]
        for point in ("start", "middle", "end"):
            if point not in points:
                continue
            rss, fds, threads = points[point][name]
            print(f"{name:<7} {point:<7} {rss / 2**20:>8.1f} {fds:>5} {threads:>8} "
                  f"{rss / rss0:>10.3f} {fds / fd0:>9.3f}")
    flat = all(points[p][n][0] <= 1.05 * points["start"][n][0]
               and points[p][n][1] <= points["start"][n][1] * 1.05
               for p in points for n in agents)
    print(f"flat within 5 %: {'yes' if flat else 'NO'}")


if __name__ == "__main__":
    main()
