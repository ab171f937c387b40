"""Where a shaper acts: an interface in the host, a named netns, or a pid's netns.

Owns: naming the target (``Target``), the path of its network namespace
(``/run/netns/NAME`` or ``/proc/PID/ns/net`` — how a container's namespace is
reached), and a stable key for the state file. Opening netlink sockets in
that namespace is ``testbed.link.netlink``'s job.

A target is the egress of ``dev`` unless ``ingress`` is set: then it is what ``dev``
*receives*, shaped at the egress of an IFB device beside it (``ifb``, a name derived
from the target) to which the device's ingress is redirected. That is how a
direction is shaped on this host when the sending end is another machine (an SSH
remote node's downlink arrives here).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

NETNS_DIR = "/run/netns"


@dataclass(frozen=True)
class Target:
    """An interface (``dev``) in the host (default), in a named network
    namespace (``netns``), or in the namespace of process ``pid`` (a
    container's init). ``netns`` and ``pid`` are exclusive."""

    dev: str
    netns: str | None = None
    pid: int | None = None
    ingress: bool = False

    def __post_init__(self) -> None:
        if self.netns is not None and self.pid is not None:
            raise ValueError("give netns or pid, not both")
        if not self.dev or "/" in self.dev or len(self.dev) > 15:
            raise ValueError(f"not an interface name: {self.dev!r}")
        if self.netns is not None and ("/" in self.netns or not self.netns):
            raise ValueError(f"not a namespace name: {self.netns!r} (use pid= for a process's namespace)")

    @property
    def netns_path(self) -> str | None:
        """Path of the namespace file, or None for the host's namespace."""
        if self.netns is not None:
            return os.path.join(NETNS_DIR, self.netns)
        if self.pid is not None:
            return f"/proc/{self.pid}/ns/net"
        return None

    def namespace_inode(self) -> int | None:
        """Inode of the namespace (identifies it even after a pid is gone)."""
        path = self.netns_path or "/proc/self/ns/net"
        try:
            return os.stat(path).st_ino
        except OSError:
            return None

    @property
    def key(self) -> str:
        """File-name-safe key: ``host-eth0``, ``ns-tbA-veth0``, ``pid-1234-eth0``
        (``...-ingress`` for an ingress target)."""
        where = f"ns-{self.netns}" if self.netns else f"pid-{self.pid}" if self.pid else "host"
        return f"{where}-{self.dev}" + ("-ingress" if self.ingress else "")

    @property
    def ifb(self) -> str:
        """Name of the IFB device carrying an ingress target's traffic (15 characters
        at most, derived from the target so cleanup finds it)."""
        return "tbi" + hashlib.sha1(self.key.encode()).hexdigest()[:10]

    def egress_of_ifb(self) -> "Target":
        """The egress target where an ingress target is really shaped."""
        return Target(self.ifb, netns=self.netns, pid=self.pid)

    def __str__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else f" in the netns of pid {self.pid}" if self.pid else ""
        return f"{self.dev}{where}" + (f" (ingress, via {self.ifb})" if self.ingress else "")
