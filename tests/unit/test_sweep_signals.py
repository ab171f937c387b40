"""The sweep's signal handling: SIGTERM is Ctrl-C in the sweep, and only there."""

import os
import signal
import time

import pytest
from rich.console import Console

from testbed.sweep.signals import Signals as _Signals

pytestmark = pytest.mark.unit


def test_sigterm_interrupts_the_sweep_and_a_second_one_is_held():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with _Signals(Console(quiet=True)):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during teardown: held
                time.sleep(0.1)
                raise
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_forked_child_dies_of_sigterm_instead_of_running_the_sweeps_shutdown():
    """pyroute2 forks helpers and ends them with SIGTERM; they inherit the handler
    and must not unwind the parent's copied stack (that would tear down the run)."""
    with _Signals(Console(quiet=True)):
        pid = os.fork()
        if pid == 0:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()
            except BaseException:
                os._exit(3)  # the sweep's shutdown path ran in the child: wrong
            os._exit(4)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
