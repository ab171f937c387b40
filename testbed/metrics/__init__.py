"""Live metrics: what the orchestrator exposes to Prometheus, the monitoring stack, the dashboards."""

from testbed.metrics.recording import LATENCY_BUCKETS, SweepMetrics, parse_listen, serve

__all__ = ["LATENCY_BUCKETS", "SweepMetrics", "parse_listen", "serve"]
