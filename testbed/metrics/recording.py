"""The orchestrator's Prometheus metrics: definitions, the sweep-facing recorder, exposition.

Owns every metric name the orchestrator exposes during ``testbed run`` (the
Grafana dashboards in ``grafana/dashboards/`` query exactly these), the
``SweepMetrics`` recorder the sweep calls at each step, the ``/metrics`` HTTP
server (``serve``) and the optional Pushgateway push of each configuration's
summary. It leaves the agents' own ``/metrics`` to ``nodes/agent.py`` (names
agreed in INTERFACES.md), the scrape configuration and the Prometheus process to
``testbed.metrics.monitor``, and what to measure and when to ``testbed.sweep``.

Conventions (see CONVENTIONS.md "Metrics"):

* The registry is always passed in; nothing here touches the global default.
* Base units in names (``_seconds``, ``_bytes``, ``_ratio``), ``_total`` only on
  counters. Link rates are exposed in bytes per second (Prometheus' base unit);
  dashboards multiply by 8 for bit/s.
* Labels are bounded: ``experiment``, ``run`` on every series; then ``split``,
  ``profile``, ``node``, ``part``, ``layer``, ``direction`` where they mean
  something. Never a per-sample label.
* ``split`` and ``layer`` label values are plain decimal integers (``"7"``), the
  same numbers as in the CSV files, so a query reads ``split="7"``.

Example::

    registry = CollectorRegistry()
    m = SweepMetrics(registry, "smoke", "20261123-0940-ab12")
    server = serve(registry, "127.0.0.1", 9400)
    m.configuration_started(3, "ladder-10mbit", total=4, done=0, eta_s=None)
    m.observe_sample(3, "ladder-10mbit", {"e2e_s": 0.031, "head_s": 0.004, ...})
    m.configuration_done(3, "ladder-10mbit")
    server.close()
"""

from __future__ import annotations

import math
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import push_to_gateway

from testbed.errors import TestbedError

# Latency buckets, 0.1 ms .. 100 s, 6 per decade. A sweep spans sub-millisecond
# layer-sized heads on the edge node up to whole images crossing a 1 Mbit/s link
# (several seconds); histogram_quantile interpolates inside a bucket, so the
# bucket ratio (at most 1.5) bounds its error on p50/p90.
_STEPS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(step * 10.0 ** exp, 10) for exp in range(-4, 2) for step in _STEPS) + (100.0,)

BASE_LABELS = ("experiment", "run")
# Job of pushed summaries. Prometheus scrapes the Pushgateway with honor_labels,
# so this job name (not "pushgateway") is what the series carry; it keeps them
# apart from the live series of job "testbed".
PUSH_JOB = "testbed-summary"
DIRECTIONS = ("uplink", "downlink")

# Per-sample timing keys (AgentClient.run / samples.csv) and where each stage ran.
# (key, node, direction): encode/decode happen on the sending/receiving side of a direction.
_CODEC_KEYS = (
    ("encode_s", "local", "uplink"),
    ("remote_decode_s", "remote", "uplink"),
    ("remote_encode_s", "remote", "downlink"),
    ("decode_s", "local", "downlink"),
)


def _label(value: object) -> str:
    """A label value; ints stay plain decimal (split 7 -> "7")."""
    return str(value)


def _num(sample: Mapping[str, Any], key: str) -> float | None:
    """The sample's value for key as a float, or None when absent/empty/NaN."""
    value = sample.get(key)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


