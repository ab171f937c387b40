"""The ``testbed`` command: parse, call the library, print.

Each command group lives in its own module under ``testbed/commands/`` and is
registered here. A ``TestbedError`` anywhere becomes one red line on stderr and
its exit code (1, or 130 for an interrupted run); an error carrying several
``problems`` (``testbed check``, the checks before ``testbed run``) becomes one
line per problem. ``--debug`` shows the traceback instead. Nothing here
measures or decides anything.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from testbed.errors import TestbedError


class _ErrorsAsOneLine(TyperGroup):
    """Top-level group that maps TestbedError to one line and an exit code."""

    def invoke(self, ctx: typer.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except TestbedError as e:
            if ctx.meta.get("testbed.debug"):
                traceback.print_exc()
            console = Console(stderr=True, highlight=False, soft_wrap=True)
            for line in getattr(e, "problems", None) or [str(e)]:
                # escape: a message quoting user input such as '[/x]:1' is not rich markup
                console.print(f"[red]error:[/red] {escape(line)}", markup=True)
            # typer.Exit, not click's: typer >= 0.2x vendors click and no longer installs it.
            raise typer.Exit(getattr(e, "exit_code", 1)) from None


app = typer.Typer(
    cls=_ErrorsAsOneLine,
    help="Split DNN inference over an emulated mobile network.\n\n"
    "Example: testbed run experiments/posenet_sweep.yaml",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
          ) -> None:
    ctx.meta["testbed.debug"] = debug


def _register() -> None:
    # Imported here, after ``app`` exists, so the command modules stay free of
    # import cycles with this one; heavy imports live inside the commands.
    from testbed.commands import android, check, hosts, model_tools, models, monitor, netem, report, run

    model_tools.register(app)    # inspect, split, profile
    run.register(app)            # run, cleanup
    check.register(app)          # check
    report.register(app)         # report, plan
    app.add_typer(models.app, name="models")
    app.add_typer(netem.app, name="netem")
    app.add_typer(monitor.app, name="monitor")
    app.add_typer(hosts.app, name="hosts")
    app.add_typer(android.app, name="android")


_register()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
