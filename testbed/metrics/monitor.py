"""The monitoring stack: a Prometheus that scrapes whatever a running sweep publishes.

Owns the generated ``prometheus.yml`` (one job, file-based service discovery over
``<monitor_dir>/targets/*.json``), the targets files the sweep keeps current
(``publish_targets`` / ``remove_targets``), and starting/stopping/inspecting the
Prometheus process: the distribution's ``prometheus`` binary on loopback when it
is installed, tracked by a pid file, otherwise ``docker/monitoring-compose.yml``
(Prometheus + Grafana images) for machines that can pull images. It leaves the
metric names to ``testbed.metrics`` and ``nodes/agent.py``, the dashboards to
``grafana/``, and where those shipped files are to ``testbed.resources``.

Layout of ``monitor_dir`` (default ``~/.cache/testbed/monitor``, or
``$TESTBED_MONITOR_DIR``)::

    prometheus.yml        generated on every ``up``
    targets/<run>.json    one file per running sweep (file_sd format)
    data/                 Prometheus TSDB (kept across up/down, so runs compare later)
    prometheus.pid        pid of the binary we started; prometheus.log its output
    backend               "binary" or "compose": what ``down`` has to stop

Target labels: the orchestrator target carries ``component="orchestrator"`` only (its
series already have ``experiment``/``run`` labels); an agent target carries
``component="agent"``, ``node``, ``experiment`` and ``run``, which Prometheus attaches
to every agent series that lacks them (``process_*``). The job honours exposed
labels, so an agent's own ``node`` label is kept as is.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from testbed import resources
from testbed.deploy import owner
from testbed.errors import TestbedError

JOB = "testbed"
# Shipped with the package (testbed.resources); it mounts ../grafana, shipped beside it.
COMPOSE_FILE = resources.folder("docker") / "monitoring-compose.yml"
COMPOSE_PROJECT = "testbed-monitor"
DEFAULT_LISTEN = "127.0.0.1:9090"
DEFAULT_GRAFANA_PORT = 3000


def default_dir() -> Path:
    """``$TESTBED_MONITOR_DIR`` or ``~/.cache/testbed/monitor``."""
    env = os.environ.get("TESTBED_MONITOR_DIR")
    return Path(env) if env else Path.home() / ".cache" / "testbed" / "monitor"


# --------------------------------------------------------------------------- targets

def write_targets(path: Path | str, targets: Iterable[tuple[str, Mapping[str, str]]]) -> Path:
    """Write a file_sd targets file: one group per ``("host:port", labels)``.

    Atomic (temporary file + rename in the same folder): Prometheus watches the
    folder with inotify and must never read a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": [address], "labels": {str(k): str(v) for k, v in labels.items()}}
              for address, labels in targets]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def publish_targets(run_id: str, experiment: str, orchestrator: str | None,
                    agents: Mapping[str, str], monitor_dir: Path | str | None = None) -> Path:
    """Tell the monitoring Prometheus what to scrape for this run.

    Args:
        run_id: the run id (also the file name, so concurrent runs do not collide).
        experiment: experiment name (target label of the agents).
        orchestrator: "host:port" of the orchestrator's /metrics, or None.
        agents: node name -> "host:port" of that agent's /metrics.
        monitor_dir: defaults to ``default_dir()``.

    Returns:
        The targets file; pass it to ``remove_targets`` at the end of the run.
    """
    targets: list[tuple[str, Mapping[str, str]]] = []
    if orchestrator:
        targets.append((orchestrator, {"component": "orchestrator"}))
    for node, address in sorted(agents.items()):
        targets.append((address, {"component": "agent", "node": node, "experiment": experiment, "run": run_id}))
    folder = Path(monitor_dir) if monitor_dir else default_dir()
    path = write_targets(folder / "targets" / f"{run_id}.json", targets)
    # Who published it: `testbed cleanup` removes the targets of runs whose owner died.
    _owner_file(path).write_text(owner.tag() + "\n")
    return path


def _owner_file(targets: Path) -> Path:
    return targets.with_name(targets.name + ".owner")


def remove_targets(path: Path | str) -> None:
    """Stop Prometheus scraping a finished run (tolerates "already gone")."""
    Path(path).unlink(missing_ok=True)
    _owner_file(Path(path)).unlink(missing_ok=True)


def remove_dead_targets(monitor_dir: Path | str | None = None) -> list[str]:
    """Targets files of runs whose orchestrator is gone (killed before it could
    remove them): Prometheus would scrape their vanished endpoints forever."""
    folder = (Path(monitor_dir) if monitor_dir else default_dir()) / "targets"
    removed = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            tag = _owner_file(path).read_text().strip()
        except OSError:
            continue  # no owner recorded (a hand-written file, an old run): not ours to judge
        if not owner.alive(tag):
            remove_targets(path)
            removed.append(f"prometheus targets {path}")
    return removed


