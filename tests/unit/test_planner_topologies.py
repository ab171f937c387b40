"""The planner across topologies and under a frame-rate constraint."""

from __future__ import annotations

import pytest

from testbed.analysis.planner import Link, ModelProfile, best, compare_topologies, predict
from testbed.errors import TestbedError

pytestmark = pytest.mark.unit

# three layers; the UE is 10x slower than the edge; the cut shrinks with k
MODEL = ModelProfile(local_s=(0.10, 0.10, 0.10), remote_s=(0.01, 0.01, 0.01),
                     cut_bytes={0: 1_000_000, 1: 200_000, 2: 50_000}, result_bytes=10_000)
LINK = Link("l", uplink_rate_bps=8_000_000, uplink_delay_s=0.01, downlink_rate_bps=80_000_000, downlink_delay_s=0.01)


def test_topology_one_is_unchanged():
    p = {x.split: x for x in predict(MODEL, LINK)}
    assert p[0].uplink_s == pytest.approx(0.01 + 1.0) and p[0].head_s == 0 and p[0].tail_s == pytest.approx(0.03)
    assert p[3].e2e_s == pytest.approx(0.30) and p[3].uplink_s == p[3].downlink_s == 0


def test_topology_two_sends_the_input_up_and_the_cut_down():
    p = {x.split: x for x in predict(MODEL, LINK, topology=2)}
    assert p[0].e2e_s == pytest.approx(0.30) and p[0].uplink_s == p[0].downlink_s == 0  # all on the UE
    assert p[1].uplink_s == pytest.approx(0.01 + 1.0) and p[1].head_s == pytest.approx(0.01)
    assert p[1].downlink_s == pytest.approx(0.01 + 200_000 * 8 / 80e6) and p[1].tail_s == pytest.approx(0.20)
    assert p[3].downlink_s == pytest.approx(0.01 + 10_000 * 8 / 80e6)  # all in the network: outputs down


def test_topology_three_sends_only_down():
    p = {x.split: x for x in predict(MODEL, LINK, topology=3)}
    assert all(x.uplink_s == 0 for x in p.values())
    assert p[0].downlink_s == pytest.approx(0.01 + 1_000_000 * 8 / 80e6) and p[0].tail_s == pytest.approx(0.30)
    assert p[3].e2e_s == pytest.approx(0.03 + 0.01 + 10_000 * 8 / 80e6)


def test_max_fps_counts_serialisation_not_delay_and_constrains_the_choice():
    p = {x.split: x for x in predict(MODEL, LINK)}
    assert p[0].max_fps == pytest.approx(1.0)  # 1 MB at 8 Mbit/s
    assert p[3].max_fps == pytest.approx(1 / 0.30)
    assert best(list(p.values())).split == 2  # 0.2 s head + 0.06 s up + ...
    assert best(list(p.values()), min_fps=5).split == 2 and p[2].max_fps == pytest.approx(5.0)
    with pytest.raises(TestbedError, match="sustains"):
        best(list(p.values()), min_fps=100)
    got = {x.topology: x for x in compare_topologies(MODEL, LINK)}
    assert set(got) == {1, 2, 3} and got[3].e2e_s < got[1].e2e_s  # source in the network: nothing goes up
