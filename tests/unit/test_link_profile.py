"""Link profiles: schema, units, file:line errors, shipped profiles, Mahimahi conversion."""

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.link.profile import PROFILE_DIR, Direction, list_profiles, load_profile
from testbed.link.trace import mahimahi_period, mahimahi_steps, read_mahimahi

pytestmark = pytest.mark.unit

LADDER = [1, 2, 5, 10, 20, 50, 100]


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_profile(_write(tmp_path, text))
    return info.value


HEAD = "name: t\nsource: test\n"


def test_human_units_become_base_units(tmp_path):
    p = load_profile(_write(tmp_path, HEAD + "uplink:\n  rate: 25mbit\n  delay: 40ms\n  jitter: 5ms\n"
                                             "  loss: 0.5%\n  limit: 3000\n"))
    assert p.uplink.rate_bps == 25_000_000
    assert p.uplink.delay_s == pytest.approx(0.04) and p.uplink.jitter_s == pytest.approx(0.005)
    assert p.uplink.loss.random_pct == pytest.approx(0.5) and p.uplink.limit_packets == 3000
    assert p.downlink is None and p.needs_netem("uplink") and not p.needs_netem("downlink")


def test_loss_models_parse(tmp_path):
    p = load_profile(_write(tmp_path, HEAD + "uplink:\n  loss:\n    gemodel: {p: 1%, r: 30%, 1-h: 90%}\n"
                                             "downlink:\n  loss: {state: {p13: 2%, p23: 50%}}\n"))
    g = p.uplink.loss.gemodel
    assert (g.p_pct, g.r_pct, g.one_minus_h_pct, g.one_minus_k_pct) == (1.0, 30.0, 90.0, 0.0)
    assert p.downlink.loss.state.p13_pct == 2.0 and p.downlink.loss.state.p31_pct is None


def test_unknown_key_is_refused_with_file_and_line(tmp_path):
    e = _error(tmp_path, HEAD + "uplink:\n  rate: 1mbit\n  dealy: 5ms\n")
    assert (e.line, e.field) == (5, "uplink.dealy") and "unknown field" in str(e)
    assert str(e).startswith(str(tmp_path / "p.yaml") + ":5:")


def test_bad_unit_names_line_and_expectation(tmp_path):
    e = _error(tmp_path, HEAD + "downlink:\n  rate: 10mbps\n")
    assert (e.line, e.field) == (4, "downlink.rate") and "ambiguous rate unit" in e.reason


@pytest.mark.parametrize("body,line,field,words", [
    ("uplink:\n  rate: 1mbit\n  jitter: 5ms\n", 5, "uplink.jitter", "jitter needs delay"),
    ("uplink:\n  loss: {random: 0%, correlation: 25%}\n", 4, "uplink.loss.correlation", "needs a non-zero"),
    ("uplink:\n  delay: 5ms\n  distribution: normal\n", 5, "uplink.distribution", "needs jitter"),
    ("uplink:\n  rate: 1mbit\n  reorder: 25%\n", 5, "uplink.reorder", "needs delay"),
    ("uplink:\n  overhead: 20\n  delay: 1ms\n", 4, "uplink.overhead", "give rate"),
    ("uplink:\n  delay: 1ms\n  slot: {min_delay: 2ms, max_delay: 1ms}\n", 5, "uplink.slot", "max_delay"),
])
def test_cross_field_rules_point_at_the_field(tmp_path, body, line, field, words):
    e = _error(tmp_path, HEAD + body)
    assert e.line == line and e.field.startswith(field) and words in e.reason


def test_two_loss_models_refused(tmp_path):
    e = _error(tmp_path, HEAD + "uplink:\n  loss: {random: 1%, gemodel: {p: 1%, r: 2%}}\n")
    assert e.field == "uplink.loss" and "exactly one loss model" in e.reason


def test_missing_source_and_unknown_name(tmp_path):
    e = _error(tmp_path, "name: t\nuplink: {rate: 1mbit}\n")
    assert e.field == "source" and "required" in e.reason
    with pytest.raises(ConfigError, match="no such link profile 'nope'.*ladder-10mbit"):
        load_profile("nope")


def test_every_shipped_profile_validates_and_has_a_source():
    profiles = list_profiles()
    names = {p.name for p in profiles}
    assert {f"ladder-{r}mbit" for r in LADDER} <= names
    assert {"embb-urban-macro", "embb-dense-urban", "embb-indoor-hotspot", "embb-rural", "urllc", "lte",
            "hspa", "wifi", "lossy-cell", "trace-lte-uplink"} <= names
    for p in profiles:
        assert p.source.strip() and p.path.stem == p.name


