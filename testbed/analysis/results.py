"""The run folder: what a sweep leaves on disk, written as it goes.

Owns the file names, the column names and units (documented in
docs/results.md), appending after every configuration so an interrupted sweep
keeps what it measured and ``--resume`` knows what is finished, and reading the
files back with typed values (the report and the planner read only these).
Measuring is ``testbed.sweep``'s job; plotting ``testbed.analysis.report``'s.

Layout of ``RUN_DIR``::

    config.yaml        the resolved experiment (base units, split points, profiles)
    environment.json   versions, kernel, CPU, netem capability, backend, image ids
    manifest.json      the splitter's manifest (parts/ holds the part files)
    samples.csv        one row per sample
    summary.csv        one row per configuration (repeat x profile x split), written last:
                       a configuration is finished when its summary row exists
    parts.csv          per configuration, per part, per node: file bytes, delivery, KPIs
    layers.csv         per node, per layer: latency stats, output bytes, params, MACs
    failures.csv       configurations that failed mid-way (e.g. an ssh connection dropped):
                       repeat, profile, split, time, error; no summary row, so --resume redoes them

Every time is in seconds, every size in bytes, rates in bit/s, loss in percent.

Torn rows: an append is one ``write()`` of whole rows, fsynced; a short write
(disk full) is cut back before the error is raised. A process killed mid-write
(or SIGXFSZ) can still leave an incomplete last line: readers skip it, and
:meth:`RunFolder.open` (``--resume``) cuts it off and says so in
``RunFolder.notices`` (also logged as a warning), so the next append never
joins it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml

from nodes.stats import describe

log = logging.getLogger("testbed.analysis.results")

SAMPLES, SUMMARY, PARTS, LAYERS = "samples.csv", "summary.csv", "parts.csv", "layers.csv"
FAILURES = "failures.csv"          # configurations that failed (a node died, a phone unplugged); --resume redoes them
ENVIRONMENT, CONFIG, MANIFEST = "environment.json", "config.yaml", "manifest.json"

# Per-sample timings in the order the measurement contract lists them.
TIMINGS = ("head", "encode", "uplink", "remote_rx_lag", "remote_decode", "tail", "remote_encode", "downlink",
           "local_rx_lag", "decode", "e2e")
# The parts of e2e that do not overlap, in the order they happen: their sum can never exceed e2e.
E2E_PARTS = TIMINGS[:-1]
STATS = ("mean", "std", "p10", "p50", "p90", "p99")

# Where a configuration's wall time goes, in the order it happens; they add up to wall_s.
PHASES = ("link", "split", "tail_load", "delivery", "head_load", "kpi", "warmup", "sampling", "write", "other")

# A configuration is one (repeat, profile, split); repeat is 0 unless runs.repeat > 1.
CONFIG_KEY = ("repeat", "profile", "split")

# Per node, over the sample: CPU time of the node's cgroup, CFS periods in which it
# was throttled, time spent throttled, and how long the node's measuring thread
# waited for a CPU held by someone else (None: the counters were not readable).
CPU_COLUMNS = tuple(f"{node}_{c}" for node in ("local", "remote")
                    for c in ("cpu_s", "throttled_periods", "throttled_s", "runq_wait_s"))

# A phone as the local node (testbed.sweep.android): where each sample's head time came from
# (phone | none; empty without a phone) and the proxy local node's own head time it replaced.
PHONE_SAMPLE_COLUMNS = ("head_source", "proxy_head_s")
# summary.csv: the phone's state before/after the configuration and what it means.
PHONE_SUMMARY_COLUMNS = (
    "head_source", "phone_serial", "phone_mask", "phone_measured",
    "phone_temp_before_c", "phone_temp_after_c", "phone_freq_ratio_before", "phone_freq_ratio_after",
    "phone_thermal_status", "phone_battery_level", "phone_charging", "phone_throttled", "phone_hotter",
)
# The data path (docs/data-path.md): topology and transport; per part, the CPU time of
# the node running it during its invoke; fidelity against the uncompressed split;
# UDP datagrams; stream frames (index, arrival, queueing).
DATA_PATH_SAMPLE_COLUMNS = (
    "topology", "transport", "head_cpu_s", "tail_cpu_s",
    "max_abs_err", "snr_db", "bitwise_equal", "kp_drift_mean_px", "kp_drift_max_px",
    "packets_sent", "packets_lost", "udp_wait_s", "dropped", "frame", "arrival_s", "queue_s", "remote_queue_s",
    "uplink_bytes", "downlink_bytes",
)
DATA_PATH_SUMMARY_COLUMNS = (
    "topology", "transport", "on_loss", "nft_loss_pct", "mode", "fps", "queue", "cut_ratio",
    "frames_offered", "frames_dropped", "frames_lost", "frames_completed", "drop_rate", "throughput_fps",
    "stream_s", "uplink_bitrate_bps", "downlink_bitrate_bps", "uplink_utilisation", "downlink_utilisation",
    "max_sustainable_fps", "head_node", "tail_node", "head_cpu_mean_s", "tail_cpu_mean_s",
    "max_abs_err_max", "snr_db_p50", "snr_db_p10", "bitwise_equal_samples", "kp_drift_mean_px", "kp_drift_max_px",
    "packets_sent", "packets_lost", "packet_loss_pct",
)

SAMPLE_COLUMNS = (
    "repeat", "profile", "split", "sample", "input_index", "codec", "input_encoding",
    "emulation_uplink", "emulation_downlink", "clock",
    *(f"{t}_s" for t in TIMINGS),
    "cut_bytes_raw", "cut_bytes_wire", "result_bytes_wire",
    "uplink_ideal_s", "downlink_ideal_s", "uplink_over_ideal", "downlink_over_ideal",
    *CPU_COLUMNS,
    "clock_offset_s", "clock_uncertainty_s",
    "uplink_retrans", "downlink_retrans", *PHONE_SAMPLE_COLUMNS,
    *DATA_PATH_SAMPLE_COLUMNS,
)

# Where each direction was shaped, and the two nodes' clocks when they differ (an ssh
# remote): the offset the one-way times were corrected with, the bound on their error,
# the estimate after the configuration and the drift between the two.
SHAPING_COLUMNS = ("uplink_shaped_at", "downlink_shaped_at")
CLOCK_COLUMNS = ("clock_offset_s", "clock_uncertainty_s", "clock_offset_after_s", "clock_uncertainty_after_s",
                 "clock_drift_s", "clock_drift_ppm")

SUMMARY_COLUMNS = (
    "repeat", "profile", "split", "codec", "input_encoding", "emulation_uplink", "emulation_downlink", "clock",
    "uplink_rate_bps", "uplink_delay_s", "uplink_loss_pct",
    "downlink_rate_bps", "downlink_delay_s", "downlink_loss_pct",
    "count", "warmup", "cut_bytes_raw", "cut_bytes_wire", "result_bytes_wire",
    "head_file_bytes", "tail_file_bytes", "delivery_s", "delivery_ideal_s", "sampling_s", "wall_s",
    *(f"phase_{p}_s" for p in PHASES),
    *(f"{t}_{s}_s" for t in TIMINGS for s in STATS),
    "e2e_p50_ci_low_s", "e2e_p50_ci_high_s", "e2e_p50_ci_level",
    "uplink_ideal_s", "downlink_ideal_s", "uplink_over_ideal_p50", "downlink_over_ideal_p50",
    "local_throttled_samples", "remote_throttled_samples", "local_cpu_mean_s", "remote_cpu_mean_s",
    "local_runq_wait_p50_s", "remote_runq_wait_p50_s",
    *SHAPING_COLUMNS, *CLOCK_COLUMNS,
    "retrans_samples", *PHONE_SUMMARY_COLUMNS,
    *DATA_PATH_SUMMARY_COLUMNS,
)

KPI_COLUMNS = (
    "init_s", "first_s", "warmup_mean_s", "steady_mean_s", "steady_std_s", "steady_p50_s", "steady_p90_s",
    "init_memory_bytes", "peak_memory_bytes",
)
PART_COLUMNS = (
    "repeat", "profile", "split", "part", "node", "file_bytes", "sha256", "delivery_s", "kpi_profile", *KPI_COLUMNS,
)

# A configuration that could not be measured: where it was, what died and why.
# It has no summary row, so --resume measures it again.
FAILURE_COLUMNS = ("repeat", "profile", "split", "phase", "node", "cause", "error", "at")

LAYER_COLUMNS = (
    "node", "layer", "op", "output_bytes", "params", "param_bytes", "macs",
    "mean_s", "std_s", "p50_s", "p90_s", "runs", "threads", "cpus",
)

_TEXT = {"profile", "codec", "input_encoding", "emulation_uplink", "emulation_downlink", "clock",
         "part", "node", "sha256", "kpi_profile", "op", "phase", "cause", "error", "at",
         "head_source", "phone_serial", "phone_mask",
         "uplink_shaped_at", "downlink_shaped_at",
         "transport", "on_loss", "mode", "head_node", "tail_node", "bitwise_equal", "dropped"}
_INT_SUFFIX = ("_bytes", "_bytes_raw", "_bytes_wire")
_INTS = {"repeat", "split", "sample", "input_index", "count", "warmup", "layer", "params", "macs", "runs",
         "threads", "uplink_rate_bps", "downlink_rate_bps", "local_throttled_periods", "remote_throttled_periods",
         "local_throttled_samples", "remote_throttled_samples", "uplink_retrans", "downlink_retrans",
         "retrans_samples", "phone_measured", "phone_thermal_status",
         "phone_battery_level", "phone_charging", "phone_throttled", "phone_hotter",
         "topology", "frame", "queue", "packets_sent",
         "packets_lost", "frames_offered", "frames_dropped", "frames_lost", "frames_completed",
         "bitwise_equal_samples"}


def summarize(values: Sequence[float | None]) -> dict[str, float | None]:
    """mean, std (sample, ddof=1; 0 for one value), p10, p50, p90, p99
    (linear interpolation): ``nodes.stats.describe``. All None for no values; NaNs are ignored."""
    return describe(values)


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """Distribution-free confidence interval of the median: (low, high, confidence).

    Order statistics: for n sorted values, [x(j), x(n+1-j)] holds the median with
    probability 1 - 2 P(B <= j-1), B ~ Binomial(n, 1/2), whatever the distribution.
    Returns the narrowest such interval with confidence >= ``level``; with too few
    values for that (n <= 5 at 95 %) it returns [min, max] and the confidence it
    really has (n = 3: 0.75), so a reader never sees a level that was not reached.
    """
    arr = sorted(v for v in values if v is not None and not math.isnan(v))
    n = len(arr)
    if n == 0:
        return None, None, None

    def confidence(j: int) -> float:  # of [x(j), x(n+1-j)] (1-based): 1 - 2 P(B <= j-1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n

    best_j = 1
    for j in range(2, (n + 1) // 2 + 1):
        if confidence(j) < level:
            break
        best_j = j
    confidence_reached = confidence(best_j)
    return arr[best_j - 1], arr[n - best_j], confidence_reached


def wire_bytes(payload_bytes: int, mss: int | None, mtu: int | None, l2_header: int = 14) -> int:
    """Bytes a TCP payload occupies on an Ethernet link: each segment of at most
    ``mss`` payload bytes carries the IP and TCP headers (``mtu - mss``: 52 with
    timestamps at MTU 1500) and the L2 header the qdisc counts (14)."""
    if payload_bytes <= 0:
        return 0
    mss = mss or 1448
    per_segment = (mtu - mss if mtu and mtu > mss else 52) + l2_header
    return payload_bytes + math.ceil(payload_bytes / mss) * per_segment


def ideal_transfer_s(payload_bytes: int | None, rate_bps: float | None, delay_s: float | None,
                     mss: int | None, mtu: int | None) -> float | None:
    """Framing-aware ideal time of one transfer: one-way delay + wire bytes at the rate.

    None when the direction has no rate (nothing to compare with) or nothing crossed."""
    if not payload_bytes or not rate_bps:
        return None
    return (delay_s or 0.0) + wire_bytes(int(payload_bytes), mss, mtu) * 8 / rate_bps


@dataclass
class ConfigurationResult:
    """Everything one configuration (repeat x profile x split) produced."""

    profile: str
    split: int
    samples: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)  # the non-timing summary columns
    parts: list[dict[str, Any]] = field(default_factory=list)
    repeat: int = 0

    def summary_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"repeat": self.repeat, "profile": self.profile, "split": self.split,
                               "count": len(self.samples)}
        row.update(self.summary)
        row.update(sample_statistics(self.samples))
        for col in ("cut_bytes_raw", "cut_bytes_wire", "result_bytes_wire", "clock"):
            if col not in row:
                vals = [s.get(col) for s in self.samples if s.get(col) is not None]
                row[col] = vals[0] if vals else None
        return row


def _median(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def sample_statistics(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary columns computed from samples: timing statistics, the median e2e's
    confidence interval, ideal-vs-measured transfer ratios and CPU throttling."""
    row: dict[str, Any] = {}
    for t in TIMINGS:
        for s, v in summarize([x.get(f"{t}_s") for x in samples]).items():
            row[f"{t}_{s}_s"] = v
    low, high, level = median_ci([x.get("e2e_s") for x in samples])
    row.update(e2e_p50_ci_low_s=low, e2e_p50_ci_high_s=high, e2e_p50_ci_level=level)
    for d in ("uplink", "downlink"):
        row[f"{d}_ideal_s"] = _median(x.get(f"{d}_ideal_s") for x in samples)
        row[f"{d}_over_ideal_p50"] = _median(x.get(f"{d}_over_ideal") for x in samples)
    for node in ("local", "remote"):
        periods = [x.get(f"{node}_throttled_periods") for x in samples]
        row[f"{node}_throttled_samples"] = (sum(1 for p in periods if p) if any(p is not None for p in periods)
                                            else None)
        cpu = [x[f"{node}_cpu_s"] for x in samples if x.get(f"{node}_cpu_s") is not None]
        row[f"{node}_cpu_mean_s"] = float(np.mean(cpu)) if cpu else None
        row[f"{node}_runq_wait_p50_s"] = _median(x.get(f"{node}_runq_wait_s") for x in samples)
    counts = [(x.get("uplink_retrans"), x.get("downlink_retrans")) for x in samples]
    row["retrans_samples"] = (sum(1 for up, down in counts if (up or 0) + (down or 0) > 0)
                              if any(v is not None for pair in counts for v in pair) else None)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value)  # shortest exact round trip
    return str(value)