# --------------------------------------------------------------------------- config

def prometheus_config(targets_dir: Path | str, *, scrape_interval_s: float = 1.0,
                      pushgateway: str | None = None) -> str:
    """The generated prometheus.yml as text.

    ``refresh_interval`` is a fallback: Prometheus notices new or changed
    targets files through inotify at once.
    """
    interval = _duration(scrape_interval_s)
    config: dict = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": _duration(min(scrape_interval_s, 10.0))},
        "scrape_configs": [{
            "job_name": JOB,
            # The orchestrator's series carry experiment/run and the agents' carry node
            # themselves; honor_labels keeps those instead of renaming them exported_*.
            # Target labels (component, node, run, experiment) still fill in where a series
            # has none (process_* of an agent).
            "honor_labels": True,
            "file_sd_configs": [{"files": [str(Path(targets_dir) / "*.json")], "refresh_interval": "5s"}],
        }],
    }
    if pushgateway:
        address = pushgateway.split("://", 1)[-1].rstrip("/")
        # honor_labels keeps the pushed run/split/profile instead of renaming them exported_*.
        config["scrape_configs"].append({"job_name": "pushgateway", "honor_labels": True,
                                         "static_configs": [{"targets": [address]}]})
    return yaml.safe_dump(config, sort_keys=False)


def _duration(seconds: float) -> str:
    """Prometheus duration text; it takes integers with a unit only."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def write_config(monitor_dir: Path, *, scrape_interval_s: float = 1.0, pushgateway: str | None = None) -> Path:
    """Create monitor_dir's folders and (re)write its prometheus.yml."""
    (monitor_dir / "targets").mkdir(parents=True, exist_ok=True)
    (monitor_dir / "data").mkdir(parents=True, exist_ok=True)
    path = monitor_dir / "prometheus.yml"
    path.write_text(prometheus_config(monitor_dir / "targets", scrape_interval_s=scrape_interval_s,
                                      pushgateway=pushgateway))
    return path


def check_config(path: Path) -> None:
    """Run ``promtool check config`` when promtool is installed.

    Raises:
        TestbedError: promtool rejects the file.
    """
    promtool = shutil.which("promtool")
    if not promtool:
        return
    done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise TestbedError(f"{path}: promtool check config failed: {(done.stderr or done.stdout).strip()}")


# --------------------------------------------------------------------------- the binary

@dataclass
class PrometheusProcess:
    """A Prometheus started from the binary; ``stop()`` ends it (tolerates "already gone")."""

    pid: int
    url: str
    popen: subprocess.Popen | None = None

    def stop(self, timeout: float = 10.0) -> None:
        _terminate(self.pid, timeout, self.popen)


