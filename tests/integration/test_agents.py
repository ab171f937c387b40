"""Two real agents (subprocesses on loopback) running a really split model.

The model is a small DAG built with the model layer's builder (a conv chain plus an
early output that a later layer also reads) and split with the real splitter, so the
join between the model layer and the node agent is what is tested. Loopback only; no
shaping here (that is the sweep's integration tests).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nodes import protocol as P
from testbed.deploy.agent_client import AgentClient
from testbed.errors import NodeError, ProtocolError
from tests.integration.agentproc import AgentProc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TIMING_KEYS = ("head_s", "encode_s", "uplink_s", "remote_decode_s", "tail_s",
               "remote_encode_s", "downlink_s", "decode_s", "e2e_s")


def build_model() -> bytes:
    """image[1,16,16,3] -> conv s2 -> dw -> early (model output) ; -> p ; heat = p + early."""
    from testbed.model.builder import ModelBuilder
    rng = np.random.default_rng(7)
    w = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    b = ModelBuilder()
    x = b.input("image", (1, 16, 16, 3))
    c1 = b.conv2d(x, b.const("c1/w", w(8, 3, 3, 3)), b.const("c1/b", w(8)), "c1", (1, 8, 8, 8),
                  stride=2, act="relu6")
    c2 = b.depthwise(c1, b.const("c2/w", w(1, 3, 3, 8)), b.const("c2/b", w(8)), "c2", (1, 8, 8, 8),
                     act="relu6")
    early = b.conv2d(c2, b.const("e/w", w(4, 1, 1, 8)), b.const("e/b", w(4)), "early", (1, 8, 8, 4))
    p = b.conv2d(c2, b.const("p/w", w(4, 1, 1, 8)), b.const("p/b", w(4)), "p", (1, 8, 8, 4))
    heat = b.add(p, early, "heat", (1, 8, 8, 4))
    b.output(early)
    b.output(heat)
    return b.build()


N_LAYERS = 5
OUTPUT_NAMES = ["early", "heat"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from testbed.model.splitter import split_model
    d = tmp_path_factory.mktemp("model")
    path = d / "dag.tflite"
    path.write_bytes(build_model())
    manifest = split_model(path, list(range(N_LAYERS + 1)), d / "parts")
    return path, d / "parts", manifest


def reference(path: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], image)
    it.invoke()
    return {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    token = secrets.token_hex(16)
    local = AgentProc("local", tmp_path_factory.mktemp("local"), token)
    try:
        remote = AgentProc("remote", tmp_path_factory.mktemp("remote"), token)
    except Exception:
        local.stop()
        raise
    try:
        info = local.client.connect_peer(*remote.info["data"])
        assert info == {"peer": "remote", "clock_shared": True}
        yield local, remote, token
    finally:
        local.stop()
        remote.stop()
        assert local.proc.returncode == 0 and remote.proc.returncode == 0


def load_split(local: AgentProc, remote: AgentProc, parts: Path, split: dict) -> dict | None:
    """Tail straight onto the remote; head delivered remote -> local over the data plane."""
    def blob(name):
        return (parts / name).read_bytes() if name else None
    remote.client.load_part("tail", blob(split["tail"]), split["tail_sha256"])
    if split["head"] is None:
        local.client.load_part("head", None)
        return None
    return remote.client.deliver_part(local.client, blob(split["head"]), split["head_sha256"])


def image() -> np.ndarray:
    return np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("k", range(N_LAYERS + 1))
def test_split_outputs_equal_unsplit(agents, model, k):
    local, remote, _ = agents
    path, parts, manifest = model
    split = next(s for s in manifest["splits"] if s["k"] == k)
    delivery = load_split(local, remote, parts, split)
    if k > 0:
        assert delivery["bytes"] == split["head_bytes"] and delivery["delivery_s"] > 0
        assert delivery["clock"] == "shared"
    img = image()
    rows = local.client.run(3, warmup=1, inputs={"image": img}, model_outputs=OUTPUT_NAMES)
    assert [r["sample"] for r in rows] == [0, 1, 2]
    out = local.client.outputs()
    ref = reference(path, img)
    assert sorted(out) == sorted(ref)
    for name in ref:  # bitwise: a split must not change a single bit
        np.testing.assert_array_equal(out[name], ref[name])
    cut_bytes = sum(c["bytes"] for c in split["cut"])
    for r in rows:
        assert r["clock"] == "shared"
        parts_sum = sum(r[key] for key in TIMING_KEYS if key != "e2e_s")
        assert r["e2e_s"] >= parts_sum > 0
        assert r["cut_bytes_raw"] == cut_bytes
        if k == N_LAYERS:  # device anchor: nothing crosses the link
            assert r["cut_bytes_wire"] == 0 and r["uplink_s"] == r["downlink_s"] == r["tail_s"] == 0
        else:
            assert r["cut_bytes_wire"] == cut_bytes
            assert r["uplink_s"] > 0 and r["downlink_s"] > 0 and r["tail_s"] > 0
            assert r["uplink_bytes"] > cut_bytes
        if k == 0:  # network anchor: the input crosses, nothing runs locally
            assert r["head_s"] == 0


@pytest.mark.parametrize("encoding", ["png", "jpeg"])
def test_network_anchor_with_image_encoding(agents, model, encoding):
    local, remote, _ = agents
    path, parts, manifest = model
    load_split(local, remote, parts, manifest["splits"][0])
    # a smooth image: what a camera gives, and what JPEG is for
    yy, xx = np.mgrid[0:16, 0:16]
    u8 = np.stack([xx * 16, yy * 16, (xx + yy) * 8], axis=-1)[None].astype(np.uint8)
    img = u8.astype(np.float32) / 127.5 - 1.0
    rows = local.client.run(2, inputs={"image": img}, input_encoding=encoding,
                            model_outputs=OUTPUT_NAMES)
    assert all(r["codec"] == encoding and r["encode_s"] > 0 for r in rows)
    assert rows[0]["cut_bytes_raw"] == img.nbytes
    assert 0 < rows[0]["cut_bytes_wire"] < img.nbytes
    out, ref = local.client.outputs(), reference(path, img)
    tol = 0.02 if encoding == "png" else 0.5
    np.testing.assert_allclose(out["heat"], ref["heat"], atol=tol)


def test_derived_clock(agents, model):
    local, remote, _ = agents
    path, parts, manifest = model
    split = manifest["splits"][2]
    remote.client.load_part("tail", (parts / split["tail"]).read_bytes(), split["tail_sha256"])
    head = (parts / split["head"]).read_bytes()
    timing = remote.client.deliver_part(local.client, head, split["head_sha256"], clock_shared=False)
    assert timing["clock"] == "derived" and timing["bytes"] == len(head)
    assert -0.005 < timing["delivery_s"] <= timing["request_to_loaded_s"] + 0.005
    rows = local.client.run(3, inputs={"image": image()}, clock_shared=False,
                            model_outputs=OUTPUT_NAMES)
    for r in rows:
        assert r["clock"] == "derived"
        # the offset estimate on one host is within the fastest ping's round trip
        assert -0.005 < r["uplink_s"] < 1 and -0.005 < r["downlink_s"] < 1
        assert r["e2e_s"] > r["head_s"] + r["tail_s"]


def test_load_part_refuses_sha_mismatch(agents, model):
    local, _, _ = agents
    path, parts, manifest = model
    split = manifest["splits"][2]
    data = (parts / split["tail"]).read_bytes()
    with pytest.raises(NodeError, match="sha256"):
        local.client.load_part("tail", data, "0" * 64)
    assert "tail" not in local.client.health()["parts"]


def test_request_without_token_refused(agents):
    local, _, _ = agents
    host, port = local.info["control"]
    bad = AgentClient(host, port, token="not-the-token", node_name="local")
    with pytest.raises(ProtocolError, match="token"):
        bad.health()
    with socket.create_connection((host, port), timeout=5) as s:  # no token field at all
        P.send_frame(s, {"op": "health", "args": {}})
        reply = P.recv_frame(s).header
        assert reply["ok"] is False and reply["kind"] == "protocol"
    with socket.create_connection((host, port), timeout=5) as s:  # not even a frame
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = P.recv_frame(s).header
        assert reply["ok"] is False and "bad magic" in reply["error"]
    assert local.client.health()["name"] == "local"  # still serving


def test_garbage_on_data_port_does_not_kill_agent(agents, model):
    local, remote, token = agents
    host, port = remote.info["data"]
    for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096),
                 P.pack_header({"kind": "hello", "nonce": "00" * 32}, 0)  # then a bad frame
                 + P.PREFIX.pack(P.MAGIC, 5, 0) + b"{oops"):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    with socket.create_connection((host, port), timeout=5) as s:  # the old token hello
        P.send_frame(s, {"kind": "hello", "token": token})
        assert "nonce" in P.recv_frame(s).header["error"]
    with socket.create_connection((host, port), timeout=5) as s:  # a wrong proof
        P.send_frame(s, {"kind": "hello", "nonce": "00" * 32})
        assert P.recv_frame(s).header["kind"] == "challenge"
        P.send_frame(s, {"kind": "auth", "proof": "0" * 64})
        assert "token" in P.recv_frame(s).header["error"]
    # the established link still works end to end
    path, parts, manifest = model
    load_split(local, remote, parts, manifest["splits"][1])
    rows = local.client.run(1, inputs={"image": image()}, model_outputs=OUTPUT_NAMES)
    assert rows[0]["tail_s"] > 0
    assert remote.proc.poll() is None


def test_agent_metrics_exposed(agents):
    import urllib.request
    local, remote, _ = agents
    host, port = local.info["metrics"]
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    assert 'testbed_agent_info{node="local"} 1.0' in text
    assert "process_resident_memory_bytes" in text and "process_open_fds" in text
    served = [ln for ln in text.splitlines()
              if ln.startswith('testbed_agent_samples_served_total{node="local",role="local"}')]
    assert served and float(served[0].split()[-1]) >= 3
    assert 'testbed_agent_inference_seconds_count{node="local",part="head"}' in text


def test_kpis_and_layers_on_node(agents, model):
    """KPIs in a fresh process and per-layer latency, through the model layer's benchmark."""
    local, remote, _ = agents
    path, parts, manifest = model
    load_split(local, remote, parts, manifest["splits"][3])
    k = local.client.kpis("head", runs=3, warmup=1)
    for key in ("init_s", "first_s", "steady_mean_s", "peak_memory_bytes"):
        assert k[key] > 0
    from testbed.model.layers import one_layer_models
    layers = remote.client.profile_layers(one_layer_models(path), runs=3, warmup=1)
    assert len(layers) == N_LAYERS and all(row["mean_s"] > 0 for row in layers)


