"""``testbed check``: what a run of an experiment would do, or every reason it cannot start.

Thin: parses, calls ``testbed.sweep.preflight.check``, prints the facts (stdout) or
raises ``PreflightError`` whose problems ``testbed.cli`` prints one per line
(stderr, exit 1). Creates nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def check(
    experiment: Annotated[Path, typer.Argument(help="Experiment file, e.g. experiments/posenet_sweep.yaml.",
                                               dir_okay=False)],
    resume: Annotated[Path | None, typer.Option("--resume", metavar="RUN_DIR",
                                                help="Check a resume of this run folder (what is left to do).")] = None,
    metrics_listen: Annotated[str | None, typer.Option("--metrics-listen", metavar="HOST:PORT",
                                                       help="As for run: the /metrics address to check.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", metavar="auto|docker|netns",
                                                help="As for run: override the experiment's node backend.")] = None,
    output: Annotated[Path | None, typer.Option("--output", metavar="DIR",
                                                help="As for run: parent folder of the run folder.")] = None,
) -> None:
    """Check an experiment without running it: files, model, split points, profiles,
    backend, kernel, ports, disk; print what the run would do and an estimated duration.

    Example: testbed check experiments/posenet_sweep.yaml
    """
    from testbed.sweep.preflight import PreflightError, RunOptions
    from testbed.sweep.preflight import check as preflight_check

    result = preflight_check(experiment, RunOptions(resume=resume, metrics_listen=metrics_listen,
                                                    backend=backend, output=output))
    if result.problems:
        raise PreflightError(result.problems)
    width = max(len(label) for label, _ in result.facts)
    for label, text in result.facts:
        typer.echo(f"{label:<{width}}  {text}")
    typer.echo("ok: the run can start (nothing was created)")


def register(app: typer.Typer) -> None:
    """Add ``check`` to the top-level app."""
    app.command("check")(check)
