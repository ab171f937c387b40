"""Run folder: written per configuration, read back typed, resumable."""

import pytest

from testbed.analysis.results import (
    SAMPLE_COLUMNS,
    SUMMARY_COLUMNS,
    ConfigurationResult,
    RunFolder,
    read_csv,
    summarize,
)

pytestmark = pytest.mark.unit


def _sample(i: int, e2e: float) -> dict:
    return {"sample": i, "input_index": i % 2, "codec": "raw", "input_encoding": "raw",
            "emulation_uplink": "tbf", "emulation_downlink": "tbf", "clock": "shared",
            "head_s": 0.001, "encode_s": 1e-5, "uplink_s": 0.01, "remote_decode_s": 1e-5, "tail_s": 0.002,
            "remote_encode_s": 1e-5, "downlink_s": 0.003, "decode_s": 1e-5, "e2e_s": e2e,
            "cut_bytes_raw": 123456, "cut_bytes_wire": 123456 + 64, "result_bytes_wire": 999}


def _result(profile: str, split: int, n: int = 5) -> ConfigurationResult:
    return ConfigurationResult(
        profile=profile, split=split, samples=[_sample(i, 0.02 + i * 0.001) for i in range(n)],
        summary={"codec": "raw", "emulation_uplink": "tbf", "uplink_rate_bps": 10_000_000, "delivery_s": 0.5},
        parts=[{"part": "head", "node": "local", "file_bytes": 1000, "sha256": "ab", "delivery_s": 0.5,
                "kpi_profile": profile, "init_s": 0.01, "peak_memory_bytes": 2**20}])


def test_summarize_matches_hand_computed_values():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and s["p50"] == 3.0
    assert s["std"] == pytest.approx(1.5811388, rel=1e-6)  # sample std, ddof=1
    assert s["p90"] == pytest.approx(4.6) and s["p10"] == pytest.approx(1.4) and s["p99"] == pytest.approx(4.96)
    assert summarize([7.0])["std"] == 0.0
    assert summarize([])["mean"] is None
    assert summarize([1.0, float("nan"), 3.0])["mean"] == 2.0


def test_round_trip_keeps_values_and_types(tmp_path):
    run = RunFolder.create(tmp_path, "run1")
    run.write_config({"name": "t", "split_points": [0, 1]})
    row = run.append_configuration(_result("ladder-10mbit", 3))
    samples = run.samples()
    assert len(samples) == 5 and list(samples[0]) == list(SAMPLE_COLUMNS)
    assert samples[2]["e2e_s"] == 0.022 and samples[0]["cut_bytes_raw"] == 123456
    assert samples[0]["split"] == 3 and samples[0]["profile"] == "ladder-10mbit" and samples[0]["clock"] == "shared"
    summary = run.summary()
    assert len(summary) == 1 and list(summary[0]) == list(SUMMARY_COLUMNS)
    s = summary[0]
    assert s["count"] == 5 and s["e2e_mean_s"] == pytest.approx(0.022) and s["e2e_p50_s"] == pytest.approx(0.022)
    assert s["uplink_rate_bps"] == 10_000_000 and s["cut_bytes_wire"] == 123520 and s["downlink_loss_pct"] is None
    assert row["e2e_p99_s"] == s["e2e_p99_s"] and row["count"] == 5
    parts = run.parts()
    assert parts[0]["file_bytes"] == 1000 and parts[0]["split"] == 3 and parts[0]["steady_mean_s"] is None
    run.append_layers([{"node": "local", "layer": 0, "op": "CONV_2D", "output_bytes": 4096, "mean_s": 0.001}])
    assert run.layers()[0]["op"] == "CONV_2D" and run.layer_nodes() == {"local"}
    assert run.config()["split_points"] == [0, 1]


def test_resume_sees_finished_configurations_and_drops_half_written_ones(tmp_path):
    run = RunFolder.create(tmp_path, "run1")
    run.write_config({"name": "t"})
    run.append_configuration(_result("a", 0))
    run.append_configuration(_result("a", 1))
    # a run killed after writing samples of (a, 2) but before its summary row
    import testbed.analysis.results as r
    r._append(run.path / r.SAMPLES, r.SAMPLE_COLUMNS, [{**_sample(0, 0.1), "profile": "a", "split": 2}])
    r._append(run.path / r.PARTS, r.PART_COLUMNS, [{"profile": "a", "split": 2, "part": "head"}])
    again = RunFolder.open(run.path)
    assert again.finished() == {(0, "a", 0), (0, "a", 1)}
    assert {s["split"] for s in again.samples()} == {0, 1} and len(again.samples()) == 10
    assert {p["split"] for p in again.parts()} == {0, 1}
    again.append_configuration(_result("a", 2))
    assert len(read_csv(run.path / "summary.csv")) == 3


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    from testbed.errors import TestbedError
    with pytest.raises(TestbedError, match="not a run folder"):
        RunFolder.open(tmp_path)


