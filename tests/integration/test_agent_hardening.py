"""Hostile peers against real agents (subprocesses on loopback): nothing crashes,
hangs or grows.

Each test speaks raw frames at a real ``python -m nodes.agent`` and reads the agent's
memory, threads and fds with psutil. Limits are compared with a baseline measured in
the same test (a ratio), never with absolute numbers. The fuzz test of both ports is
``test_agent_fuzz.py``.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path

import psutil
import pytest

from nodes import protocol as P
from nodes.lease import EXIT_LEASE_EXPIRED
from testbed.deploy.agent_client import AgentClient, Lease
from testbed.errors import NodeError
from tests.integration.agentproc import AgentProc

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def agent(tmp_path, token):
    a = AgentProc("victim", tmp_path, token, "--preauth-s", "1", "--idle-s", "2")
    yield a
    a.stop()


def _ps(agent: AgentProc) -> psutil.Process:
    return psutil.Process(agent.proc.pid)


def _settle(agent: AgentProc, fds: int, timeout: float = 10.0) -> int:
    """Wait until the agent's fd count is back to ``fds`` (connections closing)."""
    deadline = time.monotonic() + timeout
    while (now := _ps(agent).num_fds()) > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def _reply(sock: socket.socket) -> dict:
    sock.settimeout(5)
    return P.recv_frame(sock).header


def _no_traceback(agent: AgentProc) -> None:
    log = agent.log()
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------- memory

def test_declared_payloads_are_not_allocated_before_authentication(agent, token):
    """The issue's case: a hello with no token and 512 MiB declared, four times, on the
    data port; the same on the control port with a wrong token and with the right token
    on an op that carries nothing. Nothing is allocated; each gets a refusal."""
    ps = _ps(agent)
    rss0 = ps.memory_info().rss
    frames = [("data", P.pack_header({"kind": "hello"}, 512 * MiB)),
              ("data", P.pack_header({"kind": "hello", "nonce": "00" * 32}, 512 * MiB)),
              ("data", P.pack_header({"kind": "tensors", "tensors": []}, 512 * MiB)),
              ("data", P.pack_header({"kind": "hello", "token": token}, 512 * MiB)),
              ("control", P.pack_header(P.request_header("load_part", "wrong"), 512 * MiB)),
              ("control", P.pack_header({"op": "stage_part", "args": {}}, 512 * MiB)),
              ("control", P.pack_header(P.request_header("health", token), 512 * MiB)),
              ("control", P.pack_header(P.request_header(
                  "set_inputs", token, sets=[{"payload_bytes": 8}]), 512 * MiB))]
    held = []
    for port, frame in frames:
        s = socket.create_connection(agent.data if port == "data" else agent.control, timeout=5)
        s.sendall(frame + b"\0" * 65536)  # a little of the "payload", then nothing
        held.append((port, s))
    for _port, s in held:
        reply = _reply(s)
        assert reply.get("ok") is False or reply.get("kind") == "error", reply
        assert "refused" in reply["error"]
    rss = ps.memory_info().rss
    # one such allocation would be ~14x the agent's baseline (~40 MiB)
    assert rss < rss0 * 1.25, (rss0 >> 20, rss >> 20)
    for _, s in held:
        s.close()
    assert agent.client.health()["name"] == "victim"
    _no_traceback(agent)


# --------------------------------------------------------------------------- idle connections

def test_idle_strangers_are_capped_cut_and_never_lock_the_orchestrator_out(agent):
    """300 idle connections: threads and fds stay within the caps, a real client is
    served meanwhile, and after the pre-auth deadline everything is back to baseline."""
    ps = _ps(agent)
    agent.client.health()
    agent.client.close()
    threads0, fds0 = ps.num_threads(), _settle(agent, ps.num_fds())
    idle = []
    for i in range(300):
        idle.append(socket.create_connection(agent.control if i % 3 else agent.data, timeout=5))
    time.sleep(0.3)
    from nodes.agent import CONTROL_LIMITS, DATA_LIMITS
    cap = CONTROL_LIMITS.max_preauth + DATA_LIMITS.max_preauth
    assert ps.num_threads() <= threads0 + cap + 2, ps.num_threads()
    assert ps.num_fds() <= fds0 + cap + 2, ps.num_fds()
    # the orchestrator gets through while strangers wait (oldest stranger evicted)
    client = AgentClient(*agent.control, token=agent.client.token, node_name="victim")
    assert client.health()["name"] == "victim"
    client.close()
    time.sleep(1.5)  # past --preauth-s 1
    assert _settle(agent, fds0) <= fds0
    assert ps.num_threads() <= threads0 + 1
    for s in idle:
        s.close()
    _no_traceback(agent)


