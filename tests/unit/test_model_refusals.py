"""What the model layer refuses, in one line naming the file and why (exit 1, nothing written),
and the split folder's rules: parts are only ever put where the testbed wrote parts before.

The refused models are written with the builder; the control-flow and variable ones
run in LiteRT (checked here), so the refusal is about what a split would break.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from testbed.cli import app
from testbed.errors import ModelError
from testbed.model import splitter, tflite
from testbed.model.graph import ModelGraph
from testbed.model.splitter import load_manifest, materialize, remove_parts, split_model
from testbed.model.verify import make_interpreter, verify_parts
from tests.unit import model_samples as samples

pytestmark = pytest.mark.unit


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _one_error_line(result, *needles) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _runs_in_litert(data: bytes) -> None:
    interp = make_interpreter(data, delegate=False)
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interp.invoke()


REFUSED = {
    "while": (samples.while_model, True, "control flow (WHILE) runs other subgraphs"),
    "if": (samples.if_model, True, "control flow (IF) runs other subgraphs"),
    "call_once": (samples.call_once_model, True, "control flow (CALL_ONCE)"),
    "var_handle": (samples.variable_ops_model, True, "stateful operator VAR_HANDLE"),
    "variable_tensor": (samples.variable_tensor_model, True, "variable tensor 'state'"),
    "no_inputs": (samples.no_inputs_model, True, "no inputs"),
    "no_outputs": (samples.no_outputs_model, True, "no outputs"),
    "no_operators": (samples.no_operators_model, True, "no operators"),
    "custom_not_utf8": (lambda: samples.custom_op_model(b"\xff\xfeBad"), False, "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_models(cli, tmp_path, name):
    make, valid, why = REFUSED[name]
    data = make()
    if valid:
        _runs_in_litert(data)  # LiteRT runs it whole: only a split would be wrong
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(data)
    for args in (["inspect", path], ["inspect", path, "--json"], ["split", path, "--all", "--out", tmp_path / "o"],
                 ["profile", path], ["models", "add", name, path]):
        _one_error_line(cli(*args), str(path), why)
    assert not (tmp_path / "o").exists()
    assert name not in {r["name"] for r in json.loads(cli("models", "list", "--json").output)}


def test_custom_op_listed_and_refused_by_verify_only(cli, tmp_path):
    path = tmp_path / "custom.tflite"
    path.write_bytes(samples.custom_op_model("TestbedNoSuchOp"))
    d = json.loads(cli("inspect", path, "--json").output)
    assert d["custom_ops"] == [{"name": "TestbedNoSuchOp", "layers": [1], "registered": False}]
    assert "custom op 'TestbedNoSuchOp' at layer(s) 1: NOT registered" in cli("inspect", path).output
    _one_error_line(cli("profile", path), "'TestbedNoSuchOp' not registered in this host's runtime")
    # --verify (the default) refuses: k, the part, the operator and why, in one line
    line = _one_error_line(cli("split", path, "--all", "--out", tmp_path / "o"),
                           "split point k=0", "tail part tail_00.tflite", "fails to load",
                           "operator 1 TestbedNoSuchOp (layer 1, output 'custom_out')",
                           "not registered in this runtime", "--no-verify")
    assert "https://" not in line
    assert not (tmp_path / "o").exists()
    # k=1 alone: the head (layer 0) runs, the tail holds the custom op
    _one_error_line(cli("split", path, "--at", 1, "--out", tmp_path / "o"), "split point k=1: tail part")
    # only k=3 (all on the device): the head holds it
    _one_error_line(cli("split", path, "--at", 3, "--out", tmp_path / "o"), "split point k=3: head part")
    # a node whose runtime registers the op can still get its parts
    result = cli("split", path, "--all", "--no-verify", "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert len(manifest["splits"]) == 4 and all(s["verify"] is None for s in manifest["splits"])
    assert [c["name"] for c in manifest["splits"][2]["cut"]] == ["custom_out"]
    with pytest.raises(ModelError, match="split point k=2: head part"):
        verify_parts(path, tmp_path / "o", [2])


def test_custom_op_the_runtime_registers_is_reported_as_registered(cli, tmp_path):
    # LiteRT's builtin resolver registers a few custom ops (detection post-processing)
    path = tmp_path / "detect.tflite"
    path.write_bytes(samples.custom_op_model("TFLite_Detection_PostProcess"))
    d = json.loads(cli("inspect", path, "--json").output)
    assert d["custom_ops"] == [{"name": "TFLite_Detection_PostProcess", "layers": [1], "registered": True}]


@pytest.mark.timeout(30)
def test_fifo_is_refused_without_blocking(cli, tmp_path):
    fifo = tmp_path / "model.fifo"
    os.mkfifo(fifo)
    for args in (["inspect", fifo], ["split", fifo, "--all", "--out", tmp_path / "o"], ["models", "add", "f", fifo]):
        _one_error_line(cli(*args), str(fifo), "not a regular file")


@pytest.mark.timeout(30)
def test_devices_and_directories_are_refused(cli, tmp_path):
    _one_error_line(cli("inspect", "/dev/zero"), "/dev/zero", "not a regular file")
    _one_error_line(cli("inspect", tmp_path), "not a regular file (a directory)")


def test_size_is_bounded_before_reading(cli, tmp_path, monkeypatch):
    big = tmp_path / "big.tflite"
    with open(big, "wb") as f:   # sparse: no disk used
        f.truncate(3 << 20)
    monkeypatch.setattr(tflite, "MAX_MODEL_BYTES", 2 << 20)
    read = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    _one_error_line(cli("inspect", big), str(big), f"{3 << 20} bytes is more than the {2 << 20}-byte limit")
    assert read == []


def test_a_file_growing_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.tflite"
    path.write_bytes(samples.dag_model())
    size = path.stat().st_size
    real_fstat = os.fstat

    class Shrunk:   # fstat says less than is there, as if a writer were still appending
        def __init__(self, st):
            self.st_mode, self.st_size = st.st_mode, size - 10

    monkeypatch.setattr(tflite.os, "fstat", lambda fd: Shrunk(real_fstat(fd)))
    with pytest.raises(ModelError, match="grew while it was read"):
        tflite.read_file(path)


# --------------------------------------------------------------------------- the --out folder

def test_out_dot_and_parents_are_refused(cli, tmp_path, monkeypatch):
    model = tmp_path / "dag.tflite"
    model.write_bytes(samples.dag_model())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", "./", str(work)):
        _one_error_line(cli("split", model, "--at", 1, "--out", out), "current directory")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["dag.tflite", "work"]


def test_out_replaces_only_an_earlier_split(cli, tmp_path):
    model = tmp_path / "dag.tflite"
    model.write_bytes(samples.dag_model())
    out = tmp_path / "parts"
    assert cli("split", model, "--at", 2, "--at", 4, "--out", out).exit_code == 0
    assert cli("split", model, "--at", 3, "--out", out).exit_code == 0      # replaces the earlier split
    assert sorted(p.name for p in out.iterdir()) == ["head_03.tflite", "manifest.json", "tail_03.tflite"]
    # anything else in it and it is not ours to delete
    for extra in ("notes.txt", "subdir", "head_09.tflite"):
        target = out / extra
        target.mkdir() if extra == "subdir" else target.write_text("mine")
        _one_error_line(cli("split", model, "--at", 1, "--out", out), str(out), extra, "did not write")
        assert target.exists()
        target.rmdir() if extra == "subdir" else target.unlink()
    # a part named in the manifest but replaced by a symlink is not ours either
    (out / "head_03.tflite").unlink()
    (out / "head_03.tflite").symlink_to(model)
    _one_error_line(cli("split", model, "--at", 1, "--out", out), "head_03.tflite")
    assert model.exists()
    (out / "head_03.tflite").unlink()
    # a manifest.json that is not a split manifest
    (out / "manifest.json").write_text("{}")
    _one_error_line(cli("split", model, "--at", 1, "--out", out), "not a split manifest")
    # a file, a symlinked folder
    _one_error_line(cli("split", model, "--at", 1, "--out", model), "not a folder")
    (tmp_path / "link").symlink_to(out)
    _one_error_line(cli("split", model, "--at", 1, "--out", tmp_path / "link"), "symbolic link")


def test_not_enough_space_is_refused_before_writing(tmp_path, monkeypatch):
    model = tmp_path / "dag.tflite"
    model.write_bytes(samples.dag_model())

    class Usage:
        free = 1000
    monkeypatch.setattr(splitter.shutil, "disk_usage", lambda p: Usage())
    with pytest.raises(ModelError, match=r"need about .* GB and only 0.00 GB is free"):
        split_model(model, [1, 2], tmp_path / "parts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dag.tflite"]


def test_size_warning_above_the_limit(cli, tmp_path, monkeypatch):
    model = tmp_path / "dag.tflite"
    model.write_bytes(samples.dag_model())
    graph = ModelGraph.from_file(model)
    total = splitter.estimate_bytes(graph, range(graph.num_layers + 1))
    monkeypatch.setattr(splitter, "WARN_BYTES", total - 1)
    from testbed.commands import model_tools
    monkeypatch.setattr(model_tools, "WARN_BYTES", total - 1)
    result = cli("split", model, "--all", "--out", tmp_path / "all")
    assert result.exit_code == 0
    assert "warning: 10 split points write about" in result.output and "--at K" in result.output
    result = cli("split", model, "--at", 4, "--out", tmp_path / "one")
    assert "warning:" not in result.output
    # the estimate is close to what is written
    written = sum(p.stat().st_size for p in (tmp_path / "all").glob("*.tflite"))
    assert 0.8 < total / written < 1.25


# --------------------------------------------------------------------------- materialize

def test_materialize_and_remove_parts(tmp_path):
    model = tmp_path / "fp16.tflite"
    model.write_bytes(samples.scheme_dag("float16"))
    folder = tmp_path / "run" / "parts"
    entries = materialize(model, [3, 7], folder)
    assert [e["k"] for e in entries] == [3, 7] and all(e["verify"]["exact"] for e in entries)
    assert sorted(p.name for p in folder.iterdir()) == ["head_03.tflite", "head_07.tflite", "manifest.json",
                                                        "tail_03.tflite", "tail_07.tflite"]
    before = (folder / "head_03.tflite").stat().st_mtime_ns
    # asking again for k=3 writes only what is missing
    again = materialize(model, [3, 0], folder, verify=False)
    assert [e["k"] for e in again] == [0, 3] and again[1] == entries[0]
    assert (folder / "head_03.tflite").stat().st_mtime_ns == before
    manifest = load_manifest(folder)
    assert [s["k"] for s in manifest["splits"]] == [0, 3, 7]
    assert manifest["model"]["folded_ops"] == 15
    # the same entries split_model writes, byte for byte the same parts
    full = split_model(model, [0, 3, 7], tmp_path / "full", verify=False)
    for a, b in zip(manifest["splits"], full["splits"]):
        assert {k: v for k, v in a.items() if k != "verify"} == {k: v for k, v in b.items() if k != "verify"}
    freed = remove_parts(folder, [3, 99])
    assert freed == entries[0]["head_bytes"] + entries[0]["tail_bytes"]
    assert [s["k"] for s in load_manifest(folder)["splits"]] == [0, 7]
    assert not (folder / "head_03.tflite").exists() and (folder / "tail_07.tflite").exists()
    # a hand-edited manifest cannot make remove_parts delete outside the folder
    outside = tmp_path / "keep.tflite"
    outside.write_bytes(b"x")
    edited = load_manifest(folder)
    edited["splits"][0]["tail"] = "../../keep.tflite"
    (folder / "manifest.json").write_text(json.dumps(edited))
    remove_parts(folder, [0])
    assert outside.exists()
    (folder / "tail_00.tflite").unlink()    # the part the edit orphaned
    # a split folder is still an earlier split: split_model may replace it
    split_model(model, [5], folder, verify=False)
    assert [s["k"] for s in load_manifest(folder)["splits"]] == [5]


def test_materialize_refuses_another_models_folder_and_foreign_files(tmp_path):
    a, b = tmp_path / "a.tflite", tmp_path / "b.tflite"
    a.write_bytes(samples.dag_model())
    b.write_bytes(samples.dag_model(seed=8))
    materialize(a, [1], tmp_path / "parts", verify=False)
    with pytest.raises(ModelError, match="holds parts of another model"):
        materialize(b, [1], tmp_path / "parts")
    (tmp_path / "parts" / "mine.txt").write_text("x")
    with pytest.raises(ModelError, match="mine.txt"):
        materialize(a, [2], tmp_path / "parts")


def test_materialize_failure_leaves_the_folder_as_it_was(tmp_path):
    model = tmp_path / "custom.tflite"
    model.write_bytes(samples.custom_op_model())
    folder = tmp_path / "parts"
    materialize(model, [1], folder, verify=False)
    before = sorted(p.name for p in folder.iterdir()), (folder / "manifest.json").read_text()
    with pytest.raises(ModelError, match="split point k=2"):
        materialize(model, [2], folder)
    assert (sorted(p.name for p in folder.iterdir()), (folder / "manifest.json").read_text()) == before


def test_a_split_that_runs_but_differs_is_kept_and_warned_about(cli, tmp_path, monkeypatch):
    model = tmp_path / "dag.tflite"
    model.write_bytes(samples.dag_model())
    real = splitter.verify_split

    def differs_at_3(graph, folder, entry, ref, **kw):
        result = real(graph, folder, entry, ref, **kw)
        return result | {"exact": False} if entry["k"] == 3 else result
    monkeypatch.setattr(splitter, "verify_split", differs_at_3)
    result = cli("split", model, "--at", 2, "--at", 3, "--out", tmp_path / "parts")
    assert result.exit_code == 0, result.output
    assert "warning: head then tail is not bitwise equal to the whole model at k=[3]" in result.output
    assert "runs, differs" in result.output and "runs, exact" in result.output
    assert [s["verify"]["exact"] for s in load_manifest(tmp_path / "parts")["splits"]] == [True, False]
