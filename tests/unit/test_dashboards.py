"""Dashboard JSON: structure, generated = committed, every query parses and names real metrics.

That every query also returns data is proven against a real Prometheus in
tests/integration/test_prometheus_exporter.py and test_prometheus_run.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from testbed.errors import TestbedError
from testbed.metrics import SweepMetrics
from testbed.metrics.dashboards import (
    DASHBOARD_DIR,
    load_dashboards,
    queries,
    structure_problems,
    substitute,
    variable_queries,
)

pytestmark = pytest.mark.unit

VALUES = {"run": "r1", "profile": "p", "node": ".*"}
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "max", "le", "on", "ignoring", "without",
                "group_left", "bool", "and", "or", "unless", "offset"}


def _generator():
    spec = importlib.util.spec_from_file_location("generate_dashboards",
                                                  DASHBOARD_DIR.parent / "generate_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_four_dashboards_exist_with_run_profile_node_variables():
    dashboards = load_dashboards()
    titles = {d["title"] for d in dashboards.values()}
    assert titles == {"Testbed · Sweep overview", "Testbed · Per-layer", "Testbed · Nodes", "Testbed · Link"}
    for name, d in dashboards.items():
        assert {"run", "profile", "node"} <= set(variable_queries(d)), name


@pytest.mark.skipif(sys.version_info < (3, 11), reason="grafana-foundation-sdk needs Python >= 3.11; "
                    "regenerate and check the dashboards with 3.11 or later")
def test_committed_json_is_what_the_generator_writes():
    rendered = _generator().render()
    assert set(rendered) == {p.name for p in DASHBOARD_DIR.glob("*.json")}
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, \
            f"{name} is stale: run python grafana/generate_dashboards.py"


def test_structure_unique_ids_datasources_schema_version():
    for name, d in load_dashboards().items():
        assert structure_problems(name, d) == []
    uids = [d["uid"] for d in load_dashboards().values()]
    assert len(set(uids)) == len(uids)


def test_structure_check_catches_broken_dashboards():
    d = {"uid": "x", "title": "x", "schemaVersion": 12, "panels": [
        {"id": 1, "type": "stat", "title": "a", "datasource": {"type": "prometheus", "uid": "u"},
         "targets": [{"refId": "A", "expr": "up"}]},
        {"id": 1, "type": "row", "title": "r", "panels": [
            {"id": 3, "type": "stat", "title": "nested", "targets": [{"refId": "A", "expr": "up"}]}]},
    ]}
    problems = "\n".join(structure_problems("x.json", d))
    assert "schemaVersion 12" in problems
    assert "duplicates [1]" in problems
    assert "panel 3 'nested': no datasource" in problems
    assert "panel 1 'r': no datasource" in problems


def test_substitute_like_grafana():
    assert substitute('a{run="$run", node=~"${node}"}[$__rate_interval]', VALUES) == 'a{run="r1", node=~".*"}[1m]'
    with pytest.raises(TestbedError, match=r"\$nope"):
        substitute("x{a=\"$nope\"}", VALUES)


def test_every_panel_query_parses(tmp_path):
    """promtool parses each query as a recording rule; a typo in any panel fails here."""
    assert shutil.which("promtool"), "promtool missing: run bash scripts/setup.sh test"
    rules = [{"record": f"check:{q.dashboard.split('.')[0].replace('-', '_')}:{q.panel_id}_{q.ref_id}",
              "expr": substitute(q.expr, VALUES)}
             for name, d in load_dashboards().items() for q in queries(name, d)]
    assert len(rules) > 30
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _exposed_names() -> set[str]:
    """Every sample name the orchestrator and a real agent expose once they have data."""
    from nodes.agent_metrics import AgentMetrics

    registry = CollectorRegistry()
    m = SweepMetrics(registry, "e", "r")
    m.configuration_started(1, "p", total=1, done=0, eta_s=1)
    m.observe_sample(1, "p", {"head_s": 1, "tail_s": 1, "encode_s": 1, "uplink_s": 1, "downlink_s": 1, "e2e_s": 1,
                              "cut_bytes_raw": 1, "cut_bytes_wire": 1, "result_bytes_wire": 1})
    m.set_link("uplink", "p", 1, 1, 1, jitter_s=1, emulation="tbf")
    m.set_part("local", "head", 1, {"init_s": 1, "first_s": 1, "warmup_mean_s": 1, "steady_mean_s": 1,
                                    "steady_std_s": 1, "init_memory_bytes": 1, "peak_memory_bytes": 1}, 1)
    m.set_layers("local", [{"layer": 0, "mean_s": 1, "p50_s": 1, "p90_s": 1, "std_s": 1, "output_bytes": 1,
                            "params": 1, "macs": 1}])
    m.observe_delivery(1, "p", 1, 1)
    m.add_phases("p", {"sampling": 1.0})
    m.configuration_done(1, "p")
    from testbed.android.device import DeviceState
    from testbed.metrics.phone import PhoneMetrics
    PhoneMetrics(registry, "e", "r", "serial", "model").set_state(DeviceState(
        cpu_cur_khz={0: 1}, cpu_max_khz={0: 1}, thermal_zones_c={"skin": 30.0}, thermal_status=0, battery_level=50))
    agent_registry = CollectorRegistry()
    agent = AgentMetrics(agent_registry, "local")
    agent.sample_served("local")
    agent.inference("head", 0.01)
    names = set()
    for reg in (registry, agent_registry):
        for line in generate_latest(reg).decode().splitlines():
            if line and not line.startswith("#"):
                names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def test_every_metric_a_dashboard_reads_is_exposed():
    exposed = _exposed_names()
    for name, d in load_dashboards().items():
        texts = [q.expr for q in queries(name, d)] + list(variable_queries(d).values())
        for text in texts:
            text = re.sub(r'"[^"]*"', '""', text)  # label values are not names
            text = re.sub(r"\{[^}]*\}", "{}", text)  # nor label names inside selectors
            text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
            for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
                if word in PROMQL_WORDS or word.startswith("__") or word in ("label_values", "run", "profile",
                                                                             "node"):
                    continue
                if re.fullmatch(r"\d+[smhd]", word) or word in ("m", "s", "h"):
                    continue
                assert word in exposed, f"{name}: {word!r} is not exposed by testbed.metrics or the agent"


def test_sweep_overview_shows_where_the_sweep_time_went_by_phase():
    overview = load_dashboards()["sweep-overview.json"]
    phase = [q for q in queries("sweep-overview.json", overview) if "testbed_sweep_phase_seconds_total" in q.expr]
    assert phase and all(re.search(r"by \(phase\)", q.expr) for q in phase)