def test_a_connect_burst_is_not_delayed_by_the_backlog(agent):
    """With the stdlib backlog of 5, connects in a burst of 300 waited for a SYN
    retransmit (1 s). None may take that long now."""
    socks, started = [], {}
    for _ in range(300):
        s = socket.socket()
        s.setblocking(False)
        started[s] = time.monotonic()
        s.connect_ex(agent.control)
        socks.append(s)
    import selectors
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_WRITE)
    took, deadline = {}, time.monotonic() + 5
    while len(took) < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            took[key.fileobj] = time.monotonic() - started[key.fileobj]
            sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    assert len(took) == 300
    assert max(took.values()) < 0.9, sorted(took.values())[-5:]


def test_idle_authenticated_connection_is_closed_and_the_client_reconnects(agent):
    ps = _ps(agent)
    agent.client.health()
    fds = ps.num_fds()
    time.sleep(2.6)  # --idle-s 2: the agent closed our connection
    assert _settle(agent, fds - 1) <= fds - 1
    assert agent.client.health()["name"] == "victim"  # reconnected, no error


# --------------------------------------------------------------------------- bad frames

@pytest.mark.parametrize("port", ["control", "data"])
def test_deep_nesting_and_surrogate_tokens_get_a_refusal_not_a_traceback(agent, token, port):
    address = agent.control if port == "control" else agent.data
    deep = b"[" * 30000
    frames = [P.PREFIX.pack(P.MAGIC, len(deep), 0) + deep,
              P.pack_header({"op": "health", "token": "\ud800", "args": {}}, 0),
              P.pack_header({"kind": "hello", "nonce": "\udfff" * 64}, 0),
              b'TBF1' + (37).to_bytes(4, "big") + (0).to_bytes(8, "big")
              + b'{"op":"health","token":"\\ud800","x":1}']
    for frame in frames:
        with socket.create_connection(address, timeout=5) as s:
            s.sendall(frame)
            reply = _reply(s)
            assert "refused" in reply["error"], reply
    assert agent.client.health()["name"] == "victim"
    assert agent.proc.poll() is None
    _no_traceback(agent)


def test_shutdown_needs_the_token(agent):
    for header in ({"op": "shutdown", "args": {}}, P.request_header("shutdown", "nope")):
        with socket.create_connection(agent.control, timeout=5) as s:
            P.send_frame(s, header)
            assert _reply(s)["kind"] == "protocol"
    time.sleep(0.3)
    assert agent.proc.poll() is None and agent.client.health()["name"] == "victim"


# --------------------------------------------------------------------------- argument abuse

SHA = "ab" * 32


@pytest.mark.parametrize("op, args, message", [
    ("run", {"samples": 10**12}, "samples"),
    ("run", {"samples": [1]}, "samples"),
    ("run", {"samples": 1, "warmup": -1}, "warmup"),
    ("run", {"samples": 1, "max_seconds": "soon"}, "max_seconds"),
    ("run", {"samples": 1, "model_outputs": [1, 2]}, "model_outputs"),
    ("run", {"samples": 1, "clock_shared": "yes"}, "clock_shared"),
    ("run", {"samples": 1, "codec": ["raw"]}, "codec"),
    ("run", {}, "bad arguments"),
    ("health", {"verbose": True}, "bad arguments"),
    ("health", {"payload": 1}, "bad arguments"),
    ("kpis", {"role": "head", "runs": 10**9}, "runs"),
    ("kpis", {"role": ["head"]}, "role"),
    ("kpis", {"role": "head", "threads": 0}, "threads"),
    ("load_part", {"role": "head", "sha256": ["x"]}, "sha256"),
    ("load_part", {"role": {"a": 1}}, "role"),
    ("stage_part", {"sha256": {"not": "hashable"}}, "sha256"),
    ("fetch_part", {"sha256": SHA, "role": "head", "threads": 10**6}, "threads"),
    ("connect_peer", {"host": 5, "port": 1}, "host"),
    ("connect_peer", {"host": "127.0.0.1", "port": "x"}, "port"),
    ("connect_peer", {"host": "127.0.0.1", "port": 99999}, "port"),
    ("connect_peer", {"host": "127.0.0.1", "port": 9, "timeout": -1}, "timeout"),
    ("set_inputs", {"sets": [{"payload_bytes": 0}] * (2000)}, "sets"),
    ("set_inputs", {"sets": ["x"]}, "sizes"),
    ("set_inputs", {"sets": [{"payload_bytes": 0, "tensors": []}]}, "without tensors"),
    ("profile_layers", {"sizes": [0] * 5000}, "sizes"),
    ("profile_layers", {"sizes": [], "runs": 1}, "sizes"),
    ("profile_layers", {"sizes": [0], "runs": 10**9}, "runs"),
    ("format_disk", {}, "unknown operation"),
    ("\ud800", {}, "unknown operation"),
    ("__init__", {}, "unknown operation"),
])
def test_bad_arguments_are_one_line_node_errors(agent, token, op, args, message):
    with socket.create_connection(agent.control, timeout=5) as s:
        P.send_frame(s, P.request_header(op, token, **args))
        reply = _reply(s)
    assert reply["ok"] is False and message in reply["error"], reply
    assert "\n" not in reply["error"]
    assert agent.client.health()["name"] == "victim"
    _no_traceback(agent)


