"""The report's figures, one function per figure, each writing one PNG.

Every function takes the runs (the first is the primary run, the others are
``--compare`` overlays) and an output path, draws with matplotlib's Agg backend
(no display needed) and returns the path, or None when the run holds nothing to
draw for that figure. Reading is ``testbed.analysis.run_data``'s job; the HTML is
``testbed.analysis.report``'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on CI or in a container
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator  # noqa: E402

from testbed.analysis.run_data import SA4, STACK, RunData  # noqa: E402

DPI = 110
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
STACK_COLORS = {
    "head": "#1f77b4", "encode": "#aec7e8", "uplink": "#ff7f0e", "remote_rx_lag": "#8c564b",
    "remote_decode": "#ffbb78", "tail": "#2ca02c", "remote_encode": "#98df8a", "downlink": "#d62728",
    "local_rx_lag": "#c49c94", "decode": "#ff9896",
}
_ms = FuncFormatter(lambda v, _: f"{v * 1e3:g}")


def _si(v: float, _pos: Any = None) -> str:
    """Decimal byte units for log axes, whose ticks fall on powers of ten."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= f:
            return f"{v / f:g} {unit}"
    return f"{v:g} B"


_si_bytes = FuncFormatter(_si)
_bytes = FuncFormatter(lambda v, _: _si(v) if v > 0 else "0")
_blank = FuncFormatter(lambda v, _: "")


