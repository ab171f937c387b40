"""Ctrl-C and SIGTERM during a run: stop, tear down once, never half-way.

Owns the sweep's SIGINT/SIGTERM handlers: both raise KeyboardInterrupt in the
main thread (the run turns it into ``Interrupted``, exit 130, after teardown);
a second signal while tearing down is reported and ignored; a forked helper
that inherited the handler (pyroute2 forks to reach other namespaces) dies as
the default action would instead of running the parent's shutdown.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from rich.console import Console

from testbed.forksafe import owner_only


class Signals:
    """SIGTERM behaves like Ctrl-C; once either arrived, further ones are ignored
    so the teardown they started cannot itself be interrupted half-way."""

    def __init__(self, console: Console) -> None:
        self.console, self.stopping = console, False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.stopping:
            self.console.print("[yellow]still tearing down; please wait[/yellow]")
            return
        self.stopping = True
        raise KeyboardInterrupt

    def __enter__(self) -> "Signals":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; Ctrl-C goes there anyway
        handler = owner_only(self._handler)  # not in pyroute2's forked helpers
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
