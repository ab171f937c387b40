"""The experiment file: what to sweep, on which nodes, over which links.

Owns the schema of ``experiments/*.yaml`` (validated, frozen, unknown keys
refused, every error ``file:line: field: what``), the expansion of ``splits``
into split points once the model's layer count is known, and the resolution of
relative paths (model file, input folder, profile files, output folder) against
the experiment file's folder. Link profiles themselves are parsed by
``testbed.link.profile``; models by ``testbed.model``; running is ``testbed.sweep``;
checking the machine before a run (backend, kernel, ports, disk) is
``testbed.sweep.preflight``.

Numbers are bounded here so nothing downstream meets an absurd one: integers
are real integers (``threads: true`` is refused), floats finite, split points
at most ``MAX_SPLIT_POINT`` before any range is expanded, seeds 32-bit, path
strings free of NUL bytes. Files the experiment names are checked to be regular
files (a FIFO as model or image would hang the run) of bounded size.

Example::

    name: posenet-sweep
    model: {builtin: posenet}
    splits: all                 # or [0, 5, 31] or "0-5,10,31"
    nodes:
      local:  {cpus: 1, memory: 1GiB, threads: 1}
      remote: {cpus: 2}
    network: [ladder-50mbit, ladder-10mbit]
    runs: {warmup: 2, samples: 10, min_seconds: 0, max_seconds: 10}
    topology: 1                 # 1 head on the UE | 2 head remote, source UE | 3 source+head remote
    codec: int8+zstd            # chain of the cut tensors (nodes.tensor_codecs)
    transport: {protocol: udp, on_loss: zero, nft_loss: 5%}

A remote node on another machine (``backend: ssh``; see docs/ssh.md)::

    nodes:
      local:  {backend: netns, cpus: 1}
      remote: {backend: ssh, host: edge.lab.example, user: bench, key: ~/.ssh/id_ed25519,
               known_hosts: ~/.ssh/known_hosts, runtime: process}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from testbed.config import Frozen, Int, Located, Number, check_regular_file, load_yaml, validate
from testbed.errors import ConfigError
from testbed.units import Bytes, Percent, Seconds

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")

MAX_SPLIT_POINT = 100_000          # far beyond any TFLite model's operator count; checked before expanding
MAX_SEED = 2**32 - 1               # numpy seeds and the built-in model's file name take it
MAX_CPUS = 1024.0
MIN_CPUS = 0.01                    # docker's floor; the cgroup quota floor is 1 ms per 100 ms period
MAX_MEMORY_BYTES = 2**63 - 1       # docker's int64
MAX_CONFIG_SECONDS = 86_400.0      # min/max_seconds: a day per configuration
MAX_MODEL_BYTES = 2**31            # a TFLite flatbuffer cannot be larger than 2 GiB
MAX_PATH_CHARS = 4096              # PATH_MAX


def _path_text(v: str) -> str:
    # Path("a\0b").resolve() raises ValueError, exists() on a 5,000-character
    # name OSError: refuse them here, with the line, not there, with a traceback.
    if "\0" in v:
        raise ValueError("a path must not contain a NUL byte")
    if not v.strip():
        raise ValueError("a path must not be empty")
    if len(v) > MAX_PATH_CHARS:
        raise ValueError(f"a path must be at most {MAX_PATH_CHARS} characters, got {len(v)}")
    return v


PathText = Annotated[str, AfterValidator(_path_text)]


class ModelSpec(Frozen):
    """Exactly one of ``builtin``, ``path`` (+ ``sha256``) or ``fetch``."""

    builtin: Literal["posenet"] | None = None
    path: PathText | None = None
    sha256: str | None = None
    fetch: Literal["posenet"] | None = None
    seed: Int | None = Field(default=None, ge=0, le=MAX_SEED)
    # the built-in written in one of TFLite's quantization schemes (testbed.model.builder.SCHEMES)
    scheme: Literal["float32", "float16", "dynamic", "int8", "uint8", "int16x8"] | None = None
    _base: Path | None = PrivateAttr(default=None)   # the experiment file's folder (set by load_experiment)

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
        """The dict ``testbed.model.zoo.resolve`` takes; a relative ``path`` is
        resolved against the experiment file's folder (not the working directory)."""
        spec = {k: v for k, v in self.model_dump().items() if v is not None}
        if self.path is not None and self._base is not None:
            p = Path(self.path).expanduser()
            spec["path"] = str((p if p.is_absolute() else self._base / p).resolve())
        return spec


