"""Signal handling that survives pyroute2's forked helpers.

Trap: pyroute2 reaches another network namespace through a forked child, which
it stops with SIGTERM. That child inherits the parent's Python signal handlers
(the sweep's, deploy's), so it would run the parent's shutdown path, survive,
and go on executing the parent's code. Two defences, both here:

- ``configure_pyroute2()`` sets pyroute2's ``disable_mp_signal``, which makes
  its children reset SIGINT/SIGTERM to their defaults first (the flag says "mp"
  but pyroute2 honours it in fork mode too). Process-wide, on purpose; every
  module that talks netlink calls it at import.
- ``owner_only(handler)`` wraps a handler so that in any process other than
  the one that installed it, it dies as the default action would instead.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Callable

Handler = Callable[[int, "FrameType | None"], None]


def configure_pyroute2() -> None:
    import pyroute2.config

    pyroute2.config.disable_mp_signal = True


def owner_only(handler: Handler) -> Handler:
    """``handler`` in this process; in a forked child, the default action of the signal."""
    owner = os.getpid()

    def guarded(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        handler(signum, frame)

    return guarded
