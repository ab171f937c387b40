"""Letting a local node's data traffic out of this host, toward a remote machine.

With an SSH remote the local node (a network namespace) must reach another
machine: its data veth ends in this host's root namespace, which routes the
traffic on and masquerades it behind its own address (the edge knows no route
back to the node's private /30). Owns the three iptables rules that allow it —
accept forwarding from the node's veth, accept the replies back to it, masquerade —
each tagged with ``testbed-<run id>`` in an iptables comment so teardown and
``cleanup`` remove exactly this run's rules (``remove_tagged``) and nothing else;
and ``net.ipv4.ip_forward`` (switched on only when off, and then recorded so it
is switched back at teardown).

Rules go in with iptables' own CLI (argument lists, ``-w`` to wait for the xtables
lock) because Docker, when present, already owns the FORWARD chain with a DROP
policy in that same (iptables-nft) ruleset: a table of our own could not
override it. Leaves the namespace and veths to ``testbed.deploy.netns``.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from pathlib import Path

from testbed.errors import NodeError

log = logging.getLogger("testbed.deploy")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def tag(run_id: str) -> str:
    return f"testbed-{run_id}"


def _iptables() -> str | None:
    return shutil.which("iptables")


def _rules(run_id: str, veth: str, subnet: str) -> list[tuple[str, list[str]]]:
    """(table, rule spec without -A/-I/-D) of the run."""
    comment = ["-m", "comment", "--comment", tag(run_id)]
    return [
        ("filter", ["FORWARD", "-i", veth, *comment, "-j", "ACCEPT"]),
        ("filter", ["FORWARD", "-o", veth, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                    *comment, "-j", "ACCEPT"]),
        ("nat", ["POSTROUTING", "-s", subnet, "!", "-o", veth, *comment, "-j", "MASQUERADE"]),
    ]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def allow(run_id: str, veth: str, subnet: str) -> dict:
    """Forward and masquerade ``subnet`` arriving on ``veth``. Returns what to record
    in the run's state (``{"ip_forward_was": 0}`` when forwarding was switched on)."""
    record: dict = {}
    try:
        if IP_FORWARD.read_text().strip() != "1":
            IP_FORWARD.write_text("1\n")
            record["ip_forward_was"] = 0
            log.info("switched net.ipv4.ip_forward on for run %s", run_id)
    except OSError as e:
        raise NodeError(f"cannot enable IPv4 forwarding ({e.strerror}); the local node cannot "
                        "reach the remote host") from e
    exe = _iptables()
    if exe is None:
        log.info("no iptables: relying on the host's forwarding policy")
        return record
    for table, spec in _rules(run_id, veth, subnet):
        chain, rest = spec[0], spec[1:]
        r = _run([exe, "-w", "-t", table, "-I", chain, "1", *rest])
        if r.returncode != 0:
            raise NodeError(f"iptables refused a forwarding rule for the local node: "
                            f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']}")
    return record


def remove_tagged(run_id: str) -> list[str]:
    """Delete every iptables rule carrying this run's tag (filter and nat)."""
    exe = _iptables()
    if exe is None:
        return []
    removed = []
    marker = f'--comment {tag(run_id)} '
    for table in ("filter", "nat"):
        r = _run([exe, "-w", "-t", table, "-S"])
        for line in r.stdout.splitlines():
            # our own rules only: -A CHAIN ... --comment testbed-<run> ...
            if not line.startswith("-A ") or marker not in line + " ":
                continue
            spec = shlex.split(line)[1:]
            if _run([exe, "-w", "-t", table, "-D", *spec]).returncode == 0:
                removed.append(f"iptables {table} {spec[0]} rule {tag(run_id)}")
    return removed


def restore(record: dict) -> list[str]:
    """Switch IPv4 forwarding back off when this run switched it on."""
    if record.get("ip_forward_was") == 0:
        try:
            IP_FORWARD.write_text("0\n")
            return ["net.ipv4.ip_forward back to 0"]
        except OSError:
            return []
    return []
