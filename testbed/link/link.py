"""Both directions of a link at once: the one link object the sweep drives.

Owns: mapping a profile onto two shapers — uplink at the egress of the local
node's data interface, downlink at the remote node's — checking *both*
directions against the kernel before touching either (``check`` does it for a
whole list of profiles before a run measures anything), changing in place from
one profile to the next, starting/stopping steppers for time-varying
profiles, what each direction is emulated with now (``emulation``), and
clearing both. A direction the profile leaves out is unshaped (cleared).

Leaves to others: the qdiscs (``testbed.link.shaper``), the timing of steps
(``testbed.link.stepper``), where the interfaces are (``testbed.deploy``).

Example::

    with Link(local_node.shaping, remote_node.shaping) as link:
        for profile in profiles:
            emulation = link.apply(profile)   # {"uplink": "tbf", "downlink": "tbf"}
            ...
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from testbed.errors import ShapingError, TestbedError
from testbed.link.profile import DIRECTIONS, LinkProfile
from testbed.link.shaper import Capabilities, Shaper
from testbed.link.stepper import Stepper
from testbed.link.target import Target


class Link:
    """Shapes uplink on ``local`` and downlink on ``remote``.

    Args:
        local, remote: the data interfaces of the two nodes.
        arrangement, state_dir, capabilities: passed to both Shapers.
    """

    def __init__(self, local: Target, remote: Target, *, arrangement: str = "auto",
                 state_dir: str | Path | None = None, capabilities: Capabilities | None = None) -> None:
        first = Shaper(local, arrangement=arrangement, state_dir=state_dir, capabilities=capabilities)
        caps = capabilities or first.capabilities()
        # A target that brings its own shaper (testbed.link.remote.RemoteTarget: shaped on
        # another machine) is driven through it; the kernel there has its own capabilities.
        make = getattr(remote, "shaper", None)
        down = make() if callable(make) else Shaper(remote, arrangement=arrangement, state_dir=state_dir,
                                                    capabilities=caps)
        self.shapers = {"uplink": first, "downlink": down}
        self._steppers: dict[str, Stepper] = {}
        self.profile: LinkProfile | None = None
        # What results record per direction: tbf, htb, netem, tbf+netem, ... or none.
        self.emulation: dict[str, str] = dict.fromkeys(DIRECTIONS, "none")

    def capabilities(self) -> Capabilities:
        """What this kernel can shape (probed once)."""
        return self.shapers["uplink"].capabilities()

    def remote_capabilities(self) -> Capabilities | None:
        """What the other machine's kernel can shape when the downlink is shaped there
        (``testbed.link.remote``), else None."""
        down = self.shapers["downlink"]
        return None if isinstance(down, Shaper) else down.capabilities()

    def check(self, profiles: list[LinkProfile]) -> None:
        """Refuse, before anything is shaped or measured, a profile (any direction,
        any trace step) this kernel cannot honour; the message names the profile,
        the direction, what is missing and how to get it.

        Raises:
            ShapingError (or another TestbedError from the shaper's plan).
        """
        for prof in profiles:
            for which, shaper in self.shapers.items():
                if len(prof.schedule(which)) > 1 and not getattr(shaper, "steps", True):
                    raise ShapingError(f"profile {prof.name!r} {which}: a time-varying profile cannot be "
                                       f"stepped on {shaper.target}; shape it on this host")
                for _, direction in prof.schedule(which):
                    try:
                        shaper.plan(direction)
                    except TestbedError as e:
                        raise type(e)(f"profile {prof.name!r} {which}: {e}") from None

    def apply(self, profile: LinkProfile) -> dict[str, str | None]:
        """Shape both directions as ``profile`` says (in place when already
        shaped). Returns the emulation per direction (None = unshaped).

        Raises:
            ShapingError: before anything changed if either direction (any
                step of a trace) is beyond this kernel.
        """
        schedules = {d: profile.schedule(d) for d in DIRECTIONS}
        for which, schedule in schedules.items():
            for _, direction in schedule:
                self.shapers[which].plan(direction)   # refuses before any change
        self._stop_steppers()
        out: dict[str, str | None] = {}
        for which, schedule in schedules.items():
            shaper = self.shapers[which]
            if not schedule:
                shaper.clear()
                out[which] = None
            elif len(schedule) == 1:
                out[which] = shaper.apply(schedule[0][1], profile.name)
            else:
                self._steppers[which] = Stepper(shaper, schedule, profile.period_s(), profile.name).start()
                out[which] = shaper.emulation
            self.emulation[which] = out[which] or "none"
        self.profile = profile
        return out

    def _stop_steppers(self) -> None:
        for st in self._steppers.values():
            st.stop()
        self._steppers.clear()

    def clear(self) -> None:
        """Stop stepping and remove the shaping from both interfaces."""
        self._stop_steppers()
        for shaper in self.shapers.values():
            shaper.clear()
        self.profile = None

    def teardown(self) -> None:
        """Clear and close, swallowing every error: it runs while a run is torn
        down, where the interfaces may already be gone with their nodes."""
        for step in (self._stop_steppers, *(s.clear for s in self.shapers.values()),
                     *(s.close for s in self.shapers.values())):
            with contextlib.suppress(Exception):
                step()

    def close(self) -> None:
        """Stop stepping and close sockets; shaping stays (call ``clear`` first)."""
        self._stop_steppers()
        for shaper in self.shapers.values():
            shaper.close()

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.clear()
        finally:
            self.close()
