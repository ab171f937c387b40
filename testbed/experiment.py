"""The experiment file: what to sweep, on which nodes, over which links.

Owns the schema of ``experiments/*.yaml`` (validated, frozen, unknown keys
refused, every error ``file:line: field: what``), the expansion of ``splits``
into split points once the model's layer count is known, and the resolution of
relative paths (model file, input folder, profile files, output folder) against
the experiment file's folder. Link profiles themselves are parsed by
``testbed.link.profile``; models by ``testbed.model``; running is ``testbed.sweep``.

Example::

    name: posenet-sweep
    model: {builtin: posenet}
    splits: all                 # or [0, 5, 31] or "0-5,10,31"
    nodes:
      local:  {cpus: 1, memory: 1GiB, threads: 1}
      remote: {cpus: 2}
    network: [ladder-50mbit, ladder-10mbit]
    runs: {warmup: 2, samples: 10, min_seconds: 0, max_seconds: 10}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from testbed.config import Frozen, Located, load_yaml, validate
from testbed.errors import ConfigError
from testbed.units import Bytes, Seconds

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


class ModelSpec(Frozen):
    """Exactly one of ``builtin``, ``path`` (+ ``sha256``) or ``fetch``."""

    builtin: Literal["posenet"] | None = None
    path: str | None = None
    sha256: str | None = None
    fetch: Literal["posenet"] | None = None
    seed: int | None = Field(default=None, ge=0)
    # the built-in written in one of TFLite's quantization schemes (testbed.model.builder.SCHEMES)
    scheme: Literal["float32", "float16", "dynamic", "int8", "uint8", "int16x8"] | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.fullmatch(v.lower()):
            raise ValueError("expected 64 hexadecimal digits (the model file's sha256)")
        return None if v is None else v.lower()

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [k for k in ("builtin", "path", "fetch") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of builtin: posenet, path: FILE (with sha256), fetch: posenet")
        if self.path is not None and self.sha256 is None:
            raise ValueError("path needs sha256 so the measured model is the one named")
        if self.sha256 is not None and self.path is None:
            raise ValueError("sha256 belongs to path")
        if self.seed is not None and self.builtin is None:
            raise ValueError("seed belongs to builtin (it seeds the built-in model's weights)")
        if self.scheme is not None and self.builtin is None:
            raise ValueError("scheme belongs to builtin (a file keeps the scheme it was written in)")
        return self

    def as_spec(self) -> dict[str, str]:
        """The dict ``testbed.model.zoo.resolve`` takes."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class NodeConfig(Frozen):
    """Limits of one node. ``None`` means unlimited / the runtime's default."""

    backend: Literal["auto", "docker", "netns"] = "auto"
    cpus: float | None = Field(default=None, gt=0)
    memory: Bytes | None = None
    threads: int | None = Field(default=None, ge=1, le=64)

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, v: int | None) -> int | None:
        # Docker refuses less than 6 MiB; a Python agent with LiteRT needs far more.
        if v is not None and v < 64 * 2**20:
            raise ValueError("memory below 64MiB cannot hold the node agent; write e.g. '1GiB'")
        return v


class Nodes(Frozen):
    local: NodeConfig = NodeConfig()
    remote: NodeConfig = NodeConfig()

    @model_validator(mode="after")
    def _same_backend(self) -> "Nodes":
        a, b = self.local.backend, self.remote.backend
        if a != b and "auto" not in (a, b):
            raise ValueError(f"local and remote must use the same backend (got {a} and {b})")
        return self

    @property
    def backend(self) -> str:
        """The backend both nodes use (``auto`` when neither names one)."""
        return next((b for b in (self.local.backend, self.remote.backend) if b != "auto"), "auto")


