"""The docker backend, and every Docker SDK call the testbed makes.

Two containers (``local``, ``remote``) from the node image, each with a CPU quota
(``--cpus``), a hard memory limit (``--memory``, no extra swap) when asked, attached
to two bridge networks of the run:

- CONTROL (``testbed-<run>-ctl``): orchestrator <-> agents, never shaped. The host
  reaches each container at its address on this bridge, so no ports are published.
- DATA (``testbed-<run>-data``): local <-> remote only. The link shaper acts on
  each container's interface on this network, from the host, through the
  container's network namespace (``/proc/<pid>/ns/net``): ``Node.shaping`` is
  ``Target(dev=<ifname inside>, pid=<container pid>)``.

Both networks are ``internal`` (no route out of the host). Every container and
network carries the label ``testbed.run=<run id>``; teardown and ``cleanup``
remove by label, so they also catch what a half-finished deploy created.
Building the image is ``testbed.deploy.image``'s decision; it calls in here.

Containers are locked down (``_hardening``): the agent runs as an unprivileged user
with every capability dropped and no-new-privileges — in particular without
NET_ADMIN, so an agent cannot reshape its own link (the shaper needs none of it
inside: it acts from the host) — with a pids limit and a bounded log. With
``lease_s`` the agent exits once the orchestrator's lease connection is gone
(``nodes.lease``); its container then stops and stays, exited, until teardown or
``cleanup`` removes it with the networks (no auto-remove: a container that failed
to start must keep its exit status and log for the error message).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from docker.errors import APIError, BuildError, DockerException, ImageNotFound, NotFound

import docker
from testbed.deploy import kernel, owner
from testbed.deploy.cgroups import quota_us
from testbed.deploy.cpus import format_cpuset
from testbed.deploy.node import CONTROL_PORT, DATA_PORT, METRICS_PORT, ROLES, Node, NodeSpec, make_target
from testbed.errors import NodeError

log = logging.getLogger("testbed.deploy")

LABEL_RUN = "testbed.run"
LABEL_NODE = "testbed.node"
WORKDIR = "/tmp/testbed"


def net_name(run_id: str, plane: str) -> str:
    return f"testbed-{run_id}-{plane}"


def container_name(run_id: str, role: str) -> str:
    return f"testbed-{run_id}-{role}"


# --- daemon and images -------------------------------------------------------

def connect(timeout: float = 120) -> docker.DockerClient:
    """A client on the local daemon (DOCKER_HOST etc. honoured)."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except DockerException as e:
        raise NodeError(f"Docker daemon not reachable: {e}") from e


def daemon_available(timeout: float = 3.0) -> tuple[bool, str]:
    """(answers?, why) — used by ``backend: auto``."""
    try:
        client = docker.from_env(timeout=timeout)
        try:
            version = client.version().get("Version", "?")
        finally:
            client.close()
        return True, f"Docker daemon {version} answers"
    except DockerException as e:
        return False, f"no Docker daemon ({str(e).splitlines()[0][:120]})"


def image_id(client: docker.DockerClient, ref: str) -> str | None:
    try:
        return client.images.get(ref).id
    except ImageNotFound:
        return None
    except APIError as e:
        raise NodeError(f"cannot inspect image {ref}: {e.explanation}") from e


def pull(client: docker.DockerClient, ref: str) -> bool:
    """Pull ``ref``; False (not an error) when no registry answers."""
    repo, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
    try:
        client.images.pull(repo, tag=tag)
        return True
    except (APIError, DockerException) as e:
        log.info("cannot pull %s: %s", ref, str(e).splitlines()[0][:160])
        return False


def build_image(client: docker.DockerClient, context_dir: str, tag: str, *,
                buildargs: dict[str, str], labels: dict[str, str]) -> str:
    """Build ``context_dir``'s Dockerfile as ``tag``; return the image id."""
    try:
        image, _ = client.images.build(path=context_dir, tag=tag, buildargs=buildargs,
                                       labels=labels, rm=True, forcerm=True, pull=False)
        return image.id
    except BuildError as e:
        lines = [c.get("stream") or c.get("error") or "" for c in e.build_log]
        tail = "".join(lines).strip()
        raise NodeError(f"building {tag} failed: {e.msg}", stderr=tail) from e
    except (APIError, DockerException) as e:
        raise NodeError(f"building {tag} failed: {e}") from e


