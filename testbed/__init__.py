"""Split DNN inference testbed: orchestrator package.

Runs the head of a TFLite model on a local node (emulated UE) and its tail on a
remote node (edge) across a shaped link, and records what the 3GPP SA4 split
inference evaluation framework asks for. See ARCHITECTURE.md in shared/.
"""

__version__ = "0.1.0"
