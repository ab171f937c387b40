"""An "edge host" on this machine: a network namespace running Debian's real sshd.

Owns test plumbing for the ssh backend: a namespace ``tbedge<tag>`` joined to the
root namespace by a veth /30 (this host ``.1``, the edge ``.2``, the edge's default
route via this host), an ed25519 host key and client key made per use, an
``authorized_keys`` and a private ``known_hosts`` holding exactly the edge's key,
and ``/usr/sbin/sshd -D`` started in the namespace with its own config (key login
only, TCP forwarding allowed, agent forwarding not, ``MaxAuthTries 3``). On exit
every process in the namespace is killed and the namespace, veth and files go.

Since only the network namespace differs, the edge shares this machine's file
system: its ``python3`` is Debian's, its ``docker`` CLI reaches this host's dockerd
through the unix socket (so ``runtime: docker`` drives a real engine, whose
host-network containers live in *this* namespace: reachable from the edge at
``host_addr``). Used by tests/integration/test_ssh.py and bench/ssh_bench.py.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

SSHD = "/usr/sbin/sshd"
PORT = 2222


@dataclass
class Edge:
    ns: str
    veth: str            # this host's end of the veth
    dev: str             # the edge's end (in ns): what shape_at: remote shapes
    host_addr: str       # this host's end of the veth
    addr: str            # the edge's address (sshd, the data port)
    port: int
    folder: Path
    key: Path            # client private key
    known_hosts: Path
    host_pub: str        # the edge's public host key line
    proc: subprocess.Popen

    def listeners(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP listener in the edge namespace."""
        out = subprocess.run(["ip", "netns", "exec", self.ns, "ss", "-Htln"], capture_output=True,
                             text=True).stdout
        found = []
        for line in out.splitlines():
            local = line.split()[3]
            host, _, port = local.rpartition(":")
            found.append((host.strip("[]"), int(port)))
        return found

    def pids(self) -> set[int]:
        return _pids_in(self.ns)


def _pids_in(ns: str) -> set[int]:
    try:
        inode = os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return set()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


def _free_subnet() -> int:
    with IPRoute() as ipr:
        used = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}
    for _ in range(200):
        x = random.randrange(256)
        if not any(u and u.startswith(f"10.214.{x}.") for u in used):
            return x
    raise RuntimeError("no free 10.214.X.0/30")


def _sshd_config(folder: Path, addr: str, port: int) -> Path:
    cfg = folder / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress {addr}
HostKey {folder}/host_key
AuthorizedKeysFile {folder}/authorized_keys
PidFile {folder}/sshd.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowAgentForwarding no
X11Forwarding no
MaxAuthTries 3
MaxSessions 64
MaxStartups 64
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    return cfg


def _wait_port(addr: str, port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {addr}:{port}")


@contextmanager
def edge_host() -> Iterator[Edge]:
    """Make the edge (see the module docstring); remove all of it on exit."""
    if not os.path.exists(SSHD):
        raise RuntimeError("openssh-server is not installed (bash scripts/setup.sh test installs it)")
    tag = "%08x" % random.getrandbits(32)
    ns, veth, peer = f"tbedge{tag}", f"tbe{tag}h", f"tbe{tag}e"
    x = _free_subnet()
    host_addr, addr = f"10.214.{x}.1", f"10.214.{x}.2"
    folder = Path(tempfile.mkdtemp(prefix="testbed-edge-"))
    proc = None
    try:
        netns.create(ns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": peer, "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=veth)[0]
            ipr.addr("add", index=idx, address=host_addr, prefixlen=30)
            ipr.link("set", index=idx, state="up")
        with IPRoute(netns=ns, flags=0) as ipr:
            idx = ipr.link_lookup(ifname=peer)[0]
            ipr.addr("add", index=idx, address=addr, prefixlen=30)
            ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=host_addr)
        host_pub = _keygen(folder / "host_key", "edge-host")
        client_pub = _keygen(folder / "client_key", "testbed-client")
        (folder / "authorized_keys").write_text(client_pub + "\n")
        known = folder / "known_hosts"
        known.write_text(f"[{addr}]:{PORT} {' '.join(host_pub.split()[:2])}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        cfg = _sshd_config(folder, addr, PORT)
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", SSHD, "-D", "-e", "-f", str(cfg)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(folder / "sshd.log", "wb"), start_new_session=True)
        _wait_port(addr, PORT, proc)
        yield Edge(ns=ns, veth=veth, dev=peer, host_addr=host_addr, addr=addr, port=PORT, folder=folder,
                   key=folder / "client_key", known_hosts=known, host_pub=host_pub, proc=proc)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            victims = _pids_in(ns) | ({proc.pid} if proc and proc.poll() is None else set())
            for pid in victims:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            netns.remove(ns)
        except OSError:
            pass
        # Removing the namespace destroys the peer, which takes this end along a moment
        # later: it may be gone between the lookup and the delete.
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=veth):
                try:
                    ipr.link("del", index=idx)
                except NetlinkError as e:
                    if e.code not in (errno.ENODEV, errno.ENOENT):
                        raise
        shutil.rmtree(folder, ignore_errors=True)
