"""Writes grafana/dashboards/*.json: the four testbed dashboards, from one description.

The JSON files are what Grafana provisions; this script is how they are made, so
every panel follows the same conventions (datasource uid ``testbed-prometheus``,
template variables ``run``, ``profile``, ``node``; instant table queries for
per-split / per-layer bar charts). Edit here, run
``python grafana/generate_dashboards.py``, commit both;
tests/unit/test_dashboards.py fails when the two disagree.

Metric names come from testbed/metrics/ (orchestrator) and
nodes/agent_metrics.py (agents). Per-split panels read cumulative histogram
buckets (no ``rate``): each configuration is measured once, so the whole run's
buckets for a split and profile are exactly that configuration's samples, and
the panels stay right after the run ends.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "testbed-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"

R = 'run="$run"'
RP = 'run="$run", profile="$profile"'


# --------------------------------------------------------------------------- building blocks

def _variables() -> list[dict]:
    def var(name: str, label: str, query: str, *, multi: bool = False, sort: int = 1) -> dict:
        v = {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
            "refresh": 2, "sort": sort, "regex": "", "hide": 0, "current": {}, "options": [],
            "multi": multi, "includeAll": multi,
        }
        if multi:
            v["allValue"] = ".*"
        return v

    return [
        # Run folder names start with the date, so alphabetical descending puts the newest first.
        var("run", "Run", "label_values(testbed_sweep_configurations_planned, run)", sort=2),
        var("profile", "Profile", 'label_values(testbed_e2e_seconds_count{run="$run"}, profile)'),
        var("node", "Node", 'label_values(testbed_inference_seconds_count{run="$run"}, node)', multi=True),
    ]


def _target(ref: str, expr: str, legend: str = "", *, instant: bool = False) -> dict:
    t = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
         "range": not instant, "instant": instant}
    if instant:
        t["format"] = "table"
    return t


class _Layout:
    """Hands out panel ids and grid positions, left to right, 24 columns wide."""

    def __init__(self) -> None:
        self.next_id, self.x, self.y, self.row_h = 1, 0, 0, 0

    def place(self, w: int, h: int) -> tuple[int, dict]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        pid, self.next_id = self.next_id, self.next_id + 1
        return pid, pos

    def row(self, title: str) -> dict:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pid, self.next_id = self.next_id, self.next_id + 1
        panel = {"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                 "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "datasource": DS}
        self.y += 1
        return panel


def _panel(layout: _Layout, kind: str, title: str, targets: list[dict], *, w: int = 12, h: int = 8,
           unit: str = "", description: str = "", options: dict | None = None, custom: dict | None = None,
           transformations: list[dict] | None = None, decimals: int | None = None) -> dict:
    pid, pos = layout.place(w, h)
    defaults: dict = {"unit": unit} if unit else {}
    if custom:
        defaults["custom"] = custom
    if decimals is not None:
        defaults["decimals"] = decimals
    panel = {
        "id": pid, "type": kind, "title": title, "gridPos": pos, "datasource": DS,
        "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }
    if description:
        panel["description"] = description
    if transformations:
        panel["transformations"] = transformations
    return panel


def _stat(layout: _Layout, title: str, targets: list[dict], *, unit: str = "", w: int = 6, h: int = 4,
          text_mode: str = "auto", description: str = "", decimals: int | None = None) -> dict:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "textMode": text_mode, "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
               "orientation": "auto"}
    return _panel(layout, "stat", title, targets, w=w, h=h, unit=unit, options=options,
                  description=description, decimals=decimals)


def _timeseries(layout: _Layout, title: str, targets: list[dict], *, unit: str = "", w: int = 12, h: int = 8,
                description: str = "", log: bool = False) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "auto",
              "spanNulls": False}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "none"}}
    return _panel(layout, "timeseries", title, targets, w=w, h=h, unit=unit, options=options,
                  custom=custom, description=description)


def _sorted_by(field: str) -> list[dict]:
    """Sort rows by a label holding an integer ("2" before "10"), keep it a string for the x axis."""
    return [
        {"id": "convertFieldType", "options": {"conversions": [{"targetField": field, "destinationType": "number"}],
                                               "fields": {}}},
        {"id": "sortBy", "options": {"sort": [{"field": field, "desc": False}], "fields": {}}},
        {"id": "convertFieldType", "options": {"conversions": [{"targetField": field, "destinationType": "string"}],
                                               "fields": {}}},
    ]


def _bars_by_split(layout: _Layout, title: str, series: list[tuple[str, str]], *, unit: str, stacked: bool = False,
                   log: bool = False, w: int = 12, h: int = 9, description: str = "", x: str = "split") -> dict:
    """A bar chart with one bar group per split (or layer); ``series`` = [(name, expr by x)]."""
    refs = "ABCDEFGHIJ"
    targets = [_target(refs[i], expr, name, instant=True) for i, (name, expr) in enumerate(series)]
    rename = {f"Value #{refs[i]}": name for i, (name, _) in enumerate(series)}
    if len(series) == 1:
        rename = {"Value": series[0][0]}
    transformations = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": rename,
                                       "indexByName": {}}},
        *_sorted_by(x),
    ]
    custom = {"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none", "axisPlacement": "auto"}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    options = {"xField": x, "orientation": "vertical", "stacking": "normal" if stacked else "none",
               "groupWidth": 0.7, "barWidth": 0.9, "showValue": "never", "xTickLabelRotation": 0,
               "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "none"}}
    return _panel(layout, "barchart", title, targets, w=w, h=h, unit=unit, options=options, custom=custom,
                  transformations=transformations, description=description)


def _mean(metric: str, selector: str, by: str) -> str:
    """Mean of a histogram over the run: sum/count grouped by ``by``."""
    return (f"sum by ({by}) ({metric}_sum{{{selector}}})"
            f" / sum by ({by}) ({metric}_count{{{selector}}})")


def _dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["testbed"],
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "5s", "timezone": "",
        "timepicker": {}, "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "annotations": {"list": []},
        "links": [{"title": "Testbed dashboards", "type": "dashboards", "tags": ["testbed"], "asDropdown": True,
                   "includeVars": True, "keepTime": True}],
        "templating": {"list": _variables()},
        "panels": panels,
    }


# --------------------------------------------------------------------------- the four dashboards

def sweep_overview() -> dict:
    L = _Layout()
    panels = [
        L.row("Progress"),
        _stat(L, "Progress",
              [_target("A", f"testbed_sweep_configurations_completed{{{R}}}"
                            f" / testbed_sweep_configurations_planned{{{R}}}", "done")],
              unit="percentunit", description="Configurations finished / planned (resumed ones count as done)."),
        _stat(L, "Configurations",
              [_target("A", f"testbed_sweep_configurations_completed{{{R}}}", "done"),
               _target("B", f"testbed_sweep_configurations_planned{{{R}}}", "planned")], decimals=0),
        _stat(L, "ETA", [_target("A", f"testbed_sweep_eta_seconds{{{R}}}", "ETA")], unit="s"),
        _stat(L, "Current configuration",
              [_target("A", f"testbed_sweep_current_configuration{{{R}}}", "{{profile}}  k={{split}}")],
              text_mode="name", description="The configuration being measured (the last one once the run ended)."),
        L.row("Latency per split (profile $profile)"),
        _bars_by_split(L, "e2e p50 / p90 per split", [
            ("p50", f"histogram_quantile(0.5, sum by (le, split) (testbed_e2e_seconds_bucket{{{RP}}}))"),
            ("p90", f"histogram_quantile(0.9, sum by (le, split) (testbed_e2e_seconds_bucket{{{RP}}}))"),
        ], unit="s", description="From the e2e histogram (bucket-interpolated); exact values: "
                                 "testbed_configuration_e2e_p50_seconds."),
        _bars_by_split(L, "Where the time goes (mean per sample)", [
            ("head", _mean("testbed_inference_seconds", RP + ', part="head"', "split")),
            ("uplink", _mean("testbed_transfer_seconds", RP + ', direction="uplink"', "split")),
            ("tail", _mean("testbed_inference_seconds", RP + ', part="tail"', "split")),
            ("downlink", _mean("testbed_transfer_seconds", RP + ', direction="downlink"', "split")),
            ("encode + decode",
             f"sum by (split) (testbed_codec_seconds_sum{{{RP}}}) / sum by (split) (testbed_e2e_seconds_count{{{RP}}})"),
        ], unit="s", stacked=True, description="Stacked means per split; together close to the mean e2e."),
        L.row("Across profiles"),
        _panel(L, "table", "Best split so far per profile", [
            _target("A", f"testbed_best_split{{{R}}}", "{{profile}}", instant=True),
            _target("B", f"testbed_best_split_e2e_p50_seconds{{{R}}}", "{{profile}}", instant=True),
        ], w=12, h=8, transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True, "experiment": True, "run": True, "__name__": True,
                                  "instance": True, "job": True, "component": True},
                "renameByName": {"Value #A": "best split", "Value #B": "e2e p50 (s)"}, "indexByName": {}}},
        ], description="Split point with the lowest median e2e among the profile's finished configurations."),
        # Cumulative, not rate(): a configuration's few samples often land between
        # two scrapes, and rate() of a series born with its final value is empty.
        _timeseries(L, "Mean e2e per configuration (as it accumulates)", [
            _target("A", _mean("testbed_e2e_seconds", R, "profile, split"), "{{profile}} k={{split}}"),
        ], unit="s", log=True),
        _timeseries(L, "Samples per second", [
            _target("A", f"sum(rate(testbed_e2e_seconds_count{{{R}}}[$__rate_interval]))", "samples/s"),
        ], unit="none", w=12),
        _bars_by_split(L, "Intermediate data per split", [
            ("raw", f"max by (split) (testbed_intermediate_raw_bytes{{{R}}})"),
            ("on the wire", f"max by (split) (testbed_intermediate_wire_bytes{{{R}}})"),
        ], unit="bytes", log=True),
    ]
    return _dashboard("testbed-sweep-overview", "Testbed · Sweep overview",
                      "Progress of a running sweep and latency per split point.", panels)


def per_layer() -> dict:
    L = _Layout()
    node_sel = 'run="$run", node=~"$node"'
    panels = [
        L.row("Layers"),
        _panel(L, "barchart", "Mean latency per layer, per node", [
            _target("A", f"testbed_layer_latency_mean_seconds{{{node_sel}}}", "{{node}}", instant=True),
        ], w=24, h=9, unit="s", transformations=[
            {"id": "groupingToMatrix", "options": {"columnField": "node", "rowField": "layer", "valueField": "Value"}},
            {"id": "organize", "options": {"renameByName": {"layer\\node": "layer"}, "excludeByName": {},
                                           "indexByName": {}}},
            *_sorted_by("layer"),
        ], options={"xField": "layer", "orientation": "vertical", "stacking": "none", "groupWidth": 0.7,
                    "barWidth": 0.9, "showValue": "never", "xTickLabelRotation": 0,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
            custom={"fillOpacity": 80, "lineWidth": 1}),
        _bars_by_split(L, "Output bytes per layer", [
            ("output", f"max by (layer) (testbed_layer_output_bytes{{{R}}})"),
        ], unit="bytes", log=True, x="layer", w=12),
        _bars_by_split(L, "p90 latency per layer (selected nodes, worst)", [
            ("p90", f"max by (layer) (testbed_layer_latency_p90_seconds{{{node_sel}}})"),
        ], unit="s", x="layer", w=12),
        _panel(L, "table", "Per-layer profile", [
            _target("A", f"testbed_layer_latency_mean_seconds{{{node_sel}}}", instant=True),
            _target("B", f"testbed_layer_latency_p50_seconds{{{node_sel}}}", instant=True),
            _target("C", f"testbed_layer_latency_p90_seconds{{{node_sel}}}", instant=True),
            _target("D", f"testbed_layer_latency_stddev_seconds{{{node_sel}}}", instant=True),
        ], w=24, h=10, transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True, "experiment": True, "run": True, "__name__": True,
                                  "instance": True, "job": True, "component": True},
                "renameByName": {"Value #A": "mean (s)", "Value #B": "p50 (s)", "Value #C": "p90 (s)",
                                 "Value #D": "std (s)"}, "indexByName": {}}},
            *_sorted_by("layer"),
        ]),
        L.row("Parts (benchmark KPIs, fresh process per part)"),
        _bars_by_split(L, "Part file size per split", [
            ("head", f'max by (split) (testbed_part_file_bytes{{{R}, part="head"}})'),
            ("tail", f'max by (split) (testbed_part_file_bytes{{{R}, part="tail"}})'),
        ], unit="bytes", w=8),
        _bars_by_split(L, "Peak memory per split", [
            ("local (head)", f'max by (split) (testbed_part_peak_memory_bytes{{{R}, node="local"}})'),
            ("remote (tail)", f'max by (split) (testbed_part_peak_memory_bytes{{{R}, node="remote"}})'),
        ], unit="bytes", w=8),
        _bars_by_split(L, "Steady-state inference per split", [
            ("local (head)", f'max by (split) (testbed_part_steady_mean_seconds{{{R}, node="local"}})'),
            ("remote (tail)", f'max by (split) (testbed_part_steady_mean_seconds{{{R}, node="remote"}})'),
        ], unit="s", w=8),
    ]
    return _dashboard("testbed-per-layer", "Testbed · Per-layer",
                      "Per-layer latency on each node, output sizes, and per-part KPIs.", panels)


def nodes() -> dict:
    L = _Layout()
    agent = 'job="testbed", component="agent", run="$run", node=~"$node"'
    panels = [
        L.row("Agent processes"),
        _timeseries(L, "CPU", [
            _target("A", f"rate(process_cpu_seconds_total{{{agent}}}[$__rate_interval])", "{{node}}"),
        ], unit="percentunit", w=8, description="CPU seconds per second of the agent process (1 = one core)."),
        _timeseries(L, "Resident memory", [
            _target("A", f"process_resident_memory_bytes{{{agent}}}", "{{node}}"),
        ], unit="bytes", w=8),
        _timeseries(L, "Open file descriptors", [
            _target("A", f"process_open_fds{{{agent}}}", "{{node}}"),
        ], unit="none", w=8),
        L.row("Work served"),
        _timeseries(L, "Samples served per second", [
            _target("A", f"sum by (node, role) (rate(testbed_agent_samples_served_total{{{agent}}}"
                         f"[$__rate_interval]))", "{{node}} {{role}}"),
        ], unit="none", w=12),
        _timeseries(L, "Mean inference time per node and part (agent)", [
            _target("A", _mean("testbed_agent_inference_seconds", agent, "node, part"), "{{node}} {{part}}"),
        ], unit="s", w=12),
        _bars_by_split(L, "Inference per split as the sweep measured it (profile $profile)", [
            ("local (head)", _mean("testbed_inference_seconds", RP + ', node="local", node=~"$node"', "split")),
            ("remote (tail)", _mean("testbed_inference_seconds", RP + ', node="remote", node=~"$node"', "split")),
        ], unit="s", w=24),
        *phone_panels(L),
    ]
    return _dashboard("testbed-nodes", "Testbed · Nodes", "CPU, memory and file descriptors of the node agents.",
                      panels)


def phone_panels(L: _Layout) -> list[dict]:
    """The Android phone's row (local node on a phone): temperature and CPU frequency over the run.
    Kept in its own function so the dashboards' port to grafana-foundation-sdk can move it as one piece."""
    sel = 'run="$run"'
    return [
        L.row("Phone (Android local node)"),
        _timeseries(L, "Phone temperature", [
            _target("A", f"testbed_phone_temperature_celsius{{{sel}}}", "{{model}} {{serial}} {{zone}}"),
        ], unit="celsius", w=12, description="Thermal zones and battery, read before and after each configuration."),
        _timeseries(L, "Phone CPU frequency", [
            _target("A", f"testbed_phone_cpu_frequency_hertz{{{sel}}}", "{{model}} cpu{{cpu}}"),
            _target("B", f"testbed_phone_thermal_status{{{sel}}}", "thermal status"),
        ], unit="hertz", w=12, description="scaling_cur_freq per core; a drop below cpuinfo_max_freq while "
                                           "the thermal status rises is throttling."),
    ]