def test_ladder_is_rate_only_and_downlink_at_least_uplink():
    for r in LADDER:
        p = load_profile(f"ladder-{r}mbit")
        assert p.uplink.rate_bps == r * 10**6 and p.downlink.rate_bps >= p.uplink.rate_bps
        assert not p.needs_netem()


def test_embb_rates_follow_ts_22261():
    expect = {"embb-urban-macro": (25, 50), "embb-dense-urban": (50, 300), "embb-indoor-hotspot": (500, 1000),
              "embb-rural": (25, 50)}
    for name, (ul, dl) in expect.items():
        p = load_profile(name)
        assert (p.uplink.rate_bps, p.downlink.rate_bps) == (ul * 10**6, dl * 10**6)
        assert p.uplink.delay_s > 0


def test_lossy_cell_uses_gilbert_elliott():
    assert load_profile("lossy-cell").uplink.loss.gemodel is not None


def test_step_trace_merges_fields_over_the_direction(tmp_path):
    p = load_profile(_write(tmp_path, HEAD + "uplink: {rate: 10mbit}\ntrace:\n  loop: true\n  period: 3s\n"
                                             "  direction: uplink\n  steps:\n    - at: 0s\n      rate: 5mbit\n"
                                             "    - at: 1s\n      rate: 1mbit\n"))
    assert [(a, d.rate_bps) for a, d in p.schedule("uplink")] == [(0.0, 5_000_000), (1.0, 1_000_000)]
    assert p.schedule("downlink") == [] and p.period_s() == 3.0


def test_step_trace_rules_checked_per_step(tmp_path):
    e = _error(tmp_path, HEAD + "uplink: {rate: 10mbit}\ntrace:\n  steps:\n    - at: 0s\n"
                                "    - at: 1s\n      jitter: 5ms\n")
    assert e.field.startswith("trace.steps.1") and "jitter needs delay" in e.reason and e.line == 8


def test_looping_steps_need_a_period(tmp_path):
    e = _error(tmp_path, HEAD + "trace:\n  loop: true\n  steps:\n    - {at: 0s, rate: 1mbit}\n")
    assert e.field == "trace" and "period" in e.reason


def test_mahimahi_counts_opportunities_per_window(tmp_path):
    # 10 opportunities in [0, 100) ms, 2 in [100, 200); the last stamp (300 ms) ends
    # the 300 ms cycle and counts in the last window; an empty window gets the floor.
    trace = _write(tmp_path, "\n".join(["5"] * 10 + ["120", "150", "300"]) + "\n", "t.up")
    assert mahimahi_period(trace, 0.1) == pytest.approx(0.3)
    assert mahimahi_steps(trace, 0.1, floor_bps=10_000) == [(0.0, 1_200_000), (0.1, 240_000), (0.2, 120_000)]
    gap = _write(tmp_path, "5\n250\n400\n", "g.up")
    # windows 1, 0 (floor), 1, 1 opportunities; equal neighbours merge into one step
    assert mahimahi_steps(gap, 0.1, floor_bps=10_000) == [(0.0, 120_000), (0.1, 10_000), (0.2, 120_000)]


def test_mahimahi_bad_lines_name_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"t.up:2: expected a millisecond timestamp"):
        read_mahimahi(_write(tmp_path, "1\nx\n", "t.up"))
    with pytest.raises(ValueError, match=r"t.up:3: timestamps must not go backwards"):
        read_mahimahi(_write(tmp_path, "1\n5\n4\n", "t.up"))


def test_mahimahi_profile_becomes_rate_steps():
    p = load_profile("trace-lte-uplink")
    steps = p.schedule("uplink")
    assert len(steps) > 5 and steps[0][0] == 0.0 and p.period_s() == pytest.approx(10.0)
    rates = [d.rate_bps for _, d in steps]
    assert min(rates) < 5_000_000 < 15_000_000 < max(rates)
    assert not p.needs_netem() and p.schedule("downlink")[0][1].rate_bps == 30_000_000


def test_mahimahi_missing_file_is_a_config_error(tmp_path):
    e = _error(tmp_path, HEAD + "trace: {mahimahi: nowhere.up}\n")
    assert e.field == "trace.mahimahi" and "not found" in e.reason


def test_direction_constructs_with_base_unit_names():
    d = Direction(rate_bps=5_000_000, delay_s=0.01)
    assert d.rate_bps == 5_000_000 and not Direction().rate_bps and Direction().is_empty()
    assert PROFILE_DIR.name == "netem_profiles"


