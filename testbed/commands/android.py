"""``testbed android``: devices, check, profile, parse — phones over adb.

Thin: parses, calls ``testbed.android``, prints. Every fault is an ``AndroidError``
(a ``TestbedError``): one red line naming the phone and what to do, exit 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from testbed.errors import TestbedError

app = typer.Typer(help="Android phones over adb: list, check, profile a model, parse benchmark_model output.\n\n"
                       "Example: testbed android profile posenet.tflite --serial R58M12ABCDE --threads 4",
                  no_args_is_help=True)

Serial = Annotated[str | None, typer.Option("--serial", "-s", help="Phone serial (default: the only one).")]
AdbPort = Annotated[int | None, typer.Option("--adb-port", help="The testbed's adb server port "
                                                "(default TESTBED_ADB_PORT or 5137; 5037 uses your own server).")]
BenchmarkBinary = Annotated[Path | None, typer.Option(
    "--benchmark-model", metavar="PATH",
    help="Host path of TFLite's Android benchmark_model (default: $TESTBED_BENCHMARK_MODEL).")]


def _binary(path: Path | None, required: bool) -> Path | None:
    path = path or (Path(os.environ["TESTBED_BENCHMARK_MODEL"]) if os.environ.get("TESTBED_BENCHMARK_MODEL")
                    else None)
    if path is None and required:
        raise TestbedError("no benchmark_model given: pass --benchmark-model PATH (TFLite's Android benchmark "
                           "binary, downloaded once) or set TESTBED_BENCHMARK_MODEL")
    return path


@app.command("devices")
def devices(adb_port: AdbPort = None,
            json_out: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False) -> None:
    """List phones: serial, state, model, SoC, ABI, Android version.

    Example: testbed android devices
    """
    from testbed.android.adb import Adb
    from testbed.android.device import Phone, _user_server_hint

    adb = Adb(adb_port)
    rows = []
    for serial, state, tags in adb.devices():
        row = {"serial": serial, "state": state, "model": tags.get("model"), "soc": None, "abi": None,
               "android": None}
        if state == "device":
            info = Phone(adb, serial).info()
            row.update(model=info.model, soc=info.soc, abi=info.abi, android=info.android)
        else:
            row["note"] = {"unauthorized": "unlock it and accept the 'Allow USB debugging' prompt",
                           "offline": "reconnect the cable (or `adb reconnect`)"}.get(state, "")
        rows.append(row)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    con = Console(highlight=False)
    if not rows:
        con.print(f"no phone on adb (server on port {adb.port}){_user_server_hint(adb.port)}")
        return
    table = Table("serial", "state", "model", "SoC", "ABI", "Android")
    for r in rows:
        table.add_row(r["serial"], r["state"] + (f" ({r['note']})" if r.get("note") else ""), r["model"] or "-",
                      r["soc"] or "-", r["abi"] or "-", r["android"] or "-")
    con.print(table)


@app.command("check")
def check(serial: Serial = None, benchmark_model: BenchmarkBinary = None, adb_port: AdbPort = None) -> None:
    """What works on this phone: benchmark binary runs, op profiling, thermal/frequency readable, free space.

    Example: testbed android check --serial 28031FDH2005ZT --benchmark-model ~/android_aarch64_benchmark_model
    """
    from testbed.android.adb import Adb
    from testbed.android.device import REMOTE_BASE, Phone
    from testbed.android.session import phone_session

    adb = Adb(adb_port)
    con = Console(highlight=False)
    binary = _binary(benchmark_model, required=False)
    phone = Phone.select(adb, serial)
    info = phone.info()
    st = phone.state()
    free = phone.free_kb()
    lines = [("phone", f"{info.serial}: {info.manufacturer or ''} {info.model or ''}, {info.soc or '?'}, "
                       f"{info.abi or '?'}, Android {info.android or '?'} (SDK {info.sdk or '?'})"),
             ("cpu frequencies", f"{len(st.cpu_max_khz)} cores readable" if st.cpu_max_khz else "not readable"),
             ("thermal", f"{len(st.thermal_zones_c)} zones, status {st.thermal_status}"
              if st.thermal_zones_c or st.thermal_status is not None else "not readable"),
             ("battery", f"{st.battery_level}% {st.battery_temp_c} °C, "
                         f"{'charging' if st.charging else 'on battery'}" if st.battery_level is not None
              else "not readable"),
             ("free space", f"{free // 1024} MiB in {REMOTE_BASE}" if free is not None else "unknown")]
    if binary is not None:
        with phone_session(adb, phone.serial, binary) as held:
            p = held.phone
            lines.append(("benchmark_model", f"runs ({'LiteRT CompiledModel tool' if p.tool == 'litert' else 'TFLite'}"
                                             f", {len(p.flags)} flags)"))
            lines.append(("op profiling", {"csv-file": "yes (CSV file)", "legacy-csv-file": "yes (CSV file, old flag)",
                                           "stdout": "yes (stdout tables)", None: "no"}[p.op_profiling]))
            lines.append(("delegates", ", ".join(d for d, f in (("xnnpack", "use_xnnpack"), ("gpu", "use_gpu"),
                                                                  ("nnapi", "use_nnapi"), ("npu", "use_npu"))
                                              if f in p.flags) or "cpu only"))
    else:
        lines.append(("benchmark_model", "not checked (pass --benchmark-model PATH)"))
    for key, value in lines:
        con.print(f"{key:16s} {value}")


@app.command("profile")
def profile(model: Annotated[Path, typer.Argument(help="TFLite model on this host.")],
            serial: Serial = None, benchmark_model: BenchmarkBinary = None, adb_port: AdbPort = None,
            threads: Annotated[int | None, typer.Option("--threads", min=1, max=64)] = None,
            cores: Annotated[str, typer.Option("--cores", help="big | all | hex CPU mask (e.g. f0).")] = "all",
            delegate: Annotated[str, typer.Option("--delegate", help="cpu | xnnpack | gpu | nnapi.")] = "cpu",
            runs: Annotated[int, typer.Option("--runs", min=1, max=100000)] = 50,
            warmup: Annotated[int, typer.Option("--warmup", min=1, max=10000)] = 1,
            json_out: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False) -> None:
    """Whole-model benchmark KPIs and the per-layer table, measured on the phone.

    Example: testbed android profile posenet.tflite --threads 4 --cores big --delegate cpu
    """
    from testbed.android.adb import Adb
    from testbed.android.device import DELEGATES
    from testbed.android.session import describe_info, measure_part, measurement_summary, phone_session, state_flags
    from testbed.model.graph import ModelGraph

    if delegate not in DELEGATES:
        raise TestbedError(f"--delegate {delegate!r}: expected one of {', '.join(DELEGATES)}")
    binary = _binary(benchmark_model, required=True)
    graph = ModelGraph.from_file(model)          # refuses a file that is not a usable TFLite model, here
    adb = Adb(adb_port)
    with phone_session(adb, serial, binary, cores=cores, need_bytes=model.stat().st_size) as held:
        remote = held.phone.push(model, "model.tflite")
        m = measure_part(held, remote, threads=threads, delegate=delegate, runs=runs, warmup=warmup,
                         layer_outputs=[layer.outputs for layer in graph.layers])
        flags = state_flags(held.start_state, m.before, m.after)
    doc = {"phone": describe_info(held.info), "model": str(model), "threads": threads, "cores": cores,
           "mask": held.mask, "delegate": delegate, **measurement_summary(m), **flags}
    if json_out:
        typer.echo(json.dumps(doc, indent=2, default=str))
        return
    _print_profile(doc, graph, m)


def _print_profile(doc: dict, graph: object, m: object) -> None:
    con = Console(highlight=False)
    k = doc["kpis"]
    ms = lambda v: f"{v * 1000:.3f} ms" if v is not None else "-"  # noqa: E731
    mib = lambda v: f"{v / 2**20:.1f} MiB" if v is not None else "-"  # noqa: E731
    info = doc["phone"]
    con.print(f"{info['serial']} {info['model']} ({info['soc']}), cores {doc['cores']} "
              f"(mask {doc['mask'] or 'all'}), delegate {doc['delegate']}")
    con.print(f"init {ms(k['init_s'])}  first {ms(k['first_s'])}  warm-up {ms(k['warmup_mean_s'])}  "
              f"steady {ms(k['steady_mean_s'])} ± {ms(k['steady_std_s'])}  median {ms(k['steady_p50_s'])}")
    con.print(f"memory init {mib(k['init_memory_bytes'])}  peak {mib(k['peak_memory_bytes'])}")
    if doc["throttled"] or doc["hotter"]:
        con.print("[yellow]note:[/yellow] measured while " + " and ".join(
            w for w, f in (("throttled", doc["throttled"]), ("hotter than at the start", doc["hotter"])) if f))
    layers = doc["layers_s"]
    if not layers:
        con.print("per-layer: none (this benchmark_model has no op profiling, or the delegate hides the ops; "
                  "try --delegate cpu)")
        return
    table = Table("layer", "op", "mean", "share")
    total = sum(layers.values()) or 1.0
    for layer in graph.layers:                       # type: ignore[attr-defined]
        v = layers.get(layer.index)
        table.add_row(str(layer.index), layer.op, ms(v), f"{v / total:.1%}" if v is not None else "-")
    con.print(table)
    con.print(f"Σ layers ÷ whole model: {sum(layers.values()) / k['steady_mean_s']:.3f}"
              if k["steady_mean_s"] else "")


@app.command("parse")
def parse(log: Annotated[Path, typer.Argument(help="Saved benchmark_model output (stdout/stderr) or its "
                                                   "op-profiling CSV file.")],
          json_out: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False) -> None:
    """Parse a saved benchmark_model output from any phone.

    Example: testbed android parse pixel7_posenet.log --json
    """
    from testbed.android.output import OutputError, parse_benchmark_output

    if not log.is_file():
        raise TestbedError(f"{log}: not a file")
    if log.stat().st_size > 64 * 2**20:
        raise TestbedError(f"{log}: larger than 64 MiB; not a benchmark_model log")
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
        out = parse_benchmark_output(text)
    except OutputError as e:
        raise TestbedError(f"{log}: {e}") from None
    if json_out:
        typer.echo(json.dumps(out.to_dict(), indent=2))
        return
    con = Console(highlight=False)
    k = out.kpis()
    ms = lambda v: f"{v * 1000:.3f} ms" if v is not None else "-"  # noqa: E731
    con.print(f"tool {out.tool}{'' if out.complete else ' (output incomplete: no final timings line)'}")
    con.print(f"init {ms(k['init_s'])}  first {ms(k['first_s'])}  warm-up {ms(k['warmup_mean_s'])}  "
              f"steady {ms(k['steady_mean_s'])} ± {ms(k['steady_std_s'])}  median {ms(k['steady_p50_s'])}")
    if out.ops:
        table = Table("#", "node type", "avg", "%", "name")
        for i, r in enumerate(out.ops):
            table.add_row(str(i), r.node_type, f"{r.avg_ms:.3f} ms", f"{r.percent:.1f}", r.name)
        con.print(table)
    for e in out.errors:
        con.print(f"[red]tool error:[/red] {e}")
