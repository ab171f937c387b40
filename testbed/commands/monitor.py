"""``testbed monitor up|down|status``: parse, call ``testbed.metrics.monitor``, print the URLs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="A Prometheus (and Grafana with docker) that scrapes running sweeps live.\n\n"
                       "Example: testbed monitor up --backend compose",
                  no_args_is_help=True)

MonitorDir = Annotated[Path | None, typer.Option(
    "--dir", metavar="DIR",
    help="Monitor folder (config, targets, data); default ~/.cache/testbed/monitor or $TESTBED_MONITOR_DIR.")]


def _print(status, console: Console) -> None:
    from testbed.metrics.dashboards import DASHBOARD_DIR

    if not status.running:
        console.print(f"monitor: not running ({status.monitor_dir})")
        return
    console.print(f"Prometheus: {status.prometheus_url}  ({status.backend}"
                  f"{f', pid {status.pid}' if status.pid else ''}, "
                  f"{'ready' if status.ready else 'not ready'}"
                  f"{f', {status.active_targets} target(s)' if status.active_targets is not None else ''})")
    if status.grafana_url:
        console.print(f"Grafana:    {status.grafana_url}  (dashboards: Sweep overview, Per-layer, Nodes, Link)")
    else:
        console.print(f"Grafana:    not started with the binary backend; add {status.prometheus_url} as a "
                      f"Prometheus data source and import {DASHBOARD_DIR}/*.json")
    console.print(f"Targets:    {status.monitor_dir / 'targets'}/<run>.json (kept current by testbed run)")


@app.command("up")
def up(
    monitor_dir: MonitorDir = None,
    listen: Annotated[str, typer.Option("--listen", metavar="HOST:PORT",
                                        help="Prometheus listen address (keep it on loopback).")] = "127.0.0.1:9090",
    backend: Annotated[str, typer.Option(
        "--backend", metavar="auto|binary|compose",
        help="binary = the installed prometheus; compose = docker/monitoring-compose.yml.")] = "auto",
    scrape_interval: Annotated[str, typer.Option("--scrape-interval", metavar="DURATION")] = "1s",
    pushgateway: Annotated[str | None, typer.Option(
        "--pushgateway", metavar="URL", help="Also scrape this Pushgateway (experiment metrics.pushgateway).")] = None,
    grafana_port: Annotated[int, typer.Option("--grafana-port", help="Grafana port (compose backend).")] = 3000,
) -> None:
    """Start Prometheus (scrape config generated; targets follow running sweeps) and print its URL.

    Example: testbed monitor up
    """
    from testbed.errors import ConfigError
    from testbed.metrics import parse_listen
    from testbed.metrics.monitor import Monitor
    from testbed.units import parse_duration

    try:
        interval_s = parse_duration(scrape_interval)
    except ValueError as e:
        raise ConfigError(str(e), field="--scrape-interval") from None
    try:
        host, port = parse_listen(listen, default_port=9090)
    except ValueError as e:
        raise ConfigError(str(e), field="--listen") from None
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    status = Monitor(monitor_dir).up(address, backend=backend, scrape_interval_s=interval_s,
                                     pushgateway=pushgateway, grafana_port=grafana_port)
    _print(status, Console(highlight=False))


@app.command("down")
def down(monitor_dir: MonitorDir = None) -> None:
    """Stop the monitoring stack (its data stays, so finished runs can still be compared).

    Example: testbed monitor down
    """
    from testbed.metrics.monitor import Monitor

    stopped = Monitor(monitor_dir).down()
    Console(highlight=False).print("monitor: stopped" if stopped else "monitor: was not running")


@app.command("status")
def status(monitor_dir: MonitorDir = None) -> None:
    """Say whether the monitoring stack runs, where, and how many targets it scrapes.

    Example: testbed monitor status
    """
    from testbed.metrics.monitor import Monitor

    _print(Monitor(monitor_dir).status(), Console(highlight=False))
