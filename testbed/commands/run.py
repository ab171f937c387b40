"""``testbed run`` and ``testbed cleanup``: parse, call ``testbed.sweep`` / ``testbed.deploy``, print.

Exit codes: 0 done, 1 a ``TestbedError`` (one red line, from ``testbed.cli``),
130 interrupted by Ctrl-C or SIGTERM after tearing everything down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment file, e.g. experiments/posenet_sweep.yaml.",
                                               exists=False, dir_okay=False)],
    resume: Annotated[Path | None, typer.Option(
        "--resume", metavar="RUN_DIR", help="Continue an interrupted run: skip its finished configurations.")] = None,
    metrics_listen: Annotated[str | None, typer.Option(
        "--metrics-listen", metavar="HOST:PORT",
        help="Serve /metrics here (default: the experiment's metrics.listen, 127.0.0.1:9400; port 0 = any free "
             "port).")] = None,
    backend: Annotated[str | None, typer.Option("--backend", metavar="auto|docker|netns",
                                                help="Override the experiment's node backend.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", metavar="DIR", help="Parent folder of the run folder (default: the experiment's output).")] = None,
    keep_parts: Annotated[bool, typer.Option(
        "--keep-parts", help="Keep the split model's part files in RUN_DIR/parts (default: removed at the end; "
                             "manifest.json stays and --resume writes them again).")] = False,
) -> None:
    """Run an experiment: every split point at every link profile; results in a run folder.

    Example: testbed run experiments/posenet_sweep.yaml --backend docker
    """
    from testbed.sweep import SweepOptions, run_experiment

    console = Console(stderr=True)
    run_dir = run_experiment(experiment, SweepOptions(resume=resume, metrics_listen=metrics_listen,
                                                      backend=backend, output=output, keep_parts=keep_parts),
                             console=console)
    # stdout carries only the run folder, so scripts can capture it.
    typer.echo(str(run_dir))


def cleanup(
    run_id: Annotated[str | None, typer.Option("--run", metavar="ID",
                                               help="Only what run ID left (the id is in environment.json).")] = None,
) -> None:
    """Remove containers, networks, namespaces, veths, qdiscs and phone folders a killed run left behind.

    Example: testbed cleanup --run 3f9a2c
    """
    from testbed.deploy import cleanup as deploy_cleanup

    removed = deploy_cleanup(run_id) + _phones(run_id)
    console = Console(highlight=False)
    for item in removed:
        console.print(f"removed {item}")
    console.print(f"{len(removed)} item(s) removed" if removed else "nothing to clean up")


def _phones(run_id: str | None) -> list[str]:
    """``/data/local/tmp/testbed-<run id>`` folders on phones attached to the testbed's adb server
    (only when that server runs: cleanup starts none)."""
    from testbed.android.adb import Adb, AndroidError, _answers
    from testbed.android.device import cleanup_phones

    try:
        adb = Adb()
    except AndroidError:
        return []
    return cleanup_phones(adb, run_id) if _answers(adb.port) else []


def register(app: typer.Typer) -> None:
    """Add ``run`` and ``cleanup`` to the top-level app."""
    app.command("run")(run)
    app.command("cleanup")(cleanup)
