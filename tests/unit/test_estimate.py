"""The duration model: by hand on a tiny run, corrected by a previous run, and the live ETA."""

from __future__ import annotations

import dataclasses

import pytest

from testbed.analysis.results import PHASES, wire_bytes
from testbed.sweep.estimate import (
    CONFIG_OVERHEAD_S,
    KPI_OVERHEAD_S,
    SAMPLE_OVERHEAD_S,
    Eta,
    LinkShape,
    RunShape,
    configuration_phases,
    estimate_duration,
    from_previous,
    plan_estimates,
)

pytestmark = pytest.mark.unit


def _shape(**changes) -> RunShape:
    base = RunShape(backend="netns", build_image=False, layer_macs=(10**10,), layer_param_bytes=(0,),
                    cut_bytes={0: 1000, 1: 0}, result_bytes=500,
                    links=(LinkShape("slow", 8000, 0.0, 8000, 0.0),), splits=(0, 1), done=frozenset(),
                    warmup=1, samples=2, min_seconds=0.0, max_seconds=100.0, kpi_runs=1, layer_runs=1,
                    local_parallelism=1.0, remote_parallelism=0.5, macs_per_s=1e10)
    return dataclasses.replace(base, **changes)


def test_phases_by_hand():
    """k = 0: the tail (1e10 MACs at half a 1e10 MAC/s core: 2 s) runs remote; the
    input (1000 B + 256 framing) goes up and the result (500 + 256) down at 1 kB/s."""
    shape = _shape()
    up = wire_bytes(1256, None, None) / 1000
    down = wire_bytes(756, None, None) / 1000
    per_sample = 2.0 + up + down + SAMPLE_OVERHEAD_S
    p = configuration_phases(shape, shape.links[0], 0, kpis=True)
    assert p["sampling"] == pytest.approx(2 * per_sample)
    assert p["warmup"] == pytest.approx(2.0)          # one invoke of the tail, on its node
    assert p["kpi"] == pytest.approx(KPI_OVERHEAD_S / 0.5 + (1 + 1 + 1) * 2.0)
    assert p["delivery"] == 0.0 and p["tail_load"] == pytest.approx(CONFIG_OVERHEAD_S["tail_load"])
    # k = N: the head runs locally, nothing crosses
    q = configuration_phases(shape, shape.links[0], 1, kpis=False)
    assert q["sampling"] == pytest.approx(2 * (1.0 + SAMPLE_OVERHEAD_S)) and q["kpi"] == 0.0
    assert set(p) == set(PHASES)


def test_caps_rates_repeats_and_what_is_done():
    slow, fast = _shape(), _shape(links=(LinkShape("fast", 8e9, 0.0, 8e9, 0.0),))
    assert estimate_duration(fast) < estimate_duration(slow)
    one = configuration_phases(_shape(samples=10**6, max_seconds=10.0), _shape().links[0], 0, kpis=False)
    per_sample = one["sampling"] / (10 // 4.5 + 1)  # stops after the sample that passes max_seconds
    assert 10.0 <= one["sampling"] < 10.0 + per_sample + 1e-9
    stretched = configuration_phases(_shape(min_seconds=30.0), _shape().links[0], 1, kpis=False)
    assert stretched["sampling"] == pytest.approx(30.0)
    assert len(plan_estimates(_shape(repeat=3))) == 3 * len(plan_estimates(_shape()))
    done = plan_estimates(_shape(done=frozenset({(0, "slow", 0)})))
    assert list(done) == [(0, "slow", 1)]
    # KPIs once per split point: the second repeat of k = 0 does not measure them again
    rep = plan_estimates(_shape(repeat=2))
    assert rep[(0, "slow", 0)]["kpi"] > 0 and rep[(1, "slow", 0)]["kpi"] == 0
    serial = configuration_phases(_shape(parallel_nodes=False), _shape().links[0], 0, kpis=True)
    assert serial["kpi"] == pytest.approx(configuration_phases(_shape(), _shape().links[0], 0, kpis=True)["kpi"])


def test_a_previous_run_replaces_the_plan_where_it_measured(tmp_path):
    from testbed.analysis.results import ConfigurationResult, RunFolder

    run = RunFolder.create(tmp_path, "prev")
    run.write_config({"name": "e"})
    summary = {f"phase_{p}_s": 0.0 for p in PHASES}
    summary.update(phase_sampling_s=7.0, phase_delivery_s=3.0, phase_kpi_s=5.0, wall_s=15.0)
    run.append_configuration(ConfigurationResult("slow", 0, [{"e2e_s": 1.0}], dict(summary)))
    estimates = plan_estimates(_shape())
    got, matched = from_previous(estimates, RunFolder(run.path))
    assert matched == 1
    assert got[(0, "slow", 0)]["sampling"] == 7.0 and got[(0, "slow", 0)]["kpi"] == 5.0
    plan0, plan1 = sum(estimates[(0, "slow", 0)].values()), sum(estimates[(0, "slow", 1)].values())
    assert sum(got[(0, "slow", 1)].values()) == pytest.approx(plan1 * 15.0 / plan0)  # scaled like the match


def test_eta_corrects_each_phase_by_what_it_measured():
    """Deliveries twice as slow as planned: the ETA doubles the remaining delivery
    estimates only; a phase that ran as planned is left as it was."""
    estimates = {(0, "p", k): {**dict.fromkeys(PHASES, 0.0), "delivery": 10.0, "sampling": 5.0} for k in range(5)}
    eta = Eta(estimates, prior_s=0.0)
    assert eta.remaining_s() == pytest.approx(75.0)
    for k in range(2):
        eta.finished((0, "p", k), {**dict.fromkeys(PHASES, 0.0), "delivery": 20.0, "sampling": 5.0})
    assert eta.ratio("delivery") == pytest.approx(2.0) and eta.ratio("sampling") == pytest.approx(1.0)
    assert eta.remaining_s() == pytest.approx(3 * (20.0 + 5.0))
    assert Eta(estimates).ratio("kpi") == 1.0  # nothing measured yet: the plan as it is
