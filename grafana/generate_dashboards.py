"""Writes grafana/dashboards/*.json: the four testbed dashboards, built with grafana-foundation-sdk.

Owns what the dashboards show: every panel, its query, unit and layout, and the
conventions they share (datasource uid ``testbed-prometheus``, template variables
``run``, ``profile``, ``node``; instant table queries for per-split / per-layer
bar charts). The JSON shape is left to Grafana's typed builders
(``grafana_foundation_sdk``); reading the files back and checking them against a
live Prometheus is ``testbed.metrics.dashboards``. The JSON files are what
Grafana provisions; edit here, run ``python grafana/generate_dashboards.py``,
commit both; tests/unit/test_dashboards.py fails when the two disagree.

Metric names come from testbed/metrics/ (orchestrator) and
nodes/agent_metrics.py (agents). Per-split panels read cumulative histogram
buckets (no ``rate``): each configuration is measured once, so the whole run's
buckets for a split and profile are exactly that configuration's samples, and
the panels stay right after the run ends.

What the SDK cannot express, written as plain values here: transformations
(``DataTransformerConfig.options`` is an untyped object in the SDK: there are no
builders for merge / organize / convertFieldType / sortBy / groupingToMatrix),
and a query variable's ``definition`` (the display text Grafana's editor
writes; the SDK's VariableModel has no such field, so the variables list shows
the query itself). The SDK also lays panels out left to right and wraps only
once a grid line is full, so the panels of a row fill whole 24-column lines
(``_dashboard`` refuses one that would overflow).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from grafana_foundation_sdk.builders import barchart, common, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DS = dm.DataSourceRef(type_val="prometheus", uid="testbed-prometheus")
OUT = Path(__file__).resolve().parent / "dashboards"

R = 'run="$run"'
RP = 'run="$run", profile="$profile"'
# Labels every series carries that a table of values should not show as columns.
HIDDEN_LABELS = ("Time", "experiment", "run", "__name__", "instance", "job", "component")

# A panel builder of any visualisation (they share the base Panel API).
Panel = barchart.Panel | stat.Panel | table.Panel | timeseries.Panel


# --------------------------------------------------------------------------- building blocks

def _variable(name: str, label: str, query: str, *, multi: bool = False,
              sort: dm.VariableSort = dm.VariableSort.ALPHABETICAL_ASC) -> db.QueryVariable:
    v = (db.QueryVariable(name).label(label).datasource(DS)
         .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1})
         .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort).regex("").hide(dm.VariableHide.DONT_HIDE)
         .multi(multi).include_all(multi))
    return v.all_value(".*") if multi else v


def _variables() -> list[db.QueryVariable]:
    return [
        # Run folder names start with the date, so alphabetical descending puts the newest first.
        _variable("run", "Run", "label_values(testbed_sweep_configurations_planned, run)",
                  sort=dm.VariableSort.ALPHABETICAL_DESC),
        _variable("profile", "Profile", 'label_values(testbed_e2e_seconds_count{run="$run"}, profile)'),
        _variable("node", "Node", 'label_values(testbed_inference_seconds_count{run="$run"}, node)', multi=True),
    ]


def _target(ref: str, expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    t = prometheus.Dataquery().ref_id(ref).datasource(DS).expr(expr).legend_format(legend or "__auto")
    return t.instant().format(PromQueryFormat.TABLE) if instant else t.range()


def _transformation(kind: str, **options: object) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val=kind, options=options)


def _organize(rename: dict[str, str], exclude: Sequence[str] = ("Time",)) -> dm.DataTransformerConfig:
    return _transformation("organize", excludeByName={name: True for name in exclude}, renameByName=rename,
                           indexByName={})


def _sorted_by(field: str) -> list[dm.DataTransformerConfig]:
    """Sort rows by a label holding an integer ("2" before "10"), keep it a string for the x axis."""
    def convert(to: str) -> dm.DataTransformerConfig:
        return _transformation("convertFieldType", conversions=[{"targetField": field, "destinationType": to}],
                               fields={})

    return [convert("number"), _transformation("sortBy", sort=[{"field": field, "desc": False}], fields={}),
            convert("string")]


def _legend() -> common.VizLegendOptions:
    return (common.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM).show_legend(True))


def _tooltip() -> common.VizTooltipOptions:
    return common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.NONE)


def _log_scale() -> common.ScaleDistributionConfig:
    return common.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10)


def _common(panel: Panel, title: str, targets: Sequence[prometheus.Dataquery], *, w: int, h: int,
            unit: str = "", description: str = "") -> Panel:
    """What every panel has: title, the datasource (on the panel and each query), size, unit."""
    panel = panel.title(title).datasource(DS).targets(list(targets)).span(w).height(h)
    if unit:
        panel = panel.unit(unit)
    return panel.description(description) if description else panel


def _stat(title: str, targets: Sequence[prometheus.Dataquery], *, unit: str = "", w: int = 6, h: int = 4,
          text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO, description: str = "",
          decimals: int | None = None) -> stat.Panel:
    panel = (_common(stat.Panel(), title, targets, w=w, h=h, unit=unit, description=description)
             .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
             .text_mode(text_mode).color_mode(cm.BigValueColorMode.VALUE).graph_mode(cm.BigValueGraphMode.NONE)
             .justify_mode(cm.BigValueJustifyMode.AUTO).orientation(cm.VizOrientation.AUTO))
    return panel.decimals(decimals) if decimals is not None else panel


def _timeseries(title: str, targets: Sequence[prometheus.Dataquery], *, unit: str = "", w: int = 12, h: int = 8,
                description: str = "", log: bool = False) -> timeseries.Panel:
    panel = (_common(timeseries.Panel(), title, targets, w=w, h=h, unit=unit, description=description)
             .draw_style(cm.GraphDrawStyle.LINE).line_width(1).fill_opacity(0).show_points(cm.VisibilityMode.AUTO)
             .span_nulls(False).legend(_legend()).tooltip(_tooltip()))
    return panel.scale_distribution(_log_scale()) if log else panel


def _table(title: str, targets: Sequence[prometheus.Dataquery], transformations: Sequence[dm.DataTransformerConfig],
           *, w: int, h: int, description: str = "") -> table.Panel:
    return (_common(table.Panel(), title, targets, w=w, h=h, description=description)
            .transformations(list(transformations)))


def _barchart(title: str, targets: Sequence[prometheus.Dataquery], transformations: Sequence[dm.DataTransformerConfig],
              *, unit: str, x: str, stacked: bool = False, log: bool = False, w: int = 12, h: int = 9,
              description: str = "") -> barchart.Panel:
    panel = (_common(barchart.Panel(), title, targets, w=w, h=h, unit=unit, description=description)
             .transformations(list(transformations))
             .x_field(x).orientation(cm.VizOrientation.VERTICAL)
             .stacking(cm.StackingMode.NORMAL if stacked else cm.StackingMode.NONE)
             .group_width(0.7).bar_width(0.9).show_value(cm.VisibilityMode.NEVER).x_tick_label_rotation(0)
             .legend(_legend()).tooltip(_tooltip())
             .fill_opacity(80).line_width(1).gradient_mode(cm.GraphGradientMode.NONE)
             .axis_placement(cm.AxisPlacement.AUTO))
    return panel.scale_distribution(_log_scale()) if log else panel


def _bars_by_split(title: str, series: list[tuple[str, str]], *, unit: str, stacked: bool = False,
                   log: bool = False, w: int = 12, h: int = 9, description: str = "",
                   x: str = "split") -> barchart.Panel:
    """A bar chart with one bar group per split (or layer); ``series`` = [(name, expr by x)]."""
    refs = "ABCDEFGHIJ"
    targets = [_target(refs[i], expr, name, instant=True) for i, (name, expr) in enumerate(series)]
    rename = {f"Value #{refs[i]}": name for i, (name, _) in enumerate(series)}
    if len(series) == 1:
        rename = {"Value": series[0][0]}
    transformations = [_transformation("merge"), _organize(rename), *_sorted_by(x)]
    return _barchart(title, targets, transformations, unit=unit, x=x, stacked=stacked, log=log, w=w, h=h,
                     description=description)


def _mean(metric: str, selector: str, by: str) -> str:
    """Mean of a histogram over the run: sum/count grouped by ``by``."""
    return (f"sum by ({by}) ({metric}_sum{{{selector}}})"
            f" / sum by ({by}) ({metric}_count{{{selector}}})")


Section = tuple[str, list[Panel]]


def _dashboard(uid: str, title: str, description: str, sections: list[Section]) -> dm.Dashboard:
    """Rows of panels, ids handed out in order (rows count), laid out by the SDK."""
    dash = (db.Dashboard(title).uid(uid).description(description).tags(["testbed"])
            .version(1).editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .time("now-1h", "now").refresh("5s").timezone("").timepicker(db.TimePicker())
            .fiscal_year_start_month(0).live_now(False).week_start("").annotations([])
            .link(db.DashboardLink("Testbed dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags(["testbed"])
                  .as_dropdown(True).include_vars(True).keep_time(True)))
    for variable in _variables():
        dash = dash.with_variable(variable)
    ids = itertools.count(1)
    for row_title, panels in sections:
        dash = dash.with_row(db.Row(row_title).id(next(ids)).datasource(DS))
        x = 0
        for panel in panels:
            # The SDK wraps to a new grid line only once a line is full: a panel that
            # does not fit would stick out on the right instead of moving down.
            w = panel.build().grid_pos.w
            if x + w > 24:
                raise ValueError(f"{uid}: panel {panel.build().title!r} ({w} wide) overflows its grid line")
            x = (x + w) % 24
            dash = dash.with_panel(panel.id(next(ids)))
    return dash.build()


# --------------------------------------------------------------------------- the four dashboards

def sweep_overview() -> dm.Dashboard:
    return _dashboard("testbed-sweep-overview", "Testbed · Sweep overview",
                      "Progress of a running sweep and latency per split point.", [
        ("Progress", [
            _stat("Progress",
                  [_target("A", f"testbed_sweep_configurations_completed{{{R}}}"
                                f" / testbed_sweep_configurations_planned{{{R}}}", "done")],
                  unit="percentunit", description="Configurations finished / planned (resumed ones count as done)."),
            _stat("Configurations",
                  [_target("A", f"testbed_sweep_configurations_completed{{{R}}}", "done"),
                   _target("B", f"testbed_sweep_configurations_planned{{{R}}}", "planned")], decimals=0),
            _stat("ETA", [_target("A", f"testbed_sweep_eta_seconds{{{R}}}", "ETA")], unit="s"),
            _stat("Current configuration",
                  [_target("A", f"testbed_sweep_current_configuration{{{R}}}", "{{profile}}  k={{split}}")],
                  text_mode=cm.BigValueTextMode.NAME,
                  description="The configuration being measured (the last one once the run ended)."),
        ]),
        ("Latency per split (profile $profile)", [
            _bars_by_split("e2e p50 / p90 per split", [
                ("p50", f"histogram_quantile(0.5, sum by (le, split) (testbed_e2e_seconds_bucket{{{RP}}}))"),
                ("p90", f"histogram_quantile(0.9, sum by (le, split) (testbed_e2e_seconds_bucket{{{RP}}}))"),
            ], unit="s", description="From the e2e histogram (bucket-interpolated); exact values: "
                                     "testbed_configuration_e2e_p50_seconds."),
            _bars_by_split("Where the time goes (mean per sample)", [
                ("head", _mean("testbed_inference_seconds", RP + ', part="head"', "split")),
                ("uplink", _mean("testbed_transfer_seconds", RP + ', direction="uplink"', "split")),
                ("tail", _mean("testbed_inference_seconds", RP + ', part="tail"', "split")),
                ("downlink", _mean("testbed_transfer_seconds", RP + ', direction="downlink"', "split")),
                ("encode + decode", f"sum by (split) (testbed_codec_seconds_sum{{{RP}}})"
                                    f" / sum by (split) (testbed_e2e_seconds_count{{{RP}}})"),
            ], unit="s", stacked=True, description="Stacked means per split; together close to the mean e2e."),
        ]),
        ("Across profiles", [
            _table("Best split so far per profile", [
                _target("A", f"testbed_best_split{{{R}}}", "{{profile}}", instant=True),
                _target("B", f"testbed_best_split_e2e_p50_seconds{{{R}}}", "{{profile}}", instant=True),
            ], [_transformation("merge"),
                _organize({"Value #A": "best split", "Value #B": "e2e p50 (s)"}, HIDDEN_LABELS)],
                w=12, h=8, description="Split point with the lowest median e2e among the profile's finished "
                                       "configurations."),
            # Cumulative, not rate(): a configuration's few samples often land between
            # two scrapes, and rate() of a series born with its final value is empty.
            _timeseries("Mean e2e per configuration (as it accumulates)", [
                _target("A", _mean("testbed_e2e_seconds", R, "profile, split"), "{{profile}} k={{split}}"),
            ], unit="s", log=True),
            _timeseries("Samples per second", [
                _target("A", f"sum(rate(testbed_e2e_seconds_count{{{R}}}[$__rate_interval]))", "samples/s"),
            ], unit="none", w=12),
            _bars_by_split("Intermediate data per split", [
                ("raw", f"max by (split) (testbed_intermediate_raw_bytes{{{R}}})"),
                ("on the wire", f"max by (split) (testbed_intermediate_wire_bytes{{{R}}})"),
            ], unit="bytes", log=True),
        ]),
        ("Where the sweep's time went", [
            # Largest first: the phase to shorten is the first bar. Cumulative over the
            # run (a counter read at the end of the range), all profiles together.
            _barchart("Sweep wall time per phase", [
                _target("A", f"sum by (phase) (testbed_sweep_phase_seconds_total{{{R}}})", "seconds",
                        instant=True),
            ], [_transformation("merge"), _organize({"Value": "seconds"}),
                _transformation("sortBy", sort=[{"field": "seconds", "desc": True}], fields={})],
                unit="s", x="phase", w=24, h=8,
                description="Wall time of the sweep so far by phase (link change, tail and head load, head "
                            "delivery over the downlink, part KPIs, warm-up, sampling, result writing, other), "
                            "all profiles; the phases add up to the sweep's wall time."),
        ]),
    ])


def per_layer() -> dm.Dashboard:
    node_sel = 'run="$run", node=~"$node"'
    return _dashboard("testbed-per-layer", "Testbed · Per-layer",
                      "Per-layer latency on each node, output sizes, and per-part KPIs.", [
        ("Layers", [
            _barchart("Mean latency per layer, per node", [
                _target("A", f"testbed_layer_latency_mean_seconds{{{node_sel}}}", "{{node}}", instant=True),
            ], [_transformation("groupingToMatrix", columnField="node", rowField="layer", valueField="Value"),
                _organize({"layer\\node": "layer"}, exclude=()),
                *_sorted_by("layer")], unit="s", x="layer", w=24, h=9),
            _bars_by_split("Output bytes per layer", [
                ("output", f"max by (layer) (testbed_layer_output_bytes{{{R}}})"),
            ], unit="bytes", log=True, x="layer", w=12),
            _bars_by_split("p90 latency per layer (selected nodes, worst)", [
                ("p90", f"max by (layer) (testbed_layer_latency_p90_seconds{{{node_sel}}})"),
            ], unit="s", x="layer", w=12),
            _table("Per-layer profile", [
                _target("A", f"testbed_layer_latency_mean_seconds{{{node_sel}}}", instant=True),
                _target("B", f"testbed_layer_latency_p50_seconds{{{node_sel}}}", instant=True),
                _target("C", f"testbed_layer_latency_p90_seconds{{{node_sel}}}", instant=True),
                _target("D", f"testbed_layer_latency_stddev_seconds{{{node_sel}}}", instant=True),
            ], [_transformation("merge"),
                _organize({"Value #A": "mean (s)", "Value #B": "p50 (s)", "Value #C": "p90 (s)",
                           "Value #D": "std (s)"}, HIDDEN_LABELS),
                *_sorted_by("layer")], w=24, h=10),
        ]),
        ("Parts (benchmark KPIs, fresh process per part)", [
            _bars_by_split("Part file size per split", [
                ("head", f'max by (split) (testbed_part_file_bytes{{{R}, part="head"}})'),
                ("tail", f'max by (split) (testbed_part_file_bytes{{{R}, part="tail"}})'),
            ], unit="bytes", w=8),
            _bars_by_split("Peak memory per split", [
                ("local (head)", f'max by (split) (testbed_part_peak_memory_bytes{{{R}, node="local"}})'),
                ("remote (tail)", f'max by (split) (testbed_part_peak_memory_bytes{{{R}, node="remote"}})'),
            ], unit="bytes", w=8),
            _bars_by_split("Steady-state inference per split", [
                ("local (head)", f'max by (split) (testbed_part_steady_mean_seconds{{{R}, node="local"}})'),
                ("remote (tail)", f'max by (split) (testbed_part_steady_mean_seconds{{{R}, node="remote"}})'),
            ], unit="s", w=8),
        ]),
    ])


def nodes() -> dm.Dashboard:
    agent = 'job="testbed", component="agent", run="$run", node=~"$node"'
    return _dashboard("testbed-nodes", "Testbed · Nodes", "CPU, memory and file descriptors of the node agents.", [
        ("Agent processes", [
            _timeseries("CPU", [
                _target("A", f"rate(process_cpu_seconds_total{{{agent}}}[$__rate_interval])", "{{node}}"),
            ], unit="percentunit", w=8, description="CPU seconds per second of the agent process (1 = one core)."),
            _timeseries("Resident memory", [
                _target("A", f"process_resident_memory_bytes{{{agent}}}", "{{node}}"),
            ], unit="bytes", w=8),
            _timeseries("Open file descriptors", [
                _target("A", f"process_open_fds{{{agent}}}", "{{node}}"),
            ], unit="none", w=8),
        ]),
        ("Work served", [
            _timeseries("Samples served per second", [
                _target("A", f"sum by (node, role) (rate(testbed_agent_samples_served_total{{{agent}}}"
                             f"[$__rate_interval]))", "{{node}} {{role}}"),
            ], unit="none", w=12),
            _timeseries("Mean inference time per node and part (agent)", [
                _target("A", _mean("testbed_agent_inference_seconds", agent, "node, part"), "{{node}} {{part}}"),
            ], unit="s", w=12),
            _bars_by_split("Inference per split as the sweep measured it (profile $profile)", [
                ("local (head)", _mean("testbed_inference_seconds", RP + ', node="local", node=~"$node"', "split")),
                ("remote (tail)", _mean("testbed_inference_seconds", RP + ', node="remote", node=~"$node"', "split")),
            ], unit="s", w=24),
        ]),
        phone_row(),
    ])


def phone_row() -> tuple[str, list]:
    """The Android phone's row (local node on a phone): temperature and CPU frequency over the run."""
    sel = 'run="$run"'
    return ("Phone (Android local node)", [
        _timeseries("Phone temperature", [
            _target("A", f"testbed_phone_temperature_celsius{{{sel}}}", "{{model}} {{serial}} {{zone}}"),
        ], unit="celsius", w=12, description="Thermal zones and battery, read before and after each configuration."),
        _timeseries("Phone CPU frequency", [
            _target("A", f"testbed_phone_cpu_frequency_hertz{{{sel}}}", "{{model}} cpu{{cpu}}"),
            _target("B", f"testbed_phone_thermal_status{{{sel}}}", "thermal status"),
        ], unit="hertz", w=12, description="scaling_cur_freq per core; a drop below cpuinfo_max_freq while "
                                           "the thermal status rises is throttling."),
    ])


