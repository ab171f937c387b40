"""benchmark_model-style KPIs (fresh process) and per-layer latency."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nodes import benchmark
from testbed.analysis.results import KPI_COLUMNS
from testbed.cli import app
from tests.unit.model_samples import DAG_LAYERS

pytestmark = pytest.mark.unit


def _plausible(k: dict) -> None:
    assert set(KPI_COLUMNS) <= set(k)  # every KPI the results record
    for key in ("init_s", "first_s", "warmup_mean_s", "steady_mean_s", "steady_p50_s", "steady_p90_s"):
        assert 0 < k[key] < 60, key
    assert 0 <= k["steady_std_s"] < 60
    assert k["steady_p50_s"] <= k["steady_p90_s"]
    assert k["init_memory_bytes"] >= 0 and k["peak_memory_bytes"] >= k["init_memory_bytes"]


def test_posenet_kpis_in_a_fresh_process(posenet_path, posenet_bytes):
    k = benchmark.measure_in_fresh_process(str(posenet_path), runs=3, warmup=1, threads=1)
    _plausible(k)
    assert k["runs"] == 3 and k["threads"] == 1
    # the weights alone are 13 MB and the interpreter holds them (packed) after init
    assert k["peak_memory_bytes"] > len(posenet_bytes) // 2


def test_fresh_process_failure_is_reported(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"nope")
    with pytest.raises(RuntimeError, match="bad.tflite"):
        benchmark.measure_in_fresh_process(str(bad), runs=1, warmup=0)


def test_profile_command_json(dag_path):
    result = CliRunner().invoke(app, ["profile", str(dag_path), "--runs", "5", "--warmup", "1",
                                      "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    _plausible(d["kpis"])
    assert len(d["layers"]) == DAG_LAYERS
    for row in d["layers"]:
        assert 0 < row["mean_s"] < 10 and row["p50_s"] <= row["p90_s"] and row["std_s"] >= 0
        assert {"op", "output_bytes", "param_bytes", "macs"} <= set(row)
    assert d["sum_layers_mean_s"] == pytest.approx(sum(r["mean_s"] for r in d["layers"]))
    assert d["sum_layers_over_whole"] == pytest.approx(d["sum_layers_mean_s"] / d["kpis"]["steady_mean_s"])


def test_profile_command_table_prints_ratio(dag_path):
    result = CliRunner().invoke(app, ["profile", str(dag_path), "--runs", "3", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert "Σ layers / whole model" in result.output and "steady_mean_s" in result.output


def test_time_layers_shape(dag_path):
    from testbed.model.layers import one_layer_models
    rows = benchmark.time_layers(one_layer_models(dag_path)[:2], runs=3, warmup=0, threads=1)
    assert len(rows) == 2 and all(set(r) == {"mean_s", "p50_s", "p90_s", "std_s"} for r in rows)
