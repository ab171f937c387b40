"""Getting metrics out: the ``/metrics`` HTTP server and the Pushgateway push.

Owns serving a registry over HTTP (a threaded WSGI server that counts scrapes,
so a short run can wait for one last scrape before it ends) and pushing one
configuration's summary to a Pushgateway for setups where nothing can scrape
the host. What is recorded is ``recording``'s.
"""

from __future__ import annotations

import math
import socket
import statistics
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.exposition import push_to_gateway

from nodes.addresses import parse_host_port
from testbed.errors import TestbedError
from testbed.metrics.definitions import PUSH_JOB, ConfigurationSummary


def push_summary(gateway: str, experiment: str, run: str, summary: ConfigurationSummary,
                 *, timeout: float = 10.0) -> None:
    """Push one configuration's summary to a Pushgateway.

    Uses its own small registry (never the run's, never the global default) and
    the grouping key run/split/profile, so each configuration is its own group
    and later pushes do not replace earlier ones.

    Raises:
        TestbedError: the gateway did not accept the push.
    """
    registry = CollectorRegistry()
    labels = ("experiment",)
    values = {
        "testbed_configuration_samples": ("Samples measured in the configuration.", summary.samples),
        "testbed_configuration_e2e_mean_seconds": ("Mean e2e of the configuration.", summary.e2e_mean_s),
        "testbed_configuration_e2e_p50_seconds": ("Median e2e of the configuration.", summary.e2e_p50_s),
        "testbed_configuration_e2e_p90_seconds": ("90th percentile e2e of the configuration.", summary.e2e_p90_s),
    }
    for name, (doc, value) in values.items():
        if value is not None:
            Gauge(name, doc, labels, registry=registry).labels(experiment=experiment).set(value)
    try:
        push_to_gateway(gateway, job=PUSH_JOB, registry=registry, timeout=timeout,
                        grouping_key={"run": run, "split": str(summary.split), "profile": summary.profile})
    except OSError as e:  # URLError is an OSError
        raise TestbedError(f"pushgateway {gateway}: push failed: {e}") from e


class _ScrapeLog:
    """When scrapes of /metrics started and finished (for ``wait_for_scrape``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.starts: list[float] = []          # monotonic start times of completed scrapes (last few)
        self.last_completed_start = -math.inf

    def wrap(self, app):
        def tracked(environ, start_response):
            started = time.monotonic()
            body = app(environ, start_response)
            if environ.get("PATH_INFO", "/") in ("/", "/metrics"):
                with self._cond:
                    self.starts = (self.starts + [started])[-8:]
                    self.last_completed_start = max(self.last_completed_start, started)
                    self._cond.notify_all()
            return body
        return tracked

    def wait_after(self, t0: float, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.last_completed_start > t0, timeout)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Scrapes every second would flood the sweep's console."""


class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it and frees the port."""

    def __init__(self, httpd, thread: threading.Thread, scrapes: _ScrapeLog) -> None:
        self._httpd, self._thread, self._scrapes = httpd, thread, scrapes
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def scrapes(self) -> int:
        """Scrapes seen recently (at most 8 remembered); 0 = nobody scrapes this endpoint."""
        return len(self._scrapes.starts)

    def wait_for_scrape(self, timeout: float | None = None) -> bool:
        """Block until a scrape that started after this call has been answered.

        Call it once the last values are recorded and before the scraper is told
        to stop (targets removed) or the server closes: otherwise the final state
        of a run (its last configuration) never reaches Prometheus. Returns at
        once (False) when nothing has scraped this endpoint. The default timeout
        is twice the observed scrape interval (at least 2 s, at most 30 s).
        """
        starts = self._scrapes.starts
        if not starts:
            return False
        if timeout is None:
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            interval = statistics.median(gaps) if gaps else 5.0
            timeout = min(30.0, max(2.0, 2 * interval + 0.5))
        return self._scrapes.wait_after(time.monotonic(), timeout)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9400) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port=0`` picks a free port (read it back from ``.port``). The server notes
    when it is scraped, so a sweep can wait for a final scrape before it ends
    (``MetricsServer.wait_for_scrape``).

    Raises:
        TestbedError: the address cannot be bound (in use, not local).
    """
    scrapes = _ScrapeLog()
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class _Server(ThreadingMixIn, WSGIServer):
            address_family = family
            daemon_threads = True

        httpd = make_server(host, port, scrapes.wrap(make_wsgi_app(registry)), _Server, handler_class=_QuietHandler)
    except OSError as e:
        raise TestbedError(f"metrics: cannot listen on {host}:{port}: {e.strerror or e}") from e
    thread = threading.Thread(target=httpd.serve_forever, name=f"metrics {host}:{port}", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread, scrapes)




def parse_listen(text: str, default_port: int = 9400) -> tuple[str, int]:
    """``"127.0.0.1:9400"`` / ``":9400"`` / ``"[::1]:9400"`` / ``"host"`` -> (host, port).

    Raises:
        ValueError: not host:port with a port in 0..65535.
    """
    return parse_host_port(text, default_port=default_port)
