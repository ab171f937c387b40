"""A split folder's ``manifest.json``: its name, its required keys, reading it back.

The splitter writes manifests (``splitter.split_model`` / ``materialize``);
verification, the sweep and the report read them. Kept apart so a reader does
not need the writer (and the writer's verification does not import itself back).
"""

from __future__ import annotations

import json
from pathlib import Path

from testbed.errors import ModelError

MANIFEST = "manifest.json"
# Every split entry carries these (plus ``cut``, and optional ``verify``).
SPLIT_KEYS = ("k", "head", "tail", "head_bytes", "tail_bytes", "head_sha256", "tail_sha256")


def load_manifest(directory: str | Path) -> dict:
    """Read ``directory/manifest.json`` written by ``split_model`` or ``materialize``.

    Raises:
        ModelError: missing, not JSON, or lacking the keys consumers rely on.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise ModelError(f"cannot read manifest: {e.strerror or e}", path=str(path)) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"manifest is not JSON ({e})", path=str(path)) from e
    try:
        for key in ("path", "sha256", "layers", "bytes"):
            manifest["model"][key]
        for split in manifest["splits"]:
            for key in (*SPLIT_KEYS, "cut"):
                split[key]
    except (KeyError, TypeError) as e:
        raise ModelError(f"manifest lacks {e}", path=str(path)) from e
    return manifest
