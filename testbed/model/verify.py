"""Run split parts once with LiteRT: do they load, invoke, and reproduce the whole model?

``split_model``/``materialize`` call ``verify_split`` for every split point they
write (``testbed split`` unless ``--no-verify``); the sweep can call
``verify_parts`` on parts it holds. The head is fed deterministic inputs (the
same the whole model gets), the tail the head's real outputs, and the final
outputs are compared bit for bit with the whole model's. A part LiteRT cannot
load or run becomes one ``ModelError`` naming the split point, the part, the
operator and LiteRT's reason; a result that runs but differs is reported
(``exact: False``), not refused: a delegate may legitimately round differently
when a model is cut (it never did in our tests; see tests/unit/test_model_schemes.py).

This module owns interpreters made for checking (default delegate or none, one
thread, quiet) and turning LiteRT's error text into an operator. Which parts exist
is ``splitter``'s business; the nodes make their own interpreters (``nodes.runtime``).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from nodes import runtime
from testbed.errors import ModelError
from testbed.model.graph import ModelGraph
from testbed.model.manifest import load_manifest

try:
    RUNTIME = f"ai_edge_litert {version('ai-edge-litert')}"
except PackageNotFoundError:  # pragma: no cover - tflite_runtime fallback
    RUNTIME = runtime.RUNTIME

# "Node number 6 (CONV_2D) failed to prepare." ends LiteRT's error messages.
_NODE = re.compile(r"Node number (\d+) \(([^)]*)\) failed to (\w+)")
_UNRESOLVED = re.compile(r"unresolved custom op: ([^\n]*?)\.?\s*\n")


def make_interpreter(model: str | os.PathLike[str] | bytes, delegate: bool = True, threads: int = 1) -> Any:
    """An interpreter with the runtime's default delegate (XNNPACK) or with builtin kernels only.

    Raises:
        RuntimeError, ValueError: LiteRT refused the model.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    source = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray, memoryview)) \
        else {"model_path": os.fspath(model)}
    return Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Drop LiteRT's native ``INFO:`` lines (``Created TensorFlow Lite XNNPACK delegate``)
    from file descriptor 2 while checking, so a failed check prints one error line;
    anything else written meanwhile is passed on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded use): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("INFO: ")]
            if kept:
                os.write(2, "".join(kept).encode())


@dataclass
class Reference:
    """Whole-model inputs and outputs for one deterministic input (``error`` if it failed)."""

    feed: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None
    error: str | None = None


def reference(graph: ModelGraph, delegate: bool = True, seed: int = 0) -> Reference:
    """Run the whole model once on deterministic inputs (``runtime.random_inputs``)."""
    source = graph.data if graph.data is not None else graph.path
    with quiet_native_stderr():
        try:
            interp = make_interpreter(source, delegate)
            interp.allocate_tensors()
            feed = runtime.random_inputs(interp, seed)
        except (RuntimeError, ValueError) as e:
            return Reference(_inputs_from_graph(graph, seed), None, str(e))
        try:
            return Reference(feed, runtime.run(interp, feed))
        except (RuntimeError, ValueError) as e:
            return Reference(feed, None, str(e))


