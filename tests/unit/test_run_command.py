"""``testbed run`` refuses bad input with one line naming file, line and field, before starting anything."""

import pytest
from typer.testing import CliRunner

from testbed.cli import app

pytestmark = pytest.mark.unit


def _run(*args: str):
    return CliRunner().invoke(app, ["run", *args])


def test_unknown_key_is_one_line_with_file_and_line(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("name: t\nmodel: {builtin: posenet}\nnetwork: [x]\nrunz: {samples: 3}\n")
    r = _run(str(exp))
    assert r.exit_code == 1
    out = r.output.strip().splitlines()
    assert len(out) == 1 and f"{exp}:4: runz: unknown field" in out[0]
    assert not (tmp_path / "results").exists()  # nothing half-done


def test_missing_experiment_file(tmp_path):
    r = _run(str(tmp_path / "nope.yaml"))
    assert r.exit_code == 1 and "cannot read" in r.output


def test_bad_metrics_address_and_backend(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("name: t\nmodel: {builtin: posenet}\nnetwork: [x]\n")
    r = _run(str(exp), "--metrics-listen", "nohost")
    assert r.exit_code == 1 and "--metrics-listen" in r.output
    r = _run(str(exp), "--backend", "vmware")
    assert r.exit_code == 1 and "--backend" in r.output


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    import shutil
    from pathlib import Path

    exp = Path(__file__).resolve().parents[2] / "experiments" / "smoke.yaml"
    shutil.copy(exp, tmp_path / "smoke.yaml")
    r = _run(str(tmp_path / "smoke.yaml"), "--resume", str(tmp_path))
    assert r.exit_code == 1 and "not a run folder" in r.output
