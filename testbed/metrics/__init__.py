"""Live metrics: what the orchestrator exposes to Prometheus, the monitoring stack, the dashboards.

``definitions`` (every name), ``recording`` (``SweepMetrics``, what the sweep
calls), ``exposition`` (``serve``, the Pushgateway push), ``monitor`` (a
Prometheus for the testbed), ``dashboards`` (the Grafana dashboards).
"""

from testbed.metrics.definitions import LATENCY_BUCKETS
from testbed.metrics.exposition import MetricsServer, parse_listen, serve
from testbed.metrics.recording import SweepMetrics

__all__ = ["LATENCY_BUCKETS", "MetricsServer", "SweepMetrics", "parse_listen", "serve"]