class Runs(Frozen):
    """Per configuration: ``warmup`` untimed inferences, then ``samples`` timed
    ones — continued past ``samples`` until ``min_seconds`` have passed, and
    stopped early (after at least one sample) once ``max_seconds`` have passed,
    so slow low-bandwidth points stay bounded."""

    warmup: int = Field(default=2, ge=0, le=10_000)
    samples: int = Field(default=20, ge=1, le=1_000_000)
    min_seconds: Seconds = 0.0
    max_seconds: Seconds = 60.0
    kpi_runs: int = Field(default=10, ge=1, le=10_000)
    layer_runs: int = Field(default=10, ge=1, le=10_000)

    @model_validator(mode="after")
    def _bounds(self) -> "Runs":
        if self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}s) exceeds max_seconds ({self.max_seconds:g}s)")
        return self


class InputSpec(Frozen):
    """``source: synthetic`` (deterministic images from ``seed``) or a folder of
    images (png/jpeg) resized to the model input. ``count`` images cycle over the samples."""

    source: str = "synthetic"
    count: int = Field(default=4, ge=1, le=1000)
    seed: int = 0

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"


class MetricsSpec(Frozen):
    listen: str = "127.0.0.1:9400"
    pushgateway: str | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @field_validator("pushgateway")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", v):
            raise ValueError(f"expected a URL such as 'http://127.0.0.1:9091', got {v!r}")
        return v


def parse_host_port(text: str) -> tuple[str, int]:
    """``'127.0.0.1:9400'`` → ('127.0.0.1', 9400). Port 0 means any free port."""
    m = re.fullmatch(r"\[?([^\[\]\s]*?)\]?:(\d{1,5})", text.strip())
    if not m or int(m.group(2)) > 65535:
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:9400', got {text!r}")
    return m.group(1) or "127.0.0.1", int(m.group(2))


SplitsField = Literal["all"] | str | int | list[int | str]


