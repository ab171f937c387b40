"""The checks before a run: every problem in the files, one line each (the estimate: test_estimate.py).

The machine stage (backend, kernel, ports, disk) needs root or a Docker daemon:
tests/integration/test_check.py covers it. Here the files are wrong, so the
machine is never probed.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.sweep.preflight import PreflightError, check, require

pytestmark = pytest.mark.unit


def _files(tmp_path):
    (tmp_path / "bad1.yaml").write_text("name: b1\nsource: s\nuplink: {rate: 1e30tbit}\n")
    (tmp_path / "bad2.yaml").write_text("name: b2\nsource: s\nuplink: {delay: 1ms, jitter: 9s}\n")
    (tmp_path / "imgs").mkdir(exist_ok=True)
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: e\nmodel: {builtin: posenet}\nsplits: [0, 40]\n"
                   "network: [bad1.yaml, ladder-10mbit, bad2.yaml, nope]\ninput: {source: imgs}\noutput: out\n")
    return exp


def test_every_problem_in_the_files_is_listed_and_the_machine_not_probed(tmp_path):
    result = check(_files(tmp_path))
    text = "\n".join(result.problems)
    assert len(result.problems) == 5, text
    assert "bad1.yaml:3: uplink.rate: must be within 64bit" in text
    assert "bad2.yaml:3: uplink.jitter" in text
    assert "exp.yaml:4: network.3: no such link profile 'nope'" in text
    assert "exp.yaml:3: splits: split point 40 is beyond the model's 31 layers" in text
    assert "exp.yaml:5: input.source: no images" in text
    assert not any(label in ("backend", "kernel", "ports", "disk") for label, _ in result.facts)
    with pytest.raises(PreflightError) as info:
        require(_files(tmp_path))
    assert info.value.problems == result.problems


@pytest.mark.parametrize("command", ["check", "run"])
def test_the_cli_prints_one_line_per_problem_and_creates_nothing(tmp_path, command):
    exp = _files(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    r = CliRunner().invoke(app, [command, str(exp), "--metrics-listen", "nohost", "--backend", "vmware"])
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and len(lines) == 7 and all(line.startswith("error: ") for line in lines), r.stderr
    assert "--metrics-listen: expected HOST:PORT" in r.stderr and "--backend: expected auto, docker or netns" in r.stderr
    assert sorted(tmp_path.rglob("*")) == before and r.stdout == ""


def test_a_resume_folder_that_is_not_a_run_or_of_another_experiment(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: e\nmodel: {builtin: posenet}\nsplits: [0]\nnetwork: [ladder-10mbit]\n")
    r = CliRunner().invoke(app, ["check", str(exp), "--resume", str(tmp_path)])
    assert r.exit_code == 1 and "--resume" in r.stderr and "not a run folder" in r.stderr
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: other\nsplit_points: [0]\n")
    r = CliRunner().invoke(app, ["check", str(exp), "--resume", str(run)])
    assert r.exit_code == 1 and "run of experiment 'other', not 'e'" in r.stderr


def test_a_model_the_sweep_cannot_feed_is_a_problem(tmp_path):
    import hashlib

    from tests.unit.model_samples import dag_model

    data = dag_model()
    (tmp_path / "dag.tflite").write_bytes(data)
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: e\nmodel: {{path: dag.tflite, sha256: {hashlib.sha256(data).hexdigest()}}}\n"
                   "network: [ladder-10mbit]\n")
    result = check(exp)
    assert result.problems == [f"{exp}:2: model: the sweep feeds one image input; this model has 2"]