def labelled_images(client: docker.DockerClient, label: str, value: str) -> list[tuple[str | None, str]]:
    """(tag or None when dangling, image id) of every image labelled ``label=value``, newest first.

    An image with several tags appears once per tag.
    """
    try:
        images = client.images.list(filters={"label": f"{label}={value}"})  # dangling top-level ones too
    except (APIError, DockerException) as e:
        raise NodeError(f"cannot list images: {e}") from e
    out: list[tuple[str | None, str]] = []
    for image in sorted(images, key=_created, reverse=True):
        out += [(tag, image.id) for tag in image.tags] or [(None, image.id)]
    return out


def _created(image) -> tuple[str, float]:
    # "2026-12-01T09:11:11.7562746Z": fractions have varying lengths, so they do not sort as text.
    stamp = str(image.attrs.get("Created", "")).rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    return whole, float(f"0.{fraction}") if fraction.isdigit() else 0.0


def images_in_use(client: docker.DockerClient) -> set[str]:
    """Image ids of every container, running or stopped (docker would refuse to remove them)."""
    try:
        # sparse: no inspect per container, which would fail on one removed meanwhile
        return {c.attrs.get("ImageID", "") for c in client.containers.list(all=True, sparse=True)} - {""}
    except (APIError, DockerException) as e:
        raise NodeError(f"cannot list containers: {e}") from e


def remove_image(client: docker.DockerClient, ref: str) -> bool:
    """Untag/remove ``ref`` (a tag or an id) without force; False when docker refuses
    (a container uses it, or it is gone already)."""
    try:
        client.images.remove(ref, noprune=False)
        return True
    except NotFound:
        return False
    except APIError as e:
        log.info("keeping image %s: %s", ref, e.explanation)
        return False


# --- one run's networks and containers ---------------------------------------

def _labels(run_id: str, **extra: str) -> dict[str, str]:
    return {LABEL_RUN: run_id, owner.LABEL: owner.tag(), **extra}


def _create_network(client: docker.DockerClient, run_id: str, plane: str, internal: bool = True):
    try:
        return client.networks.create(net_name(run_id, plane), driver="bridge", internal=internal,
                                      check_duplicate=True,
                                      labels=_labels(run_id, **{"testbed.plane": plane}))
    except APIError as e:
        raise NodeError(f"cannot create Docker network {net_name(run_id, plane)}: "
                        f"{e.explanation}") from e


def agent_args(role: str, spec: NodeSpec, host: str = "0.0.0.0",
               lease_s: float | None = None) -> list[str]:
    """Arguments of ``python -m nodes.agent`` for a node listening on ``host``."""
    args = ["--name", role,
            "--control-listen", f"{host}:{CONTROL_PORT}",
            "--data-listen", f"{host}:{DATA_PORT}",
            "--metrics-listen", f"{host}:{METRICS_PORT}",
            "--workdir", WORKDIR]
    if lease_s is not None:
        args += ["--lease-s", f"{lease_s:g}"]
    return args + (["--threads", str(spec.threads)] if spec.threads else [])


#: uid:gid of the agent in the container (the image's USER too): not root.
AGENT_USER = "10001:10001"
#: Tasks (processes + threads) per node: the agent's connection threads are bounded by
#: its caps (~60), LiteRT adds its interpreter threads, KPIs a fresh Python process.
PIDS_LIMIT = 512


