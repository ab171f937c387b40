"""The dashboards' phone row against a real Prometheus after a sweep on the device double.

The phone is the adb double (no phone exists on these machines; it speaks the real adb
transport protocol to the real adb server); everything else is real: the sweep with its
remote node in a namespace, the Prometheus that discovers the sweep through the targets
file and scrapes it every second, and the panel queries run over its HTTP API. The
non-phone panels are checked by tests/integration/test_prometheus_run.py; this checks the
ones only a phone run has data for.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.metrics import dashboards
from testbed.metrics.monitor import start_prometheus, write_config

pytestmark = [pytest.mark.integration, pytest.mark.android]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_phone_panels_have_data_after_a_phone_run(double, benchmark_binary, tmp_path: Path, monkeypatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sweep's remote node needs root (netns backend)")
    phone_queries = [q for name, d in dashboards.load_dashboards().items()
                     for q in dashboards.queries(name, d) if dashboards.needs_phone(q)]
    assert phone_queries, "the dashboards lost their phone row"
    monitor_dir = tmp_path / "monitor"
    config = write_config(monitor_dir, scrape_interval_s=1.0)
    prometheus = start_prometheus(config, monitor_dir / "data", f"127.0.0.1:{_free_port()}",
                                  log=monitor_dir / "prometheus.log")
    monkeypatch.setenv("TESTBED_MONITOR_DIR", str(monitor_dir))
    try:
        d = double()
        exp = tmp_path / "phone.yaml"
        exp.write_text(f"""name: phone-dashboard
model: {{builtin: posenet}}
splits: [0, 2, 3, 8, 31]
nodes:
  local: {{backend: android, serial: "{d.serial}", benchmark_model: {benchmark_binary()}, threads: 1}}
  remote: {{backend: netns}}
network: [ladder-100mbit]
runs: {{warmup: 1, samples: 4, kpi_runs: 4, layer_runs: 2, max_seconds: 20}}
metrics: {{listen: "127.0.0.1:0"}}
output: {tmp_path / "results"}
""")
        start = time.time()
        result = CliRunner().invoke(app, ["run", str(exp)])
        assert result.exit_code == 0, result.output
        time.sleep(1.5)  # the last scrape
        run = next((tmp_path / "results").iterdir()).name
        failed = dashboards.check_queries(prometheus.url, {"run": run, "profile": "ladder-100mbit", "node": ".*"},
                                          at=time.time(), start=start, select=dashboards.needs_phone)
        assert not failed, "\n".join(f"{q.dashboard} #{q.panel_id} {q.panel!r} {q.ref_id}: {why}\n  {q.expr}"
                                     for q, why in failed.items())
        # and the values are the double's: its thermal zones and its model label
        series = dashboards.series_range(prometheus.url, f'testbed_phone_temperature_celsius{{run="{run}"}}',
                                         start, time.time())
        assert series and {s["metric"]["model"] for s in series} == {"Pixel 7"}
    finally:
        prometheus.stop()
