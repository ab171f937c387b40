"""Write head/tail parts for split points and the manifest that describes them.

For split point ``k`` of an ``N``-layer model (layers: computing operators; the
constant operators folded into them go with every part that needs them, see
``graph``):

* head ``head_{k:02d}.tflite`` runs layers ``[0, k)``; inputs: the model inputs those
  layers read; outputs: the cut tensors that are not model inputs. None for ``k = 0``.
* tail ``tail_{k:02d}.tflite`` runs layers ``[k, N)``; inputs: the cut tensors the
  tail reads; outputs: the model outputs it produces. None for ``k = N``.
* final outputs = tail outputs + cut tensors that are model outputs. Tensors keep
  their names, so consumers match by name.

Two ways to write them, sharing one machinery:

* ``split_model`` writes a whole split folder into a temporary sibling directory
  renamed into place at the end, so a failure leaves nothing behind. An existing
  folder is replaced only when it is empty or holds exactly an earlier split's
  files (manifest + the parts it names): nothing the testbed did not write is
  ever deleted.
* ``materialize`` adds the parts of a few split points to a split folder (and
  ``remove_parts`` takes them away), so a sweep over a large model holds on disk
  only the parts of the configurations it is running.

Both run each written split once with LiteRT (``verify``) unless told not to.
Graph analysis is in ``graph``, the surgery in ``surgery``, running parts in ``verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import flatbuffers

from testbed.errors import ModelError
from testbed.model import surgery
from testbed.model.graph import ModelGraph
from testbed.model.manifest import MANIFEST, load_manifest
from testbed.model.manifest import SPLIT_KEYS as _SPLIT_KEYS
from testbed.model.verify import reference, verify_split

# split --all warns above this many bytes (a 300-operator 6 MB model writes ~2 GB).
WARN_BYTES = 1 << 30
_PART = re.compile(r"^(head|tail)_\d{2,}\.tflite$")
# materialize's scratch folder inside a split folder (ours: a crash may leave one).
_SCRATCH = re.compile(r"^\.materialize-\d+-[A-Za-z0-9_]+\.tmp$")


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
        read = {t for li in range(k) for t in graph.layer_op(li).inputs}
        head = ([t for t in graph.input_ids if t in read], [t for t in cut if t not in model_inputs])
    if k < n:
        read = {t for li in range(k, n) for t in graph.layer_op(li).inputs}
        produced = {t for li in range(k, n) for t in graph.layer_op(li).outputs}
        tail = ([t for t in cut if t in read], [t for t in graph.output_ids if t in produced])
    return {"head": head, "tail": tail}


def estimate_bytes(graph: ModelGraph, ks: Iterable[int]) -> int:
    """About how many bytes the parts of split points ``ks`` take on disk (weights
    of each part, shared constants counted once per part that holds them)."""
    n = graph.num_layers
    return sum(graph.part_bytes(range(0, k)) + graph.part_bytes(range(k, n)) for k in set(ks))


def split_model(model: str | Path | ModelGraph, ks: Iterable[int], out_dir: str | Path, *,
                verify: bool = True) -> dict:
    """Split ``model`` at every ``k`` in ``ks``; write parts and ``manifest.json`` into ``out_dir``.

    Args:
        model: a model file, or its ``ModelGraph`` (saves parsing it again).
        ks: split points, 0..N.
        out_dir: created, or replaced if it is empty or holds exactly an earlier split.
        verify: run every split once with LiteRT (``verify.verify_split``) before
            anything is put in place; each entry then carries ``verify``.
    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).
    Raises:
        ModelError: unreadable/unsupported model, k out of range, ``out_dir`` holds
            something else, not enough disk space, a write failed, or a part fails
            to load or run (names k, part, operator, reason). Nothing is left behind.
    """
    graph = _graph(model)
    ks = _check_ks(graph, ks)
    out = _check_target(Path(out_dir))
    _check_space(graph, ks, out.parent)
    tmp = _mkdtemp(out.parent, f".{out.name}.", ".tmp")
    try:
        splits = _write_splits(graph, ks, tmp, verify, out)
        manifest = {"model": model_entry(graph), "splits": splits}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(tmp, out)
    except OSError as e:
        raise ModelError(f"cannot write parts: {e.strerror or e}", path=str(out)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def materialize(model: str | Path | ModelGraph, ks: Iterable[int], directory: str | Path, *,
                verify: bool = True) -> list[dict]:
    """Make sure the parts of split points ``ks`` are in ``directory``; write only the missing ones.

    ``directory`` is a split folder: created if missing (or empty), otherwise it
    must hold exactly an earlier split of the same model (same sha256). Its
    manifest lists every split point present, in k order, in the format
    ``split_model`` writes. Parts are written and verified in a scratch folder
    and renamed in, then the manifest is replaced: an error leaves the folder
    as it was. One writer per folder at a time (the manifest is read, extended
    and replaced; two concurrent writers would lose each other's entries).

    Returns:
        The manifest entries of ``ks``, in k order.
    Raises:
        ModelError: as ``split_model``; also a folder holding another model's split.
    """
    graph = _graph(model)
    ks = _check_ks(graph, ks)
    root = _check_target(Path(directory))
    root.mkdir(parents=True, exist_ok=True)
    manifest = _load_or_new(graph, root)
    by_k = {int(s["k"]): s for s in manifest["splits"]}
    todo = [k for k in ks if k not in by_k or not _present(root, by_k[k])]
    if todo:
        _check_space(graph, todo, root)
        scratch = _mkdtemp(root, f".materialize-{os.getpid()}-", ".tmp")
        try:
            for entry in _write_splits(graph, todo, scratch, verify, root):
                for side in ("head", "tail"):
                    if entry[side]:
                        os.replace(scratch / entry[side], root / entry[side])
                by_k[entry["k"]] = entry
            manifest["splits"] = [by_k[k] for k in sorted(by_k)]
            _write_manifest(root, manifest)
        except OSError as e:
            raise ModelError(f"cannot write parts: {e.strerror or e}", path=str(root)) from e
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return [by_k[k] for k in ks]


def remove_parts(directory: str | Path, ks: Iterable[int]) -> int:
    """Delete the parts of split points ``ks`` from a split folder and drop them from its manifest.

    Split points without parts there are ignored. Returns the bytes freed.

    Raises:
        ModelError: ``directory`` is not a split folder.
    """
    root = Path(directory)
    manifest = load_manifest(root)
    drop = set(ks)
    freed = 0
    keep = []
    for entry in manifest["splits"]:
        if entry["k"] not in drop:
            keep.append(entry)
            continue
        for side in ("head", "tail"):
            # only names a split writes: a hand-edited manifest cannot point outside the folder
            if isinstance(entry[side], str) and _PART.match(entry[side]):
                path = root / entry[side]
                try:
                    freed += path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    pass
    manifest["splits"] = keep
    _write_manifest(root, manifest)
    return freed


# --------------------------------------------------------------------------- writing

def _graph(model: str | Path | ModelGraph) -> ModelGraph:
    return model if isinstance(model, ModelGraph) else ModelGraph.from_file(model)


def _check_ks(graph: ModelGraph, ks: Iterable[int]) -> list[int]:
    ks = sorted(set(ks))
    if not ks:
        raise ModelError("no split points given", path=graph.path)
    for k in ks:
        graph.check_k(k)
    return ks


def model_entry(graph: ModelGraph) -> dict:
    """The manifest's ``model`` entry: path, sha256, layers, bytes, operators, folded_ops."""
    if graph.data is None:
        raise ModelError("model bytes unavailable (build the graph with from_file/from_bytes)", path=graph.path)
    path = str(Path(graph.path).resolve()) if graph.path else None
    return {"path": path, "sha256": hashlib.sha256(graph.data).hexdigest(), "layers": graph.num_layers,
            "bytes": len(graph.data), "operators": graph.num_operators, "folded_ops": len(graph.folded)}


def _write_splits(graph: ModelGraph, ks: list[int], folder: Path, verify: bool, label: Path) -> list[dict]:
    """Write the parts of ``ks`` into ``folder``; return their manifest entries (verified if asked)."""
    # Hashing and writing release the GIL: they run in two worker threads
    # while the main thread serialises the next part (splitting all 32
    # PoseNet points writes ~0.4 GB; see bench/split_bench.py).
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="split") as pool:
        ring = _BuilderRing(len(graph.data or b""))
        splits = [_write_split(graph, k, folder, pool, ring) for k in ks]
        splits = [_resolve(s) for s in splits]
    if verify:
        ref = reference(graph)
        for entry in splits:
            entry["verify"] = verify_split(graph, folder, entry, ref, label=str(label))
    return splits


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
    entry = {key: entry[key] for key in _SPLIT_KEYS}
    entry["cut"] = [t.to_dict() for t in graph.cut(k)]
    entry["verify"] = None
    return entry


