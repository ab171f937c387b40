"""The report's data-path section: topology, codec, fidelity, streams, UDP, CPU per part.

Two figures and two tables, appended to ``report.html`` by ``testbed.analysis.report``:

* ``max_fps.png`` — max sustainable frame rate per split point (1 / the slowest
  pipeline stage, ``testbed.sweep.data_path``), one line per profile; a stream run's
  achieved throughput marked beside it;
* ``stream_e2e.png`` — e2e vs frame index of stream runs (queueing shows as a climb,
  drops as gaps), only when the run streamed;
* ``data_path`` table — per configuration: topology, codec, transport, compression
  ratio, fidelity (max abs error, SNR, keypoint drift, lossless samples), datagrams
  sent/lost, stream throughput and drops, e2e p50/p90/p99, bitrate and utilisation per
  direction, and each part's CPU time next to its wall time on the node that ran it;
* ``max_fps`` table — the same max sustainable fps as a table.

Reads result rows only (``RunData``); the measuring is the sweep's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from testbed.analysis import plots
from testbed.analysis.run_data import RunData
from testbed.analysis.tables import Column, Table


def _streamed(runs: Sequence[RunData]) -> bool:
    return any(r.get("mode") == "stream" for run in runs for r in run.summary)


def data_path_table(runs: Sequence[RunData]) -> Table:
    rows = []
    for run in runs:
        for r in run.summary:
            rows.append({"run": run.label, **{c.key: r.get(c.key) for c in _COLUMNS if c.key != "run"}})
    cols = list(_COLUMNS) if len(runs) > 1 else list(_COLUMNS[1:])
    return Table("data_path", "Data path per configuration: codec, fidelity, stream, transport, CPU per part",
                 cols, rows, collapsed=True,
                 note="Fidelity compares each sample's final outputs with the uncompressed split's on the same "
                      "input (raw codec, TCP; measured before the samples): max abs error, SNR (empty when bitwise "
                      "equal), PoseNet keypoints decoded from heatmaps + offsets and their drift in pixels; "
                      "'lossless samples' counts bitwise-equal ones. Bitrate = bytes each direction carried × 8 ÷ "
                      "the stream's duration (single mode: ÷ the samples' summed e2e); utilisation = bitrate ÷ "
                      "configured rate. CPU = the node's cgroup CPU time (user + sys) during the part's invoke, "
                      "beside the part's wall time, on the node named.")


_COLUMNS = (
    Column("run", "run"), Column("profile", "profile"), Column("split", "k", "int"),
    Column("topology", "topology", "int"), Column("codec", "codec"), Column("transport", "transport"),
    Column("mode", "mode"), Column("cut_ratio", "wire ÷ raw", "float"),
    Column("max_abs_err_max", "max abs error", "float"), Column("snr_db_p50", "SNR p50 (dB)", "float"),
    Column("kp_drift_mean_px", "keypoint drift mean (px)", "float"),
    Column("kp_drift_max_px", "keypoint drift max (px)", "float"),
    Column("bitwise_equal_samples", "lossless samples", "int"),
    Column("packets_sent", "datagrams sent", "int"), Column("packets_lost", "datagrams lost", "int"),
    Column("frames_lost", "frames lost", "int"),
    Column("fps", "offered fps", "float"), Column("throughput_fps", "throughput (fps)", "float"),
    Column("drop_rate", "drop rate", "float"), Column("max_sustainable_fps", "max sustainable fps", "float"),
    Column("e2e_p50_s", "e2e p50", "ms"), Column("e2e_p90_s", "e2e p90", "ms"), Column("e2e_p99_s", "e2e p99", "ms"),
    Column("uplink_bitrate_bps", "uplink bitrate", "rate"), Column("uplink_utilisation", "uplink util.", "float"),
    Column("downlink_bitrate_bps", "downlink bitrate", "rate"),
    Column("downlink_utilisation", "downlink util.", "float"),
    Column("head_node", "head on"), Column("head_mean_s", "head wall", "ms"), Column("head_cpu_mean_s", "head CPU", "ms"),
    Column("tail_node", "tail on"), Column("tail_mean_s", "tail wall", "ms"), Column("tail_cpu_mean_s", "tail CPU", "ms"),
)


def max_fps_table(runs: Sequence[RunData]) -> Table:
    rows = [{"run": run.label, "profile": r["profile"], "split": r["split"], "topology": r.get("topology"),
             "max_sustainable_fps": r.get("max_sustainable_fps"), "throughput_fps": r.get("throughput_fps"),
             "fps": r.get("fps"), "drop_rate": r.get("drop_rate")}
            for run in runs for r in run.summary]
    cols = [Column("run", "run"), Column("profile", "profile"), Column("split", "k", "int"),
            Column("topology", "topology", "int"), Column("max_sustainable_fps", "max sustainable fps", "float"),
            Column("fps", "offered fps", "float"), Column("throughput_fps", "achieved fps", "float"),
            Column("drop_rate", "drop rate", "float")]
    return Table("max_fps", "Max sustainable frame rate per split point", cols if len(runs) > 1 else cols[1:], rows,
                 note="Max sustainable fps = 1 ÷ the median time of the slowest pipeline stage (head + encode, "
                      "uplink, remote decode + part + encode, downlink, decode (+ tail)). Achieved fps: a stream "
                      "run's completed frames ÷ its duration (single mode: samples back to back).")


def max_fps_figure(runs: Sequence[RunData], path: Path) -> Path | None:
    fig, ax = plots.plt.subplots(figsize=(10, 4.5))
    drawn = False
    for run in runs:
        for prof in run.profiles:
            rows = [r for r in run.config_rows(prof) if r.get("max_sustainable_fps")]
            if not rows:
                continue
            ks = [r["split"] for r in rows]
            line, = ax.plot(ks, [r["max_sustainable_fps"] for r in rows], marker="o",
                            label=plots._label(run, runs, f"{prof}: max sustainable"))
            streamed = [r for r in rows if r.get("mode") == "stream" and r.get("throughput_fps")]
            if streamed:
                ax.scatter([r["split"] for r in streamed], [r["throughput_fps"] for r in streamed], marker="x",
                           color=line.get_color(), label=plots._label(run, runs, f"{prof}: achieved in stream"))
            drawn = True
    if not drawn:
        plots.plt.close(fig)
        return None
    ax.set_ylabel("frames per second")
    ax.set_yscale("log")
    plots._split_axis(ax, sorted({r["split"] for run in runs for r in run.summary}))
    ax.legend(fontsize=8)
    return plots._save(fig, path)


def stream_figure(runs: Sequence[RunData], path: Path) -> Path | None:
    if not _streamed(runs):
        return None
    fig, ax = plots.plt.subplots(figsize=(10, 4.5))
    for run in runs:
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for s in run.samples:
            if s.get("frame") is not None and s.get("e2e_s") is not None:
                groups.setdefault((s["profile"], s["split"]), []).append(s)
        for (prof, k), rows in groups.items():
            rows.sort(key=lambda s: s["frame"])
            ax.plot([s["frame"] for s in rows], [s["e2e_s"] for s in rows], marker=".", linewidth=0.8,
                    label=plots._label(run, runs, f"{prof} k={k}"))
    ax.set_xlabel("frame index (gaps: dropped or lost frames)")
    ax.set_ylabel("e2e incl. queueing (ms)")
    ax.yaxis.set_major_formatter(plots._ms)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return plots._save(fig, path)


FIGURES = (
    ("max_fps", "Max sustainable frame rate", max_fps_figure,
     "Max sustainable frame rate per split point (1 ÷ the slowest pipeline stage), crosses: a stream's achieved rate."),
    ("stream_e2e", "Stream: e2e per frame", stream_figure,
     "End-to-end latency of each frame of the stream runs, from the frame's arrival (queueing included)."),
)


def section(runs: Sequence[RunData], out: Path, figures: dict[str, Path]) -> tuple[list[tuple[str, Path | None, str]],
                                                                                   list[Table]]:
    """The section's figures (stem, path or None, caption) and tables, for ``report``."""
    drawn = []
    for stem, title, fn, caption in FIGURES:
        path = fn(runs, out / f"{stem}.png")
        if path is not None:
            figures[stem] = path
        if path is not None or stem != "stream_e2e":
            drawn.append((title, path, caption))
    return drawn, [max_fps_table(runs), data_path_table(runs)]