def _inputs_from_graph(graph: ModelGraph, seed: int) -> dict[str, np.ndarray]:
    # The same distribution as runtime.random_inputs, for a model LiteRT cannot load whole.
    rng = np.random.default_rng(seed)
    feed = {}
    for t in graph.inputs:
        dtype = np.dtype(t.dtype)
        if dtype.kind == "f":
            feed[t.name] = rng.uniform(-1.0, 1.0, t.shape).astype(dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            feed[t.name] = rng.integers(info.min, info.max, t.shape, endpoint=True, dtype=dtype)
        else:
            feed[t.name] = rng.integers(0, 2, t.shape).astype(dtype)
    return feed


def verify_split(graph: ModelGraph, parts_dir: str | Path, entry: Mapping[str, Any],
                 ref: Reference | None = None, delegate: bool = True, *, label: str | None = None) -> dict:
    """Run the head and tail of one manifest entry once, head feeding tail.

    Args:
        graph: the whole model.
        parts_dir: the folder holding ``entry``'s part files.
        entry: one element of ``manifest["splits"]``.
        ref: the whole model's run (``reference(graph)``); computed when None.
        delegate: the runtime's default delegate (XNNPACK) or builtin kernels only.
        label: the folder to name in errors (``parts_dir`` when None; the splitter
            verifies in a scratch folder and names the destination).
    Returns:
        ``{"exact": bool | None, "runtime": str, "delegate": "default" | "none"}``;
        ``exact`` is None when the whole model itself cannot run here.
    Raises:
        ModelError: a part fails to load or invoke: names k, the part, the operator, the reason.
    """
    ref = ref if ref is not None else reference(graph, delegate)
    k, n = int(entry["k"]), graph.num_layers
    values = dict(ref.feed)
    with quiet_native_stderr():
        for side, layers in (("head", range(0, k)), ("tail", range(k, n))):
            if entry.get(side):
                values.update(_run_part(graph, Path(parts_dir) / entry[side], k, side, list(layers),
                                        values, delegate, label or str(parts_dir)))
    exact = None
    if ref.outputs is not None:
        exact = all(name in values and _same_bits(values[name], value) for name, value in ref.outputs.items())
    return {"exact": exact, "runtime": RUNTIME, "delegate": "default" if delegate else "none"}


def verify_parts(model: str | Path | ModelGraph, parts_dir: str | Path, ks: Iterable[int] | None = None,
                 delegate: bool = True) -> dict[int, dict]:
    """``verify_split`` for the split points ``ks`` (default: all) of a split folder.

    Raises:
        ModelError: unreadable model or manifest, k not in the manifest, or a part fails.
    """
    graph = model if isinstance(model, ModelGraph) else ModelGraph.from_file(model)
    manifest = load_manifest(parts_dir)
    by_k = {int(s["k"]): s for s in manifest["splits"]}
    wanted = sorted(by_k) if ks is None else sorted(set(ks))
    missing = [k for k in wanted if k not in by_k]
    if missing:
        raise ModelError(f"no parts for split point(s) {missing} (have {sorted(by_k)})", path=str(parts_dir))
    ref = reference(graph, delegate)
    return {k: verify_split(graph, parts_dir, by_k[k], ref, delegate) for k in wanted}


def _run_part(graph: ModelGraph, path: Path, k: int, side: str, layers: list[int],
              values: Mapping[str, np.ndarray], delegate: bool, label: str) -> dict[str, np.ndarray]:
    stage = "load"
    try:
        interp = make_interpreter(path, delegate)
        interp.allocate_tensors()
        missing = [name for name in runtime.input_details(interp) if name not in values]
        if missing:
            raise ModelError(f"split point k={k}: {side} part {path.name} needs {missing}, which nothing "
                             "before it produces", path=label)
        stage = "invoke"
        return runtime.run(interp, values)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"split point k={k}: {side} part {path.name} fails to {stage} in {RUNTIME} "
                         f"({'default delegate' if delegate else 'no delegate'}): "
                         f"{_explain(graph, layers, str(e), delegate)}", path=label) from e


def _explain(graph: ModelGraph, layers: list[int], message: str, delegate: bool) -> str:
    """``<operator>: <reason>`` from LiteRT's message, in one line."""
    ops = graph.ops_for(layers)
    node = _NODE.search(message)
    reason = _reason(message[:node.start()] if node else message)
    custom = _UNRESOLVED.search(message + "\n")
    if custom:
        reason = (f"custom operator {custom.group(1)!r} is not registered in this runtime "
                  "(split with --no-verify if the nodes' runtime registers it)")
    if node is None:
        return reason
    index, name = int(node.group(1)), node.group(2)
    if index < len(ops):
        return f"{graph.describe_operator(ops[index])}: {reason}"
    # A delegate kernel runs several operators; find the one that fails on its own.
    culprit = _culprit(graph, layers, delegate)
    if culprit is not None:
        return f"{graph.describe_operator(culprit)}, inside the {name} kernel: {reason}"
    return f"{name} (a delegate kernel holding several of the part's operators): {reason}"


def _culprit(graph: ModelGraph, layers: list[int], delegate: bool) -> int | None:
    """Operator index of the first layer whose one-layer model fails too (None: none alone)."""
    from testbed.model.layers import one_layer_model
    for li in layers:
        try:
            interp = make_interpreter(one_layer_model(graph, li), delegate)
            interp.allocate_tensors()
            runtime.run(interp, runtime.random_inputs(interp))
        except (RuntimeError, ValueError):
            return graph.layer_ops[li]
    return None


def _reason(text: str) -> str:
    lines = [line.strip() for line in text.replace("See instructions:", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith("http")]
    return "; ".join(lines)[:300] or "no reason given"


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def custom_ops_registered(graph: ModelGraph, delegate: bool = True) -> dict[str, bool]:
    """Custom operator name -> does this host's runtime register it?

    LiteRT accepts an unknown custom op when it builds the interpreter and fails
    when it prepares it, so the first layer using it is loaded alone (a
    one-layer model) and asked to allocate; any failure other than "unresolved
    custom op" means the op is there (and unhappy with its inputs).
    """
    from testbed.model.layers import one_layer_model
    found: dict[str, bool] = {}
    with quiet_native_stderr():
        for name, layers in graph.custom_ops().items():
            try:
                make_interpreter(one_layer_model(graph, layers[0]), delegate).allocate_tensors()
                found[name] = True
            except (RuntimeError, ValueError) as e:
                found[name] = _UNRESOLVED.search(str(e) + "\n") is None
    return found


