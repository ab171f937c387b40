"""The device double's ``benchmark_model`` (TEST DOUBLE; see ``adb_double``): runs the pushed
model with LiteRT on this host and prints what the real tool prints for the flags given.

Output follows the tools' format strings (``tflite/tools/benchmark/benchmark_model.cc``,
``benchmark_tflite_model.cc``, ``tflite/tools/logging.h``, ``tool_params.h``,
``command_line_flags.cc``, ``tflite/profiling/profile_summary_formatter.cc``,
``tensorflow/core/util/stats_calculator.cc`` and LiteRT's ``benchmark_litert_model.h``).
Three builds, chosen by the JSON after the binary's marker:

* ``{"tool": "tflite"}`` — current benchmark_model: percentiles on the statistics lines,
  op-profiling tables without ``[start]``, ``--op_profiling_output_mode/_file``.
* ``{"tool": "tflite", "legacy": true}`` — an older TensorFlow build: no percentiles, the
  ``[start]`` column, only ``--profiling_output_csv_file``.
* ``{"tool": "litert"}`` — LiteRT's CompiledModel tool (``Inference (avg): … ms``); no op profiling.

``"providers"`` lists the delegate providers compiled in (default, xnnpack, gpu, nnapi).
Timings are this host's: whole-model runs are timed one by one; per-op times (op
profiling) come from each operator run alone (``nodes.benchmark.time_layers``), scaled so
they add up to the measured run mean, since LiteRT's Python API does not expose its
profiler. A GPU or NNAPI delegate asked for is reported as applied, and the model runs
on the CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

BASE_FLAGS = [  # BenchmarkModel::GetFlags
    ("num_runs", "int32", "50", "expected number of runs, see also min_secs, max_secs"),
    ("min_secs", "float", "1", "minimum number of seconds to rerun for, potentially making the actual number of "
                               "runs to be greater than num_runs"),
    ("max_secs", "float", "150", "maximum number of seconds to rerun for, potentially making the actual number of "
                                 "runs to be less than num_runs. Note if --max-secs is exceeded in the middle of a "
                                 "run, the benchmark will continue to the end of the run but will not start the next "
                                 "run."),
    ("run_delay", "float", "-1", "delay between runs in seconds"),
    ("num_threads", "int32", "-1", "number of threads"),
    ("warmup_runs", "int32", "1", "minimum number of runs performed on initialization, to allow performance "
                                  "characteristics to settle, see also warmup_min_secs"),
    ("warmup_min_secs", "float", "0.5", "minimum number of seconds to rerun for, potentially making the actual "
                                        "number of warm-up runs to be greater than warmup_runs"),
    ("verbose", "bool", "false", "Whether to log parameters whose values are not set. By default, only log those "
                                 "parameters that are set by parsing their values from the commandline flags."),
    ("report_peak_memory_footprint", "bool", "false", "Report the peak memory footprint by periodically checking "
                                                      "the memory footprint. Internally, a separate thread will be "
                                                      "spawned for this periodic check. Therefore, the performance "
                                                      "benchmark result could be affected."),
]
TFLITE_FLAGS = [
    ("graph", "string", "", "graph file name"),
    ("enable_op_profiling", "bool", "false", "enable op profiling"),
    ("max_profiling_buffer_entries", "int32", "1024", "max initial profiling buffer entries"),
    ("profiling_output_csv_file", "string", "", "[DEPRECATED: Use op_profiling_output_file and "
                                                "op_profiling_output_mode instead] File path to export profile data "
                                                "as CSV, if not set prints to stdout."),
]
OP_OUTPUT_FLAGS = [
    ("op_profiling_output_mode", "string", "stdout", "Output mode for op profiling results. Supported values are: "
                                                     "'stdout', 'csv' and 'proto'."),
    ("op_profiling_output_file", "string", "", "Output file for op profiling results."),
]
PROVIDER_FLAGS = {
    "default": [("help", "bool", "false", "Print out all supported flags if true."),
                ("num_threads", "int32", "-1", "number of threads used for inference on CPU.")],
    "xnnpack": [("use_xnnpack", "bool", "false", "explicitly apply the XNNPACK delegate. Note the XNNPACK delegate "
                                                 "could be implicitly applied by the TF Lite runtime regardless the "
                                                 "value of this parameter. To disable this implicit application, set "
                                                 "the value to false explicitly.")],
    "gpu": [("use_gpu", "bool", "false", "use gpu")],
    "nnapi": [("use_nnapi", "bool", "false", "use nnapi delegate api")],
}
LITERT_FLAGS = [
    ("graph", "string", "", "The path to the model file."),
    ("use_cpu", "bool", "true", "Whether to use CPU accelerator."),
    ("use_gpu", "bool", "false", "Whether to use GPU accelerator."),
    ("use_npu", "bool", "false", "Whether to use NPU accelerator."),
]
PARAM_LOG = [  # (flag, description, always) in LogParams order
    ("num_runs", "Min num runs", False), ("min_secs", "Min runs duration (seconds)", False),
    ("max_secs", "Max runs duration (seconds)", False), ("run_delay", "Inter-run delay (seconds)", False),
    ("num_threads", "Num threads", False), ("warmup_runs", "Min warmup runs", False),
    ("warmup_min_secs", "Min warmup runs duration (seconds)", False),
    ("report_peak_memory_footprint", "Report the peak memory footprint", False),
]
TFLITE_PARAM_LOG = [
    ("graph", "Graph", True), ("signature_to_run_for", "Signature to run", True),
    ("enable_op_profiling", "Enable op profiling", False),
    ("op_profiling_output_mode", "Op profiling output mode.", False),
    ("op_profiling_output_file", "Op profiling output file.", False),
    ("profiling_output_csv_file", "CSV File to export profiling data to", False),
]
PROVIDER_PARAM_LOG = {"default": [("num_threads", "#threads used for CPU inference")],
                      "xnnpack": [("use_xnnpack", "Use xnnpack")], "gpu": [("use_gpu", "Use gpu")],
                      "nnapi": [("use_nnapi", "Use nnapi")]}


def g(v: float) -> str:
    """``std::ostream << double`` with default flags: %g, six significant digits."""
    return "%g" % v


def fld(width: int, v: Any) -> str:
    """``InitField``: tab, right-aligned to ``width``, fixed with three decimals for doubles."""
    return "\t" + (f"{v:.3f}" if isinstance(v, float) else str(v)).rjust(width)


class Out:
    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def info(self, text: str) -> None:          # tflite/tools/logging.h: INFO/WARN on stdout
        self.stdout.append(f"INFO: {text}")

    def warn(self, text: str) -> None:
        self.stdout.append(f"WARN: {text}")

    def error(self, text: str) -> None:
        self.stderr.append(f"ERROR: {text}")

    def litert(self, text: str, line: int) -> None:   # LITERT_LOG → MinimalLogger on stderr
        self.stderr.append(f"INFO: [benchmark_litert_model.h:{line}] {text}")

    def result(self, status: int) -> tuple[bytes, bytes, int]:
        so = "".join(s + "\n" for s in self.stdout)
        se = "".join(s + "\n" for s in self.stderr)
        return so.encode(), se.encode(), status


def flag_list(variant: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    if variant.get("tool") == "litert":
        return BASE_FLAGS + LITERT_FLAGS
    flags = BASE_FLAGS + TFLITE_FLAGS + ([] if variant.get("legacy") else OP_OUTPUT_FLAGS)
    for p in variant.get("providers", ["default", "xnnpack", "gpu", "nnapi"]):
        flags += PROVIDER_FLAGS[p]
    return flags


def usage(path: str, flags: list[tuple[str, str, str, str]]) -> str:
    """``Flags::Usage``."""
    names = [f"--{n}={d}" for n, _, d, _ in flags]
    width = max(len(n) for n in names)
    text = f"usage: {path} <flags>\nFlags:\n"
    for name, (_, typ, _, use) in zip(names, flags):
        text += f"\t{name.ljust(width)}\t{typ}\toptional\t{use}\n"
    return text


def parse(args: list[str], flags: list[tuple[str, str, str, str]], out: Out) -> tuple[dict[str, Any], set[str], bool]:
    """``Flags::Parse``: values, the flags given, ok."""
    types = {}
    for n, t, d, _ in flags:
        types.setdefault(n, (t, d))
    values: dict[str, Any] = {n: _value(t, d) for n, (t, d) in types.items()}
    given: set[str] = set()
    unknown, ok = [], True
    for a in args:
        name, eq, text = a[2:].partition("=") if a.startswith("--") else ("", "", "")
        if name in types and eq:
            v = _value(types[name][0], text)
            if v is None:
                out.error(f"Failed to parse flag '{name}' against argv '{a}'")
                ok = False
            else:
                values[name], _ = v, given.add(name)
        else:
            unknown.append(a)
    if unknown and unknown[0] == "--help":
        ok = False
    if values.get("help"):
        ok = False
    if unknown and ok:
        out.warn("Unconsumed cmdline flags: " + " ".join(unknown))
    return values, given, ok


def _value(typ: str, text: str) -> Any:
    try:
        if typ == "bool":
            return {"true": True, "1": True, "false": False, "0": False}[text]
        if typ.startswith("int"):
            return int(text)
        if typ == "float":
            return float(text)
    except (KeyError, ValueError):
        return None
    return text


def run(phone: Any, path: str, args: list[str], variant: dict[str, Any]) -> tuple[bytes, bytes, int]:
    out = Out()
    litert = variant.get("tool") == "litert"
    if not litert:
        out.info("STARTING!")
    flags = flag_list(variant)
    values, given, ok = parse(args, flags, out)
    if not ok:
        out.error(usage(path, flags).rstrip("\n"))
        if not litert:
            out.error("Benchmarking failed.")
        return out.result(1)
    _log_params(out, values, given, variant)
    graph = values.get("graph", "")
    if not graph:
        out.error("Please specify the name of your TF Lite input file with --graph")
        out.error("Benchmarking failed.")
        return out.result(1)
    return _benchmark(phone, out, values, given, variant)


def _log_params(out: Out, values: dict[str, Any], given: set[str], variant: dict[str, Any]) -> None:
    show = lambda v: str(int(v)) if isinstance(v, bool) else g(v) if isinstance(v, float) else str(v)  # noqa: E731
    out.info(f"Log parameter values verbosely: [{int(values.get('verbose', False))}]")
    for name, desc, always in PARAM_LOG:
        if always or name in given:
            out.info(f"{desc}: [{show(values[name])}]")
    if variant.get("tool") == "litert":
        return
    for name, desc, always in TFLITE_PARAM_LOG:
        if always or name in given:
            out.info(f"{desc}: [{show(values.get(name, ''))}]")
    for p in variant.get("providers", ["default", "xnnpack", "gpu", "nnapi"]):
        for name, desc in PROVIDER_PARAM_LOG.get(p, []):
            if name in given:
                out.info(f"{desc}: [{show(values[name])}]")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import os
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024.0 / 1024.0


def _benchmark(phone: Any, out: Out, values: dict[str, Any], given: set[str],
               variant: dict[str, Any]) -> tuple[bytes, bytes, int]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from nodes import runtime

    litert = variant.get("tool") == "litert"
    graph = values["graph"]
    host = phone.host(graph)
    threads = values.get("num_threads", -1)
    if litert:
        out.litert(f"Loading model from: {graph}", 112)
    if not host.is_file():
        out.error(f"Could not open '{graph}'.")
        out.error(f"Failed to load model {graph}" if not litert else "Failed to load model.")
        out.error("Benchmarking failed.")
        return out.result(1)
    no_default = values.get("use_xnnpack") is False and "use_xnnpack" in given
    peak = {"mb": 0.0}
    stop = threading.Event()
    if values.get("report_peak_memory_footprint"):
        def monitor() -> None:
            while not stop.is_set():
                peak["mb"] = max(peak["mb"], _rss_mb())
                stop.wait(0.05)
        threading.Thread(target=monitor, daemon=True).start()
    start_mb = _rss_mb()
    t0 = time.perf_counter()
    try:
        kwargs: dict[str, Any] = {"model_path": str(host)}
        if threads and threads > 0:
            kwargs["num_threads"] = threads
        if no_default:
            kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interp = Interpreter(**kwargs)
        t_alloc = time.perf_counter()
        interp.allocate_tensors()
        alloc_us = int((time.perf_counter() - t_alloc) * 1e6)
    except (ValueError, RuntimeError) as e:
        stop.set()
        for line in str(e).strip().splitlines():
            out.error(line)
        out.error("Failed to initialize the interpreter" if not litert else "Failed to compile model.")
        out.error("Benchmarking failed.")
        return out.result(1)
    init_us = int((time.perf_counter() - t0) * 1e6)
    init_mb = _rss_mb() - start_mb
    if not litert:
        out.info(f"Loaded model {graph}")
    if any(values.get(k) for k in ("use_gpu", "use_nnapi")):
        name = "GPU" if values.get("use_gpu") else "NNAPI"
        out.info(f"Explicitly applied {name} delegate, and the model graph will be completely executed by the "
                 "delegate.")
    out.info(f"The input model file size (MB): {g(host.stat().st_size / 1e6)}")
    out.info(f"Initialized session in {g(init_us / 1e3)}ms.")
    runtime.set_inputs(interp, runtime.random_inputs(interp))
    warm = _loop(out, interp, values["warmup_runs"], values["warmup_min_secs"], values["max_secs"], variant)
    runs = _loop(out, interp, values["num_runs"], values["min_secs"], values["max_secs"], variant)
    overall_mb = _rss_mb() - start_mb
    stop.set()
    avg = sum(runs) / len(runs) if runs else float("nan")
    wavg = sum(warm) / len(warm) if warm else float("nan")
    if litert:
        _litert_results(out, init_us, warm, runs, init_mb, overall_mb, host.stat().st_size)
        return out.result(0)
    out.info(f"Inference timings in us: Init: {init_us}, First inference: {warm[0] if warm else 0}, "
             f"Warmup (avg): {g(wavg)}, Inference (avg): {g(avg)}")
    out.info("Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to "
             "the actual memory footprint of the model at runtime. Take the information at your discretion.")
    if variant.get("legacy"):
        out.info(f"Peak memory footprint (MB): init={g(init_mb)} overall={g(overall_mb)}")
    else:
        out.info(f"Memory footprint delta from the start of the tool (MB): init={g(init_mb)} overall={g(overall_mb)}")
        if peak["mb"] > 0:
            out.info(f"Overall peak memory footprint (MB) via periodic monitoring: {g(peak['mb'] - start_mb)}")
    if values.get("enable_op_profiling"):
        _op_profile(phone, out, values, variant, host, runs, alloc_us, init_mb, no_default)
    return out.result(0)


def _loop(out: Out, interp: Any, n: int, min_secs: float, max_secs: float, variant: dict[str, Any]) -> list[int]:
    out.info(f"Running benchmark for at least {n} iterations and at least {g(min_secs)} seconds but terminate if "
             f"exceeding {g(max_secs)} seconds.")
    times: list[int] = []
    t_start = time.perf_counter()
    while (len(times) < n or time.perf_counter() - t_start < min_secs) and time.perf_counter() - t_start <= max_secs:
        t = time.perf_counter()
        interp.invoke()
        times.append(int((time.perf_counter() - t) * 1e6))
    out.stdout.append("INFO: " + stat_line(times, percentiles=not variant.get("legacy")) + "\n")
    return times


def stat_line(v: list[int], percentiles: bool = True) -> str:
    """``Stat::OutputToStream`` (+ ``StatWithPercentiles``)."""
    if not v:
        text = "count=0"
    elif min(v) == max(v):
        text = f"count={len(v)} curr={v[-1]}" + ("(all same)" if len(v) > 1 else "")
    else:
        n = len(v)
        avg = sum(v) / n
        var = sum(x * x for x in v) / n - avg * avg
        std = int(max(var, 0.0) ** 0.5)
        text = f"count={n} first={v[0]} curr={v[-1]} min={min(v)} max={max(v)} avg={g(avg)} std={std}"
    if percentiles and v:
        s = sorted(v)
        pct = lambda p: s[len(s) * p // 100]  # noqa: E731  (nth_element at size*p/100)
        text += f" p5={pct(5)} median={pct(50)} p95={pct(95)}"
    return text


def _litert_results(out: Out, init_us: int, warm: list[int], runs: list[int], init_mb: float, overall_mb: float,
                    size: int) -> None:
    n = len(runs)
    avg = sum(runs) / n
    std = int(max(sum(x * x for x in runs) / n - avg * avg, 0.0) ** 0.5)
    out.litert("", 62)
    out.stderr.append("========== BENCHMARK RESULTS ==========")
    out.litert(f"Model initialization: {init_us / 1000.0:.2f} ms", 63)
    out.litert(f"Warmup (first):       {warm[0] / 1000.0:.2f} ms", 64)
    out.litert(f"Warmup (avg):         {sum(warm) / len(warm) / 1000.0:.2f} ms ({len(warm)} runs)", 66)
    out.litert(f"Inference (avg):      {avg / 1000.0:.2f} ms ({n} runs)", 68)
    out.litert(f"Inference (min):      {min(runs) / 1000.0:.2f} ms", 72)
    out.litert(f"Inference (max):      {max(runs) / 1000.0:.2f} ms", 74)
    out.litert(f"Inference (std):      {std / 1000.0:.2f}", 76)
    out.litert(f"Throughput:           {size * n * 1e6 / sum(runs) / (1024.0 * 1024.0):.2f} MB/s", 84)
    out.litert("", 93)
    out.stderr.append("Memory Usage:")
    out.litert(f"Init footprint:       {init_mb:.2f} MB", 94)
    out.litert(f"Overall footprint:    {overall_mb:.2f} MB", 96)
    out.litert("Peak memory usage not available. (peak_mem_mb <= 0)", 101)
    out.litert("======================================", 105)
    out.stderr.append("")


# ---------------------------------------------------------------------------- op profiling

def _op_profile(phone: Any, out: Out, values: dict[str, Any], variant: dict[str, Any], host: Path, runs: list[int],
                alloc_us: int, init_mb: float, per_op: bool) -> None:
    from nodes.benchmark import time_layers
    from testbed.model.graph import ModelGraph
    from testbed.model.layers import one_layer_models

    graph = ModelGraph.from_file(host)
    mean = sum(runs) / len(runs)
    legacy = bool(variant.get("legacy"))
    if per_op:
        alone = [t["mean_s"] * 1e6 for t in time_layers(one_layer_models(graph), runs=min(10, len(runs)), warmup=1)]
        scale = mean / sum(alone) if sum(alone) else 1.0
        nodes = [(layer.op, f"[{', '.join(layer.outputs)}]:{layer.operator}", a * scale)
                 for layer, a in zip(graph.layers, alone)]
    else:
        outs = [o.name for o in graph.outputs]
        nodes = [("TfLiteXNNPackDelegate", f"[{', '.join(outs)}]:{len(graph.subgraph.operators)}", mean)]
    mode = values.get("op_profiling_output_mode", "stdout")
    target = values.get("op_profiling_output_file", "") or values.get("profiling_output_csv_file", "")
    if values.get("profiling_output_csv_file"):
        mode = "csv"
    csv = mode == "csv"
    init = _report([("AllocateTensors", "AllocateTensors/0", float(alloc_us))], 1, legacy, csv, mem_kb=init_mb * 1024)
    run = _report(nodes, len(runs), legacy, csv, first_scale=runs[0] / mean if mean else 1.0)
    text_init = "Profiling Info for Benchmark Initialization:\n" + init + "\n"
    text_run = "Operator-wise Profiling Info for Regular Benchmark Runs:\n" + run + "\n"
    if target:
        dest = phone.host(target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text_init + text_run)
    else:
        out.stdout.append("INFO: " + text_init)
        out.stdout.append("INFO: " + text_run)


def _report(nodes: list[tuple[str, str, float]], n_runs: int, legacy: bool, csv: bool, first_scale: float = 1.0,
            mem_kb: float = 0.0) -> str:
    """``GenerateReport("profile")``: Run Order, Top by Computation Time, by node type, short summary."""
    total = sum(us for _, _, us in nodes) * n_runs
    rows = []
    start = 0.0
    for i, (typ, name, us) in enumerate(nodes):
        rows.append(dict(i=i, type=typ, name=name, avg=us / 1000.0, first=us * first_scale / 1000.0,
                         start=start, sum=us * n_runs, mem=mem_kb))
        start += us / 1000.0

    def header(title: str) -> str:
        h = "============================== " + title + " ==============================\n"
        if csv:
            return h + ("node type, start, first, avg_ms, %, cdf%, mem KB, times called, name" if legacy else
                        "node type, first, avg_ms, %, cdf%, mem KB, times called, name")
        return h + (fld(24, "[node type]") + (fld(17, "[start]") if legacy else "") + fld(9, "[first]")
                    + fld(9, "[avg ms]") + fld(8, "[%]") + fld(8, "[cdf%]") + fld(10, "[mem KB]")
                    + fld(9, "[times called]") + "\t[Name]")

    def table(title: str, order: list[dict[str, Any]]) -> str:
        text, cum = header(title) + "\n", 0.0
        for r in order:
            cum += r["sum"]
            pct, cdf = r["sum"] * 100.0 / total, cum * 100.0 / total
            if csv:
                name = r["name"] if legacy else r["name"].replace(",", "\t")
                parts = [r["type"]] + ([g(r["start"])] if legacy else []) + [
                    g(r["first"]), g(r["avg"]), g(pct) + "%", g(cdf) + "%", g(r["mem"]), "1", name]
                text += ", ".join(parts) + "\n"
            else:
                text += (fld(24, r["type"]) + (fld(17, r["start"]) if legacy else "") + fld(9, r["first"])
                         + fld(9, r["avg"]) + fld(7, pct) + "%" + fld(7, cdf) + "%" + fld(10, r["mem"])
                         + fld(9, 1) + "\t" + r["name"] + "\n")
        return text + "\n"

    text = table("Run Order", rows) + table("Top by Computation Time", sorted(rows, key=lambda r: -r["avg"])[:10])
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(int(r["sum"] / n_runs))
    acc = sum(sum(v) for v in by_type.values())
    text += f"Number of nodes executed: {len(rows)}\n"
    text += "============================== Summary by node type ==============================\n"
    text += ("node type, count, avg_ms, avg %, cdf %, mem KB, times called\n" if csv else
             fld(24, "[Node type]") + fld(9, "[count]") + fld(10, "[avg ms]") + fld(11, "[avg %]") + fld(11, "[cdf %]")
             + fld(10, "[mem KB]") + fld(10, "[times called]") + "\n")
    cdf = 0.0
    for typ, us in sorted(by_type.items(), key=lambda kv: -sum(kv[1])):
        pct = sum(us) / acc * 100.0 if acc else 0.0
        cdf += pct
        if csv:
            text += f"{typ}, {len(us)}, {g(sum(us) / 1000.0)}, {g(pct)}%, {g(cdf)}%, {g(mem_kb)}, {len(us)}\n"
        else:
            text += (fld(24, typ) + fld(9, len(us)) + fld(10, sum(us) / 1000.0) + fld(10, pct) + "%" + fld(10, cdf)
                     + "%" + fld(10, float(mem_kb)) + fld(9, len(us)) + "\n")
    run_total = [int(total / n_runs)] * n_runs
    text += "\n" + "Timings (microseconds): " + stat_line(run_total, percentiles=False) + "\n"
    text += "Memory (bytes): count=0\n" + f"{len(rows)} nodes observed\n\n"
    return text


def make_binary(dest: Path, variant: dict[str, Any] | None = None, abi: str = "arm64-v8a") -> Path:
    """A file the double runs as benchmark_model: an ELF64 header for ``abi`` and the marker."""
    import json
    import struct

    from tests.android.adb_double import ELF_MACHINE, MARKER

    head = bytearray(64)
    head[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HH", head, 16, 3, ELF_MACHINE[abi])       # ET_DYN, e_machine
    dest.write_bytes(bytes(head) + MARKER + json.dumps(variant or {"tool": "tflite"}).encode() + b"\n")
    dest.chmod(0o755)
    return dest
