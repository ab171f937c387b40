"""Deploy's pure parts: run ids, node specs, names, image content hash and context."""

from __future__ import annotations

import pytest

from testbed.deploy import NodeSpec, choose_backend, image, netns
from testbed.deploy.docker import agent_args
from testbed.deploy.node import check_run_id
from testbed.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("rid", ["abc", "tb1f2e3d", "run_2026-11-23.1", "a" * 40])
def test_good_run_ids(rid):
    assert check_run_id(rid) == rid


@pytest.mark.parametrize("rid", ["", "-x", "a b", "a/b", "a" * 41, "é", None])
def test_bad_run_ids(rid):
    with pytest.raises(ConfigError, match="run_id"):
        check_run_id(rid)


def test_node_spec_rejects_nonsense():
    with pytest.raises(ConfigError, match="cpus"):
        NodeSpec(cpus=0)
    with pytest.raises(ConfigError, match="memory"):
        NodeSpec(memory_bytes=1024)
    with pytest.raises(ConfigError, match="threads"):
        NodeSpec(threads=0)
    assert NodeSpec(cpus=0.25, memory_bytes=1 << 30, threads=2).cpus == 0.25


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="backend"):
        choose_backend("kubernetes")
    assert choose_backend("netns")[0] == "netns"


def test_netns_names_fit_the_kernel_and_derive_from_the_run_id():
    rid = "a" * 40
    links = netns.host_links(rid)
    assert all(len(n) <= 15 for n in links)
    assert links == netns.host_links(rid) and links != netns.host_links("b" * 40)
    a = netns._addresses(7)
    assert a["local"]["ctl"] == "10.213.7.2" and a["remote"]["data"] == "10.213.7.10"


def test_agent_args_carry_threads_only_when_asked():
    assert "--threads" not in agent_args("local", NodeSpec())
    args = agent_args("remote", NodeSpec(threads=2))
    assert args[args.index("--threads") + 1] == "2"
    assert args[args.index("--name") + 1] == "remote"


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    d, n = tmp_path / "docker", tmp_path / "nodes"
    d.mkdir()
    n.mkdir()
    (d / "Dockerfile").write_text("FROM x\n")
    (n / "__init__.py").write_text("")
    (n / "agent.py").write_text("print(1)\n")
    (n / "__pycache__").mkdir()
    (n / "__pycache__" / "agent.cpython-311.pyc").write_bytes(b"junk")
    monkeypatch.setattr(image, "DOCKER_DIR", d)
    monkeypatch.setattr(image, "NODES_DIR", n)
    return tmp_path


def test_content_hash_follows_content_not_caches(fake_repo):
    h = image.content_hash("sha256:base1")
    assert h == image.content_hash("sha256:base1")
    assert h != image.content_hash("sha256:base2")
    (fake_repo / "nodes" / "__pycache__" / "x.pyc").write_bytes(b"more junk")
    assert h == image.content_hash("sha256:base1")
    (fake_repo / "nodes" / "agent.py").write_text("print(2)\n")
    assert h != image.content_hash("sha256:base1")
    h2 = image.content_hash("sha256:base1")
    (fake_repo / "docker" / "Dockerfile").write_text("FROM y\n")
    assert h2 != image.content_hash("sha256:base1")


def test_build_context_carries_the_ca_bundle_only_when_pip_cert_is_set(fake_repo, tmp_path, monkeypatch):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PIP_CERT", str(ca))
    ctx = tmp_path / "ctx1"
    ctx.mkdir()
    image.make_context(ctx)
    assert (ctx / "pip-ca.crt").read_text() == ca.read_text()
    assert (ctx / "nodes" / "agent.py").is_file() and not (ctx / "nodes" / "__pycache__").exists()
    monkeypatch.delenv("PIP_CERT")
    ctx2 = tmp_path / "ctx2"
    ctx2.mkdir()
    image.make_context(ctx2)
    assert (ctx2 / "pip-ca.crt").read_bytes() == b""


def test_owner_tag_tells_live_from_dead_processes():
    import subprocess
    import sys

    from testbed.deploy import owner

    assert owner.alive(owner.tag())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    t = owner.tag(p.pid)
    p.wait()
    assert not owner.alive(t)
    assert not owner.alive("") and not owner.alive("garbage") and not owner.alive("999999999:1")


def test_agent_args_carry_the_lease_only_when_asked():
    assert "--lease-s" not in agent_args("local", NodeSpec())
    args = agent_args("local", NodeSpec(), lease_s=15.0)
    assert args[args.index("--lease-s") + 1] == "15"


def test_containers_are_locked_down():
    from testbed.deploy import docker as dk
    opts = dk._hardening()
    assert "cap_add" not in opts and opts["cap_drop"] == ["ALL"]
    assert opts["user"] == dk.AGENT_USER and not opts["user"].startswith("0")
    assert opts["pids_limit"] == dk.PIDS_LIMIT > 0
    assert any("no-new-privileges" in o for o in opts["security_opt"])
    assert opts["log_config"]["config"]["max-size"]


def test_dockerfile_runs_the_agent_unprivileged():
    text = (image.DOCKER_DIR / "Dockerfile").read_text()
    from testbed.deploy import docker as dk
    assert f"USER {dk.AGENT_USER}" in text


def test_netns_agents_start_without_capabilities(monkeypatch):
    monkeypatch.setattr(netns.shutil, "which", lambda name: "/usr/bin/setpriv")
    prefix = netns._drop_privileges()
    assert prefix[0] == "/usr/bin/setpriv" and "--bounding-set=-all" in prefix
    assert "--no-new-privs" in prefix and prefix[-1] == "--"
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    assert netns._drop_privileges() == []  # missing setpriv: logged, not fatal
