"""KPIs from a child forked off a pre-imported zygote equal those of a freshly started process."""

from __future__ import annotations

import pytest

from nodes.benchmark import measure_in_fresh_process
from nodes.zygote import Zygote, ZygoteError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from testbed.model.zoo import resolve
    return resolve({"builtin": "posenet"})


def test_memory_kpis_match_a_fresh_process(zygote, model):
    """Init and peak memory are RSS deltas: deterministic for one model, so the
    forked child must report what an exec'd process does (the child re-maps the
    zygote's resident pages before its baseline; without that it over-counts
    several MB of library pages)."""
    forked = zygote.measure(str(model), runs=2, warmup=1, threads=1)
    fresh = measure_in_fresh_process(str(model), runs=2, warmup=1, threads=1)
    for key in ("init_memory_bytes", "peak_memory_bytes"):
        assert forked[key] == pytest.approx(fresh[key], rel=0.02), (key, forked[key], fresh[key])
    assert forked["steady_mean_s"] > 0 and forked["runs"] == 2 and forked["threads"] == 1


def test_each_measurement_is_a_new_process_and_failures_are_reported(zygote, model, tmp_path):
    a = zygote.measure(str(model), runs=1, warmup=0, threads=1)
    b = zygote.measure(str(model), runs=1, warmup=0, threads=1)
    # nothing carried over between children: the second loads the model from scratch too
    assert b["init_memory_bytes"] == pytest.approx(a["init_memory_bytes"], rel=0.01)
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model")
    with pytest.raises(ZygoteError, match="bad.tflite"):
        zygote.measure(str(bad), runs=1, warmup=0, threads=1)
    assert zygote.measure(str(model), runs=1, warmup=0, threads=1)["init_s"] > 0  # still serving
