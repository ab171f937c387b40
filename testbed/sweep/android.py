"""A phone as the local node: its head latency composed into the sweep's end-to-end time.

The phone runs no agent, so a configuration is measured twice over: the proxy local
node on this host (the normal local node, same head part, same input) runs the head and
sends the real cut tensors over the shaped link to the remote, which runs the tail and
answers over the shaped downlink; the phone runs the same head part under TFLite's
``benchmark_model``. Each sample's e2e is then **composed**: the phone's head latency
(drawn from the distribution its benchmark printed, ``BenchmarkOutput.latency_quantiles``)
replaces the proxy's head time, and everything after the head (encode, uplink, remote
decode + tail + encode, downlink, decode, receive lags) is the proxy's measurement.
Rows say ``clock: composed`` and ``head_source: phone``. What composition cannot show:
the phone's radio and network stack, and the phone's own encode/decode.

Owns: measuring each head part on the phone once (KPIs, distribution, per-layer times;
pushed, measured, removed), the device state before and after every configuration
(throttled / hotter flags), the phone's per-layer rows for layers.csv (the whole model
with op profiling), and the phone's Prometheus series. Running the phone is
``testbed.android``'s; the sweep's order and files are ``run``'s and ``configuration``'s.
"""

from __future__ import annotations

import shlex
import zlib
from typing import TYPE_CHECKING, Any

from testbed.android.output import draw_latencies
from testbed.android.session import Held, PartMeasurement, measure_part, state_flags

if TYPE_CHECKING:
    from testbed.android.device import DeviceState
    from testbed.experiment import NodeConfig, Runs
    from testbed.metrics.phone import PhoneMetrics
    from testbed.model.graph import ModelGraph


class PhoneHead:
    """The phone of one run, measuring head parts and composing samples."""

    def __init__(self, held: Held, cfg: NodeConfig, runs: Runs, graph: ModelGraph,
                 metrics: PhoneMetrics | None = None) -> None:
        self.held, self.cfg, self.runs, self.graph, self.metrics = held, cfg, runs, graph, metrics
        self.measured: dict[int, PartMeasurement] = {}
        self.delegate = cfg.delegate or "cpu"

    @property
    def serial(self) -> str:
        return self.held.phone.serial

    def state(self) -> DeviceState:
        st = self.held.phone.state()
        if self.metrics is not None:
            self.metrics.set_state(st)
        return st

    def _measure(self, name: str, data: bytes, layers: int) -> PartMeasurement:
        phone = self.held.phone
        remote = phone.push(data, name)
        try:
            return measure_part(self.held, remote, threads=self.cfg.threads, delegate=self.delegate,
                                runs=max(self.runs.kpi_runs, self.runs.samples), warmup=max(1, self.runs.warmup),
                                layer_outputs=[layer.outputs for layer in self.graph.layers[:layers]])
        finally:
            phone.sh(f"rm -f {shlex.quote(remote)}", timeout_s=60)

    def head(self, k: int, data: bytes) -> tuple[PartMeasurement, bool]:
        """The phone's measurement of head part ``k`` (taken now the first time; True when now)."""
        if k in self.measured:
            return self.measured[k], False
        m = self._measure(f"head_{k:02d}.tflite", data, k)
        self.measured[k] = m
        if self.metrics is not None:
            self.metrics.set_head(k, m.output.kpis()["steady_mean_s"])
        return m, True

    def kpis(self, k: int) -> dict[str, Any]:
        return self.measured[k].output.kpis()

    def compose(self, samples: list[dict[str, Any]], k: int, key: tuple[int, str, int]) -> None:
        """Replace each sample's head time by the phone's (drawn from its distribution, seeded by
        the configuration) and recompose e2e; mark the rows."""
        m = self.measured.get(k)
        draws = draw_latencies(m.output.latency_quantiles(), len(samples),
                               seed=zlib.crc32(repr(key).encode())) if m is not None else []
        for i, s in enumerate(samples):
            s["clock"] = "composed"
            proxy = float(s.get("head_s") or 0.0)
            s["proxy_head_s"] = proxy if m is not None else None
            if m is None:                  # k = 0: no head; the input leaves the proxy as it would the phone
                s["head_source"] = "none"
                continue
            s["head_source"] = "phone"
            s["head_s"] = draws[i]
            if s.get("e2e_s") is not None:
                s["e2e_s"] = float(s["e2e_s"]) - proxy + draws[i]

    def summary(self, k: int, before: DeviceState, after: DeviceState, measured_now: bool) -> dict[str, Any]:
        flags = state_flags(self.held.start_state, before, after)
        return {
            "clock": "composed", "head_source": "phone" if k > 0 else "none", "phone_serial": self.serial,
            "phone_mask": self.held.mask or "all", "phone_measured": int(measured_now),
            "phone_temp_before_c": before.max_temp_c, "phone_temp_after_c": after.max_temp_c,
            "phone_freq_ratio_before": before.freq_ratio(), "phone_freq_ratio_after": after.freq_ratio(),
            "phone_thermal_status": after.thermal_status, "phone_battery_level": after.battery_level,
            "phone_charging": None if after.charging is None else int(after.charging),
            "phone_throttled": int(flags["throttled"]), "phone_hotter": int(flags["hotter"]),
        }

    def layer_rows(self, model_bytes: bytes) -> list[dict[str, Any]]:
        """layers.csv rows of the phone (node ``local``): the whole model benchmarked with op
        profiling, each layer's mean from the Run Order table (empty where the table has no row)."""
        n = self.graph.num_layers
        m = self._measure("whole.tflite", model_bytes, n)
        self.measured.setdefault(n, m)          # the device anchor's head is the whole model
        rows = []
        for layer in self.graph.layers:
            v = m.layers.get(layer.index)
            rows.append({"node": "local", "layer": layer.index, "op": layer.op, "output_bytes": layer.output_bytes,
                         "params": layer.params, "param_bytes": layer.param_bytes, "macs": layer.macs,
                         "mean_s": v, "std_s": None, "p50_s": None, "p90_s": None,
                         "runs": m.output.inference.count if m.output.inference else None,
                         "threads": self.cfg.threads, "cpus": None})
        return rows

    def environment(self) -> dict[str, Any]:
        from dataclasses import asdict

        p = self.held.phone
        return {"phone": asdict(self.held.info), "run_dir": p.run_dir, "benchmark_tool": p.tool,
                "op_profiling": p.op_profiling, "cores": self.held.cores, "mask": self.held.mask or "all",
                "delegate": self.delegate, "threads": self.cfg.threads,
                "start_state": self.held.start_state.to_dict(), "adb_port": p.adb.port}