#: NodeConfig keys that only a ``backend: ssh`` node takes.
SSH_ONLY = ("host", "user", "port", "key", "known_hosts", "runtime", "shape_at", "wheels", "control_port",
            "data_port", "metrics_port", "data_address", "engine_address", "remote_dir", "connect_timeout")


class NodeConfig(Frozen):
    """Limits of one node. ``None`` means unlimited / the runtime's default.

    ``cpus`` is a CFS quota granted per ``cpu_period`` (100 ms, as Docker's
    ``--cpus``): a node with 0.125 CPUs runs 12.5 ms per 100 ms, flat out then
    stopped. A short period (``10ms``) spreads the same quota into short slices,
    so the node computes as a uniformly slower CPU would: what a "slow UE" wants.

    ``cpuset`` pins the node to host CPUs (``"2-3"``); by default the sweep
    decides (``nodes.pinning``, see ``testbed.deploy.cpus``)."""

    backend: Literal["auto", "docker", "netns", "ssh", "android"] = "auto"
    cpus: Number | None = Field(default=None, ge=MIN_CPUS, le=MAX_CPUS)
    cpu_period: Seconds = 0.1
    memory: Bytes | None = Field(default=None, le=MAX_MEMORY_BYTES)
    threads: Int | None = Field(default=None, ge=1, le=64)
    cpuset: str | None = None
    # backend: ssh only (testbed.deploy.ssh; docs/ssh.md)
    host: str | None = Field(default=None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.:-]+$")
    user: str | None = Field(default=None, min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    port: Int = Field(default=22, ge=1, le=65535)
    key: PathText | None = None
    known_hosts: PathText = "~/.ssh/known_hosts"
    runtime: Literal["process", "docker"] = "process"
    shape_at: Literal["local", "remote"] = "local"
    wheels: Literal["auto", "index", "push"] = "auto"
    control_port: Int = Field(default=7700, ge=1, le=65535)
    data_port: Int = Field(default=7701, ge=1, le=65535)
    metrics_port: Int = Field(default=7702, ge=1, le=65535)
    data_address: str | None = Field(default=None, min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.:-]+$")
    engine_address: str = Field(default="127.0.0.1", min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.:-]+$")
    remote_dir: str = Field(default="~/.cache/testbed", min_length=1, max_length=255,
                            pattern=r"^(~/)?[A-Za-z0-9_./-]+$")
    connect_timeout: Seconds = Field(default=10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _ssh_keys(self) -> "NodeConfig":
        given = self.model_fields_set
        if self.backend != "ssh":
            stray = [k for k in SSH_ONLY if k in given]
            if stray:
                raise ValueError(f"{stray[0]} belongs to backend: ssh (this node's backend is {self.backend})")
            return self
        if self.host is None:
            raise ValueError("backend ssh needs host: the machine to run the node on")
        if self.key is None:
            raise ValueError("backend ssh needs key: the private key file to log in with "
                             "(keys from an ssh-agent are never used)")
        ports = [self.control_port, self.data_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise ValueError(f"control_port, data_port and metrics_port must differ, got {ports}")
        if self.cpuset is not None:
            raise ValueError("cpuset names CPUs of this host; an ssh node runs on another machine")
        return self

    @property
    def ssh_user(self) -> str:
        """The remote user: ``user``, else the name of whoever runs the testbed."""
        import getpass
        return self.user or getpass.getuser()

    # backend: android (local node only; testbed.android): the phone and its benchmark binary
    serial: str | None = None                # auto (the only phone) or a serial
    benchmark_model: PathText | None = None  # host path of TFLite's Android benchmark_model
    cores: str | None = None                 # big | all | hexadecimal CPU mask
    delegate: Literal["cpu", "xnnpack", "gpu", "nnapi"] | None = None
    adb_port: Int | None = Field(default=None, ge=1, le=65535)

    @model_validator(mode="after")
    def _android_fields(self) -> "NodeConfig":
        phone = ("serial", "benchmark_model", "cores", "delegate", "adb_port")
        given = [k for k in phone if getattr(self, k) is not None]
        if self.backend != "android" and given:
            raise ValueError(f"{', '.join(given)} belong to backend: android")
        if self.backend == "android":
            if self.benchmark_model is None:
                raise ValueError("backend android needs benchmark_model: the host path of TFLite's Android "
                                 "benchmark binary (downloaded once)")
            if self.cores is not None and self.cores not in ("big", "all") and \
                    not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,16}", self.cores):
                raise ValueError(f"cores: expected big, all or a hexadecimal CPU mask such as f0, got {self.cores!r}")
        return self

    @field_validator("cpu_period")
    @classmethod
    def _cfs_period(cls, v: float) -> float:
        # The kernel takes CFS periods of 1 ms to 1 s.
        if not 0.001 <= v <= 1.0:
            raise ValueError(f"must be between 1ms and 1s (the kernel's CFS period range), got {v:g}s")
        return v

    @field_validator("cpuset")
    @classmethod
    def _cpu_list(cls, v: str | None) -> str | None:
        if v is not None:
            from testbed.deploy.cpus import parse_cpuset
            parse_cpuset(v)
        return v

    @property
    def cpu_list(self) -> tuple[int, ...] | None:
        from testbed.deploy.cpus import parse_cpuset
        return parse_cpuset(self.cpuset) if self.cpuset is not None else None

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, v: int | None) -> int | None:
        # Docker refuses less than 6 MiB; a Python agent with LiteRT needs far more.
        if v is not None and v < 64 * 2**20:
            raise ValueError("memory below 64MiB cannot hold the node agent; write e.g. '1GiB'")
        return v


class Nodes(Frozen):
    """The two nodes, and whether the sweep pins them to CPUs of their own
    (``pinning: auto``, the default: the UE gets cores nobody else uses whenever
    the host has them; ``off``: the kernel places every thread)."""

    local: NodeConfig = NodeConfig()
    remote: NodeConfig = NodeConfig()
    pinning: Literal["auto", "off"] = "auto"

    @field_validator("pinning", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: take it as the word it was.
        return "off" if v is False else v

    @model_validator(mode="after")
    def _same_backend(self) -> "Nodes":
        a, b = self.local.backend, self.remote.backend
        if a == "ssh":
            raise ValueError("the local node runs on this host: backend ssh is for the remote node")
        if b == "android":
            raise ValueError("backend android is for the local node (the phone runs the head); "
                             "the remote node runs on this host (auto, docker or netns)")
        if a == "android" and b == "ssh":
            raise ValueError("a phone as the local node needs a remote on this host (its proxy local node "
                             "shares the remote's backend); backend ssh is not available with it yet")
        if b == "ssh" or a == "android":
            return self           # an ssh remote is on another machine; a phone's proxy uses the remote's backend
        if a != b and "auto" not in (a, b):
            raise ValueError(f"local and remote must use the same backend (got {a} and {b})")
        return self

    @property
    def backend(self) -> str:
        """The backend of the nodes on this host (``auto`` when none is named). With an
        ssh remote that is the local node's (``remote_ssh`` says the rest); with a phone as the
        local node (``android``) the remote's, which the phone's proxy local node shares."""
        if self.remote_ssh:
            return self.local.backend
        return next((b for b in (self.local.backend, self.remote.backend) if b not in ("auto", "android")), "auto")

    @property
    def android(self) -> NodeConfig | None:
        """The local node's config when it is a phone."""
        return self.local if self.local.backend == "android" else None

    @property
    def remote_ssh(self) -> bool:
        """The remote node runs on another machine, reached over SSH."""
        return self.remote.backend == "ssh"


class Runs(Frozen):
    """Per configuration: ``warmup`` untimed inferences, then ``samples`` timed
    ones — continued past ``samples`` until ``min_seconds`` have passed, and
    stopped early (after at least one sample) once ``max_seconds`` have passed,
    so slow low-bandwidth points stay bounded.

    ``repeat`` runs the whole sweep that many times into one run folder. With
    more than one repeat, each repeat walks the profiles, and the split points
    within each profile, in an order shuffled with ``seed`` + repeat, so a slow
    drift of the host is not confounded with the split point; with one repeat
    the order is the file's (profiles as listed, split points ascending).
    ``seed`` (random when not given) is recorded in config.yaml."""

    repeat: Int = Field(default=1, ge=1, le=100)
    seed: Int | None = Field(default=None, ge=0, le=2**31 - 1)
    warmup: Int = Field(default=2, ge=0, le=10_000)
    samples: Int = Field(default=20, ge=1, le=1_000_000)
    min_seconds: Seconds = Field(default=0.0, le=MAX_CONFIG_SECONDS)
    max_seconds: Seconds = Field(default=60.0, le=MAX_CONFIG_SECONDS)
    kpi_runs: Int = Field(default=10, ge=1, le=10_000)
    layer_runs: Int = Field(default=10, ge=1, le=10_000)
    # streams (nodes.stream): frames arrive at fps for duration whether or not the pipeline keeps up
    mode: Literal["single", "stream"] = "single"
    fps: Number = Field(default=30.0, gt=0, le=10_000)
    duration: Seconds = Field(default=20.0, gt=0, le=MAX_CONFIG_SECONDS)
    queue: Int = Field(default=2, ge=1, le=10_000)

    @model_validator(mode="after")
    def _bounds(self) -> "Runs":
        if self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")
        if self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}s) exceeds max_seconds ({self.max_seconds:g}s)")
        if self.mode == "stream" and self.fps * self.duration > 1_000_000:
            raise ValueError(f"a stream of {self.fps:g} fps for {self.duration:g}s is more than 1,000,000 frames")
        return self


