"""The ssh backend: the remote node on another machine, reached over SSH.

Owns what happens on the remote host and the record needed to undo it:

- ``runtime: process``: the ``nodes`` package is copied over SFTP into
  ``<remote_dir>/<hash>/src`` (the hash covers nodes/, the agent's requirements and
  the remote's Python), a venv is made there with the remote's ``python3`` and the
  agent's requirements installed from the remote's own index (``wheels: index``),
  from wheels downloaded here and pushed over SFTP (``push``, for offline hosts), or
  the first that works (``auto``); once ready it is reused. The agent then runs from
  it as a plain process (``exec`` over the SSH connection, the run token on its
  stdin, never in its argv), its workdir ``<remote_dir>/runs/<run id>``.
- ``runtime: docker``: the node image built here is moved to the remote engine when
  that engine lacks it (``testbed.deploy.docker.copy_image``) and the agent runs in a
  container there, on the engine host's network (``docker.start_remote_agent``).

Either way the agent's control and metrics ports listen only where the SSH tunnel
reaches them (the remote's loopback, or ``engine_address``), and this host talks to
them through ``sshconn.Forward`` (the per-run token is still required); its data
port listens on the address the local node dials (``data_address``, default the
address the SSH server answered on), because the data plane is the link measured.

Every remote object is written to a state record (``/run/testbed/ssh/<run>.json``:
host, user, port, key, known_hosts, runtime, workdir, pid, container) *before* it
is created, so ``remove_run`` — teardown, and ``testbed cleanup`` after a killed
run — reconnects and removes exactly that. Agents also stop by themselves when the
lease holder (this process, through the tunnel) is gone (``nodes.lease``).

With ``shape_at: remote`` the venv also gets the ``testbed`` package and the link
layer's requirements, and the downlink is shaped there by ``testbed.link.remote``
(the remote's interface toward this host, the agent's data flow only; root or
passwordless sudo needed); the state record names the interface so teardown and
cleanup clear it.

Leaves to others: paramiko (``testbed.deploy.sshconn``), the Docker SDK
(``testbed.deploy.docker``), the local node (``testbed.deploy.netns``), shaping
(``testbed.link``; the downlink is shaped on this host's ingress by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from testbed import resources
from testbed.deploy import owner
from testbed.deploy.node import Node, NodeSpec
from testbed.deploy.sshconn import Connection, HostSpec, connect
from testbed.errors import NodeError, ShapingError

log = logging.getLogger("testbed.deploy")

STATE_DIR = Path("/run/testbed/ssh")
NODES_DIR = resources.package_path("nodes")
#: shape_at: remote runs ``python -m testbed.link.remote`` there, from this package.
TESTBED_DIR = resources.package_path("testbed")
#: What the remote shaper imports beyond the agent's requirements (shape_at: remote).
SHAPER_DISTRIBUTIONS = ("pyroute2", "pydantic", "pyyaml")
#: Free space the agent's venv needs on the remote (numpy, LiteRT, pillow, ...).
VENV_BYTES = 600 * 2**20
#: Free space a run's workdir needs (the parts of one split point, logs).
RUN_BYTES = 64 * 2**20


@dataclass(frozen=True)
class SshSpec:
    """What the experiment says about an ssh node (``NodeConfig`` with ``backend: ssh``)."""

    host: HostSpec
    runtime: str = "process"
    shape_at: str = "local"
    wheels: str = "auto"
    control_port: int = 7700
    data_port: int = 7701
    metrics_port: int = 7702
    data_address: str | None = None
    engine_address: str = "127.0.0.1"
    remote_dir: str = "~/.cache/testbed"

    @classmethod
    def from_config(cls, cfg: Any) -> "SshSpec":
        host = HostSpec(host=cfg.host, user=cfg.ssh_user, port=cfg.port, key=cfg.key,
                        known_hosts=cfg.known_hosts, timeout_s=cfg.connect_timeout)
        return cls(host=host, runtime=cfg.runtime, shape_at=cfg.shape_at, wheels=cfg.wheels,
                   control_port=cfg.control_port, data_port=cfg.data_port, metrics_port=cfg.metrics_port,
                   data_address=cfg.data_address, engine_address=cfg.engine_address,
                   remote_dir=cfg.remote_dir)


# --- state record ----------------------------------------------------------------------

def _state_path(run_id: str) -> Path:
    return STATE_DIR / f"{run_id}.json"


def _save(state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = _state_path(state["run_id"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def load_state(run_id: str) -> dict:
    try:
        return json.loads(_state_path(run_id).read_text())
    except (OSError, ValueError):
        return {}


def run_owners() -> dict[str, str]:
    """{run id: owner tag} of runs with an ssh state record."""
    if not STATE_DIR.is_dir():
        return {}
    return {p.stem: load_state(p.stem).get("owner", "") for p in STATE_DIR.glob("*.json")}


# --- facts about the remote ---------------------------------------------------------------

_PROBE = r"""
import json, os, platform, shutil, sys
d = os.path.expanduser(sys.argv[1])
p = d
while not os.path.isdir(p):
    p = os.path.dirname(p) or "/"
