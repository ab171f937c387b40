"""Node agent: runs inside each node, depends on numpy and LiteRT only.

Nothing here imports from ``testbed``; the orchestrator imports the wire protocol
from ``nodes.protocol``.
"""
