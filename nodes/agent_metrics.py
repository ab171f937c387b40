"""The agent's own /metrics: process health and what it served.

Exposed on the node's metrics address (control side, never the shaped link):

* ``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``
  (prometheus_client's ProcessCollector, read from /proc/self), and
* ``testbed_agent_info{node}`` (always 1),
* ``testbed_agent_samples_served_total{node,role}`` — samples this node completed
  (``role`` = ``local`` or ``remote``; warm-up samples included),
* ``testbed_agent_inference_seconds{node,part}`` — histogram of head / tail invokes.

The registry is passed in (never the global default) so tests build their own and read
values with ``get_sample_value``. The orchestrator's sweep metrics live in
``testbed.metrics``; this module only covers the agent process. The HTTP listener is
``nodes.serving.MetricsServer`` (prometheus_client's WSGI app behind a connection cap
and a per-connection deadline, so an idle or trickling client cannot pin threads).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app

from nodes import serving

#: Scrapers served at once, and how long one connection may take in all.
METRICS_LIMITS = serving.Limits(max_conns=16, max_preauth=8, preauth_s=10.0)

# 0.5 ms .. 20 s: PoseNet parts run from well under a millisecond (one layer) to
# seconds (the whole model on one throttled CPU).
INFERENCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 20.0)


class AgentMetrics:
    """Metric objects of one agent, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.node = node
        ProcessCollector(registry=registry)
        info = Gauge("testbed_agent_info", "Always 1; carries the node name.", ["node"],
                     registry=registry)
        info.labels(node=node).set(1)
        self._samples = Counter("testbed_agent_samples_served", "Samples this node completed.",
                                ["node", "role"], registry=registry)
        self._inference = Histogram("testbed_agent_inference_seconds",
                                    "Invoke time of a loaded part on this node.",
                                    ["node", "part"], buckets=INFERENCE_BUCKETS,
                                    registry=registry)

    def sample_served(self, role: str) -> None:
        self._samples.labels(node=self.node, role=role).inc()

    def inference(self, part: str, seconds: float) -> None:
        self._inference.labels(node=self.node, part=part).observe(seconds)


def serve(registry: CollectorRegistry, host: str, port: int,
          limits: serving.Limits = METRICS_LIMITS) -> Any:
    """Start the /metrics HTTP server in a daemon thread; returns the server (has
    ``.shutdown()``, ``.server_close()`` and ``.server_port``)."""
    server = serving.MetricsServer((host, port), make_wsgi_app(registry), limits)
    serving.start(server)
    return server
