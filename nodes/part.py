"""A loaded model part: a LiteRT interpreter fed and read by tensor NAME.

Parts keep the original model's tensor names (see the splitter), so the head's outputs
and the tail's inputs meet by name, never by position. This module owns one loaded
part; creating the interpreter is ``nodes.runtime.make_interpreter`` (LiteRT with a
tflite_runtime fallback, written by the model layer). Outputs are copied out of the
interpreter (``get_tensor``): LiteRT refuses to invoke while numpy views into its
arena are alive, and a copy of the largest PoseNet cut (4 MB) costs about a millisecond.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _make_interpreter(path: str, threads: int | None) -> Any:
    try:
        from nodes.runtime import make_interpreter
    except ImportError:  # the model layer's runtime not there: plain LiteRT
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter(model_path=path, num_threads=threads)
    return make_interpreter(path, threads)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str


class Part:
    """One part file loaded into an interpreter.

    Args:
        path: the part file (kept on disk: KPIs re-read it in a fresh process).
        sha256: its checksum, reported back by ``health``.
        threads: interpreter threads (None: the runtime's default).
    """

    def __init__(self, path: str | os.PathLike[str], sha256: str, threads: int | None = None):
        self.path = Path(path)
        self.sha256 = sha256
        self.threads = threads
        self.bytes = self.path.stat().st_size
        self.interpreter = _make_interpreter(str(self.path), threads)
        self.interpreter.allocate_tensors()
        self.inputs = [self._spec(d) for d in self.interpreter.get_input_details()]
        self.outputs = [self._spec(d) for d in self.interpreter.get_output_details()]
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]

    @staticmethod
    def _spec(d: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(d["name"], d["index"], tuple(int(x) for x in d["shape"]),
                          np.dtype(d["dtype"]).name)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set every input by name, invoke, return every output by name.

        Raises KeyError naming the missing input, ValueError on a shape/dtype mismatch.
        """
        interp = self.interpreter
        for spec in self.inputs:
            try:
                arr = feed[spec.name]
            except KeyError:
                raise KeyError(f"input {spec.name!r} not provided (have {sorted(feed)})") from None
            if tuple(arr.shape) != spec.shape or arr.dtype.name != spec.dtype:
                raise ValueError(f"input {spec.name!r}: got {arr.dtype.name}{list(arr.shape)}, "
                                 f"part wants {spec.dtype}{list(spec.shape)}")
            interp.set_tensor(spec.index, arr)
        interp.invoke()
        return {spec.name: interp.get_tensor(spec.index) for spec in self.outputs}

    def fixed_inputs(self) -> dict[str, np.ndarray]:
        """Deterministic inputs of the right shapes and types (for warm-up invokes)."""
        rng = np.random.default_rng(0)
        out = {}
        for spec in self.inputs:
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                out[spec.name] = rng.random(spec.shape, dtype=np.float32).astype(dtype)
            elif dtype.kind in "iu":
                info = np.iinfo(dtype)
                out[spec.name] = rng.integers(max(info.min, -128), min(info.max, 127) + 1, spec.shape, dtype=dtype)
            else:
                out[spec.name] = np.zeros(spec.shape, dtype=dtype)
        return out

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, "threads": self.threads,
                "inputs": self.input_names, "outputs": self.output_names}


def sha256_of(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()
