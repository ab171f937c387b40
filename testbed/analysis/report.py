"""``testbed report RUN_DIR``: the run as figures and tables a researcher can cite.

Owns what the report says and how it is laid out: the tables (computed from the
result files, written as CSV and shown in the HTML with the very same values),
the order of sections, and the self-contained ``report.html`` (PNGs embedded as
base64, inline CSS, no script, nothing fetched). The page's markup is the
jinja2 template ``templates/report.html.j2`` (package data), rendered with
autoescape on; this module hands it plain values. Reads result files only (via
``testbed.analysis.run_data``), so a report rebuilds from a copied folder. Figures are
drawn by ``testbed.analysis.plots``; predictions come from ``testbed.analysis.planner``.

Output folder (default ``RUN_DIR/report``)::

    report.html         everything, self-contained
    *.png               each figure
    *.csv               each table (base units: seconds, bytes, bit/s)
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from testbed.analysis import plots
from testbed.analysis.run_data import RunData
from testbed.analysis.tables import Column, Table, csv_cell, display, write_csv
from testbed.errors import TestbedError
from testbed.units import format_bytes

# --- tables ----------------------------------------------------------------------


def _speedup(anchor: float | None, value: float | None) -> float | None:
    return anchor / value if anchor and value else None


def best_split_table(runs: Sequence[RunData]) -> Table:
    """Best split per profile (lowest measured e2e p50) and its speedup over each anchor."""
    rows = []
    for run in runs:
        for prof in run.profiles:
            cfg = [r for r in run.config_rows(prof) if r.get("e2e_p50_s") is not None]
            if not cfg:
                continue
            b = min(cfg, key=lambda r: (r["e2e_p50_s"], -r["split"]))
            row = {"run": run.label, "profile": prof, "topology": run.topology,
                   "uplink_rate_bps": b.get("uplink_rate_bps"),
                   "downlink_rate_bps": b.get("downlink_rate_bps"), "best_split": b["split"],
                   "e2e_p50_s": b["e2e_p50_s"], "e2e_p90_s": b.get("e2e_p90_s"),
                   "cut_bytes_wire": b.get("cut_bytes_wire") if b["split"] != run.num_layers else 0}
            anchors = run.anchors
            for name in ("network", "device"):
                k = anchors.get(name)
                a = run.row(prof, k) if k is not None else None
                row[f"{name}_anchor_p50_s"] = a.get("e2e_p50_s") if a else None
                row[f"speedup_vs_{name}"] = _speedup(row[f"{name}_anchor_p50_s"], b["e2e_p50_s"])
            rows.append(row)
    cols = [Column("run", "run"), Column("profile", "profile"), Column("topology", "topology", "int"),
            Column("uplink_rate_bps", "uplink", "rate"), Column("downlink_rate_bps", "downlink", "rate"),
            Column("best_split", "best split k", "int"), Column("e2e_p50_s", "e2e p50", "ms"),
            Column("e2e_p90_s", "e2e p90", "ms"), Column("cut_bytes_wire", "intermediate data", "bytes"),
            Column("network_anchor_p50_s", "network anchor p50 (k=0; topologies 2/3: k=N)", "ms"),
            Column("speedup_vs_network", "speedup vs network", "ratio"),
            Column("device_anchor_p50_s", "device anchor p50 (k=N; topologies 2/3: k=0)", "ms"),
            Column("speedup_vs_device", "speedup vs device", "ratio")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("best_split", "Best split per profile", cols, rows,
                 note="Best = lowest measured end-to-end latency p50 among the measured split points; "
                      "speedup = anchor p50 ÷ best p50 (– when that anchor was not measured).")


def configurations_table(runs: Sequence[RunData]) -> Table:
    rows = []
    for run in runs:
        for r in run.summary:
            up = r.get("uplink_mean_s")
            wire = r.get("cut_bytes_wire")
            rows.append({
                "run": run.label, "profile": r["profile"], "split": r["split"], "count": r.get("count"),
                **{c: r.get(c) for c in ("e2e_p50_s", "e2e_p50_ci_low_s", "e2e_p50_ci_high_s", "e2e_p50_ci_level",
                                         "e2e_p90_s", "e2e_mean_s", "head_mean_s", "encode_mean_s",
                                         "uplink_mean_s", "tail_mean_s", "downlink_mean_s", "decode_mean_s",
                                         "cut_bytes_raw", "cut_bytes_wire", "delivery_s",
                                         "head_file_bytes", "tail_file_bytes", "repeats",
                                         "e2e_p50_repeat_spread")},
                # Achieved bitrate of the intermediate data over the uplink (SA4 "intermediate data bitrate").
                "bitrate_bps": (wire * 8 / up) if wire and up else None,
                "emulation": f"{r.get('emulation_uplink') or '-'}/{r.get('emulation_downlink') or '-'}",
            })
    cols = [Column("run", "run"), Column("profile", "profile"), Column("split", "k", "int"),
            Column("count", "samples", "int"),
            Column("e2e_p50_s", "e2e p50", "ms"), Column("e2e_p50_ci_low_s", "p50 CI low", "ms"),
            Column("e2e_p50_ci_high_s", "p50 CI high", "ms"), Column("e2e_p50_ci_level", "CI level", "float"),
            Column("e2e_p90_s", "e2e p90", "ms"),
            Column("e2e_mean_s", "e2e mean", "ms"), Column("head_mean_s", "local inference", "ms"),
            Column("encode_mean_s", "encode", "ms"), Column("uplink_mean_s", "uplink delivery", "ms"),
            Column("tail_mean_s", "remote inference", "ms"), Column("downlink_mean_s", "downlink", "ms"),
            Column("decode_mean_s", "decode", "ms"), Column("cut_bytes_raw", "intermediate raw", "bytes"),
            Column("cut_bytes_wire", "intermediate wire", "bytes"),
            Column("bitrate_bps", "intermediate bitrate", "rate"), Column("delivery_s", "model delivery", "ms"),
            Column("head_file_bytes", "head file", "bytes"), Column("tail_file_bytes", "tail file", "bytes"),
            Column("repeats", "repeats", "int"), Column("e2e_p50_repeat_spread", "repeat spread", "ratio"),
            Column("emulation", "emulation up/down")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("configurations", "Every configuration (means unless stated)", cols, rows, collapsed=True,
                 note="Intermediate bitrate = wire bytes × 8 ÷ mean uplink delivery time. p50 CI: "
                      "distribution-free confidence interval of the median from order statistics, at the level "
                      "shown (below 95 % only when there are too few samples to reach it). Repeat spread: "
                      "largest ÷ smallest median e2e among the sweep's repeats.")


def fidelity_table(runs: Sequence[RunData]) -> Table:
    """Per configuration: how close the emulated link came to its ideal, and what the
    nodes' scheduling added (receive lag, CPU throttling) — so a reader sees the
    emulation's error and its explanation beside every measurement."""
    rows = []
    for run in runs:
        for r in run.summary:
            rows.append({"run": run.label, "profile": r["profile"], "split": r["split"],
                         **{c: r.get(c) for c in (
                             "uplink_ideal_s", "uplink_p50_s", "uplink_over_ideal_p50", "downlink_ideal_s",
                             "downlink_p50_s", "downlink_over_ideal_p50", "delivery_ideal_s", "delivery_s",
                             "remote_rx_lag_p90_s", "local_rx_lag_p90_s", "local_throttled_samples",
                             "remote_throttled_samples", "local_cpu_mean_s", "remote_cpu_mean_s",
                             "local_runq_wait_p50_s", "remote_runq_wait_p50_s", "count")},
                         "delivery_over_ideal": (r["delivery_s"] / r["delivery_ideal_s"]
                                                 if r.get("delivery_s") and r.get("delivery_ideal_s") else None)})
    cols = [Column("run", "run"), Column("profile", "profile"), Column("split", "k", "int"),
            Column("uplink_ideal_s", "uplink ideal", "ms"), Column("uplink_p50_s", "uplink p50", "ms"),
            Column("uplink_over_ideal_p50", "uplink ÷ ideal", "float"),
            Column("downlink_ideal_s", "downlink ideal", "ms"), Column("downlink_p50_s", "downlink p50", "ms"),
            Column("downlink_over_ideal_p50", "downlink ÷ ideal", "float"),
            Column("delivery_ideal_s", "delivery ideal", "ms"), Column("delivery_s", "delivery", "ms"),
            Column("delivery_over_ideal", "delivery ÷ ideal", "float"),
            Column("remote_rx_lag_p90_s", "remote rx lag p90", "ms"),
            Column("local_rx_lag_p90_s", "local rx lag p90", "ms"),
            Column("local_throttled_samples", "local throttled samples", "int"),
            Column("remote_throttled_samples", "remote throttled samples", "int"),
            Column("local_cpu_mean_s", "local CPU/sample", "ms"), Column("remote_cpu_mean_s", "remote CPU/sample", "ms"),
            Column("local_runq_wait_p50_s", "local run-queue wait p50", "ms"),
            Column("remote_runq_wait_p50_s", "remote run-queue wait p50", "ms"),
            Column("count", "samples", "int")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("fidelity", "Emulation fidelity and what the nodes added", cols, rows, collapsed=True,
                 note="Ideal = one-way delay + wire bytes (payload + per-segment TCP/IP/Ethernet headers at the "
                      "measured MSS and MTU) × 8 ÷ configured rate; empty for unshaped or time-varying "
                      "directions. A transfer after an idle period starts with a full token bucket, so small "
                      "transfers can come in slightly under 1. Receive lag = time between the kernel receiving "
                      "the last byte and the node's process reading it (scheduling, CPU quota). Throttled samples "
                      "= samples during which the node's cgroup was CFS-throttled; run-queue wait = time the node's measuring "
                      "thread was ready but another task held its CPU.")


def phase_table(runs: Sequence[RunData]) -> Table:
    """Per profile: wall time by phase, summed over the profile's configurations."""
    from testbed.analysis.results import PHASES

    rows = []
    for run in runs:
        for prof in run.profiles:
            mine = [r for r in run.repeat_rows if r["profile"] == prof]
            row = {"run": run.label, "profile": prof, "configurations": len(mine),
                   "wall_s": sum(r.get("wall_s") or 0.0 for r in mine)}
            row.update({f"phase_{p}_s": sum(r.get(f"phase_{p}_s") or 0.0 for r in mine) for p in PHASES})
            rows.append(row)
    cols = [Column("run", "run"), Column("profile", "profile"), Column("configurations", "configurations", "int"),
            Column("wall_s", "wall", "ms")] + [Column(f"phase_{p}_s", p.replace("_", " "), "ms") for p in PHASES]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("sweep_phases", "Wall time by phase, per profile", cols, rows,
                 note="Sums over the profile's configurations (all repeats).")


def repeat_table(runs: Sequence[RunData]) -> Table:
    """Per configuration and repeat: the median e2e, so the spread between repeats is visible."""
    rows = []
    for run in runs:
        for r in run.repeat_rows:
            rows.append({"run": run.label, "repeat": r.get("repeat"), "profile": r["profile"], "split": r["split"],
                         "count": r.get("count"), "e2e_p50_s": r.get("e2e_p50_s"),
                         "e2e_p50_ci_low_s": r.get("e2e_p50_ci_low_s"), "e2e_p50_ci_high_s": r.get("e2e_p50_ci_high_s"),
                         "wall_s": r.get("wall_s")})
    cols = [Column("run", "run"), Column("repeat", "repeat", "int"), Column("profile", "profile"),
            Column("split", "k", "int"), Column("count", "samples", "int"), Column("e2e_p50_s", "e2e p50", "ms"),
            Column("e2e_p50_ci_low_s", "p50 CI low", "ms"), Column("e2e_p50_ci_high_s", "p50 CI high", "ms"),
            Column("wall_s", "wall", "ms")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("repeats", "Every repeat of every configuration", cols, rows, collapsed=True,
                 note="Configurations were walked in a shuffled order per repeat (seed in config.yaml: "
                      "order_seed), so drift of the host is not confounded with the split point.")


def kpi_table(runs: Sequence[RunData]) -> Table:
    rows, seen = [], set()
    for run in runs:
        for r in run.parts:
            key = (run.label, r.get("split"), r.get("part"), r.get("node"))
            if key in seen:
                continue  # KPIs are per part and node; the same part under several profiles measures once
            seen.add(key)
            rows.append({"run": run.label, **{c: r.get(c) for c in (
                "split", "part", "node", "file_bytes", "init_s", "first_s", "warmup_mean_s", "steady_mean_s",
                "steady_std_s", "init_memory_bytes", "peak_memory_bytes")}})
    rows.sort(key=lambda r: (r["run"], r["split"] if r["split"] is not None else -1, str(r["part"])))
    cols = [Column("run", "run"), Column("split", "k", "int"), Column("part", "part"), Column("node", "node"),
            Column("file_bytes", "file size", "bytes"), Column("init_s", "init", "ms"),
            Column("first_s", "first inference", "ms"), Column("warmup_mean_s", "warm-up mean", "ms"),
            Column("steady_mean_s", "steady mean", "ms"), Column("steady_std_s", "steady std", "ms"),
            Column("init_memory_bytes", "init memory", "bytes"), Column("peak_memory_bytes", "peak memory", "bytes")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("part_kpis", "Benchmark KPIs per part (fresh process per part)", cols, rows, collapsed=True)


def layer_table(runs: Sequence[RunData]) -> Table:
    rows = []
    for run in runs:
        by = {}
        for r in run.layers:
            d = by.setdefault(r["layer"], {"run": run.label, "layer": r["layer"], "op": r.get("op"),
                                           "output_bytes": r.get("output_bytes"), "macs": r.get("macs"),
                                           "param_bytes": r.get("param_bytes")})
            d[f"{r['node']}_mean_s"] = r.get("mean_s")
            d[f"{r['node']}_p90_s"] = r.get("p90_s")
        rows += [by[k] for k in sorted(by)]
    cols = [Column("run", "run"), Column("layer", "layer", "int"), Column("op", "op"),
            Column("output_bytes", "output", "bytes"), Column("param_bytes", "params", "bytes"),
            Column("macs", "MACs", "int"), Column("local_mean_s", "local mean", "ms"),
            Column("local_p90_s", "local p90", "ms"), Column("remote_mean_s", "remote mean", "ms"),
            Column("remote_p90_s", "remote p90", "ms")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("layer_profile", "Per-layer profile", cols, rows, collapsed=True)


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(data, dict):
        out = []
        for k in data:
            out += _flatten(data[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(data, list) and all(not isinstance(x, (dict, list)) for x in data):
        return [(prefix, ", ".join(map(str, data)))]
    if isinstance(data, list):
        return [(prefix, json.dumps(data, sort_keys=True, default=str))]
    return [(prefix, "" if data is None else str(data))]


def environment_table(runs: Sequence[RunData]) -> Table:
    rows = []
    for run in runs:
        rows.append({"run": run.label, "key": "emulation (uplink/downlink)", "value": run.emulation()})
        rows += [{"run": run.label, "key": k, "value": v} for k, v in _flatten(run.environment)]
        nodes = (run.config or {}).get("nodes") or {}
        for name, spec in nodes.items():
            if not isinstance(spec, dict):  # e.g. pinning: auto
                rows.append({"run": run.label, "key": f"config.nodes.{name}", "value": str(spec)})
                continue
            for k, v in spec.items():
                rows.append({"run": run.label, "key": f"config.nodes.{name}.{k}", "value": "" if v is None else str(v)})
    cols = [Column("run", "run"), Column("key", "what"), Column("value", "value")]
    if len(runs) == 1:
        cols = cols[1:]
    return Table("environment", "Environment: what was measured, where", cols, rows)


def planner_tables(evaluation: Any) -> list[Table]:
    conf = Table("planner_configurations", "Planner: predicted vs measured per configuration", [
        Column("profile", "profile"), Column("split", "k", "int"),
        Column("predicted_e2e_s", "predicted e2e", "ms"), Column("measured_e2e_mean_s", "measured mean", "ms"),
        Column("measured_e2e_p50_s", "measured p50", "ms"), Column("error_pct", "error", "pct"),
        Column("predicted_head_s", "pred. head", "ms"), Column("predicted_uplink_s", "pred. uplink", "ms"),
        Column("predicted_tail_s", "pred. tail", "ms"), Column("predicted_downlink_s", "pred. downlink", "ms"),
    ], evaluation.configurations, collapsed=True)
    choice = Table("planner_choices", "Planner: chosen split vs best measured split", [
        Column("profile", "profile"), Column("chosen_split", "chosen k", "int"),
        Column("predicted_e2e_s", "predicted e2e", "ms"),
        Column("chosen_e2e_mean_s", "measured mean of choice", "ms"),
        Column("best_split_mean", "best k (mean)", "int"), Column("best_e2e_mean_s", "best measured mean", "ms"),
        Column("ratio_mean", "choice ÷ best (mean)", "ratio"),
        Column("best_split_p50", "best k (p50)", "int"), Column("ratio_p50", "choice ÷ best (p50)", "ratio"),
        Column("offload_chosen_split", "chosen k < N", "int"), Column("offload_best_split", "best k < N", "int"),
        Column("offload_ratio_mean", "choice ÷ best, k < N (mean)", "ratio"),
    ], evaluation.choices,
        note=f"Model inputs: {evaluation.model.source}. Goal: choice ÷ best ≤ 1.05. The k < N columns repeat "
             "the judgement among offloading split points only (a harder test when the device anchor wins).")
    return [choice, conf]


GLOSSARY = [
    ("split model file size", "head_file_bytes, tail_file_bytes, file_bytes"),
    ("intermediate data size", "cut_bytes_raw (before the codec), cut_bytes_wire (framed, on the link)"),
    ("intermediate data bitrate", "bitrate_bps = cut_bytes_wire × 8 ÷ uplink_mean_s"),
    ("local inference time", "head_s (head part on the local node)"),
    ("remote inference time", "tail_s (tail part on the remote node)"),
    ("encode / decode time", "encode_s, remote_decode_s, remote_encode_s, decode_s"),
    ("intermediate data delivery time", "uplink_s (first byte out → last byte received by the remote's kernel); "
                                        "downlink_s for results; uplink_ideal_s / downlink_ideal_s beside them"),
    ("end-to-end latency", "e2e_s (start of head → final output available locally)"),
    ("split model delivery time", "delivery_s (head part, remote → local over the shaped downlink)"),
    ("memory", "init_memory_bytes, peak_memory_bytes (per part, fresh process)"),
]


# --- HTML ----------------------------------------------------------------------------
# The page itself is templates/report.html.j2 (package data), rendered with autoescape on:
# values reach the template unescaped and the template escapes every one of them.


@dataclass
class Figure:
    """A figure as the page embeds it."""

    stem: str
    file: str      # the PNG's file name beside report.html
    caption: str
    data: str      # the PNG, base64


@dataclass
class Section:
    """One ``<h2>`` of the page: a figure (or a note saying why there is none), the planner's
    headline ratio, then tables."""

    title: str
    figure: Figure | None = None
    note: str = ""
    ratio: float | None = None
    tables: list[Table] = field(default_factory=list)


def _figure(path: Path, caption: str) -> Figure:
    return Figure(path.stem, path.name, caption, base64.b64encode(path.read_bytes()).decode("ascii"))


def _render(**context: Any) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("testbed.analysis", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["csv_cell"] = csv_cell
    env.filters["display"] = display
    return env.get_template("report.html.j2").render(**context)


@dataclass
class Report:
    html_path: Path
    figures: dict[str, Path]
    tables: dict[str, Path]
    evaluation: Any = None
    warnings: list[str] | None = None


FIGURES: list[tuple[str, str, Callable[..., Path | None], str]] = [
    ("e2e", "End-to-end latency", plots.e2e_vs_split,
     "End-to-end latency p50 per split point, one line per profile, band p10–p90; stars mark the anchors "
     "(k=0: everything remote, the input crosses the uplink; k=N: everything on the local node)."),
    ("stacked", "Where the time goes", plots.stacked_time,
     "Mean local inference (head), encode, uplink delivery, remote decode, remote inference (tail), result "
     "encode, downlink, decode; the black tick is the mean e2e."),
    ("intermediate_bytes", "Intermediate data", plots.cut_bytes,
     "Intermediate data size per split point, raw and on the wire, against the model input size (log axis)."),
    ("layers", "Per-layer profile", plots.per_layer,
     "Per-layer latency on the local and the remote node (each layer run as its own model under the node's "
     "CPU limit), and each layer's output size."),
    ("parts", "Split model files and delivery", plots.part_sizes,
     "Head and tail file sizes per split point; time to deliver the head to the local node over the shaped "
     "downlink."),
    ("kpis", "Benchmark KPIs per part", plots.part_kpis,
     "benchmark_model KPIs of each part on its node, each in a fresh process: init, first inference, warm-up "
     "mean, steady-state mean; init and peak memory."),
    ("fidelity", "Emulation fidelity", plots.fidelity,
     "Measured transfer time ÷ its framing-aware ideal (delay + wire bytes at the configured rate), per split "
     "point and direction, and for the head delivery: the emulation's own error."),
    ("sweep_time", "Where the sweep's time went", plots.sweep_time,
     "Wall time of the sweep per profile by phase: link change, split (parts written and verified), tail load, "
     "head delivery over the shaped downlink, head load, KPI measurement, warm-up, sampling, writing results, "
     "other. The phases of every configuration add up to its wall_s."),
    ("repeatability", "Repeatability", plots.repeatability,
     "Each repeat's median e2e ÷ the median over all repeats, per configuration (only for runs.repeat > 1)."),
]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 compare: Sequence[str | Path] = ()) -> Report:
    """Write ``report.html``, the PNGs and the table CSVs for a run (plus overlays).

    Raises:
        TestbedError: a folder is not a run folder or holds no finished configuration.
    """
    runs = [RunData.load(run_dir)] + [RunData.load(c) for c in compare]
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):  # two folders with one name (a/run, b/run) need distinct labels
        if labels.count(r.label) > 1:
            r.label = f"{r.label}#{i + 1}"
    out = Path(out_dir) if out_dir else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []

    figures: dict[str, Path] = {}
    sections: list[Section] = []
    tables = [best_split_table(runs), configurations_table(runs), layer_table(runs), kpi_table(runs),
              fidelity_table(runs), phase_table(runs)]
    if runs[0].repeats > 1:
        tables.append(repeat_table(runs))
    # Which tables follow which figure (every table is shown, drawn or not).
    after = {"e2e": tables[:2], "layers": tables[2:3], "kpis": tables[3:4], "fidelity": tables[4:5],
             "sweep_time": tables[5:6], "repeatability": tables[6:7]}
    for stem, title, fn, caption in FIGURES:
        if stem == "repeatability" and runs[0].repeats < 2:
            continue  # a single sweep has no repeats to compare
        path = fn(runs, out / f"{stem}.png")
        section = Section(title, tables=after.get(stem, []))
        if path is None:
            warnings.append(f"{title}: nothing to draw in this run")
            section.note = "Nothing recorded for this figure."
        else:
            figures[stem] = path
            section.figure = _figure(path, caption)
        sections.append(section)

    data_path_sections = _data_path_sections(runs, out, figures)
    sections += data_path_sections
    tables += [t for sec in data_path_sections for t in sec.tables]
    planner_section, evaluation = _planner_section(runs[0], out, figures, warnings)
    sections.append(planner_section)
    tables += planner_section.tables
    env = environment_table(runs)
    tables.append(env)
    sections.append(Section("Environment", tables=[env]))

    table_paths = {t.name: write_csv(t, out) for t in tables}
    page = _render(title=f"Split inference report: {(runs[0].config or {}).get('name') or runs[0].label}",
                   facts=_facts(runs), warnings=warnings, sections=sections, glossary=GLOSSARY)
    html_path = out / "report.html"
    tmp = html_path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    return Report(html_path, figures, table_paths, evaluation, warnings)


def _data_path_sections(runs: Sequence[RunData], out: Path, figures: dict[str, Path]) -> list[Section]:
    """Topology, codec, fidelity, streams, UDP and CPU per part (``data_path_report``): one
    section per figure, the tables under the last."""
    from testbed.analysis import data_path_report

    drawn, extra = data_path_report.section(runs, out, figures)
    sections = []
    for title, path, caption in drawn:
        section = Section(f"Data path: {title}")
        if path is None:
            section.note = "Nothing recorded for this figure."
        else:
            section.figure = _figure(path, caption)
        sections.append(section)
    if not sections:
        sections.append(Section("Data path"))
    sections[-1].tables = list(extra)
    return sections


def _planner_section(run: RunData, out: Path, figures: dict[str, Path], warnings: list[str]) -> tuple[Section, Any]:
    """The planner's section and its evaluation (None when the run cannot be planned)."""
    from testbed.analysis import planner

    section = Section("Split-point planner")
    try:
        evaluation = planner.evaluate(run.path)
    except TestbedError as e:
        warnings.append(f"planner: {e}")
        section.note = f"Planner not evaluated: {e}"
        return section, None
    path = plots.planner(evaluation, out / "planner.png")
    if path is not None:
        figures["planner"] = path
        section.figure = _figure(path, "Predicted (per-layer latencies + bytes·8/rate + delay) vs measured "
                                       "mean e2e, and the distribution of the prediction error.")
    section.ratio = evaluation.worst_ratio()
    section.tables = planner_tables(evaluation)
    return section, evaluation


def _facts(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    """The page's opening table: what was run, on what, how much."""
    run = runs[0]
    cfg = run.config or {}
    n_cfg = len(run.summary)
    model = (run.manifest.get("model") or {})
    facts = [
        ("experiment", cfg.get("name") or "–"),
        ("run folder", str(run.path)),
        ("model", f"{Path(str(model.get('path', '') or '')).name or '–'} ({model.get('layers', '?')} layers, "
                  f"{format_bytes(model['bytes']) if model.get('bytes') else '?'})"),
        ("configurations", f"{len(run.repeat_rows) or n_cfg} ({len(run.profiles)} profiles × {len(run.splits)} "
                           f"split points" + (f" × {run.repeats} repeats)" if run.repeats > 1 else ")")),
        ("samples", str(sum(r.get("count") or 0 for r in run.summary))),
        ("emulation", run.emulation()),
    ]
    if len(runs) > 1:
        facts.append(("compared with", ", ".join(r.label for r in runs[1:])))
    return facts
