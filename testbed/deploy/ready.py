"""Waiting until a freshly started node's agent answers.

Owns the start-up deadline and the two probes: the control port accepts a TCP
connection, then (with the real agent) a token-carrying ``health`` request
through ``AgentClient`` succeeds. While waiting it watches the node's process
or container, so a crashed agent fails fast with its exit status and log tail
instead of a time-out. Starting and stopping nodes is the backends' business.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

from testbed.deploy.node import Node
from testbed.errors import NodeError, ProtocolError

AliveCheck = Callable[[], "tuple[bool, int | None, str]"]


def _check_alive(node: Node, alive: AliveCheck) -> None:
    ok, code, tail = alive()
    if not ok:
        raise NodeError("agent exited while starting", node=node.name, exit_status=code, stderr=tail)


def wait_port(node: Node, alive: AliveCheck, deadline: float) -> None:
    """Until the control port accepts a connection."""
    while True:
        _check_alive(node, alive)
        try:
            socket.create_connection((node.control_host, node.control_port), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise NodeError(f"control port {node.control_host}:{node.control_port} "
                                f"did not open: {e}", node=node.name) from e
        time.sleep(0.1)


def wait_health(node: Node, token: str, alive: AliveCheck, deadline: float) -> dict:
    """Until ``health`` answers through the agent client (the real agent only)."""
    while True:
        _check_alive(node, alive)
        try:
            client = node.client(token)
            try:
                return client.health()
            finally:
                close = getattr(client, "close", None)
                if close:
                    close()
        except (NodeError, ProtocolError, OSError) as e:
            if time.monotonic() > deadline:
                raise NodeError(f"agent did not answer health: {e}", node=node.name) from e
        time.sleep(0.2)


def wait_ready(node: Node, token: str, alive: AliveCheck, *, timeout_s: float,
               health: bool) -> dict | None:
    """Port first (cheap), then health when ``health`` is set; returns its answer."""
    deadline = time.monotonic() + timeout_s
    wait_port(node, alive, deadline)
    return wait_health(node, token, alive, deadline) if health else None
