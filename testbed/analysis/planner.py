"""Where to split: predict end-to-end latency per split point and pick the best.

Neurosurgeon's idea without its regression, because we have measured layers:
for split point ``k`` of an ``N``-layer model,

    e2e(k) = Σ local latency of layers [0, k)                      (head, local node)
           + cut_bytes(k)·8 / uplink rate   + uplink delay          (k < N)
           + Σ remote latency of layers [k, N)                     (tail, remote node)
           + result_bytes·8 / downlink rate + downlink delay        (k < N)

``k = N`` sends nothing; ``k = 0`` sends the model input. An unshaped direction
(no rate) costs only its delay. The other topologies (``topology`` 2: the input
goes up, the head runs remote, the cut comes down, the tail runs locally; 3: the
source is remote, so only the cut comes down) price the same terms in their order.
A stream sustains ``max_fps`` = 1 / the busiest stage (a part's compute, or a
direction's serialisation: delay adds latency, not occupancy); ``best(..., min_fps=)``
chooses among the split points that sustain a frame rate. Loss, jitter and TCP's slow start are not
modelled: the prediction is the link's ideal, the measurement says how far off
that is (the report plots the error).

Owns the model (:func:`predict`, :func:`best`), building its inputs from result
files (:func:`model_from_run`, :func:`model_from_files`), turning a profile
(a run's summary row, a ``netem_profiles`` name or file, or ad-hoc rates) into a
:class:`Link`, and judging the choice against a run's measurements
(:func:`evaluate`). Reads result files only (via ``testbed.analysis.results``); never
measures. Plots are ``testbed.analysis.report``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from testbed.analysis.results import LAYERS, MANIFEST, RunFolder, read_csv
from testbed.errors import ConfigError, TestbedError


@dataclass(frozen=True)
class Link:
    """One link as the planner sees it. ``None`` rate = unshaped (no serialisation cost)."""

    name: str
    uplink_rate_bps: float | None = None
    uplink_delay_s: float = 0.0
    downlink_rate_bps: float | None = None
    downlink_delay_s: float = 0.0

    def uplink_s(self, nbytes: float) -> float:
        return _transfer_s(nbytes, self.uplink_rate_bps, self.uplink_delay_s)

    def downlink_s(self, nbytes: float) -> float:
        return _transfer_s(nbytes, self.downlink_rate_bps, self.downlink_delay_s)


def _transfer_s(nbytes: float, rate_bps: float | None, delay_s: float) -> float:
    serialise = 0.0 if not rate_bps else nbytes * 8.0 / rate_bps
    return serialise + (delay_s or 0.0)


@dataclass(frozen=True)
class ModelProfile:
    """What the planner knows about the model on the two nodes.

    Attributes:
        local_s: per-layer latency on the local node (seconds), layer order.
        remote_s: per-layer latency on the remote node, same length.
        cut_bytes: bytes that cross the uplink at split ``k`` (k < N), on the wire when known.
        result_bytes: bytes that come back down (the model outputs) for every k < N.
        source: how the numbers were obtained (shown in the report).
    """

    local_s: tuple[float, ...]
    remote_s: tuple[float, ...]
    cut_bytes: dict[int, int]
    result_bytes: int
    source: str = ""
    calibration: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.local_s) != len(self.remote_s):
            raise TestbedError(f"per-layer profiles differ in length: local {len(self.local_s)}, "
                               f"remote {len(self.remote_s)} layers")

    @property
    def num_layers(self) -> int:
        return len(self.local_s)

    def splits(self) -> list[int]:
        """Split points the planner can price: every k whose cut size is known, plus N."""
        n = self.num_layers
        return sorted({k for k in self.cut_bytes if 0 <= k < n} | {n})


@dataclass(frozen=True)
class Prediction:
    profile: str
    split: int
    head_s: float
    uplink_s: float
    tail_s: float
    downlink_s: float
    topology: int = 1
    busy_s: tuple[float, ...] = ()  # each stage's occupancy per frame (streams)

    @property
    def e2e_s(self) -> float:
        return self.head_s + self.uplink_s + self.tail_s + self.downlink_s

    @property
    def max_fps(self) -> float | None:
        """Frames per second a pipelined stream sustains (None: nothing takes time)."""
        slowest = max(self.busy_s or (self.head_s, self.uplink_s, self.tail_s, self.downlink_s))
        return 1.0 / slowest if slowest > 0 else None

    def row(self) -> dict[str, Any]:
        return {"profile": self.profile, "topology": self.topology, "split": self.split, "head_s": self.head_s,
                "uplink_s": self.uplink_s, "tail_s": self.tail_s, "downlink_s": self.downlink_s,
                "e2e_s": self.e2e_s, "max_fps": self.max_fps}


def _serialise_s(nbytes: float, rate_bps: float | None) -> float:
    return nbytes * 8.0 / rate_bps if rate_bps else 0.0


def predict(model: ModelProfile, link: Link, splits: Iterable[int] | None = None,
            topology: int = 1) -> list[Prediction]:
    """Predicted times for every split point (default: all the model can price)."""
    n = model.num_layers
    out = []
    for k in sorted(set(model.splits() if splits is None else splits)):
        if not 0 <= k <= n:
            raise TestbedError(f"split point {k} is outside 0-{n}")
        if k not in model.cut_bytes and k != n:
            raise TestbedError(f"no cut size known for split point {k}")
        out.append(_price(model, link, k, topology))
    return out


def _price(model: ModelProfile, link: Link, k: int, topology: int) -> Prediction:
    n, cut = model.num_layers, model.cut_bytes
    if topology == 1:
        head, tail = math.fsum(model.local_s[:k]), math.fsum(model.remote_s[k:])
        up_bytes, down_bytes = (0, 0) if k == n else (cut[k], model.result_bytes)
    else:  # the head in the network, the tail on the UE
        head, tail = math.fsum(model.remote_s[:k]), math.fsum(model.local_s[k:])
        crosses = topology == 3 or k > 0
        up_bytes = cut.get(0, 0) if topology == 2 and k > 0 else 0
        down_bytes = (cut[k] if k < n else model.result_bytes) if crosses else 0
    up = link.uplink_s(up_bytes) if up_bytes else 0.0
    down = link.downlink_s(down_bytes) if down_bytes else 0.0
    busy = (head, _serialise_s(up_bytes, link.uplink_rate_bps), tail,
            _serialise_s(down_bytes, link.downlink_rate_bps))
    return Prediction(link.name, k, head, up, tail, down, topology, busy)


def best(predictions: Sequence[Prediction], min_fps: float | None = None) -> Prediction:
    """Lowest predicted e2e; a tie goes to the larger k (less leaves the device).

    ``min_fps``: only split points whose stream sustains that frame rate qualify."""
    if not predictions:
        raise TestbedError("nothing to choose from: no split point could be priced")
    if min_fps is not None:
        ok = [p for p in predictions if p.max_fps is None or p.max_fps >= min_fps]
        if not ok:
            top = max(predictions, key=lambda p: p.max_fps or math.inf)
            raise TestbedError(f"no split point sustains {min_fps:g} frames/s on {predictions[0].profile}; "
                               f"the fastest, k = {top.split}, sustains {top.max_fps:.1f}")
        predictions = ok
    return min(predictions, key=lambda p: (p.e2e_s, -p.split))


def compare_topologies(model: ModelProfile, link: Link, topologies: Iterable[int] = (1, 2, 3),
                       min_fps: float | None = None) -> list[Prediction]:
    """The best split of each topology on one link (a topology none of whose
    split points sustains ``min_fps`` is left out)."""
    out = []
    for t in topologies:
        try:
            out.append(best(predict(model, link, topology=t), min_fps))
        except TestbedError:
            continue
    return out


# --- building the model profile from result files -----------------------------


def _per_node(layers: list[dict[str, Any]], node: str, stat: str) -> list[float]:
    rows = sorted((r for r in layers if r.get("node") == node), key=lambda r: r["layer"])
    if not rows:
        raise TestbedError(f"layers.csv has no rows for node {node!r} (the planner needs both nodes)")
    idx = [r["layer"] for r in rows]
    if idx != list(range(len(rows))):
        raise TestbedError(f"layers.csv: node {node!r} layers are not 0..{len(rows) - 1} (got {idx[:5]}...)")
    vals = []
    for r in rows:
        v = r.get(stat)
        if v is None:
            raise TestbedError(f"layers.csv: node {node!r} layer {r['layer']} has no {stat}")
        vals.append(float(v))
    return vals


def _cut_from_manifest(manifest: dict[str, Any]) -> tuple[dict[int, int], int | None, int | None]:
    """Cut bytes per k, the model-output bytes, and the layer count, from the splitter's manifest.

    At k = N the cut tensors are exactly the model outputs (every model output is
    produced before N), which is what the remote node sends back for every k < N."""
    cut: dict[int, int] = {}
    for s in manifest.get("splits", []):
        cut[int(s["k"])] = int(sum(t["bytes"] for t in s.get("cut", [])))
    n = (manifest.get("model") or {}).get("layers")
    result = cut.get(int(n)) if n is not None else None
    return cut, result, (int(n) if n is not None else None)


def model_from_files(layers_csv: str | Path, manifest_json: str | Path | None = None,
                     summary_rows: list[dict[str, Any]] | None = None,
                     parts_rows: list[dict[str, Any]] | None = None,
                     stat: str = "mean_s", calibrate: bool = False) -> ModelProfile:
    """A :class:`ModelProfile` from ``layers.csv`` and the splitter's ``manifest.json``.

    Cut sizes come from the manifest (raw bytes); when a run's summary rows are
    given, measured wire bytes replace them (they include framing and the input
    encoding at k = 0). When ``calibrate`` and a whole-model KPI of a node is in
    ``parts_rows`` (k = N head on local, k = 0 tail on remote), that node's layer
    latencies are scaled so they add up to it: single-layer models lose the
    fusion and cache effects of the whole graph. The scale is recorded in
    ``calibration``.

    Raises:
        TestbedError: missing nodes, layers or cut sizes (one line saying which).
    """
    import json

    layers_csv = Path(layers_csv)
    if not layers_csv.is_file():
        raise TestbedError(f"{layers_csv}: no such layers file")
    layers = read_csv(layers_csv)
    local, remote = _per_node(layers, "local", stat), _per_node(layers, "remote", stat)
    manifest_path = Path(manifest_json) if manifest_json else layers_csv.with_name(MANIFEST)
    if not manifest_path.is_file():
        raise TestbedError(f"{manifest_path}: no manifest; the planner needs the cut sizes "
                           "(put manifest.json beside layers.csv or pass --manifest)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        cut, result, n = _cut_from_manifest(manifest)
    except (ValueError, KeyError, TypeError) as e:
        raise TestbedError(f"{manifest_path}: not a splitter manifest ({e})") from e
    if n is not None and n != len(local):
        raise TestbedError(f"{manifest_path}: model has {n} layers but layers.csv has {len(local)}")
    source = ["per-layer " + stat.removesuffix("_s"), "cut bytes from manifest"]
    for row in summary_rows or []:
        wire = row.get("cut_bytes_wire")
        if wire is not None and row.get("split") is not None and row["split"] < len(local):
            cut[int(row["split"])] = int(wire)
        if row.get("result_bytes_wire"):
            result = int(row["result_bytes_wire"]) if result is None else max(result, int(row["result_bytes_wire"]))
    if summary_rows:
        source.append("wire bytes from summary")
    if result is None:
        raise TestbedError(f"{manifest_path}: no split k=N in the manifest and no measured result bytes; "
                           "cannot size the downlink")
    model = ModelProfile(tuple(local), tuple(remote), cut, int(result), "; ".join(source))
    return _calibrated(model, parts_rows) if calibrate and parts_rows else model


def _whole_model_s(parts_rows: list[dict[str, Any]], node: str, part: str, k: int) -> float | None:
    vals = [r["steady_mean_s"] for r in parts_rows
            if r.get("node") == node and r.get("steady_mean_s") and
            (r.get("part") == "full" or (r.get("part") == part and r.get("split") == k))]
    return sum(vals) / len(vals) if vals else None


def _calibrated(model: ModelProfile, parts_rows: list[dict[str, Any]]) -> ModelProfile:
    n = model.num_layers
    scale: dict[str, float] = {}
    local, remote = list(model.local_s), list(model.remote_s)
    for node, part, k, values in (("local", "head", n, local), ("remote", "tail", 0, remote)):
        whole = _whole_model_s(parts_rows, node, part, k)
        total = math.fsum(values)
        if whole and total > 0:
            scale[node] = whole / total
            values[:] = [v * scale[node] for v in values]
    if not scale:
        return model
    note = ", ".join(f"{k} ×{v:.3f}" for k, v in scale.items())
    return replace(model, local_s=tuple(local), remote_s=tuple(remote),
                   source=f"{model.source}; calibrated to whole-model KPI ({note})", calibration=scale)


def model_from_run(run_dir: str | Path, stat: str = "mean_s", calibrate: bool = False) -> ModelProfile:
    """The planner's inputs from a run folder (layers.csv, manifest.json, summary and parts).

    Calibration is off by default: on the PoseNet sweep the whole-model KPI is one
    measurement in a fresh process and, on a busy host, moved the prediction
    further from the measured e2e than the plain per-layer sums did."""
    folder = RunFolder(run_dir)
    if not (folder.path / LAYERS).is_file():
        raise TestbedError(f"{folder.path}: no {LAYERS}; was this run profiled per layer?")
    return model_from_files(folder.path / LAYERS, folder.path / MANIFEST, folder.summary(), folder.parts(),
                            stat=stat, calibrate=calibrate)


# --- links ---------------------------------------------------------------------


def links_from_summary(summary_rows: list[dict[str, Any]]) -> list[Link]:
    """The run's profiles as links, in the order they were swept."""
    seen: dict[str, Link] = {}
    for r in summary_rows:
        if r["profile"] in seen:
            continue
        seen[r["profile"]] = Link(r["profile"], r.get("uplink_rate_bps"), r.get("uplink_delay_s") or 0.0,
                                  r.get("downlink_rate_bps"), r.get("downlink_delay_s") or 0.0)
    return list(seen.values())


