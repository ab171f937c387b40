"""The VM tier's image recipe: mirror discovery and the cache key (no root, no build)."""

import pytest

from tests.vm import image

pytestmark = pytest.mark.unit

DEB822 = """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822_sources():
    assert image.mirror_from_sources([DEB822]) == "http://mirror.example/debian"


def test_mirror_skips_disabled_and_source_stanzas():
    text = ("Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
            "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n" + DEB822)
    assert image.mirror_from_sources([text]) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources():
    text = "# comment\ndeb [arch=amd64] http://one.example/debian bookworm main\n"
    assert image.mirror_from_sources([text]) == "http://one.example/debian"


def test_no_mirror_for_another_suite():
    assert image.mirror_from_sources(["deb http://archive.ubuntu.com/ubuntu jammy main\n"]) is None


def test_python_requirements_follow_pyproject():
    reqs = image.python_requirements()
    assert any(r.startswith("pyroute2>=") and "<" in r for r in reqs)  # the verified range, floor and ceiling
    assert {r.split(">")[0].split("<")[0].split("=")[0].lower() for r in reqs} == set(image.PYTHON_DEPS)


def test_image_key_changes_with_inputs(monkeypatch):
    key = image.image_key()
    assert key == image.image_key() and len(key) == 16
    monkeypatch.setattr(image, "DEBIAN_PACKAGES", image.DEBIAN_PACKAGES + ("strace",))
    assert image.image_key() != key
