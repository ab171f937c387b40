"""Shaping a direction on another machine: the shaper run there, driven from here.

``shape_at: remote`` shapes an ssh remote node's downlink at the egress of the
remote host's own interface (with NET_ADMIN there, i.e. root or passwordless sudo).
That interface also carries the SSH connection (the control plane), so only the
agent's data flow is shaped: ``Shaper(match_sport=data port)``. The remote runs this
very module (``python -m testbed.link.remote``, from the venv ``testbed.deploy.ssh``
made with the ``testbed`` package and pyroute2) — the same shaper and netlink code as
here, one process per operation, answering one JSON line:

    caps                               what the remote kernel can shape
    route-dev ADDR                     the interface the remote reaches ADDR through, and
                                       whether a testbed qdisc is on it already (another run's)
    apply DEV SPORT PROFILE JSON CAPS  install/change a direction (JSON: Direction in base
                                       units; CAPS: what ``caps`` said, so it is probed once)
    clear DEV                          remove it

``RemoteShaper`` is the orchestrator's side: the interface ``testbed.link.Link`` drives
(``plan`` here, against the remote's capabilities; ``apply``/``change``/``clear`` there).
Time-varying (trace) profiles are refused: stepping would cost an SSH round trip and a
process start per step. ``RemoteTarget`` is the Node's ``shaping`` for such a direction.
Leaves the SSH connection to ``testbed.deploy.sshconn`` (handed in as ``run``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from testbed.errors import ShapingError

Runner = Callable[[list[str]], str]  # runs ``python -m testbed.link.remote ARGS`` there, returns stdout


def parse_answer(out: str, where: str) -> dict[str, Any]:
    """The JSON line a ``python -m testbed.link.remote`` command printed last.

    Raises:
        ShapingError: it printed no JSON, or answered an error.
    """
    try:
        answer = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ShapingError(f"remote shaper answered {out[:120]!r}", interface=where) from None
    if "error" in answer:
        raise ShapingError(f"on the remote: {answer['error']}", interface=where, errno=answer.get("errno"))
    return answer


@dataclass(frozen=True)
class RemoteTarget:
    """Where a direction is shaped on the remote: ``dev`` there, only source port ``sport``."""

    dev: str
    sport: int
    host: str
    run: Runner = field(compare=False, repr=False)

    def shaper(self) -> "RemoteShaper":
        return RemoteShaper(self)

    def __str__(self) -> str:
        return f"{self.dev} on {self.host} (source port {self.sport})"


class RemoteShaper:
    """``Shaper``'s interface for a ``RemoteTarget`` (see the module docstring)."""

    steps = False  # Link.check refuses time-varying profiles for it

    def __init__(self, target: RemoteTarget) -> None:
        self.target = target
        self.emulation: str | None = None
        self.profile_name: str | None = None
        self._planner: Any = None
        self._caps: dict[str, Any] = {}

    def _call(self, *args: str) -> dict[str, Any]:
        return parse_answer(self.target.run(list(args)), str(self.target))

    def capabilities(self) -> Any:
        if self._planner is None:
            from testbed.link.shaper import Capabilities, Shaper
            from testbed.link.target import Target

            self._caps = self._call("caps")
            caps = Capabilities(**self._caps)
            # plans like the remote's shaper, never touching this host's kernel
            self._planner = Shaper(Target("remote"), capabilities=caps, match_sport=self.target.sport)
        return self._planner.capabilities()

    def plan(self, direction: Any) -> Any:
        self.capabilities()
        return self._planner.plan(direction)

    def apply(self, direction: Any, profile: str | None = None) -> str:
        self.plan(direction)
        got = self._call("apply", self.target.dev, str(self.target.sport), profile or "-",
                         json.dumps(direction.model_dump(mode="json")), json.dumps(self._caps))
        self.emulation, self.profile_name = got["emulation"], profile
        return got["emulation"]

    def change(self, direction: Any, profile: str | None = None, **_: Any) -> str:
        return self.apply(direction, profile)

    def parts_differing(self, a: Any, b: Any) -> tuple[str, ...]:
        raise ShapingError("time-varying profiles cannot be shaped on the remote (shape_at: remote); "
                           "use shape_at: local", interface=str(self.target))

    def clear(self) -> bool:
        removed = bool(self._call("clear", self.target.dev).get("removed"))
        self.emulation = self.profile_name = None
        return removed

    def close(self) -> None:
        pass


# --- the remote's side ------------------------------------------------------------------

def _route_dev(addr: str) -> dict[str, Any]:
    from pyroute2 import IPRoute

    from testbed.link.shaper import ROOT

    with IPRoute() as ipr:
        routes = ipr.route("get", dst=addr)
        index = routes[0].get_attr("RTA_OIF")
        dev = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
        shaped = any(q["index"] == index and q["handle"] == ROOT for q in ipr.get_qdiscs(index=index))
    return {"dev": dev, "shaped": shaped}


def main(argv: list[str]) -> int:
    from dataclasses import asdict

    from testbed.errors import TestbedError
    from testbed.link.profile import Direction
    from testbed.link.shaper import Capabilities, Shaper, detect_capabilities
    from testbed.link.target import Target

    try:
        cmd, args = argv[0], argv[1:]
        if cmd == "caps":
            answer: dict[str, Any] = asdict(detect_capabilities())
        elif cmd == "route-dev":
            answer = _route_dev(args[0])
        elif cmd == "apply":
            dev, sport, profile, spec, caps = args
            with Shaper(Target(dev), match_sport=int(sport), capabilities=Capabilities(**json.loads(caps))) as s:
                answer = {"emulation": s.apply(Direction.model_validate(json.loads(spec)),
                                               None if profile == "-" else profile)}
        elif cmd == "clear":
            with Shaper(Target(args[0])) as s:
                answer = {"removed": s.clear()}
        else:
            answer = {"error": f"unknown command {cmd!r}"}
    except TestbedError as e:
        answer = {"error": str(e), "errno": getattr(e, "errno", None)}
    except (IndexError, ValueError, OSError) as e:
        answer = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
