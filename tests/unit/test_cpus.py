"""Where the nodes and the orchestrator run: the UE gets cores of its own when the host has them."""

import pytest

from testbed.deploy.cpus import format_cpuset, parse_cpuset, plan_cpus
from testbed.errors import ConfigError

pytestmark = pytest.mark.unit


def test_cpuset_notation_round_trips():
    assert parse_cpuset("0-2,5") == (0, 1, 2, 5)
    assert format_cpuset((5, 0, 1, 2)) == "0-2,5" and format_cpuset((3,)) == "3"
    for bad in ("", "a", "3-1", "1-", "0-99999"):
        with pytest.raises(ValueError):
            parse_cpuset(bad)


def test_two_cores_ue_alone_edge_shares_with_orchestrator():
    plan = plan_cpus(1, 2, host=(0, 1))
    assert plan.local == (1,) and plan.remote == (0,) and plan.orchestrator == (0,)
    assert any("capped" in n for n in plan.notes) and any("share" in n for n in plan.notes)


def test_enough_cores_nobody_shares():
    plan = plan_cpus(1, 2, host=tuple(range(8)))
    assert plan.local == (7,) and plan.remote == (5, 6) and plan.orchestrator == (0, 1, 2, 3, 4)
    assert not plan.notes
    assert not set(plan.local) & set(plan.remote) and not set(plan.local) & set(plan.orchestrator)


def test_fractional_quota_gets_a_whole_core():
    plan = plan_cpus(0.25, None, host=(0, 1, 2))
    assert plan.local == (2,) and plan.remote == (1,) and plan.orchestrator == (0,)


def test_one_core_everything_shares_and_says_so():
    plan = plan_cpus(1, 1, host=(0,))
    assert plan.local is None and plan.remote is None and plan.orchestrator is None
    assert "cannot have a CPU of its own" in plan.notes[0]


def test_off_and_explicit_sets():
    assert plan_cpus(1, 1, mode="off", host=(0, 1)).local is None
    plan = plan_cpus(1, 1, host=(0, 1, 2, 3), local_set=(0,))
    assert plan.local == (0,) and plan.remote == (3,) and plan.orchestrator == (1, 2)
    with pytest.raises(ConfigError, match="outside"):
        plan_cpus(1, 1, host=(0, 1), local_set=(5,))
    assert plan_cpus(1, 1, host=(0, 1)).as_dict()["local"] == [1]
