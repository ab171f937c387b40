"""Model specs resolve to verified files; the registry keeps what was added."""

from __future__ import annotations

import hashlib

import pytest

from testbed.errors import ModelError
from testbed.model import zoo

pytestmark = pytest.mark.unit


def test_builtin_is_built_once_and_repaired(tmp_path, posenet_bytes):
    path = zoo.resolve({"builtin": "posenet"}, root=tmp_path)
    assert path.read_bytes() == posenet_bytes
    path.write_bytes(b"damaged")
    assert zoo.resolve({"builtin": "posenet", "seed": 0}, root=tmp_path).read_bytes() == posenet_bytes


def test_path_spec_checks_sha256(dag_path):
    digest = hashlib.sha256(dag_path.read_bytes()).hexdigest()
    assert zoo.resolve({"path": str(dag_path), "sha256": digest}) == dag_path
    with pytest.raises(ModelError, match="sha256"):
        zoo.resolve({"path": str(dag_path), "sha256": "0" * 64})
    with pytest.raises(ModelError, match="no such model file"):
        zoo.resolve({"path": str(dag_path) + ".missing"})


def test_fetch_spec_uses_the_registered_file(tmp_path, dag_path):
    entry = zoo.add("posenet", dag_path, root=tmp_path)
    assert zoo.resolve({"fetch": "posenet"}, root=tmp_path) == tmp_path / "posenet.tflite"
    assert entry["sha256"] == hashlib.sha256(dag_path.read_bytes()).hexdigest()
    (tmp_path / "posenet.tflite").write_bytes(b"changed")
    with pytest.raises(ModelError, match="missing or changed"):
        zoo.resolve({"fetch": "posenet"}, root=tmp_path)


def test_unknown_spec():
    with pytest.raises(ModelError, match="builtin, path, fetch"):
        zoo.resolve({"url": "x"})
