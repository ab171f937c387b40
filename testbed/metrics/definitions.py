"""Every metric the orchestrator exposes: names, help texts, labels, buckets.

Kept apart from the recorder (``recording``) so the list of names reads in one
place: the Grafana dashboards and tests/unit/test_metrics.py follow it.
Conventions: the registry is always passed in (nothing here touches the global
default); base units in names (``_seconds``, ``_bytes``, ``_ratio``), ``_total``
only on counters; link rates in bytes per second (dashboards ×8 for bit/s);
bounded labels only: ``experiment``, ``run`` on every series, then ``split``,
``profile``, ``node``, ``part``, ``layer``, ``direction``, ``phase`` where they
mean something, never a per-sample label. ``split`` and ``layer`` values are
plain decimal integers, the same numbers as in the CSV files.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets, 0.1 ms .. 100 s, 6 per decade. A sweep spans sub-millisecond
# layer-sized heads on the edge node up to whole images crossing a 1 Mbit/s link
# (several seconds); histogram_quantile interpolates inside a bucket, so the
# bucket ratio (at most 1.5) bounds its error on p50/p90.
_STEPS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(step * 10.0 ** exp, 10) for exp in range(-4, 2) for step in _STEPS) + (100.0,)

BASE_LABELS = ("experiment", "run")
# Job of pushed summaries. Prometheus scrapes the Pushgateway with honor_labels,
# so this job name (not "pushgateway") is what the series carry; it keeps them
# apart from the live series of job "testbed".
PUSH_JOB = "testbed-summary"
DIRECTIONS = ("uplink", "downlink")

# Per-sample timing keys (AgentClient.run / samples.csv) and where each stage ran.
# (key, node, direction): encode/decode happen on the sending/receiving side of a direction.
_CODEC_KEYS = (
    ("encode_s", "local", "uplink"),
    ("remote_decode_s", "remote", "uplink"),
    ("remote_encode_s", "remote", "downlink"),
    ("decode_s", "local", "downlink"),
)



class Definitions:
    """Every orchestrator metric, registered on one registry.

    Kept apart from ``SweepMetrics`` so the list of names reads in one place
    (the dashboards and tests/unit/test_metrics.py follow it).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        b = BASE_LABELS
        cfg = b + ("split", "profile")

        def hist(name: str, doc: str, labels: tuple[str, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS)

        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            # prometheus_client appends _total itself; pass the name without it.
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        # --- per-sample timings (histograms) ---
        self.e2e = hist("testbed_e2e_seconds",
                        "End-to-end latency per sample: start of head to final output available locally.", cfg)
        self.inference = hist("testbed_inference_seconds",
                              "Invoke time of a model part on a node, per sample (head on local, tail on remote).",
                              cfg + ("node", "part"))
        self.transfer = hist("testbed_transfer_seconds",
                             "Time on the shaped link per sample: first byte out to last byte in, per direction.",
                             cfg + ("direction",))
        self.codec = hist("testbed_codec_seconds",
                          "Encode (sending node) or decode (receiving node) of the data crossing the link.",
                          cfg + ("node", "direction"))
        # --- intermediate data ---
        self.cut_raw = gauge("testbed_intermediate_raw_bytes",
                             "Bytes of the cut tensors before the codec (last sample of the split).", b + ("split",))
        self.cut_wire = gauge("testbed_intermediate_wire_bytes",
                              "Bytes of the cut tensors on the wire after the codec (last sample of the split).",
                              b + ("split",))
        # --- achieved link: bytes and busy time of transfers whose size is known ---
        self.link_bytes = counter("testbed_link_transferred_bytes_total",
                                  "Payload bytes carried over the shaped link (samples and model delivery).",
                                  cfg + ("direction",))
        self.link_busy = counter("testbed_link_busy_seconds_total",
                                 "Seconds spent carrying testbed_link_transferred_bytes_total (sum of transfer times).",
                                 cfg + ("direction",))
        self.link_transfers = counter("testbed_link_transfers_total",
                                      "Transfers counted in testbed_link_transferred_bytes_total.",
                                      cfg + ("direction",))
        # --- configured link ---
        link = b + ("profile", "direction")
        self.link_rate = gauge("testbed_link_configured_rate_bytes_per_second",
                               "Configured rate of the direction's shaper (bytes/s; x8 for bit/s).", link)
        self.link_delay = gauge("testbed_link_configured_delay_seconds",
                                "Configured one-way delay added by the direction's shaper.", link)
        self.link_jitter = gauge("testbed_link_configured_jitter_seconds",
                                 "Configured delay jitter of the direction's shaper.", link)
        self.link_loss = gauge("testbed_link_configured_loss_ratio",
                               "Configured packet loss of the direction's shaper (0..1).", link)
        self.link_emulation = gauge("testbed_link_emulation_info",
                                    "How the direction is emulated (tbf, htb, netem, htb+netem, none); value 1.",
                                    link + ("emulation",))
        # --- model delivery ---
        self.delivery = gauge("testbed_model_delivery_seconds",
                              "Time to deliver the head part from the remote to the local node over the shaped downlink.",
                              cfg)
        self.delivery_bytes = gauge("testbed_model_delivery_bytes", "Bytes of the delivered head part.", cfg)
        # --- parts: file sizes and benchmark KPIs (fresh process per part per node) ---
        part = b + ("split", "node", "part")
        self.part_file = gauge("testbed_part_file_bytes", "Size of the part's .tflite file.", b + ("split", "part"))
        self.part_init_mem = gauge("testbed_part_init_memory_bytes",
                                   "Memory after loading the part (benchmark_model 'init memory').", part)
        self.part_peak_mem = gauge("testbed_part_peak_memory_bytes",
                                   "Peak memory while running the part (benchmark_model 'peak memory').", part)
        self.part_init = gauge("testbed_part_init_seconds", "Interpreter creation + allocation time of the part.", part)
        self.part_first = gauge("testbed_part_first_inference_seconds", "First inference of the part.", part)
        self.part_warmup = gauge("testbed_part_warmup_mean_seconds", "Mean of the part's warm-up inferences.", part)
        self.part_steady = gauge("testbed_part_steady_mean_seconds", "Steady-state mean inference of the part.", part)
        self.part_steady_std = gauge("testbed_part_steady_stddev_seconds",
                                     "Steady-state standard deviation of the part's inference.", part)
        # --- per layer per node (summary gauges from the profiler) ---
        layer = b + ("node", "layer")
        self.layer_mean = gauge("testbed_layer_latency_mean_seconds", "Mean latency of the layer on the node.", layer)
        self.layer_p50 = gauge("testbed_layer_latency_p50_seconds", "Median latency of the layer on the node.", layer)
        self.layer_p90 = gauge("testbed_layer_latency_p90_seconds", "90th percentile latency of the layer.", layer)
        self.layer_std = gauge("testbed_layer_latency_stddev_seconds", "Standard deviation of the layer's latency.",
                               layer)
        self.layer_out = gauge("testbed_layer_output_bytes", "Bytes of the layer's output tensors.", b + ("layer",))
        self.layer_params = gauge("testbed_layer_params", "Parameter count of the layer.", b + ("layer",))
        self.layer_macs = gauge("testbed_layer_macs", "Multiply-accumulate operations of the layer.", b + ("layer",))
        # --- per configuration summary (exact, from the samples; also what is pushed) ---
        self.cfg_samples = gauge("testbed_configuration_samples", "Samples measured in the configuration.", cfg)
        self.cfg_mean = gauge("testbed_configuration_e2e_mean_seconds", "Mean e2e of the configuration.", cfg)
        self.cfg_p50 = gauge("testbed_configuration_e2e_p50_seconds", "Median e2e of the configuration.", cfg)
        self.cfg_p90 = gauge("testbed_configuration_e2e_p90_seconds", "90th percentile e2e of the configuration.", cfg)
        self.best_split = gauge("testbed_best_split",
                                "Split point with the lowest median e2e among the profile's finished configurations.",
                                b + ("profile",))
        self.best_e2e = gauge("testbed_best_split_e2e_p50_seconds", "Median e2e of testbed_best_split.",
                              b + ("profile",))
        # --- sweep progress ---
        self.planned = gauge("testbed_sweep_configurations_planned", "Configurations in the sweep.", b)
        self.completed = gauge("testbed_sweep_configurations_completed",
                               "Configurations finished (including those skipped by --resume).", b)
        self.current = gauge("testbed_sweep_current_configuration",
                             "The configuration being measured (value 1; exactly one series while running).", cfg)
        self.current_split = gauge("testbed_sweep_current_split", "Split point being measured.", b)
        self.eta = gauge("testbed_sweep_eta_seconds", "Estimated seconds until the sweep finishes.", b)
        self.started = gauge("testbed_sweep_start_time_seconds", "Unix time the sweep started.", b)
        self.running = gauge("testbed_sweep_running", "1 while the sweep runs, 0 once it finished.", b)
        self.phase = counter("testbed_sweep_phase_seconds_total",
                             "Wall time of the sweep by phase (link, tail_load, delivery, head_load, kpi, warmup, "
                             "sampling, write, other); the phases of a configuration add up to its wall time.",
                             b + ("profile", "phase"))
        self.failed = counter("testbed_configurations_failed_total",
                              "Configurations that could not be measured (a node died, hung or refused), by the "
                              "node that died (none: it still ran).", b + ("profile", "node"))
        self.push_failures = counter("testbed_pushgateway_failures_total",
                                     "Configuration summaries the Pushgateway did not accept (after the first).", b)


@dataclass(frozen=True)
class ConfigurationSummary:
    """What ``configuration_done`` computed from the samples it saw."""

    split: int
    profile: str
    samples: int
    e2e_mean_s: float | None
    e2e_p50_s: float | None
    e2e_p90_s: float | None