def test_create_refuses_to_overwrite(tmp_path):
    RunFolder.create(tmp_path, "x")
    with pytest.raises(FileExistsError):
        RunFolder.create(tmp_path, "x")


def test_resume_skips_exactly_the_finished_configurations(tmp_path):
    from types import SimpleNamespace

    from testbed.sweep import Configuration, pending

    run = RunFolder.create(tmp_path, "run1")
    run.write_config({"name": "t"})
    for profile, split in (("fast", 0), ("fast", 5), ("slow", 0)):
        run.append_configuration(_result(profile, split))
    fast, slow = SimpleNamespace(name="fast"), SimpleNamespace(name="slow")
    configs = [Configuration(r, p, k) for r in (0, 1) for p in (fast, slow) for k in (0, 5, 31)]
    todo = pending(configs, RunFolder.open(run.path).finished())
    assert [c.key for c in todo] == [(0, "fast", 31), (0, "slow", 5), (0, "slow", 31)] + [
        (1, p, k) for p in ("fast", "slow") for k in (0, 5, 31)]
    assert pending(configs, set()) == configs


def test_median_ci_is_distribution_free_and_honest_about_its_level():
    """The interval is a pair of order statistics; its stated level is the one
    reached (n <= 5 cannot reach 95 %), and it covers the true median of a
    skewed distribution about as often as it says."""
    import numpy as np

    from testbed.analysis.results import median_ci

    assert median_ci([]) == (None, None, None)
    assert median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    lo, hi, level = median_ci(list(range(100)))
    assert (lo, hi) == (39, 60) and level == pytest.approx(0.9648, abs=1e-4)  # x(40), x(61): textbook
    rng = np.random.default_rng(7)
    n, trials = 25, 3000
    hits = 0
    for _ in range(trials):
        x = rng.exponential(size=n)
        lo, hi, level = median_ci(list(x))
        hits += lo <= np.log(2) <= hi
    assert level >= 0.95 and abs(hits / trials - level) < 0.02, (hits / trials, level)


def test_wire_bytes_and_ideal_time_count_every_segments_headers():
    from testbed.analysis.results import ideal_transfer_s, wire_bytes

    # 792,588 payload bytes in 1448-byte segments: 548 segments of 66 header bytes (52 TCP/IP + 14 Ethernet)
    assert wire_bytes(792_588, 1448, 1500) == 792_588 + 548 * 66
    assert wire_bytes(1, 1448, 1500) == 67 and wire_bytes(0, 1448, 1500) == 0
    assert wire_bytes(2896, 1460, 1500) == 2896 + 2 * 54  # no TCP timestamps: 40-byte headers
    assert ideal_transfer_s(792_588, 20e6, 0.01, 1448, 1500) == pytest.approx(0.01 + (792_588 + 548 * 66) * 8 / 20e6)
    assert ideal_transfer_s(1000, None, 0.0, 1448, 1500) is None  # unshaped: no ideal
    assert ideal_transfer_s(0, 20e6, 0.0, 1448, 1500) is None


def test_repeats_are_kept_apart_and_pooled_for_analysis(tmp_path):
    """Each repeat is its own configuration on disk (resume counts them apart);
    configurations() pools them: counts add up, statistics come from all
    samples, and the spread between repeats' medians is reported."""
    run = RunFolder.create(tmp_path, "run1")
    run.write_config({"name": "t"})
    fast = _result("a", 0)
    slow = _result("a", 0)
    for s in slow.samples:
        s["e2e_s"] = s["e2e_s"] * 1.5
    slow.repeat = 1
    run.append_configuration(fast)
    run.append_configuration(slow)
    run.append_configuration(_result("a", 1))
    assert run.finished() == {(0, "a", 0), (1, "a", 0), (0, "a", 1)}
    pooled = {r["split"]: r for r in run.configurations()}
    assert set(pooled) == {0, 1}
    assert pooled[0]["repeats"] == 2 and pooled[0]["count"] == 10
    assert pooled[0]["e2e_p50_repeat_spread"] == pytest.approx(1.5)
    all_e2e = [s["e2e_s"] for s in run.samples() if s["split"] == 0]
    import numpy as np
    assert pooled[0]["e2e_p50_s"] == pytest.approx(float(np.median(all_e2e)))
    assert pooled[1]["repeats"] == 1 and pooled[1]["e2e_p50_repeat_spread"] is None
    assert "repeat" not in pooled[0]


