"""Fidelity of final model outputs against a reference (the uncompressed split on the same input).

Numbers per sample, over all final output tensors the two have in common:

* ``max_abs_err``: largest absolute difference of any element;
* ``snr_db``: 10 log10(sum ref^2 / sum (ref - got)^2); ``inf`` when bitwise equal;
* ``bitwise_equal``: every tensor byte for byte the same (what a lossless codec must give);
* for PoseNet (outputs named ``...heatmap...`` and ``...offset...``), the task-level
  effect: single-pose keypoints decoded from heatmaps + offsets, and their drift in
  pixels (``kp_drift_mean_px``, ``kp_drift_max_px``) over the 17 keypoints.

Single-pose decoding (the standard PoseNet one): per keypoint ``k`` the argmax
``(y, x)`` of heatmap ``k`` on the output grid, refined by the offset vectors at that
cell (``offsets[y, x, k]`` is the y offset, ``offsets[y, x, K + k]`` the x offset), the
cell scaled by the output stride: ``pos = (y, x) * stride + (dy, dx)``. The stride is
``(input_size - 1) / (grid - 1)`` (PoseNet at 257x257 on a 9x9 grid: 32).

This module owns only the arithmetic (numpy); where references come from and which
samples are compared is ``nodes.pipeline``'s, how results summarise it
``testbed.analysis.fidelity``'s.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

FIDELITY_KEYS = ("max_abs_err", "snr_db", "bitwise_equal", "kp_drift_mean_px", "kp_drift_max_px")


def find_posenet(outputs: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """Names of the heatmap and offset outputs, when the model looks like PoseNet."""
    heat = [n for n in outputs if "heatmap" in n.lower()]
    off = [n for n in outputs if "offset" in n.lower()]
    if len(heat) != 1 or len(off) != 1:
        return None
    h, o = outputs[heat[0]], outputs[off[0]]
    if h.ndim != 4 or o.ndim != 4 or o.shape[:3] != h.shape[:3] or o.shape[3] != 2 * h.shape[3]:
        return None
    return heat[0], off[0]


def keypoints(heatmaps: np.ndarray, offsets: np.ndarray, stride: float) -> np.ndarray:
    """(K, 2) keypoint positions (y, x) in input pixels from one (1, H, W, K) heatmap
    and (1, H, W, 2K) offsets."""
    hm = np.asarray(heatmaps, dtype=np.float64)[0]
    off = np.asarray(offsets, dtype=np.float64)[0]
    h, w, k = hm.shape
    flat = hm.reshape(h * w, k).argmax(axis=0)
    ys, xs = flat // w, flat % w
    idx = np.arange(k)
    dy, dx = off[ys, xs, idx], off[ys, xs, k + idx]
    return np.stack([ys * stride + dy, xs * stride + dx], axis=1)


def output_stride(grid: int, input_size: int | None) -> float:
    """Pixels per output cell (PoseNet 257 -> 9: 32)."""
    if not input_size or grid <= 1:
        return 32.0
    return (input_size - 1) / (grid - 1)


def compare(reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
            input_size: int | None = None) -> dict[str, Any]:
    """Fidelity numbers of ``got`` against ``reference`` (see the module doc)."""
    names = [n for n in reference if n in got]
    if not names:
        return dict.fromkeys(FIDELITY_KEYS)
    equal = all(reference[n].shape == got[n].shape and reference[n].dtype == got[n].dtype
                and np.array_equal(reference[n], got[n]) for n in names)
    err = signal = 0.0
    max_abs = 0.0
    for n in names:
        r = np.asarray(reference[n], dtype=np.float64)
        g = np.asarray(got[n], dtype=np.float64).reshape(r.shape)
        d = np.nan_to_num(r - g, nan=np.inf)
        max_abs = max(max_abs, float(np.abs(d).max()) if d.size else 0.0)
        err += float(np.square(d).sum())
        signal += float(np.square(r).sum())
    snr = math.inf if err == 0 else (10 * math.log10(signal / err) if signal > 0 else -math.inf)
    out: dict[str, Any] = {"max_abs_err": max_abs, "snr_db": snr, "bitwise_equal": equal,
                           "kp_drift_mean_px": None, "kp_drift_max_px": None}
    pose = find_posenet(reference)
    if pose is not None and all(n in got for n in pose):
        heat, off = pose
        stride = output_stride(reference[heat].shape[1], input_size)
        a = keypoints(reference[heat], reference[off], stride)
        b = keypoints(got[heat], got[off].reshape(reference[off].shape), stride)
        drift = np.hypot(*(a - b).T)
        out["kp_drift_mean_px"] = float(drift.mean())
        out["kp_drift_max_px"] = float(drift.max())
    return out


def json_safe(row: Mapping[str, Any]) -> dict[str, Any]:
    """Fidelity numbers as the control plane's JSON carries them (no inf/NaN: None
    plus ``bitwise_equal`` say the same)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
