"""A real Prometheus scrapes the orchestrator's exporter and two agents' exporters.

The sweep is played by this test (SweepMetrics fed with synthetic but plausible
measurements through the API the sweep calls); the agents' metrics come from the
real ``nodes.agent_metrics`` module served on loopback, in this process. The
Prometheus server (Debian's binary), the scrapes, the file-based discovery, the
Pushgateway and every dashboard query are real. The same checks against a real
smoke run are in test_prometheus_run.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from testbed.metrics import SweepMetrics, dashboards, serve
from testbed.metrics.monitor import Monitor, publish_targets, remove_targets, start_prometheus, write_config

pytestmark = pytest.mark.integration

PROFILES = {"ladder-10mbit": (10e6, 0.0), "lte-urban": (5e6, 0.02)}
SPLITS = (0, 5, 31)
SAMPLES = 6
LAYERS = 31
CONFIGURATION_S = 0.7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float = 60.0):
    """Poll check() until it returns a truthy value; fail with what after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # noqa: BLE001 - report the last failure
            last = e
        else:
            if last:
                return last
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}: last {last!r}")


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pushgateway")
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    assert binary, "prometheus-pushgateway missing: run bash scripts/setup.sh test"
    port = _free_port()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                             f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait("pushgateway ready", lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=1).status == 200)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, pushgateway):
    """Prometheus on loopback, 1 s scrapes, targets from <tmp>/monitor/targets/*.json."""
    monitor_dir = tmp_path_factory.mktemp("prometheus") / "monitor"
    config = write_config(monitor_dir, scrape_interval_s=1.0, pushgateway=pushgateway)
    process = start_prometheus(config, monitor_dir / "data", f"127.0.0.1:{_free_port()}",
                               log=monitor_dir / "prometheus.log")
    try:
        yield process.url, monitor_dir
    finally:
        process.stop()


def _sample(split: int, rate_bps: float, delay_s: float, i: int) -> dict:
    """Plausible timings: PoseNet-sized tensors over the configured link."""
    wire = 0 if split == LAYERS else (789_600 if split == 0 else 280_000)
    head = 0.0 if split == 0 else 0.002 * split
    tail = 0.0 if split == LAYERS else 0.001 * (LAYERS - split)
    up = 0.0 if wire == 0 else delay_s + wire * 8 / rate_bps * (1 + 0.01 * i)
    down = 0.0 if wire == 0 else delay_s + 70_000 * 8 / rate_bps
    e2e = head + up + tail + down + 0.0004
    return {"head_s": head, "encode_s": 0.0001, "uplink_s": up, "remote_decode_s": 0.0001, "tail_s": tail,
            "remote_encode_s": 0.0001, "downlink_s": down, "decode_s": 0.0001, "e2e_s": e2e,
            "cut_bytes_raw": max(0, wire - 96), "cut_bytes_wire": wire,
            "result_bytes_wire": 70_000 if wire else 0}


def _play_sweep(m: SweepMetrics, agents: dict) -> None:
    total = len(PROFILES) * len(SPLITS)
    layer_rows = [{"layer": i, "op": "CONV_2D", "output_bytes": 100_000 // (i + 1), "params": 1000 * i,
                   "macs": 10_000 * i, "mean_s": 0.0005 * (i + 1), "p50_s": 0.0005 * (i + 1),
                   "p90_s": 0.0007 * (i + 1), "std_s": 0.0001} for i in range(LAYERS)]
    m.set_layers("local", layer_rows)
    m.set_layers("remote", [{**r, "mean_s": r["mean_s"] / 3, "p50_s": r["p50_s"] / 3, "p90_s": r["p90_s"] / 3}
                            for r in layer_rows])
    done = 0
    for profile, (rate, delay) in PROFILES.items():
        for direction in ("uplink", "downlink"):
            m.set_link(direction, profile, rate, delay, 0.0, emulation="tbf" if delay == 0 else "htb+netem")
        for k in SPLITS:
            m.configuration_started(k, profile, total=total, done=done, eta_s=(total - done) * 2.0)
            if k > 0:
                m.observe_delivery(k, profile, delay + 50_000 * k * 8 / rate, size_bytes=50_000 * k)
                m.set_part("local", "head", k, {"init_s": 0.01, "first_s": 0.02, "warmup_mean_s": 0.01,
                                                "steady_mean_s": 0.002 * k, "steady_std_s": 0.0001,
                                                "init_memory_bytes": 20 << 20, "peak_memory_bytes": 30 << 20},
                           file_bytes=50_000 * k)
            if k < LAYERS:
                m.set_part("remote", "tail", k, {"init_s": 0.01, "steady_mean_s": 0.001 * (LAYERS - k),
                                                 "init_memory_bytes": 20 << 20, "peak_memory_bytes": 40 << 20},
                           file_bytes=50_000 * (LAYERS - k))
            for i in range(SAMPLES):
                s = _sample(k, rate, delay, i)
                m.observe_sample(k, profile, s)
                if s["head_s"]:
                    agents["local"].inference("head", s["head_s"])
                agents["local"].sample_served("local")
                if s["tail_s"]:
                    agents["remote"].inference("tail", s["tail_s"])
                    agents["remote"].sample_served("remote")
            m.add_phases(profile, {"link": 0.01, "delivery": 0.05 * k, "kpi": 0.2, "warmup": 0.02,
                                   "sampling": SAMPLES * 0.05, "write": 0.01})
            done += 1
            m.configuration_done(k, profile, done=done, eta_s=(total - done) * 2.0)
            time.sleep(CONFIGURATION_S)  # like a real sweep: data arrive across scrapes


