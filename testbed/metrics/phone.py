"""The phone's series (Android local node): temperature, CPU frequency, thermal status, battery,
and its head latency, each labelled with the phone's ``model`` and ``serial``.

Owns only these names, registered on the registry the sweep passes in; the sweep's own
series are ``definitions``/``recording``'s. Labels stay bounded: a phone has a handful of
thermal zones and cores.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from testbed.metrics.definitions import BASE_LABELS


class PhoneMetrics:
    """Gauges for one phone in one run."""

    def __init__(self, registry: CollectorRegistry, experiment: str, run: str, serial: str, model: str) -> None:
        self._base = {"experiment": experiment, "run": run, "serial": serial, "model": model}
        labels = BASE_LABELS + ("serial", "model")
        self.temperature = Gauge("testbed_phone_temperature_celsius", "Phone temperature per thermal zone "
                                 "(battery included), read before and after each configuration.",
                                 labels + ("zone",), registry=registry)
        self.frequency = Gauge("testbed_phone_cpu_frequency_hertz", "Current CPU frequency per core "
                               "(scaling_cur_freq).", labels + ("cpu",), registry=registry)
        self.max_frequency = Gauge("testbed_phone_cpu_max_frequency_hertz", "Maximum CPU frequency per core "
                                   "(cpuinfo_max_freq).", labels + ("cpu",), registry=registry)
        self.thermal_status = Gauge("testbed_phone_thermal_status", "Android thermal status "
                                    "(0 none .. 6 shutdown; dumpsys thermalservice).", labels, registry=registry)
        self.battery = Gauge("testbed_phone_battery_level_ratio", "Battery level (0-1).", labels, registry=registry)
        self.head = Gauge("testbed_phone_head_seconds", "Mean steady-state latency of the head part on the phone "
                          "(benchmark_model).", labels + ("split",), registry=registry)

    def set_state(self, state: Any) -> None:
        for zone, c in state.thermal_zones_c.items():
            self.temperature.labels(**self._base, zone=zone).set(c)
        if state.battery_temp_c is not None:
            self.temperature.labels(**self._base, zone="battery").set(state.battery_temp_c)
        for cpu, khz in state.cpu_cur_khz.items():
            self.frequency.labels(**self._base, cpu=str(cpu)).set(khz * 1000.0)
        for cpu, khz in state.cpu_max_khz.items():
            self.max_frequency.labels(**self._base, cpu=str(cpu)).set(khz * 1000.0)
        if state.thermal_status is not None:
            self.thermal_status.labels(**self._base).set(state.thermal_status)
        if state.battery_level is not None:
            self.battery.labels(**self._base).set(state.battery_level / 100.0)

    def set_head(self, split: int, seconds: float | None) -> None:
        if seconds is not None:
            self.head.labels(**self._base, split=str(split)).set(seconds)
