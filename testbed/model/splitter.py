"""Write head/tail parts for split points and the manifest that describes them.

For split point ``k`` of an ``N``-layer model:

* head ``head_{k:02d}.tflite`` runs layers ``[0, k)``; inputs: the model inputs those
  layers read; outputs: the cut tensors that are not model inputs. None for ``k = 0``.
* tail ``tail_{k:02d}.tflite`` runs layers ``[k, N)``; inputs: the cut tensors the
  tail reads; outputs: the model outputs it produces. None for ``k = N``.
* final outputs = tail outputs + cut tensors that are model outputs. Tensors keep
  their names, so consumers match by name.

Everything is written into a temporary sibling directory that is renamed into
place at the end, so a failure leaves no partial output directory behind. Graph
analysis is in ``graph``, the surgery in ``surgery``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import flatbuffers

from testbed.errors import ModelError
from testbed.model import surgery
from testbed.model.graph import ModelGraph

MANIFEST = "manifest.json"


def head_name(k: int) -> str:
    return f"head_{k:02d}.tflite"


def tail_name(k: int) -> str:
    return f"tail_{k:02d}.tflite"


def part_io(graph: ModelGraph, k: int) -> dict[str, tuple[list[int], list[int]] | None]:
    """Input/output tensor indices of the head and tail at ``k`` (None for an empty side)."""
    n = graph.num_layers
    cut = graph.cut_ids(k)
    model_inputs = set(graph.input_ids)
    head = tail = None
    if k > 0:
        read = {t for li in range(k) for t in graph.subgraph.operators[li].inputs}
        head = ([t for t in graph.input_ids if t in read], [t for t in cut if t not in model_inputs])
    if k < n:
        read = {t for li in range(k, n) for t in graph.subgraph.operators[li].inputs}
        produced = {t for li in range(k, n) for t in graph.subgraph.operators[li].outputs}
        tail = ([t for t in cut if t in read], [t for t in graph.output_ids if t in produced])
    return {"head": head, "tail": tail}


def split_model(model_path: str | Path, ks: Iterable[int], out_dir: str | Path) -> dict:
    """Split ``model_path`` at every ``k`` in ``ks``; write parts and ``manifest.json`` into ``out_dir``.

    Returns the manifest dict. An existing ``out_dir`` is replaced only if it is
    empty or holds a previous split (has a manifest).

    Raises:
        ModelError: unreadable/unsupported model, k out of range, or ``out_dir``
            exists and is not a split directory.
    """
    data = _read(model_path)
    graph = ModelGraph.from_bytes(data, str(model_path))
    ks = sorted(set(ks))
    if not ks:
        raise ModelError("no split points given", path=str(model_path))
    for k in ks:
        graph.check_k(k)
    out = Path(out_dir)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # Hashing and writing release the GIL: they run in two worker threads
        # while the main thread serialises the next part (splitting all 32
        # PoseNet points writes ~0.4 GB; see bench/split_bench.py).
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="split") as pool:
            ring = _BuilderRing(len(data))
            splits = [_write_split(graph, k, tmp, pool, ring) for k in ks]
            splits = [_resolve(s) for s in splits]
        manifest = {
            "model": {"path": str(Path(model_path).resolve()), "sha256": hashlib.sha256(data).hexdigest(),
                      "layers": graph.num_layers, "bytes": len(data)},
            "splits": splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _read(model_path: str | Path) -> bytes:
    try:
        return Path(model_path).read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read: {e.strerror or e}", path=str(model_path)) from e


def _write_file(path: Path, blob: memoryview) -> None:
    with open(path, "wb") as f:
        f.write(blob)


class _BuilderRing:
    """A few flatbuffer builders reused in turn; one is handed out again only after
    the hash and write of the part it last built are done (its view stays valid)."""

    def __init__(self, size: int, count: int = 3) -> None:
        self._slots = [(flatbuffers.Builder(size + (1 << 20)), []) for _ in range(count)]
        self._next = 0

    def take(self) -> tuple[flatbuffers.Builder, list]:
        builder, pending = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        for f in pending:
            f.result()
        pending.clear()
        return builder, pending


def _write_split(graph: ModelGraph, k: int, tmp: Path, pool: ThreadPoolExecutor, ring: _BuilderRing) -> dict:
    io = part_io(graph, k)
    entry: dict = {"k": k}
    for side, name, layers in (("head", head_name(k), range(0, k)),
                               ("tail", tail_name(k), range(k, graph.num_layers))):
        if io[side] is None:
            entry.update({side: None, f"{side}_bytes": 0, f"{side}_sha256": None})
            continue
        builder, pending = ring.take()
        blob = surgery.extract_view(graph, list(layers), *io[side], builder=builder)
        written = pool.submit(_write_file, tmp / name, blob)
        digest = pool.submit(lambda b: hashlib.sha256(b).hexdigest(), blob)
        pending += [written, digest]
        entry.update({side: name, f"{side}_bytes": len(blob), f"{side}_sha256": (digest, written)})
    entry = {key: entry[key] for key in ("k", "head", "tail", "head_bytes", "tail_bytes",
                                         "head_sha256", "tail_sha256")}
    entry["cut"] = [t.to_dict() for t in graph.cut(k)]
    return entry


def _resolve(entry: dict) -> dict:
    """Wait for a split's writes and checksums (re-raising a write error)."""
    for key in ("head_sha256", "tail_sha256"):
        if isinstance(entry[key], tuple):
            digest, written = entry[key]
            written.result()
            entry[key] = digest.result()
    return entry


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ModelError("exists and is not an empty or earlier split directory; choose another --out",
                         path=str(out))


def _replace(tmp: Path, out: Path) -> None:
    # rename() is atomic but cannot replace a non-empty directory: move the old
    # one aside first and delete it only once the new one is in place.
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_manifest(directory: str | Path) -> dict:
    """Read ``directory/manifest.json`` written by ``split_model``.

    Raises:
        ModelError: missing, not JSON, or lacking the keys consumers rely on.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise ModelError(f"cannot read manifest: {e.strerror or e}", path=str(path)) from e
    except json.JSONDecodeError as e:
        raise ModelError(f"manifest is not JSON (line {e.lineno}: {e.msg})", path=str(path)) from e
    try:
        for key in ("path", "sha256", "layers", "bytes"):
            manifest["model"][key]
        for split in manifest["splits"]:
            for key in ("k", "head", "tail", "head_bytes", "tail_bytes", "head_sha256", "tail_sha256", "cut"):
                split[key]
    except (KeyError, TypeError) as e:
        raise ModelError(f"manifest lacks {e}", path=str(path)) from e
    return manifest
