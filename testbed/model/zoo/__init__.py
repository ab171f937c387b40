"""The model zoo: the built-in PoseNet, the official PoseNet fetched with a checksum,
and models registered by hand, kept in ``~/.cache/testbed/models``.

``resolve(spec)`` turns an experiment's model spec into a file path:
``{"builtin": "posenet", "seed": 0}`` builds (once, cached), ``{"path": P, "sha256": H}``
checks the file, ``{"fetch": "posenet"}`` uses the registered/fetched file. The
registry itself is ``zoo.registry``; the builder is ``zoo.posenet``.
"""

from __future__ import annotations

from testbed.model.zoo.posenet import build_posenet
from testbed.model.zoo.registry import (
                                        BUILTINS,
                                        OFFICIAL,
                                        Registry,
                                        add,
                                        build_builtin,
                                        builtin_path,
                                        cache_dir,
                                        fetch,
                                        list_models,
                                        resolve,
)

__all__ = ["BUILTINS", "OFFICIAL", "Registry", "add", "build_builtin", "build_posenet", "builtin_path",
           "cache_dir", "fetch", "list_models", "resolve"]
