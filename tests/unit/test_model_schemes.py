"""Every quantization scheme TFLite produces, split at every point, bitwise equal to the whole model.

The models come from ``builder.Net`` (tests/unit/model_samples.scheme_dag: two inputs,
residual skips, a concatenation, an early output, a constant operand and shape
arithmetic on constants). Each scheme is checked twice: that the builder really wrote
that scheme (tensor types, per-channel scales, zero points, edge ops), and that every
split runs head -> tail, fed only the cut, to the whole model's outputs bit for bit,
with LiteRT's default delegate (XNNPACK) and with builtin kernels only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb
from typer.testing import CliRunner

from nodes import runtime
from testbed.cli import app
from testbed.errors import ModelError
from testbed.model import tflite
from testbed.model.builder import SCHEMES
from testbed.model.graph import ModelGraph
from testbed.model.layers import one_layer_models
from testbed.model.splitter import split_model
from testbed.model.verify import make_interpreter, verify_parts
from testbed.model.zoo.posenet import build_posenet
from tests.unit.model_samples import SCHEME_DAG_LAYERS, scheme_dag

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", params=SCHEMES)
def scheme_model(request, tmp_path_factory):
    """(scheme, model path, manifest of a split at every point without verification)."""
    d = tmp_path_factory.mktemp(request.param)
    path = d / f"dag_{request.param}.tflite"
    path.write_bytes(scheme_dag(request.param))
    graph = ModelGraph.from_file(path)
    return request.param, path, split_model(path, range(graph.num_layers + 1), d / "parts", verify=False)


def _run(path_or_bytes, feed, delegate):
    interp = make_interpreter(path_or_bytes, delegate)
    interp.allocate_tensors()
    return runtime.run(interp, feed)


def _ops(model: fb.ModelT) -> list[str]:
    return [tflite.op_name(model, op.opcodeIndex) for op in model.subgraphs[0].operators]


@pytest.mark.parametrize("delegate", [True, False], ids=["xnnpack", "no-delegate"])
def test_every_split_is_bitwise_exact(scheme_model, delegate):
    scheme, path, manifest = scheme_model
    parts = path.parent / "parts"
    whole = make_interpreter(path, delegate)
    whole.allocate_tensors()
    feed = runtime.random_inputs(whole, seed=5)
    expected = runtime.run(whole, feed)
    assert all(np.std(v.astype(np.float64)) > 0 for v in expected.values()), "degenerate outputs"
    for split in manifest["splits"]:
        cut = [c["name"] for c in split["cut"]]
        values = dict(feed)
        if split["head"]:
            values.update(_run(parts / split["head"], values, delegate))
        if split["tail"]:
            crossing = {n: values[n] for n in cut}          # the tail sees only what crossed the link
            values = crossing | _run(parts / split["tail"], crossing, delegate)
        for name, value in expected.items():
            assert values[name].dtype == value.dtype and values[name].tobytes() == value.tobytes(), \
                f"{scheme} k={split['k']}: {name} differs"


def test_verify_reports_every_split_exact(scheme_model):
    scheme, path, manifest = scheme_model
    for delegate in (True, False):
        results = verify_parts(path, path.parent / "parts", delegate=delegate)
        assert sorted(results) == [s["k"] for s in manifest["splits"]]
        assert all(r["exact"] is True for r in results.values()), (scheme, delegate)


def test_no_cut_tensor_is_a_weight(scheme_model):
    scheme, path, manifest = scheme_model
    g = ModelGraph.from_file(path)
    activations = {t.name for t in g.inputs} | {o for la in g.layers for o in la.outputs}
    for split in manifest["splits"]:
        assert {c["name"] for c in split["cut"]} <= activations, (scheme, split["k"])
        assert not any(c["name"].endswith("/dequantize") or c["name"].startswith("shape/")
                       for c in split["cut"])


def _tensors(path) -> dict[str, fb.TensorT]:
    model = tflite.read(path)[0]
    return {tflite.tensor_name(t): t for t in model.subgraphs[0].tensors}


def _q(t: fb.TensorT) -> tuple[list[float], list[int], int]:
    q = t.quantization
    return list(q.scale), list(q.zeroPoint), q.quantizedDimension


def test_builder_writes_float16_as_the_converter_does(tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(scheme_dag("float16"))
    t = _tensors(path)
    model = tflite.read(path)[0]
    # every float weight is a float16 buffer read by a DEQUANTIZE (version 3) to float32
    for name in ("c0/w", "c0/b", "dw/w", "fc/w", "bias_base", "bias_gain"):
        assert tflite.dtype_name(t[name].type) == "float16"
        assert tflite.dtype_name(t[f"{name}/dequantize"].type) == "float32"
    assert _ops(model).count("DEQUANTIZE") == 12 and _ops(model).count("MUL") == 2
    assert all(c.version == 3 for c in model.operatorCodes
               if tflite.op_name(model, model.operatorCodes.index(c)) == "DEQUANTIZE")
    assert tflite.dtype_name(t["a"].type) == "float32" and t["a"].quantization is None


def test_builder_writes_dynamic_range_with_hybrid_weights(tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(scheme_dag("dynamic"))
    t = _tensors(path)
    # conv and depthwise weights: int8, one scale per output channel, zero point 0
    scale, zp, axis = _q(t["c2/w"])
    assert tflite.dtype_name(t["c2/w"].type) == "int8" and len(scale) == 8 and zp == [0] * 8 and axis == 0
    scale, zp, axis = _q(t["dw/w"])
    assert len(scale) == 8 and axis == 3
    # biases and activations stay float: LiteRT runs hybrid kernels
    assert tflite.dtype_name(t["c2/b"].type) == "float32"
    assert tflite.dtype_name(t["c"].type) == "float32" and t["c"].quantization is None
    # float constants read by ops without a hybrid kernel: int8 + DEQUANTIZE (then a MUL)
    assert tflite.dtype_name(t["bias_base"].type) == "int8" and "bias_base/dequantize" in t
    assert tflite.dtype_name(t["bias_map"].type) == "float32"


@pytest.mark.parametrize("scheme,act,bias,io", [("int8", "int8", "int32", "float32"),
                                                ("uint8", "int8", "int32", "uint8"),
                                                ("int16x8", "int16", "int64", "float32")])
def test_builder_writes_full_integer_schemes(tmp_path, scheme, act, bias, io):
    path = tmp_path / "m.tflite"
    path.write_bytes(scheme_dag(scheme))
    t = _tensors(path)
    g = ModelGraph.from_file(path)
    assert [x.dtype for x in g.inputs] == [io, io] and [x.dtype for x in g.outputs] == [io, io]
    # QUANTIZE at every input, DEQUANTIZE (or a requantize to uint8) at every output
    assert [la.op for la in g.layers[:2]] == ["QUANTIZE", "QUANTIZE"]
    assert g.layers[-1].op == ("QUANTIZE" if scheme == "uint8" else "DEQUANTIZE")
    assert tflite.dtype_name(t["x_q"].type) == act and tflite.dtype_name(t["c"].type) == act
    scale, zp, axis = _q(t["c2/w"])
    assert tflite.dtype_name(t["c2/w"].type) == "int8" and len(scale) == 8 and zp == [0] * 8 and axis == 0
    bscale, bzp, _ = _q(t["c2/b"])
    assert tflite.dtype_name(t["c2/b"].type) == bias and bzp == [0] * 8
    # bias scale = input scale x weight scale, channel by channel
    assert np.allclose(bscale, np.array(scale) * _q(t["res1"])[0][0])
    # concatenation keeps one scale and zero point for its inputs and output
    assert _q(t["e"])[:2] == _q(t["a_down"])[:2] == _q(t["cat"])[:2]
    if act == "int16":
        assert all(_q(t[n])[1] == [0] for n in ("x_q", "a", "res1", "cat", "logits_q"))
    if scheme == "uint8":
        assert _q(t["x"])[0] == _q(t["x_q"])[0] and _q(t["x"])[1][0] == _q(t["x_q"])[1][0] + 128


def test_float16_dequantize_is_folded_not_a_layer(tmp_path):
    path = tmp_path / "fp16.tflite"
    path.write_bytes(scheme_dag("float16"))
    g = ModelGraph.from_file(path)
    # 12 float16 DEQUANTIZE, the MUL of the bias map, the ADD and MUL computing the reshape's shape
    assert g.num_operators == SCHEME_DAG_LAYERS + 15 and len(g.folded) == 15
    assert g.num_layers == SCHEME_DAG_LAYERS
    assert "DEQUANTIZE" not in [la.op for la in g.layers]
    conv = g.layers[0]
    assert conv.op == "CONV_2D" and conv.folded_ops == 2         # weight and bias DEQUANTIZE
    assert conv.params == 8 * 27 + 8 and conv.param_bytes == 2 * (8 * 27 + 8)   # float16 bytes
    biased = g.layers[7]     # its constant operand: DEQUANTIZE, DEQUANTIZE -> MUL, a chain of 3
    assert biased.op == "ADD" and biased.folded_ops == 3 and biased.inputs == ["cat"]
    assert biased.params == 1024 and biased.param_bytes == 2 * (1024 + 16)
    reshape = g.layers[8]
    assert reshape.op == "RESHAPE" and reshape.folded_ops == 2 and reshape.inputs == ["cat_biased"]


def test_parts_carry_the_constant_ops_of_their_layers(tmp_path):
    path = tmp_path / "fp16.tflite"
    path.write_bytes(scheme_dag("float16"))
    g = ModelGraph.from_file(path)
    manifest = split_model(path, range(g.num_layers + 1), tmp_path / "parts", verify=False)
    for split in manifest["splits"]:
        for side in ("head", "tail"):
            if not split[side]:
                continue
            model = tflite.read(tmp_path / "parts" / split[side])[0]
            sg = model.subgraphs[0]
            ops = _ops(model)
            readers = {t for op in sg.operators for t in op.inputs}
            for op, name in zip(sg.operators, ops):
                if name == "DEQUANTIZE":
                    # its input is a constant buffer in this part, its output read in this part
                    assert model.buffers[sg.tensors[op.inputs[0]].buffer].data is not None
                    assert op.outputs[0] in readers and op.outputs[0] not in sg.outputs
    # the long head holds every weight (each read once) and every constant operator
    last = tflite.read(tmp_path / "parts" / manifest["splits"][-1]["head"])[0]
    assert _ops(last).count("DEQUANTIZE") == 12 and len(_ops(last)) == g.num_operators
    # the tail from k=7 holds the ADD's chain and the shape chain, not the convs' DEQUANTIZE
    tail = tflite.read(tmp_path / "parts" / manifest["splits"][7]["tail"])[0]
    assert sorted(_ops(tail)) == sorted(["DEQUANTIZE"] * 4 + ["MUL", "ADD", "MUL", "ADD", "RESHAPE",
                                                                 "FULLY_CONNECTED"])


def test_constant_ops_listed_first_still_split_exactly(tmp_path):
    """Converters often list every DEQUANTIZE before the first convolution."""
    model = tflite.parse(scheme_dag("float16"))
    g = ModelGraph(model)
    sg = model.subgraphs[0]
    order = g.folded + g.layer_ops
    sg.operators = [sg.operators[i] for i in order]
    path = tmp_path / "first.tflite"
    path.write_bytes(tflite.serialize(model))
    g2 = ModelGraph.from_file(path)
    assert [la.op for la in g2.layers] == [la.op for la in g.layers] and len(g2.folded) == 15
    manifest = split_model(path, range(g2.num_layers + 1), tmp_path / "parts")
    assert all(s["verify"]["exact"] for s in manifest["splits"])


def test_without_folding_the_split_fails_and_verify_names_it(tmp_path):
    """What issue 16 reported: a split point between a DEQUANTIZE and its convolution
    gives the convolution a non-constant filter and XNNPACK refuses the part."""
    path = tmp_path / "fp16.tflite"
    path.write_bytes(scheme_dag("float16"))
    unfolded = ModelGraph.from_file(path, fold_constants=False)
    assert unfolded.num_layers == SCHEME_DAG_LAYERS + 15 and unfolded.layers[0].op == "DEQUANTIZE"
    with pytest.raises(ModelError) as err:
        split_model(unfolded, range(unfolded.num_layers + 1), tmp_path / "parts")
    msg = str(err.value)
    # the first split point puts c0's DEQUANTIZE in the head, its output a model output
    assert "split point k=1: head part head_01.tflite fails to invoke" in msg and "\n" not in msg
    assert "operator 0 DEQUANTIZE (layer 0, output 'c0/w/dequantize'), inside the TfLiteXNNPackDelegate" in msg
    assert str(tmp_path / "parts") in msg and ".tmp" not in msg
    assert not (tmp_path / "parts").exists()


def test_one_layer_models_carry_their_constant_ops(tmp_path):
    path = tmp_path / "fp16.tflite"
    path.write_bytes(scheme_dag("float16"))
    g = ModelGraph.from_file(path)
    models = one_layer_models(g)
    assert len(models) == g.num_layers
    first = tflite.parse(models[0])
    assert _ops(first) == ["DEQUANTIZE", "DEQUANTIZE", "CONV_2D"]
    # chained one-layer models reproduce the whole model (default delegate)
    whole = make_interpreter(path)
    whole.allocate_tensors()
    feed = runtime.random_inputs(whole, seed=2)
    expected = runtime.run(whole, feed)
    values = dict(feed)
    for layer, blob in zip(g.layers, models):
        interp = make_interpreter(blob)
        interp.allocate_tensors()
        assert list(runtime.input_details(interp)) == layer.inputs
        values.update(runtime.run(interp, values))
    for name, value in expected.items():
        assert values[name].tobytes() == value.tobytes(), name


@pytest.fixture(scope="module")
def posenet_fp16(tmp_path_factory):
    path = tmp_path_factory.mktemp("posenet_fp16") / "posenet_fp16.tflite"
    path.write_bytes(build_posenet(0, "float16"))
    return path


def test_posenet_float16_keeps_31_layers(posenet_fp16, posenet_path):
    g, g32 = ModelGraph.from_file(posenet_fp16), ModelGraph.from_file(posenet_path)
    assert g.num_layers == 31 and len(g.folded) == 62 and g.num_operators == 93
    assert [la.op for la in g.layers] == [la.op for la in g32.layers]
    assert [la.params for la in g.layers] == [la.params for la in g32.layers]
    assert sum(la.param_bytes for la in g.layers) * 2 == sum(la.param_bytes for la in g32.layers)
    assert [[t.name for t in g.cut(k)] for k in range(32)] == [[t.name for t in g32.cut(k)] for k in range(32)]


def test_posenet_float16_splits_exactly(posenet_fp16, tmp_path):
    manifest = split_model(posenet_fp16, [0, 1, 2, 15, 27, 30, 31], tmp_path / "parts")
    assert manifest["model"]["layers"] == 31 and manifest["model"]["folded_ops"] == 62
    assert all(s["verify"]["exact"] is True for s in manifest["splits"])
    size = posenet_fp16.stat().st_size
    for s in manifest["splits"]:   # every weight has one reader: nothing duplicated
        assert size * 0.99 < s["head_bytes"] + s["tail_bytes"] < size * 1.01


# --------------------------------------------------------------------------- CLI, end to end

@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_float16_model_end_to_end_through_the_registry(cli, tmp_path):
    src = tmp_path / "fp16_dag.tflite"
    src.write_bytes(scheme_dag("float16"))
    assert cli("models", "add", "dag16", src).exit_code == 0
    rows = {r["name"]: r for r in json.loads(cli("models", "list", "--json").output)}
    registered = rows["dag16"]["path"]
    d = json.loads(cli("inspect", registered, "--json").output)
    assert d["model"]["folded_ops"] == 15 and d["model"]["layers"] == SCHEME_DAG_LAYERS
    assert "DEQUANTIZE" not in [la["op"] for la in d["layers"]]
    text = cli("inspect", registered).output
    assert "15 constant ops folded" in text
    result = cli("split", registered, "--at", 1, "--at", 5, "--at", 9, "--out", tmp_path / "parts", "--json")
    assert result.exit_code == 0, result.output
    assert [s["verify"]["exact"] for s in json.loads(result.output)["splits"]] == [True, True, True]
    result = cli("profile", registered, "--runs", 3, "--warmup", 1, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    prof = json.loads(result.output)
    assert [r["op"] for r in prof["layers"]] == [la["op"] for la in d["layers"]]   # computing layers only
    assert prof["model"]["folded_ops"] == 15 and all(r["mean_s"] > 0 for r in prof["layers"])


def test_models_build_schemes(cli, tmp_path):
    result = cli("models", "build", "posenet", "--scheme", "int8", "--out", tmp_path / "p8.tflite")
    assert result.exit_code == 0, result.output
    g = ModelGraph.from_file(tmp_path / "p8.tflite")
    assert g.num_layers == 36 and [la.op for la in g.layers][0] == "QUANTIZE"
    bad = cli("models", "build", "posenet", "--scheme", "int4", "--out", tmp_path / "x.tflite")
    assert bad.exit_code == 1 and "unknown quantization scheme 'int4'" in bad.output
    assert not (tmp_path / "x.tflite").exists()
