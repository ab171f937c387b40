"""Session fixtures shared by unit tests (model layer: built once, reused).

Building PoseNet and splitting it at all 32 points takes a few seconds on two
shared cores, so each is done once per session in a session temp directory.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def posenet_bytes() -> bytes:
    from testbed.model.zoo.posenet import build_posenet
    return build_posenet(0)


@pytest.fixture(scope="session")
def posenet_path(tmp_path_factory, posenet_bytes):
    path = tmp_path_factory.mktemp("posenet") / "posenet.tflite"
    path.write_bytes(posenet_bytes)
    return path


@pytest.fixture(scope="session")
def posenet_split(tmp_path_factory, posenet_path):
    """(out_dir, manifest) for PoseNet split at all 32 points."""
    from testbed.model.splitter import split_model
    out = tmp_path_factory.mktemp("posenet_split") / "parts"
    return out, split_model(posenet_path, range(32), out)


@pytest.fixture(scope="session")
def dag_path(tmp_path_factory):
    from tests.unit.model_samples import dag_model
    path = tmp_path_factory.mktemp("dag") / "dag.tflite"
    path.write_bytes(dag_model())
    return path
