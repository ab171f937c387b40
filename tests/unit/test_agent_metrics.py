"""The agent's own metrics, read back from a registry the test owns."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from nodes.agent_metrics import AgentMetrics

pytestmark = pytest.mark.unit


def test_agent_metrics_values():
    reg = CollectorRegistry()
    m = AgentMetrics(reg, "local")
    m.sample_served("local")
    m.sample_served("local")
    m.inference("head", 0.003)
    m.inference("head", 0.2)
    assert reg.get_sample_value("testbed_agent_info", {"node": "local"}) == 1
    assert reg.get_sample_value("testbed_agent_samples_served_total",
                                {"node": "local", "role": "local"}) == 2
    assert reg.get_sample_value("testbed_agent_inference_seconds_count",
                                {"node": "local", "part": "head"}) == 2
    assert reg.get_sample_value("testbed_agent_inference_seconds_bucket",
                                {"node": "local", "part": "head", "le": "0.005"}) == 1
    assert reg.get_sample_value("process_resident_memory_bytes") > 0
    assert reg.get_sample_value("process_open_fds") > 0
    assert reg.get_sample_value("process_cpu_seconds_total") > 0


def test_two_agents_in_one_process_do_not_collide():
    """Registries are passed in: no 'Duplicated timeseries' from a global default."""
    a, b = CollectorRegistry(), CollectorRegistry()
    AgentMetrics(a, "local").sample_served("local")
    AgentMetrics(b, "remote")
    assert b.get_sample_value("testbed_agent_samples_served_total",
                              {"node": "remote", "role": "local"}) is None