class _Definitions:
    """Every orchestrator metric, registered on one registry.

    Kept apart from ``SweepMetrics`` so the list of names reads in one place
    (the dashboards and tests/unit/test_metrics.py follow it).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        b = BASE_LABELS
        cfg = b + ("split", "profile")

        def hist(name: str, doc: str, labels: tuple[str, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS)

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            # prometheus_client appends _total itself; pass the name without it.
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        # --- per-sample timings (histograms) ---
        self.e2e = hist("testbed_e2e_seconds",
                        "End-to-end latency per sample: start of head to final output available locally.", cfg)
        self.inference = hist("testbed_inference_seconds",
                              "Invoke time of a model part on a node, per sample (head on local, tail on remote).",
                              cfg + ("node", "part"))
        self.transfer = hist("testbed_transfer_seconds",
                             "Time on the shaped link per sample: first byte out to last byte in, per direction.",
                             cfg + ("direction",))
        self.codec = hist("testbed_codec_seconds",
                          "Encode (sending node) or decode (receiving node) of the data crossing the link.",
                          cfg + ("node", "direction"))
        # --- intermediate data ---
        self.cut_raw = gauge("testbed_intermediate_raw_bytes",
                             "Bytes of the cut tensors before the codec (last sample of the split).", b + ("split",))
        self.cut_wire = gauge("testbed_intermediate_wire_bytes",
                              "Bytes of the cut tensors on the wire after the codec (last sample of the split).",
                              b + ("split",))
        # --- achieved link: bytes and busy time of transfers whose size is known ---
        self.link_bytes = counter("testbed_link_transferred_bytes_total",
                                  "Payload bytes carried over the shaped link (samples and model delivery).",
                                  cfg + ("direction",))
        self.link_busy = counter("testbed_link_busy_seconds_total",
                                 "Seconds spent carrying testbed_link_transferred_bytes_total (sum of transfer times).",
                                 cfg + ("direction",))
        self.link_transfers = counter("testbed_link_transfers_total",
                                      "Transfers counted in testbed_link_transferred_bytes_total.",
                                      cfg + ("direction",))
        # --- configured link ---
        link = b + ("profile", "direction")
        self.link_rate = gauge("testbed_link_configured_rate_bytes_per_second",
                               "Configured rate of the direction's shaper (bytes/s; x8 for bit/s).", link)
        self.link_delay = gauge("testbed_link_configured_delay_seconds",
                                "Configured one-way delay added by the direction's shaper.", link)
        self.link_jitter = gauge("testbed_link_configured_jitter_seconds",
                                 "Configured delay jitter of the direction's shaper.", link)
        self.link_loss = gauge("testbed_link_configured_loss_ratio",
                               "Configured packet loss of the direction's shaper (0..1).", link)
        self.link_emulation = gauge("testbed_link_emulation_info",
                                    "How the direction is emulated (tbf, htb, netem, htb+netem, none); value 1.",
                                    link + ("emulation",))
        # --- model delivery ---
        self.delivery = gauge("testbed_model_delivery_seconds",
                              "Time to deliver the head part from the remote to the local node over the shaped downlink.",
                              cfg)
        self.delivery_bytes = gauge("testbed_model_delivery_bytes", "Bytes of the delivered head part.", cfg)
        # --- parts: file sizes and benchmark KPIs (fresh process per part per node) ---
        part = b + ("split", "node", "part")
        self.part_file = gauge("testbed_part_file_bytes", "Size of the part's .tflite file.", b + ("split", "part"))
        self.part_init_mem = gauge("testbed_part_init_memory_bytes",
                                   "Memory after loading the part (benchmark_model 'init memory').", part)
        self.part_peak_mem = gauge("testbed_part_peak_memory_bytes",
                                   "Peak memory while running the part (benchmark_model 'peak memory').", part)
        self.part_init = gauge("testbed_part_init_seconds", "Interpreter creation + allocation time of the part.", part)
        self.part_first = gauge("testbed_part_first_inference_seconds", "First inference of the part.", part)
        self.part_warmup = gauge("testbed_part_warmup_mean_seconds", "Mean of the part's warm-up inferences.", part)
        self.part_steady = gauge("testbed_part_steady_mean_seconds", "Steady-state mean inference of the part.", part)
        self.part_steady_std = gauge("testbed_part_steady_stddev_seconds",
                                     "Steady-state standard deviation of the part's inference.", part)
        # --- per layer per node (summary gauges from the profiler) ---
        layer = b + ("node", "layer")
        self.layer_mean = gauge("testbed_layer_latency_mean_seconds", "Mean latency of the layer on the node.", layer)
        self.layer_p50 = gauge("testbed_layer_latency_p50_seconds", "Median latency of the layer on the node.", layer)
        self.layer_p90 = gauge("testbed_layer_latency_p90_seconds", "90th percentile latency of the layer.", layer)
        self.layer_std = gauge("testbed_layer_latency_stddev_seconds", "Standard deviation of the layer's latency.",
                               layer)
        self.layer_out = gauge("testbed_layer_output_bytes", "Bytes of the layer's output tensors.", b + ("layer",))
        self.layer_params = gauge("testbed_layer_params", "Parameter count of the layer.", b + ("layer",))
        self.layer_macs = gauge("testbed_layer_macs", "Multiply-accumulate operations of the layer.", b + ("layer",))
        # --- per configuration summary (exact, from the samples; also what is pushed) ---
        self.cfg_samples = gauge("testbed_configuration_samples", "Samples measured in the configuration.", cfg)
        self.cfg_mean = gauge("testbed_configuration_e2e_mean_seconds", "Mean e2e of the configuration.", cfg)
        self.cfg_p50 = gauge("testbed_configuration_e2e_p50_seconds", "Median e2e of the configuration.", cfg)
        self.cfg_p90 = gauge("testbed_configuration_e2e_p90_seconds", "90th percentile e2e of the configuration.", cfg)
        self.best_split = gauge("testbed_best_split",
                                "Split point with the lowest median e2e among the profile's finished configurations.",
                                b + ("profile",))
        self.best_e2e = gauge("testbed_best_split_e2e_p50_seconds", "Median e2e of testbed_best_split.",
                              b + ("profile",))
        # --- sweep progress ---
        self.planned = gauge("testbed_sweep_configurations_planned", "Configurations in the sweep.", b)
        self.completed = gauge("testbed_sweep_configurations_completed",
                               "Configurations finished (including those skipped by --resume).", b)
        self.current = gauge("testbed_sweep_current_configuration",
                             "The configuration being measured (value 1; exactly one series while running).", cfg)
        self.current_split = gauge("testbed_sweep_current_split", "Split point being measured.", b)
        self.eta = gauge("testbed_sweep_eta_seconds", "Estimated seconds until the sweep finishes.", b)
        self.started = gauge("testbed_sweep_start_time_seconds", "Unix time the sweep started.", b)
        self.running = gauge("testbed_sweep_running", "1 while the sweep runs, 0 once it finished.", b)
        self.phase = counter("testbed_sweep_phase_seconds_total",
                             "Wall time of the sweep by phase (link, tail_load, delivery, head_load, kpi, warmup, "
                             "sampling, write, other); the phases of a configuration add up to its wall time.",
                             b + ("profile", "phase"))
        self.push_failures = counter("testbed_pushgateway_failures_total",
                                     "Configuration summaries the Pushgateway did not accept (after the first).", b)


@dataclass(frozen=True)
class ConfigurationSummary:
    """What ``configuration_done`` computed from the samples it saw."""

    split: int
    profile: str
    samples: int
    e2e_mean_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), values non-empty."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class SweepMetrics:
    """Records a sweep into a registry; the sweep calls one method per event.

    One instance per run (creating a second on the same registry raises
    prometheus_client's "Duplicated timeseries"). Thread-safe: the HTTP server
    reads while the sweep writes; prometheus_client metrics lock themselves and
    the small bookkeeping here has its own lock.

    Args:
        registry: where the metrics live; never the global default.
        experiment: experiment name (label on every series).
        run: run id (label on every series).
        pushgateway: optional Pushgateway URL; each finished configuration's
            summary is pushed there (grouping key run, split, profile).
        clock: time source for the start-time gauge (tests pass a fake).
    """

    def __init__(self, registry: CollectorRegistry, experiment: str, run: str, *,
                 pushgateway: str | None = None, clock=time.time) -> None:
        self.registry, self.experiment, self.run = registry, experiment, run
        self.pushgateway = pushgateway
        self._m = _Definitions(registry)
        self._base = {"experiment": experiment, "run": run}
        self._lock = threading.Lock()
        self._e2e: dict[tuple[str, str], list[float]] = {}  # (split, profile) -> e2e of the current configuration
        self._best: dict[str, tuple[float, int]] = {}  # profile -> (p50, split)
        self._current: tuple[str, str] | None = None
        self._pushed = False
        self.last_push_error: str | None = None
        self._m.started.labels(**self._base).set(clock())
        self._m.running.labels(**self._base).set(1)
        self._m.completed.labels(**self._base).set(0)

    # --- helpers ---
    def _cfg(self, split: int, profile: str) -> dict[str, str]:
        return {**self._base, "split": _label(split), "profile": _label(profile)}

    # --- progress ---
    def configuration_started(self, split: int, profile: str, total: int, done: int,
                              eta_s: float | None = None) -> None:
        """A configuration begins: progress gauges and the current-configuration series.

        Args:
            split: split point k.
            profile: link profile name.
            total: configurations in the whole sweep.
            done: configurations already finished (resumed ones included).
            eta_s: estimated seconds left, or None while unknown.
        """
        m, base = self._m, self._base
        m.planned.labels(**base).set(total)
        m.completed.labels(**base).set(done)
        m.current_split.labels(**base).set(split)
        if eta_s is not None:
            m.eta.labels(**base).set(eta_s)
        key = (_label(split), _label(profile))
        with self._lock:
            if self._current is not None and self._current != key:
                # One series only: drop the previous configuration's (Prometheus marks it stale).
                _remove(m.current, self._base, *self._current)
            self._current = key
            self._e2e[key] = []
        m.current.labels(**self._cfg(split, profile)).set(1)

    def set_progress(self, done: int, total: int | None = None, eta_s: float | None = None) -> None:
        """Update progress between configurations (e.g. after skipping resumed ones)."""
        if total is not None:
            self._m.planned.labels(**self._base).set(total)
        self._m.completed.labels(**self._base).set(done)
        if eta_s is not None:
            self._m.eta.labels(**self._base).set(eta_s)

    # --- samples ---
    def observe_sample(self, split: int, profile: str, sample: Mapping[str, Any]) -> None:
        """Record one measured sample (a samples.csv row / AgentClient.run item).

        Reads the keys head_s, tail_s, encode_s, remote_decode_s, remote_encode_s,
        decode_s, uplink_s, downlink_s, e2e_s, cut_bytes_raw, cut_bytes_wire and
        result_bytes_wire; absent or empty keys are skipped. Inference times <= 0
        mean "no such part here" (k = 0 has no head, k = N no tail) and are not
        observed. Transfers are not observed when nothing crossed the link
        (cut_bytes_wire == 0, the device anchor k = N). Call exactly once per row of
        samples.csv: the e2e histogram's count is the number of samples.
        """
        m, cfg = self._m, self._cfg(split, profile)
        e2e = _num(sample, "e2e_s")
        if e2e is not None:
            m.e2e.labels(**cfg).observe(e2e)
            with self._lock:
                self._e2e.setdefault((cfg["split"], cfg["profile"]), []).append(e2e)
        for key, node, part in (("head_s", "local", "head"), ("tail_s", "remote", "tail")):
            value = _num(sample, key)
            if value is not None and value > 0:
                m.inference.labels(**cfg, node=node, part=part).observe(value)
        for key, node, direction in _CODEC_KEYS:
            value = _num(sample, key)
            if value is not None:
                m.codec.labels(**cfg, node=node, direction=direction).observe(value)
        raw, wire = _num(sample, "cut_bytes_raw"), _num(sample, "cut_bytes_wire")
        if raw is not None:
            m.cut_raw.labels(**self._base, split=cfg["split"]).set(raw)
        if wire is not None:
            m.cut_wire.labels(**self._base, split=cfg["split"]).set(wire)
        if wire == 0:
            return  # device anchor: nothing crossed the link in either direction
        sizes = {"uplink": wire, "downlink": _num(sample, "result_bytes_wire")}
        for direction in DIRECTIONS:
            seconds = _num(sample, f"{direction}_s")
            if seconds is None:
                continue
            m.transfer.labels(**cfg, direction=direction).observe(seconds)
            self._count_transfer(cfg, direction, sizes[direction], seconds)

    def _count_transfer(self, cfg: dict[str, str], direction: str, size: float | None, seconds: float) -> None:
        # Only transfers of known size enter the achieved-rate counters, so
        # bytes / busy seconds stays a true ratio.
        if size is None or size <= 0 or seconds <= 0:
            return
        m = self._m
        m.link_bytes.labels(**cfg, direction=direction).inc(size)
        m.link_busy.labels(**cfg, direction=direction).inc(seconds)
        m.link_transfers.labels(**cfg, direction=direction).inc()

    def observe_delivery(self, split: int, profile: str, seconds: float, size_bytes: int | None = None) -> None:
        """The head part's delivery over the shaped downlink took ``seconds``.

        With ``size_bytes`` it also counts towards the achieved downlink rate.
        """
        cfg = self._cfg(split, profile)
        self._m.delivery.labels(**cfg).set(seconds)
        if size_bytes is not None:
            self._m.delivery_bytes.labels(**cfg).set(size_bytes)
            self._count_transfer(cfg, "downlink", float(size_bytes), float(seconds))

    # --- link ---
    def set_link(self, direction: str, profile: str, rate_bps: float | None, delay_s: float | None = None,
                 loss_pct: float | None = None, *, jitter_s: float | None = None,
                 emulation: str | None = None) -> None:
        """The shaper of ``direction`` now applies ``profile`` with these parameters.

        Args:
            direction: "uplink" or "downlink".
            rate_bps: configured rate in bit/s (exposed as bytes/s), None when unlimited.
            delay_s, jitter_s: configured one-way delay and jitter in seconds (None = 0).
            loss_pct: configured loss in percent (exposed as a 0..1 ratio).
            emulation: what the shaper used ("tbf", "htb+netem", ...).
        """
        if direction not in DIRECTIONS:
            raise TestbedError(f"metrics: direction must be uplink or downlink, got {direction!r}")
        labels = {**self._base, "profile": _label(profile), "direction": direction}
        m = self._m
        if rate_bps is None:
            _remove(m.link_rate, self._base, _label(profile), direction)
        else:
            m.link_rate.labels(**labels).set(rate_bps / 8.0)
        m.link_delay.labels(**labels).set(delay_s or 0.0)
        m.link_jitter.labels(**labels).set(jitter_s or 0.0)
        m.link_loss.labels(**labels).set((loss_pct or 0.0) / 100.0)
        if emulation is not None:
            m.link_emulation.labels(**labels, emulation=emulation).set(1)

    # --- parts and layers ---
    def set_part(self, node: str, part: str, split: int, kpis: Mapping[str, Any] | None,
                 file_bytes: int | None = None) -> None:
        """A part's file size and its benchmark KPIs on ``node``.

        ``kpis`` uses the keys of nodes.benchmark.measure_in_fresh_process (init_s,
        first_s, warmup_mean_s, steady_mean_s, steady_std_s, init_memory_bytes,
        peak_memory_bytes); missing keys are skipped.
        """
        m = self._m
        if file_bytes is not None:
            m.part_file.labels(**self._base, split=_label(split), part=part).set(file_bytes)
        labels = {**self._base, "split": _label(split), "node": node, "part": part}
        for key, metric in (("init_memory_bytes", m.part_init_mem), ("peak_memory_bytes", m.part_peak_mem),
                            ("init_s", m.part_init), ("first_s", m.part_first),
                            ("warmup_mean_s", m.part_warmup), ("steady_mean_s", m.part_steady),
                            ("steady_std_s", m.part_steady_std)):
            value = _num(kpis or {}, key)
            if value is not None:
                metric.labels(**labels).set(value)

    def set_layers(self, node: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Per-layer profile of ``node``: layers.csv rows (layer, mean_s, p50_s, p90_s, std_s,
        output_bytes, params, macs); missing keys are skipped."""
        m = self._m
        for row in rows:
            layer = _label(int(row["layer"]))
            per_node = {**self._base, "node": node, "layer": layer}
            for key, metric in (("mean_s", m.layer_mean), ("p50_s", m.layer_p50),
                                ("p90_s", m.layer_p90), ("std_s", m.layer_std)):
                value = _num(row, key)
                if value is not None:
                    metric.labels(**per_node).set(value)
            for key, metric in (("output_bytes", m.layer_out), ("params", m.layer_params), ("macs", m.layer_macs)):
                value = _num(row, key)
                if value is not None:
                    metric.labels(**self._base, layer=layer).set(value)

    # --- end of a configuration / the run ---
    def add_phases(self, profile: str, phases: Mapping[str, float]) -> None:
        """Count one configuration's wall time by phase (seconds)."""
        for phase, seconds in phases.items():
            if seconds > 0:
                self._m.phase.labels(**self._base, profile=str(profile), phase=phase).inc(seconds)

    def configuration_done(self, split: int, profile: str, *, done: int | None = None,
                           eta_s: float | None = None) -> ConfigurationSummary:
        """Close a configuration: exact summary gauges, best split so far, optional push.

        The summary is computed from the e2e values ``observe_sample`` saw since
        ``configuration_started`` for this split and profile.

        Raises:
            TestbedError: the first Pushgateway push failed (wrong URL?). Later
                failures only count in testbed_pushgateway_failures_total and
                ``last_push_error``.
        """
        cfg = self._cfg(split, profile)
        key = (cfg["split"], cfg["profile"])
        with self._lock:
            values = self._e2e.pop(key, [])
        summary = ConfigurationSummary(
            split=int(split), profile=str(profile), samples=len(values),
            e2e_mean_s=statistics.fmean(values) if values else None,
            e2e_p50_s=_quantile(values, 0.5) if values else None,
            e2e_p90_s=_quantile(values, 0.9) if values else None)
        m = self._m
        m.cfg_samples.labels(**cfg).set(summary.samples)
        if values:
            m.cfg_mean.labels(**cfg).set(summary.e2e_mean_s)
            m.cfg_p50.labels(**cfg).set(summary.e2e_p50_s)
            m.cfg_p90.labels(**cfg).set(summary.e2e_p90_s)
            with self._lock:
                best = self._best.get(key[1])
                if best is None or summary.e2e_p50_s < best[0]:
                    self._best[key[1]] = best = (summary.e2e_p50_s, int(split))
            m.best_split.labels(**self._base, profile=key[1]).set(best[1])
            m.best_e2e.labels(**self._base, profile=key[1]).set(best[0])
        if done is not None:
            m.completed.labels(**self._base).set(done)
        if eta_s is not None:
            m.eta.labels(**self._base).set(eta_s)
        if self.pushgateway:
            self._push(summary)
        return summary

    def _push(self, summary: ConfigurationSummary) -> None:
        # The first push must work (a wrong URL is a configuration error, said at
        # once); a later failure is counted and remembered, not fatal: a gateway
        # hiccup must not end a long sweep whose results are on disk anyway.
        try:
            push_summary(self.pushgateway, self.experiment, self.run, summary)
            self._pushed = True
        except TestbedError as e:
            if not self._pushed:
                raise
            self.last_push_error = str(e)
            self._m.push_failures.labels(**self._base).inc()

    def finished(self) -> None:
        """The sweep ended (normally or not): ETA 0, running 0.

        The last configuration's ``testbed_sweep_current_configuration`` series
        stays, so the overview still says where the run stopped.
        """
        self._m.eta.labels(**self._base).set(0)
        self._m.running.labels(**self._base).set(0)


def _remove(metric: Gauge, base: Mapping[str, str], *rest: str) -> None:
    """Drop one child series, tolerating "never created"."""
    try:
        metric.remove(base["experiment"], base["run"], *rest)
    except KeyError:
        pass


def push_summary(gateway: str, experiment: str, run: str, summary: ConfigurationSummary,
                 *, timeout: float = 10.0) -> None:
    """Push one configuration's summary to a Pushgateway.

    Uses its own small registry (never the run's, never the global default) and
    the grouping key run/split/profile, so each configuration is its own group
    and later pushes do not replace earlier ones.

    Raises:
        TestbedError: the gateway did not accept the push.
    """
    registry = CollectorRegistry()
    labels = ("experiment",)
    values = {
        "testbed_configuration_samples": ("Samples measured in the configuration.", summary.samples),
        "testbed_configuration_e2e_mean_seconds": ("Mean e2e of the configuration.", summary.e2e_mean_s),
        "testbed_configuration_e2e_p50_seconds": ("Median e2e of the configuration.", summary.e2e_p50_s),
        "testbed_configuration_e2e_p90_seconds": ("90th percentile e2e of the configuration.", summary.e2e_p90_s),
    }
    for name, (doc, value) in values.items():
        if value is not None:
            Gauge(name, doc, labels, registry=registry).labels(experiment=experiment).set(value)
    try:
        push_to_gateway(gateway, job=PUSH_JOB, registry=registry, timeout=timeout,
                        grouping_key={"run": run, "split": str(summary.split), "profile": summary.profile})
    except OSError as e:  # URLError is an OSError
        raise TestbedError(f"pushgateway {gateway}: push failed: {e}") from e


class _ScrapeLog:
    """When scrapes of /metrics started and finished (for ``wait_for_scrape``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.starts: list[float] = []          # monotonic start times of completed scrapes (last few)
        self.last_completed_start = -math.inf

    def wrap(self, app):
        def tracked(environ, start_response):
            started = time.monotonic()
            body = app(environ, start_response)
            if environ.get("PATH_INFO", "/") in ("/", "/metrics"):
                with self._cond:
                    self.starts = (self.starts + [started])[-8:]
                    self.last_completed_start = max(self.last_completed_start, started)
                    self._cond.notify_all()
            return body
        return tracked

    def wait_after(self, t0: float, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.last_completed_start > t0, timeout)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Scrapes every second would flood the sweep's console."""


class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it and frees the port."""

    def __init__(self, httpd, thread: threading.Thread, scrapes: _ScrapeLog) -> None:
        self._httpd, self._thread, self._scrapes = httpd, thread, scrapes
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def scrapes(self) -> int:
        """Scrapes seen recently (at most 8 remembered); 0 = nobody scrapes this endpoint."""
        return len(self._scrapes.starts)

    def wait_for_scrape(self, timeout: float | None = None) -> bool:
        """Block until a scrape that started after this call has been answered.

        Call it once the last values are recorded and before the scraper is told
        to stop (targets removed) or the server closes: otherwise the final state
        of a run (its last configuration) never reaches Prometheus. Returns at
        once (False) when nothing has scraped this endpoint. The default timeout
        is twice the observed scrape interval (at least 2 s, at most 30 s).
        """
        starts = self._scrapes.starts
        if not starts:
            return False
        if timeout is None:
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            interval = statistics.median(gaps) if gaps else 5.0
            timeout = min(30.0, max(2.0, 2 * interval + 0.5))
        return self._scrapes.wait_after(time.monotonic(), timeout)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9400) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (read it back from ``.port``). The server notes
    when it is scraped, so a sweep can wait for a final scrape before it ends
    (``MetricsServer.wait_for_scrape``).

    Raises:
        TestbedError: the address cannot be bound (in use, not local).
    """
    scrapes = _ScrapeLog()
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class _Server(ThreadingMixIn, WSGIServer):
            address_family = family
            daemon_threads = True

        httpd = make_server(host, port, scrapes.wrap(make_wsgi_app(registry)), _Server, handler_class=_QuietHandler)
    except OSError as e:
        raise TestbedError(f"metrics: cannot listen on {host}:{port}: {e.strerror or e}") from e
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics {host}:{port}", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread, scrapes)


def parse_listen(text: str, default_port: int = 9400) -> tuple[str, int]:
    """``"127.0.0.1:9400"`` / ``":9400"`` / ``"[::1]:9400"`` -> (host, port).

    Raises:
        ValueError: not host:port with a port in 0..65535.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(default_port)
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:9400', got {text!r}")
    return host, int(port)