@pytest.fixture(scope="module")
def live_run(prometheus, pushgateway):
    """Exporters up and published; the synthetic sweep already played."""
    from nodes.agent_metrics import AgentMetrics
    from nodes.agent_metrics import serve as agent_serve

    url, monitor_dir = prometheus
    run = f"itest-{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    m = SweepMetrics(registry, "itest", run, pushgateway=pushgateway)
    server = serve(registry, "127.0.0.1", 0)
    agents, agent_servers, addresses = {}, [], {}
    for node in ("local", "remote"):
        reg = CollectorRegistry()
        agents[node] = AgentMetrics(reg, node)
        httpd = agent_serve(reg, "127.0.0.1", 0)
        agent_servers.append(httpd)
        addresses[node] = f"127.0.0.1:{httpd.server_port}"
    targets = publish_targets(run, "itest", f"127.0.0.1:{server.port}", addresses, monitor_dir=monitor_dir)
    try:
        _wait("three targets up", lambda: dashboards.instant(url, 'count(up{job="testbed"} == 1) == 3'))
        _play_sweep(m, agents)
        total = len(PROFILES) * len(SPLITS)
        _wait("final progress scraped", lambda: dashboards.instant(
            url, f'testbed_sweep_configurations_completed{{run="{run}"}} == {total}'))
        _wait("pushed summaries scraped", lambda: len(dashboards.instant(
            url, f'testbed_configuration_e2e_p50_seconds{{job="testbed-summary", run="{run}"}}')) == total)
        _wait("agents' last samples scraped", lambda: dashboards.instant(
            url, f'sum(testbed_agent_samples_served_total{{run="{run}"}}) == '
                 f'{len(PROFILES) * (len(SPLITS) * SAMPLES + (len(SPLITS) - 1) * SAMPLES)}'))
        time.sleep(2.5)  # two more scrapes so rate() windows hold the final values
        yield url, run, server, addresses
    finally:
        remove_targets(targets)
        server.close()
        for httpd in agent_servers:
            httpd.shutdown()
            httpd.server_close()


def test_series_and_labels_in_prometheus(live_run):
    url, run, _, _ = live_run
    q = lambda expr: dashboards.instant(url, expr)  # noqa: E731
    # e2e histogram: one series per split x profile, count = samples fed
    counts = q(f'testbed_e2e_seconds_count{{run="{run}"}}')
    assert len(counts) == len(PROFILES) * len(SPLITS)
    for r in counts:
        assert r["metric"]["experiment"] == "itest" and r["metric"]["job"] == "testbed"
        assert r["metric"]["split"] in {str(k) for k in SPLITS} and r["metric"]["profile"] in PROFILES
        assert float(r["value"][1]) == SAMPLES
        assert "exported_run" not in r["metric"]
    # per node and part, only where the part exists
    parts = {(r["metric"]["split"], r["metric"]["node"], r["metric"]["part"])
             for r in q(f'testbed_inference_seconds_count{{run="{run}", profile="lte-urban"}}')}
    assert parts == {("0", "remote", "tail"), ("5", "local", "head"), ("5", "remote", "tail"),
                     ("31", "local", "head")}
    # configured link in base units; achieved rate below configured, same order of magnitude
    rate = q(f'testbed_link_configured_rate_bytes_per_second{{run="{run}", profile="lte-urban", '
             f'direction="uplink"}}')
    assert float(rate[0]["value"][1]) == 5e6 / 8
    achieved = q(f'sum(testbed_link_transferred_bytes_total{{run="{run}", profile="lte-urban", direction="uplink"}})'
                 f' * 8 / sum(testbed_link_busy_seconds_total{{run="{run}", profile="lte-urban", '
                 f'direction="uplink"}})')
    assert 0.5 * 5e6 < float(achieved[0]["value"][1]) < 5e6
    # agents: target labels attach node/run/experiment to process_* series
    rss = q(f'process_resident_memory_bytes{{run="{run}", component="agent"}}')
    assert {r["metric"]["node"] for r in rss} == {"local", "remote"}
    assert all(float(r["value"][1]) > 10e6 and r["metric"]["experiment"] == "itest" for r in rss)
    # the agent's own node label is kept (honor_labels), not renamed
    served = q(f'testbed_agent_samples_served_total{{run="{run}"}}')
    assert {r["metric"]["node"] for r in served} == {"local", "remote"}
    assert all("exported_node" not in r["metric"] for r in served)
    # per-layer gauges for both nodes
    assert len(q(f'testbed_layer_latency_mean_seconds{{run="{run}"}}')) == 2 * LAYERS
    # pushgateway summaries match the live gauges
    pushed = q(f'testbed_configuration_e2e_p50_seconds{{job="testbed-summary", run="{run}", split="5", '
               f'profile="lte-urban"}}')
    live = q(f'testbed_configuration_e2e_p50_seconds{{job="testbed", run="{run}", split="5", profile="lte-urban"}}')
    assert float(pushed[0]["value"][1]) == pytest.approx(float(live[0]["value"][1]))


