"""The files the testbed ships beside its code, found the same way in a checkout and in an install.

Owns one question: where are the link profiles (``netem_profiles/``), the Grafana
dashboards and provisioning (``grafana/``) and the Docker build files
(``docker/``)? The answer is always ``importlib.resources.files("testbed.resources")``
plus the folder name:

- in a checkout (and an editable install) the three entries of this folder are
  symlinks to the repository's top-level folders, so editing
  ``netem_profiles/lte.yaml`` is seen at once;
- in a wheel they are real folders: setuptools follows the symlinks and copies
  the files listed under ``[tool.setuptools.package-data]`` in pyproject.toml.

The node agent's code is the ``nodes`` package itself (``package_path("nodes")``).
It leaves what the files mean to their readers: ``testbed.link.profile``,
``testbed.metrics.monitor`` / ``dashboards``, ``testbed.deploy.image``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from testbed.errors import TestbedError

FOLDERS = ("netem_profiles", "grafana", "docker")


def _as_dir(where: object, what: str) -> Path:
    # A zip-imported install would hand back a zipfile.Path: Docker, Prometheus
    # and Grafana need real folders, so only a file-system install is supported.
    if not isinstance(where, Path) or not where.is_dir():
        raise TestbedError(f"{what} is not a folder on disk ({where}); install splitbed into a venv "
                           "(pip install .), not as a zip")
    return where.resolve()


def folder(name: str) -> Path:
    """The shipped folder ``name`` (one of ``FOLDERS``), symlinks resolved.

    Raises:
        TestbedError: the folder is missing or not on disk (a broken install).
    """
    if name not in FOLDERS:
        raise ValueError(f"unknown resource folder {name!r} (known: {', '.join(FOLDERS)})")
    return _as_dir(files(__name__) / name, f"testbed.resources/{name}")


def package_path(package: str) -> Path:
    """The folder of an importable package (``nodes``: what the node image and netns agents run)."""
    return _as_dir(files(package), f"package {package}")