def _hardening() -> dict:
    """Container options that take privileges away (see the module docstring)."""
    return {
        "user": AGENT_USER,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": PIDS_LIMIT,
        # json-file is Docker's default driver, unbounded by default: a node that
        # logs without end must not fill the host's disk.
        "log_config": {"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}},
    }


def _create_container(client, run_id: str, role: str, spec: NodeSpec, image: str, token: str,
                      ctl_net, data_net, entrypoint: Sequence[str] | None,
                      lease_s: float | None = None):
    kwargs = dict(
        image=image, name=container_name(run_id, role), hostname=role, detach=True,
        # The agent binds all of the container's interfaces: which plane a
        # request uses is decided by the address the client dials (control IP
        # from the host, data IP from the peer), and the data network only
        # joins the two nodes of this run.
        command=agent_args(role, spec, lease_s=lease_s),
        environment={"TESTBED_TOKEN": token},
        labels=_labels(run_id, **{LABEL_NODE: role}),
        network=ctl_net.name,
        **_hardening(),
    )
    if entrypoint:
        kwargs["entrypoint"] = list(entrypoint)
    if spec.cpus is not None:
        # The same CFS quota as --cpus, with the period the node asks for.
        kwargs["cpu_period"] = spec.cpu_period_us
        kwargs["cpu_quota"] = quota_us(spec.cpus, spec.cpu_period_us)
    if spec.cpuset:
        kwargs["cpuset_cpus"] = format_cpuset(spec.cpuset)
    if spec.memory_bytes is not None:
        # memswap == memory: no swap on top of the limit, so the node cannot
        # page its way past what the experiment gives it.
        kwargs["mem_limit"] = spec.memory_bytes
        kwargs["memswap_limit"] = spec.memory_bytes
    try:
        container = client.containers.create(**kwargs)
        data_net.connect(container, aliases=[role])
        container.start()
        container.reload()
        return container
    except (APIError, DockerException) as e:
        msg = getattr(e, "explanation", None) or str(e)
        raise NodeError(f"cannot start container: {msg}", node=role) from e


def _node_from(container, run_id: str, role: str, image: str, image_ref: str) -> Node:
    attrs = container.attrs
    nets = attrs["NetworkSettings"]["Networks"]
    ctl = nets[net_name(run_id, "ctl")]
    data = nets[net_name(run_id, "data")]
    pid = int(attrs["State"]["Pid"])
    # The interface name inside depends on the order Docker attached the
    # networks; the MAC address it reports for the data network is certain.
    try:
        if not pid:
            raise FileNotFoundError(pid)
        dev = kernel.ifname_by_mac(f"/proc/{pid}/ns/net", data["MacAddress"])
    except OSError as e:  # the agent exited at once and took its namespace along
        _wait_exited(container)
        state = container.attrs["State"]
        raise NodeError("agent exited while starting", node=role,
                        exit_status=state.get("ExitCode"), stderr=logs(container)) from e
    host_cfg = attrs["HostConfig"]
    nano = host_cfg.get("NanoCpus") or 0
    if not nano and host_cfg.get("CpuQuota") and host_cfg.get("CpuPeriod"):
        nano = host_cfg["CpuQuota"] * 1e9 / host_cfg["CpuPeriod"]
    mem = host_cfg.get("Memory") or 0
    cpuset = host_cfg.get("CpusetCpus") or None
    return Node(
        name=role, backend="docker",
        control_host=ctl["IPAddress"], control_port=CONTROL_PORT,
        metrics_host=ctl["IPAddress"], metrics_port=METRICS_PORT,
        data_host=data["IPAddress"], data_port=DATA_PORT,
        shaping=make_target(dev, pid=pid),
        cpus=nano / 1e9 if nano else None, memory_bytes=mem or None, clock_shared=True,
        details={"container": container.name, "container_id": container.id, "pid": pid,
                 "image": image_ref, "image_id": image, "limits": "docker (cgroups)",
                 "cpuset": cpuset, "cpu_period_us": host_cfg.get("CpuPeriod") or None},
    )


def _wait_exited(container, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            container.reload()
        except (APIError, DockerException):
            return
        if not container.attrs["State"].get("Running"):
            return
        time.sleep(0.1)


def logs(container, lines: int = 30) -> str:
    try:
        return container.logs(tail=lines).decode("utf-8", "replace")
    except (APIError, DockerException):
        return ""


def alive_check(client: docker.DockerClient, name: str) -> Callable[[], tuple[bool, int | None, str]]:
    """A function telling whether a container still runs: (running, exit code, log tail)."""
    def check() -> tuple[bool, int | None, str]:
        try:
            c = client.containers.get(name)
        except NotFound:
            return False, None, "container vanished"
        state = c.attrs["State"]
        if state.get("Running"):
            return True, None, ""
        return False, state.get("ExitCode"), logs(c)
    return check


def death_cause(node: Node, client: docker.DockerClient | None = None) -> str | None:
    """Why a node's container no longer runs (None while it runs)."""
    try:
        c = (client or connect()).containers.get(node.details["container"])
    except NotFound:
        return "its container vanished"
    except (APIError, DockerException) as e:
        return f"its container cannot be inspected ({e})"
    state = c.attrs["State"]
    if state.get("Running") and not state.get("OOMKilled"):
        return None
    return describe_exit(state.get("ExitCode"), oom=bool(state.get("OOMKilled")), memory=node.memory_bytes)


def describe_exit(code: int | None, *, oom: bool, memory: int | None) -> str:
    """"OOM-killed (memory limit 100 MiB)", "killed by signal 9 (SIGKILL)", "exited with status 3"."""
    import signal as _signal

    if oom:
        return "OOM-killed" + (f" (memory limit {memory / 2**20:.0f} MiB)" if memory else "")
    if code is not None and code > 128:  # the shell convention docker reports: 128 + signal
        code = -(code - 128)
    if code is not None and code < 0:
        try:
            name = _signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}" if code is not None else "exited"


def start(run_id: str, specs: dict[str, NodeSpec], token: str, *, image: str,
          entrypoint: Sequence[str] | None = None, lease_s: float | None = None,
          client: docker.DockerClient | None = None) -> tuple[dict[str, Node], dict[str, Callable]]:
    """Create the run's networks and both containers; return Nodes and liveness checks.

    ``lease_s``: the agents exit when nobody has held their lease that long.
    Does not clean up on failure: the caller tears down by label (what exists
    of it), which is what also happens after an interrupt.
    """
    client = client or connect()
    image_ref = image
    img = image_id(client, image)
    if img is None:
        raise NodeError(f"node image {image} is not in the local store")
    ctl_net = _create_network(client, run_id, "ctl")
    data_net = _create_network(client, run_id, "data")
    nodes, checks = {}, {}
    for role in ROLES:
        c = _create_container(client, run_id, role, specs[role], img, token, ctl_net, data_net,
                              entrypoint, lease_s)
        nodes[role] = _node_from(c, run_id, role, img, image_ref)
        checks[role] = alive_check(client, c.name)
    return nodes, checks


def start_local(run_id: str, spec: NodeSpec, token: str, *, image: str,
                entrypoint: Sequence[str] | None = None, lease_s: float | None = None,
                client: docker.DockerClient | None = None) -> tuple[Node, Callable]:
    """The local node alone, for a remote on another machine: the control network is
    internal as usual, the data network is not, so Docker routes and masquerades the
    node's data traffic out of this host toward the remote (its own forwarding rules).
    Returns the Node and its liveness check; cleaning up is ``remove_run``'s."""
    client = client or connect()
    img = image_id(client, image)
    if img is None:
        raise NodeError(f"node image {image} is not in the local store")
    ctl_net = _create_network(client, run_id, "ctl")
    data_net = _create_network(client, run_id, "data", internal=False)
    c = _create_container(client, run_id, "local", spec, img, token, ctl_net, data_net, entrypoint, lease_s)
    node = _node_from(c, run_id, "local", img, image)
    node.details["routed_via"] = f"docker network {data_net.name} (not internal: NAT to the remote)"
    return node, alive_check(client, c.name)


# --- removal -------------------------------------------------------------------

def _label_filter(run_id: str | None) -> dict:
    return {"label": f"{LABEL_RUN}={run_id}" if run_id else LABEL_RUN}


def run_owners(client: docker.DockerClient | None = None) -> dict[str, set[str]]:
    """{run id: owner tags} of every run that still has containers or networks."""
    client = client or connect()
    labels = [c.labels for c in client.containers.list(all=True, filters=_label_filter(None))]
    labels += [n.attrs.get("Labels") or {} for n in client.networks.list(filters=_label_filter(None))]
    out: dict[str, set[str]] = {}
    for lab in labels:
        if lab.get(LABEL_RUN):
            out.setdefault(lab[LABEL_RUN], set()).add(lab.get(owner.LABEL, ""))
    return out


def container_pids(run_id: str | None, client: docker.DockerClient | None = None) -> set[int]:
    """Init pids of the run's running containers (shaping targets use them)."""
    client = client or connect()
    pids = set()
    for c in client.containers.list(filters=_label_filter(run_id)):
        pid = c.attrs.get("State", {}).get("Pid")
        if pid:
            pids.add(int(pid))
    return pids


def remove_run(run_id: str | None, client: docker.DockerClient | None = None) -> list[str]:
    """Remove the containers, then the networks labelled ``testbed.run=<run_id>``
    (any run id when None). Tolerates objects vanishing meanwhile."""
    client = client or connect()
    removed: list[str] = []
    flt = _label_filter(run_id)
    for c in client.containers.list(all=True, filters=flt):
        try:
            c.remove(force=True, v=True)
            removed.append(f"container {c.name}")
        except NotFound:
            pass
        except APIError as e:
            # 409 "removal already in progress": someone else is on it; wait below.
            if e.status_code != 409:
                raise NodeError(f"cannot remove container {c.name}: {e.explanation}") from e
    deadline = time.monotonic() + 30
    while client.containers.list(all=True, filters=flt) and time.monotonic() < deadline:
        time.sleep(0.2)
    for n in client.networks.list(filters=flt):
        for attempt in range(50):
            try:
                n.remove()
                removed.append(f"network {n.name}")
                break
            except NotFound:
                break
            except APIError as e:
                # A just-removed container may still hold an endpoint for a moment.
                if attempt == 49:
                    raise NodeError(f"cannot remove network {n.name}: {e.explanation}") from e
                time.sleep(0.2)
    return removed


# --- a remote engine over SSH (the ssh backend's runtime: docker) ---------------------

def client_over_ssh(conn, timeout: float = 120) -> docker.DockerClient:
    """A client on the Docker engine of ``conn``'s host, through ``conn`` itself.

    docker-py's ``ssh://user@host:port`` transport would open its own paramiko
    connection, reading only ``~/.ssh/known_hosts`` and a few ``~/.ssh/config`` keys
    and offering agent and default keys: none of the experiment's strict settings.
    So the client is built in shell-out mode (which connects to nothing at
    construction) with an explicit API version, and its adapter then gets the
    already authenticated, strictly checked ``paramiko.SSHClient`` of ``conn``; every
    request is a ``docker system dial-stdio`` exec channel on that connection. The
    real API version is read afterwards.
    """
    from testbed.deploy.sshconn import Connection

    assert isinstance(conn, Connection)
    spec = conn.spec
    try:
        api = docker.APIClient(base_url=f"ssh://{spec.user}@{spec.host}:{spec.port}", version="1.41",
                               timeout=timeout, use_ssh_client=True)
        adapter = api._custom_adapter
        adapter.ssh_client = conn.client  # our strict connection, not the shell-out

        def no_reconnect() -> None:
            raise NodeError(f"ssh connection to {spec.name} is gone", node="remote")

        adapter._connect = no_reconnect
        api._version = api._retrieve_server_version()
        client = docker.DockerClient.__new__(docker.DockerClient)
        client.api = api
        return client
    except DockerException as e:
        text = str(e)
        if "127" in text or "not found" in text:
            raise NodeError(f"{spec.name}: no docker CLI on the remote (runtime: docker needs it "
                            "for `docker system dial-stdio`)", node="remote") from e
        raise NodeError(f"{spec.name}: the remote Docker engine does not answer: "
                        f"{text.splitlines()[0][:160]}", node="remote") from e


def engine_version(client: docker.DockerClient) -> str:
    try:
        return client.version().get("Version", "?")
    except (APIError, DockerException) as e:
        raise NodeError(f"remote Docker engine: {e}", node="remote") from e


def copy_image(src: docker.DockerClient, dst: docker.DockerClient, ref: str) -> bool:
    """Make ``ref`` exist on ``dst``: ``docker save`` on ``src`` streamed into
    ``docker load`` on ``dst`` when ``dst`` lacks that image id. True when copied."""
    want = image_id(src, ref)
    if want is None:
        raise NodeError(f"image {ref} is not in the local store")
    if image_id(dst, ref) == want:
        return False
    log.info("copying image %s to the remote engine (docker save | docker load)", ref)
    try:
        stream = src.api.get_image(ref, chunk_size=1 << 20)
        for _ in dst.api.load_image(stream, quiet=True):
            pass
    except (APIError, DockerException, OSError) as e:
        msg = getattr(e, "explanation", None) or str(e)
        if "no space left" in msg.lower():
            raise NodeError("remote disk full while loading the node image", node="remote") from e
        raise NodeError(f"cannot copy the node image to the remote engine: {msg}", node="remote") from e
    if image_id(dst, ref) is None:
        raise NodeError(f"the remote engine did not keep image {ref} after docker load", node="remote")
    return True


def start_remote_agent(client: docker.DockerClient, run_id: str, spec: NodeSpec, token: str, *, image: str,
                       control: str, data: str, metrics: str, lease_s: float | None):
    """The remote node's container on a remote engine, on the engine host's network
    (no Docker NAT in the measured data path): control and metrics listen on the
    addresses only the SSH tunnel reaches, data where the local node dials."""
    args = ["--name", "remote", "--control-listen", control, "--data-listen", data,
            "--metrics-listen", metrics, "--workdir", WORKDIR]
    if lease_s is not None:
        args += ["--lease-s", f"{lease_s:g}"]
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    kwargs = dict(image=image, name=container_name(run_id, "remote"), detach=True, command=args,
                  environment={"TESTBED_TOKEN": token}, labels=_labels(run_id, **{LABEL_NODE: "remote"}),
                  network_mode="host", **_hardening())
    if spec.cpus is not None:
        kwargs["cpu_period"] = spec.cpu_period_us
        kwargs["cpu_quota"] = quota_us(spec.cpus, spec.cpu_period_us)
    if spec.memory_bytes is not None:
        kwargs["mem_limit"] = spec.memory_bytes
        kwargs["memswap_limit"] = spec.memory_bytes
    try:
        container = client.containers.run(**kwargs)
        container.reload()
        return container
    except (APIError, DockerException) as e:
        msg = getattr(e, "explanation", None) or str(e)
        raise NodeError(f"cannot start container on the remote engine: {msg}", node="remote") from e