def test_every_dashboard_query_returns_data(live_run):
    url, run, _, _ = live_run
    for profile in PROFILES:
        # The phone row has data only with a phone: tests/android/test_phone_dashboard.py proves it.
        failed = dashboards.check_queries(url, {"run": run, "profile": profile, "node": ".*"},
                                          select=lambda q: not dashboards.needs_phone(q))
        assert not failed, "\n".join(f"{q.dashboard} #{q.panel_id} {q.panel!r} {q.ref_id}: {why}\n  {q.expr}"
                                     for q, why in failed.items())


def test_template_variables_list_this_run(live_run):
    url, run, _, _ = live_run
    for _name, d in dashboards.load_dashboards().items():
        variables = dashboards.variable_queries(d)
        assert run in dashboards.label_values(url, variables["run"])
        assert dashboards.label_values(url, dashboards.substitute(variables["profile"], {"run": run})) == \
            sorted(PROFILES)
        assert dashboards.label_values(url, dashboards.substitute(variables["node"], {"run": run})) == \
            ["local", "remote"]


def test_promtool_check_metrics_on_both_endpoints(live_run):
    _, _, server, addresses = live_run
    for endpoint in [server.url] + [f"http://{a}/metrics" for a in addresses.values()]:
        scrape = urllib.request.urlopen(endpoint, timeout=5).read()
        done = subprocess.run(["promtool", "check", "metrics"], input=scrape, capture_output=True)
        assert done.returncode == 0, f"{endpoint}: {(done.stdout + done.stderr).decode()}"


def test_monitor_up_status_down_with_the_binary(tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    monitor_dir, port = tmp_path / "mon", _free_port()
    runner = CliRunner()
    try:
        result = runner.invoke(app, ["monitor", "up", "--dir", str(monitor_dir), "--listen", f"127.0.0.1:{port}"])
        assert result.exit_code == 0, result.output
        assert f"Prometheus: http://127.0.0.1:{port}" in result.output and "ready" in result.output
        pid = int((monitor_dir / "prometheus.pid").read_text())
        # a published run becomes an active target without restarting Prometheus
        registry = CollectorRegistry()
        SweepMetrics(registry, "e", "r")
        with serve(registry, "127.0.0.1", 0) as server:
            publish_targets("r", "e", f"127.0.0.1:{server.port}", {}, monitor_dir=monitor_dir)
            _wait("target discovered", lambda: Monitor(monitor_dir).status().active_targets == 1, timeout=30)
            result = runner.invoke(app, ["monitor", "status", "--dir", str(monitor_dir)])
            assert "1 target(s)" in result.output
        # up again is a no-op that reports the running instance
        again = runner.invoke(app, ["monitor", "up", "--dir", str(monitor_dir), "--listen", f"127.0.0.1:{port}"])
        assert int((monitor_dir / "prometheus.pid").read_text()) == pid and again.exit_code == 0
        result = runner.invoke(app, ["monitor", "down", "--dir", str(monitor_dir)])
        assert result.exit_code == 0 and "stopped" in result.output
        _wait("prometheus gone", lambda: not Path(f"/proc/{pid}").exists()
              or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z", timeout=15)
        assert not Monitor(monitor_dir).status().running
        assert (monitor_dir / "data").is_dir()  # data kept for later comparison
    finally:
        Monitor(monitor_dir).down()


def test_monitor_up_reports_a_busy_port(tmp_path):
    from testbed.errors import TestbedError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monitor = Monitor(tmp_path)
        try:
            with pytest.raises(TestbedError, match="prometheus exited"):
                monitor.up(f"127.0.0.1:{port}")
        finally:
            monitor.down()
    assert not (tmp_path / "prometheus.pid").exists()