def _log_bytes(axis: Any) -> None:
    """Log byte axis with 1-2-5 ticks in decimal units and no scientific minor labels."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(_si_bytes)
    axis.set_minor_formatter(_blank)


def _log_ms(ax: Any) -> None:
    ax.set_yscale("log")
    # 1-2-5 ticks: a log axis spanning less than a decade still gets labels.
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(_ms)
    ax.yaxis.set_minor_formatter(_blank)


def _colors(names: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def _all_profiles(runs: Sequence[RunData]) -> list[str]:
    return list(dict.fromkeys(p for r in runs for p in r.profiles))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def _label(run: RunData, runs: Sequence[RunData], text: str) -> str:
    return f"{text} [{run.label}]" if len(runs) > 1 else text


def _split_axis(ax, splits: Sequence[int]) -> None:
    ax.set_xlabel("split point k (head = layers [0, k) on the local node)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(len(splits) + 1, 17) if splits else 17))
    ax.grid(True, alpha=0.3)


def e2e_vs_split(runs: Sequence[RunData], path: Path) -> Path | None:
    """End-to-end latency p50 per split, one line per profile, p10–p90 band, anchors marked."""
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = _colors(_all_profiles(runs))
    drawn = False
    for ri, run in enumerate(runs):
        for prof in run.profiles:
            rows = [r for r in run.config_rows(prof) if run.stat(r, "e2e", "p50") is not None]
            if not rows:
                continue
            ks = [r["split"] for r in rows]
            p50 = [run.stat(r, "e2e", "p50") for r in rows]
            lo = [run.stat(r, "e2e", "p10") or v for r, v in zip(rows, p50)]
            hi = [run.stat(r, "e2e", "p90") or v for r, v in zip(rows, p50)]
            c = colors[prof]
            ax.plot(ks, p50, LINESTYLES[ri % 4], marker=MARKERS[ri % 4], ms=3.5, color=c,
                    label=_label(run, runs, prof))
            ax.fill_between(ks, lo, hi, color=c, alpha=0.15 if ri == 0 else 0.08, linewidth=0)
            ci = [(r.get("e2e_p50_ci_low_s"), r.get("e2e_p50_ci_high_s")) for r in rows]
            if ri == 0 and all(a is not None and b is not None for a, b in ci):
                # whiskers: the distribution-free confidence interval of each median
                ax.errorbar(ks, p50, yerr=[[max(0.0, v - a) for v, (a, _) in zip(p50, ci)],
                                           [max(0.0, b - v) for v, (_, b) in zip(p50, ci)]],
                            fmt="none", ecolor=c, elinewidth=0.8, capsize=2)
            drawn = True
            for k in run.anchors.values():
                if k in ks:
                    ax.plot([k], [p50[ks.index(k)]], marker="*", ms=13, color=c, markeredgecolor="black",
                            linestyle="none", zorder=5)
    if not drawn:
        plt.close(fig)
        return None
    run = runs[0]
    for name, k in run.anchors.items():
        ax.axvline(k, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{name} anchor (k={k})", xy=(k, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3 if k == 0 else -3, -12), textcoords="offset points",
                    ha="left" if k == 0 else "right", fontsize=8, color="dimgrey")
    _log_ms(ax)
    ax.set_ylabel(f"{SA4['e2e_s']} p50 (ms, log); band p10–p90, whiskers 95 % CI of p50")
    ax.set_title("End-to-end latency per split point (★ = anchors)")
    _split_axis(ax, run.splits)
    ax.legend(fontsize=8, ncol=2 if len(colors) > 6 else 1, loc="best")
    return _save(fig, path)


def stacked_time(runs: Sequence[RunData], path: Path) -> Path | None:
    """Mean time per component, stacked, per split point: one panel per profile (primary run)."""
    run = runs[0]
    profs = run.profiles
    cols = min(3, len(profs))
    rows_n = math.ceil(len(profs) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax, prof in zip(axes.flat, profs):
        rows = run.config_rows(prof)
        ks = [r["split"] for r in rows]
        bottom = [0.0] * len(rows)
        for part in STACK:
            vals = [r.get(f"{part}_mean_s") or 0.0 for r in rows]
            if not any(vals):
                continue
            ax.bar(ks, vals, bottom=bottom, width=0.8, color=STACK_COLORS[part], label=part.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, vals)]
        e2e = [r.get("e2e_mean_s") for r in rows]
        ax.plot(ks, e2e, "k_", ms=9, mew=1.5, label="e2e mean")
        ax.yaxis.set_major_formatter(_ms)
        ax.set_title(prof, fontsize=10)
        ax.set_ylabel("mean time (ms)")
        _split_axis(ax, ks)
        ax.set_xlabel("split point k")
    for ax in list(axes.flat)[len(profs):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 9), fontsize=8,
               bbox_to_anchor=(0.5, 1.02))
    fig.suptitle("Where the time goes: stacked mean time per split point", y=1.06)
    fig.tight_layout()
    return _save(fig, path)


def cut_bytes(runs: Sequence[RunData], path: Path) -> Path | None:
    """Intermediate data per split point (log axis), raw and on the wire, against the input size."""
    run = runs[0]
    by_k: dict[int, dict[str, Any]] = {}
    for r in run.summary:
        by_k.setdefault(r["split"], r)
    manifest_cut = {int(s["k"]): sum(t["bytes"] for t in s.get("cut", [])) for s in run.manifest.get("splits", [])}
    n = run.num_layers
    ks = [k for k in sorted(set(by_k) | set(manifest_cut)) if k != n]
    if not ks:
        return None
    raw = [by_k.get(k, {}).get("cut_bytes_raw") or manifest_cut.get(k) for k in ks]
    wire = [by_k.get(k, {}).get("cut_bytes_wire") for k in ks]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.plot(ks, raw, "o-", ms=4, label=SA4["cut_bytes_raw"])
    if any(w is not None for w in wire):
        kw = [(k, w) for k, w in zip(ks, wire) if w is not None]
        ax.plot([k for k, _ in kw], [w for _, w in kw], "s--", ms=4, label=SA4["cut_bytes_wire"])
    inp = run.input_bytes
    if inp:
        ax.axhline(inp, color="firebrick", linestyle=":", label=f"model input ({_si(inp)})")
    ax.set_yscale("log")
    _log_bytes(ax.yaxis)
    ax.set_ylabel("bytes per sample (log)")
    ax.set_title("Intermediate data per split point (k = N sends nothing)")
    _split_axis(ax, ks)
    ax.legend(fontsize=8)
    return _save(fig, path)


def per_layer(runs: Sequence[RunData], path: Path) -> Path | None:
    """Per-layer latency on the local and the remote node, and each layer's output bytes."""
    if not any(r.layers for r in runs):
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    node_colors = {"local": "#1f77b4", "remote": "#2ca02c"}
    for ri, run in enumerate(runs):
        for node in ("local", "remote"):
            rows = sorted((r for r in run.layers if r["node"] == node), key=lambda r: r["layer"])
            if not rows:
                continue
            xs = [r["layer"] for r in rows]
            ys = [r.get("mean_s") for r in rows]
            ax1.plot(xs, ys, LINESTYLES[ri % 4], marker=MARKERS[ri % 4], ms=3.5, color=node_colors[node],
                     label=_label(run, runs, f"{node} node"))
            p90 = [r.get("p90_s") for r in rows]
            if ri == 0 and all(v is not None for v in p90):
                ax1.fill_between(xs, ys, p90, color=node_colors[node], alpha=0.12, linewidth=0)
    _log_ms(ax1)
    ax1.set_ylabel("layer latency mean (ms, log); band to p90")
    ax1.set_title("Per-layer latency on each node, and per-layer output size")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    base = runs[0]
    rows = sorted({r["layer"]: r for r in base.layers}.values(), key=lambda r: r["layer"])
    ax2.bar([r["layer"] for r in rows], [r.get("output_bytes") or 0 for r in rows], color="#9467bd", width=0.8)
    ax2.set_xticks([r["layer"] for r in rows])
    ax2.set_xticklabels([f"{r['layer']} {str(r.get('op') or '').lower()}" for r in rows], rotation=90, fontsize=7)
    ax2.set_yscale("log")
    _log_bytes(ax2.yaxis)
    ax2.set_ylabel("output bytes (log)")
    ax2.set_xlabel("layer (index, operator)")
    ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _first_per_split(parts: list[dict[str, Any]], part: str, node: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in parts:
        if r.get("part") == part and r.get("node") == node:
            out.setdefault(r["split"], r)
    return out


def part_sizes(runs: Sequence[RunData], path: Path) -> Path | None:
    """Head/tail file sizes per split point, and the head's delivery time per profile."""
    run = runs[0]
    sizes: dict[int, tuple[int, int]] = {}
    for s in run.manifest.get("splits", []):
        sizes[int(s["k"])] = (s.get("head_bytes") or 0, s.get("tail_bytes") or 0)
    for r in run.summary:
        if r["split"] not in sizes and (r.get("head_file_bytes") is not None or r.get("tail_file_bytes") is not None):
            sizes[r["split"]] = (r.get("head_file_bytes") or 0, r.get("tail_file_bytes") or 0)
    if not sizes:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = sorted(sizes)
    heads = [sizes[k][0] for k in ks]
    tails = [sizes[k][1] for k in ks]
    ax1.bar(ks, heads, color="#1f77b4", label="head (local node)")
    ax1.bar(ks, tails, bottom=heads, color="#2ca02c", label="tail (remote node)")
    ax1.yaxis.set_major_formatter(_bytes)
    ax1.set_ylabel(SA4["file_bytes"])
    ax1.set_title("Split model file sizes")
    _split_axis(ax1, ks)
    ax1.legend(fontsize=8)
    colors = _colors(_all_profiles(runs))
    any_delivery = False
    for ri, r in enumerate(runs):
        for prof in r.profiles:
            pts = [(x["split"], x["delivery_s"]) for x in r.config_rows(prof) if x.get("delivery_s") is not None]
            if pts:
                ax2.plot(*zip(*pts), LINESTYLES[ri % 4], marker="o", ms=3.5, color=colors[prof],
                         label=_label(r, runs, prof))
                any_delivery = True
    if any_delivery:
        _log_ms(ax2)
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no delivery times recorded", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel(f"{SA4['delivery_s']} (ms, log)")
    ax2.set_title("Head delivery over the shaped downlink")
    _split_axis(ax2, ks)
    fig.tight_layout()
    return _save(fig, path)


KPI_TIMES = (("init_s", "init"), ("first_s", "first inference"), ("warmup_mean_s", "warm-up mean"),
             ("steady_mean_s", "steady state mean"))


def part_kpis(runs: Sequence[RunData], path: Path) -> Path | None:
    """Benchmark KPIs per part (init, first, warm-up, steady state; init and peak memory)."""
    if not any(r.parts for r in runs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ri, run in enumerate(runs):
        for ai, (part, node) in enumerate((("head", "local"), ("tail", "remote"))):
            rows = _first_per_split(run.parts, part, node)
            if not rows:
                continue
            ks = sorted(rows)
            for ci, (col, name) in enumerate(KPI_TIMES):
                vals = [(k, rows[k].get(col)) for k in ks if rows[k].get(col)]
                if vals:
                    axes[ai].plot(*zip(*vals), LINESTYLES[ri % 4], marker=MARKERS[ci], ms=3.5,
                                  color=plt.get_cmap("tab10")(ci), label=_label(run, runs, name))
            for ci, (col, name) in enumerate((("init_memory_bytes", "init"), ("peak_memory_bytes", "peak"))):
                vals = [(k, rows[k].get(col)) for k in ks if rows[k].get(col)]
                if vals:
                    axes[2].plot(*zip(*vals), LINESTYLES[(ri + ci) % 4], marker=MARKERS[ai], ms=3.5,
                                 color="#1f77b4" if part == "head" else "#2ca02c",
                                 label=_label(run, runs, f"{part} {name}"))
    for ax, title in zip(axes[:2], ("head part on the local node", "tail part on the remote node")):
        ax.set_title(f"Benchmark KPIs: {title}", fontsize=10)
        _log_ms(ax)
        ax.set_ylabel("time (ms, log)")
        if ax.has_data():
            ax.legend(fontsize=7, ncol=2 if len(runs) > 1 else 1)
        _split_axis(ax, [])
    axes[2].set_title("Memory per part (RSS)", fontsize=10)
    axes[2].yaxis.set_major_formatter(_bytes)
    axes[2].set_ylabel(SA4["memory"])
    if axes[2].has_data():
        axes[2].legend(fontsize=7)
    _split_axis(axes[2], [])
    fig.tight_layout()
    return _save(fig, path)


def planner(evaluation: Any, path: Path) -> Path | None:
    """Predicted vs measured mean e2e per configuration, and the error distribution."""
    rows = [c for c in evaluation.configurations if c.get("measured_e2e_mean_s")]
    if not rows:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    profs = list(dict.fromkeys(c["profile"] for c in rows))
    colors = _colors(profs)
    for p in profs:
        pts = [(c["measured_e2e_mean_s"], c["predicted_e2e_s"]) for c in rows if c["profile"] == p]
        ax1.scatter(*zip(*pts), s=14, color=colors[p], label=p)
    lo = min(min(c["measured_e2e_mean_s"], c["predicted_e2e_s"]) for c in rows)
    hi = max(max(c["measured_e2e_mean_s"], c["predicted_e2e_s"]) for c in rows)
    lo, hi = max(lo * 0.8, 1e-6), hi * 1.25
    ax1.plot([lo, hi], [lo, hi], "k--", linewidth=1, label="predicted = measured")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    for axis in (ax1.xaxis, ax1.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(_ms)
        axis.set_minor_formatter(_blank)
    ax1.set_xlabel("measured e2e mean (ms, log)")
    ax1.set_ylabel("predicted e2e (ms, log)")
    ax1.set_title("Planner: predicted vs measured, per configuration")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7, ncol=2 if len(profs) > 6 else 1)
    errs = [c["error_pct"] for c in rows if c.get("error_pct") is not None]
    ax2.hist(errs, bins=min(30, max(5, len(errs) // 3)), color="#7f7f7f", edgecolor="white")
    ax2.axvline(0, color="black", linewidth=1)
    ax2.set_xlabel("prediction error (predicted − measured) / measured, %")
    ax2.set_ylabel("configurations")
    ax2.set_title("Prediction error distribution")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plan_curves(predictions: dict[str, list[Any]], path: Path) -> Path | None:
    """Predicted e2e per split for each link (``testbed plan`` output), best split starred."""
    if not predictions:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = _colors(list(predictions))
    for name, preds in predictions.items():
        ks = [p.split for p in preds]
        ys = [p.e2e_s for p in preds]
        ax.plot(ks, ys, "-o", ms=3, color=colors[name], label=name)
        b = min(preds, key=lambda p: (p.e2e_s, -p.split))
        ax.plot([b.split], [b.e2e_s], "*", ms=14, color=colors[name], markeredgecolor="black")
    _log_ms(ax)
    ax.set_ylabel("predicted e2e (ms, log)")
    ax.set_title("Planner: predicted end-to-end latency per split point (★ = chosen)")
    _split_axis(ax, [])
    ax.legend(fontsize=8)
    return _save(fig, path)


def fidelity(runs: Sequence[RunData], path: Path) -> Path | None:
    """Measured ÷ framing-aware ideal transfer time per split point: the emulation's
    own error, per direction (and the head delivery), one line per profile."""
    run = runs[0]
    series = (("uplink", "uplink_over_ideal_p50"), ("downlink", "downlink_over_ideal_p50"),
              ("head delivery", None))
    colors = _colors(run.profiles)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    drawn = False
    for ax, (title, col) in zip(axes, series):
        for prof in run.profiles:
            rows = run.config_rows(prof)
            if col is None:
                pts = [(r["split"], r["delivery_s"] / r["delivery_ideal_s"]) for r in rows
                       if r.get("delivery_s") and r.get("delivery_ideal_s")]
            else:
                pts = [(r["split"], r[col]) for r in rows if r.get(col)]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colors[prof], label=prof)
                drawn = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=10)
        _split_axis(ax, run.splits)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_ylabel("measured ÷ ideal (p50)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Emulation fidelity: transfer time ÷ framing-aware ideal (1.0 = exact)", y=1.02)
    fig.tight_layout()
    return _save(fig, path)


def repeatability(runs: Sequence[RunData], path: Path) -> Path | None:
    """Each repeat's median e2e ÷ the pooled median, per split point and profile:
    how far whole repeats of the sweep disagree (None with one repeat)."""
    run = runs[0]
    if run.repeats < 2:
        return None
    colors = _colors(run.profiles)
    pooled = {(r["profile"], r["split"]): r.get("e2e_p50_s") for r in run.summary}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in run.repeat_rows:
        base = pooled.get((r["profile"], r["split"]))
        if base and r.get("e2e_p50_s"):
            ax.plot(r["split"], r["e2e_p50_s"] / base, marker=MARKERS[(r.get("repeat") or 0) % 4], ms=4,
                    linestyle="none", color=colors[r["profile"]])
    for prof in run.profiles:
        ax.plot([], [], marker="o", linestyle="none", color=colors[prof], label=prof)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("repeat's p50 ÷ pooled p50")
    _split_axis(ax, run.splits)
    ax.legend(fontsize=8)
    ax.set_title(f"Repeatability: {run.repeats} repeats of the sweep (marker = repeat)", fontsize=10)
    return _save(fig, path)


PHASE_COLORS = {
    "link": "#7f7f7f", "split": "#bcbd22", "tail_load": "#98df8a", "delivery": "#d62728", "head_load": "#aec7e8",
    "kpi": "#9467bd", "warmup": "#ffbb78", "sampling": "#1f77b4", "write": "#c7c7c7", "other": "#000000",
}


def sweep_time(runs: Sequence[RunData], path: Path) -> Path | None:
    """Where the sweep's wall time went, per profile: stacked phases (primary run)."""
    from testbed.analysis.results import PHASES

    run = runs[0]
    rows = run.repeat_rows
    if not rows or all(r.get("phase_sampling_s") is None for r in rows):
        return None  # a run folder from before per-phase accounting
    profiles = run.profiles
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = [0.0] * len(profiles)
    for phase in PHASES:
        vals = [sum(r.get(f"phase_{phase}_s") or 0.0 for r in rows if r["profile"] == p) for p in profiles]
        if not any(vals):
            continue
        ax.bar(range(len(profiles)), vals, bottom=bottom, color=PHASE_COLORS[phase], label=phase.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(profiles)), profiles, rotation=20, ha="right")
    ax.set_ylabel("wall time (s)")
    ax.legend(fontsize=8, ncol=5, loc="upper left")
    ax.set_title("Where the sweep's time went, per profile (sum over its configurations)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
