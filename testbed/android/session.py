"""A phone held for a while: its run folder open, benchmark_model installed, removed whatever happens.

Owns the lifetime of what the testbed puts on a phone (``phone_session``: open the run
folder, install the benchmark binary, and on the way out — normal end, error, Ctrl-C,
SIGTERM — remove the folder), and the measurements built from single benchmark runs
that ``testbed android profile`` and the sweep share (``measure_part``: state before,
benchmark with op profiling, state after, per-layer rows). Choosing the phone and
running commands on it is ``testbed.android.device``'s; the sweep's composition of
e2e is ``testbed.sweep.android``'s.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from testbed.android.adb import Adb, AndroidError
from testbed.android.device import DeviceInfo, DeviceState, Phone, core_mask
from testbed.android.output import BenchmarkOutput, map_ops_to_layers


@dataclass
class Held:
    """A phone with the run's folder on it and benchmark_model installed."""

    phone: Phone
    info: DeviceInfo
    run_id: str
    mask: str | None                # CPU mask used with taskset (None: all cores, no pinning)
    cores: str                      # what was asked: big | all | MASK
    start_state: DeviceState


@dataclass
class PartMeasurement:
    """One benchmark of one model file on the phone, with the device state around it."""

    output: BenchmarkOutput
    raw: str
    before: DeviceState
    after: DeviceState
    layers: dict[int, float] = field(default_factory=dict)      # layer index → avg seconds (op profiling)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def interrupt(signum, frame):  # noqa: ANN001 - signal API
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is interrupt:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def phone_session(adb: Adb, serial: str | None, benchmark_model: Path, *, run_id: str | None = None,
                  cores: str = "all", need_bytes: int = 0) -> Iterator[Held]:
    """Select the phone, open ``/data/local/tmp/testbed-<run id>``, install benchmark_model; remove
    the folder on the way out, whatever happens (a phone that went away is left as it is)."""
    run_id = run_id or secrets.token_hex(3)
    phone = Phone.select(adb, serial)
    from testbed.android.device import cleanup_phones

    cleanup_phones(adb, None, [phone.serial])     # folders of earlier runs whose process is gone
    info = phone.info()
    with _sigterm_as_interrupt():
        try:
            phone.open_run(run_id, need_bytes=need_bytes + benchmark_model.stat().st_size
                           if benchmark_model.is_file() else need_bytes)
            phone.install_benchmark(benchmark_model, info.abilist)
            start = phone.state()
            mask = core_mask(cores, start.cpu_max_khz)
            yield Held(phone, info, run_id, mask, cores, start)
        finally:
            try:
                phone.close_run()
            except AndroidError:
                pass               # unplugged: `testbed cleanup` removes it once the phone is back


def measure_part(held: Held, graph: str, *, threads: int | None, delegate: str, runs: int, warmup: int,
                 layer_outputs: Sequence[Sequence[str]] = (), op_profiling: bool = True) -> PartMeasurement:
    """State, benchmark (op profiling when the binary has it), state; per-layer times mapped
    onto the testbed's layer indices by output tensor name."""
    phone = held.phone
    before = phone.state()
    out, raw = phone.benchmark(graph, threads=threads, mask=held.mask, delegate=delegate, runs=runs, warmup=warmup,
                               op_profiling=op_profiling)
    after = phone.state()
    layers = {i: row.avg_ms / 1000.0 for i, row in map_ops_to_layers(out.ops, layer_outputs).items()}
    return PartMeasurement(out, raw, before, after, layers)


def state_flags(start: DeviceState, before: DeviceState, after: DeviceState, margin_c: float = 2.0) -> dict[str, Any]:
    """Whether a measurement ran throttled or hotter than the phone was at the start."""
    throttled = any(s.thermal_status is not None and s.thermal_status >= 1 for s in (before, after))
    ratio = after.freq_ratio()
    if ratio is not None and ratio < 0.95:
        throttled = True
    hot0, hot = start.max_temp_c, after.max_temp_c
    hotter = hot0 is not None and hot is not None and hot > hot0 + margin_c
    return {"throttled": throttled, "hotter": hotter}


def measurement_summary(m: PartMeasurement) -> dict[str, Any]:
    """JSON-ready summary (for ``testbed android profile --json`` and the run folder)."""
    return {"kpis": m.output.kpis(), "tool": m.output.tool, "complete": m.output.complete,
            "op_layout": m.output.op_layout, "layers_s": m.layers,
            "before": m.before.to_dict(), "after": m.after.to_dict()}


def describe_info(info: DeviceInfo) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(info)
