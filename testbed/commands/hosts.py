"""``testbed hosts check``: what works on a machine an ssh remote node would run on.

Thin: parses ``[USER@]HOST[:PORT]``, calls ``testbed.deploy.hostcheck``, prints one
line per check, exits 1 when any failed (a connection failure is the one line).
"""

from __future__ import annotations

import getpass
import re
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from testbed.errors import ConfigError, NodeError

app = typer.Typer(help="Remote hosts for ssh nodes.\n\n"
                       "Example: testbed hosts check bench@edge.lab.example --key ~/.ssh/id_ed25519",
                  no_args_is_help=True)

_TARGET = re.compile(r"^(?:(?P<user>[A-Za-z_][A-Za-z0-9_.-]*)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)"
                     r"(?::(?P<port>[0-9]{1,5}))?$")


def parse_target(text: str, user: str | None, port: int | None) -> tuple[str, str, int]:
    """``[USER@]HOST[:PORT]`` -> (user, host, port); options win over the text."""
    m = _TARGET.match(text)
    if not m:
        raise ConfigError(f"expected [USER@]HOST[:PORT], got {text!r}", field="HOST")
    got_port = int(m.group("port")) if m.group("port") else 22
    p = port if port is not None else got_port
    if not 1 <= p <= 65535:
        raise ConfigError(f"port must be 1..65535, got {p}", field="HOST")
    return user or m.group("user") or getpass.getuser(), m.group("host").strip("[]"), p


@app.command("check")
def check(
    host: Annotated[str, typer.Argument(metavar="[USER@]HOST[:PORT]")],
    key: Annotated[str, typer.Option("--key", "-i", help="Private key file to log in with (the only key tried).")],
    known_hosts: Annotated[str, typer.Option(
        "--known-hosts", help="known_hosts file to check the host key against (strictly: an unknown key is "
                              "refused).")] = "~/.ssh/known_hosts",
    user: Annotated[str | None, typer.Option("--user", "-u", help="Remote user (default: USER@ or yours).")] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", help="SSH port (default: :PORT or 22).")] = None,
    ports: Annotated[str, typer.Option("--ports", help="Agent control,data,metrics ports to test.")]
    = "7700,7701,7702",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the host.")] = 10.0,
) -> None:
    """Check a host for an ssh remote node: reachable, host key known, auth, python3/venv,
    disk, Docker, free agent ports, clock offset to this host, remote qdiscs.

    Example: testbed hosts check bench@edge.lab.example --key ~/.ssh/id_ed25519
    """
    from testbed.deploy.hostcheck import check_host
    from testbed.deploy.sshconn import HostSpec

    u, h, p = parse_target(host, user, port)
    try:
        agent_ports = tuple(int(x) for x in ports.split(","))
        if len(agent_ports) != 3 or not all(1 <= x <= 65535 for x in agent_ports):
            raise ValueError
    except ValueError:
        raise ConfigError(f"expected three ports such as 7700,7701,7702, got {ports!r}", field="--ports") from None
    spec = HostSpec(host=h, user=u, port=p, key=key, known_hosts=known_hosts, timeout_s=timeout)
    findings = check_host(spec, agent_ports)  # type: ignore[arg-type]
    console = Console(highlight=False, soft_wrap=True)
    failed = [f for f in findings if not f.ok]
    if len(findings) <= 2 and failed:  # could not even log in: that is the one line
        raise NodeError(f"{spec.name}: {failed[0].name}: {failed[0].detail}")
    for f in findings:
        mark = "[green]ok[/green]  " if f.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {f.name:<15} {escape(f.detail)}")
    if failed:
        raise NodeError(f"{spec.name}: {len(failed)} check(s) failed: {', '.join(f.name for f in failed)}")