def link_from_profile(name_or_path: str) -> Link:
    """A ``netem_profiles`` name or a profile file as a :class:`Link` (rates and delays only)."""
    from testbed.link.profile import load_profile  # the link layer owns the profile schema

    p = load_profile(name_or_path)
    up, down = getattr(p, "uplink", None), getattr(p, "downlink", None)
    return Link(getattr(p, "name", None) or str(name_or_path),
                getattr(up, "rate_bps", None) if up else None, (getattr(up, "delay_s", 0.0) or 0.0) if up else 0.0,
                getattr(down, "rate_bps", None) if down else None,
                (getattr(down, "delay_s", 0.0) or 0.0) if down else 0.0)


def link_from_args(uplink: str | None, downlink: str | None, delay: str | None = None,
                   uplink_delay: str | None = None, downlink_delay: str | None = None,
                   name: str | None = None) -> Link:
    """Ad-hoc link from human units (``5mbit``, ``10ms``). ``delay`` is one-way, both directions."""
    from testbed.units import parse_duration, parse_rate

    def _parse(fn, text, flag):
        if text is None:
            return None
        try:
            return fn(text)
        except ValueError as e:
            raise ConfigError(str(e), field=flag) from None

    up_r, down_r = _parse(parse_rate, uplink, "--uplink"), _parse(parse_rate, downlink, "--downlink")
    d = _parse(parse_duration, delay, "--delay") or 0.0
    up_d = _parse(parse_duration, uplink_delay, "--uplink-delay")
    down_d = _parse(parse_duration, downlink_delay, "--downlink-delay")
    if up_r is None and down_r is None and not (d or up_d or down_d):
        raise ConfigError("give at least --uplink or --downlink (e.g. --uplink 5mbit --downlink 20mbit)",
                          field="--uplink")
    label = name or "adhoc up " + (uplink or "∞") + " down " + (downlink or "∞") + (f" delay {delay}" if delay else "")
    return Link(label, up_r, up_d if up_d is not None else d, down_r, down_d if down_d is not None else d)


