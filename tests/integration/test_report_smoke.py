"""The report and the planner on a REAL run folder: the smoke experiment run here
(netns backend, real LiteRT, real shaped link), then reported, checked against
its own CSVs and the run's files, and opened in headless Chromium.

Needs root (namespaces, qdiscs) and Debian's ``chromium`` (scripts/setup.sh test
installs both)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.report_browser import chromium_binary, open_page
from tests.report_checks import check_report, check_tables_against_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"
FIGURES = {"e2e", "stacked", "intermediate_bytes", "layers", "parts", "kpis", "planner", "fidelity", "sweep_time"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    from rich.console import Console

    from testbed.sweep import SweepOptions, run_experiment

    if os.geteuid() != 0:
        pytest.fail("the smoke run needs root (namespaces, qdiscs)")
    out = tmp_path_factory.mktemp("report-smoke")
    log = io.StringIO()
    run_dir = run_experiment(SMOKE, SweepOptions(backend="netns", output=out, metrics_listen="127.0.0.1:0",
                                                 progress=False), console=Console(file=log, width=200))
    return Path(run_dir)


@pytest.fixture(scope="module")
def report(smoke_run, tmp_path_factory):
    from testbed.analysis.report import build_report

    # Built from a copy: the report must need nothing but the folder's files.
    copy = tmp_path_factory.mktemp("copied") / smoke_run.name
    shutil.copytree(smoke_run, copy)
    return build_report(copy)


def test_every_figure_exists_and_every_table_matches_the_csvs(report, smoke_run):
    check_report(report, FIGURES)
    check_tables_against_run(report, smoke_run)
    assert not report.warnings, report.warnings


def test_planner_predicts_the_smoke_run(report):
    ev = report.evaluation
    assert ev is not None and ev.configurations
    # Every measured configuration got a prediction, positive and finite.
    assert all(0 < c["predicted_e2e_s"] < 60 for c in ev.configurations)
    assert {c["split"] for c in ev.configurations} == {0, 12, 31}
    assert all(c["ratio_mean"] is not None and c["ratio_mean"] >= 1.0 for c in ev.choices)


def test_report_opens_in_headless_chromium_without_console_errors(report, tmp_path):
    if chromium_binary() is None:
        pytest.fail("chromium is not installed (scripts/setup.sh test installs it)")
    shot = tmp_path / "screenshot.png"
    errors = open_page(report.html_path.as_uri(), shot)
    assert errors == [], errors
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    # Non-blank: text, tables and figures give a white page plenty of variance and dark pixels.
    assert img.std() > 20, f"screenshot looks blank (pixel std {img.std():.1f})"
    assert (img < 100).mean() > 0.01
    shutil.copy(shot, report.html_path.parent / "screenshot.png")  # for a human to look at


def test_cli_plan_answers_for_profiles_not_in_the_run(smoke_run):
    from typer.testing import CliRunner

    from testbed.cli import app

    r = CliRunner().invoke(app, ["plan", "--run", str(smoke_run), "--profile", "ladder-1mbit",
                                 "--profile", "ladder-100mbit", "--all"])
    assert r.exit_code == 0, r.output
    assert "ladder-1mbit" in r.output and "ladder-100mbit" in r.output