@pytest.mark.parametrize("desc", [
    {"name": "x", "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": 4},   # nbytes
    {"name": "x", "dtype": "float32", "shape": [2**40, 0], "codec": "raw", "nbytes": 0},
    {"name": "x", "dtype": "float32", "shape": [2**31, 2**31], "codec": "raw", "nbytes": 4},
    {"name": "x", "dtype": "object", "shape": [1], "codec": "raw", "nbytes": 4},
    {"name": "x", "dtype": "uint8", "shape": [1, 2, 2, 1], "codec": "png", "nbytes": 4},
])
def test_tensor_descriptor_abuse_in_set_inputs(agent, desc):
    with pytest.raises(NodeError, match="set_inputs"):
        agent.client.call("set_inputs", [b"\0" * 4], sets=[{"tensors": [desc],
                                                             "payload_bytes": 4}])
    _no_traceback(agent)


def test_staged_parts_are_bounded(agent):
    import hashlib
    for i in range(10):
        blob = bytes([i]) * 1000
        agent.client.stage_part(blob, hashlib.sha256(blob).hexdigest())
    blob = bytes([9]) * 1000
    agent.client.stage_part(blob, hashlib.sha256(blob).hexdigest())  # again: no duplicate
    from nodes.agent import MAX_STAGED
    staged = agent.client.health()["staged"]
    assert len(staged) == MAX_STAGED and hashlib.sha256(blob).hexdigest() in staged


# --------------------------------------------------------------------------- metrics

def test_metrics_slowloris_is_cut_and_scrapes_still_work(agent):
    import urllib.request
    ps = _ps(agent)
    fds0 = ps.num_fds()
    host, port = agent.metrics
    slow = []
    for _ in range(40):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
        slow.append(s)
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    assert "process_open_fds" in text
    from nodes.agent_metrics import METRICS_LIMITS
    assert ps.num_fds() <= fds0 + METRICS_LIMITS.max_conns + 2
    time.sleep(1.5)  # --preauth-s 1 caps the metrics deadline too
    assert _settle(agent, fds0) <= fds0
    for s in slow:
        s.close()


# --------------------------------------------------------------------------- data link

class ImpostorRemote:
    """Test double of a hostile peer on the data network: answers the local's hello
    with a challenge it cannot prove, and records what it receives. (A real agent
    does not misbehave, so a stand-in is the only way to be one.)"""

    def __init__(self) -> None:
        import threading
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.received = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(5)
            hello = P.recv_frame(conn)
            self.received += json.dumps(hello.header).encode()
            P.send_frame(conn, {"kind": "challenge", "nonce": "22" * 32, "proof": "00" * 32})
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                pass


def test_local_never_proves_itself_to_an_impostor(tmp_path, token):
    local = AgentProc("local", tmp_path, token)
    impostor = ImpostorRemote()
    try:
        with pytest.raises(NodeError, match="did not prove"):
            local.client.connect_peer(*impostor.listener.getsockname())
        impostor.thread.join(5)
        assert token.encode() not in impostor.received
        assert b"auth" not in impostor.received and b"proof" not in impostor.received
        assert local.client.health()["peer"] is False
    finally:
        impostor.listener.close()
        local.stop()


# --------------------------------------------------------------------------- lease

def test_agent_without_a_lease_exits_after_the_grace(tmp_path, token):
    a = AgentProc("orphan", tmp_path, token, "--lease-s", "1.5")
    try:
        assert a.proc.wait(15) == EXIT_LEASE_EXPIRED
        assert "orchestrator is gone" in a.log()
    finally:
        a.stop()


def test_agent_lives_while_the_lease_is_held_and_exits_after_it_is_lost(tmp_path, token):
    a = AgentProc("leased", tmp_path, token, "--lease-s", "1.5", "--idle-s", "1")
    try:
        lease = Lease(*a.control, token=token, node_name="leased")
        assert lease.info["grace_s"] == 1.5
        time.sleep(3.5)  # past the grace and past --idle-s: the lease connection stays
        assert a.proc.poll() is None
        assert a.client.health()["lease_holders"] == 1
        lease.close()
        t0 = time.monotonic()
        assert a.proc.wait(15) == EXIT_LEASE_EXPIRED
        assert 1.0 < time.monotonic() - t0 < 10
    finally:
        a.stop()


def test_lease_follows_a_sigkilled_holder(tmp_path, token):
    """The holder is a separate process killed with SIGKILL: its kernel closes the
    connection and the agent follows within the grace."""
    import subprocess
    import sys
    a = AgentProc("leased", tmp_path, token, "--lease-s", "1.5")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from testbed.deploy.agent_client import Lease; "
         f"lease = Lease({a.control[0]!r}, {a.control[1]}, {token!r}); print('held', flush=True); "
         "time.sleep(600)"],
        cwd=str(Path(__file__).resolve().parents[2]), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2)
        assert a.proc.poll() is None
        holder.kill()
        holder.wait(10)
        assert a.proc.wait(15) == EXIT_LEASE_EXPIRED
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        a.stop()



