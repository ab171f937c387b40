"""SweepMetrics: the values the sweep records read back from a fresh registry."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from testbed.errors import TestbedError
from testbed.metrics import LATENCY_BUCKETS, SweepMetrics, parse_listen, serve

pytestmark = pytest.mark.unit

BASE = {"experiment": "smoke", "run": "r1"}


def _sample(e2e: float, *, wire: int = 4000, result: int | None = 200) -> dict:
    s = {"head_s": 0.004, "encode_s": 0.0001, "uplink_s": 0.01, "remote_decode_s": 0.0002, "tail_s": 0.006,
         "remote_encode_s": 0.0001, "downlink_s": 0.002, "decode_s": 0.0001, "e2e_s": e2e,
         "cut_bytes_raw": 3936, "cut_bytes_wire": wire, "result_bytes_wire": result}
    return s


@pytest.fixture
def rec():
    registry = CollectorRegistry()
    return registry, SweepMetrics(registry, "smoke", "r1", clock=lambda: 1_700_000_000.0)


def value(registry, name, **labels):
    return registry.get_sample_value(name, {**BASE, **labels})


def test_samples_fill_histograms_per_split_profile_node_and_direction(rec):
    registry, m = rec
    m.configuration_started(3, "ladder-10mbit", total=4, done=1, eta_s=12.5)
    for e2e in (0.02, 0.03, 0.04):
        m.observe_sample(3, "ladder-10mbit", _sample(e2e))
    cfg = {"split": "3", "profile": "ladder-10mbit"}
    assert value(registry, "testbed_e2e_seconds_count", **cfg) == 3
    assert value(registry, "testbed_e2e_seconds_sum", **cfg) == pytest.approx(0.09)
    assert value(registry, "testbed_e2e_seconds_bucket", **cfg, le="0.03") == 2
    assert value(registry, "testbed_inference_seconds_count", **cfg, node="local", part="head") == 3
    assert value(registry, "testbed_inference_seconds_sum", **cfg, node="remote", part="tail") == pytest.approx(0.018)
    assert value(registry, "testbed_transfer_seconds_sum", **cfg, direction="uplink") == pytest.approx(0.03)
    assert value(registry, "testbed_transfer_seconds_count", **cfg, direction="downlink") == 3
    assert value(registry, "testbed_codec_seconds_count", **cfg, node="remote", direction="uplink") == 3
    assert value(registry, "testbed_codec_seconds_count", **cfg, node="local", direction="downlink") == 3
    assert value(registry, "testbed_intermediate_raw_bytes", split="3") == 3936
    assert value(registry, "testbed_intermediate_wire_bytes", split="3") == 4000
    # achieved-link counters: bytes and time of transfers of known size
    assert value(registry, "testbed_link_transferred_bytes_total", **cfg, direction="uplink") == 12000
    assert value(registry, "testbed_link_busy_seconds_total", **cfg, direction="uplink") == pytest.approx(0.03)
    assert value(registry, "testbed_link_transfers_total", **cfg, direction="downlink") == 3
    # progress
    assert value(registry, "testbed_sweep_configurations_planned") == 4
    assert value(registry, "testbed_sweep_configurations_completed") == 1
    assert value(registry, "testbed_sweep_eta_seconds") == 12.5
    assert value(registry, "testbed_sweep_current_configuration", **cfg) == 1
    assert value(registry, "testbed_sweep_current_split") == 3
    assert value(registry, "testbed_sweep_start_time_seconds") == 1_700_000_000.0
    assert value(registry, "testbed_sweep_running") == 1


def test_anchors_skip_absent_parts_and_untraversed_link(rec):
    registry, m = rec
    # device anchor k = N: no tail, nothing crosses the link
    m.configuration_started(31, "p", total=2, done=0)
    m.observe_sample(31, "p", {"head_s": 0.05, "tail_s": 0.0, "uplink_s": 0.0, "downlink_s": 0.0,
                               "e2e_s": 0.05, "cut_bytes_raw": 0, "cut_bytes_wire": 0})
    cfg = {"split": "31", "profile": "p"}
    assert value(registry, "testbed_inference_seconds_count", **cfg, node="local", part="head") == 1
    assert value(registry, "testbed_inference_seconds_count", **cfg, node="remote", part="tail") is None
    assert value(registry, "testbed_transfer_seconds_count", **cfg, direction="uplink") is None
    assert value(registry, "testbed_e2e_seconds_count", **cfg) == 1
    # network anchor k = 0: no head; downlink size unknown -> timed but not in the rate counters
    m.observe_sample(0, "p", {"head_s": "", "tail_s": 0.03, "uplink_s": 0.2, "downlink_s": 0.01, "e2e_s": 0.25,
                              "cut_bytes_raw": 789_507, "cut_bytes_wire": 789_600})
    cfg0 = {"split": "0", "profile": "p"}
    assert value(registry, "testbed_inference_seconds_count", **cfg0, node="local", part="head") is None
    assert value(registry, "testbed_transfer_seconds_count", **cfg0, direction="downlink") == 1
    assert value(registry, "testbed_link_transfers_total", **cfg0, direction="downlink") is None
    assert value(registry, "testbed_link_transferred_bytes_total", **cfg0, direction="uplink") == 789_600


def test_configuration_done_sets_exact_summary_and_best_split(rec):
    registry, m = rec
    for k, values in ((5, [0.05, 0.01, 0.03, 0.02, 0.04]), (9, [0.02, 0.02, 0.02]), (12, [0.5])):
        m.configuration_started(k, "p", total=3, done=0)
        for e2e in values:
            m.observe_sample(k, "p", {"e2e_s": e2e})
        summary = m.configuration_done(k, "p", done=1, eta_s=3.0)
        if k == 5:
            assert (summary.samples, summary.e2e_p50_s) == (5, pytest.approx(0.03))
            assert summary.e2e_p90_s == pytest.approx(0.046)  # linear interpolation, as numpy
            assert value(registry, "testbed_configuration_e2e_mean_seconds", split="5", profile="p") == \
                pytest.approx(0.03)
    assert value(registry, "testbed_configuration_samples", split="12", profile="p") == 1
    assert value(registry, "testbed_best_split", profile="p") == 9
    assert value(registry, "testbed_best_split_e2e_p50_seconds", profile="p") == pytest.approx(0.02)
    assert value(registry, "testbed_sweep_eta_seconds") == 3.0


def test_only_one_current_configuration_series(rec):
    registry, m = rec
    m.configuration_started(1, "a", total=3, done=0)
    m.configuration_started(2, "a", total=3, done=1)
    m.configuration_started(1, "b", total=3, done=2)
    text = generate_latest(registry).decode()
    current = [line for line in text.splitlines() if line.startswith("testbed_sweep_current_configuration{")]
    assert len(current) == 1 and 'profile="b"' in current[0] and 'split="1"' in current[0]
    m.finished()
    assert value(registry, "testbed_sweep_running") == 0
    assert value(registry, "testbed_sweep_eta_seconds") == 0
    # the overview keeps saying where the run stopped
    assert value(registry, "testbed_sweep_current_configuration", split="1", profile="b") == 1


def test_link_parameters_in_base_units(rec):
    registry, m = rec
    m.set_link("uplink", "5g", 25_000_000, 0.04, 0.5, jitter_s=0.005, emulation="htb+netem")
    m.set_link("downlink", "5g", None, None, None, emulation="none")
    up = {"profile": "5g", "direction": "uplink"}
    assert value(registry, "testbed_link_configured_rate_bytes_per_second", **up) == 3_125_000
    assert value(registry, "testbed_link_configured_delay_seconds", **up) == 0.04
    assert value(registry, "testbed_link_configured_jitter_seconds", **up) == 0.005
    assert value(registry, "testbed_link_configured_loss_ratio", **up) == pytest.approx(0.005)
    assert value(registry, "testbed_link_emulation_info", **up, emulation="htb+netem") == 1
    down = {"profile": "5g", "direction": "downlink"}
    assert value(registry, "testbed_link_configured_rate_bytes_per_second", **down) is None
    assert value(registry, "testbed_link_configured_delay_seconds", **down) == 0
    with pytest.raises(TestbedError, match="uplink or downlink"):
        m.set_link("sideways", "5g", 1, 0, 0)


def test_parts_layers_and_delivery(rec):
    registry, m = rec
    kpis = {"init_s": 0.01, "first_s": 0.02, "warmup_mean_s": 0.015, "steady_mean_s": 0.012,
            "steady_std_s": 0.001, "init_memory_bytes": 5 << 20, "peak_memory_bytes": 9 << 20, "kpi_profile": "p"}
    m.set_part("local", "head", 7, kpis, file_bytes=123_456)
    part = {"split": "7", "node": "local", "part": "head"}
    assert value(registry, "testbed_part_file_bytes", split="7", part="head") == 123_456
    assert value(registry, "testbed_part_peak_memory_bytes", **part) == 9 << 20
    assert value(registry, "testbed_part_init_memory_bytes", **part) == 5 << 20
    assert value(registry, "testbed_part_first_inference_seconds", **part) == 0.02
    assert value(registry, "testbed_part_steady_stddev_seconds", **part) == 0.001
    m.set_layers("remote", [{"node": "remote", "layer": 0, "op": "CONV_2D", "output_bytes": 1000, "params": 864,
                             "macs": 10_000, "mean_s": 0.001, "p50_s": 0.0009, "p90_s": 0.002, "std_s": 0.0003},
                            {"layer": 1, "mean_s": 0.004, "p50_s": None}])
    assert value(registry, "testbed_layer_latency_mean_seconds", node="remote", layer="0") == 0.001
    assert value(registry, "testbed_layer_latency_p90_seconds", node="remote", layer="0") == 0.002
    assert value(registry, "testbed_layer_latency_stddev_seconds", node="remote", layer="0") == 0.0003
    assert value(registry, "testbed_layer_latency_p50_seconds", node="remote", layer="1") is None
    assert value(registry, "testbed_layer_output_bytes", layer="0") == 1000
    assert value(registry, "testbed_layer_macs", layer="0") == 10_000
    m.observe_delivery(7, "p", 0.8, size_bytes=100_000)
    assert value(registry, "testbed_model_delivery_seconds", split="7", profile="p") == 0.8
    assert value(registry, "testbed_link_transferred_bytes_total", split="7", profile="p",
                 direction="downlink") == 100_000


def test_registry_is_the_one_passed_in():
    from prometheus_client import REGISTRY

    registry = CollectorRegistry()
    SweepMetrics(registry, "e", "r").observe_sample(1, "p", {"e2e_s": 0.1})
    assert registry.get_sample_value("testbed_e2e_seconds_count",
                                     {"experiment": "e", "run": "r", "split": "1", "profile": "p"}) == 1
    assert REGISTRY.get_sample_value("testbed_e2e_seconds_count",
                                     {"experiment": "e", "run": "r", "split": "1", "profile": "p"}) is None


def test_no_label_grows_with_samples(rec):
    registry, m = rec
    m.configuration_started(3, "p", total=1, done=0)
    before = len(generate_latest(registry).splitlines())
    for i in range(50):
        m.observe_sample(3, "p", _sample(0.01 + i * 1e-4))
    m.observe_sample(3, "p", _sample(0.5))
    after = len(generate_latest(registry).splitlines())
    assert after > before  # series appear with the first sample...
    for _ in range(50):
        m.observe_sample(3, "p", _sample(0.02))
    assert len(generate_latest(registry).splitlines()) == after  # ...and not with every sample


def test_buckets_are_sorted_and_span_submillisecond_to_minutes():
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert LATENCY_BUCKETS[0] <= 1e-4 and LATENCY_BUCKETS[-1] >= 60
    ratios = [b / a for a, b in zip(LATENCY_BUCKETS, LATENCY_BUCKETS[1:])]
    assert max(ratios) <= 1.7


def test_serve_exposes_the_registry_and_closes(rec):
    registry, m = rec
    m.observe_sample(2, "p", _sample(0.03))
    server = serve(registry, "127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(server.url, timeout=5).read().decode()
    finally:
        server.close()
    assert 'testbed_e2e_seconds_count{experiment="smoke",profile="p",run="r1",split="2"} 1.0' in text
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_serve_on_a_busy_port_is_one_clear_error(rec):
    registry, _ = rec
    with serve(registry, "127.0.0.1", 0) as first:
        with pytest.raises(TestbedError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            serve(registry, "127.0.0.1", first.port)


@pytest.mark.parametrize("text, expected", [("127.0.0.1:9400", ("127.0.0.1", 9400)), (":0", ("127.0.0.1", 0)),
                                            ("[::1]:9500", ("::1", 9500)), ("localhost", ("localhost", 9400))])
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


def test_parse_listen_refuses_garbage():
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("127.0.0.1:http")


def test_exposition_passes_promtool_check_metrics(rec):
    """promtool ships with Debian's prometheus package (scripts/setup.sh installs it)."""
    assert shutil.which("promtool"), "promtool missing: run bash scripts/setup.sh test"
    registry, m = rec
    m.configuration_started(3, "p", total=1, done=0)
    m.observe_sample(3, "p", _sample(0.03))
    m.set_link("uplink", "p", 1e6, 0.01, 0)
    m.set_part("local", "head", 3, {"peak_memory_bytes": 1, "init_s": 0.1}, file_bytes=10)
    m.set_layers("local", [{"layer": 0, "mean_s": 0.001, "output_bytes": 4, "params": 1, "macs": 2}])
    m.observe_delivery(3, "p", 0.1, size_bytes=10)
    m.configuration_done(3, "p")
    done = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry),
                          capture_output=True)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def test_pushgateway_first_failure_is_an_error_later_ones_are_counted(monkeypatch):
    """The first push goes to a closed port (real failure); then push_to_gateway is
    replaced to succeed and fail on demand. Real pushes: tests/integration."""
    import testbed.metrics.exposition as metrics

    registry = CollectorRegistry()
    m = SweepMetrics(registry, "smoke", "r1", pushgateway="http://127.0.0.1:9")
    port_closed = "http://127.0.0.1:9"  # discard port: nothing listens
    m.observe_sample(1, "p", {"e2e_s": 0.1})
    with pytest.raises(TestbedError, match=f"pushgateway {port_closed}: push failed"):
        m.configuration_done(1, "p")
    pushed = []
    monkeypatch.setattr(metrics, "push_to_gateway", lambda gw, **kw: pushed.append((gw, kw)))
    m.configuration_done(2, "p")
    (gateway, kwargs), = pushed
    assert kwargs["job"] == "testbed-summary"
    assert kwargs["grouping_key"] == {"run": "r1", "split": "2", "profile": "p"}
    assert kwargs["registry"] is not registry  # its own small registry
    monkeypatch.setattr(metrics, "push_to_gateway", lambda gw, **kw: (_ for _ in ()).throw(OSError("refused")))
    m.configuration_done(3, "p")  # no raise once pushing has worked
    assert value(registry, "testbed_pushgateway_failures_total") == 1 and "refused" in m.last_push_error


def test_wait_for_scrape_returns_after_a_fresh_scrape(rec):
    import threading
    import time

    registry, _ = rec
    with serve(registry, "127.0.0.1", 0) as server:
        t0 = time.monotonic()
        assert server.wait_for_scrape() is False and time.monotonic() - t0 < 0.5  # nobody scrapes: no wait
        stop = threading.Event()

        def scraper():  # a scraper every 0.2 s, like Prometheus at a short interval
            while not stop.is_set():
                urllib.request.urlopen(server.url, timeout=5).read()
                stop.wait(0.2)

        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            deadline = time.monotonic() + 5
            while server.scrapes < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            before = server.scrapes
            assert server.wait_for_scrape(timeout=5) is True
            assert server.scrapes >= min(before + 1, 8)
        finally:
            stop.set()
            thread.join()
        assert server.wait_for_scrape(timeout=0.3) is False  # the scraper stopped: times out
