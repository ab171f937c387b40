"""Fidelity numbers and PoseNet's single-pose keypoint decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nodes.fidelity import compare, find_posenet, json_safe, keypoints, output_stride

pytestmark = pytest.mark.unit


def pose_outputs(seed=0, peaks=None):
    rng = np.random.default_rng(seed)
    heat = rng.uniform(-1, 0, (1, 9, 9, 17)).astype(np.float32)
    off = rng.uniform(-4, 4, (1, 9, 9, 34)).astype(np.float32)
    for k, (y, x) in enumerate(peaks or [(k % 9, (2 * k) % 9) for k in range(17)]):
        heat[0, y, x, k] = 5.0
    return {"MobilenetV1/heatmap_2/BiasAdd": heat, "MobilenetV1/offset_2/BiasAdd": off,
            "MobilenetV1/displacement_fwd_2/BiasAdd": np.zeros((1, 9, 9, 32), np.float32)}


def test_keypoints_are_argmax_cell_times_stride_plus_offset():
    out = pose_outputs()
    heat, off = out["MobilenetV1/heatmap_2/BiasAdd"], out["MobilenetV1/offset_2/BiasAdd"]
    kp = keypoints(heat, off, 32.0)
    for k in range(17):
        y, x = k % 9, (2 * k) % 9
        assert kp[k, 0] == pytest.approx(y * 32 + off[0, y, x, k])
        assert kp[k, 1] == pytest.approx(x * 32 + off[0, y, x, 17 + k])
    assert output_stride(9, 257) == 32.0


def test_identical_outputs_are_bitwise_with_no_drift():
    out = pose_outputs()
    f = compare(out, {k: v.copy() for k, v in out.items()}, 257)
    assert f["bitwise_equal"] and f["max_abs_err"] == 0 and f["snr_db"] == math.inf
    assert f["kp_drift_mean_px"] == 0 and f["kp_drift_max_px"] == 0
    assert json_safe(f)["snr_db"] is None  # JSON carries no inf


def test_drift_measures_moved_keypoints_in_pixels():
    ref = pose_outputs()
    moved = [(k % 9, (2 * k) % 9) for k in range(17)]
    moved[3] = ((moved[3][0] + 1) % 9, moved[3][1])  # keypoint 3 one cell down
    got = pose_outputs(peaks=moved)
    f = compare(ref, got, 257)
    assert f["kp_drift_max_px"] > 20 and f["kp_drift_mean_px"] == pytest.approx(f["kp_drift_max_px"] / 17)
    assert not f["bitwise_equal"] and f["max_abs_err"] > 0 and f["snr_db"] < 60


def test_snr_of_known_noise():
    ref = {"y": np.ones(10000, np.float32)}
    got = {"y": ref["y"] + np.float32(0.1)}
    assert compare(ref, got)["snr_db"] == pytest.approx(20.0, abs=0.01)
    assert compare(ref, got)["kp_drift_mean_px"] is None  # not PoseNet
    assert find_posenet(ref) is None