def _resolve(entry: dict) -> dict:
    """Wait for a split's writes and checksums (re-raising a write error)."""
    for key in ("head_sha256", "tail_sha256"):
        if isinstance(entry[key], tuple):
            digest, written = entry[key]
            written.result()
            entry[key] = digest.result()
    return entry


# --------------------------------------------------------------------------- the folder

def _check_target(out: Path) -> Path:
    """The absolute folder to (re)place; refuse anything the testbed did not write."""
    where = str(out)
    out = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise ModelError("is the current directory or one of its parents; give a new folder for the parts",
                         path=where)
    if out.is_symlink():
        raise ModelError("is a symbolic link; give the folder itself (or a new one) for the parts", path=where)
    if not out.exists():
        return out
    if not out.is_dir():
        raise ModelError("exists and is not a folder; choose another --out", path=where)
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ModelError(f"exists and is not an empty or earlier split directory (holds {shown}, which a split "
                         "did not write); choose another --out", path=where)
    return out


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` an earlier split did not write (all of them if it has no valid manifest)."""
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return []
    if MANIFEST not in names:
        return names
    try:
        manifest = load_manifest(folder)
    except ModelError:
        return [MANIFEST + " (not a split manifest)"]
    ours = {MANIFEST} | {s[side] for s in manifest["splits"] for side in ("head", "tail")
                         if isinstance(s[side], str) and _PART.match(s[side])}
    foreign = []
    for name in names:
        path = folder / name
        if _SCRATCH.match(name) and path.is_dir() and not path.is_symlink():
            continue
        if name not in ours or path.is_symlink() or not path.is_file():
            foreign.append(name)
    return foreign


def _load_or_new(graph: ModelGraph, root: Path) -> dict:
    entry = model_entry(graph)
    if not (root / MANIFEST).exists():
        return {"model": entry, "splits": []}
    manifest = load_manifest(root)
    if manifest["model"]["sha256"] != entry["sha256"]:
        raise ModelError(f"holds parts of another model (sha256 {manifest['model']['sha256'][:12]}…, "
                         f"this one {entry['sha256'][:12]}…); use another folder", path=str(root))
    manifest["model"] = entry
    return manifest


def _present(root: Path, entry: dict) -> bool:
    for side in ("head", "tail"):
        name = entry.get(side)
        if name and (not (root / name).is_file() or (root / name).stat().st_size != entry[f"{side}_bytes"]):
            return False
    return True


def _check_space(graph: ModelGraph, ks: Iterable[int], folder: Path) -> None:
    need = estimate_bytes(graph, ks)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if need > free:
        raise ModelError(f"the parts need about {need / 1e9:.2f} GB and only {free / 1e9:.2f} GB is free "
                         "there; split fewer points (--at K)", path=str(folder))


def _mkdtemp(parent: Path, prefix: str, suffix: str) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    except OSError as e:
        raise ModelError(f"cannot create a folder for the parts: {e.strerror or e}", path=str(parent)) from e


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


def _replace(tmp: Path, out: Path) -> None:
    # rename() is atomic but cannot replace a non-empty directory: move the old
    # one aside first and delete it only once the new one is in place. The old
    # folder was checked to hold only an earlier split's files (_check_target).
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