def test_no_peer_and_unknown_op_are_node_errors(agents):
    local, _, _ = agents
    with pytest.raises(NodeError, match="unknown operation"):
        local.client.call("format_disk")
    with pytest.raises(NodeError, match="role"):
        local.client.load_part("middle", b"x", hashlib.sha256(b"x").hexdigest())


@pytest.fixture(scope="module")
def posenet(tmp_path_factory):
    from testbed.model.splitter import split_model
    from testbed.model.zoo.posenet import build_posenet
    d = tmp_path_factory.mktemp("posenet")
    path = d / "posenet.tflite"
    path.write_bytes(build_posenet(0))
    return path, d / "parts", split_model(path, [0, 12, 31], d / "parts")


@pytest.mark.parametrize("k", [0, 12, 31])
def test_posenet_split_bitwise_equal(agents, posenet, k):
    """The built-in PoseNet (31 layers) across the two agents: the anchors and a middle cut."""
    local, remote, _ = agents
    path, parts, manifest = posenet
    split = next(s for s in manifest["splits"] if s["k"] == k)
    load_split(local, remote, parts, split)
    img = np.random.default_rng(5).uniform(-1, 1, (1, 257, 257, 3)).astype(np.float32)
    rows = local.client.run(1, inputs={"sub_2": img})
    out, ref = local.client.outputs(), reference(path, img)
    assert sorted(out) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(out[name], ref[name])
    assert rows[0]["cut_bytes_raw"] == sum(c["bytes"] for c in split["cut"])


