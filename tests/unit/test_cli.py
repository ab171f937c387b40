"""The CLI shell: command groups listed, help with examples, errors as one line."""

import re

import pytest
from typer.testing import CliRunner

from testbed.cli import app

pytestmark = pytest.mark.unit


def _commands(group=app):
    """The path of every command and every group (the top level included), e.g. [], ["netem"], ["netem", "list"]."""
    import typer.main

    cmd = typer.main.get_command(group)
    out = []

    def walk(c, path):
        out.append(path)
        for name, sub in (getattr(c, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(cmd, [])
    return out


def test_the_walk_reaches_groups_and_their_commands():
    paths = _commands()
    assert [] in paths and ["netem"] in paths and ["netem", "list"] in paths and ["run"] in paths


def test_help_lists_every_command_group():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for group in ("models", "netem", "monitor", "inspect", "split", "profile", "run", "cleanup", "report", "plan"):
        assert group in result.output


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(["testbed", *p]))
def test_every_command_and_group_has_help_with_an_example(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert re.search(r"examples?:\s+testbed ", result.output.lower()), f"testbed {' '.join(path)} --help has no example"


def test_testbed_error_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    result = CliRunner().invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in result.output


def test_debug_flag_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model at all")
    result = CliRunner().invoke(app, ["--debug", "inspect", str(bad)])
    assert result.exit_code == 1
    assert "Traceback" in result.output


def test_an_error_quoting_brackets_is_printed_literally_not_as_markup(tmp_path):
    # rich raised MarkupError (a traceback) on "[/x]" in a message, e.g. a path or a HOST:PORT
    result = CliRunner().invoke(app, ["netem", "validate", str(tmp_path / "[/x].yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "[/x].yaml" in lines[0]


def test_check_is_registered_with_an_example():
    result = CliRunner().invoke(app, ["check", "--help"])
    assert result.exit_code == 0 and "testbed check experiments/posenet_sweep.yaml" in result.output
