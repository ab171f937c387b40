"""The full proof: a real smoke run, scraped live by a real Prometheus, then queried.

``testbed run experiments/smoke.yaml --metrics-listen ...`` runs as its own
process (netns and docker backends: real namespaces or containers, veths,
qdiscs, agents, LiteRT) with
``TESTBED_MONITOR_DIR`` pointing at this test's monitor folder, so the targets
file the sweep publishes is the one this Prometheus (1 s scrapes, loopback)
discovers. While it runs, both kinds of endpoint are scraped once more by hand
and fed to ``promtool check metrics``. After it ends, Prometheus is queried
over its HTTP API: series with the right labels, the e2e histogram's count
equal to the rows of samples.csv, and every dashboard panel query returning data
over the run's window.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from testbed.metrics import dashboards
from testbed.metrics.monitor import start_prometheus, write_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"
RUN_TIMEOUT_S = 900
# Both backends: Prometheus on the host must reach agents in namespaces and in containers.
BACKENDS = ["netns", "docker"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _promtool_check(endpoint: str) -> str | None:
    """None when promtool finds the scrape clean, else what it said."""
    scrape = urllib.request.urlopen(endpoint, timeout=5).read()
    done = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True)
    return None if done.returncode == 0 else (done.stdout + done.stderr).decode()


@pytest.fixture(scope="module", params=BACKENDS)
def scraped_run(request, tmp_path_factory):
    """Run the smoke experiment under a live Prometheus; returns what the test needs."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (namespaces, qdiscs, docker)")
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"prometheus-run-{backend}")
    monitor_dir = tmp / "monitor"
    config = write_config(monitor_dir, scrape_interval_s=1.0)
    prometheus = start_prometheus(config, monitor_dir / "data", f"127.0.0.1:{_free_port()}",
                                  log=monitor_dir / "prometheus.log")
    metrics_port = _free_port()
    testbed = Path(sys.executable).with_name("testbed")
    env = {**os.environ, "TESTBED_MONITOR_DIR": str(monitor_dir)}
    t_start = time.time()
    # Output to files, not pipes: an undrained pipe would block the run on its progress output.
    out, err = open(tmp / "stdout.txt", "w+"), open(tmp / "stderr.txt", "w+")
    proc = subprocess.Popen([str(testbed), "run", str(SMOKE), "--backend", backend,
                             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--output", str(tmp / "runs")],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True, env=env, cwd=ROOT)
    promtool: dict[str, str | None] = {}
    max_up = 0
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            # While it runs: scrape every published endpoint once, and watch targets come up.
            for path in (monitor_dir / "targets").glob("*.json"):
                try:
                    groups = json.loads(path.read_text())
                except ValueError:
                    continue
                for group in groups:
                    address = group["targets"][0]
                    kind = group["labels"].get("component", "?")
                    key = f"{kind} {address}"
                    if key not in promtool:
                        try:
                            promtool[key] = _promtool_check(f"http://{address}/metrics")
                        except OSError:
                            pass  # not serving yet (or already gone); next round
            try:
                up = dashboards.instant(prometheus.url, 'count(up{job="testbed"} == 1)')
                max_up = max(max_up, int(float(up[0]["value"][1])) if up else 0)
            except Exception:  # noqa: BLE001 - Prometheus busy; try again
                pass
            time.sleep(0.3)
        if proc.poll() is None:
            proc.kill()
            pytest.fail(f"smoke run did not finish within {RUN_TIMEOUT_S} s")
        proc.wait(timeout=30)
        stdout, stderr = (tmp / "stdout.txt").read_text(), (tmp / "stderr.txt").read_text()
        assert proc.returncode == 0, f"testbed run failed ({proc.returncode}):\n{stderr[-3000:]}"
        run_dir = Path(stdout.strip().splitlines()[-1])
        time.sleep(1.5)  # let the last scrape land
        yield {"url": prometheus.url, "run_dir": run_dir, "run": run_dir.name, "start": t_start,
               "end": time.time(), "promtool": promtool,
               "max_up": max_up, "monitor_dir": monitor_dir}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        prometheus.stop()
        out.close()
        err.close()


def _rows(run_dir: Path, name: str) -> list[dict]:
    with open(run_dir / name, newline="") as f:
        return list(csv.DictReader(f))


def _last_scrape(url: str, expr: str, start: float, end: float) -> float:
    """Time of the last point of ``expr`` within the run (series go stale when a run ends)."""
    series = dashboards.series_range(url, expr, start, end)
    times = [float(v[0]) for s in series for v in s["values"]]
    assert times, f"{expr} never scraped between {start:.0f} and {end:.0f}"
    return max(times)


def test_the_sweep_published_itself_and_its_agents(scraped_run):
    assert scraped_run["max_up"] >= 3, "orchestrator + 2 agents should have been scraped"
    kinds = {k.split()[0] for k in scraped_run["promtool"]}
    assert kinds == {"orchestrator", "agent"}
    assert not list((scraped_run["monitor_dir"] / "targets").glob("*.json")), "targets file not removed at the end"


def test_promtool_check_metrics_is_clean_on_both_endpoints(scraped_run):
    assert len(scraped_run["promtool"]) >= 3
    problems = {k: v for k, v in scraped_run["promtool"].items() if v}
    assert not problems, problems


def test_e2e_histogram_count_equals_samples_csv(scraped_run):
    url, run = scraped_run["url"], scraped_run["run"]
    at = _last_scrape(url, f'testbed_sweep_configurations_completed{{run="{run}"}}', scraped_run["start"],
                      scraped_run["end"])
    samples = _rows(scraped_run["run_dir"], "samples.csv")
    per_config = Counter((r["profile"], r["split"]) for r in samples)
    result = dashboards.instant(url, f'testbed_e2e_seconds_count{{run="{run}"}}', at)
    got = {(r["metric"]["profile"], r["metric"]["split"]): float(r["value"][1]) for r in result}
    assert got == {k: float(v) for k, v in per_config.items()}
    assert sum(got.values()) == len(samples)
    for r in result:
        assert r["metric"]["experiment"] and r["metric"]["job"] == "testbed"
    # plausible values: the histogram's mean e2e equals samples.csv's, per configuration
    sums = {(r["metric"]["profile"], r["metric"]["split"]): float(r["value"][1])
            for r in dashboards.instant(url, f'testbed_e2e_seconds_sum{{run="{run}"}}', at)}
    for key, count in per_config.items():
        csv_mean = sum(float(r["e2e_s"]) for r in samples if (r["profile"], r["split"]) == key) / count
        assert sums[key] / count == pytest.approx(csv_mean, rel=1e-6)
    done = dashboards.instant(url, f'testbed_sweep_configurations_completed{{run="{run}"}}', at)
    assert float(done[0]["value"][1]) == len(per_config)


def test_agent_series_carry_node_and_run(scraped_run):
    url, run = scraped_run["url"], scraped_run["run"]
    series = dashboards.series_range(url, f'process_resident_memory_bytes{{component="agent", run="{run}"}}',
                                     scraped_run["start"], scraped_run["end"])
    assert {s["metric"]["node"] for s in series} == {"local", "remote"}
    assert all(float(v[1]) > 10e6 for s in series for v in s["values"])  # an agent with LiteRT loaded
    served = dashboards.series_range(url, f'testbed_agent_inference_seconds_count{{run="{run}"}}',
                                     scraped_run["start"], scraped_run["end"])
    assert {s["metric"]["node"] for s in served} == {"local", "remote"}


def test_link_and_layers_as_configured(scraped_run):
    url, run = scraped_run["url"], scraped_run["run"]
    at = _last_scrape(url, f'testbed_sweep_configurations_completed{{run="{run}"}}', scraped_run["start"],
                      scraped_run["end"])
    summary = _rows(scraped_run["run_dir"], "summary.csv")
    for row in summary:
        if row.get("uplink_rate_bps"):
            rate = dashboards.instant(url, f'testbed_link_configured_rate_bytes_per_second{{run="{run}", '
                                           f'profile="{row["profile"]}", direction="uplink"}}', at)
            assert float(rate[0]["value"][1]) * 8 == pytest.approx(float(row["uplink_rate_bps"]))
    layers = _rows(scraped_run["run_dir"], "layers.csv")
    got = dashboards.instant(url, f'testbed_layer_latency_mean_seconds{{run="{run}"}}', at)
    assert len(got) == len(layers)


def test_every_dashboard_query_returns_data_after_the_run(scraped_run):
    url, run = scraped_run["url"], scraped_run["run"]
    at = _last_scrape(url, f'testbed_sweep_configurations_completed{{run="{run}"}}', scraped_run["start"],
                      scraped_run["end"])
    profiles = sorted({r["profile"] for r in _rows(scraped_run["run_dir"], "summary.csv")})
    for _name, d in dashboards.load_dashboards().items():
        variables = dashboards.variable_queries(d)
        assert run in dashboards.label_values(url, variables["run"], at)
        assert dashboards.label_values(url, dashboards.substitute(variables["profile"], {"run": run}), at) == profiles
    for profile in profiles:
        # The phone row has data only with a phone: tests/android proves it with the device double.
        failed = dashboards.check_queries(url, {"run": run, "profile": profile, "node": ".*"}, at=at,
                                          start=scraped_run["start"], select=lambda q: not dashboards.needs_phone(q))
        assert not failed, "\n".join(f"{q.dashboard} #{q.panel_id} {q.panel!r} {q.ref_id}: {why}\n  {q.expr}"
                                     for q, why in failed.items())
