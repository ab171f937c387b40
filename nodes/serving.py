"""The agent's listeners: how many connections, and for how long, before anything is trusted.

Owns accepting TCP connections for the agent's three ports: the listen backlog, a cap
on connections per port (all of them, and those not yet authenticated: past that cap
the oldest unauthenticated one is cut to make room), a total deadline from accept
until the handler says the peer authenticated, the refusal of a connection over the
total cap, and rate-limited logging of refusals. One thread per
connection, as before — the caps are what bound the threads and fds.

It knows nothing of frames, tokens or HTTP: a handler receives ``(sock, Conn)`` and
calls ``Conn.authenticated()`` once the peer proved itself; the control and data
conversations are ``nodes.agent`` / ``nodes.pipeline``; /metrics is served by
``MetricsServer`` here with prometheus_client's WSGI app.

Why a total deadline and not a socket timeout: a peer that trickles one byte every few
seconds ("slowloris") never trips a per-read timeout, and would hold its thread and fd
for ever. The server's poll loop (``service_actions``, every ``POLL_S``) shuts down the
sockets of connections past their deadline, which wakes their blocked reads with EOF.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger("nodes.agent")

#: Pending connections the kernel queues per port (capped by net.core.somaxconn).
#: The stdlib default of 5 made 42 of 300 simultaneous connects wait for a SYN
#: retransmit (1 s and more); 128 still did for a burst of 300. A queued connection
#: costs the kernel a little memory and the agent nothing until it is accepted and
#: counted against the caps.
LISTEN_BACKLOG = 1024
#: How often the accept loop looks for connections past their deadline.
POLL_S = 0.1


@dataclass(frozen=True)
class Limits:
    """Per-port bounds. ``preauth_s`` runs from accept until ``Conn.authenticated()``."""

    max_conns: int
    max_preauth: int
    preauth_s: float


class Conn:
    """Bookkeeping of one accepted connection (shared with the poll loop)."""

    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock, self.peer = sock, peer
        self.deadline: float | None = deadline
        self.is_authenticated = False
        self.timed_out = False

    def authenticated(self) -> None:
        """The peer proved itself: no accept deadline any more, and it no longer
        counts against the pre-authentication cap."""
        self.is_authenticated = True
        self.deadline = None


class RateLimitedLog:
    """At most ``burst`` warnings per ``window_s``; then one line saying how many were
    dropped. A hostile peer must not be able to fill the node's log (a file in the
    netns backend, Docker's log on the host disk) by sending garbage."""

    def __init__(self, logger: logging.Logger, burst: int = 20, window_s: float = 10.0) -> None:
        self.logger, self.burst, self.window_s = logger, burst, window_s
        self._lock = threading.Lock()
        self._start, self._count, self._dropped = time.monotonic(), 0, 0

    def warning(self, msg: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start > self.window_s:
                if self._dropped:
                    self.logger.warning("%d more refusals in the last %.0f s not logged",
                                        self._dropped, now - self._start)
                self._start, self._count, self._dropped = now, 0, 0
            self._count += 1
            if self._count > self.burst:
                self._dropped += 1
                return
        self.logger.warning(msg, *args)


def peer_name(sock: socket.socket) -> str:
    try:
        return "%s:%s" % sock.getpeername()[:2]
    except OSError:
        return "?"


def linger_close(sock: socket.socket, budget_bytes: int = 1 << 20, budget_s: float = 0.5) -> None:
    """Close after a refusal so the peer reads the refusal instead of a reset.

    Closing a socket with unread input makes Linux send RST, which can discard the
    error frame just sent. So: FIN first, then read and drop what the peer still
    sends, within a small budget (never its whole declared payload), then close.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(budget_s)
        deadline = time.monotonic() + budget_s
        while budget_bytes > 0 and time.monotonic() < deadline:
            got = sock.recv(min(65536, budget_bytes))
            if not got:
                break
            budget_bytes -= len(got)
    except OSError:
        pass
    finally:
        sock.close()


class GuardedMixin:
    """Thread-per-connection accepting with caps and accept deadlines (see module doc).

    Mixed into a ``socketserver.TCPServer``; subclasses implement
    ``serve_connection(conn, client_address)``.
    """

    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True
    limits: Limits
    refusal: bytes = b""  # sent, best effort, to a connection over a cap

    def _init_guard(self, limits: Limits, name: str) -> None:
        self.limits, self.name = limits, name
        self._conns: set[Conn] = set()
        self._guard_lock = threading.Lock()
        self.refusals = RateLimitedLog(log)

    def open_connections(self) -> tuple[int, int]:
        """(all, not yet authenticated) connections being served now."""
        with self._guard_lock:
            return len(self._conns), sum(not c.is_authenticated for c in self._conns)

    def _admit(self, sock: socket.socket) -> Conn | None:
        """Book a new connection, or None when the port is full.

        When the cap on unauthenticated connections is reached, the oldest of them is
        cut to make room instead of refusing the newcomer: a legitimate peer
        authenticates within milliseconds of connecting, so a flood of idle strangers
        only ever evicts itself, and never locks the orchestrator out for
        ``preauth_s``. The cap on all connections is a plain refusal.
        """
        with self._guard_lock:
            if len(self._conns) >= self.limits.max_conns:
                return None
            waiting = [c for c in self._conns if not c.is_authenticated and not c.timed_out]
            if len(waiting) >= self.limits.max_preauth:
                self._cut(min(waiting, key=lambda c: c.deadline or 0.0))
            conn = Conn(sock, peer_name(sock), time.monotonic() + self.limits.preauth_s)
            self._conns.add(conn)
            return conn

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        conn = self._admit(request)
        if conn is None:
            self.refusals.warning("%s: refused a connection from %s: %d open (the cap)",
                                  self.name, peer_name(request), self.limits.max_conns)
            self._refuse(request)
            return
        threading.Thread(target=self._serve, args=(conn, client_address), daemon=True,
                         name=f"{self.name} {conn.peer}").start()

    @staticmethod
    def _cut(conn: Conn) -> None:
        """End a connection's wait: its blocked read returns EOF, its thread ends."""
        conn.timed_out, conn.deadline = True, None
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _refuse(self, sock: socket.socket) -> None:
        # In the accept loop itself: no thread for a connection we will not serve.
        try:
            sock.setblocking(False)
            if self.refusal:
                sock.send(self.refusal)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, conn: Conn, client_address: Any) -> None:
        try:
            self.serve_connection(conn, client_address)
        except OSError:
            pass  # the peer went away, or the deadline shut the socket
        except Exception:  # a bug: say so once, keep the listener alive
            log.exception("%s: connection from %s failed", self.name, conn.peer)
        finally:
            with self._guard_lock:
                self._conns.discard(conn)
            if conn.timed_out:
                self.refusals.warning("%s: closed %s: not authenticated in time (%g s), or "
                                      "evicted by newer unauthenticated connections",
                                      self.name, conn.peer, self.limits.preauth_s)
            self.shutdown_request(conn.sock)  # type: ignore[attr-defined]

    def serve_connection(self, conn: Conn, client_address: Any) -> None:
        raise NotImplementedError

    def service_actions(self) -> None:
        """Called by serve_forever every poll: cut connections past their deadline."""
        now = time.monotonic()
        with self._guard_lock:
            late = [c for c in self._conns if c.deadline is not None and now > c.deadline]
        for c in late:
            self._cut(c)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class TCPServer(GuardedMixin, socketserver.TCPServer):
    """A guarded listener handing each connection to ``handle(sock, conn)``."""

    def __init__(self, address: tuple[str, int], handle: Callable[[socket.socket, Conn], None],
                 limits: Limits, name: str, refusal: bytes = b"") -> None:
        self.address_family = _family(address[0])
        self.handle_conn, self.refusal = handle, refusal
        self._init_guard(limits, name)
        super().__init__(address, socketserver.BaseRequestHandler)

    def serve_connection(self, conn: Conn, client_address: Any) -> None:
        self.handle_conn(conn.sock, conn)


class _QuietHandler(WSGIRequestHandler):
    timeout = 5.0  # per read; the connection's total deadline is the server's

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass


class MetricsServer(GuardedMixin, WSGIServer):
    """/metrics over HTTP/1.0 (one request per connection), capped and deadlined: a
    slow or idle scraper is cut off after ``limits.preauth_s`` whatever it does."""

    refusal = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")

    def __init__(self, address: tuple[str, int], app: Callable, limits: Limits,
                 name: str = "metrics") -> None:
        self.address_family = _family(address[0])
        self._init_guard(limits, name)
        super().__init__(address, _QuietHandler)
        self.set_app(app)

    def serve_connection(self, conn: Conn, client_address: Any) -> None:
        self.finish_request(conn.sock, client_address)

    def server_bind(self) -> None:
        # WSGIServer.server_bind asks socket.getfqdn(), a DNS lookup that can hang in
        # an isolated node; the name only fills SERVER_NAME, which /metrics ignores.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port
        self.setup_environ()


def start(server: socketserver.BaseServer) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread, polling every POLL_S."""
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S},
                         daemon=True, name=f"accept {getattr(server, 'name', '')}")
    t.start()
    return t
