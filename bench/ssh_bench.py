"""What an SSH remote costs, as ratios against baselines measured in the same run.

1. control:  round trip of a control request (the agent's ``clock``) through the SSH
             tunnel  ÷  the same request over direct TCP to the same agent on the same veth
2. goodput:  data-plane goodput of a part delivered remote -> local  ÷  iperf3 TCP
             goodput between the same two namespaces, same direction; unshaped, and with
             the downlink shaped on this host's ingress (IFB) at ``--rate``
3. overhead: wall time per configuration of the smoke experiment with an ssh remote
             (runtime: process, venv already made)  ÷  the same experiment on the netns backend
4. shape_at: the smoke experiment over a link whose downlink (``--down-rate``) is slower
             than its uplink, the downlink shaped on the edge's own interface
             (shape_at: remote) and on this host's ingress (shape_at: local): downlink
             time ÷ its framing-aware ideal (median of the offloading split points) for
             each, and the whole run's wall time remote ÷ local

The edge host is ``tests/integration/sshhost.py``'s: a namespace running Debian's
sshd, reached over a veth. Needs root, openssh-server and iperf3. Prints ratios;
never fails on speed.

    .venv/bin/python bench/ssh_bench.py [--requests 400] [--skip-overhead] [--skip-shape-at]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.deploy import NodeSpec, deploy  # noqa: E402
from testbed.deploy.agent_client import AgentClient  # noqa: E402
from testbed.deploy.ssh import SshSpec  # noqa: E402
from testbed.deploy.sshconn import HostSpec, connect  # noqa: E402
from tests.integration.sshhost import Edge, edge_host  # noqa: E402

TESTBED = str(Path(sys.executable).parent / "testbed")


def _round_trips(client: AgentClient, n: int) -> float:
    client.clock()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.clock()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def control(edge: Edge, n: int) -> tuple[float, float]:
    """Median control round trip direct and through the tunnel, to one agent in the edge."""
    token = secrets.token_hex(8)
    work = tempfile.mkdtemp(prefix="ssh-bench-agent-")
    env = {**os.environ, "TESTBED_TOKEN": token, "PYTHONPATH": str(ROOT)}
    agent = subprocess.Popen(["ip", "netns", "exec", edge.ns, sys.executable, "-m", "nodes.agent", "--name", "remote",
                              "--control-listen", f"{edge.addr}:7800", "--data-listen", f"{edge.addr}:7801",
                              "--metrics-listen", "127.0.0.1:7802", "--workdir", work],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not Path(work, "agent.json").exists():
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError("the bench agent did not start")
            time.sleep(0.1)
        direct = AgentClient(edge.addr, 7800, token, "direct")
        conn = connect(HostSpec(edge.addr, "root", edge.port, str(edge.key), str(edge.known_hosts)))
        fwd = conn.forward(edge.addr, 7800, "bench")
        tunnel = AgentClient(fwd.host, fwd.port, token, "tunnel")
        try:
            # interleaved halves so a busy moment of the host hits both alike
            d1, t1 = _round_trips(direct, n // 2), _round_trips(tunnel, n // 2)
            t2, d2 = _round_trips(tunnel, n // 2), _round_trips(direct, n // 2)
        finally:
            direct.close()
            tunnel.close()
            conn.close()
        return (d1 + d2) / 2, (t1 + t2) / 2
    finally:
        agent.terminate()
        agent.wait(10)
        subprocess.run(["rm", "-rf", work])


def _iperf3(edge: Edge, local_ns: str, seconds: int = 3) -> float:
    """bit/s from the edge to the local node's namespace (server in the edge, -R)."""
    server = subprocess.Popen(["ip", "netns", "exec", edge.ns, "iperf3", "-s", "-1", "-B", edge.addr, "-p", "5299"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", local_ns, "iperf3", "-c", edge.addr, "-p", "5299", "-R",
                              "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=60).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])
    finally:
        server.wait(10)


def goodput(edge: Edge, rate: str, rounds: int = 3) -> dict[str, tuple[float, float]]:
    """{"unshaped"|rate: (data-plane bit/s of a part delivery remote -> local, iperf3 bit/s)}."""
    from testbed.link.link import Link
    from testbed.link.profile import LinkProfile
    from testbed.model.zoo import resolve

    part = resolve({"builtin": "posenet"}).read_bytes()
    import hashlib

    sha = hashlib.sha256(part).hexdigest()
    ssh = SshSpec(host=HostSpec(edge.addr, "root", edge.port, str(edge.key), str(edge.known_hosts)),
                  runtime="process", wheels="push", control_port=7710, data_port=7711, metrics_port=7712)
    run_id = "sshb" + secrets.token_hex(3)
    out = {}
    with deploy(run_id, NodeSpec(), NodeSpec(), backend="netns", ssh=ssh) as dep:
        local, remote = dep.local.client(dep.token), dep.remote.client(dep.token)
        local.connect_peer(dep.remote.data_host, dep.remote.data_port)
        link = Link(dep.local.shaping, dep.remote.shaping)
        try:
            shaped = LinkProfile.model_validate({"name": "bench", "source": "ssh_bench",
                                                 "uplink": {"rate": rate}, "downlink": {"rate": rate}})
            for label, prof in (("unshaped", None), (rate, shaped)):
                if prof is not None:
                    link.apply(prof)
                rates = []
                for _ in range(rounds):
                    t = remote.deliver_part(local, part, sha, role="head", clock_offset_ns=0)
                    rates.append(len(part) * 8 / t["delivery_s"])
                ref = statistics.median(_iperf3(edge, dep.local.shaping.netns) for _ in range(3))
                out[label] = (statistics.median(rates), ref)
        finally:
            link.teardown()
            local.close()
            remote.close()
    return out


def _smoke(tmp: Path, edge: Edge | None, shape_at: str = "local", down_rate: str | None = None) -> Path:
    exp = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    exp["nodes"]["local"]["backend"] = "netns"
    if edge is None:
        exp["nodes"]["remote"]["backend"] = "netns"
    else:
        exp["nodes"]["remote"] = {"backend": "ssh", "host": edge.addr, "user": "root", "port": edge.port,
                                  "key": str(edge.key), "known_hosts": str(edge.known_hosts), "runtime": "process",
                                  "wheels": "push", "threads": 1, "shape_at": shape_at}
    if down_rate:
        profile = tmp / "slow-down.yaml"
        profile.write_text(yaml.safe_dump({"name": "slow-down", "source": "ssh_bench: downlink slower than uplink",
                                           "uplink": {"rate": "20mbit"}, "downlink": {"rate": down_rate}}))
        exp["network"] = [str(profile)]
        exp["runs"]["samples"] = 10
    exp["output"] = str(tmp / "results")
    exp["metrics"] = {"listen": "127.0.0.1:0"}  # never collide with another run's 9400
    path = tmp / (f"ssh-{shape_at}.yaml" if edge else "netns.yaml")
    path.write_text(yaml.safe_dump(exp))
    return path


def _summary(path: Path) -> tuple[list[dict], float]:
    t0 = time.monotonic()
    r = subprocess.run([TESTBED, "run", str(path)], capture_output=True, text=True, timeout=1800)
    total = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    folder = Path(r.stdout.strip().splitlines()[-1])
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f)), total


