"""Checking a run before anything exists: the files, the model, then the machine.

Owns ``check(experiment, options)``: everything ``testbed run`` needs, checked
without creating a run folder, a node, a namespace of the run's or a qdisc, and
reported as *every* problem found, one line each (``file:line: field: what``
wherever a file says it). ``require`` is the same for ``testbed run``: it raises
``PreflightError`` (all the lines) before the sweep creates anything.
Also owns ``estimate_duration(shape)``: a deliberately simple, replaceable model
of how long a run takes.

Two stages. *Files*: the experiment (schema), the command-line overrides, every
link profile (each one's first error), the model (resolvable, loadable, one
NHWC image input, outputs, operators), the split points, the input images.
*Machine*, only once the files are right (probing a backend for a
configuration that cannot run tells nothing): the backend (Docker daemon
answers, netns needs root, docker's CPU ceiling), what the kernel can shape for
every step of every profile (the shaper's own ``plan``, which touches nothing;
probing the kernel makes and removes a private throw-away namespace, as every
run does), the metrics address bindable, the output folder writable with room
for the run. Control ports live inside each node's namespace or container, so
no host port other than the metrics one is needed.

Leaves to others: running (``testbed.sweep``), the schemas
(``testbed.experiment``, ``testbed.link.profile``), models (``testbed.model``),
the kernel (``testbed.link.shaper``), backends (``testbed.deploy``).
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError, TestbedError

# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class RunOptions:
    """The command-line overrides ``check`` honours (``testbed.sweep.SweepOptions``
    has the same attributes and can be passed instead)."""

    resume: Path | None = None
    metrics_listen: str | None = None
    backend: str | None = None
    output: Path | None = None


class PreflightError(TestbedError):
    """Problems found before a run; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Check:
    """What ``check`` found: problems (one line each), facts about the run
    (label, text), and the shape the estimate was made from."""

    problems: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    shape: "RunShape | None" = None
    estimate_s: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- the estimate
# The duration model lives in testbed.sweep.estimate (shared with the sweep's start line and ETA).
from testbed.sweep.estimate import LinkShape, RunShape, estimate_duration  # noqa: E402

# --------------------------------------------------------------------------- helpers