def test_lost_data_link_is_reported_and_reconnect_recovers(agents, model, tmp_path):
    local, remote, token = agents
    path, parts, manifest = model
    doomed = AgentProc("doomed", tmp_path, token)
    try:
        split = manifest["splits"][2]
        doomed.client.load_part("tail", (parts / split["tail"]).read_bytes(), split["tail_sha256"])
        local.client.connect_peer(*doomed.info["data"])
        doomed.proc.kill()
        doomed.proc.wait(10)
        with pytest.raises(NodeError, match="connect_peer again|peer"):
            local.client.run(1, inputs={"image": image()}, model_outputs=OUTPUT_NAMES)
        assert local.client.health()["peer"] is False
    finally:
        doomed.stop()
        local.client.connect_peer(*remote.info["data"])
    load_split(local, remote, parts, manifest["splits"][2])
    assert local.client.run(1, inputs={"image": image()}, model_outputs=OUTPUT_NAMES)[0]["tail_s"] > 0


def test_agent_refuses_to_start_without_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TESTBED_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "nodes.agent", "--name", "x", "--control-listen", "127.0.0.1:0",
         "--data-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--workdir", str(tmp_path)],
        env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "TESTBED_TOKEN" in proc.stderr
    assert not (tmp_path / "agent.json").exists()


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    """The model layer's DAG test model: two inputs (one read only after layer 0),
    residuals, a long skip, a concatenation and an early output that is read later."""
    from testbed.model.graph import ModelGraph
    from testbed.model.splitter import split_model
    from tests.unit.model_samples import dag_model
    d = tmp_path_factory.mktemp("dag")
    path = d / "dag.tflite"
    path.write_bytes(dag_model())
    graph = ModelGraph.from_file(path)
    ks = list(range(graph.num_layers + 1))
    return path, d / "parts", split_model(path, ks, d / "parts"), [t.name for t in graph.outputs]