def link() -> dict:
    L = _Layout()
    by = "direction"
    achieved_rate = (f"sum by ({by}) (testbed_link_transferred_bytes_total{{{RP}}}) * 8"
                     f" / sum by ({by}) (testbed_link_busy_seconds_total{{{RP}}})")
    achieved_delay = (f"(sum by ({by}) (testbed_link_busy_seconds_total{{{RP}}})"
                      f" - sum by ({by}) (testbed_link_transferred_bytes_total{{{RP}}})"
                      f" / sum by ({by}) (testbed_link_configured_rate_bytes_per_second{{{RP}}}))"
                      f" / sum by ({by}) (testbed_link_transfers_total{{{RP}}})")
    panels = [
        L.row("Configured vs achieved (profile $profile)"),
        _timeseries(L, "Rate per direction", [
            _target("A", f"testbed_link_configured_rate_bytes_per_second{{{RP}}} * 8", "{{direction}} configured"),
            _target("B", achieved_rate, "{{direction}} achieved"),
        ], unit="bps", description="Achieved = payload bits / time on the link, over every transfer of known size "
                                   "(samples and model delivery); it includes the one-way delay, so it sits "
                                   "below the configured rate for small transfers."),
        _timeseries(L, "One-way delay per direction", [
            _target("A", f"testbed_link_configured_delay_seconds{{{RP}}}", "{{direction}} configured"),
            _target("B", achieved_delay, "{{direction}} achieved"),
        ], unit="s", description="Achieved = mean transfer time minus mean bytes / configured rate: "
                                 "what a transfer spent beyond serialisation at the configured rate."),
        _stat(L, "Configured loss", [_target("A", f"testbed_link_configured_loss_ratio{{{RP}}}", "{{direction}}")],
              unit="percentunit", w=6),
        _stat(L, "Configured jitter",
              [_target("A", f"testbed_link_configured_jitter_seconds{{{RP}}}", "{{direction}}")], unit="s", w=6),
        _stat(L, "Emulation", [_target("A", f"testbed_link_emulation_info{{{RP}}}",
                                       "{{direction}}: {{emulation}}")], text_mode="name", w=12,
              description="How the kernel emulates each direction (tbf, htb, netem, htb+netem)."),
        L.row("Transfers per split (profile $profile)"),
        _bars_by_split(L, "Transfer time p50 per split", [
            ("uplink", f'histogram_quantile(0.5, sum by (le, split) '
                       f'(testbed_transfer_seconds_bucket{{{RP}, direction="uplink"}}))'),
            ("downlink", f'histogram_quantile(0.5, sum by (le, split) '
                         f'(testbed_transfer_seconds_bucket{{{RP}, direction="downlink"}}))'),
        ], unit="s", log=True),
        _bars_by_split(L, "Model delivery per split (head part over the downlink)", [
            ("delivery", f"max by (split) (testbed_model_delivery_seconds{{{RP}}})"),
        ], unit="s"),
    ]
    return _dashboard("testbed-link", "Testbed · Link", "Configured versus achieved link rate and delay.", panels)


DASHBOARDS = {"sweep-overview.json": sweep_overview, "per-layer.json": per_layer,
              "nodes.json": nodes, "link.json": link}


def render() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
