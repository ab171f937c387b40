"""One SSH connection to a remote host, checked strictly, and what travels over it.

Owns every paramiko call of the testbed: connecting with the host key checked
against the ``known_hosts`` file the experiment names (``RejectPolicy``: an
unknown key is refused, and a changed one too), authenticating with the key file
named and nothing else (no agent, no ``~/.ssh/id_*`` — paramiko tries agent keys
first and a server with ``MaxAuthTries`` then says "Too many authentication
failures" before the right key is offered), never forwarding the agent, running
commands (argument lists, quoted here once), SFTP, and local port forwarding
(``Forward``: a listener on this host's loopback whose connections travel as
``direct-tcpip`` channels to an address as the remote host sees it — how the
control plane reaches an agent without any agent port open on the lab network).

Every failure a user can cause becomes one ``NodeError`` line naming the host:
unknown host, connection refused or timed out, authentication failure, unknown or
changed host key (with the key's fingerprint and how to accept it).

Leaves to others: what runs on the remote (``testbed.deploy.ssh``), the Docker
engine behind it (``testbed.deploy.ssh_docker``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import select
import shlex
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import paramiko

from testbed.errors import NodeError

log = logging.getLogger("testbed.deploy")
logging.getLogger("paramiko").setLevel(logging.CRITICAL)  # its tracebacks would break "one line"


@dataclass(frozen=True)
class HostSpec:
    """Where and as whom to connect. ``key`` and ``known_hosts`` are paths on this host."""

    host: str
    user: str
    port: int = 22
    key: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    timeout_s: float = 10.0

    @property
    def name(self) -> str:
        """``user@host:port``, as messages say it."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_entry(self) -> str:
        """How known_hosts names this host (``[host]:port`` unless port 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _Unknown(Exception):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("unknown host key")
        self.key = key


class _Reject(paramiko.RejectPolicy):
    """RejectPolicy that keeps the offered key, so the error can show its fingerprint."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _Unknown(key)


def _keyscan_hint(spec: HostSpec, key: paramiko.PKey) -> str:
    kind = key.get_name().replace("ssh-", "")
    return (f"if that is the host's key, accept it with: ssh-keyscan -p {spec.port} -t {kind} "
            f"{spec.host} >> {spec.known_hosts}")


