"""Android path benchmarks against the device double (prints ratios; not part of the test run).

1. Pushing every PoseNet head part (k = 1..31) to the double through the real adb server and
   adbutils (sync SEND) ÷ writing the same bytes to a local TCP socket.
2. The composed e2e of the device anchor (k = N, from a real `testbed run` with backend: android,
   netns remote; needs root) ÷ the phone's whole-model mean from benchmark_model, with its spread.

Run: sudo .venv/bin/python bench/android_bench.py
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _socket_write_s(blobs: list[bytes]) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def drain() -> None:
        c, _ = srv.accept()
        while c.recv(1 << 20):
            pass
        c.close()

    t = threading.Thread(target=drain)
    t.start()
    s = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    for b in blobs:
        s.sendall(b)
    s.shutdown(socket.SHUT_WR)
    t.join()
    dt = time.perf_counter() - t0
    s.close()
    srv.close()
    return dt


def main() -> int:
    from testbed.analysis.results import RunFolder
    from testbed.android.adb import Adb
    from testbed.model.splitter import materialize
    from testbed.model.zoo import resolve
    from tests.android.bm_double import make_binary
    from tests.android.conftest import Double, _free_port

    tmp = Path(tempfile.mkdtemp(prefix="android-bench-"))
    model = resolve({"builtin": "posenet"})
    parts = tmp / "parts"
    materialize(model, range(1, 32), parts, verify=False)
    blobs = [(parts / f"head_{k:02d}.tflite").read_bytes() for k in range(1, 32)]
    total = sum(len(b) for b in blobs)
    adb = Adb(_free_port(), keep_server=False, server_env={"HOME": str(tmp)})
    adb.ensure_server()
    (tmp / "root").mkdir()
    d = Double(adb, tmp / "root", []).start()
    try:
        t0 = time.perf_counter()
        for k, b in enumerate(blobs, 1):
            adb.push(d.serial, b, f"/data/local/tmp/bench/head_{k:02d}.tflite")
        push_s = time.perf_counter() - t0
        sock_s = min(_socket_write_s(blobs) for _ in range(3))
        print(f"push {len(blobs)} PoseNet head parts ({total / 2**20:.1f} MiB) to the double: {push_s:.3f} s; "
              f"same bytes to a local socket: {sock_s:.4f} s; ratio {push_s / sock_s:.1f}")
        import os
        if os.geteuid() != 0:
            print("composed e2e: skipped (needs root for the netns remote node)")
            return 0
        exp = tmp / "anchor.yaml"
        exp.write_text(f"""name: android-anchor
model: {{builtin: posenet}}
splits: [31]
nodes:
  local: {{backend: android, serial: "{d.serial}", benchmark_model: {make_binary(tmp / 'bm')}, threads: 1}}
  remote: {{backend: netns}}
network: [ladder-100mbit]
runs: {{warmup: 1, samples: 40, kpi_runs: 40, layer_runs: 2, max_seconds: 60}}
metrics: {{listen: "127.0.0.1:0"}}
output: {tmp / 'results'}
""")
        os.environ["TESTBED_ADB_PORT"] = str(adb.port)
        from testbed.sweep import SweepOptions, run_experiment
        run_dir = run_experiment(exp, SweepOptions(progress=False))
        run = RunFolder(run_dir)
        [row] = run.summary()
        [head] = [p for p in run.parts() if p["part"] == "head"]
        mean, std = head["steady_mean_s"], head["steady_std_s"]
        e2e = row["e2e_mean_s"]
        print(f"device anchor k=31: composed e2e mean {e2e * 1e3:.2f} ms (p50 {row['e2e_p50_s'] * 1e3:.2f} ms, "
              f"{row['count']} samples); phone whole-model mean {mean * 1e3:.2f} ms ± {std * 1e3:.2f} ms; "
              f"ratio {e2e / mean:.3f}; |diff| / std = {abs(e2e - mean) / std:.2f} "
              f"({'within' if abs(e2e - mean) <= std else 'OUTSIDE'} its spread)")
    finally:
        d.stop()
        adb.kill_server()
    return 0


if __name__ == "__main__":
    sys.exit(main())
