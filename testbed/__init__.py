"""Split DNN inference testbed: orchestrator package.

Runs the head of a TFLite model on a local node (emulated UE) and its tail on a
remote node (edge) across a shaped link, and records what the 3GPP SA4 split
inference evaluation framework asks for. README.md is the tutorial, docs/ the
reference. ``__version__`` is the distribution's version (pyproject.toml reads it
from here).
"""

__version__ = "0.1.0"