def _typed(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _TEXT:
        return text
    if column in _INTS or column.endswith(_INT_SUFFIX):
        try:
            return int(text)
        except ValueError:
            return int(float(text))
    try:
        return float(text)
    except ValueError:
        return text


def _records(data: bytes) -> tuple[list[list[str]], int]:
    """The complete records of a result CSV (header first) and how many bytes
    they take.

    A record is complete when the text after it ends with a newline, it parses
    (a write cut inside a quoted cell leaves an open quote) and it has as many
    fields as the header. Only the last record can be torn: appends are
    sequential. Offsets come from the reader's physical line count, so a
    quoted cell holding a newline stays one record."""
    text = data.decode("utf-8", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[list[str]] = []
    starts: list[int] = []            # physical line where each record starts
    line = 0
    try:
        for rec in reader:
            records.append(rec)
            starts.append(line)
            line = reader.line_num
    except csv.Error:
        return records, _offset(text, line)
    if not records:
        return [], 0
    if text.endswith("\n") and (len(records) == 1 or len(records[-1]) == len(records[0])):
        return records, len(data)
    records.pop()
    return records, _offset(text, starts[-1])


def _offset(text: str, lines: int) -> int:
    """Bytes (UTF-8) of the first ``lines`` physical lines of ``text``."""
    pos = 0
    for _ in range(lines):
        pos = text.index("\n", pos) + 1
    return len(text[:pos].encode("utf-8"))


def _complete_length(data: bytes) -> int:
    """Bytes of ``data`` up to the end of its last complete record."""
    return _records(data)[1]


def _raw_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a result CSV as text; an incomplete last row (a
    write cut off) is skipped, with a warning."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, whole = _records(data)
    if whole != len(data):
        log.warning("%s: skipping an incomplete last line (%d bytes; a write was cut off)", path, len(data) - whole)
    if not records:
        return []
    header = records[0]
    return [dict(zip(header, rec)) for rec in records[1:]]


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a result CSV with numbers as int/float and empty cells as None."""
    return [{k: _typed(k, v) for k, v in row.items()} for row in _raw_rows(Path(path))]


def repair_tail(path: Path) -> str | None:
    """Cut an incomplete last line off ``path``; returns what was done (None: nothing)."""
    if not path.exists():
        return None
    data = path.read_bytes()
    whole = _complete_length(data)
    if whole == len(data):
        return None
    with path.open("r+b") as f:
        f.truncate(whole)
        f.flush()
        os.fsync(f.fileno())
    return (f"{path.name}: dropped an incomplete last line ({len(data) - whole} bytes): "
            "a write was cut off (disk full or killed); the configuration it belonged to is measured again")


def _rows_text(columns: Sequence[str], rows: Iterable[dict[str, Any]], header: bool) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(columns)
    for row in rows:
        w.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue().encode("utf-8")


def _append(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append ``rows`` in one ``write()``, fsynced. On a short write or an
    error the file is cut back to its previous length, so no half row stays."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        before = os.fstat(fd).st_size
        data = _rows_text(columns, rows, header=before == 0)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes; disk full?)")
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass   # RunFolder.open / read_csv drop the torn line instead
            from testbed.errors import TestbedError
            raise TestbedError(f"{path}: cannot append {len(data)} bytes: {e.strerror or e}; "
                               "nothing of it was kept") from e
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunFolder:
    """A run folder being written (or read back).

    Append order per configuration is parts, samples, then the summary row: the
    summary row is the commit mark. :meth:`open` drops sample and part rows of
    configurations without a summary row (a run killed mid-configuration), so a
    resumed run measures them again from scratch.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.notices: list[str] = []   # what open() repaired, for the CLI to print

    # --- creation and resume -------------------------------------------

    @classmethod
    def create(cls, parent: str | Path, name: str) -> "RunFolder":
        """A fresh ``parent/name`` folder; refuses one that exists."""
        path = Path(parent) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """An existing run folder, for ``--resume``: incomplete last lines cut
        off (listed in ``notices`` and logged), unfinished configurations removed."""
        folder = cls(path)
        if not (folder.path / CONFIG).is_file():
            from testbed.errors import TestbedError
            raise TestbedError(f"{folder.path}: not a run folder (no {CONFIG})")
        for name in (SUMMARY, SAMPLES, PARTS, LAYERS):
            notice = repair_tail(folder.path / name)
            if notice:
                log.warning("%s", notice)
                folder.notices.append(notice)
        folder._drop_unfinished()
        return folder

    def _drop_unfinished(self) -> None:
        done = self.finished()
        for name, columns in ((SAMPLES, SAMPLE_COLUMNS), (PARTS, PART_COLUMNS)):
            path = self.path / name
            if not path.exists():
                continue
            rows = _raw_rows(path)
            keep = [r for r in rows if (_typed("repeat", r.get("repeat") or "") or 0, r.get("profile"),
                                        _typed("split", r.get("split") or "")) in done]
            if len(keep) != len(rows):
                with path.with_name(name + ".tmp").open("w", newline="", encoding="utf-8") as f:
                    w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
                    w.writeheader()
                    w.writerows(keep)
                os.replace(path.with_name(name + ".tmp"), path)

    # --- writing ----------------------------------------------------------

    def write_config(self, data: dict[str, Any]) -> None:
        _write_atomic(self.path / CONFIG, yaml.safe_dump(data, sort_keys=False))

    def write_environment(self, data: dict[str, Any]) -> None:
        _write_atomic(self.path / ENVIRONMENT, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        _write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def append_configuration(self, result: ConfigurationResult) -> dict[str, Any]:
        """Append one finished configuration; returns its summary row."""
        self.write_rows(result)
        return self.commit(result)

    def write_rows(self, result: ConfigurationResult) -> None:
        """First half of an append: the configuration's part and sample rows."""
        key = {"repeat": result.repeat, "profile": result.profile, "split": result.split}
        _append(self.path / PARTS, PART_COLUMNS, ({**p, **key} for p in result.parts))
        _append(self.path / SAMPLES, SAMPLE_COLUMNS,
                ({**s, **key, "sample": s.get("sample", i)} for i, s in enumerate(result.samples)))

    def commit(self, result: ConfigurationResult) -> dict[str, Any]:
        """Second half: the summary row, which marks the configuration finished."""
        row = result.summary_row()
        _append(self.path / SUMMARY, SUMMARY_COLUMNS, [row])
        return row

    def append_failure(self, row: dict[str, Any]) -> None:
        """Record a configuration that failed (it stays unfinished: --resume retries it)."""
        _append(self.path / FAILURES, FAILURE_COLUMNS, [row])

    def failures(self) -> list[dict[str, Any]]:
        return _with_repeat(read_csv(self.path / FAILURES))

    def append_layers(self, rows: Iterable[dict[str, Any]]) -> None:
        _append(self.path / LAYERS, LAYER_COLUMNS, rows)

    # --- reading ----------------------------------------------------------

    def finished(self) -> set[tuple[int, str, int]]:
        """(repeat, profile, split) of every configuration with a summary row."""
        return {config_key(r) for r in read_csv(self.path / SUMMARY)}

    def layer_nodes(self) -> set[str]:
        """Nodes whose per-layer profile is already recorded."""
        return {r["node"] for r in read_csv(self.path / LAYERS)}

    def samples(self) -> list[dict[str, Any]]:
        return _with_repeat(read_csv(self.path / SAMPLES))

    def summary(self) -> list[dict[str, Any]]:
        """One row per finished configuration, repeats apart."""
        return _with_repeat(read_csv(self.path / SUMMARY))

    def configurations(self) -> list[dict[str, Any]]:
        """One row per (profile, split), repeats pooled (``pool_repeats``): what the
        report and the planner compare."""
        return pool_repeats(self.summary(), self.samples())

    def parts(self) -> list[dict[str, Any]]:
        return _with_repeat(read_csv(self.path / PARTS))

    def layers(self) -> list[dict[str, Any]]:
        return read_csv(self.path / LAYERS)

    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / CONFIG).read_text(encoding="utf-8"))

    def environment(self) -> dict[str, Any]:
        path = self.path / ENVIRONMENT
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def config_key(row: dict[str, Any]) -> tuple[int, str, int]:
    """(repeat, profile, split) of a result row (repeat 0 for folders written before repeats)."""
    return int(row.get("repeat") or 0), row["profile"], int(row["split"])


def _with_repeat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        if r.get("repeat") is None:
            r["repeat"] = 0
    return rows


# Summary columns that add up over repeats; the rest are the same in every repeat
# (link, sizes, codec) or are recomputed from the pooled samples.
_ADDITIVE = ("count", "sampling_s", "wall_s")


def pool_repeats(summary: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the repeats of each (profile, split) into one row, in first-seen order.

    Timing statistics, the median's confidence interval and the ratios are
    recomputed from all repeats' samples; counts and wall times add up;
    ``repeats`` says how many were pooled and ``e2e_p50_repeat_spread`` is the
    largest ÷ smallest per-repeat median e2e (1.0 = the repeats agree exactly).
    A run with one repeat comes back row for row, with ``repeats`` = 1."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in summary:
        groups.setdefault((r["profile"], r["split"]), []).append(r)
    by_config: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for x in samples:
        by_config.setdefault((x["profile"], x["split"]), []).append(x)
    out = []
    for key, rows in groups.items():
        row = dict(rows[0])
        row.pop("repeat", None)
        row["repeats"] = len(rows)
        p50s = [r["e2e_p50_s"] for r in rows if r.get("e2e_p50_s")]
        row["e2e_p50_repeat_spread"] = max(p50s) / min(p50s) if len(p50s) > 1 else None
        if len(rows) > 1:
            for col in _ADDITIVE:
                vals = [r.get(col) for r in rows if r.get(col) is not None]
                row[col] = sum(vals) if vals else None
            delivery = [r["delivery_s"] for r in rows if r.get("delivery_s") is not None]
            row["delivery_s"] = float(np.median(delivery)) if delivery else None
            row.update(sample_statistics(by_config.get(key, [])))
        out.append(row)
    return out
