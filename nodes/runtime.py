"""Make a TFLite interpreter and move tensors in and out of it by NAME.

LiteRT (``ai_edge_litert``) first; ``tflite_runtime`` where LiteRT has no wheel.
The interpreter uses the runtime's default delegate (XNNPACK on CPU), the setting
under which split parts are bitwise equal to the whole model. Model parts keep
the original tensor names, so everything here addresses tensors by name. This
module imports numpy and the runtime only (never ``testbed``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

try:  # LiteRT: the maintained runtime
    from ai_edge_litert.interpreter import Interpreter as _Interpreter
    RUNTIME = "ai_edge_litert"
except ImportError:  # pragma: no cover - platforms without a LiteRT wheel
    from tflite_runtime.interpreter import Interpreter as _Interpreter
    RUNTIME = "tflite_runtime"


def make_interpreter(model: str | os.PathLike[str] | bytes, threads: int | None = None) -> Any:
    """An interpreter for a model file or model bytes (not yet allocated).

    Args:
        model: a path or the TFLite bytes.
        threads: interpreter threads; None lets the runtime choose.
    Raises:
        ValueError: the runtime refused the model (its message says why).
    """
    kwargs: dict[str, Any] = {}
    if threads is not None:
        kwargs["num_threads"] = int(threads)
    if isinstance(model, (bytes, bytearray, memoryview)):
        return _Interpreter(model_content=bytes(model), **kwargs)
    return _Interpreter(model_path=os.fspath(model), **kwargs)


def input_details(interp: Any) -> dict[str, dict]:
    """Input details keyed by tensor name, in the model's input order."""
    return {d["name"]: d for d in interp.get_input_details()}


def output_details(interp: Any) -> dict[str, dict]:
    """Output details keyed by tensor name, in the model's output order."""
    return {d["name"]: d for d in interp.get_output_details()}


def set_inputs(interp: Any, feed: Mapping[str, np.ndarray]) -> None:
    """Set every model input from ``feed`` by name (extra names are ignored).

    Raises:
        KeyError: an input is missing from ``feed``.
    """
    for name, d in input_details(interp).items():
        if name not in feed:
            raise KeyError(f"input {name!r} not provided (have {sorted(feed)})")
        interp.set_tensor(d["index"], np.asarray(feed[name], dtype=d["dtype"]).reshape(d["shape"]))


def get_outputs(interp: Any) -> dict[str, np.ndarray]:
    """Every model output by name (copies, safe across further invokes)."""
    return {name: interp.get_tensor(d["index"]) for name, d in output_details(interp).items()}


def run(interp: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Set inputs by name, invoke, return outputs by name."""
    set_inputs(interp, feed)
    interp.invoke()
    return get_outputs(interp)


def random_inputs(interp: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for every model input: uniform [-1, 1) for floats,
    the full range for integer types (quantized models)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, d in input_details(interp).items():
        dtype, shape = np.dtype(d["dtype"]), tuple(int(x) for x in d["shape"])
        if dtype.kind == "f":
            feed[name] = rng.uniform(-1.0, 1.0, shape).astype(dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            feed[name] = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
        else:
            feed[name] = rng.integers(0, 2, shape).astype(dtype)
    return feed
