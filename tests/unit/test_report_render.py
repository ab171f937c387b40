"""The report's rendering on a small made-up run folder (see report_synthetic_run):
figures drawn and embedded, tables equal to their CSVs and to the run's files,
overlays, rebuilding from a copied folder, and one-line errors.

The same checks on a real smoke run are in tests/integration/test_report_smoke.py."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from testbed.analysis.report import build_report
from testbed.analysis.results import read_csv
from testbed.errors import TestbedError
from tests.report_checks import check_report, check_tables_against_run
from tests.unit.report_synthetic_run import make_run

pytestmark = pytest.mark.unit

FIGURES = {"e2e", "stacked", "intermediate_bytes", "layers", "parts", "kpis", "planner", "fidelity", "sweep_time"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return make_run(base, "cpu1"), make_run(base, "cpu-half", local_scale=2.0, seed=7)


def test_every_figure_and_table_of_one_run(runs, tmp_path):
    rep = build_report(runs[0], tmp_path / "out")
    parsed = check_report(rep, FIGURES)
    check_tables_against_run(rep, runs[0])
    assert set(rep.tables) >= {"best_split", "configurations", "layer_profile", "part_kpis", "planner_choices",
                               "planner_configurations", "environment"}
    best = {r["profile"]: r for r in read_csv(rep.tables["best_split"])}
    assert best["fast"]["best_split"] == 1 and best["slow"]["best_split"] == 6
    assert best["fast"]["speedup_vs_device"] > 1.5
    env = {r["key"]: r["value"] for r in read_csv(rep.tables["environment"])}
    assert env["kernel"] == "6.1.0-test" and env["emulation (uplink/downlink)"] == "tbf/tbf"
    html = rep.html_path.read_text()
    assert "end-to-end latency" in html and "intermediate data" in html and "goal ≤ 1.05" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained
    assert len(parsed.tables["best_split.csv"]["rows"]) == 2


def test_compare_overlays_runs(runs, tmp_path):
    rep = build_report(runs[0], tmp_path / "cmp", compare=[runs[1]])
    check_report(rep, FIGURES)
    best = read_csv(rep.tables["best_split"])
    assert {(r["run"], r["profile"]) for r in best} == {(a, p) for a in ("cpu1", "cpu-half") for p in ("fast", "slow")}
    # With a local node twice as slow, offloading wins earlier: at 'fast' the network anchor is best.
    half = next(r for r in best if r["run"] == "cpu-half" and r["profile"] == "fast")
    assert half["best_split"] == 0
    single = build_report(runs[0], tmp_path / "one")
    # The overlay draws more: the e2e figure differs from the single-run one.
    assert (tmp_path / "cmp" / "e2e.png").read_bytes() != (single.figures["e2e"]).read_bytes()


def test_rebuilds_from_a_copied_folder(runs, tmp_path):
    copy = tmp_path / "elsewhere" / "copied-run"
    shutil.copytree(runs[0], copy)
    a = build_report(runs[0], tmp_path / "a")
    b = build_report(copy)
    assert b.html_path == copy / "report" / "report.html"
    for name, path in a.tables.items():
        if name != "environment":
            assert path.read_text() == b.tables[name].read_text(), name


def test_not_a_run_folder_is_one_error(tmp_path):
    with pytest.raises(TestbedError, match="summary.csv"):
        build_report(tmp_path)
    with pytest.raises(TestbedError, match="no such run folder"):
        build_report(tmp_path / "nope")


def test_partial_run_still_reports(tmp_path):
    """A run killed before layers were profiled: figures it cannot draw are
    said to be missing, the rest is there."""
    run = make_run(tmp_path)
    (run / "layers.csv").unlink()
    rep = build_report(run, tmp_path / "out")
    assert "layers" not in rep.figures and "e2e" in rep.figures
    assert any("planner" in w for w in rep.warnings)
    check_report(rep, {"e2e", "stacked", "intermediate_bytes", "parts", "kpis"})


def test_cli_report_and_plan(runs, tmp_path):
    from testbed.cli import app

    r = CliRunner().invoke(app, ["report", str(runs[0]), "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli" / "report.html").is_file() and "report.html" in r.output
    r = CliRunner().invoke(app, ["plan", "--run", str(runs[0])])
    assert r.exit_code == 0, r.output
    assert "worst choice ÷ best measured e2e: 1.000" in r.output
    r = CliRunner().invoke(app, ["plan", "--layers", str(runs[0] / "layers.csv"), "--uplink", "0.5mbit",
                                 "--downlink", "0.5mbit", "--out", str(tmp_path / "plan")])
    assert r.exit_code == 0, r.output
    rows = read_csv(tmp_path / "plan" / "plan.csv")
    assert len(rows) == 7 and (tmp_path / "plan" / "plan.png").stat().st_size > 0
    r = CliRunner().invoke(app, ["plan", "--run", str(runs[0]), "--profile", "ladder-1mbit", "--profile",
                                 "ladder-100mbit"])
    assert r.exit_code == 0 and "ladder-1mbit" in r.output and "ladder-100mbit" in r.output, r.output
    r = CliRunner().invoke(app, ["plan", "--layers", str(runs[0] / "layers.csv")])
    assert r.exit_code == 1 and "--profile" in r.output
    r = CliRunner().invoke(app, ["plan", "--run", str(runs[0]), "--uplink", "fast"])
    assert r.exit_code == 1 and "--uplink" in r.output


def test_repeats_are_pooled_and_their_spread_shown(tmp_path):
    """A run with two repeats: one row per configuration in the report's tables
    (samples of both repeats pooled), the repeatability figure and the per-repeat
    table, and the fidelity table with measured ÷ ideal."""
    import csv

    from testbed.analysis.report import build_report
    from tests.unit.report_synthetic_run import PROFILES, N, make_run

    run = make_run(tmp_path, name="repeated", samples=5, repeats=2)
    report = build_report(run, tmp_path / "out")
    assert "repeatability" in report.figures and "fidelity" in report.figures
    configs = list(csv.DictReader(open(report.tables["configurations"])))
    assert len(configs) == len(PROFILES) * (N + 1)
    assert all(r["repeats"] == "2" and int(r["count"]) == 10 for r in configs)
    assert all(float(r["e2e_p50_repeat_spread"]) >= 1.0 for r in configs)
    per_repeat = list(csv.DictReader(open(report.tables["repeats"])))
    assert len(per_repeat) == 2 * len(configs) and {r["repeat"] for r in per_repeat} == {"0", "1"}
    fidelity = list(csv.DictReader(open(report.tables["fidelity"])))
    shaped = [r for r in fidelity if r["uplink_over_ideal_p50"]]
    assert shaped and all(1.0 <= float(r["uplink_over_ideal_p50"]) <= 1.02 for r in shaped)
    html = report.html_path.read_text()
    assert "× 2 repeats" in html and 'id="fig-repeatability"' in html


def test_values_are_escaped_not_interpreted(tmp_path):
    """The template autoescapes: markup in a run's name is shown as text, and cells still equal their CSVs."""
    name = "x<img src=x onerror=alert(1)>&"
    run = make_run(tmp_path, name=name)
    rep = build_report(run, tmp_path / "out")
    check_report(rep, {"e2e"})
    html = rep.html_path.read_text()
    assert "<img src=x" not in html
    assert "x&lt;img src=x onerror=alert(1)&gt;&amp;" in html
