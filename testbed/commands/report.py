"""``testbed report`` and ``testbed plan``: thin wrappers over testbed.analysis.report and testbed.analysis.planner."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from testbed.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("report")(report)
    app.command("plan")(plan)


def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `testbed run`.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default RUN_DIR/report).")] = None,
    compare: Annotated[list[Path] | None, typer.Option(
        "--compare", help="Another run folder to overlay (repeatable).")] = None,
) -> None:
    """Write report.html (self-contained), the figures as PNG and the tables as CSV.

    Example: testbed report results/posenet-sweep-20261123-0940 --compare results/other-run
    """
    from testbed.analysis.report import build_report

    rep = build_report(run_dir, out, compare or [])
    con = Console(highlight=False)
    for w in rep.warnings or []:
        con.print(f"[yellow]note:[/yellow] {w}")
    if rep.evaluation is not None and rep.evaluation.worst_ratio() is not None:
        con.print(f"planner: worst choice ÷ best measured e2e = {rep.evaluation.worst_ratio():.3f}")
    con.print(f"{len(rep.figures)} figures, {len(rep.tables)} tables → {rep.html_path}")


def plan(
    run: Annotated[Path | None, typer.Option(
        "--run", help="Run folder: its layers.csv, manifest and profiles.")] = None,
    layers: Annotated[Path | None, typer.Option(
        "--layers", help="layers.csv (manifest.json beside it, or --manifest).")] = None,
    manifest: Annotated[Path | None, typer.Option("--manifest", help="Splitter manifest.json for cut sizes.")] = None,
    profile: Annotated[list[str] | None, typer.Option(
        "--profile", help="netem_profiles name or profile file (repeatable).")] = None,
    uplink: Annotated[str | None, typer.Option("--uplink", help="Ad-hoc uplink rate, e.g. 5mbit.")] = None,
    downlink: Annotated[str | None, typer.Option("--downlink", help="Ad-hoc downlink rate, e.g. 20mbit.")] = None,
    delay: Annotated[str | None, typer.Option(
        "--delay", help="Ad-hoc one-way delay, both directions, e.g. 10ms.")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Scale each node's layer latencies to its whole-model KPI (parts.csv).")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write plan.csv (every split, every link) and plan.png here.")] = None,
    all_splits: Annotated[bool, typer.Option("--all", help="Print every split point, not only the best.")] = False,
    topology: Annotated[list[int] | None, typer.Option(
        "--topology", help="1, 2 or 3 (repeatable: compare them); default: the run's, else 1.")] = None,
    fps: Annotated[float | None, typer.Option(
        "--fps", help="Choose among split points that sustain this frame rate.")] = None,
) -> None:
    """Predict e2e per split point from per-layer profiles and the link; pick the best split.

    Examples:
      testbed plan --run results/RUN                       (the run's own profiles, judged against measurements)
      testbed plan --run results/RUN --profile lte --uplink 5mbit --downlink 20mbit --delay 10ms
      testbed plan --layers results/RUN/layers.csv --profile ladder-10mbit
      testbed plan --run results/RUN --profile lte --topology 1 --topology 2 --topology 3 --fps 30
    """
    from testbed.analysis import planner

    profile = profile or []
    topology = topology or []
    if (run is None) == (layers is None):
        raise ConfigError("give exactly one of --run RUN_DIR or --layers LAYERS_CSV", field="--run")
    if run is not None:
        model = planner.model_from_run(run, calibrate=calibrate)
    else:
        model = planner.model_from_files(layers, manifest, calibrate=False)
    links = [planner.link_from_profile(p) for p in profile]
    if uplink or downlink or delay:
        links.append(planner.link_from_args(uplink, downlink, delay))
    judged = None
    if run is not None and not profile and not (uplink or downlink or delay):
        judged = planner.evaluate(run, model)
        links = planner.links_from_summary(planner.RunFolder(run).summary())
    if not links:
        raise ConfigError("name a link: --profile NAME, or --uplink/--downlink/--delay (or use --run)",
                          field="--profile")
    if any(t not in (1, 2, 3) for t in topology):
        raise ConfigError(f"--topology takes 1, 2 or 3, not {topology}", field="--topology")
    if fps is not None and not 0 < fps <= 10_000:
        raise ConfigError(f"--fps must be in (0, 10000], got {fps:g}", field="--fps")
    tops = topology or [_run_topology(run)]
    predictions = {(link.name if len(tops) == 1 else f"{link.name} (topology {t})"):
                   planner.predict(model, link, topology=t) for link in links for t in tops}
    _print_plan(predictions, judged, model, all_splits, fps)
    if out is not None:
        _write_plan(out, predictions)


def _run_topology(run: Path | None) -> int:
    """The topology a run was measured in (1 without a run or for older runs)."""
    if run is None:
        return 1
    from testbed.analysis.results import RunFolder
    rows = RunFolder(run).summary()
    return int(rows[0].get("topology") or 1) if rows else 1


def _print_plan(predictions, judged, model, all_splits: bool, fps: float | None = None) -> None:
    from testbed.analysis import planner
    from testbed.errors import TestbedError

    con = Console(highlight=False)
    con.print(f"[dim]{model.num_layers} layers; {model.source}[/dim]")
    from rich.table import Column

    t = Table(Column("profile", no_wrap=True), "best k", "predicted e2e", "head", "uplink", "tail", "downlink",
              "max fps")
    for name, preds in predictions.items():
        try:
            rows = preds if all_splits else [planner.best(preds, fps)]
        except TestbedError as e:
            con.print(f"[yellow]{name}:[/yellow] {e}")
            continue
        for p in rows:
            t.add_row(name, str(p.split), f"{p.e2e_s * 1e3:.2f} ms", f"{p.head_s * 1e3:.2f}",
                      f"{p.uplink_s * 1e3:.2f}", f"{p.tail_s * 1e3:.2f}", f"{p.downlink_s * 1e3:.2f}",
                      f"{p.max_fps:.1f}" if p.max_fps else "–")
    con.print(t)
    if judged is not None:
        j = Table("profile", "chosen k", "best measured k", "choice ÷ best (mean)", "choice ÷ best (p50)")
        for c in judged.choices:
            j.add_row(c["profile"], str(c["chosen_split"]), str(c.get("best_split_mean")),
                      f"{c['ratio_mean']:.3f}" if c.get("ratio_mean") else "–",
                      f"{c['ratio_p50']:.3f}" if c.get("ratio_p50") else "–")
        con.print(j)
        if judged.worst_ratio() is not None:
            con.print(f"worst choice ÷ best measured e2e: {judged.worst_ratio():.3f} (goal ≤ 1.05)")


def _write_plan(out: Path, predictions) -> None:
    import csv

    from testbed.analysis import plots as report_plots

    out.mkdir(parents=True, exist_ok=True)
    with (out / "plan.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["profile", "topology", "split", "head_s", "uplink_s", "tail_s", "downlink_s",
                               "e2e_s", "max_fps"], lineterminator="\n")
        w.writeheader()
        for preds in predictions.values():
            w.writerows(p.row() for p in preds)
    report_plots.plan_curves(predictions, out / "plan.png")
    Console(highlight=False).print(f"→ {out / 'plan.csv'}, {out / 'plan.png'}")