class Transport(Frozen):
    """How the cut tensors cross: ``tcp`` (the data link) or ``udp`` (``nodes.udp``:
    packetised at the path MTU, paced to the direction's rate, no retransmission,
    missing bytes zero-filled or the frame dropped, ``on_loss``). ``nft_loss`` drops
    that percentage of the cut direction's packets with an nftables rule on the
    sending node's data interface (``testbed.link.nft_loss``), removed at the end."""

    protocol: Literal["tcp", "udp"] = "tcp"
    on_loss: Literal["zero", "drop"] = "zero"
    nft_loss: Percent = Field(default=0.0, ge=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"protocol": v} if isinstance(v, str) else v

    @field_validator("nft_loss")
    @classmethod
    def _whole(cls, v: float) -> float:
        if v != int(v):
            raise ValueError("nftables draws whole percents (numgen random mod 100): write e.g. 5%")
        return v


class InputSpec(Frozen):
    """``source: synthetic`` (deterministic images from ``seed``) or a folder of
    images (png/jpeg) resized to the model input. ``count`` images cycle over the samples."""

    source: PathText = "synthetic"
    count: Int = Field(default=4, ge=1, le=1000)
    seed: Int = Field(default=0, ge=0, le=MAX_SEED)

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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def _point(value: int | str) -> int:
    """One split point, bounded before anything is expanded from it (the text
    of a 4,000-digit number is refused before ``int`` reads it)."""
    if isinstance(value, str) and len(value) > len(str(MAX_SPLIT_POINT)):
        raise ValueError(f"split point must be within 0 and {MAX_SPLIT_POINT}, got {_shown(value)}")
    k = int(value)
    if not 0 <= k <= MAX_SPLIT_POINT:
        raise ValueError(f"split point must be within 0 and {MAX_SPLIT_POINT}, got {k}")
    return k


