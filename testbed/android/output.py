"""Reading what TFLite's ``benchmark_model`` printed, on any phone, in any version we know.

Owns the parsers of the benchmark tools' text output and nothing else (no adb, no
files written). The formats come from the tools' sources, not from samples:

* ``tflite/tools/benchmark/benchmark_model.cc`` (``BenchmarkLoggingListener``):
  ``Inference timings in us: Init: …, First inference: …, Warmup (avg): …,
  Inference (avg): …``, the memory lines, and one statistics line per run loop
  (``Stat::OutputToStream``: ``count=… first=… curr=… min=… max=… avg=… std=…``,
  plus `` p5=… median=… p95=…`` where the version keeps percentiles
  (``StatWithPercentiles``); ``count=N curr=X`` when every run took the same time).
* ``tflite/tools/tool_params.h`` (``LOG_TOOL_PARAM``): ``Description: [value]``.
* ``tflite/tools/logging.h``: ``INFO:``/``WARN:`` on stdout, ``ERROR:`` on stderr.
* op profiling (``tflite/profiling/profile_summary_formatter.cc`` and TensorFlow's
  ``tensorflow/core/util/stats_calculator.cc``): tab-separated tables (``Run Order``,
  ``Top by Computation Time``) in two layouts, with a ``[start]`` column (older
  TensorFlow) and without it (current), or CSV (``node type, [start, ]first, avg_ms,
  %, cdf%, mem KB, times called, name``); node names are ``[output, …]:node_index``.
* LiteRT's CompiledModel tool of the same name (``litert/tools/benchmark_litert_model.h``):
  ``Inference (avg):      12.34 ms (50 runs)`` and its neighbours, through LiteRT's
  logger (``INFO: [file:line] …``).

Truncated output (a phone unplugged mid-run, a killed tool) parses as far as it
goes; ``BenchmarkOutput.complete`` says whether the final timings line was reached.
What the numbers mean for a split point (KPIs, per-layer mapping, the latency
distribution the composed e2e draws from) is here too, since it is pure; running
the tool is ``testbed.android.device``'s.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from testbed.errors import TestbedError

__all__ = ["BenchmarkOutput", "OpRow", "OutputError", "RunStat", "draw_latencies", "help_flags",
           "map_ops_to_layers", "parse_benchmark_output", "parse_op_csv"]

_MB = 1024 * 1024          # the tools print KiB / 1024 as "MB"


class OutputError(TestbedError):
    """Text that is not benchmark_model output (or not enough of it)."""


@dataclass
class RunStat:
    """One ``Stat::OutputToStream`` line, in microseconds (None: not printed by that version)."""

    count: int
    curr: float
    first: float | None = None
    min: float | None = None
    max: float | None = None
    avg: float | None = None
    std: float | None = None
    p5: float | None = None
    median: float | None = None
    p95: float | None = None

    def __post_init__(self) -> None:
        if self.min is None:       # "count=N curr=X(all same)": every value was X
            self.first = self.first if self.first is not None else self.curr
            self.min = self.max = self.avg = self.curr
            self.std = 0.0


@dataclass
class OpRow:
    """One row of an op-profiling table. Times in milliseconds as printed."""

    node_type: str
    first_ms: float
    avg_ms: float
    percent: float
    cdf_percent: float
    mem_kb: float
    times_called: int
    name: str
    start_ms: float | None = None           # only in the layout with [start]

    @property
    def outputs(self) -> list[str]:
        """Output tensor names of the node (``[a, b]:7`` → ``["a", "b"]``); [] for other rows."""
        m = re.fullmatch(r"\[(.*)\](?::\d+)?", self.name.strip())
        if not m:
            return []
        return [s.strip() for s in re.split(r",|\t", m.group(1)) if s.strip()]

    @property
    def node_index(self) -> int | None:
        m = re.search(r":(\d+)$", self.name.strip())
        return int(m.group(1)) if m else None


@dataclass
class BenchmarkOutput:
    """Everything one run of a benchmark tool said. Times in µs as the tool prints them."""

    tool: str = "tflite"                     # tflite (benchmark_model) | litert (CompiledModel tool)
    params: dict[str, str] = field(default_factory=dict)
    model_size_mb: float | None = None
    init_ms: float | None = None             # "Initialized session in …ms."
    warmup: RunStat | None = None
    inference: RunStat | None = None
    init_us: float | None = None
    first_us: float | None = None
    warmup_avg_us: float | None = None
    inference_avg_us: float | None = None
    init_footprint_mb: float | None = None
    overall_footprint_mb: float | None = None
    peak_mb: float | None = None
    ops: list[OpRow] = field(default_factory=list)          # Run Order, regular runs, primary graph
    init_ops: list[OpRow] = field(default_factory=list)     # Run Order of the initialization
    op_layout: str | None = None             # "with_start" | "without_start" | "csv" | "csv_with_start"
    op_run_total: RunStat | None = None      # "Timings (microseconds): …" of the op profile
    errors: list[str] = field(default_factory=list)
    complete: bool = False                   # the final timings line was printed

    # --- what the testbed records --------------------------------------------

    def kpis(self) -> dict[str, Any]:
        """The KPI columns of parts.csv (seconds, bytes); None where this output has no number."""
        s = self.inference
        us = 1e-6
        init_mem = self.init_footprint_mb
        peak = self.peak_mb if self.peak_mb is not None else self.overall_footprint_mb
        return {
            "init_s": self.init_us * us if self.init_us is not None else None,
            "first_s": self.first_us * us if self.first_us is not None else None,
            "warmup_mean_s": self.warmup_avg_us * us if self.warmup_avg_us is not None else None,
            "steady_mean_s": self.inference_avg_us * us if self.inference_avg_us is not None else None,
            "steady_std_s": s.std * us if s is not None and s.std is not None else None,
            "steady_p50_s": s.median * us if s is not None and s.median is not None else None,
            "steady_p90_s": None,            # the tool prints p5/median/p95, never p90
            "init_memory_bytes": int(init_mem * _MB) if init_mem is not None else None,
            "peak_memory_bytes": int(peak * _MB) if peak is not None else None,
        }

    def latency_quantiles(self) -> list[tuple[float, float]]:
        """(probability, seconds) points of the steady-state latency the tool printed, for drawing
        samples: min, p5, median, p95, max where printed; else min, mean, max.

        The tool prints a summary of its runs, not each run; these points are what is left of
        their distribution. Raises OutputError when there is no steady-state line."""
        s = self.inference
        if s is None or s.min is None or s.max is None:
            if self.inference_avg_us is not None:
                return [(0.0, self.inference_avg_us * 1e-6), (1.0, self.inference_avg_us * 1e-6)]
            raise OutputError("no steady-state timing in the output (the run did not get that far)")
        avg = s.avg if s.avg is not None else self.inference_avg_us
        if s.p5 is not None and s.median is not None and s.p95 is not None:
            pts = [(0.0, s.min), (0.05, s.p5), (0.5, s.median), (0.95, s.p95)]
            top = s.max
            if avg is not None:
                # One slow run makes max a poor stand-in for the top 5 %: set the top of the last
                # segment so the distribution's mean is the mean the tool printed (within [p95, max]).
                top = min(max(2 * (avg - _pl_mean(pts)) / 0.05 - s.p95, s.p95), s.max)
            pts.append((1.0, top))
        else:
            mid = avg if avg is not None else (s.min + s.max) / 2
            if avg is not None:          # min, m, max with mean = avg: (min + 2m + max) / 4 = avg
                mid = min(max((4 * avg - s.min - s.max) / 2, s.min), s.max)
            pts = [(0.0, s.min), (0.5, mid), (1.0, s.max)]
        out: list[tuple[float, float]] = []
        for q, v in pts:        # keep it monotone: nth_element percentiles can tie with min/max
            v = max(v, out[-1][1]) if out else v
            out.append((q, v * 1e-6))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kpis"] = self.kpis()
        return d


def draw_latencies(points: Sequence[tuple[float, float]], n: int, seed: int = 0) -> list[float]:
    """``n`` latencies drawn by inverse transform from the piecewise-linear quantile function
    through ``points`` ((probability, seconds), increasing): the shape the tool printed is kept."""
    import numpy as np

    rng = np.random.default_rng(seed)
    qs = [p for p, _ in points]
    vs = [v for _, v in points]
    return [float(np.interp(u, qs, vs)) for u in rng.random(n)]


# --------------------------------------------------------------------------- parsing

_PREFIX = re.compile(r"^(?:(INFO|WARN|WARNING|ERROR|VERBOSE|FATAL): )?(?:\[[^\]\s]+:\d+\] )?")
_NUM = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|-?inf)"
_STAT = re.compile(
    r"count=(\d+)(?: first=" + _NUM + r")? curr=" + _NUM + r"(?:\(all same\))?"
    r"(?: min=" + _NUM + r" max=" + _NUM + r" avg=" + _NUM + r" std=" + _NUM + r")?"
    r"(?: p5=" + _NUM + r" median=" + _NUM + r" p95=" + _NUM + r")?\s*$")
_TIMINGS = re.compile(r"Inference timings in us: Init: " + _NUM + r", First inference: " + _NUM +
                      r", Warmup \(avg\): " + _NUM + r", Inference \(avg\): " + _NUM)
_FOOTPRINT = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): "
                        r"init=" + _NUM + r" overall=" + _NUM)
_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM)
_MODEL_SIZE = re.compile(r"The input model file size \(MB\): " + _NUM)
_INIT = re.compile(r"Initialized session in " + _NUM + r" ?ms\.")
_PARAM = re.compile(r"^([^:\[\]]{1,120}): \[(.*)\]$")
_TABLE_TITLE = re.compile(r"^=+ (.+?) =+$")
# LiteRT CompiledModel tool (benchmark_litert_model.h)
_LR = {
    "init_ms": re.compile(r"^Model initialization: +" + _NUM + r" ms"),
    "first_ms": re.compile(r"^Warmup \(first\): +" + _NUM + r" ms"),
    "warmup_avg_ms": re.compile(r"^Warmup \(avg\): +" + _NUM + r" ms \((\d+) runs\)"),
    "avg_ms": re.compile(r"^Inference \(avg\): +" + _NUM + r" ms \((\d+) runs\)"),
    "min_ms": re.compile(r"^Inference \(min\): +" + _NUM + r" ms"),
    "max_ms": re.compile(r"^Inference \(max\): +" + _NUM + r" ms"),
    "std_ms": re.compile(r"^Inference \(std\): +" + _NUM),
    "init_fp_mb": re.compile(r"^Init footprint: +" + _NUM + r" MB"),
    "overall_fp_mb": re.compile(r"^Overall footprint: +" + _NUM + r" MB"),
    "peak_mb": re.compile(r"^Peak memory: +" + _NUM + r" MB"),
}
_CSV_HEADERS = {
    "node type, start, first, avg_ms, %, cdf%, mem KB, times called, name": "csv_with_start",
    "node type, first, avg_ms, %, cdf%, mem KB, times called, name": "csv",
}


def _f(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def _stat(m: re.Match) -> RunStat:
    g = m.groups()
    return RunStat(count=int(g[0]), first=_f(g[1]), curr=_f(g[2]) or 0.0, min=_f(g[3]), max=_f(g[4]),
                   avg=_f(g[5]), std=_f(g[6]), p5=_f(g[7]), median=_f(g[8]), p95=_f(g[9]))


def _strip(line: str) -> tuple[str | None, str]:
    m = _PREFIX.match(line)
    return (m.group(1) if m else None), line[m.end():] if m else line


def parse_benchmark_output(text: str) -> BenchmarkOutput:
    """Parse stdout+stderr of one ``benchmark_model`` run (either tool, any known version).

    Raises:
        OutputError: nothing in ``text`` is benchmark_model output.
    """
    out = BenchmarkOutput()
    text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    # a table row without its newline was cut off (the tool ends every line): not a row
    torn = len(lines) - 1 if not text.endswith("\n") else None
    stats: list[RunStat] = []
    section = None                  # "init" | "run" while op-profiling tables follow
    recognised = 0
    i = 0
    litert: dict[str, Any] = {}
    while i < len(lines):
        severity, body = _strip(lines[i].rstrip("\n"))
        i += 1
        if severity in ("ERROR", "FATAL"):
            out.errors.append(body.strip())
        if body.startswith("Profiling Info for Benchmark Initialization"):
            section, recognised = "init", recognised + 1
            continue
        if body.startswith("Operator-wise Profiling Info for Regular Benchmark Runs"):
            section, recognised = "run", recognised + 1
            continue
        title = _TABLE_TITLE.match(body.strip())
        if title and section is not None:
            i = _table(lines, i, title.group(1), section, out, torn)
            continue
        if body.startswith("Timings (microseconds): ") and section == "run":
            m = _STAT.search(body)
            if m and out.op_run_total is None:
                out.op_run_total = _stat(m)
            continue
        for key, rx in _LR.items():
            m = rx.match(body.strip())
            if m:
                litert[key] = m.groups()
                recognised += 1
                break
        else:
            recognised += _line(body, out, stats)
    if litert:
        _litert(litert, out)
    if len(stats) >= 1:
        out.warmup = stats[0]
    if len(stats) >= 2:
        out.inference = stats[1]
    if not recognised:
        raise OutputError("not benchmark_model output (no line of it recognised)")
    return out


def _line(body: str, out: BenchmarkOutput, stats: list[RunStat]) -> int:
    """One plain line of the tool; returns 1 when recognised."""
    m = _TIMINGS.search(body)
    if m:
        out.init_us, out.first_us, out.warmup_avg_us, out.inference_avg_us = (_f(x) for x in m.groups())
        out.complete = True
        return 1
    m = _STAT.match(body.strip())
    if m and body.strip().startswith("count="):
        stats.append(_stat(m))
        return 1
    for rx, attrs in ((_FOOTPRINT, ("init_footprint_mb", "overall_footprint_mb")), (_PEAK, ("peak_mb",)),
                      (_MODEL_SIZE, ("model_size_mb",)), (_INIT, ("init_ms",))):
        m = rx.search(body)
        if m:
            for a, v in zip(attrs, m.groups()):
                setattr(out, a, _f(v))
            return 1
    m = _PARAM.match(body.strip())
    if m and not body.startswith(("Loaded model", "Running benchmark")):
        out.params[m.group(1).strip()] = m.group(2)
        return 1
    return 1 if body.startswith(("STARTING!", "Loaded model", "Running benchmark for at least")) else 0


def _litert(found: dict[str, Any], out: BenchmarkOutput) -> None:
    out.tool = "litert"
    ms = lambda k: _f(found[k][0]) * 1000 if k in found and _f(found[k][0]) is not None else None  # noqa: E731
    out.init_us = ms("init_ms")
    out.first_us = ms("first_ms")
    out.warmup_avg_us = ms("warmup_avg_ms")
    out.inference_avg_us = ms("avg_ms")
    if "avg_ms" in found:
        count = int(found["avg_ms"][1])
        out.inference = RunStat(count=count, curr=out.inference_avg_us or 0.0, min=ms("min_ms"), max=ms("max_ms"),
                                avg=out.inference_avg_us, std=ms("std_ms"))
        out.complete = True
    if "warmup_avg_ms" in found:
        out.warmup = RunStat(count=int(found["warmup_avg_ms"][1]), curr=out.warmup_avg_us or 0.0,
                             first=out.first_us, min=None)
    for key, attr in (("init_fp_mb", "init_footprint_mb"), ("overall_fp_mb", "overall_footprint_mb"),
                      ("peak_mb", "peak_mb")):
        if key in found:
            setattr(out, attr, _f(found[key][0]))


def _table(lines: list[str], i: int, title: str, section: str, out: BenchmarkOutput, torn: int | None = None) -> int:
    """Read the table whose title line was just consumed; returns the index after it."""
    if i >= len(lines):
        return i
    _, header = _strip(lines[i])
    layout = _CSV_HEADERS.get(header.strip())
    if layout is None:
        if "[node type]" not in header and "[Node type]" not in header:
            return i
        layout = "with_start" if "[start]" in header else "without_start"
    i += 1
    rows: list[OpRow] = []
    while i < len(lines) and i != torn:
        _, body = _strip(lines[i])
        if not body.strip():
            break
        row = _row(body, layout)
        if row is None:
            break
        rows.append(row)
        i += 1
    if title == "Run Order":
        target = out.init_ops if section == "init" else out.ops
        if not target:               # the primary graph's table comes first
            target.extend(rows)
            if section == "run":
                out.op_layout = layout
    return i


def _row(body: str, layout: str) -> OpRow | None:
    try:
        if layout.startswith("csv"):
            n = 8 if layout == "csv_with_start" else 7
            parts = [p.strip() for p in body.split(", ", n)]
            if len(parts) != n + 1:
                return None
            name = parts[-1]
            vals = parts[:-1]
        else:
            parts = body.split("\t")
            if parts and parts[0] == "":
                parts = parts[1:]
            n = 8 if layout == "with_start" else 7
            if len(parts) < n + 1:
                return None
            vals = [p.strip() for p in parts[:n]]
            name = "\t".join(parts[n:]).strip()
        start = None
        if layout in ("with_start", "csv_with_start"):
            start = float(vals.pop(1))
        node_type, first, avg, pct, cdf, mem, times = vals
        return OpRow(node_type=node_type, first_ms=float(first), avg_ms=float(avg),
                     percent=float(pct.rstrip("%")), cdf_percent=float(cdf.rstrip("%")), mem_kb=float(mem),
                     times_called=int(float(times)), name=name, start_ms=start)
    except ValueError:
        return None


def parse_op_csv(text: str) -> BenchmarkOutput:
    """Parse an op-profiling file (``--op_profiling_output_mode=csv`` or the older
    ``--profiling_output_csv_file``): the same sections as on stdout, CSV tables.

    Raises:
        OutputError: the file holds no op-profiling table.
    """
    out = parse_benchmark_output(text) if text.strip() else BenchmarkOutput()
    if not out.ops:
        raise OutputError("no op-profiling table (Run Order) in the file")
    return out


def map_ops_to_layers(ops: Iterable[OpRow], layer_outputs: Sequence[Sequence[str]]) -> dict[int, OpRow]:
    """Each testbed layer (by index, given its output tensor names) → the op-profiling row
    that produced those outputs. Layers the table has no row for (delegated, folded) are absent."""
    by_output: dict[str, OpRow] = {}
    for row in ops:
        for name in row.outputs:
            by_output.setdefault(name, row)
    out: dict[int, OpRow] = {}
    for index, outputs in enumerate(layer_outputs):
        for name in outputs:
            if name in by_output:
                out[index] = by_output[name]
                break
    return out


def help_flags(text: str) -> dict[str, str]:
    """Flags a benchmark binary's ``--help`` lists (``Flags::Usage``: ``\\t--name=default\\ttype\\t…``),
    name → default. Empty when the text is not a usage message."""
    flags: dict[str, str] = {}
    for line in text.splitlines():
        _, body = _strip(line)
        m = re.match(r"^\s*--([A-Za-z0-9_]+)=(\S*)\s+(int32|int64|float|bool|string)\s", body)
        if m:
            flags[m.group(1)] = m.group(2)
    return flags


def _pl_mean(points: Sequence[tuple[float, float]]) -> float:
    """Mean contributed by a piecewise-linear quantile function over its segments."""
    return sum((q1 - q0) * (v0 + v1) / 2 for (q0, v0), (q1, v1) in zip(points, points[1:]))
