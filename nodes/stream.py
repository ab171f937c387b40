"""Streams at a frame rate: frames arrive whether or not the pipeline keeps up.

``runs: {mode: stream, fps, duration, queue}`` on the local node. Three threads:

* the **source** releases frame ``i`` at ``t0 + i / fps`` (input ``i mod inputs``) into a
  queue of ``queue`` frames; a frame that finds the queue full is **dropped** and
  counted, never waited for (a camera does not wait);
* the **worker** takes frames in order and runs the first half of a sample
  (``pipeline.send_half``: topology 1 head + encode + send, 2 encode + send the input,
  3 send the trigger), after taking one of ``IN_FLIGHT`` slots: at most that many
  frames are past the first stage (on the link, at the remote, coming back). So the
  head computes frame ``i + 1`` while frame ``i`` is on the uplink;
* the **receiver** takes results in order (``pipeline.receive_half``: decode; in
  topologies 2/3 the tail), frees the slot and records the frame.

Per completed frame ``e2e_s`` runs from the frame's *arrival* (not from the start of
its head): it includes the time it waited in the queue (``queue_s``) and, in
topology 3, at the remote (``remote_queue_s``, a trigger waiting for the head).
Topology 3's source is the remote: the local paces the triggers and applies the same
queue rule to them (documented simplification: the admission decision is the local's).

Totals (``RunResult.stream``): frames offered, dropped at the queue, lost (UDP,
``on_loss: drop``), completed, the stream's duration (first arrival to last
completion), throughput, and the bytes each direction carried. Link utilisation needs
the configured rate and is the orchestrator's (``testbed.sweep.configuration``).

This module owns the threads and the queue rule; the halves of a sample are
``nodes.pipeline``'s.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from nodes import pipeline as PL
from nodes.cpu_account import CpuAccount
from nodes.part import Part

#: Frames allowed past the first stage at once (uplink, remote, downlink, one spare).
IN_FLIGHT = 4
_POLL_S = 0.05


@dataclass
class _State:
    """What the three threads share."""

    frames: queue.Queue[tuple[int, int] | None]
    sent: queue.Queue[PL.Pending | None] = field(default_factory=queue.Queue)
    slots: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(IN_FLIGHT))
    stop: threading.Event = field(default_factory=threading.Event)
    dropped: list[int] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, np.ndarray] = field(default_factory=dict)
    error: BaseException | None = None


def run_stream(link: PL.LocalLink | None, part: Part | None, inputs: Sequence[Mapping[str, np.ndarray]],
               spec: PL.RunSpec, plan: PL.Plan, cpu: CpuAccount, observe: PL.Observe,
               refs: list[dict[str, np.ndarray]] | None, started: float, planned: float) -> PL.RunResult:
    """Warm-up samples one at a time, then the stream; see the module doc."""
    for i in range(spec.warmup):
        PL.sample(link, part, inputs[i % len(inputs)], plan, i, i % len(inputs), observe, cpu)
    warmed = time.monotonic()
    n = max(1, int(round(spec.duration_s * spec.fps)))
    st = _State(queue.Queue(maxsize=spec.queue))
    t_start = PL.now() + 5_000_000  # the first frame 5 ms from now: threads are up by then
    threads = [threading.Thread(target=_guard, args=(st, _source, st, n, spec.fps, t_start), daemon=True)]
    if plan.remote:
        threads.append(threading.Thread(target=_guard, args=(st, _receiver, st, link, part, plan, observe, cpu,
                                                              refs, spec, t_start), daemon=True))
    for t in threads:
        t.start()
    _guard(st, _worker, st, link, part, inputs, plan, observe, cpu, refs, spec, t_start)
    for t in threads:
        t.join()
    if st.error is not None:
        raise st.error
    end = time.monotonic()
    rows = sorted(st.rows, key=lambda r: r["frame"])
    totals = _totals(rows, n, st.dropped, t_start)
    return PL.RunResult(rows, st.final, {"handshake_s": planned - started, "warmup_s": warmed - planned,
                                         "sampling_s": end - warmed}, totals)


def _guard(st: _State, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - handed to the calling thread, raised there
        if st.error is None:
            st.error = e
        st.stop.set()
        _unblock(st)


def _unblock(st: _State) -> None:
    for q in (st.frames, st.sent):
        try:
            q.put_nowait(None)
        except queue.Full:
            pass
    st.slots.release()


def _source(st: _State, n: int, fps: float, t_start: int) -> None:
    period_ns = 1e9 / fps
    for i in range(n):
        if st.stop.is_set():
            return
        wait = (t_start + i * period_ns - PL.now()) / 1e9
        if wait > 0:
            time.sleep(wait)
        try:
            st.frames.put_nowait((i, PL.now()))
        except queue.Full:
            st.dropped.append(i)
    _put(st, st.frames, None)


def _put(st: _State, q: queue.Queue[Any], item: Any) -> None:
    while not st.stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _take_slot(st: _State) -> bool:
    while not st.stop.is_set():
        if st.slots.acquire(timeout=_POLL_S):
            return True
    return False


def _worker(st: _State, link: PL.LocalLink | None, part: Part | None, inputs: Sequence[Mapping[str, np.ndarray]],
            plan: PL.Plan, observe: PL.Observe, cpu: CpuAccount, refs: list[dict[str, np.ndarray]] | None,
            spec: PL.RunSpec, t_start: int) -> None:
    while True:
        item = st.frames.get()
        if item is None or st.stop.is_set():
            break
        i, arrival = item
        idx = i % len(inputs)
        if not plan.remote:  # everything on this node: the worker is the whole pipeline
            t_in = PL.now()
            row, out = PL.sample(None, part, inputs[idx], plan, i, idx, observe, cpu)
            _record(st, row, out, i, arrival, t_in, t_start, refs, idx, spec)
            continue
        if not _take_slot(st):
            break
        assert link is not None
        pending = PL.send_half(link, part, inputs[idx], plan, i, idx, observe, cpu)
        pending.arrival_ns = arrival
        st.sent.put(pending)
    if plan.remote:
        st.sent.put(None)


def _receiver(st: _State, link: PL.LocalLink, part: Part | None, plan: PL.Plan, observe: PL.Observe,
              cpu: CpuAccount, refs: list[dict[str, np.ndarray]] | None, spec: PL.RunSpec, t_start: int) -> None:
    while True:
        pending = st.sent.get()
        if pending is None or st.stop.is_set():
            return
        row, out = PL.receive_half(link, part, plan, pending, observe, cpu)
        st.slots.release()
        assert pending.arrival_ns is not None
        _record(st, row, out, pending.seq, pending.arrival_ns, pending.t0, t_start, refs, pending.index, spec)


def _record(st: _State, row: dict[str, Any], out: Mapping[str, np.ndarray] | None, i: int, arrival: int,
            t_in: int, t_start: int, refs: list[dict[str, np.ndarray]] | None, idx: int, spec: PL.RunSpec) -> None:
    """Complete a frame's row: its index, arrival, queueing, e2e from arrival."""
    queue_s = max(0, t_in - arrival) / 1e9
    # Frames overlap on the link, so a socket's retransmission count between one frame's
    # send and its result also holds other frames' segments: no per-frame count.
    row.pop("_remote_retrans", None)
    row.update(uplink_retrans=None, downlink_retrans=None)
    row.update(frame=i, sample=i, input_index=idx, arrival_s=(arrival - t_start) / 1e9, queue_s=queue_s)
    if row.get("e2e_s") is not None:
        row["e2e_s"] += queue_s + (row.get("remote_queue_s") or 0.0)
        row["done_s"] = row["arrival_s"] + row["e2e_s"]
    PL.add_fidelity(row, refs, idx, out, spec.input_size)
    st.rows.append(row)
    if out is not None:
        st.final = dict(out)


def _totals(rows: list[dict[str, Any]], offered: int, dropped: list[int], t_start: int) -> dict[str, Any]:
    done = [r for r in rows if r.get("e2e_s") is not None]
    first = min((r["arrival_s"] for r in rows), default=0.0)
    last = max((r["done_s"] for r in done), default=first)
    duration = max(last - first, 1e-9)
    up = sum(r.get("uplink_bytes") or 0 for r in rows)
    down = sum(r.get("downlink_bytes") or 0 for r in rows)
    return {"frames_offered": offered, "frames_dropped": len(dropped), "frames_lost": len(rows) - len(done),
            "frames_completed": len(done), "stream_s": duration, "throughput_fps": len(done) / duration,
            "drop_rate": (offered - len(done)) / offered if offered else None,
            "uplink_bytes": up, "downlink_bytes": down,
            "uplink_bitrate_bps": up * 8 / duration, "downlink_bitrate_bps": down * 8 / duration}