def _per_configuration(path: Path) -> tuple[float, float]:
    rows, total = _summary(path)
    return statistics.mean(float(row["wall_s"]) for row in rows), total


def shape_at(edge: Edge, down_rate: str) -> dict[str, tuple[float, float, str]]:
    """shape_at -> (median downlink ÷ ideal over k < N, whole run's seconds, shaped_at)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="ssh-bench-") as tmp:
        _summary(_smoke(Path(tmp), edge, "remote", down_rate))  # makes the remote venv (with the shaper)
        for where in ("remote", "local"):
            rows, total = _summary(_smoke(Path(tmp), edge, where, down_rate))
            ratios = [float(r["downlink_over_ideal_p50"]) for r in rows if r["downlink_over_ideal_p50"]]
            out[where] = (statistics.median(ratios), total, rows[0]["downlink_shaped_at"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--rate", default="50mbit", help="downlink rate of the shaped goodput case")
    ap.add_argument("--skip-shape-at", action="store_true")
    ap.add_argument("--down-rate", default="4mbit", help="downlink rate of the shape_at comparison")
    args = ap.parse_args()
    with edge_host() as edge:
        direct, tunnel = control(edge, args.requests)
        print(f"control round trip: direct {direct * 1e3:.3f} ms, through the ssh tunnel {tunnel * 1e3:.3f} ms"
              f"  -> ratio {tunnel / direct:.2f}")
        for label, (ours, ref) in goodput(edge, args.rate).items():
            print(f"data-plane goodput remote->local ({label}): {ours / 1e6:.1f} Mbit/s, iperf3 "
                  f"{ref / 1e6:.1f} Mbit/s  -> ratio {ours / ref:.2f}")
        if not args.skip_overhead:
            with tempfile.TemporaryDirectory(prefix="ssh-bench-") as tmp:
                _per_configuration(_smoke(Path(tmp), edge))  # makes the remote venv if missing
                ssh_cfg, ssh_total = _per_configuration(_smoke(Path(tmp), edge))
                ns_cfg, ns_total = _per_configuration(_smoke(Path(tmp), None))
            print(f"configuration wall time: ssh remote {ssh_cfg:.2f} s, netns {ns_cfg:.2f} s"
                  f"  -> ratio {ssh_cfg / ns_cfg:.2f}  (whole run incl. deploy: {ssh_total:.1f} s vs "
                  f"{ns_total:.1f} s -> {ssh_total / ns_total:.2f})")
        if not args.skip_shape_at:
            got = shape_at(edge, args.down_rate)
            for where, (ratio, total, at) in got.items():
                print(f"shape_at: {where} ({at}): downlink ÷ ideal {ratio:.3f} at {args.down_rate}, run {total:.1f} s")
            print(f"shape_at remote ÷ local: downlink ÷ ideal {got['remote'][0] / got['local'][0]:.3f}, "
                  f"whole run {got['remote'][1] / got['local'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
