"""The agent's listeners (nodes.serving) and lease bookkeeping (nodes.lease), in-process.

Real loopback sockets and real servers, no agent: caps, the total accept deadline
against a trickling peer, refusal then lingering close, rate-limited refusal logs.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from nodes import serving
from nodes.lease import Lease

pytestmark = pytest.mark.unit


class _Server:
    """A guarded TCP server whose handler reads until EOF; authenticates on b"A"."""

    def __init__(self, limits: serving.Limits, refusal: bytes = b"BUSY"):
        self.served = 0

        def handle(sock: socket.socket, conn: serving.Conn) -> None:
            self.served += 1
            while True:
                got = sock.recv(1)
                if not got:
                    return
                if got == b"A":
                    conn.authenticated()

        self.server = serving.TCPServer(("127.0.0.1", 0), handle, limits, "test", refusal)
        self.address = self.server.server_address
        serving.start(self.server)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=5)

    def wait_open(self, total: int, timeout: float = 5.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while (got := self.server.open_connections())[0] != total and time.monotonic() < deadline:
            time.sleep(0.02)
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_server():
    made = []

    def make(*a, **kw):
        made.append(_Server(*a, **kw))
        return made[-1]
    yield make
    for s in made:
        s.close()


def _refused(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(100):
        data += chunk
    return data


def test_backlog_is_not_the_stdlib_five():
    assert serving.TCPServer.request_queue_size == serving.LISTEN_BACKLOG >= 512


def test_unauthenticated_connections_are_capped_oldest_evicted(make_server):
    """Past the cap on strangers the oldest one is cut: a flood of idle connections
    evicts itself and never locks a real client out."""
    srv = make_server(serving.Limits(max_conns=10, max_preauth=2, preauth_s=30))
    held = [srv.connect() for _ in range(2)]
    assert srv.wait_open(2) == (2, 2)
    third = srv.connect()  # evicts held[0], the oldest
    assert _refused(held[0]) == b""  # EOF: its wait was cut
    assert srv.wait_open(2) == (2, 2)
    third.sendall(b"A")  # the newcomer can still authenticate
    deadline = time.monotonic() + 5
    while srv.server.open_connections() != (2, 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.server.open_connections() == (2, 1)
    flood = [srv.connect() for _ in range(20)]
    time.sleep(0.3)
    assert srv.server.open_connections()[1] <= 2 + 1  # the cap (+ one being cut)
    assert srv.server.open_connections()[0] <= 4
    for s in held + flood + [third]:
        s.close()
    assert srv.wait_open(0) == (0, 0)


def test_total_cap_counts_authenticated_connections_too(make_server):
    srv = make_server(serving.Limits(max_conns=2, max_preauth=2, preauth_s=30))
    held = [srv.connect() for _ in range(2)]
    for s in held:
        s.sendall(b"A")
    assert srv.wait_open(2) == (2, 0) or srv.server.open_connections()[0] == 2
    with srv.connect() as extra:
        assert _refused(extra) == b"BUSY"
    for s in held:
        s.close()


def test_a_trickling_peer_is_cut_at_the_total_deadline(make_server):
    """One byte every 50 ms never trips a per-read timeout; the total deadline cuts it."""
    srv = make_server(serving.Limits(max_conns=4, max_preauth=4, preauth_s=0.5))
    with srv.connect() as s:
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 5:
                s.sendall(b".")
                time.sleep(0.05)
        except OSError:
            pass  # reset by the server's close
        assert srv.wait_open(0) == (0, 0)
        assert time.monotonic() - t0 < 3


def test_an_authenticated_peer_has_no_accept_deadline(make_server):
    srv = make_server(serving.Limits(max_conns=4, max_preauth=4, preauth_s=0.3))
    with srv.connect() as s:
        s.sendall(b"A")
        time.sleep(1.0)
        assert srv.server.open_connections() == (1, 0)


def test_linger_close_lets_the_peer_read_the_refusal():
    """Closing with unread input sends RST: the peer may lose the refusal still in
    flight, and sees a reset. After a lingering close it reads the refusal, then EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: dict = {}

    def server():
        conn, _ = listener.accept()
        conn.recv(16)  # the "header"; the rest (a big payload) is never read
        conn.sendall(b"REFUSED")
        serving.linger_close(conn)
        got["done"] = True

    t = threading.Thread(target=server)
    t.start()
    with socket.create_connection(listener.getsockname(), timeout=5) as c:
        c.sendall(b"H" * 16 + b"x" * (256 << 10))
        t.join(5)
        assert _refused(c) == b"REFUSED"
    listener.close()
    assert got["done"]


def test_metrics_server_cuts_a_slow_client_and_answers_the_next(make_server):
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
    reg = CollectorRegistry()
    Counter("hello", "x", registry=reg).inc()
    srv = serving.MetricsServer(("127.0.0.1", 0), make_wsgi_app(reg),
                                serving.Limits(max_conns=3, max_preauth=2, preauth_s=0.5))
    serving.start(srv)
    try:
        host, port = srv.server_address[:2]
        slow = [socket.create_connection((host, port), timeout=5) for _ in range(2)]
        for s in slow:
            s.sendall(b"GET /metrics HTTP/1.0\r\n")  # and never the end of the headers
        # a scrape while both slots are taken by slow clients: the oldest is evicted
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
        assert b"hello_total 1.0" in text
        time.sleep(1.0)  # past the deadline: the other slow one was cut too
        assert srv.open_connections() == (0, 0)
        for s in slow:
            assert _refused(s) == b""  # cut, never answered
            s.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_refusal_log_is_rate_limited(caplog):
    logger = logging.getLogger("test.serving")
    rl = serving.RateLimitedLog(logger, burst=3, window_s=0.2)
    with caplog.at_level(logging.WARNING, logger="test.serving"):
        for i in range(50):
            rl.warning("refused %d", i)
        time.sleep(0.25)
        rl.warning("refused late")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused 0", "refused 1", "refused 2"]
    assert "47 more refusals" in lines[3] and lines[4] == "refused late"
    assert len(lines) == 5


def test_lease_expires_only_after_grace_without_holders():
    now = [100.0]
    lease = Lease(5.0, clock=lambda: now[0])
    now[0] += 4.9
    assert not lease.expired()
    now[0] += 0.2
    assert lease.expired()  # never taken within the grace since start
    lease.take()
    now[0] += 1000
    assert not lease.expired()  # held: no expiry however long
    lease.take()
    lease.drop()
    now[0] += 1000
    assert not lease.expired()  # one holder left
    lease.drop()
    now[0] += 4.9
    assert not lease.expired()
    now[0] += 0.2
    assert lease.expired()
    lease.take()
    assert not lease.expired()


def test_lease_disabled_and_bad_grace():
    assert not Lease(None).expired()
    for bad in (0, -1):
        with pytest.raises(ValueError):
            Lease(bad)
