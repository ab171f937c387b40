"""The data path's experiment keys, the nftables rule text and the summary arithmetic."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.experiment import load_experiment
from testbed.link.nft_loss import netns_path, ruleset
from testbed.sweep.data_path import max_sustainable_fps, roles, stage_times

pytestmark = pytest.mark.unit

BASE = "name: t\nmodel: {builtin: posenet}\nnetwork: [ladder-10mbit]\n"


def load(tmp_path, extra: str):
    f = tmp_path / "e.yaml"
    f.write_text(BASE + extra)
    return load_experiment(f)


def test_defaults_keep_todays_behaviour(tmp_path):
    exp = load(tmp_path, "")
    assert exp.topology == 1 and exp.codec == "raw" and exp.transport.protocol == "tcp"
    assert exp.runs.mode == "single" and exp.transport.nft_loss == 0


def test_data_path_keys(tmp_path):
    exp = load(tmp_path, "topology: 3\ncodec: int8+zstd:3\ntransport: udp\n"
                         "runs: {mode: stream, fps: 15, duration: 4s, queue: 3}\n")
    assert exp.topology == 3 and exp.codec == "int8+zstd" and exp.transport.protocol == "udp"
    assert (exp.runs.mode, exp.runs.fps, exp.runs.duration, exp.runs.queue) == ("stream", 15.0, 4.0, 3)
    exp = load(tmp_path, "transport: {protocol: udp, on_loss: drop, nft_loss: 5%}\n")
    assert exp.transport.on_loss == "drop" and exp.transport.nft_loss == 5.0


@pytest.mark.parametrize("extra,where", [
    ("topology: 4\n", ":4: topology"), ("codec: lz4+fp16\n", ":4: codec"), ("codec: gzip\n", ":4: codec"),
    ("transport: quic\n", ":4: transport"), ("transport: {protocol: udp, nft_loss: 2.5%}\n", ":4: transport.nft_loss"),
    ("transport: {protocol: udp, loss: 5%}\n", ":4: transport.loss"),
    ("runs: {mode: stream, fps: 0}\n", ":4: runs.fps"), ("runs: {mode: burst}\n", ":4: runs.mode"),
    ("runs: {mode: stream, fps: 1000, duration: 2000s}\n", ":4: runs"),
])
def test_bad_data_path_keys_name_file_line_field(tmp_path, extra, where):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, extra)
    assert where in str(e.value)


def test_nft_rule_text_and_namespace():
    text = ruleset("abc_local", "tbl-abc", 5)
    assert 'oifname "tbl-abc" numgen random mod 100 < 5 drop' in text and "hook output" in text
    for bad in (("a b", "eth0", 5), ("t", "eth0; drop", 5), ("t", "eth0", 0), ("t", "eth0", 101)):
        with pytest.raises(ValueError):
            ruleset(*bad)

    class T:
        dev, netns, pid = "eth0", None, 42
    assert netns_path(T()) == "/proc/42/ns/net"
    T.netns = "tb-x"
    assert netns_path(T()) == "/run/netns/tb-x"


def test_roles_and_the_slowest_stage():
    assert roles(1) == ("tail", "head") and roles(2) == roles(3) == ("head", "tail")
    rows = [{"head_s": 0.01, "encode_s": 0.01, "uplink_s": 0.05, "tail_s": 0.02, "downlink_s": 0.001,
             "decode_s": 0.0, "e2e_s": 0.1}] * 3
    assert stage_times(rows, 1)[1] == pytest.approx(0.05)
    assert max_sustainable_fps(rows, 1) == pytest.approx(20.0)
    assert max_sustainable_fps(rows, 3) == pytest.approx(1 / 0.02)  # head + remote encode, downlink, tail
