"""The data path of a configuration as the sweep drives it: topology, codec, transport, stream.

Owns turning the experiment's ``topology``, ``codec``, ``transport`` and ``runs.mode``
into (a) which part each node holds (``roles``), (b) the arguments of the local agent's
``run`` (``run_args``), and (c) the summary columns a configuration adds from them
(``summary_columns``): stream totals, bitrate and link utilisation per direction, the
max sustainable frame rate, fidelity aggregates, CPU time per part, datagram counts.
The nodes do the measuring (``nodes.pipeline``, ``nodes.stream``); the column names
are ``testbed.analysis.results``'; this module computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nodes.stats import describe

if TYPE_CHECKING:
    from testbed.experiment import Experiment
    from testbed.link.profile import LinkProfile
    from testbed.sweep.plan import Plan

#: The direction the cut tensors take, per topology.
CUT_DIRECTION = {1: "uplink", 2: "downlink", 3: "downlink"}


def roles(topology: int) -> tuple[str, str]:
    """(part on the remote node, part on the UE) for a topology."""
    return ("tail", "head") if topology == 1 else ("head", "tail")


def measures_fidelity(exp: Experiment) -> bool:
    """Fidelity is measured whenever the data path is not the uncompressed TCP one: a
    lossy codec to quantify it, a lossless one to prove it (bitwise equal)."""
    return exp.codec != "raw" or exp.input_encoding != "raw" or exp.transport.protocol == "udp"


def constant_rate(prof: LinkProfile, direction: str) -> int | None:
    """The direction's rate when it holds for the whole configuration (UDP pacing)."""
    schedule = prof.schedule(direction)
    d = schedule[0][1] if len(schedule) == 1 else None
    return d.rate_bps if d is not None and d.rate_bps else None


def run_args(p: Plan, prof: LinkProfile) -> dict[str, Any]:
    """The data-path arguments of the local agent's ``run`` for this configuration."""
    exp = p.experiment
    shape = tuple(p.graph.inputs[0].shape)
    args: dict[str, Any] = {"topology": exp.topology, "transport": exp.transport.protocol,
                            "on_loss": exp.transport.on_loss, "fidelity": measures_fidelity(exp),
                            "input_size": int(shape[1]) if len(shape) == 4 else None}
    if exp.transport.protocol == "udp":
        args["rate_bps"] = constant_rate(prof, CUT_DIRECTION[exp.topology])
    if exp.runs.mode == "stream":
        args["stream"] = {"fps": exp.runs.fps, "duration_s": exp.runs.duration, "queue": exp.runs.queue}
    return args


# Stages of a sample that can work on different frames at once, per topology; the
# slowest one bounds the frame rate a pipeline sustains.
STAGES = {
    1: (("head", "encode"), ("uplink",), ("remote_decode", "tail", "remote_encode"), ("downlink",),
        ("decode",)),
    2: (("encode",), ("uplink",), ("remote_decode", "head", "remote_encode"), ("downlink",),
        ("decode", "tail")),
    3: (("head", "remote_encode"), ("downlink",), ("decode", "tail")),
}


def stage_times(samples: Sequence[dict[str, Any]], topology: int) -> list[float]:
    """Median time of each pipeline stage over the samples (0 for an absent stage)."""
    out = []
    for stage in STAGES.get(topology, STAGES[1]):
        per = [sum(s.get(f"{t}_s") or 0.0 for t in stage) for s in samples if s.get("e2e_s") is not None]
        out.append(describe(per)["p50"] or 0.0)
    return out


def max_sustainable_fps(samples: Sequence[dict[str, Any]], topology: int) -> float | None:
    """1 / the slowest stage's median: the rate a pipelined stream can keep up with."""
    slowest = max(stage_times(samples, topology), default=0.0)
    return 1.0 / slowest if slowest > 0 else None


def _mean(samples: Sequence[dict[str, Any]], key: str) -> float | None:
    return describe([s.get(key) for s in samples])["mean"]


