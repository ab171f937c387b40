"""Every netlink call the deploy backends make (pyroute2), and nothing else.

Network namespaces, veth pairs, addresses and interface lookups — for the netns
backend's plumbing and for finding a container's data interface by MAC address.
Queueing disciplines are not here: shaping is ``testbed.link``'s. Every removal
tolerates "already gone", because teardown and cleanup run on half-built state.
"""

from __future__ import annotations

import errno
import os
import time

from pyroute2 import IPRoute
from pyroute2 import netns as _netns
from pyroute2.netlink.exceptions import NetlinkError

from testbed.errors import NodeError
from testbed.forksafe import configure_pyroute2

NETNS_DIR = "/run/netns"

configure_pyroute2()  # its forked namespace helpers must not run our signal handlers


def _ipr(ns: str | None = None) -> IPRoute:
    """IPRoute in the root namespace, a named netns, or a netns path
    (``/proc/PID/ns/net``)."""
    return IPRoute(netns=ns) if ns else IPRoute()


def netns_list() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    return sorted(_netns.listnetns())


def netns_create(name: str) -> None:
    try:
        _netns.create(name)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise NodeError(f"cannot create network namespace {name}: {e}") from e


def netns_remove(name: str) -> bool:
    """Remove a named netns; False when it was not there."""
    if name not in netns_list():
        return False
    try:
        _netns.remove(name)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EINVAL):
            raise NodeError(f"cannot remove network namespace {name}: {e}") from e
    return True


def netns_inode(name: str) -> int | None:
    """Inode of a named netns (to find the processes inside it), None if gone."""
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def links(ns: str | None = None) -> list[dict]:
    """[{ifname, index, mac, state}] of every link in a namespace."""
    with _ipr(ns) as ip:
        return [{"ifname": m.get("ifname"), "index": m["index"], "mac": m.get("address"),
                 "state": m.get("state")} for m in ip.get_links()]


def veth_create(name: str, peer: str, peer_ns: str) -> None:
    """A veth pair: ``name`` in the root namespace, ``peer`` directly in ``peer_ns``."""
    with _ipr() as ip:
        try:
            ip.link("add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_ns})
        except NetlinkError as e:
            raise NodeError(f"cannot create veth {name}/{peer}: {e}") from e


def link_move(ifname: str, to_ns: str) -> None:
    """Move a root-namespace link into a named netns."""
    with _ipr() as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            raise NodeError(f"interface {ifname} not found")
        ip.link("set", index=idx[0], net_ns_fd=to_ns)


def link_configure(ifname: str, ns: str | None, *, new_name: str | None = None,
                   address: str | None = None, prefixlen: int = 30) -> None:
    """Rename, address and bring up a link (and ``lo``) in a namespace."""
    with _ipr(ns) as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            raise NodeError(f"interface {ifname} not found in {ns or 'root namespace'}")
        i = idx[0]
        try:
            if new_name and new_name != ifname:
                ip.link("set", index=i, ifname=new_name)
            if address:
                ip.addr("add", index=i, address=address, prefixlen=prefixlen)
            ip.link("set", index=i, state="up")
            if ns:
                lo = ip.link_lookup(ifname="lo")
                if lo:
                    ip.link("set", index=lo[0], state="up")
        except NetlinkError as e:
            raise NodeError(f"cannot configure {ifname} in {ns or 'root namespace'}: {e}") from e


def link_delete(ifname: str, ns: str | None = None) -> bool:
    """Delete a link (a veth takes its peer along); False when it was not there."""
    try:
        with _ipr(ns) as ip:
            idx = ip.link_lookup(ifname=ifname)
            if not idx:
                return False
            ip.link("del", index=idx[0])
            return True
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise NodeError(f"cannot delete interface {ifname}: {e}") from e
    except OSError as e:  # the namespace itself is gone
        if e.errno in (errno.ENOENT, errno.EINVAL):
            return False
        raise


def root_addresses() -> list[str]:
    """IPv4 addresses configured in the root namespace (to avoid reusing a subnet)."""
    with _ipr() as ip:
        return [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(family=2)]


def ifname_by_mac(ns_path: str, mac: str, *, timeout_s: float = 5.0) -> str:
    """Name of the interface with MAC ``mac`` in a namespace (e.g. a container's,
    ``/proc/PID/ns/net``). Docker attaches networks asynchronously around start, so
    poll briefly."""
    mac = mac.lower()
    deadline = time.monotonic() + timeout_s
    while True:
        for link in links(ns_path):
            if (link["mac"] or "").lower() == mac:
                return link["ifname"]
        if time.monotonic() > deadline:
            raise NodeError(f"no interface with MAC {mac} in {ns_path}")
        time.sleep(0.1)


def wait_links_gone(names: list[str], timeout_s: float = 10.0) -> list[str]:
    """Poll until none of ``names`` exists in the root namespace (removing a
    netns frees its veths asynchronously); return those still there."""
    deadline = time.monotonic() + timeout_s
    while True:
        with _ipr() as ip:
            left = [n for n in names if ip.link_lookup(ifname=n)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def default_route(ns: str, gateway: str) -> None:
    """Route everything not on a connected network of namespace ``ns`` via ``gateway``."""
    with _ipr(ns) as ip:
        try:
            ip.route("replace", dst="0.0.0.0/0", gateway=gateway)
        except NetlinkError as e:
            raise NodeError(f"cannot set the default route of {ns} via {gateway}: {e}") from e
