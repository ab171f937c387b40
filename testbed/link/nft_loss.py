"""Random packet loss with nftables, for kernels without sch_netem.

``NftLoss(target, percent)`` adds, inside the node's network namespace, one table
``inet testbed_loss_<tag>`` whose output chain drops ``percent`` % of the packets
leaving the node's data interface::

    oifname "<dev>" numgen random mod 100 < <percent> drop

and removes the whole table on ``remove()`` (tolerating "already gone": the namespace
may have been torn down first, which takes the table with it). The rule set goes to
``nft -f -`` on stdin, run through ``nsenter --net=<namespace>`` with an argument list;
nothing is parsed from nft's text output.

Whole percents only (``numgen random mod 100``). It drops every protocol leaving the
interface, as a lossy link would: the UDP datagrams of the cut, and the TCP segments
of the data link (TCP retransmits them). The control plane never crosses this
interface. This module owns the rule's life; which node and when is the sweep's
(``testbed.sweep.run``), profile-driven loss (netem) the shaper's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

from testbed.errors import ShapingError

_TAG = re.compile(r"[A-Za-z0-9_]{1,40}")
_DEV = re.compile(r"[A-Za-z0-9_.@-]{1,15}")


def netns_path(target: Any) -> str:
    """The namespace file of a shaping target (``Target``: ``netns`` name or ``pid``)."""
    if getattr(target, "netns", None):
        return f"/run/netns/{target.netns}"
    if getattr(target, "pid", None):
        return f"/proc/{int(target.pid)}/ns/net"
    return "/proc/self/ns/net"


def ruleset(tag: str, dev: str, percent: int) -> str:
    """The nft script that adds the table (pure; tested without root)."""
    if not _TAG.fullmatch(tag) or not _DEV.fullmatch(dev) or not 0 < percent <= 100:
        raise ValueError(f"bad nft loss rule: tag {tag!r}, dev {dev!r}, percent {percent!r}")
    return (f"table inet testbed_loss_{tag} {{\n"
            f"  chain out {{\n"
            f"    type filter hook output priority 0; policy accept;\n"
            f"    oifname \"{dev}\" numgen random mod 100 < {percent} drop\n"
            f"  }}\n"
            f"}}\n")


def _nft(ns: str, args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    nsenter, nft = shutil.which("nsenter"), shutil.which("nft")
    if nsenter is None or nft is None:
        raise ShapingError("nftables loss needs the 'nft' and 'nsenter' commands "
                           "(apt-get install nftables util-linux)")
    return subprocess.run([nsenter, f"--net={ns}", nft, *args], input=script, capture_output=True,
                          text=True, timeout=30)


class NftLoss:
    """One loss rule on one node's data interface; a context manager."""

    def __init__(self, target: Any, percent: float, tag: str) -> None:
        self.ns, self.dev = netns_path(target), str(target.dev)
        self.percent, self.tag = int(percent), tag
        self.table = f"testbed_loss_{tag}"
        self.installed = False

    def install(self) -> "NftLoss":
        proc = _nft(self.ns, ["-f", "-"], ruleset(self.tag, self.dev, self.percent))
        if proc.returncode != 0:
            raise ShapingError(f"nft could not add the {self.percent}% loss rule on {self.dev}: "
                               f"{proc.stderr.strip()[:300]}")
        self.installed = True
        return self

    def remove(self) -> None:
        if not self.installed:
            return
        try:
            _nft(self.ns, ["delete", "table", "inet", self.table])
        except (OSError, subprocess.SubprocessError, ShapingError):
            pass  # the namespace is gone, and the table with it
        self.installed = False

    def __enter__(self) -> "NftLoss":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()
