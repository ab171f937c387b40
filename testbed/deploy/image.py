"""The node image: which base it builds on, its content-hash tag, and building it.

Owns the decision "is the node image up to date?" — the tag is
``splitbed-node:<hash>`` over docker/Dockerfile, docker/requirements.txt, every
file under nodes/ and the base image's id, so a rebuild happens only when one of
those changes. Owns the small build context too (those files plus the host's CA
bundle for pip when ``PIP_CERT`` is set). The Docker calls themselves live in
``testbed.deploy.docker``; the offline base image in docker/build-base-image.sh.

Run ``python -m testbed.deploy.image`` to make sure both images exist (that is
what scripts/setup.sh does); it prints the node image tag.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed.errors import NodeError

log = logging.getLogger("testbed.deploy")

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
NODES_DIR = REPO / "nodes"
REGISTRY_BASE = "python:3.11-slim"
OFFLINE_BASE = "splitbed-base:bookworm"
NODE_REPO = "splitbed-node"
# Label on the node image and its dependency stage, so images can be told apart
# from everyone else's; nothing here ever removes images.
IMAGE_LABEL = "testbed.image"


def _context_files() -> list[tuple[str, Path]]:
    """(path in build context, file on disk), in a stable order."""
    files = [("Dockerfile", DOCKER_DIR / "Dockerfile"),
             ("requirements.txt", DOCKER_DIR / "requirements.txt")]
    for p in sorted(NODES_DIR.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"):
            files.append((str(Path("nodes") / p.relative_to(NODES_DIR)), p))
    for _, p in files[:2]:
        if not p.is_file():
            raise NodeError(f"{p} is missing; the node image cannot be built")
    return files


def content_hash(base_image_id: str) -> str:
    """Hash of everything that goes into the node image (16 hex digits)."""
    h = hashlib.sha256(f"base {base_image_id}\n".encode())
    for rel, p in _context_files():
        data = p.read_bytes()
        h.update(f"{rel} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


def make_context(dest: Path) -> None:
    """Write the build context into ``dest`` (an empty directory)."""
    for rel, p in _context_files():
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, out)
    # The Dockerfile always COPYs pip-ca.crt; empty means "pip's own CA store".
    cert = os.environ.get("PIP_CERT")
    ca = dest / "pip-ca.crt"
    if cert and Path(cert).is_file():
        shutil.copyfile(cert, ca)
    else:
        ca.write_bytes(b"")


def build_offline_base(tag: str = OFFLINE_BASE) -> None:
    """Run docker/build-base-image.sh (debootstrap + docker import)."""
    script = DOCKER_DIR / "build-base-image.sh"
    log.info("building base image %s offline with debootstrap (a few minutes)", tag)
    r = subprocess.run(["bash", str(script), tag], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise NodeError(f"{script.name} failed", exit_status=r.returncode, stderr=r.stdout)


def resolve_base(client, base_image: str | None = None, *, allow_offline_build: bool = True) -> str:
    """Pick the base image: explicit > TESTBED_BASE_IMAGE > python:3.11-slim if
    local > the offline image if local > python:3.11-slim pulled > the offline
    debootstrap image, built now."""
    from testbed.deploy import docker as dk

    wanted = base_image or os.environ.get("TESTBED_BASE_IMAGE")
    if wanted:
        if not dk.image_id(client, wanted) and not dk.pull(client, wanted):
            raise NodeError(f"base image {wanted} is neither local nor pullable")
        return wanted
    # Local images first: no registry round trip (or failing pull) per deploy.
    for ref in (REGISTRY_BASE, OFFLINE_BASE):
        if dk.image_id(client, ref):
            return ref
    if dk.pull(client, REGISTRY_BASE):
        return REGISTRY_BASE
    if not allow_offline_build:
        raise NodeError(f"no base image: {REGISTRY_BASE} cannot be pulled and {OFFLINE_BASE} "
                        "is missing; run: bash docker/build-base-image.sh")
    log.info("%s cannot be pulled (no registry?); falling back to an offline base", REGISTRY_BASE)
    build_offline_base(OFFLINE_BASE)
    return OFFLINE_BASE


def ensure_node_image(client=None, base_image: str | None = None) -> str:
    """Return the node image tag, building it first when its content changed."""
    from testbed.deploy import docker as dk

    client = client or dk.connect()
    base = resolve_base(client, base_image)
    base_id = dk.image_id(client, base) or base
    tag = f"{NODE_REPO}:{content_hash(base_id)}"
    if dk.image_id(client, tag):
        return tag
    log.info("building node image %s on %s", tag, base)
    with tempfile.TemporaryDirectory(prefix="splitbed-ctx-") as ctx:
        make_context(Path(ctx))
        dk.build_image(client, ctx, tag, buildargs={"BASE_IMAGE": base},
                       labels={IMAGE_LABEL: "node", "testbed.base": base})
    return tag


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[image] %(message)s")
    try:
        print(ensure_node_image())
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