def start_prometheus(config: Path, data_dir: Path, listen: str = DEFAULT_LISTEN, *,
                     log: Path | None = None, detach: bool = False, binary: str | None = None,
                     ready_timeout: float = 60.0, retention: str = "30d") -> PrometheusProcess:
    """Start the ``prometheus`` binary and wait until it answers ``/-/ready``.

    Args:
        config: prometheus.yml.
        data_dir: its TSDB folder.
        listen: "host:port"; keep it on loopback unless you mean to share the host's metrics.
        log: file for its output (default: data_dir/../prometheus.log).
        detach: new session, so it outlives this process (``testbed monitor up``);
            tests leave it attached and stop it themselves.

    Raises:
        TestbedError: no binary, or it exited / did not become ready (with its last log line).
    """
    binary = binary or shutil.which("prometheus")
    if not binary:
        raise TestbedError("prometheus is not installed (apt-get install prometheus), "
                           "or use the docker backend: testbed monitor up --backend compose")
    log = log or data_dir.parent / "prometheus.log"
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address={listen}", f"--storage.tsdb.retention.time={retention}",
            "--web.enable-lifecycle"]
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=detach)
    url = f"http://{listen}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise TestbedError(f"prometheus exited with status {popen.returncode}: {_last_line(log)}")
        if _ready(url):
            return PrometheusProcess(popen.pid, url, popen)
        time.sleep(0.2)
    _terminate(popen.pid, 5.0, popen)
    raise TestbedError(f"prometheus did not become ready on {url} within {ready_timeout:.0f} s: {_last_line(log)}")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _last_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def _terminate(pid: int, timeout: float, popen: subprocess.Popen | None = None) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if popen is not None:
        popen.wait(timeout=5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ours(pid: int, config: Path) -> bool:
    """Is pid still the prometheus we started with this config (not a reused pid)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and Path(argv[0].decode()).name == "prometheus" \
        and f"--config.file={config}".encode() in argv and _alive(pid)


# --------------------------------------------------------------------------- up / down / status

@dataclass(frozen=True)
class MonitorStatus:
    """What ``status()`` found."""

    running: bool
    backend: str | None
    prometheus_url: str | None
    grafana_url: str | None
    pid: int | None
    ready: bool
    active_targets: int | None
    monitor_dir: Path


class Monitor:
    """``testbed monitor up|down|status`` for one monitor_dir."""

    def __init__(self, monitor_dir: Path | str | None = None) -> None:
        self.dir = Path(monitor_dir) if monitor_dir else default_dir()
        self.pid_file = self.dir / "prometheus.pid"
        self.backend_file = self.dir / "backend"
        self.url_file = self.dir / "url"

    def up(self, listen: str = DEFAULT_LISTEN, *, backend: str = "auto", scrape_interval_s: float = 1.0,
           pushgateway: str | None = None, grafana_port: int = DEFAULT_GRAFANA_PORT) -> MonitorStatus:
        """Start the stack unless it already runs; returns its status.

        Raises:
            TestbedError: neither backend is available, or the chosen one failed.
        """
        current = self.status()
        if current.running:
            return current
        chosen = self._choose(backend)
        config = write_config(self.dir, scrape_interval_s=scrape_interval_s, pushgateway=pushgateway)
        check_config(config)
        if chosen == "binary":
            process = start_prometheus(config, self.dir / "data", listen, log=self.dir / "prometheus.log",
                                       detach=True)
            self.pid_file.write_text(f"{process.pid}\n")
            self.url_file.write_text(f"{process.url}\n")
        else:
            self._compose(["up", "-d"], listen, grafana_port)
            self.url_file.write_text(f"http://{listen}\nhttp://127.0.0.1:{grafana_port}\n")
        self.backend_file.write_text(f"{chosen}\n")
        return self.status()

    def down(self) -> bool:
        """Stop what ``up`` started; False when nothing was running. Data and targets stay."""
        backend = _read(self.backend_file)
        stopped = False
        if backend == "binary":
            pid = _read_int(self.pid_file)
            if pid is not None and _ours(pid, self.dir / "prometheus.yml"):
                _terminate(pid, 15.0)
                stopped = True
        elif backend == "compose":
            self._compose(["down"], DEFAULT_LISTEN, DEFAULT_GRAFANA_PORT)
            stopped = True
        for path in (self.pid_file, self.backend_file, self.url_file):
            path.unlink(missing_ok=True)
        return stopped

    def status(self) -> MonitorStatus:
        backend = _read(self.backend_file)
        urls = (_read(self.url_file) or "").split()
        prometheus_url = urls[0] if urls else None
        grafana_url = urls[1] if len(urls) > 1 else None
        pid = _read_int(self.pid_file)
        if backend == "binary":
            running = pid is not None and _ours(pid, self.dir / "prometheus.yml")
        else:
            running = backend == "compose"
        ready = bool(running and prometheus_url and _ready(prometheus_url))
        targets = _active_targets(prometheus_url) if ready and prometheus_url else None
        return MonitorStatus(running, backend if running else None, prometheus_url if running else None,
                             grafana_url if running else None, pid if backend == "binary" and running else None,
                             ready, targets, self.dir)

    def _choose(self, backend: str) -> str:
        if backend not in ("auto", "binary", "compose"):
            raise TestbedError(f"monitor: backend must be auto, binary or compose, got {backend!r}")
        if backend in ("auto", "binary") and shutil.which("prometheus"):
            return "binary"
        if backend == "binary":
            raise TestbedError("prometheus is not installed (apt-get install prometheus)")
        if _compose_command() is None:
            raise TestbedError("neither the prometheus binary (apt-get install prometheus) nor docker compose "
                               "is available")
        return "compose"

    def _compose(self, args: list[str], listen: str, grafana_port: int) -> None:
        command = _compose_command()
        if command is None:
            raise TestbedError("docker compose is not available")
        host, _, port = listen.rpartition(":")
        env = {**os.environ, "TESTBED_MONITOR_DIR": str(self.dir.resolve()), "TESTBED_PROMETHEUS_PORT": port,
               "TESTBED_PROMETHEUS_HOST": host or "127.0.0.1", "TESTBED_GRAFANA_PORT": str(grafana_port)}
        done = subprocess.run(command + ["-f", str(COMPOSE_FILE), "-p", COMPOSE_PROJECT] + args,
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise TestbedError(f"docker compose {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _active_targets(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/targets?state=active", timeout=2) as response:
            return len(json.load(response)["data"]["activeTargets"])
    except (OSError, ValueError, KeyError):
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text and text.isdigit() else None