class Connection:
    """An authenticated SSH connection (``connect``). Close it, or use ``with``."""

    def __init__(self, spec: HostSpec, client: paramiko.SSHClient) -> None:
        self.spec = spec
        self.client = client
        self._forwards: list[Forward] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state
    @property
    def transport(self) -> paramiko.Transport:
        t = self.client.get_transport()
        if t is None or not t.is_active():
            raise NodeError(f"ssh connection to {self.spec.name} is gone", node="remote")
        return t

    def alive(self) -> bool:
        t = self.client.get_transport()
        return bool(t is not None and t.is_active())

    def server_address(self) -> str:
        """The remote's address of this connection (what ``SSH_CONNECTION`` calls the
        server address): the address the host answers on from here."""
        return self.transport.getpeername()[0]

    # ------------------------------------------------------------------ commands
    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout_s: float = 120.0,
            check: bool = True, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run ``argv`` on the remote (each argument quoted; no shell expansion of
        them), return (exit status, stdout, stderr). ``check``: a non-zero exit is a
        NodeError carrying stderr. ``env`` is prepended with ``env``(1)."""
        command = " ".join(shlex.quote(a) for a in (["env", *(f"{k}={v}" for k, v in env.items())]
                                                     if env else []) + list(argv))
        return self.run_shell(command, stdin=stdin, timeout_s=timeout_s, check=check)

    def run_shell(self, command: str, *, stdin: bytes | None = None, timeout_s: float = 120.0,
                  check: bool = True) -> tuple[int, str, str]:
        """Run a command line the testbed composed itself (never user text)."""
        try:
            chan = self.transport.open_session(timeout=self.spec.timeout_s)
            chan.settimeout(timeout_s)
            chan.exec_command(command)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = _drain(chan)
            status = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise NodeError(f"{self.spec.name}: {_short(command)}: {e or type(e).__name__}",
                            node="remote") from e
        if check and status != 0:
            raise NodeError(f"{self.spec.name}: {_short(command)} failed", node="remote",
                            exit_status=status, stderr=err or out)
        return status, out, err

    def start(self, command: str) -> paramiko.Channel:
        """Start a long-running command; its channel stays open (stdout/stderr readable)."""
        try:
            chan = self.transport.open_session(timeout=self.spec.timeout_s)
            chan.exec_command(command)
            return chan
        except (paramiko.SSHException, OSError) as e:
            raise NodeError(f"{self.spec.name}: cannot start {_short(command)}: {e}", node="remote") from e

    @contextlib.contextmanager
    def sftp(self) -> Iterator[paramiko.SFTPClient]:
        try:
            client = self.client.open_sftp()
        except (paramiko.SSHException, OSError) as e:
            raise NodeError(f"{self.spec.name}: cannot open SFTP: {e}", node="remote") from e
        try:
            yield client
        finally:
            client.close()

    # ------------------------------------------------------------------ forwarding
    def forward(self, remote_host: str, remote_port: int, name: str = "") -> "Forward":
        """A local listener (127.0.0.1, free port) tunnelled to ``remote_host:remote_port``
        as the remote host sees it. Closed with the connection."""
        fwd = Forward(self, remote_host, remote_port, name)
        with self._lock:
            self._forwards.append(fwd)
        return fwd

    def close(self) -> None:
        with self._lock:
            forwards, self._forwards = self._forwards, []
        for f in forwards:
            f.close()
        self.client.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[:limit] + "…"


def _drain(chan: paramiko.Channel) -> tuple[str, str]:
    out, err = bytearray(), bytearray()
    while True:
        if chan.recv_ready():
            out += chan.recv(65536)
        elif chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        else:
            select.select([chan], [], [], 0.2)
    # what arrived between the last read and the exit status
    while chan.recv_ready():
        out += chan.recv(65536)
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(65536)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def connect(spec: HostSpec) -> Connection:
    """Connect and authenticate, or raise one NodeError line saying why.

    Host key: checked against ``spec.known_hosts`` only (the system files are not
    read); unknown -> refused with its fingerprint and the command to accept it;
    changed -> refused with both fingerprints. Authentication: the key in
    ``spec.key`` only (``allow_agent=False, look_for_keys=False``).
    """
    known = Path(os.path.expanduser(spec.known_hosts))
    key = os.path.expanduser(spec.key) if spec.key else None
    if key is not None and not os.path.isfile(key):
        raise NodeError(f"ssh key {spec.key} is not a file", node="remote")
    client = paramiko.SSHClient()
    if known.is_file():
        try:
            client.load_host_keys(str(known))
        except (OSError, paramiko.SSHException) as e:
            raise NodeError(f"cannot read known_hosts {spec.known_hosts}: {e}", node="remote") from e
    client.set_missing_host_key_policy(_Reject())
    where = spec.name
    try:
        client.connect(spec.host, port=spec.port, username=spec.user, key_filename=key,
                       allow_agent=False, look_for_keys=False, timeout=spec.timeout_s,
                       banner_timeout=spec.timeout_s, auth_timeout=spec.timeout_s)
    except _Unknown as e:
        client.close()
        raise NodeError(f"host key of {spec.known_hosts_entry} is not in {spec.known_hosts} "
                        f"({e.key.get_name()} {fingerprint(e.key)}); {_keyscan_hint(spec, e.key)}",
                        node="remote") from None
    except paramiko.BadHostKeyException as e:
        client.close()
        raise NodeError(f"host key of {spec.known_hosts_entry} CHANGED: it offers {e.key.get_name()} "
                        f"{fingerprint(e.key)}, {spec.known_hosts} has {fingerprint(e.expected_key)}; "
                        f"if the host was reinstalled, remove the old entry with: ssh-keygen -R "
                        f"'{spec.known_hosts_entry}' -f {spec.known_hosts}", node="remote") from None
    except paramiko.AuthenticationException as e:
        client.close()
        how = f"key {spec.key}" if spec.key else "no key given"
        raise NodeError(f"{where}: authentication failed with {how} ({e})", node="remote") from None
    except socket.gaierror as e:
        client.close()
        raise NodeError(f"{where}: unknown host {spec.host!r} ({e.strerror})", node="remote") from None
    except (socket.timeout, TimeoutError):
        client.close()
        raise NodeError(f"{where}: connection timed out after {spec.timeout_s:g} s", node="remote") from None
    except paramiko.ssh_exception.NoValidConnectionsError as e:
        client.close()
        reasons = {str(x.strerror or x).split("] ")[-1] for x in e.errors.values()}
        raise NodeError(f"{where}: cannot connect: {', '.join(sorted(reasons))}", node="remote") from None
    except (paramiko.SSHException, OSError, EOFError) as e:
        client.close()
        raise NodeError(f"{where}: ssh failed: {e or type(e).__name__}", node="remote") from None
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(5)  # a vanished host is noticed within seconds
    return Connection(spec, client)


class Forward:
    """A listener on 127.0.0.1 whose connections go through the SSH connection.

    Each accepted connection opens a ``direct-tcpip`` channel to the target and a
    thread pumps bytes both ways until either side closes. When the SSH connection
    dies every tunnelled connection closes, which the agent client sees as a
    closed connection (a NodeError), and the agent as its lease holder leaving.
    """

    def __init__(self, conn: Connection, remote_host: str, remote_port: int, name: str = "") -> None:
        self.conn, self.remote = conn, (remote_host, int(remote_port))
        self.name = name or f"{remote_host}:{remote_port}"
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.host, self.port = self._listener.getsockname()
        self._closed = threading.Event()
        self._pairs: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"ssh-fwd-{self.name}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                chan = self.conn.transport.open_channel("direct-tcpip", self.remote, peer,
                                                        timeout=self.conn.spec.timeout_s)
            except (NodeError, paramiko.SSHException, OSError) as e:
                log.info("ssh forward %s: cannot open a channel: %s", self.name, e)
                sock.close()
                continue
            with self._lock:
                self._pairs.add((sock, chan))
            threading.Thread(target=self._pump, args=(sock, chan), daemon=True,
                             name=f"ssh-pump-{self.name}").start()

    def _pump(self, sock: socket.socket, chan: paramiko.Channel) -> None:
        try:
            while True:
                readable, _, _ = select.select([sock, chan], [], [], 5.0)
                if self._closed.is_set() or chan.closed:
                    return
                if sock in readable:
                    data = sock.recv(262144)
                    if not data:
                        return
                    chan.sendall(data)
                if chan in readable:
                    data = chan.recv(262144)
                    if not data:
                        return
                    sock.sendall(data)
        except (OSError, paramiko.SSHException, EOFError):
            return
        finally:
            with self._lock:
                self._pairs.discard((sock, chan))
            for c in (chan, sock):
                with contextlib.suppress(Exception):
                    c.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for sock, chan in pairs:
            for c in (chan, sock):
                with contextlib.suppress(Exception):
                    c.close()
