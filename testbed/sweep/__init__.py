"""Running an experiment: checks, plan, the sweep over configurations, its time.

``run_experiment(path, SweepOptions())`` is the entry point (``testbed run``);
``preflight.check`` is ``testbed check``; ``estimate`` says how long a run takes.
"""

from testbed.sweep.run import Configuration, Plan, SweepOptions, pending, run_experiment

__all__ = ["Configuration", "Plan", "SweepOptions", "pending", "run_experiment"]
