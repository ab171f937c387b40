"""``testbed netem``: list, validate, apply, show, clear link profiles; check the kernel.

Thin: parses, calls ``testbed.link``, prints. Errors are ``TestbedError`` and
become one red line in ``testbed.cli``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from testbed.errors import ShapingError
from testbed.link.profile import DIRECTIONS, Direction, list_profiles, load_profile
from testbed.link.target import Target
from testbed.units import format_duration, format_rate

app = typer.Typer(help="Link profiles and the shaper (tc/netem through netlink).\n\n"
                       "Example: testbed netem apply ladder-10mbit --dev veth0 --netns ue --direction uplink",
                  no_args_is_help=True)

Netns = Annotated[str | None, typer.Option("--netns", help="Named network namespace holding the interface.")]
Pid = Annotated[int | None, typer.Option(
    "--pid", help="A process (e.g. a container) whose network namespace holds it.")]


def _target(dev: str, netns: str | None, pid: int | None) -> Target:
    try:
        return Target(dev, netns=netns, pid=pid)
    except ValueError as e:
        raise ShapingError(str(e)) from None


def _summary(d: Direction | None) -> str:
    if d is None:
        return "-"
    parts = []
    if d.rate_bps:
        parts.append(format_rate(d.rate_bps))
    if d.delay_s:
        parts.append(format_duration(d.delay_s) + (f"±{format_duration(d.jitter_s)}" if d.jitter_s else ""))
    if d.loss is not None:
        parts.append(f"loss {d.loss.random_pct:g}%" if d.loss.random_pct is not None
                     else "GE loss" if d.loss.gemodel else "4-state loss")
    if d.slot is not None:
        parts.append("slots")
    return " ".join(parts) or "-"


@app.command("list")
def list_cmd() -> None:
    """Show the shipped profiles (netem_profiles/).

    Example: testbed netem list
    """
    table = Table("uplink", "downlink", "netem", "varies")
    table.add_column("name", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for p in list_profiles():
        table.add_row(p.name, _summary(p.uplink), _summary(p.downlink), "yes" if p.needs_netem() else "no",
                      p.trace.direction if p.trace else "")
    Console().print(table)


@app.command()
def validate(file: Annotated[str, typer.Argument(help="A profile file (or a shipped profile's name).")]) -> None:
    """Check one profile file; errors name file, line and field.

    Example: testbed netem validate netem_profiles/lte.yaml
    """
    p = load_profile(file)
    typer.echo(f"ok: {p.name} (needs netem: {'yes' if p.needs_netem() else 'no'})")


@app.command()
def apply(profile: Annotated[str, typer.Argument(help="Profile name or file.")],
          dev: Annotated[str, typer.Option("--dev", help="Interface to shape (its egress).")],
          netns: Netns = None, pid: Pid = None,
          direction: Annotated[str, typer.Option("--direction", help="uplink or downlink.")] = "uplink",
          arrangement: Annotated[str, typer.Option(
              "--arrangement", help="auto (=tbf; htb with overhead), tbf, htb or netem.")] = "auto",
          duration: Annotated[float | None, typer.Option(
              "--duration", help="Time-varying profiles: step for this many seconds (default: until Ctrl-C).")] = None,
          ) -> None:
    """Apply one direction of PROFILE to the egress of DEV (in place if already shaped).

    Example: testbed netem apply ladder-10mbit --dev veth0 --netns ue --direction uplink
    """
    from testbed.link.shaper import Shaper
    from testbed.link.stepper import Stepper

    if direction not in DIRECTIONS:
        raise ShapingError(f"--direction must be uplink or downlink, not {direction!r}")
    p = load_profile(profile)
    schedule = p.schedule(direction)
    if not schedule:
        raise ShapingError(f"profile {p.name} does not shape the {direction}")
    with Shaper(_target(dev, netns, pid), arrangement=arrangement) as shaper:
        if len(schedule) == 1:
            emulation = shaper.apply(schedule[0][1], p.name)
            typer.echo(f"{p.name} {direction} on {shaper.target}: {emulation}")
            return
        stepper = Stepper(shaper, schedule, p.period_s(), p.name).start()
        typer.echo(f"{p.name} {direction} on {shaper.target}: {shaper.emulation}, stepping "
                   f"{len(schedule)} steps{' (looping)' if p.period_s() else ''}; Ctrl-C stops")
        try:
            deadline = None if duration is None else time.monotonic() + duration
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
                if stepper.failure is not None:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stepper.stop()
        report = stepper.report()
        if report["failure"]:
            raise ShapingError(f"stepping failed: {report['failure']}")
        if report["steps"]:
            typer.echo(f"steps: {report['steps']}, timing error mean {report['mean_error_s'] * 1e3:.2f} ms, "
                       f"max {report['max_error_s'] * 1e3:.2f} ms (shaping left at the last step)")


@app.command()
def show(dev: Annotated[str | None, typer.Option(
             "--dev", help="Interface (default: every one the testbed recorded as shaped).")] = None,
         netns: Netns = None, pid: Pid = None,
         as_json: Annotated[bool, typer.Option("--json", help="Everything read back, as JSON.")] = False) -> None:
    """Read the qdiscs on DEV back from the kernel.

    Example: testbed netem show --dev veth0 --netns ue
    """
    from testbed.link import state
    from testbed.link.shaper import Shaper

    if dev is None:
        targets = [t for t, _ in state.records(state.state_dir())]
        if not targets:
            typer.echo("no interface recorded as shaped by the testbed (give --dev to look at one)")
            return
    else:
        targets = [_target(dev, netns, pid)]
    for target in targets:
        try:
            with Shaper(target) as shaper:
                info = shaper.show()
        except ShapingError as e:
            if dev is not None:
                raise
            typer.echo(f"{target}: gone ({e})")
            continue
        _print_show(info, as_json)


def _print_show(info: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(info, indent=1, default=str))
        return
    if not info["ours"]:
        root = info["root"]
        typer.echo(f"{info['target']}: not shaped by the testbed (root: {root['kind'] if root else 'none'})")
        return
    parts = [info["emulation"]]
    if info["rate_bps"]:
        parts.append(format_rate(info["rate_bps"]))
    if info["delay_s"]:
        parts.append(f"delay {format_duration(info['delay_s'])}")
    profile = (info.get("record") or {}).get("profile")
    typer.echo(f"{info['target']}: {' '.join(parts)}" + (f" (profile {profile})" if profile else ""))


@app.command()
def clear(dev: Annotated[str | None, typer.Option("--dev", help="Interface to clear.")] = None,
          netns: Netns = None, pid: Pid = None,
          all_: Annotated[bool, typer.Option(
              "--all", help="Clear every interface the testbed recorded (after a crashed run).")] = False) -> None:
    """Remove what the testbed added to DEV (or, with --all, everywhere it recorded).

    Example: testbed netem clear --dev veth0 --netns ue
    """
    from testbed.link.shaper import Shaper

    if all_:
        removed = Shaper.clear_recorded()
        typer.echo("cleared: " + (", ".join(removed) if removed else "nothing recorded"))
        return
    if dev is None:
        raise ShapingError("give --dev (with --netns/--pid) or --all")
    with Shaper(_target(dev, netns, pid)) as shaper:
        removed = shaper.clear()
    typer.echo(f"{shaper.target}: {'cleared' if removed else 'nothing of the testbed to clear'}")


@app.command()
def check() -> None:
    """What this kernel can do (netem, htb, tbf) and what that means for profiles.

    Example: testbed netem check
    """
    from testbed.link.shaper import detect_capabilities, how_to_get

    caps = detect_capabilities()
    for kind in ("netem", "htb", "tbf"):
        typer.echo(f"{kind:6} {'yes' if getattr(caps, kind) else 'NO'}")
    if caps.netem:
        typer.echo("every profile can run")
    else:
        usable = [p.name for p in list_profiles() if not p.needs_netem()]
        typer.echo(f"rate-only profiles run (htb/tbf): {', '.join(usable)}")
        typer.echo("profiles with delay/jitter/loss/slots are refused. " + how_to_get(["netem"], caps.kernel))