def test_cli_validate_and_list(tmp_path):
    from typer.testing import CliRunner

    from testbed.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["netem", "validate", "lossy-cell"])
    assert ok.exit_code == 0 and "ok: lossy-cell (needs netem: yes)" in ok.output
    bad = runner.invoke(app, ["netem", "validate", str(_write(tmp_path, HEAD + "uplink: {rate: 5mbps}\n"))])
    assert bad.exit_code == 1 and "p.yaml:3: uplink.rate: ambiguous rate unit" in bad.output
    listing = runner.invoke(app, ["netem", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "ladder-100mbit" in listing.output and "trace-lte-uplink" in listing.output


# --- bounds: a trace or a profile is user input ----------------------------------------------------

def test_mahimahi_file_must_be_regular_and_bounded(tmp_path):
    import os

    fifo = tmp_path / "f.up"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="a FIFO"):          # read_text() blocked until a writer came
        read_mahimahi(fifo)
    with pytest.raises(ValueError, match="a character device"):
        read_mahimahi("/dev/zero")                           # never ended
    with pytest.raises(ValueError, match=r"t.up:2: timestamp 99999999999 ms is beyond"):
        read_mahimahi(_write(tmp_path, "1\n99999999999\n", "t.up"))
    with pytest.raises(ValueError, match=r"t.up:1: expected a millisecond timestamp"):
        read_mahimahi(_write(tmp_path, "9" * 5000 + "\n", "t.up"))   # int() of 5,000 digits: a traceback before
    with pytest.raises(ValueError, match="expected a millisecond"):
        read_mahimahi(_write(tmp_path, "\u00b2\n", "t.up"))          # str.isdigit() said yes to '²'


def test_mahimahi_trace_spanning_too_many_windows_is_refused(tmp_path):
    trace = _write(tmp_path, f"1\n{7 * 24 * 3600 * 1000}\n", "t.up")   # a week at 10 ms windows: 6e7 windows
    with pytest.raises(ValueError, match="at most 100000"):
        mahimahi_steps(trace, 0.01, 10_000)


def test_mahimahi_profile_errors_name_the_profile_line(tmp_path):
    _write(tmp_path, "0\n" * 40_000 + "5\n", "dense.up")            # 40,000 packets in 10 ms: 48 Gbit/s
    e = _error(tmp_path, HEAD + "trace: {mahimahi: dense.up, window: 10ms}\n")
    assert (e.field, e.line) == ("trace.mahimahi", 3) and "window at 0s gives rate must be within" in e.reason
    _write(tmp_path, "0\n99999999999\n", "late.up")
    e = _error(tmp_path, HEAD + "trace: {mahimahi: late.up}\n")
    assert e.field == "trace.mahimahi" and "late.up:2" in e.reason


@pytest.mark.parametrize("body,field,words", [
    ("trace: {window: 1ns, steps: [{at: 0s, rate: 1mbit}]}\n", "trace", "window must be within 0.01s"),
    ("trace: {steps: [{at: 0s, rate: 1mbit}, {at: 1e9s, rate: 2mbit}]}\n", "trace", "within 0s and 604800s"),
    ("trace: {steps: [{at: 0s}]}\n", "trace.steps.0", "nothing to shape"),
    ("uplink: {limit: 100}\n", "uplink.limit", "give rate"),
    ("uplink: {rate: 1mbit, delay: 1ms, reorder: {percent: 1%, gap: true}}\n", "uplink.reorder.gap", "integer"),
    ("uplink: {rate: 1mbit, limit: 1.5}\n", "uplink.limit", "integer"),
])
def test_trace_and_field_bounds(tmp_path, body, field, words):
    e = _error(tmp_path, HEAD + body)
    assert e.field.startswith(field) and words in e.reason, str(e)


@pytest.mark.parametrize("name", ["a b", "../x", "", "x" * 65, "a\nb"])
def test_profile_names_are_label_safe(tmp_path, name):
    import json

    e = _error(tmp_path, f"name: {json.dumps(name)}\nsource: s\nuplink: {{rate: 1mbit}}\n")
    assert e.field == "name"


def test_an_empty_direction_is_left_unshaped(tmp_path):
    p = load_profile(_write(tmp_path, HEAD + "uplink: {}\ndownlink: {rate: 1mbit}\n"))
    assert p.schedule("uplink") == [] and len(p.schedule("downlink")) == 1


def test_unreadable_profile_names_are_one_error(tmp_path):
    with pytest.raises(ConfigError, match="no such link profile"):
        load_profile("a" * 5000)                      # exists() raised ENAMETOOLONG