# --- judging against measurements -------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Predicted vs measured for every configuration of a run, and the choice per profile."""

    model: ModelProfile
    configurations: list[dict[str, Any]]  # profile, split, predicted_e2e_s, measured_e2e_mean_s, ..., error
    choices: list[dict[str, Any]]         # profile, chosen_split, best_split, ratio (mean and p50)

    def worst_ratio(self) -> float | None:
        vals = [c["ratio_mean"] for c in self.choices if c.get("ratio_mean") is not None]
        return max(vals) if vals else None


def evaluate(run_dir: str | Path, model: ModelProfile | None = None) -> Evaluation:
    """Predict every measured configuration of a run and judge the planner's choice.

    The choice per profile is made among the split points that were measured
    (so it can be judged); its quality is measured e2e of the choice ÷ the best
    measured e2e (mean, and p50 beside it). 1.0 means the planner found the best.
    """
    folder = RunFolder(run_dir)
    summary = folder.summary()
    model = model or model_from_run(run_dir)
    configs, choices = [], []
    for link in links_from_summary(summary):
        rows = {r["split"]: r for r in summary if r["profile"] == link.name}
        topology = int(next(iter(rows.values())).get("topology") or 1)
        preds = {p.split: p for p in predict(model, link, [k for k in rows if k in model.splits()], topology)}
        for k, p in sorted(preds.items()):
            m = rows[k]
            mean, p50 = m.get("e2e_mean_s"), m.get("e2e_p50_s")
            configs.append({
                "profile": link.name, "split": k, "predicted_e2e_s": p.e2e_s,
                "predicted_head_s": p.head_s, "predicted_uplink_s": p.uplink_s,
                "predicted_tail_s": p.tail_s, "predicted_downlink_s": p.downlink_s,
                "measured_e2e_mean_s": mean, "measured_e2e_p50_s": p50,
                "error_s": (p.e2e_s - mean) if mean is not None else None,
                "error_pct": (100.0 * (p.e2e_s - mean) / mean) if mean else None,
            })
        if not preds:
            continue
        chosen = best(list(preds.values()))
        row = {"profile": link.name, "chosen_split": chosen.split, "predicted_e2e_s": chosen.e2e_s}
        for stat in ("mean", "p50"):
            measured = {k: rows[k].get(f"e2e_{stat}_s") for k in preds if rows[k].get(f"e2e_{stat}_s") is not None}
            if not measured:
                row[f"best_split_{stat}"] = row[f"ratio_{stat}"] = None
                continue
            kbest = min(measured, key=lambda k: (measured[k], -k))
            row[f"best_split_{stat}"] = kbest
            row[f"best_e2e_{stat}_s"] = measured[kbest]
            row[f"chosen_e2e_{stat}_s"] = measured.get(chosen.split)
            row[f"ratio_{stat}"] = (measured[chosen.split] / measured[kbest]
                                    if chosen.split in measured and measured[kbest] > 0 else None)
        # A harder test when the device anchor wins everywhere: the choice among the
        # offloading points only (k < N), judged the same way.
        off = [p for k, p in preds.items() if k < model.num_layers and rows[k].get("e2e_mean_s") is not None]
        if off:
            c_off = best(off)
            m_off = {p.split: rows[p.split]["e2e_mean_s"] for p in off}
            k_off = min(m_off, key=lambda k: (m_off[k], -k))
            row.update(offload_chosen_split=c_off.split, offload_best_split=k_off,
                       offload_ratio_mean=m_off[c_off.split] / m_off[k_off] if m_off[k_off] > 0 else None)
        choices.append(row)
    return Evaluation(model, configs, choices)
