"""Monitor pieces that need no server: generated config, targets files, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from testbed.errors import TestbedError
from testbed.metrics.monitor import (
    COMPOSE_FILE,
    Monitor,
    prometheus_config,
    publish_targets,
    remove_targets,
    write_config,
    write_targets,
)

pytestmark = pytest.mark.unit


def test_config_discovers_targets_files_and_keeps_exposed_labels(tmp_path):
    config = yaml.safe_load(prometheus_config(tmp_path / "targets", scrape_interval_s=0.5))
    assert config["global"]["scrape_interval"] == "500ms"
    assert config["global"]["scrape_timeout"] == "500ms"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "testbed" and job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == [str(tmp_path / "targets" / "*.json")]


def test_config_with_pushgateway_scrapes_it_honouring_labels(tmp_path):
    config = yaml.safe_load(prometheus_config(tmp_path, scrape_interval_s=2, pushgateway="http://127.0.0.1:9091/"))
    assert config["global"]["scrape_interval"] == "2s"
    push = config["scrape_configs"][1]
    assert push["honor_labels"] is True and push["static_configs"] == [{"targets": ["127.0.0.1:9091"]}]


def test_promtool_accepts_the_generated_config(tmp_path):
    assert shutil.which("promtool"), "promtool missing: run bash scripts/setup.sh test"
    path = write_config(tmp_path, scrape_interval_s=1, pushgateway="127.0.0.1:9091")
    done = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "targets").is_dir() and (tmp_path / "data").is_dir()


def test_targets_file_is_file_sd_json_and_labels_agents(tmp_path):
    path = publish_targets("20261123-r1", "smoke", "127.0.0.1:9400",
                           {"remote": "172.20.0.3:9101", "local": "172.20.0.2:9101"}, monitor_dir=tmp_path)
    assert path == tmp_path / "targets" / "20261123-r1.json"
    groups = json.loads(path.read_text())
    assert groups[0] == {"targets": ["127.0.0.1:9400"], "labels": {"component": "orchestrator"}}
    assert groups[1] == {"targets": ["172.20.0.2:9101"],
                         "labels": {"component": "agent", "node": "local", "experiment": "smoke", "run": "20261123-r1"}}
    assert [g["labels"]["node"] for g in groups[1:]] == ["local", "remote"]
    assert not list(path.parent.glob(".*tmp"))  # written through a temporary file, renamed
    remove_targets(path)
    remove_targets(path)  # already gone is fine
    assert not path.exists()


def test_write_targets_replaces_the_whole_file(tmp_path):
    path = tmp_path / "t.json"
    write_targets(path, [("a:1", {}), ("b:2", {"x": 1})])
    write_targets(path, [("c:3", {})])
    assert json.loads(path.read_text()) == [{"targets": ["c:3"], "labels": {}}]


def test_status_and_down_when_nothing_runs(tmp_path):
    monitor = Monitor(tmp_path)
    status = monitor.status()
    assert not status.running and status.prometheus_url is None
    assert monitor.down() is False


def test_stale_pid_file_is_not_mistaken_for_a_running_prometheus(tmp_path):
    # pid 1 exists but is not our prometheus: status must not claim it, down must not signal it
    (tmp_path / "backend").write_text("binary\n")
    (tmp_path / "prometheus.pid").write_text("1\n")
    (tmp_path / "url").write_text("http://127.0.0.1:1\n")
    monitor = Monitor(tmp_path)
    assert not monitor.status().running
    assert monitor.down() is False
    assert not (tmp_path / "prometheus.pid").exists()


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(TestbedError, match="auto, binary or compose"):
        Monitor(tmp_path).up(backend="kubernetes")


def test_cli_status_and_bad_arguments(tmp_path):
    from testbed.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["monitor", "status", "--dir", str(tmp_path)])
    assert result.exit_code == 0 and "not running" in result.output
    result = runner.invoke(app, ["monitor", "up", "--dir", str(tmp_path), "--scrape-interval", "5 parsecs"])
    assert result.exit_code == 1 and "--scrape-interval" in result.output
    result = runner.invoke(app, ["monitor", "up", "--dir", str(tmp_path), "--listen", "127.0.0.1:http"])
    assert result.exit_code == 1 and "--listen" in result.output
    assert not (tmp_path / "prometheus.pid").exists()  # nothing half-done


def test_compose_file_runs_prometheus_and_grafana_with_the_provisioning():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    assert set(services) == {"prometheus", "grafana"}
    assert all(s["network_mode"] == "host" for s in services.values())
    mounts = services["grafana"]["volumes"]
    repo = COMPOSE_FILE.parent
    for mount in mounts:
        source = mount.split(":")[0]
        assert (repo / source).resolve().is_dir(), mount
    assert any("--config.file=${TESTBED_MONITOR_DIR}/prometheus.yml" == c for c in services["prometheus"]["command"])


def test_grafana_provisioning_points_at_the_dashboards():
    root = Path(__file__).resolve().parents[2] / "grafana" / "provisioning"
    ds = yaml.safe_load((root / "datasources" / "testbed.yaml").read_text())["datasources"][0]
    assert ds["uid"] == "testbed-prometheus" and ds["type"] == "prometheus"
    provider = yaml.safe_load((root / "dashboards" / "testbed.yaml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_targets_of_a_dead_run_are_removed_and_a_live_ones_kept(tmp_path):
    """A run killed before it could remove its targets file leaves Prometheus
    scraping nothing forever; remove_dead_targets (run by `testbed cleanup`)
    removes it, judging by the owner recorded beside it; a live run's stays."""
    import subprocess
    import sys

    from testbed.metrics.monitor import publish_targets, remove_dead_targets

    live = publish_targets("live", "e", "127.0.0.1:1", {}, monitor_dir=tmp_path)
    dead = publish_targets("dead", "e", "127.0.0.1:2", {}, monitor_dir=tmp_path)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from testbed.deploy import owner
    gone = owner.tag(os.getpid()).replace(str(os.getpid()), child.stdout.strip(), 1)
    dead.with_name(dead.name + ".owner").write_text(gone + "\n")
    removed = remove_dead_targets(tmp_path)
    assert removed == [f"prometheus targets {dead}"]
    assert live.exists() and not dead.exists() and not dead.with_name(dead.name + ".owner").exists()