# HOST:PORT as everywhere in the testbed (one parser, shared with the agent).
from nodes.addresses import parse_host_port  # noqa: E402

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
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"expected a split point or a range such as '0-5', got {_shown(item)}")
        if isinstance(item, int):
            out.append((_point(item), _point(item)))
            continue
        for piece in item.split(","):
            m = _RANGE.fullmatch(piece)
            if not m:
                raise ValueError(f"expected a split point or a range such as '0-5', got {_shown(piece.strip())}")
            lo = _point(m.group(1))
            hi = _point(m.group(2)) if m.group(2) is not None else lo
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
    network: list[PathText] = Field(min_length=1)
    runs: Runs = Runs()
    input: InputSpec = InputSpec()
    input_encoding: Literal["raw", "png", "jpeg"] = "raw"
    codec: str = "raw"
    topology: Literal[1, 2, 3] = 1
    transport: Transport = Transport()
    metrics: MetricsSpec = MetricsSpec()
    output: PathText = "results"

    _located: Located | None = PrivateAttr(default=None)
    _base: Path = PrivateAttr(default=Path("."))

    @field_validator("splits", mode="before")
    @classmethod
    def _check_splits(cls, v: Any) -> Any:
        parse_splits(v)
        return v

    @field_validator("runs")
    @classmethod
    def _phone_single(cls, v: Runs, info: ValidationInfo) -> Runs:
        nodes = info.data.get("nodes")
        if v.mode == "stream" and nodes is not None and nodes.local.backend == "android":
            raise ValueError("mode: stream is not available with a phone as the local node "
                             "(the phone's head times are composed per sample; use mode: single)")
        return v

    @field_validator("topology")
    @classmethod
    def _phone_topology(cls, v: int, info: ValidationInfo) -> int:
        nodes = info.data.get("nodes")
        if v != 1 and nodes is not None and nodes.local.backend == "android":
            raise ValueError(f"topology {v} runs the head in the network; a phone as the local node "
                             "measures the head on the phone, so it needs topology 1")
        return v

    @field_validator("transport")
    @classmethod
    def _loss_here(cls, v: Transport, info: ValidationInfo) -> Transport:
        nodes, topology = info.data.get("nodes"), info.data.get("topology", 1)
        if v.nft_loss and topology != 1 and nodes is not None and nodes.remote_ssh:
            raise ValueError(f"nft_loss drops on the interface of the node that sends the cut, the ssh "
                             f"remote in topology {topology}; this host does not change the remote's "
                             "firewall (use topology 1, or netem loss in the profile)")
        if v.protocol == "udp" and nodes is not None and nodes.remote_ssh and nodes.remote.shape_at == "remote":
            raise ValueError("protocol udp with shape_at: remote: the remote shapes only the data "
                             "connection's port and the datagrams leave from another; use shape_at: local")
        return v

    @field_validator("codec")
    @classmethod
    def _codec_chain(cls, v: str) -> str:
        from nodes.tensor_codecs import parse_chain
        return parse_chain(v).name

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

    def load_profile_at(self, index: int) -> Any:
        """``network[index]`` as a ``testbed.link.profile.LinkProfile``.

        Errors inside a profile file keep that file's line; a profile that does
        not exist (or is not a file) is reported at this experiment's ``network`` line."""
        from testbed.link.profile import load_profile

        try:
            return load_profile(self.profile_ref(index))
        except ConfigError as e:
            if e.file and e.line is not None:
                raise
            raise self.error(e.reason if e.file is None else str(e), ("network", index)) from None

    def load_profiles(self) -> list[Any]:
        """Every network entry as a ``testbed.link.profile.LinkProfile``; the
        first error as ``load_profile_at`` reports it."""
        out = []
        for i, _ in enumerate(self.network):
            out.append(self.load_profile_at(i))
            names = [p.name for p in out[:-1]]
            if out[-1].name in names:
                raise self.error(f"profile name {out[-1].name!r} is also the name of network entry "
                                 f"{names.index(out[-1].name)}; results are keyed by profile name", ("network", i))
        return out

    def file_problems(self) -> list[ConfigError]:
        """What is wrong with the files the experiment names (input folder and
        its images, model file), at their lines; empty when nothing is."""
        return [e for e in (self.input_problem(), self.model_problem()) if e is not None]

    def input_problem(self) -> ConfigError | None:
        """The input folder is not a folder of regular, bounded image files."""
        if self.input.synthetic:
            return None
        folder = self.resolve_path(self.input.source)
        try:
            if not folder.is_dir():
                return self.error(f"not 'synthetic' and not a folder: {folder}", ("input", "source"))
            self.input_files()
        except ConfigError as e:
            return e
        return None

    def model_problem(self) -> ConfigError | None:
        """``model.path`` is not a regular file of at most 2 GiB."""
        if self.model.path is None:
            return None
        try:
            check_regular_file(self.resolve_path(self.model.path), MAX_MODEL_BYTES, "a model file")
        except ConfigError as e:
            message = e.reason.replace("cannot read a model file: No such file or directory", "no such model file")
            return self.error(f"{message}: {e.file}", ("model", "path"))
        return None

    def input_files(self) -> list[Path]:
        """The images a folder ``input.source`` gives, in the order the sweep
        reads them (the first ``count`` by name). Raises ConfigError at the
        ``input.source`` line when one is not a regular file of bounded size
        or there is none."""
        from testbed.inputs import MAX_IMAGE_BYTES, image_files

        folder = self.resolve_path(self.input.source)
        try:
            files = image_files(folder)[:self.input.count]
            for f in files:
                check_regular_file(f, MAX_IMAGE_BYTES, "an input image")
        except ConfigError as e:
            raise self.error(str(e), ("input", "source")) from None
        except OSError as e:
            raise self.error(f"cannot list {folder}: {e.strerror}", ("input", "source")) from None
        if not files:
            raise self.error(f"no images in {folder}", ("input", "source"))
        return files


def load_experiment(path: str | Path, *, check_files: bool = True) -> Experiment:
    """Read, validate and anchor an experiment file.

    ``check_files=False`` leaves the files it names (model, input images) to
    the caller: ``testbed.sweep.preflight`` collects ``file_problems()`` with the rest.

    Raises:
        ConfigError: ``file:line: field: what was expected``.
    """
    located = load_yaml(path)
    if not isinstance(located.data, dict):
        raise located.error("expected a mapping of experiment fields (name, model, network, ...)")
    exp = validate(Experiment, located)
    exp._located = located
    exp._base = Path(path).resolve().parent
    exp.model._base = exp._base
    if check_files:
        for problem in exp.file_problems():
            raise problem
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
