"""Pruning old node images against the real Docker daemon.

The images here are empty (``FROM scratch`` plus labels) in a repository and
under a label key of this test's own, so the real ``splitbed-node`` images — and
other people's — are never candidates; every image and container the test makes
is removed at teardown, tolerating "already gone". What is left is read with the
docker CLI, not with the code under test.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest

pytestmark = pytest.mark.integration


def _docker_ok() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _tags(repository: str) -> set[str]:
    out = subprocess.run(["docker", "images", repository, "--format", "{{.Repository}}:{{.Tag}}"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _ids_with_label(label: str) -> set[str]:
    out = subprocess.run(["docker", "images", "-q", "--no-trunc", "--filter", f"label={label}"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.fixture
def fake_images(tmp_path):
    """Build empty images on demand; remove them all (and their containers) at the end."""
    from testbed.deploy import docker as dk

    assert _docker_ok(), "no Docker daemon (setup.sh starts one)"
    client = dk.connect()
    suffix = secrets.token_hex(4)
    repository, label = f"splitbed-prunetest-{suffix}", f"testbed.prunetest.{suffix}"
    made: list[str] = []
    containers = []
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")

    def build(tag: str, kind: str = "node", n: int = 0) -> str:
        image_id = dk.build_image(client, str(tmp_path), tag, buildargs={},
                                  labels={label: kind, f"{label}.n": str(n)})
        made.append(image_id)
        return image_id

    def container(ref: str) -> None:
        containers.append(client.containers.create(ref, command=["/nothing"]))

    yield client, repository, label, build, container
    for c in containers:
        c.remove(force=True)
    for image_id in reversed(made):
        dk.remove_image(client, image_id)
    assert not _ids_with_label(label), "the test left images behind"
    client.close()


def test_prune_keeps_current_previous_and_used_images(fake_images):
    from testbed.deploy.image import prune_node_images

    client, repository, label, build, container = fake_images
    tags = [f"{repository}:{n}" for n in ("a", "b", "c", "d", "e")]  # oldest first
    for n, tag in enumerate(tags):
        build(tag, n=n)
    container(tags[0])   # a container uses the oldest: docker must keep it, and so do we
    current = tags[1]    # e.g. the user went back to an older checkout
    removed = prune_node_images(client, current, previous=1, repository=repository, label=label)
    # e is the most recent other image; c and d go, and nothing outside this repository
    assert sorted(removed) == [tags[2], tags[3]]
    assert _tags(repository) == {tags[0], tags[1], tags[4]}
    # nothing more to do the second time
    assert prune_node_images(client, current, previous=1, repository=repository, label=label) == []


def test_prune_keeps_the_newest_dependency_stages(fake_images):
    from testbed.deploy.image import prune_node_images

    client, repository, label, build, _ = fake_images
    stage = f"{repository}-deps:stage"
    # each build takes the tag from the one before, which is left dangling (as the
    # Dockerfile's unnamed first stage is); the tagged last one is no candidate
    deps = [build(stage, kind="node-deps", n=n) for n in range(5)]
    current = f"{repository}:current"
    build(current)
    removed = prune_node_images(client, current, previous=1, repository=repository, label=label)
    assert sorted(removed) == sorted(f"node-deps {d.removeprefix('sha256:')[:12]}" for d in deps[:2])
    assert _ids_with_label(f"{label}=node-deps") == set(deps[2:]), "the two most recent dangling stages stay"