def parse_splits(value: Any) -> list[tuple[int, int]]:
    """Split request → sorted-by-appearance list of inclusive (lo, hi) ranges.

    Accepts ``all`` (→ []), an int, a string ``"0-5,10"`` or a list of ints
    and such strings. Raises ValueError with what was expected.
    """
    if value == "all":
        return []
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected 'all', a list of split points or ranges such as '0-5'")
    out: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"expected a split point or a range such as '0-5', got {item!r}")
        if isinstance(item, int):
            if item < 0:
                raise ValueError(f"split point must not be negative, got {item}")
            out.append((item, item))
            continue
        for piece in str(item).split(","):
            m = _RANGE.fullmatch(piece)
            if not m:
                raise ValueError(f"expected a split point or a range such as '0-5', got {piece.strip()!r}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"range {piece.strip()!r} runs backwards; write it as '{hi}-{lo}'")
            out.append((lo, hi))
    return out


class Experiment(Frozen):
    """One experiment file. Build with :func:`load_experiment`."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: ModelSpec
    splits: SplitsField = "all"
    nodes: Nodes = Nodes()
    network: list[str] = Field(min_length=1)
    runs: Runs = Runs()
    input: InputSpec = InputSpec()
    input_encoding: Literal["raw", "png", "jpeg"] = "raw"
    codec: Literal["raw"] = "raw"
    metrics: MetricsSpec = MetricsSpec()
    output: str = "results"

    _located: Located | None = PrivateAttr(default=None)
    _base: Path = PrivateAttr(default=Path("."))

    @field_validator("splits", mode="before")
    @classmethod
    def _check_splits(cls, v: Any) -> Any:
        parse_splits(v)
        return v

    @field_validator("network", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("network")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        seen = set()
        for p in v:
            if p in seen:
                raise ValueError(f"profile {p!r} is listed twice")
            seen.add(p)
        return v

    # --- what the sweep needs, resolved -----------------------------------

    @property
    def base_dir(self) -> Path:
        """Folder of the experiment file; relative paths resolve against it."""
        return self._base

    def resolve_path(self, text: str) -> Path:
        """A path from the file, relative to the experiment file's folder, made absolute."""
        p = Path(text).expanduser()
        return (p if p.is_absolute() else self._base / p).resolve()

    def split_points(self, num_layers: int) -> list[int]:
        """The requested split points for a model with ``num_layers`` layers,
        ascending, each once. Raises ConfigError at the ``splits`` line when a
        point is beyond the model."""
        ranges = parse_splits(self.splits)
        if not ranges:
            return list(range(num_layers + 1))
        points: set[int] = set()
        for lo, hi in ranges:
            if hi > num_layers:
                raise self.error(f"split point {hi} is beyond the model's {num_layers} layers "
                                 f"(valid: 0-{num_layers})", ("splits",))
            points.update(range(lo, hi + 1))
        return sorted(points)

    def error(self, message: str, loc: tuple[Any, ...] = ()) -> ConfigError:
        """A ConfigError pointing into this experiment file (for checks that
        need the model or the link layer, made after validation)."""
        if self._located is None:
            return ConfigError(message, field=".".join(map(str, loc)) or None)
        return self._located.error(message, loc)

    def profile_ref(self, index: int) -> str:
        """A profile entry as ``load_profile`` takes it: a bare name stays a
        name; anything that looks like a file resolves against the experiment."""
        ref = self.network[index]
        if ref.endswith((".yaml", ".yml")) or "/" in ref:
            return str(self.resolve_path(ref))
        return ref

    def load_profiles(self) -> list[Any]:
        """Every network entry as a ``testbed.link.profile.LinkProfile``.

        Errors inside a profile file keep that file's line; a profile that does
        not exist is reported at this experiment's ``network`` line."""
        from testbed.link.profile import load_profile

        out = []
        for i, _ in enumerate(self.network):
            ref = self.profile_ref(i)
            try:
                out.append(load_profile(ref))
            except ConfigError as e:
                if e.file and Path(e.file).exists():
                    raise
                raise self.error(e.reason if e.file is None else str(e), ("network", i)) from None
            names = [p.name for p in out[:-1]]
            if out[-1].name in names:
                raise self.error(f"profile name {out[-1].name!r} is also the name of network entry "
                                 f"{names.index(out[-1].name)}; results are keyed by profile name", ("network", i))
        return out


def load_experiment(path: str | Path) -> Experiment:
    """Read, validate and anchor an experiment file.

    Raises:
        ConfigError: ``file:line: field: what was expected``.
    """
    located = load_yaml(path)
    if not isinstance(located.data, dict):
        raise located.error("expected a mapping of experiment fields (name, model, network, ...)")
    exp = validate(Experiment, located)
    exp._located = located
    exp._base = Path(path).resolve().parent
    if not exp.input.synthetic:
        folder = exp.resolve_path(exp.input.source)
        if not folder.is_dir():
            raise located.error(f"not 'synthetic' and not a folder: {folder}", ("input", "source"))
    if exp.model.path is not None and not exp.resolve_path(exp.model.path).is_file():
        raise located.error(f"no such model file: {exp.resolve_path(exp.model.path)}", ("model", "path"))
    return exp


def resolved_dict(exp: Experiment, split_points: list[int] | None = None,
                  model: dict[str, Any] | None = None, profiles: list[Any] | None = None) -> dict[str, Any]:
    """The experiment as the run folder's ``config.yaml`` records it: base units,
    absolute paths, the expanded split points, the model's identity and each
    profile's full content, so a run can be understood without the original files."""
    data = exp.model_dump(mode="json")
    if exp.model.path is not None:
        data["model"]["path"] = str(exp.resolve_path(exp.model.path))
    if not exp.input.synthetic:
        data["input"]["source"] = str(exp.resolve_path(exp.input.source))
    data["output"] = str(exp.resolve_path(exp.output))
    if split_points is not None:
        data["split_points"] = split_points
    if model is not None:
        data["resolved_model"] = model
    if profiles is not None:
        data["resolved_profiles"] = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p
                                     for p in profiles]
    return data
