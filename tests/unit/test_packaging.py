"""What the wheel ships and where the code looks for it, checked without building anything.

The data folders are found through ``testbed.resources`` (symlinks in a checkout,
package data in a wheel); pyproject's package-data globs must cover every file
those folders hold, or an install would silently miss it. The node image's
requirements come from the installed metadata, so they must equal pyproject's
ranges and cover every third-party module the agent imports. Building and
installing a real wheel is tests/integration/test_install.py.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import sys
from pathlib import Path

import pytest

from testbed import resources
from testbed.deploy import image, netns

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Files in the shipped folders that an install does not need (development tools).
NOT_SHIPPED = {"grafana/generate_dashboards.py"}

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the checks are the same on 3.10


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_resource_folders_are_the_repository_folders_in_a_checkout():
    for name in resources.FOLDERS:
        link = ROOT / "testbed" / "resources" / name
        assert link.is_symlink(), f"{link} must be a symlink to ../../{name}"
        assert resources.folder(name) == (ROOT / name).resolve()
    assert resources.package_path("nodes") == (ROOT / "nodes").resolve()
    with pytest.raises(ValueError):
        resources.folder("experiments")


def test_package_data_covers_every_file_of_the_shipped_folders():
    globs = _pyproject()["tool"]["setuptools"]["package-data"]["testbed.resources"]
    for name in resources.FOLDERS:
        for path in sorted((ROOT / name).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if not path.is_file() or "__pycache__" in rel or rel in NOT_SHIPPED:
                continue
            assert any(fnmatch.fnmatchcase(rel, g) for g in globs), \
                f"{rel} would not be in the wheel: add it to [tool.setuptools.package-data] or NOT_SHIPPED"


def test_node_requirements_are_pyprojects_ranges():
    Requirement = pytest.importorskip("packaging.requirements").Requirement  # comes with matplotlib
    declared = {image._canonical(r.name): r for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    generated = [Requirement(line) for line in image.node_requirements().splitlines() if not line.startswith("#")]
    assert sorted(image._canonical(r.name) for r in generated) == sorted(map(image._canonical, image.NODE_DISTRIBUTIONS))
    for r in generated:
        want = declared[image._canonical(r.name)]
        assert (r.specifier, str(r.marker)) == (want.specifier, str(want.marker)), \
            f"{r}: the installed metadata is stale; run pip install -e ."


def test_node_requirements_refuse_a_missing_distribution():
    from testbed.errors import NodeError

    with pytest.raises(NodeError, match="not installed"):
        image.node_requirements("splitbed-no-such-distribution")


def test_node_image_carries_every_third_party_module_the_agent_imports():
    modules: set[str] = set()
    for path in (ROOT / "nodes").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    # tflite_runtime is the documented fallback where LiteRT has no wheel (nodes/runtime.py).
    third_party = modules - set(sys.stdlib_module_names) - {"nodes", "__future__", "tflite_runtime"}
    owners = importlib.metadata.packages_distributions()
    wanted = {image._canonical(d) for d in image.NODE_DISTRIBUTIONS}
    for module in sorted(third_party):
        dists = {image._canonical(d) for d in owners.get(module, [])}
        assert dists & wanted, f"nodes/ imports {module} ({dists or 'not installed'}), missing from NODE_DISTRIBUTIONS"


def test_netns_agents_get_a_pythonpath_only_outside_site_packages(monkeypatch):
    assert netns._nodes_pythonpath() == {"PYTHONPATH": str(ROOT.resolve())}
    monkeypatch.setattr(netns.site, "getsitepackages", lambda: [str(ROOT)])
    assert netns._nodes_pythonpath() == {}