def _human_s(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _Run:
    """State of one check: the experiment, its pieces as they load, problems."""

    def __init__(self, path: str | Path, options: Any) -> None:
        self.path = Path(path)
        self.options = options
        self.result = Check()
        self.exp: Any = None
        self.profiles: list[Any] = []
        self.graph: Any = None
        self.model_path: Path | None = None
        self.splits: list[int] = []

    def problem(self, message: str | BaseException) -> None:
        self.result.problems.append(_one_line(message) if isinstance(message, BaseException) else message)

    def fact(self, label: str, text: str) -> None:
        self.result.facts.append((label, text))

    def opt(self, name: str) -> Any:
        return getattr(self.options, name, None) if self.options is not None else None

    def at(self, message: str, loc: tuple[Any, ...], option: str | None = None) -> str:
        """A problem about a value that came from the command line or the file."""
        if option is not None:
            return str(ConfigError(message, field=option))
        return str(self.exp.error(message, loc))


# --------------------------------------------------------------------------- stage 1: files

def _experiment(run: _Run) -> bool:
    from testbed.experiment import load_experiment

    try:
        run.exp = load_experiment(run.path, check_files=False)
    except ConfigError as e:
        run.problem(e)
        return False
    run.fact("experiment", f"{run.path}: {run.exp.name}")
    return True


def _options(run: _Run) -> None:
    from testbed.experiment import parse_host_port

    listen = run.opt("metrics_listen")
    if listen is not None:
        try:
            parse_host_port(listen)
        except ValueError as e:
            run.problem(ConfigError(str(e), field="--metrics-listen"))
    backend = run.opt("backend")
    if backend is not None and backend not in ("auto", "docker", "netns"):
        run.problem(ConfigError(f"expected auto, docker or netns, got {backend!r}", field="--backend"))
    resume = run.opt("resume")
    if resume is not None:
        _resume(run, Path(resume))


def _resume(run: _Run, folder: Path) -> None:
    from testbed.analysis.results import CONFIG, LAYERS, PARTS, SAMPLES, SUMMARY
    from testbed.config import check_regular_file, read_regular_file

    try:
        text = read_regular_file(folder / CONFIG, 64 << 20, "a run's config.yaml").decode("utf-8", "replace")
    except ConfigError:
        run.problem(ConfigError(f"{folder}: not a run folder (no readable {CONFIG})", field="--resume"))
        return
    for name in (SUMMARY, SAMPLES, PARTS, LAYERS):   # read below (what is done): never a FIFO
        if (folder / name).exists():
            try:
                check_regular_file(folder / name, MAX_RESULT_BYTES, "a result file")
            except ConfigError as e:
                run.problem(ConfigError(str(e), field="--resume"))
    # config.yaml starts with the experiment's name (resolved_dict keeps field order);
    # reading that line is enough and stays fast on a config holding long traces.
    first = next((line for line in text.splitlines()[:50] if line.startswith("name:")), "name:")
    name = first.partition(":")[2].strip().strip("'\"")
    if name != run.exp.name:
        run.problem(ConfigError(f"{folder}: run of experiment {name!r}, not {run.exp.name!r}", field="--resume"))


def _profiles(run: _Run) -> None:
    names: dict[str, int] = {}
    for i, _ in enumerate(run.exp.network):
        try:
            prof = run.exp.load_profile_at(i)
        except ConfigError as e:
            run.problem(e)
            continue
        if prof.name in names:
            run.problem(run.exp.error(f"profile name {prof.name!r} is also the name of network entry "
                                      f"{names[prof.name]}; results are keyed by profile name", ("network", i)))
            continue
        names[prof.name] = i
        run.profiles.append(prof)


def _model(run: _Run) -> None:
    from testbed.model.graph import ModelGraph
    from testbed.model.zoo import Registry, resolve

    problem = run.exp.model_problem()
    if problem is not None:
        run.problem(problem)
        return
    spec = run.exp.model.as_spec()
    try:
        if "fetch" in spec and Registry().entries().get(spec["fetch"]) is None:
            # never downloaded by a check: the run fetches it (and checks the split points) first
            run.fact("model", f"{spec['fetch']}: not in the cache; the run downloads it first "
                              "(split points are checked then)")
            return
        run.model_path = Path(resolve(spec))
        run.graph = ModelGraph.from_file(run.model_path)
    except TestbedError as e:
        run.problem(run.exp.error(_one_line(e), ("model",)))
        return
    except (OSError, ValueError, IndexError, TypeError, AttributeError) as e:
        # a model the model layer cannot even describe: say so here instead of a traceback
        run.problem(run.exp.error(f"cannot read the model: {_one_line(e)}", ("model",)))
        return
    _model_shape(run)


def _model_shape(run: _Run) -> None:
    """What the sweep assumes of the model: one NHWC image input, outputs, operators."""
    from testbed.inputs import _layout

    g = run.graph
    where = ("model",)
    problems = []
    if g.num_layers == 0:
        problems.append("the model has no operators: there is nothing to split")
    if len(g.inputs) != 1:
        problems.append(f"the sweep feeds one image input; this model has {len(g.inputs)}")
    else:
        try:
            _layout(tuple(g.inputs[0].shape))
        except ConfigError as e:
            problems.append(e.reason)
    if not g.outputs:
        problems.append("the model has no outputs")
    for message in problems:
        run.problem(run.exp.error(message, where))
    if problems:
        run.graph = None
        return
    try:
        run.splits = run.exp.split_points(g.num_layers)
    except ConfigError as e:
        run.problem(e)
        return
    info = g.inputs[0]
    run.fact("model", f"{g.path}: {g.num_layers} layers, {_mib(g.size or 0)}, input "
                      f"{'x'.join(map(str, info.shape))} {info.dtype}")
    shown = ", ".join(map(str, run.splits[:12])) + (", …" if len(run.splits) > 12 else "")
    run.fact("splits", f"{len(run.splits)} point(s): {shown}")


def _inputs_fit(run: _Run) -> None:
    """The input images reach the local node in one ``set_inputs`` frame: their
    descriptors must fit the protocol's header bound and their bytes its payload
    bound. Before this, ``input.count: 1000`` passed the schema and failed after
    deploy with a refused frame."""
    import json

    import numpy as np

    from nodes import protocol as P

    if run.graph is None:
        return
    count = run.exp.input.count
    info = run.graph.inputs[0]
    descs, _, nbytes = P.encode_tensors({info.name: np.zeros(info.shape, info.dtype)}, P.codec_registry())

    def header_bytes(sets: int) -> int:   # as the agent client builds it (token: 32 characters, as the sweep's)
        meta = [{"tensors": descs, "payload_bytes": nbytes}] * sets
        return len(json.dumps(P.request_header("set_inputs", "t" * 32, sets=meta), separators=(",", ":")))

    per = header_bytes(2) - header_bytes(1)
    fit = min((P.MAX_HEADER_BYTES - header_bytes(1)) // per + 1, P.MAX_PAYLOAD_BYTES // max(nbytes, 1))
    if count > fit:
        run.problem(run.exp.error(f"{count} input images of {_mib(nbytes)} do not fit the one frame that "
                                  f"carries them to the local node: at most {fit} for this model", ("input", "count")))


def _images(run: _Run) -> None:
    from testbed.inputs import open_image

    if run.exp.input.synthetic:
        run.fact("inputs", f"{run.exp.input.count} synthetic image(s), seed {run.exp.input.seed}")
        return
    problem = run.exp.input_problem()
    if problem is not None:
        run.problem(problem)
        return
    files = run.exp.input_files()
    for f in files:
        try:
            open_image(f).close()
        except ConfigError as e:
            run.problem(run.exp.error(str(e), ("input", "source")))
    run.fact("inputs", f"{len(files)} image(s) from {run.exp.resolve_path(run.exp.input.source)}")


# --------------------------------------------------------------------------- stage 2: machine

def _backend(run: _Run) -> str | None:
    from testbed.deploy.docker import daemon_available

    wanted = run.opt("backend") or run.exp.nodes.backend
    loc, option = ("nodes",), ("--backend" if run.opt("backend") else None)
    root = os.geteuid() == 0
    docker_ok, why = daemon_available() if wanted in ("auto", "docker") else (False, "")
    if wanted == "docker" and not docker_ok:
        run.problem(run.at(f"backend docker: {why}", loc, option))
        return None
    chosen = "docker" if docker_ok else "netns"
    if chosen == "netns" and not root:
        reason = f"{why}; " if wanted == "auto" else ""
        run.problem(run.at(f"backend {wanted}: {reason}the netns backend needs root "
                           "(namespaces, veths, cgroups)", loc, option))
        return None
    if chosen == "docker":
        _docker_cpus(run)
    run.fact("backend", f"{chosen} ({why or 'asked for netns'})")
    return chosen


def _docker_cpus(run: _Run) -> None:
    host = os.cpu_count() or 1
    for role in ("local", "remote"):
        cpus = getattr(run.exp.nodes, role).cpus
        if cpus is not None and cpus > host:
            run.problem(run.exp.error(f"docker allows at most {host} CPUs on this host, got {cpus:g}",
                                      ("nodes", role, "cpus")))


def _node_image_missing() -> bool:
    """True when the docker node image would be built first (best effort; False when unsure)."""
    try:
        from testbed.deploy import docker as dk
        from testbed.deploy.image import NODE_REPO, OFFLINE_BASE, REGISTRY_BASE, content_hash

        client = dk.connect()
        try:
            base = next((ref for ref in (REGISTRY_BASE, OFFLINE_BASE) if dk.image_id(client, ref)), None)
            if base is None:
                return True
            return dk.image_id(client, f"{NODE_REPO}:{content_hash(dk.image_id(client, base))}") is None
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - informational only: never a reason to refuse a run
        return False


def _ssh_remote(run: _Run) -> None:
    """An ssh remote: connect (host key, auth) and check what its runtime needs there
    (python3 or docker, disk, free agent ports); creates nothing on the remote."""
    from testbed.deploy import ssh as remote_ssh
    from testbed.deploy.sshconn import connect

    if not run.exp.nodes.remote_ssh:
        return
    spec = remote_ssh.SshSpec.from_config(run.exp.nodes.remote)
    loc = ("nodes", "remote")
    shaper = spec.shape_at == "remote"  # the shaper runs there from a venv, whatever the runtime
    try:
        with connect(spec.host) as conn:
            if spec.runtime == "docker":
                status, out, err = conn.run(["docker", "version", "--format", "{{.Server.Version}}"],
                                            check=False, timeout_s=30)
                if status != 0:
                    why = "no docker CLI" if status == 127 else f"its Docker engine does not answer " \
                                                                  f"({_one_line(err or out)})"
                    run.problem(run.at(f"{spec.host.name}: {why} (runtime: docker)", loc))
                    return
                run.fact("remote", f"{spec.host.name}, Docker engine {out.strip()}")
                if not shaper:
                    return
            facts = remote_ssh.probe(conn, spec.remote_dir)
            if shaper and remote_ssh.net_admin(conn, facts) is None:
                run.problem(run.at(f"{spec.host.name}: shape_at: remote needs root or passwordless sudo there "
                                   f"(NET_ADMIN to change its qdiscs); {spec.host.user} has neither", loc))
            if spec.runtime == "process":
                data = spec.data_address or conn.server_address()
                wanted = [f"127.0.0.1:{spec.control_port}", f"{data}:{spec.data_port}",
                          f"127.0.0.1:{spec.metrics_port}"]
                for where, why in remote_ssh.busy_ports(conn, wanted):
                    run.problem(run.at(f"{spec.host.name}: port {where} is already in use on the remote ({why}); "
                                       "choose free ones with control_port / data_port / metrics_port", loc))
            env = f"{facts['dir']}/{remote_ssh.env_hash(facts, with_shaper=shaper)}"
            ready = conn.run(["test", "-f", f"{env}/ready"], check=False)[0] == 0
            need = remote_ssh.RUN_BYTES + (0 if ready else remote_ssh.VENV_BYTES)
            if facts["free_bytes"] < need:
                run.problem(run.at(f"{spec.host.name}: remote disk full: {facts['free_bytes'] // 2**20} MiB free "
                                   f"under {facts['dir']}, the agent needs about {need // 2**20} MiB", loc))
            if spec.runtime == "process":
                run.fact("remote", f"{spec.host.name}, python {facts['python']} ({facts['machine']}), agent venv "
                                   f"{'ready' if ready else 'to be made'}")
            if shaper:
                run.fact("remote shaping", f"downlink on {spec.host.name}'s interface toward this host "
                                           f"(source port {spec.data_port}); venv {'ready' if ready else 'to be made'}")
    except TestbedError as e:
        run.problem(run.at(_one_line(e).removeprefix("node remote: "), loc))


def _kernel(run: _Run) -> None:
    """Every step of every profile planned as the sweep's shapers will (arrangement
    auto): one line per profile the kernel cannot shape, then the remedy once."""
    from testbed.link.params import kernel_params
    from testbed.link.shaper import detect_capabilities, how_to_get

    try:
        caps = detect_capabilities()
    except TestbedError as e:
        run.problem(f"kernel: cannot probe what it can shape: {_one_line(e)}")
        return
    run.fact("kernel", ", ".join(f"{k} {'yes' if getattr(caps, k) else 'NO'}" for k in ("netem", "htb", "tbf")))
    lacking: set[str] = set()
    # shape_at: remote: the downlink is the remote kernel's (testbed.link.remote; Link.check
    # plans it there before anything is measured); stepping a trace there is not offered
    remote = run.exp.nodes.remote_ssh and run.exp.nodes.remote.shape_at == "remote"
    for i, prof in enumerate(run.profiles):
        needs: dict[str, set[str]] = {}
        if remote and len(prof.schedule("downlink")) > 1:
            run.problem(run.exp.error(f"profile {prof.name!r} varies its downlink over time, which cannot be "
                                      "stepped on the remote (shape_at: remote); use shape_at: local",
                                      ("network", i)))
        for direction in ("uplink",) if remote else ("uplink", "downlink"):
            for _, d in prof.schedule(direction):
                try:
                    missing = caps.missing(kernel_params(d, "auto", caps.timer_slack_s))
                except ValueError as e:   # load_profile checked the same rules: a bug if reached
                    run.problem(run.exp.error(f"profile {prof.name!r} {direction}: {e}", ("network", i)))
                    break
                if missing:
                    needs.setdefault(direction, set()).update(missing)
        if needs:
            kinds = sorted(set().union(*needs.values()))
            lacking.update(kinds)
            where = " and ".join(needs)
            run.problem(run.exp.error(f"profile {prof.name!r} needs {', '.join('sch_' + k for k in kinds)} "
                                      f"(for its {where}: {_asks(prof, list(needs))}), which this kernel lacks",
                                      ("network", i)))
    if lacking:
        run.problem(how_to_get(sorted(lacking), caps.kernel))


def _nft(run: _Run) -> None:
    """``transport.nft_loss`` needs the nft and nsenter commands on this host."""
    import shutil

    if not run.exp.transport.nft_loss:
        return
    missing = [c for c in ("nft", "nsenter") if shutil.which(c) is None]
    if missing:
        run.problem(run.exp.error(f"nft_loss needs {' and '.join(missing)} (apt-get install nftables util-linux)",
                                  ("transport", "nft_loss")))


def _asks(prof: Any, directions: list[str]) -> str:
    """What a profile asks beyond a rate (the reason it needs netem)."""
    names = ("delay_s", "jitter_s", "loss", "duplicate", "corrupt", "reorder", "slot")
    asked = {n.removesuffix("_s") for d in directions for _, x in prof.schedule(d) for n in names if getattr(x, n)}
    return ", ".join(sorted(asked)) or "its qdisc"


def _listen(run: _Run) -> None:
    from testbed.experiment import parse_host_port

    option = run.opt("metrics_listen")
    listen = option or run.exp.metrics.listen
    host, port = parse_host_port(listen)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            # as the metrics server binds (SO_REUSEADDR): a port in TIME_WAIT is fine, a listener is not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except (OSError, UnicodeError, ValueError) as e:
        reason = getattr(e, "strerror", None) or _one_line(e)
        run.problem(run.at(f"cannot listen on {listen}: {reason}", ("metrics", "listen"),
                           "--metrics-listen" if option else None))
        return
    run.fact("ports", f"metrics {listen} free; the agents' ports live inside the nodes")


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def _disk(run: _Run, shape: RunShape | None) -> None:
    option = run.opt("output")
    parent = Path(run.opt("resume")) if run.opt("resume") else \
        (Path(option) if option is not None else run.exp.resolve_path(run.exp.output))
    loc, opt_name = ("output",), ("--resume" if run.opt("resume") else "--output" if option is not None else None)
    base = _existing_ancestor(parent.resolve())
    if not base.is_dir():
        run.problem(run.at(f"{base} is not a folder; the run folder goes under {parent}", loc, opt_name))
        return
    vfs = os.statvfs(base)
    if vfs.f_flag & os.ST_RDONLY or not os.access(base, os.W_OK | os.X_OK):
        run.problem(run.at(f"cannot write under {base} (read-only or no permission)", loc, opt_name))
        return
    need = _disk_need(run, shape)
    free = shutil.disk_usage(base).free
    if need * 1.2 > free:
        run.problem(run.at(f"not enough space under {base}: the run needs about {_mib(need)} "
                           f"(split parts and results), {_mib(free)} free", loc, opt_name))
        return
    run.fact("disk", f"about {_mib(need)} under {parent} ({_mib(free)} free)")


MAX_RESULT_BYTES = 1 << 40   # a result CSV: only the file type matters here
ROW_BYTES = 400              # one samples.csv row (27 columns, floats at full precision)


def _disk_need(run: _Run, shape: RunShape | None) -> int:
    """Split parts (each split point's head + tail ≈ the model) + result rows + a margin."""
    model = run.graph.size if run.graph is not None and run.graph.size else 0
    points = len(run.splits)
    resumed = run.opt("resume") is not None and (Path(run.opt("resume")) / "parts" / "manifest.json").exists()
    configs = len(shape.configurations) if shape is not None else points * len(run.profiles)
    samples = configs * max(run.exp.runs.samples, 1) * ROW_BYTES
    return (0 if resumed else points * model) + samples + configs * 4096 + 2**20


# --------------------------------------------------------------------------- shape and entry points

def _done(run: _Run) -> frozenset[tuple[int, str, int]]:
    from testbed.analysis.results import RunFolder

    resume = run.opt("resume")
    return frozenset(RunFolder(resume).finished()) if resume is not None else frozenset()


def _shape(run: _Run, backend: str) -> RunShape:
    from testbed.deploy.cpus import plan_cpus
    from testbed.sweep.estimate import host_macs_per_s, shape_for

    exp = run.exp
    cpus = plan_cpus(exp.nodes.local.cpus, exp.nodes.remote.cpus, mode=exp.nodes.pinning,
                     local_set=exp.nodes.local.cpu_list, remote_set=exp.nodes.remote.cpu_list)
    parallel = bool(cpus.local and cpus.remote and not set(cpus.local) & set(cpus.remote))
    macs = sum(layer.macs for layer in run.graph.layers)
    return shape_for(exp, run.graph, run.profiles, run.splits, backend=backend, done=_done(run),
                     build_image=backend == "docker" and _node_image_missing(), parallel_nodes=parallel,
                     macs_per_s=host_macs_per_s(run.model_path, macs) if run.model_path else DEFAULT_MACS,
                     host_cpus=len(cpus.host))


DEFAULT_MACS = 2e10


def _summary(run: _Run, shape: RunShape | None) -> None:
    exp = run.exp
    total = len(run.profiles) * len(run.splits)
    todo = len(shape.configurations) if shape is not None else total
    resumed = f", {total - todo} already done" if todo != total else ""
    run.fact("configurations", f"{total} = {len(run.profiles)} profile(s) x {len(run.splits)} split point(s)"
                               f"{resumed}; per configuration {exp.runs.warmup} warm-up + " + (
                                   f"a stream of {exp.runs.fps:g} frames/s for {exp.runs.duration:g} s (queue "
                                   f"{exp.runs.queue})" if exp.runs.mode == "stream" else
                                   f"{exp.runs.samples} sample(s), at least {exp.runs.min_seconds:g} s, "
                                   f"at most {exp.runs.max_seconds:g} s"))
    if shape is not None:
        run.result.estimate_s = estimate_duration(shape)
        build = " (includes building the node image)" if shape.build_image else ""
        run.fact("estimate", f"about {_human_s(run.result.estimate_s)}{build}")


def check(path: str | Path, options: Any = None) -> Check:
    """Check everything a run of the experiment at ``path`` needs, creating nothing.

    ``options``: the run's overrides (``testbed.sweep.SweepOptions`` or anything
    with ``resume``, ``metrics_listen``, ``backend``, ``output``), or None.
    Returns a ``Check``; its ``problems`` are empty when the run can start.
    """
    run = _Run(path, options)
    if not _experiment(run):
        return run.result
    _options(run)
    _profiles(run)
    _model(run)
    _inputs_fit(run)
    _images(run)
    if run.result.problems:
        return run.result          # the machine is probed only for files that are right
    backend = _backend(run)
    shape = _shape(run, backend) if backend is not None and run.graph is not None else None
    _ssh_remote(run)
    _kernel(run)
    _nft(run)
    _listen(run)
    _disk(run, shape)
    if run.profiles:
        run.fact("profiles", ", ".join(p.name for p in run.profiles))
    if run.graph is not None:
        _summary(run, shape)
    run.result.shape = shape
    return run.result


def require(path: str | Path, options: Any = None) -> Check:
    """``check``, raising ``PreflightError`` (every problem, one line each) when
    the run cannot start. ``testbed run`` calls this before it creates anything."""
    result = check(path, options)
    if result.problems:
        raise PreflightError(result.problems)
    return result


__all__ = ["Check", "LinkShape", "PreflightError", "RunOptions", "RunShape", "check", "estimate_duration",
           "require"]