# --- torn rows: a write cut off by a full disk (RLIMIT_FSIZE in a real subprocess) -----------

_CHILD = r"""
import resource, sys
sys.path.insert(0, {root!r})
from tests.unit.test_results import _result
from testbed.errors import TestbedError
from testbed.analysis.results import RunFolder
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # Python ignores SIGXFSZ: writes fail with EFBIG
run = RunFolder(sys.argv[1])
if sys.argv[3] == "append":
    for k in range(10, 60):
        try:
            run.append_configuration(_result("a", k, n=20))
        except TestbedError as e:
            print("refused:", e)
            sys.exit(0)
    sys.exit(2)
else:  # what a plain buffered append (the old writer) or a killed process leaves
    with open(run.path / "summary.csv", "a") as f:
        f.write("a,99," + "x" * 4000 + "\n")
"""


def _child(run_path, limit: int, mode: str):
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    return subprocess.run([sys.executable, "-c", _CHILD.format(root=root), str(run_path), str(limit), mode],
                          capture_output=True, text=True, timeout=120)


def _all_lines_complete(path) -> bool:
    from testbed.analysis.results import _complete_length
    data = path.read_bytes()
    return _complete_length(data) == len(data)


def test_a_full_disk_mid_append_leaves_no_torn_row(tmp_path):
    run = RunFolder.create(tmp_path, "run1")
    run.write_config({"name": "t"})
    run.append_configuration(_result("a", 0))
    limit = (run.path / "samples.csv").stat().st_size + 3000   # room for one more configuration, not two
    r = _child(run.path, limit, "append")
    assert r.returncode == 0 and "refused:" in r.stdout and "nothing of it was kept" in r.stdout, r.stderr
    for name in ("samples.csv", "summary.csv", "parts.csv"):
        assert _all_lines_complete(run.path / name), name
    again = RunFolder.open(run.path)
    assert again.notices == []
    done = again.finished()
    assert (0, "a", 0) in done and {s["split"] for s in again.samples()} == {k for _, _, k in done}


def test_a_torn_last_line_is_skipped_by_readers_and_dropped_on_open(tmp_path):
    run = RunFolder.create(tmp_path, "run1")
    run.write_config({"name": "t"})
    run.append_configuration(_result("a", 0))
    size = (run.path / "summary.csv").stat().st_size
    r = _child(run.path, size + 1000, "torn")
    assert r.returncode != 0 and "File too large" in r.stderr       # the write really was cut off
    assert not _all_lines_complete(run.path / "summary.csv")
    assert RunFolder(run.path).finished() == {(0, "a", 0)}              # read-only: skipped, not a TypeError
    again = RunFolder.open(run.path)                                 # --resume: cut off, and said so
    assert len(again.notices) == 1 and "summary.csv: dropped an incomplete last line" in again.notices[0]
    assert (run.path / "summary.csv").stat().st_size == size
    again.append_configuration(_result("a", 1))                      # the next row does not join the torn one
    assert again.finished() == {(0, "a", 0), (0, "a", 1)} and _all_lines_complete(run.path / "summary.csv")
    assert RunFolder.open(run.path).notices == []


def test_a_torn_header_or_short_row_counts_as_incomplete():
    from testbed.analysis.results import _complete_length
    assert _complete_length(b"profile,spl") == 0
    assert _complete_length(b"a,b\n1,2\n") == 8
    assert _complete_length(b"a,b\n1,2\n3") == 8
    assert _complete_length(b'a,b\n1,2\n3,"x\n') == 8          # cut right after a newline inside a quoted cell
    whole = b'a,b\n1,"x\ny"\n2,3\n'
    assert _complete_length(whole) == len(whole)                # a quoted newline is not the end of a row
    assert _complete_length(whole + b'4,"p\nq') == len(whole)
