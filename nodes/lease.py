"""The agent's lease: it lives only while its orchestrator is there to hold it.

An agent started with ``--lease-s S`` exits (status ``EXIT_LEASE_EXPIRED``) once no
control connection has held a lease for S seconds — counted from the agent's start
until the first ``lease`` request, and from the moment the last holder's connection
ends. The orchestrator takes a lease on each node right after it answers ``health``
and keeps that connection open for the life of the deployment
(``testbed.deploy.agent_client.Lease``); when the orchestrator dies, however it dies
(SIGKILL included), its kernel closes the connection and the agent follows within S.
TCP keepalive on the lease connection covers a peer that vanishes without a FIN.

Why a lease rather than PR_SET_PDEATHSIG: the parent-death signal fires when the
*thread* that forked the agent exits (not the process), does not exist for
containers (their parent is the container runtime), and would not work for nodes on
other hosts; the lease works the same for every backend.

This module owns the bookkeeping only; ``nodes.agent`` wires it to the control
connections and to its main loop.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

#: Exit status of an agent whose lease ran out (its orchestrator is gone).
EXIT_LEASE_EXPIRED = 4
#: Keepalive on the lease connection: probe after 10 s idle, every 5 s, give up after
#: 3 unanswered probes — a silently vanished orchestrator is noticed within ~25 s.
KEEPALIVE = (10, 5, 3)


class Lease:
    """Counts lease holders; ``expired()`` once there has been none for ``grace_s``.

    ``grace_s=None`` disables the lease (an agent started by hand or by a test).
    """

    def __init__(self, grace_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        if grace_s is not None and not grace_s > 0:
            raise ValueError(f"lease grace must be > 0 s, got {grace_s}")
        self.grace_s, self._clock = grace_s, clock
        self._lock = threading.Lock()
        self._holders = 0
        self._unheld_since = clock()

    def take(self) -> None:
        with self._lock:
            self._holders += 1

    def drop(self) -> None:
        with self._lock:
            self._holders = max(0, self._holders - 1)
            if self._holders == 0:
                self._unheld_since = self._clock()

    @property
    def holders(self) -> int:
        return self._holders

    def expired(self) -> bool:
        if self.grace_s is None:
            return False
        with self._lock:
            return self._holders == 0 and self._clock() - self._unheld_since > self.grace_s


def keep_alive(sock: socket.socket, idle_s: int = KEEPALIVE[0], interval_s: int = KEEPALIVE[1],
               count: int = KEEPALIVE[2]) -> None:
    """TCP keepalive on a lease connection, and no read timeout: it idles by design."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s),
                       ("TCP_KEEPCNT", count)):
        if hasattr(socket, opt):  # Linux has all three
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
