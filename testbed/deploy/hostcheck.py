"""What works on a remote host, before an experiment relies on it (``testbed hosts check``).

Owns the list of checks and their order: the SSH port answers, the host key is
known (strictly, from the given known_hosts), the key logs in, the remote's python3
(and venv) and Docker engine, whether the agent's ports are free there, the clock
offset to this host (NTP-style, minimum-RTT filter, over an exec channel since no
agent runs yet), which qdiscs the remote kernel could shape with and whether the user
may change them there (root or passwordless sudo: shape_at: remote). Each check is a
``Finding`` (ok or not, one line); connecting failures stop the list there.

Leaves to others: connecting (``sshconn``), the remote facts (``ssh.probe``,
``ssh.busy_ports``), printing (``testbed.commands.hosts``).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from testbed.deploy import ssh as remote_ssh
from testbed.deploy.sshconn import Connection, HostSpec, connect
from testbed.errors import NodeError

_ECHO_CLOCK = "import sys,time\nfor _ in sys.stdin:\n    print(time.monotonic_ns(), flush=True)\n"
_QDISCS = r"""
import os, platform
rel = platform.release()
out = []
for kind in ("netem", "htb", "tbf"):
    mod = "sch_" + kind
    if os.path.isdir("/sys/module/" + mod):
        out.append(kind + ": loaded")
        continue
    base = "/lib/modules/%s/kernel/net/sched/" % rel
    found = os.path.isdir(base) and any(f.startswith(mod + ".ko") for f in os.listdir(base))
    out.append(kind + (": module present" if found else ": not found (or built in)"))
print("; ".join(out))
"""


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str


class _EchoClock:
    """``clock()`` over a python3 loop on the remote that prints its CLOCK_MONOTONIC per line."""

    def __init__(self, conn: Connection) -> None:
        self.chan = conn.start(f"python3 -u -c {__import__('shlex').quote(_ECHO_CLOCK)}")
        self.buf = b""

    def clock(self) -> int:
        self.chan.sendall(b"\n")
        while b"\n" not in self.buf:
            data = self.chan.recv(4096)
            if not data:
                raise NodeError("the remote clock loop ended", node="remote")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return int(line)

    def close(self) -> None:
        self.chan.close()


def check_host(spec: HostSpec, ports: tuple[int, int, int] = (7700, 7701, 7702),
               remote_dir: str = "~/.cache/testbed") -> list[Finding]:
    """Every check (see the module docstring), in order."""
    out: list[Finding] = []
    try:
        socket.create_connection((spec.host, spec.port), timeout=spec.timeout_s).close()
        out.append(Finding("reachable", True, f"{spec.host}:{spec.port} answers"))
    except OSError as e:
        out.append(Finding("reachable", False, f"{spec.host}:{spec.port}: {e.strerror or e}"))
        return out
    try:
        conn = connect(spec)
    except NodeError as e:
        text = str(e)
        name = "host key" if "host key" in text else "auth" if "authentication" in text else "ssh"
        out.append(Finding(name, False, text.removeprefix("node remote: ")))
        return out
    with conn:
        out.append(Finding("host key", True, f"known in {spec.known_hosts}"))
        out.append(Finding("auth", True, f"{spec.user} with {spec.key} (no agent, no other keys)"))
        facts = _python(conn, remote_dir, out)
        _docker(conn, out)
        if facts is not None:
            addr = conn.server_address()
            wanted = [f"127.0.0.1:{ports[0]}", f"{addr}:{ports[1]}", f"127.0.0.1:{ports[2]}"]
            busy = remote_ssh.busy_ports(conn, wanted)
            out.append(Finding("ports", not busy, "free: " + ", ".join(wanted) if not busy else
                               "in use: " + ", ".join(f"{a} ({why})" for a, why in busy)))
            _clock(conn, out)
            status, text, err = conn.run(["python3", "-c", _QDISCS], check=False, timeout_s=30)
            out.append(Finding("remote shaping", True, f"{text.strip() or err.strip() or '?'}; "
                                                       f"shape_at: remote {_net_admin(conn, facts)}"))
    return out


def _net_admin(conn: Connection, facts: dict) -> str:
    """Whether the ssh user may change qdiscs there (what shape_at: remote needs)."""
    how = remote_ssh.net_admin(conn, facts)
    return f"possible ({how})" if how else "not possible (needs root or passwordless sudo)"


def _python(conn: Connection, remote_dir: str, out: list[Finding]) -> dict | None:
    try:
        facts = remote_ssh.probe(conn, remote_dir)
    except NodeError as e:
        out.append(Finding("python3", False, str(e).removeprefix("node remote: ")))
        return None
    status, _, _ = conn.run(["python3", "-c", "import venv, ensurepip"], check=False, timeout_s=30)
    venv = "venv ok" if status == 0 else "no venv/ensurepip (install python3-venv)"
    out.append(Finding("python3", status == 0, f"{facts['python']} on {facts['machine']}, kernel "
                                               f"{facts['kernel']}, {venv}"))
    room = facts["free_bytes"] >= remote_ssh.VENV_BYTES
    out.append(Finding("disk", room, f"{facts['free_bytes'] // 2**20} MiB free under {facts['dir']}"))
    return facts


def _docker(conn: Connection, out: list[Finding]) -> None:
    status, text, err = conn.run(["docker", "version", "--format", "{{.Server.Version}}"], check=False,
                                 timeout_s=30)
    if status == 127:
        out.append(Finding("docker", False, "no docker CLI (only runtime: process works)"))
    elif status != 0:
        out.append(Finding("docker", False, f"engine does not answer: {(err or text).strip()[:120]}"))
    else:
        out.append(Finding("docker", True, f"engine {text.strip()}"))


def _clock(conn: Connection, out: list[Finding]) -> None:
    from testbed.deploy.clock import estimate

    try:
        echo = _EchoClock(conn)
        try:
            echo.clock()  # the interpreter's start-up is not a round trip
            t0 = time.monotonic()
            est = estimate(echo, exchanges=32)  # type: ignore[arg-type]
            spent = time.monotonic() - t0
        finally:
            echo.close()
    except (NodeError, ValueError, OSError) as e:
        out.append(Finding("clock", False, f"cannot estimate the offset: {e}"))
        return
    out.append(Finding("clock", True, f"remote - here = {est.offset_s * 1e3:+.3f} ms +/- "
                                      f"{est.uncertainty_s * 1e3:.3f} ms (min RTT {est.rtt_ns / 1e6:.3f} ms, "
                                      f"32 exchanges in {spent:.2f} s)"))