def link() -> dm.Dashboard:
    by = "direction"
    achieved_rate = (f"sum by ({by}) (testbed_link_transferred_bytes_total{{{RP}}}) * 8"
                     f" / sum by ({by}) (testbed_link_busy_seconds_total{{{RP}}})")
    achieved_delay = (f"(sum by ({by}) (testbed_link_busy_seconds_total{{{RP}}})"
                      f" - sum by ({by}) (testbed_link_transferred_bytes_total{{{RP}}})"
                      f" / sum by ({by}) (testbed_link_configured_rate_bytes_per_second{{{RP}}}))"
                      f" / sum by ({by}) (testbed_link_transfers_total{{{RP}}})")
    return _dashboard("testbed-link", "Testbed · Link", "Configured versus achieved link rate and delay.", [
        ("Configured vs achieved (profile $profile)", [
            _timeseries("Rate per direction", [
                _target("A", f"testbed_link_configured_rate_bytes_per_second{{{RP}}} * 8", "{{direction}} configured"),
                _target("B", achieved_rate, "{{direction}} achieved"),
            ], unit="bps", description="Achieved = payload bits / time on the link, over every transfer of known "
                                       "size (samples and model delivery); it includes the one-way delay, so it "
                                       "sits below the configured rate for small transfers."),
            _timeseries("One-way delay per direction", [
                _target("A", f"testbed_link_configured_delay_seconds{{{RP}}}", "{{direction}} configured"),
                _target("B", achieved_delay, "{{direction}} achieved"),
            ], unit="s", description="Achieved = mean transfer time minus mean bytes / configured rate: "
                                     "what a transfer spent beyond serialisation at the configured rate."),
            _stat("Configured loss",
                  [_target("A", f"testbed_link_configured_loss_ratio{{{RP}}}", "{{direction}}")],
                  unit="percentunit", w=6),
            _stat("Configured jitter",
                  [_target("A", f"testbed_link_configured_jitter_seconds{{{RP}}}", "{{direction}}")], unit="s", w=6),
            _stat("Emulation", [_target("A", f"testbed_link_emulation_info{{{RP}}}", "{{direction}}: {{emulation}}")],
                  text_mode=cm.BigValueTextMode.NAME, w=12,
                  description="How the kernel emulates each direction (tbf, tbf+netem, htb, htb+netem, netem)."),
        ]),
        ("Transfers per split (profile $profile)", [
            _bars_by_split("Transfer time p50 per split", [
                ("uplink", f'histogram_quantile(0.5, sum by (le, split) '
                           f'(testbed_transfer_seconds_bucket{{{RP}, direction="uplink"}}))'),
                ("downlink", f'histogram_quantile(0.5, sum by (le, split) '
                             f'(testbed_transfer_seconds_bucket{{{RP}, direction="downlink"}}))'),
            ], unit="s", log=True),
            _bars_by_split("Model delivery per split (head part over the downlink)", [
                ("delivery", f"max by (split) (testbed_model_delivery_seconds{{{RP}}})"),
            ], unit="s"),
        ]),
    ])


DASHBOARDS: dict[str, Callable[[], dm.Dashboard]] = {
    "sweep-overview.json": sweep_overview, "per-layer.json": per_layer, "nodes.json": nodes, "link.json": link}


def render() -> dict[str, str]:
    """File name -> JSON text, as committed."""
    return {name: json.dumps(build(), cls=JSONEncoder, indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