print(json.dumps({"python": "%d.%d.%d" % sys.version_info[:3], "machine": platform.machine(),
                  "home": os.path.expanduser("~"), "dir": d, "free_bytes": shutil.disk_usage(p).free,
                  "kernel": platform.release(), "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
                  "uid": os.getuid(), "ssh_client": (os.environ.get("SSH_CONNECTION") or "?").split()[0]}))
"""

_PORTS = r"""
import json, socket, sys
busy = []
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds: TIME_WAIT is no use
    try:
        s.bind((host, int(port)))
    except OSError as e:
        busy.append([spec, e.strerror])
    finally:
        s.close()
print(json.dumps(busy))
"""


def probe(conn: Connection, remote_dir: str = "~/.cache/testbed") -> dict[str, Any]:
    """Python version, machine, home, free space under ``remote_dir`` on the remote.
    Raises NodeError "no python3" when the remote has none."""
    status, out, err = conn.run(["python3", "-c", _PROBE, remote_dir], check=False, timeout_s=30)
    if status == 127:
        raise NodeError(f"{conn.spec.name}: no python3 on the remote (runtime: process needs it; "
                        "install python3 and python3-venv, or use runtime: docker)", node="remote")
    if status != 0:
        raise NodeError(f"{conn.spec.name}: python3 on the remote failed", node="remote",
                        exit_status=status, stderr=err)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise NodeError(f"{conn.spec.name}: unexpected answer from python3: {out[:80]!r}",
                        node="remote") from e


def busy_ports(conn: Connection, addresses: list[str]) -> list[tuple[str, str]]:
    """Which of ``host:port`` the remote cannot bind (already in use there)."""
    _, out, _ = conn.run(["python3", "-c", _PORTS, *addresses], timeout_s=30)
    return [(a, why) for a, why in json.loads(out.strip().splitlines()[-1])]


def _require_space(conn: Connection, facts: dict, need: int, what: str) -> None:
    if facts["free_bytes"] < need:
        raise NodeError(f"{conn.spec.name}: remote disk full: {facts['free_bytes'] // 2**20} MiB free under "
                        f"{facts['dir']}, {what} needs about {need // 2**20} MiB", node="remote")


# --- runtime: process ---------------------------------------------------------------------

def requirements_file(with_shaper: bool = False) -> Path:
    """The agent's requirements as the node image has them (``image.node_requirements``:
    from the installed distribution's metadata), with the remote shaper's ones when
    ``with_shaper``; written once per content to a cache file."""
    from testbed.deploy.image import NODE_DISTRIBUTIONS, node_requirements

    text = node_requirements(names=NODE_DISTRIBUTIONS + (SHAPER_DISTRIBUTIONS if with_shaper else ()))
    folder = Path(os.path.expanduser("~/.cache/testbed/requirements"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"node-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def _package(folder: Path) -> list[tuple[str, Path]]:
    """(path on the remote, file here) for a package's sources and data; symlinked folders
    followed (``testbed.resources`` links the repository's profiles in an editable install)."""
    out = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            p = Path(top) / name
            if p.suffix not in (".pyc", ".pyo") and p.is_file():
                out.append((str(Path(folder.name) / p.relative_to(folder)), p))
    return out


def _source_files(with_shaper: bool = False) -> list[tuple[str, Path]]:
    files = _package(NODES_DIR) + [("requirements.txt", requirements_file(with_shaper))]
    return files + (_package(TESTBED_DIR) if with_shaper else [])


def env_hash(facts: dict, with_shaper: bool = False) -> str:
    """Names the remote venv: nodes/ (and testbed/ for a remote shaper), the
    requirements, the remote's Python and machine."""
    h = hashlib.sha256(f"{facts['python']} {facts['machine']}\n".encode())
    for rel, p in _source_files(with_shaper):
        data = p.read_bytes()
        h.update(f"{rel} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _sftp_put_tree(conn: Connection, files: list[tuple[str, Path]], dest: str) -> None:
    with conn.sftp() as sftp:
        made: set[str] = set()
        for rel, path in files:
            parts = Path(rel).parent.parts
            for i in range(len(parts) + 1):
                d = "/".join([dest, *parts[:i]])
                if d not in made:
                    try:
                        sftp.mkdir(d)
                    except OSError:
                        pass  # exists
                    made.add(d)
            try:
                sftp.put(str(path), f"{dest}/{rel}")
            except OSError as e:
                raise NodeError(f"{conn.spec.name}: copying {rel} failed ({e}); is the remote disk full?",
                                node="remote") from e


def _pip_failure(conn: Connection, status: int, text: str, how: str) -> NodeError:
    if "no space left" in text.lower():
        return NodeError(f"{conn.spec.name}: remote disk full while installing the agent's packages",
                         node="remote")
    return NodeError(f"{conn.spec.name}: installing the agent's packages {how} failed", node="remote",
                     exit_status=status, stderr=text)


def _wheels_here(facts: dict, with_shaper: bool = False) -> Path:
    """Download wheels for the remote's Python and machine into a local cache."""
    py = facts["python"].rsplit(".", 1)[0]
    machine = facts["machine"]
    folder = Path(os.path.expanduser("~/.cache/testbed/wheels")) / f"cp{py.replace('.', '')}-{machine}"
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux{t}_{machine}" for t in ("2014", "_2_17", "_2_28", "_2_31")] + [f"linux_{machine}"]
    argv = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(folder),
            "--python-version", py, "--implementation", "cp", "-r", str(requirements_file(with_shaper)), "pip"]
    for plat in platforms:
        argv += ["--platform", plat]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise NodeError("cannot download the agent's wheels here for the remote "
                        f"(python {py}, {machine})", exit_status=r.returncode, stderr=r.stderr)
    return folder


def provision(conn: Connection, facts: dict, wheels: str = "auto", with_shaper: bool = False) -> str:
    """The remote venv with the agent (and the link layer, ``with_shaper``), reused when
    ready; returns its folder."""
    env = f"{facts['dir']}/{env_hash(facts, with_shaper)}"
    q = shlex.quote
    status, _, _ = conn.run(["test", "-f", f"{env}/ready"], check=False)
    if status == 0:
        return env
    _require_space(conn, facts, VENV_BYTES, "the agent's venv")
    log.info("preparing the agent on %s in %s (once per nodes/ version)", conn.spec.name, env)
    conn.run(["mkdir", "-p", f"{env}/src"])
    _sftp_put_tree(conn, _source_files(with_shaper), f"{env}/src")
    status, out, err = conn.run(["python3", "-m", "venv", f"{env}/venv"], check=False, timeout_s=300)
    if status != 0:
        raise NodeError(f"{conn.spec.name}: python3 -m venv failed (install python3-venv on the remote)",
                        node="remote", exit_status=status, stderr=err or out)
    pip = f"{env}/venv/bin/pip"
    req = f"{env}/src/requirements.txt"
    done = False
    if wheels in ("auto", "index"):
        # bounded: an offline host must not spend minutes in pip's retries before the fallback
        status, out, err = conn.run_shell(f"{q(pip)} install -q --disable-pip-version-check --timeout 15 "
                                          f"--retries 1 -r {q(req)}", check=False, timeout_s=1800)
        done = status == 0
        if not done and (wheels == "index" or "no space left" in (out + err).lower()):
            raise _pip_failure(conn, status, err or out, "from the remote's index")
        if not done:
            log.info("%s: no package index answered; pushing wheels from here", conn.spec.name)
    if not done:
        folder = _wheels_here(facts, with_shaper)
        files = [(f"wheels/{p.name}", p) for p in sorted(folder.glob("*.whl"))]
        _sftp_put_tree(conn, files, env)
        status, out, err = conn.run_shell(f"{q(pip)} install -q --disable-pip-version-check --no-index "
                                          f"--find-links {q(env + '/wheels')} -r {q(req)}", check=False,
                                          timeout_s=1800)
        if status != 0:
            raise _pip_failure(conn, status, err or out, "from pushed wheels")
        conn.run(["rm", "-rf", f"{env}/wheels"], check=False)
    conn.run(["touch", f"{env}/ready"])
    return env


def _agent_command(env: str, workdir: str, control: str, data: str, metrics: str, spec: NodeSpec,
                   lease_s: float | None) -> str:
    q = shlex.quote
    args = ["--name", "remote", "--control-listen", control, "--data-listen", data,
            "--metrics-listen", metrics, "--workdir", workdir]
    if lease_s is not None:
        args += ["--lease-s", f"{lease_s:g}"]
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    # sh records its pid (the agent's once it execs), reads the token from stdin so it
    # never shows in a process listing, and execs the agent with its output in the workdir.
    script = ('echo $$ > "$1/agent.pid"; IFS= read -r TESTBED_TOKEN; export TESTBED_TOKEN; '
              'cd "$2/src" || exit 97; shift 2; PYTHONPATH=. PYTHONUNBUFFERED=1 exec "$@" >"$W/agent.log" 2>&1')
    argv = [f"{env}/venv/bin/python", "-m", "nodes.agent", *args]
    return (f"W={q(workdir)} sh -c {q(script)} sh {q(workdir)} {q(env)} "
            + " ".join(q(a) for a in argv))


# --- the node ------------------------------------------------------------------------------

@dataclass
class RemoteNode:
    """What ``start`` made: the Node handle, its liveness check, and the connection."""

    node: Node
    check: Callable[[], tuple[bool, int | None, str]]
    conn: Connection
    facts: dict = field(default_factory=dict)


def _log_tail(conn: Connection, workdir: str, lines: int = 30) -> str:
    try:
        return conn.run(["tail", "-n", str(lines), f"{workdir}/agent.log"], check=False, timeout_s=15)[1]
    except NodeError:
        return ""


def start(run_id: str, spec: NodeSpec, token: str, ssh: SshSpec, *, lease_s: float | None,
          shaping: Any, image: str | None = None) -> RemoteNode:
    """Start the remote node on ``ssh.host``; return its handle. Records everything it
    creates first; cleaning up after a failure is ``remove_run``'s (the caller's)."""
    conn = connect(ssh.host)  # nothing exists on the remote before this succeeds
    state: dict[str, Any] = {"run_id": run_id, "owner": owner.tag(), "host": asdict(ssh.host),
                             "runtime": ssh.runtime, "workdir": None, "pid": None, "container": None}
    try:
        _save(state)
        return _start(conn, state, run_id, spec, token, ssh, lease_s, shaping, image)
    except BaseException:
        conn.close()
        raise


def _start(conn: Connection, state: dict, run_id: str, spec: NodeSpec, token: str, ssh: SshSpec,
           lease_s: float | None, shaping: Any, image: str | None) -> RemoteNode:
    data_addr = ssh.data_address or conn.server_address()
    bind_ctl = "127.0.0.1" if ssh.runtime == "process" else ssh.engine_address
    control = f"{bind_ctl}:{ssh.control_port}"
    metrics = f"{bind_ctl}:{ssh.metrics_port}"
    data = f"{data_addr}:{ssh.data_port}"
    shaper = ssh.shape_at == "remote"
    if ssh.runtime == "process":
        facts = probe(conn, ssh.remote_dir)
        _require_space(conn, facts, RUN_BYTES, "a run")
        busy = busy_ports(conn, [control, data, metrics])
        if busy:
            where, why = busy[0]
            raise NodeError(f"{conn.spec.name}: port {where} is already in use on the remote ({why}); "
                            "choose free ones with control_port / data_port / metrics_port", node="remote")
        env = provision(conn, facts, ssh.wheels, with_shaper=shaper)
        workdir = f"{facts['dir']}/runs/{run_id}"
        state["workdir"] = workdir
        _save(state)
        conn.run(["mkdir", "-p", workdir])
        chan = conn.start(_agent_command(env, workdir, control, data, metrics, spec, lease_s))
        chan.sendall((token + "\n").encode())

        def check() -> tuple[bool, int | None, str]:
            if not chan.exit_status_ready():
                return True, None, ""
            code = chan.recv_exit_status()
            return False, code, _log_tail(conn, workdir)

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, out, _ = conn.run(["cat", f"{workdir}/agent.pid"], check=False)
            if status == 0 and out.strip().isdigit():
                state["pid"] = int(out.strip())
                _save(state)
                break
            if chan.exit_status_ready():
                break
            time.sleep(0.05)
        details = {"host": conn.spec.name, "runtime": "process", "python": facts["python"],
                   "machine": facts["machine"], "kernel": facts["kernel"], "venv": env, "workdir": workdir,
                   "pid": state["pid"], "limits": "none (runtime: process runs unconfined)"}
        cpus = memory = None
    else:
        facts, env = {}, ""
        if shaper:  # the shaper runs from a venv even when the agent runs in a container
            facts = probe(conn, ssh.remote_dir)
            env = provision(conn, facts, ssh.wheels, with_shaper=True)
        rnode = _start_container(conn, state, run_id, spec, token, control, data, metrics, lease_s, image)
        check, details, cpus, memory = rnode
    if shaper:
        shaping = remote_shaping(conn, state, facts, env, ssh.data_port)
    ctl_fwd = conn.forward(control.rsplit(":", 1)[0], ssh.control_port, "control")
    met_fwd = conn.forward(metrics.rsplit(":", 1)[0], ssh.metrics_port, "metrics")
    details.update({"control_via": f"ssh {conn.spec.name} -> {control}", "metrics_via": f"ssh -> {metrics}",
                    "shape_at": ssh.shape_at})
    node = Node(name="remote", backend="ssh", control_host=ctl_fwd.host, control_port=ctl_fwd.port,
                metrics_host=met_fwd.host, metrics_port=met_fwd.port, data_host=data_addr,
                data_port=ssh.data_port, shaping=shaping, cpus=cpus, memory_bytes=memory,
                clock_shared=False, details=details)
    return RemoteNode(node=node, check=check, conn=conn, facts=facts)


def _start_container(conn: Connection, state: dict, run_id: str, spec: NodeSpec, token: str, control: str,
                     data: str, metrics: str, lease_s: float | None, image: str | None):
    from testbed.deploy import docker as dk
    from testbed.deploy.image import ensure_node_image

    remote = dk.client_over_ssh(conn)
    version = dk.engine_version(remote)
    local = dk.connect()
    try:
        image = image or ensure_node_image(local)
        copied = dk.copy_image(local, remote, image)
    finally:
        local.close()
    state["container"] = dk.container_name(run_id, "remote")
    _save(state)
    container = dk.start_remote_agent(remote, run_id, spec, token, image=image, control=control,
                                      data=data, metrics=metrics, lease_s=lease_s)
    check = dk.alive_check(remote, container.name)
    host_cfg = container.attrs["HostConfig"]
    cpus = (host_cfg["CpuQuota"] / host_cfg["CpuPeriod"]) if host_cfg.get("CpuQuota") else None
    details = {"host": conn.spec.name, "runtime": "docker", "engine": version, "image": image,
               "image_copied": copied, "container": container.name, "container_id": container.id,
               "limits": "docker (cgroups) on the remote"}
    return check, details, cpus, host_cfg.get("Memory") or None


# --- shaping on the remote (shape_at: remote) ----------------------------------------------

def _shaper_argv(shaped: dict, args: list[str]) -> list[str]:
    sudo = ["sudo", "-n"] if shaped.get("sudo") else []
    return [*sudo, "env", f"PYTHONPATH={shaped['env']}/src", f"{shaped['env']}/venv/bin/python", "-m",
            "testbed.link.remote", *args]


def net_admin(conn: Connection, facts: dict) -> str | None:
    """How the ssh user may change qdiscs there (what shape_at: remote needs): ``root``,
    ``passwordless sudo``, or None."""
    if facts.get("uid") == 0:
        return "root"
    if conn.run(["sudo", "-n", "true"], check=False, timeout_s=30)[0] == 0:
        return "passwordless sudo"
    return None


def remote_shaping(conn: Connection, state: dict, facts: dict, env: str, sport: int) -> Any:
    """The ``RemoteTarget`` of the downlink: the remote's interface toward this host,
    the agent's data port as the flow. Recorded in the run's state for teardown."""
    from testbed.link.remote import RemoteTarget, parse_answer

    how = net_admin(conn, facts)
    if how is None:
        raise NodeError(f"{conn.spec.name}: shape_at: remote needs root or passwordless sudo on the remote "
                        "(NET_ADMIN to change its qdiscs)", node="remote")
    shaped: dict[str, Any] = {"env": env, "sudo": how != "root", "dev": None}

    def run(args: list[str]) -> str:
        return conn.run(_shaper_argv(shaped, args), timeout_s=60)[1]

    try:
        answer = parse_answer(run(["route-dev", facts["ssh_client"]]), "")
    except ShapingError as e:
        raise NodeError(f"{conn.spec.name}: cannot find the interface toward this host ({e})",
                        node="remote") from None
    if answer.get("shaped"):
        raise NodeError(f"{conn.spec.name}: {answer['dev']} already carries the testbed's qdiscs (7462:): another "
                        "run shapes it, or a killed one left them (testbed cleanup on the machine that "
                        "started it)", node="remote")
    shaped["dev"] = answer["dev"]
    state["shaped"] = shaped
    _save(state)
    return RemoteTarget(dev=answer["dev"], sport=sport, host=conn.spec.name, run=run)


# --- removal -------------------------------------------------------------------------------

_KILL = r"""
w="$1"; p="$2"
if [ -n "$p" ] && [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -qF -- "$w"; then
  kill -TERM "$p" 2>/dev/null
  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30; do
    kill -0 "$p" 2>/dev/null || break; sleep 0.1
  done
  kill -KILL "$p" 2>/dev/null && echo killed || echo stopped
fi
rm -rf -- "$w"
"""


def remove_run(run_id: str, conn: Connection | None = None) -> list[str]:
    """Remove what the run left on its remote host (from the state record): the agent
    process or container and the run's workdir. Reconnects when ``conn`` is None or
    gone. A host that cannot be reached keeps the record, so ``testbed cleanup`` can
    finish later (its agent stops by itself once the lease has lapsed)."""
    state = load_state(run_id)
    if not state:
        return []
    if not any(state.get(k) for k in ("workdir", "container", "shaped")):  # nothing was made there yet
        _state_path(run_id).unlink(missing_ok=True)
        return []
    spec = HostSpec(**state["host"])
    removed: list[str] = []
    own = conn is None or not conn.alive()
    try:
        if own:
            conn = connect(spec)
    except NodeError as e:
        log.warning("cannot reach %s to clean up run %s: %s (run `testbed cleanup --run %s` later)",
                    spec.name, run_id, e, run_id)
        return [f"(not reached: {spec.name})"]
    assert conn is not None
    try:
        shaped = state.get("shaped") or {}
        if shaped.get("dev"):
            from testbed.link.remote import parse_answer

            _, out, _ = conn.run(_shaper_argv(shaped, ["clear", shaped["dev"]]), check=False, timeout_s=60)
            with contextlib.suppress(ShapingError):
                if parse_answer(out, spec.name).get("removed"):
                    removed.append(f"{spec.name}: qdiscs on {shaped['dev']}")
        if state.get("container"):
            from testbed.deploy import docker as dk

            removed += [f"{spec.name}: {x}" for x in dk.remove_run(run_id, client=dk.client_over_ssh(conn))]
        workdir = state.get("workdir")
        if workdir and f"/runs/{run_id}" in workdir:
            _, out, _ = conn.run(["sh", "-c", _KILL, "sh", workdir, str(state.get("pid") or "")],
                                 check=False, timeout_s=30)
            if out.strip():
                removed.append(f"{spec.name}: process {state.get('pid')}")
            removed.append(f"{spec.name}: {workdir}")
    finally:
        if own:
            conn.close()
    _state_path(run_id).unlink(missing_ok=True)
    return removed


