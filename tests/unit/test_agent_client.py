"""AgentClient against a hostile agent: every bad reply is ProtocolError or NodeError.

The real agent never sends these replies, so a stand-in server plays a broken or
hostile agent here (a test double, named as such: ``HostileAgent``). The client's
behaviour against the real agent is in tests/integration.
"""

from __future__ import annotations

import socket
import threading

import pytest

from nodes import protocol as P
from testbed.deploy.agent_client import AgentClient
from testbed.errors import NodeError, ProtocolError, TestbedError

pytestmark = pytest.mark.unit

TOKEN = "t0ken-for-tests"


class HostileAgent:
    """Test double: answers every request on one connection with ``reply`` bytes."""

    def __init__(self, reply: bytes | None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                P.recv_frame(conn)
                if self.reply is not None:
                    conn.sendall(self.reply)
            except (P.FrameError, OSError):
                pass

    def close(self) -> None:
        self.listener.close()


def _frame(header: bytes, payload: bytes = b"") -> bytes:
    return P.PREFIX.pack(P.MAGIC, len(header), len(payload)) + header + payload


@pytest.mark.parametrize("reply, error", [
    (_frame(b"[" * 20000), ProtocolError),                          # RecursionError in json
    (_frame(b'{"a":' * 50 + b"1" + b"}" * 50), ProtocolError),      # too deep
    (_frame(b'{"ok":true,"result":NaN}'), ProtocolError),            # non-standard JSON
    (_frame(b"\xff\xfe"), ProtocolError),                            # not UTF-8
    (b"HTTP/1.1 200 OK\r\n\r\n", ProtocolError),                     # not a frame
    (P.PREFIX.pack(P.MAGIC, 10, P.MAX_PAYLOAD_BYTES + 1), ProtocolError),
    (_frame(b'{"ok":false,"kind":"protocol","error":"refused: \\ud800"}'), ProtocolError),
    (_frame(b'{"ok":false,"kind":"busy","error":"too many"}'), NodeError),
    (_frame(b'{"ok":true}', b"")[:10], NodeError),                   # closed mid-frame
    (None, NodeError),                                               # closed, no reply
])
def test_bad_replies_are_testbed_errors(reply, error):
    agent = HostileAgent(reply)
    try:
        client = AgentClient(*agent.address, token=TOKEN, node_name="x", timeout=5)
        with pytest.raises(error):
            client.health()
    finally:
        agent.close()


@pytest.mark.parametrize("result, call", [
    ("not an object", lambda c: c.health()),
    ([1, 2], lambda c: c.kpis("head")),
    ({"samples": "nope"}, lambda c: c.run(1)),
    ({"samples": [1, 2]}, lambda c: c.run(1)),
    ({}, lambda c: c.profile_layers([b"x"])),
    ({"tensors": {"a": 1}}, lambda c: c.outputs()),
    (None, lambda c: c.connect_peer("h", 1)),
])
def test_replies_of_the_wrong_shape_are_protocol_errors(result, call):
    import json
    agent = HostileAgent(_frame(json.dumps({"ok": True, "result": result}).encode()))
    try:
        client = AgentClient(*agent.address, token=TOKEN, node_name="x", timeout=5)
        with pytest.raises(ProtocolError):
            call(client)
    finally:
        agent.close()


@pytest.mark.parametrize("token", ["\ud800", "", "a b", "t\u00e9", None])
def test_unusable_token_is_a_protocol_error_not_a_crash(token):
    with pytest.raises(ProtocolError, match="token"):
        AgentClient("127.0.0.1", 1, token=token)  # type: ignore[arg-type]


def test_unencodable_request_is_a_protocol_error():
    agent = HostileAgent(None)
    try:
        client = AgentClient(*agent.address, token=TOKEN, timeout=5)
        with pytest.raises(ProtocolError, match="JSON"):
            client.call("health", when=object())
        with pytest.raises(ProtocolError, match="JSON"):
            client.call("run", max_seconds=float("nan"))
    finally:
        agent.close()


def test_unreachable_agent_is_a_node_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(NodeError, match="cannot reach"):
            AgentClient("127.0.0.1", port, token=TOKEN, timeout=2).health()


def test_errors_are_testbed_errors():
    assert issubclass(ProtocolError, TestbedError) and issubclass(NodeError, TestbedError)


@pytest.mark.parametrize("timeout", [-1, 0, float("nan"), "5"])
def test_bad_reply_timeout_is_a_protocol_error(timeout):
    agent = HostileAgent(None)
    try:
        client = AgentClient(*agent.address, token=TOKEN, timeout=5)
        with pytest.raises(ProtocolError, match="timeout"):
            client.call("health", timeout=timeout)
    finally:
        agent.close()
