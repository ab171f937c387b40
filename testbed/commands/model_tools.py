"""Top-level ``testbed inspect``, ``testbed split`` and ``testbed profile`` (thin: parse, call, print)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from testbed.errors import ModelError
from testbed.model.graph import ModelGraph
from testbed.model.profiler import profile as run_profile
from testbed.model.splitter import WARN_BYTES, estimate_bytes, split_model
from testbed.model.verify import custom_ops_registered
from testbed.units import format_bytes, format_duration


def _shape(shapes) -> str:
    return " ".join("x".join(str(d) for d in s) for s in shapes)


def _console() -> Console:
    # Piped or captured output has no width; rich would squeeze tables into 80
    # columns and elide the numbers. A terminal keeps its own width.
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _warn(text: str) -> None:
    typer.echo(f"warning: {text}", err=True)


def _layers_title(graph: ModelGraph) -> str:
    folded = f" (+ {len(graph.folded)} constant ops folded into them)" if graph.folded else ""
    return f"{graph.num_layers} layers{folded}"


ModelFile = Annotated[Path, typer.Argument(help="a TFLite model file")]


def inspect(model: ModelFile,
            as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False) -> None:
    """Layers in execution order (op, output shapes/bytes, params, MACs) and the cut at every split point.

    Layers are the operators that compute on activations; constant operators (a
    float16 weight's DEQUANTIZE, shape arithmetic on constants) are folded into
    the layers that read them and counted, not listed. Custom ops are listed with
    whether this host's runtime registers them.

    Example: testbed inspect posenet.tflite --json
    """
    graph = ModelGraph.from_file(model)
    registered = custom_ops_registered(graph)
    if as_json:
        d = graph.to_dict()
        for c in d["custom_ops"]:
            c["registered"] = registered[c["name"]]
        typer.echo(json.dumps(d, indent=2))
        return
    console = _console()
    table = Table("#", Column("op", no_wrap=True), "output shape", "output bytes", "params", "param bytes", "MACs",
                  title=f"{model} — {_layers_title(graph)}, {format_bytes(graph.size)}")
    for la in graph.layers:
        table.add_row(str(la.index), la.op, _shape(la.output_shapes), str(la.output_bytes), str(la.params),
                      str(la.param_bytes), str(la.macs))
    console.print(table)
    for name, layers in sorted(graph.custom_ops().items()):
        console.print(f"custom op {name!r} at layer(s) {', '.join(map(str, layers))}: "
                      f"{'registered' if registered[name] else 'NOT registered'} in this host's runtime",
                      markup=False, highlight=False)
    cuts = Table("k", "head:tail", "cut bytes", "cut tensors", title="split points")
    for k in range(graph.num_layers + 1):
        cut = graph.cut(k)
        cuts.add_row(str(k), f"{k}:{graph.num_layers - k}", str(sum(t.bytes for t in cut)),
                     ", ".join(f"{t.name} {'x'.join(map(str, t.shape))}" for t in cut))
    console.print(cuts)


def split(model: ModelFile, *,  # keyword-only: --out (required) keeps its place in --help
          at: Annotated[list[int] | None, typer.Option("--at", help="split point k (repeatable)")] = None,
          all_: Annotated[bool, typer.Option("--all", help="every split point 0..N")] = False,
          out: Annotated[Path, typer.Option("--out", "-o", help="directory for the parts and manifest.json")],
          verify: Annotated[bool, typer.Option(
              "--verify/--no-verify", help="run every split once with LiteRT, head feeding tail, and refuse parts "
                                           "that fail to load or run (default: on)")] = True,
          as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False) -> None:
    """Write head/tail parts and manifest.json for the given split points.

    --out must be new, empty, or an earlier split (nothing else is ever deleted).
    Splitting at every point writes about (N+1) x the model size: above 1 GB a
    warning says how much before anything is written.

    Example: testbed split posenet.tflite --all --out parts/
    """
    if bool(at) == all_:
        raise ModelError("give either --at K (repeatable) or --all", path=str(model))
    graph = ModelGraph.from_file(model)
    ks = list(at) if at else list(range(graph.num_layers + 1))
    for k in ks:
        graph.check_k(k)
    total = estimate_bytes(graph, ks)
    if total > WARN_BYTES:
        _warn(f"{len(set(ks))} split points write about {format_bytes(total)} of parts; to write fewer, "
              "split only the points you need with --at K (repeatable)")
    manifest = split_model(graph, ks, out, verify=verify)
    differs = [s["k"] for s in manifest["splits"] if s["verify"] and s["verify"]["exact"] is False]
    if differs:
        _warn(f"head then tail is not bitwise equal to the whole model at k={differs} "
              f"({manifest['splits'][0]['verify']['runtime']}, default delegate); the parts run")
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    table = Table("k", "head", "tail", "head bytes", "tail bytes", "cut bytes", "verified",
                  title=f"{out}/manifest.json — {_layers_title(graph)}")
    for s in manifest["splits"]:
        table.add_row(str(s["k"]), s["head"] or "-", s["tail"] or "-", str(s["head_bytes"]),
                      str(s["tail_bytes"]), str(sum(c["bytes"] for c in s["cut"])), _verified(s["verify"]))
    _console().print(table)


def _verified(v: dict | None) -> str:
    if v is None:
        return "-"
    return {True: "runs, exact", False: "runs, differs", None: "runs"}[v["exact"]]


def profile(model: ModelFile,
            runs: Annotated[int, typer.Option("--runs", help="steady-state runs")] = 50,
            warmup: Annotated[int, typer.Option("--warmup", help="warm-up runs after the first inference")] = 5,
            threads: Annotated[int | None, typer.Option(
                "--threads", help="interpreter threads (default: runtime's)")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """benchmark_model KPIs (fresh process) and per-layer latency (one-layer models) on this host.

    Example: testbed profile posenet.tflite --runs 20 --warmup 3 --threads 1
    """
    result = run_profile(model, runs, warmup, threads)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console = _console()
    k = result["kpis"]
    kp = Table("KPI", "value", title=f"{model} (fresh process, {runs} runs, {warmup} warm-up)")
    for key in ("init_s", "first_s", "warmup_mean_s", "steady_mean_s", "steady_std_s", "steady_p50_s",
                "steady_p90_s"):
        kp.add_row(key, format_duration(k[key]))
    for key in ("init_memory_bytes", "peak_memory_bytes"):
        kp.add_row(key, format_bytes(k[key]))
    console.print(kp)
    lt = Table("#", Column("op", no_wrap=True), "output shape", "output bytes", "param bytes", "MACs",
               "mean ms", "p50 ms", "p90 ms", "std ms",
               title=f"per layer (one-layer models; {_layers_title_of(result['model'])})")
    for r in result["layers"]:
        lt.add_row(str(r["index"]), r["op"], _shape(r["output_shapes"]), str(r["output_bytes"]),
                   str(r["param_bytes"]), str(r["macs"]), _ms(r["mean_s"]), _ms(r["p50_s"]), _ms(r["p90_s"]),
                   _ms(r["std_s"]))
    console.print(lt)
    ratio = result["sum_layers_over_whole"]
    console.print(f"Σ layers / whole model = {format_duration(result['sum_layers_mean_s'])} / "
                  f"{format_duration(k['steady_mean_s'])} = {ratio:.2f}" if ratio else "Σ layers / whole: n/a")


def _layers_title_of(model: dict) -> str:
    folded = model.get("folded_ops") or 0
    return f"{model['layers']} layers" + (f", {folded} constant ops folded in" if folded else "")


def register(app: typer.Typer) -> None:
    """Add inspect, split and profile as top-level commands of ``app``."""
    app.command("inspect")(inspect)
    app.command("split")(split)
    app.command("profile")(profile)
