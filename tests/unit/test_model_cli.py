"""The model commands through typer's CliRunner: output, and bad input as one line + exit 1."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.model import tflite
from testbed.model.zoo import registry
from tests.unit.model_samples import DAG_LAYERS, dag_model

pytestmark = pytest.mark.unit


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])
    return invoke


def _one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_help_has_examples(cli):
    for cmd in (["inspect"], ["split"], ["profile"], ["models", "build"], ["models", "fetch"],
                ["models", "add"], ["models", "list"]):
        result = cli(*cmd, "--help")
        assert result.exit_code == 0 and "Example: testbed" in result.output, cmd


def test_inspect_json(cli, dag_path):
    result = cli("inspect", dag_path, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert len(d["layers"]) == DAG_LAYERS and [c["name"] for c in d["splits"][1]["cut"]] == ["y", "a"]


def test_inspect_table(cli, dag_path):
    result = cli("inspect", dag_path)
    assert result.exit_code == 0 and "CONCATENATION" in result.output and "split points" in result.output


def test_split_at_and_all(cli, dag_path, tmp_path):
    result = cli("split", dag_path, "--at", 3, "--at", 0, "--out", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert [s["k"] for s in manifest["splits"]] == [0, 3]
    assert json.loads((tmp_path / "p" / "manifest.json").read_text()) == manifest
    # re-splitting into the same directory replaces the earlier split
    result = cli("split", dag_path, "--all", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "p" / "manifest.json").read_text())["splits"]) == DAG_LAYERS + 1


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in ("in", "cache"))


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return d


def _write(path, data):
    path.write_bytes(data)
    return path


def _variant(mutate):
    model = tflite.parse(dag_model())
    mutate(model)
    return tflite.serialize(model)


def _dynamic(model):
    model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]].shapeSignature = [-1, 16, 16, 3]


def _two_subgraphs(model):
    model.subgraphs.append(copy.copy(model.subgraphs[0]))


BAD = {
    "text.tflite": (lambda: b"this is not a model at all\n", "not a TFLite file"),
    "empty.tflite": (lambda: b"", "not a TFLite file"),
    "ident.tflite": (lambda: dag_model()[:4] + b"XXXX" + dag_model()[8:], "file identifier"),
    "truncated.tflite": (lambda: dag_model()[:2000], "truncated"),
    "truncated_late.tflite": (lambda: dag_model()[:-40], "truncated"),
    "dynamic.tflite": (lambda: _variant(_dynamic), "dynamic shape"),
    "two_subgraphs.tflite": (lambda: _variant(_two_subgraphs), "2 subgraphs"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_models(cli, tmp_path, inputs, name):
    make, what = BAD[name]
    path = _write(inputs / name, make())
    for args in (["inspect", path], ["split", path, "--all", "--out", tmp_path / "out"], ["profile", path]):
        _one_error_line(cli(*args), str(path), what)
    assert _leftovers(tmp_path) == []


def test_k_out_of_range_leaves_nothing(cli, dag_path, tmp_path):
    line = _one_error_line(cli("split", dag_path, "--at", 2, "--at", DAG_LAYERS + 1, "--out", tmp_path / "o"),
                           str(dag_path), f"k={DAG_LAYERS + 1}", f"0..{DAG_LAYERS}")
    assert "out of range" in line
    _one_error_line(cli("split", dag_path, "--at", -1, "--out", tmp_path / "o"), "out of range")
    assert _leftovers(tmp_path) == []


def test_split_needs_at_or_all(cli, dag_path, tmp_path):
    _one_error_line(cli("split", dag_path, "--out", tmp_path / "o"), "--at")
    assert _leftovers(tmp_path) == []


def test_split_refuses_foreign_directory(cli, dag_path, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    _one_error_line(cli("split", dag_path, "--all", "--out", tmp_path / "o"), "not an empty or earlier split")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["notes.txt"]


def test_missing_file(cli, tmp_path):
    _one_error_line(cli("inspect", tmp_path / "nope.tflite"), "nope.tflite", "cannot read")


def test_models_build_same_bytes(cli, tmp_path, posenet_bytes):
    result = cli("models", "build", "posenet", "--out", tmp_path / "p.tflite", "--seed", 0)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.tflite").read_bytes() == posenet_bytes
    assert hashlib.sha256(posenet_bytes).hexdigest() in result.output


def test_fetch_without_network_says_how_to_add_by_hand(cli, tmp_path, monkeypatch):
    # Loopback port 9 (discard) refuses the connection, as a machine without network would;
    # the test never sends traffic off this host.
    official = registry.OFFICIAL["posenet"]
    monkeypatch.setitem(registry.OFFICIAL, "posenet",
                        registry.Official("http://127.0.0.1:9/posenet.tflite", official.sha256, official.file_name))
    line = _one_error_line(cli("models", "fetch", "posenet", "--dest", tmp_path / "dl"),
                           "http://127.0.0.1:9/posenet.tflite", "testbed models add posenet PATH")
    assert line.startswith("error: cannot download")
    assert list((tmp_path / "dl").iterdir()) == []  # no partial download left


def test_official_url_is_tensorflow_storage():
    assert registry.OFFICIAL["posenet"].url == (
        "https://storage.googleapis.com/download.tensorflow.org/models/tflite/"
        "posenet_mobilenet_v1_100_257x257_multi_kpt_stripped.tflite")


def test_models_add_and_list(cli, dag_path, inputs):
    result = cli("models", "add", "dag", dag_path)
    assert result.exit_code == 0, result.output
    rows = json.loads(cli("models", "list", "--json").output)
    by_name = {r["name"]: r for r in rows}
    assert by_name["posenet"]["source"].startswith("builtin")
    assert by_name["dag"]["sha256"] == hashlib.sha256(dag_path.read_bytes()).hexdigest()
    assert by_name["dag"]["bytes"] == dag_path.stat().st_size
    bad = _write(inputs / "junk.tflite", b"junk junk junk")
    _one_error_line(cli("models", "add", "junk", bad), "junk.tflite", "not a TFLite file")
    assert "junk" not in {r["name"] for r in json.loads(cli("models", "list", "--json").output)}
