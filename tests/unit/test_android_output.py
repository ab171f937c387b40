"""Parsers of benchmark_model output (fixtures laid out from the tools' format strings), the
phone-state parser, core masks, ELF ABI, and the experiment keys of ``backend: android``."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from testbed.android.adb import AndroidError
from testbed.android.device import core_mask, elf_abi, parse_getprop, parse_state
from testbed.android.output import (
    OutputError,
    draw_latencies,
    help_flags,
    map_ops_to_layers,
    parse_benchmark_output,
    parse_op_csv,
)

FIX = Path(__file__).resolve().parents[1] / "android" / "fixtures"
HEAD = [["MobilenetV1/Conv2d_0/Relu6"], ["MobilenetV1/Conv2d_1_depthwise/Relu6"],
        ["MobilenetV1/Conv2d_1_pointwise/Relu6"]]


def _text(name: str) -> str:
    return (FIX / name).read_text()


def test_current_layout_with_percentiles() -> None:
    o = parse_benchmark_output(_text("tflite_profile_stdout.txt"))
    assert o.complete and o.tool == "tflite" and o.op_layout == "without_start"
    assert (o.init_us, o.first_us, o.warmup_avg_us, o.inference_avg_us) == (3614, 4512, 3120.4, 3085.72)
    s = o.inference
    assert (s.count, s.min, s.max, s.std, s.p5, s.median, s.p95) == (324, 2877, 3952, 134, 2905, 3060, 3322)
    assert o.warmup.count == 160 and o.model_size_mb == pytest.approx(0.041316)
    assert (o.init_footprint_mb, o.overall_footprint_mb, o.peak_mb) == (1.22266, 8.3125, 10.4141)
    assert [r.node_type for r in o.ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D"]
    assert [r.avg_ms for r in o.ops] == [1.105, 0.512, 1.469] and o.ops[0].start_ms is None
    assert [r.node_index for r in o.ops] == [0, 1, 2] and o.init_ops[0].name == "AllocateTensors/0"
    assert o.params["Num threads"] == "4" and o.params["Use xnnpack"] == "0"
    k = o.kpis()
    assert k["steady_mean_s"] == pytest.approx(3085.72e-6) and k["steady_p50_s"] == pytest.approx(3060e-6)
    assert k["peak_memory_bytes"] == int(10.4141 * 2**20) and k["steady_p90_s"] is None


def test_older_layout_with_start_column_and_no_percentiles() -> None:
    o = parse_benchmark_output(_text("tflite_old_start_column.txt"))
    assert o.complete and o.op_layout == "with_start"
    assert o.inference.p5 is None and o.inference.median is None and o.inference.avg == 3085.72
    assert [r.start_ms for r in o.ops] == [0.0, 1.105, 1.618] and [r.avg_ms for r in o.ops] == [1.105, 0.512, 1.469]
    assert o.init_footprint_mb == 1.22266 and o.peak_mb is None
    assert o.kpis()["peak_memory_bytes"] == int(8.3125 * 2**20)      # overall when no periodic peak


@pytest.mark.parametrize("name,layout", [("op_profile.csv", "csv"), ("op_profile_start_column.csv", "csv_with_start")])
def test_op_profiling_csv_both_layouts(name: str, layout: str) -> None:
    o = parse_op_csv(_text(name))
    assert o.op_layout == layout and len(o.ops) == 3 and len(o.init_ops) == 1
    assert [r.avg_ms for r in o.ops] == [1.10462, 0.51231, 1.46879]
    assert o.op_run_total.count == 324
    mapped = map_ops_to_layers(o.ops, HEAD)
    assert {i: r.node_index for i, r in mapped.items()} == {0: 0, 1: 1, 2: 2}


def test_litert_compiled_model_tool() -> None:
    o = parse_benchmark_output(_text("litert_compiled_model.txt"))
    assert o.tool == "litert" and o.complete
    assert o.inference_avg_us == pytest.approx(3280.0) and o.init_us == pytest.approx(41270.0)
    assert o.init_footprint_mb == 9.84 and o.overall_footprint_mb == 11.02 and not o.ops


@pytest.mark.parametrize("name", ["tflite_profile_stdout.txt", "tflite_old_start_column.txt"])
def test_truncated_output_parses_as_far_as_it_goes(name: str) -> None:
    text = _text(name)
    cut = text[: text.index("Inference timings")]
    o = parse_benchmark_output(cut)
    assert not o.complete and o.inference is not None and o.inference.count == 324
    mid_table = text[: text.index("[MobilenetV1/Conv2d_1_depthwise") + 5]
    o = parse_benchmark_output(mid_table)
    assert o.complete and len(o.ops) == 1          # the torn row is dropped
    o = parse_benchmark_output(text[:200])
    assert o.inference is None
    with pytest.raises(OutputError):
        o.latency_quantiles()
    with pytest.raises(OutputError):
        parse_benchmark_output("nothing to see\n")


def test_distribution_keeps_quantiles_and_mean() -> None:
    o = parse_benchmark_output(_text("tflite_profile_stdout.txt"))
    q = o.latency_quantiles()
    assert [p for p, _ in q] == [0.0, 0.05, 0.5, 0.95, 1.0] and q[2][1] == pytest.approx(3060e-6)
    draws = draw_latencies(q, 20000, seed=3)
    assert min(draws) >= 2877e-6 and max(draws) <= 3952e-6
    assert sum(draws) / len(draws) == pytest.approx(3085.72e-6, rel=0.01)


def test_help_flags_from_usage() -> None:
    text = ("ERROR: usage: /data/local/tmp/benchmark_model <flags>\nFlags:\n"
            "\t--num_runs=50     \tint32\toptional\texpected number of runs\n"
            "\t--graph=          \tstring\toptional\tgraph file name\n"
            "\t--use_xnnpack=false\tbool\toptional\texplicitly apply the XNNPACK delegate.\n")
    assert help_flags(text) == {"num_runs": "50", "graph": "", "use_xnnpack": "false"}
    assert help_flags("no usage here") == {}


def test_phone_state_getprop_masks_and_abi(tmp_path: Path) -> None:
    text = ("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq:1000\n"
            "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq:2000\n"
            "/sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq:3000\n"
            "/sys/devices/system/cpu/cpu1/cpufreq/cpuinfo_max_freq:3000\n"
            "/sys/class/thermal/thermal_zone0/type:skin\n/sys/class/thermal/thermal_zone0/temp:41500\n"
            "/sys/class/thermal/thermal_zone1/type:bogus\n/sys/class/thermal/thermal_zone1/temp:-273000\n"
            "==battery==\n  AC powered: false\n  USB powered: true\n  level: 55\n  temperature: 345\n"
            "==thermal==\nThermal Status: 2\n")
    st = parse_state(text)
    assert st.cpu_max_khz == {0: 2000, 1: 3000} and st.thermal_zones_c == {"skin": 41.5}
    assert st.thermal_status == 2 and st.battery_level == 55 and st.charging is True and st.battery_temp_c == 34.5
    assert st.freq_ratio() == pytest.approx(4000 / 5000) and st.max_temp_c == 41.5
    assert parse_getprop("[ro.product.model]: [Pixel 7]\n[a.b]: []\n") == {"ro.product.model": "Pixel 7", "a.b": ""}
    assert core_mask("big", {0: 1, 1: 1, 2: 3, 3: 3}) == "c" and core_mask("all", {0: 1}) is None
    assert core_mask("0xF0", {i: 1 for i in range(8)}) == "f0"
    for bad in ("zz", "0", "100"):
        with pytest.raises(AndroidError):
            core_mask(bad, {i: 1 for i in range(8)})
    elf = tmp_path / "bm"
    head = bytearray(64)
    head[:4] = b"\x7fELF"
    struct.pack_into("<H", head, 18, 0xB7)
    elf.write_bytes(bytes(head))
    assert elf_abi(elf) == "arm64-v8a"
    elf.write_bytes(b"#!/bin/sh\n" + bytes(20))
    assert elf_abi(elf) is None


def test_experiment_android_keys(tmp_path: Path) -> None:
    from testbed.errors import ConfigError
    from testbed.experiment import load_experiment

    def exp(nodes: str) -> Path:
        p = tmp_path / "e.yaml"
        p.write_text(f"name: a\nmodel: {{builtin: posenet}}\nnodes:\n{nodes}\nnetwork: [ladder-10mbit]\n")
        return p

    e = load_experiment(exp("  local: {backend: android, benchmark_model: bm, cores: big}\n  remote: {backend: netns}"))
    assert e.nodes.android is not None and e.nodes.backend == "netns" and e.nodes.local.cores == "big"
    for nodes, what in (("  local: {backend: android}", "needs benchmark_model"),
                        ("  remote: {backend: android, benchmark_model: x}", "for the local node"),
                        ("  local: {serial: abc}", "belong to backend: android"),
                        ("  local: {backend: android, benchmark_model: x, cores: fast}", "cores"),
                        ("  local: {backend: android, benchmark_model: x, delegate: tpu}", "delegate")):
        with pytest.raises(ConfigError) as err:
            load_experiment(exp(nodes))
        assert what in str(err.value) and "e.yaml:" in str(err.value)
