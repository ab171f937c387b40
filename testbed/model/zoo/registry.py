"""Where models live on disk and how a model spec becomes a verified file.

The registry is ``<cache>/registry.json`` (cache: ``$TESTBED_CACHE/models`` or
``$XDG_CACHE_HOME/testbed/models`` or ``~/.cache/testbed/models``): name -> path,
sha256, bytes, source. Built-in models are built on first use and cached under
``builtin-<name>-seed<N>.tflite``. Fetching downloads over HTTPS with a pinned
checksum; without a network it fails in one line naming the URL and the
``testbed models add`` command for a file fetched by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ModelError
from testbed.model import tflite
from testbed.model.zoo.posenet import build_posenet


@dataclass(frozen=True)
class Official:
    url: str
    # None: no checksum could be pinned from an authoritative source yet (we
    # could not download the file while writing this). Then fetch/add record
    # the file's sha256 and say it was not verified; pin it here once known.
    sha256: str | None
    file_name: str


OFFICIAL = {
    "posenet": Official(
        url="https://storage.googleapis.com/download.tensorflow.org/models/tflite/"
            "posenet_mobilenet_v1_100_257x257_multi_kpt_stripped.tflite",
        sha256=None,
        file_name="posenet_mobilenet_v1_100_257x257_multi_kpt_stripped.tflite"),
}
BUILTINS = {"posenet": build_posenet}


def cache_dir() -> Path:
    if os.environ.get("TESTBED_CACHE"):
        return Path(os.environ["TESTBED_CACHE"]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "testbed" / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Registry:
    """``registry.json`` in a cache directory (read on every call; tiny)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else cache_dir()
        self.file = self.root / "registry.json"

    def entries(self) -> dict[str, dict]:
        try:
            data = json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"model registry unreadable ({e}); delete it to start afresh",
                             path=str(self.file)) from e
        return data if isinstance(data, dict) else {}

    def put(self, name: str, entry: dict) -> None:
        entries = self.entries()
        entries[name] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.file)


def build_builtin(name: str, seed: int = 0, scheme: str = "float32") -> bytes:
    """The bytes of a built-in model in one of ``builder.SCHEMES`` (float32: the pinned one).

    Raises:
        ModelError: unknown model or scheme.
    """
    from testbed.model.builder import SCHEMES
    if name not in BUILTINS:
        raise ModelError(f"unknown built-in model {name!r} (have: {', '.join(BUILTINS)})")
    if scheme not in SCHEMES:
        raise ModelError(f"unknown quantization scheme {scheme!r} (have: {', '.join(SCHEMES)})")
    return BUILTINS[name](seed, scheme)


def builtin_path(name: str = "posenet", seed: int = 0, root: Path | None = None, scheme: str = "float32") -> Path:
    """Build (once) and return the cached file of a built-in model."""
    data = build_builtin(name, seed, scheme)
    root = Path(root) if root else cache_dir()
    suffix = "" if scheme == "float32" else f"-{scheme}"
    path = root / f"builtin-{name}-seed{seed}{suffix}.tflite"
    # Rebuilding costs ~0.3 s and guarantees the cached file is the current
    # builder's output (a stale or damaged cache never survives).
    if not path.is_file() or path.stat().st_size != len(data) or sha256_file(path) != hashlib.sha256(data).hexdigest():
        _atomic_write(path, data)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add(name: str, source: str | Path, root: Path | None = None, origin: str = "added") -> dict:
    """Register a TFLite file under ``name`` (copied into the cache after validation).

    Raises:
        ModelError: unreadable or not a TFLite model, or checksum differs from the pin.
    """
    src = Path(source)
    tflite.read(src)  # refuses non-TFLite / truncated files with one line
    digest = sha256_file(src)
    official = OFFICIAL.get(name)
    if official and official.sha256 and digest != official.sha256:
        raise ModelError(f"sha256 {digest} does not match the pinned {official.sha256} of the official "
                         f"{name} ({official.url})", path=str(src))
    reg = Registry(root)
    dest = reg.root / f"{name}.tflite"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dest.resolve():
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    entry = {"path": str(dest), "sha256": digest, "bytes": dest.stat().st_size, "source": origin,
             "verified": bool(official and official.sha256)}
    reg.put(name, entry)
    return {"name": name, **entry}


def fetch(name: str = "posenet", dest: Path | None = None, root: Path | None = None,
          timeout: float = 30.0) -> dict:
    """Download an official model, check its pinned sha256, register it.

    Raises:
        ModelError: unknown name, download failed (one line: URL and the manual
            route), or checksum mismatch.
    """
    if name not in OFFICIAL:
        raise ModelError(f"no official download for {name!r} (have: {', '.join(OFFICIAL)})")
    off = OFFICIAL[name]
    target_dir = Path(dest) if dest else Registry(root).root
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=f".{off.file_name}.", suffix=".part")
    try:
        try:
            with urllib.request.urlopen(off.url, timeout=timeout) as r, os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", None) or e
            raise ModelError(f"cannot download {off.url} ({reason}); fetch it by hand and register it with "
                             f"`testbed models add {name} PATH`") from e
        final = target_dir / off.file_name
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return add(name, final, root=root, origin=off.url)


def list_models(root: Path | None = None) -> list[dict]:
    """Built-in models (as they would be built) and registered ones."""
    rows = []
    for name, build in BUILTINS.items():
        data = build(0)
        rows.append({"name": name, "source": "builtin (seed 0)", "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "path": None})
    for name, e in sorted(Registry(root).entries().items()):
        rows.append({"name": name, "source": e.get("source", "?"), "bytes": e.get("bytes"),
                     "sha256": e.get("sha256"), "path": e.get("path")})
    return rows


def resolve(spec: dict, root: Path | None = None) -> Path:
    """Turn a model spec into a verified file path.

    ``{"builtin": "posenet", "seed": 0, "scheme": "float16" (optional)}`` |
    ``{"path": P, "sha256": H (optional)}`` | ``{"fetch": "posenet"}`` (registered file, fetched if missing).
    """
    if "builtin" in spec:
        return builtin_path(spec["builtin"], int(spec.get("seed", 0)), root, spec.get("scheme", "float32"))
    if "path" in spec:
        path = Path(spec["path"])
        if not path.exists():
            raise ModelError("no such model file", path=str(path))
        if not path.is_file():
            raise ModelError("not a regular file (a FIFO, device or directory); give a TFLite file", path=str(path))
        want = spec.get("sha256")
        if want and sha256_file(path) != want:
            raise ModelError(f"sha256 does not match the expected {want}", path=str(path))
        return path
    if "fetch" in spec:
        name = spec["fetch"]
        entry = Registry(root).entries().get(name)
        if entry is None:
            entry = fetch(name, root=root)
        path = Path(entry["path"])
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ModelError(f"registered model {name!r} is missing or changed; run `testbed models fetch {name}` "
                             "or `testbed models add`", path=str(path))
        return path
    raise ModelError(f"model spec needs one of builtin, path, fetch (got {sorted(spec)})")