def _fidelity(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    err = [s["max_abs_err"] for s in samples if s.get("max_abs_err") is not None]
    snr = describe([s.get("snr_db") for s in samples])
    equal = [s.get("bitwise_equal") for s in samples if s.get("bitwise_equal") is not None]
    return {"max_abs_err_max": max(err) if err else None, "snr_db_p50": snr["p50"], "snr_db_p10": snr["p10"],
            "bitwise_equal_samples": sum(1 for e in equal if e is True or e == "True") if equal else None,
            "kp_drift_mean_px": _mean(samples, "kp_drift_mean_px"),
            "kp_drift_max_px": max((s["kp_drift_max_px"] for s in samples if s.get("kp_drift_max_px") is not None),
                                   default=None)}


def _packets(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    sent = [s["packets_sent"] for s in samples if s.get("packets_sent") is not None]
    lost = [s["packets_lost"] for s in samples if s.get("packets_lost") is not None]
    return {"packets_sent": sum(sent) if sent else None, "packets_lost": sum(lost) if lost else None,
            "packet_loss_pct": 100.0 * sum(lost) / sum(sent) if sent and lost and sum(sent) else None,
            "frames_lost": sum(1 for s in samples if s.get("dropped") in (True, "True"))}


def _stream(exp: Experiment, prof: LinkProfile, stream: dict[str, Any],
            samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Bitrate per direction and link utilisation: from the stream totals, else from
    the samples' bytes over the samples' wall time (single mode: back to back)."""
    out: dict[str, Any] = {}
    if stream:
        out.update({k: stream.get(k) for k in ("frames_offered", "frames_dropped", "frames_completed",
                                                 "throughput_fps", "drop_rate", "stream_s")})
        out["frames_lost"] = stream.get("frames_lost")
        seconds = stream.get("stream_s")
    else:
        seconds = sum(s.get("e2e_s") or 0.0 for s in samples)
        out["throughput_fps"] = len(samples) / seconds if seconds else None
    for d in ("uplink", "downlink"):
        nbytes = stream.get(f"{d}_bytes") if stream else sum(s.get(f"{d}_bytes") or 0 for s in samples)
        bitrate = nbytes * 8 / seconds if seconds and nbytes is not None else None
        rate = constant_rate(prof, d)
        out[f"{d}_bitrate_bps"] = bitrate
        out[f"{d}_utilisation"] = bitrate / rate if bitrate is not None and rate else None
    return out


def summary_columns(p: Plan, prof: LinkProfile, samples: Sequence[dict[str, Any]],
                    stream: dict[str, Any]) -> dict[str, Any]:
    """The data-path columns of one configuration's summary row."""
    exp = p.experiment
    raw = [s.get("cut_bytes_raw") for s in samples if s.get("cut_bytes_raw")]
    wire = [s.get("cut_bytes_wire") for s in samples if s.get("cut_bytes_raw")]
    row: dict[str, Any] = {
        "topology": exp.topology, "transport": exp.transport.protocol, "on_loss": exp.transport.on_loss,
        "nft_loss_pct": exp.transport.nft_loss or None, "mode": exp.runs.mode,
        "fps": exp.runs.fps if exp.runs.mode == "stream" else None,
        "queue": exp.runs.queue if exp.runs.mode == "stream" else None,
        "cut_ratio": sum(wire) / sum(raw) if raw else None,
        "max_sustainable_fps": max_sustainable_fps(samples, exp.topology),
        "head_cpu_mean_s": _mean(samples, "head_cpu_s"), "tail_cpu_mean_s": _mean(samples, "tail_cpu_s"),
        "head_node": "local" if exp.topology == 1 else "remote",
        "tail_node": "remote" if exp.topology == 1 else "local",
    }
    row.update(_stream(exp, prof, stream, samples))
    row.update(_fidelity(samples))
    row.update(_packets(samples))
    if stream:
        row["frames_lost"] = stream.get("frames_lost")
    return row