def test_dag_every_split_bitwise_equal(agents, dag):
    local, remote, _ = agents
    path, parts, manifest, outputs = dag
    rng = np.random.default_rng(11)
    feed = {"x": rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32),
            "y": rng.uniform(-1, 1, (1, 16, 16, 8)).astype(np.float32)}
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], feed[d["name"]])
    it.invoke()
    ref = {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}
    local.client.set_inputs(feed)
    for split in manifest["splits"]:
        load_split(local, remote, parts, split)
        rows = local.client.run(1, model_outputs=outputs)
        out = local.client.outputs()
        assert sorted(out) == sorted(ref), split["k"]
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name], err_msg=f"k={split['k']} {name}")
        assert rows[0]["cut_bytes_raw"] == sum(c["bytes"] for c in split["cut"]), split["k"]


def test_many_samples_in_one_run(agents, model):
    """One run of 600 samples: the reply's rows (~300 KB of JSON) are far past the
    header bound and travel in the payload. Before, the agent could not frame the
    reply and dropped the connection (any run above ~150 samples)."""
    local, remote, _ = agents
    path, parts, manifest = model
    load_split(local, remote, parts, manifest["splits"][2])
    rows = local.client.run(600, inputs={"image": image()}, model_outputs=OUTPUT_NAMES)
    assert [r["sample"] for r in rows] == list(range(600))
    assert local.client.health()["name"] == "local"
