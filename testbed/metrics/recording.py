"""The recorder the sweep calls at each step: per-sample histograms, per-configuration
summaries, the best split so far, progress and ETA, phase time.

Owns turning sweep events into metric values (``definitions`` holds the
names). Serving ``/metrics`` and pushing to a Pushgateway are ``exposition``'s;
the agents' own metrics are ``nodes/agent_metrics.py``'s; the Prometheus process
``testbed.metrics.monitor``'s.

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
import statistics
import threading
import time
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge

from nodes.stats import quantile as _quantile
from testbed.errors import TestbedError
from testbed.metrics.definitions import _CODEC_KEYS, DIRECTIONS, ConfigurationSummary, Definitions
from testbed.metrics.exposition import push_summary


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
        self._m = Definitions(registry)
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
        nodes = ("local", "remote") if sample.get("topology") in (None, 1) else ("remote", "local")
        for key, node, part in (("head_s", nodes[0], "head"), ("tail_s", nodes[1], "tail")):
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

    def configuration_failed(self, split: int, profile: str, node: str) -> None:
        """Count a configuration that failed; forget its samples (it is retried on --resume)."""
        with self._lock:
            self._e2e.pop((_label(split), _label(profile)), None)
        self._m.failed.labels(**self._base, profile=_label(profile), node=node).inc()

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


