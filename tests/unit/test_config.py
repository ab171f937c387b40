"""YAML loading keeps lines so every validation error names file, line and field."""

import pytest

from testbed.config import Frozen, load, parse_yaml, validate
from testbed.errors import ConfigError
from testbed.units import RateBps, Seconds

pytestmark = pytest.mark.unit


class Direction(Frozen):
    rate: RateBps
    delay: Seconds = 0.0


class Profile(Frozen):
    name: str
    uplink: Direction
    hops: list[Direction] = []


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(Profile, parse_yaml(text, "p.yaml"))
    return info.value


def test_valid_document_gives_base_units():
    p = validate(Profile, parse_yaml("name: x\nuplink:\n  rate: 10mbit\n  delay: 5ms\n", "p.yaml"))
    assert p.uplink.rate == 10_000_000 and p.uplink.delay == pytest.approx(0.005)


def test_bad_value_names_file_line_field_and_expectation():
    e = _error("name: x\nuplink:\n  rate: 10mbps\n")
    assert (e.file, e.line, e.field) == ("p.yaml", 3, "uplink.rate")
    assert str(e).startswith("p.yaml:3: uplink.rate: ambiguous rate unit")


def test_unknown_key_is_refused_at_its_line():
    e = _error("name: x\nuplink:\n  rate: 1mbit\n  dleay: 4ms\n")
    assert (e.line, e.field) == (4, "uplink.dleay")
    assert "unknown field" in str(e)


def test_error_inside_a_list_item_points_at_the_item():
    e = _error("name: x\nuplink: {rate: 1mbit}\nhops:\n  - rate: 1mbit\n  - rate: nope\n")
    assert (e.line, e.field) == (5, "hops.1.rate")


def test_missing_field_points_at_parent():
    e = _error("name: x\n")
    assert e.field == "uplink" and "required" in str(e)


def test_duplicate_key_refused():
    e = _error("name: x\nname: y\n")
    assert e.line == 2 and "duplicate" in str(e)


def test_syntax_error_has_line():
    e = _error("name: x\nuplink: [\n")
    assert e.line is not None and "not valid YAML" in str(e)


def test_python_tags_are_not_constructed():
    """safe loading: a YAML python tag is an error, never code."""
    with pytest.raises(ConfigError):
        parse_yaml("name: !!python/object/apply:os.system ['true']\n", "evil.yaml")


def test_frozen_objects_cannot_change():
    p = validate(Profile, parse_yaml("name: x\nuplink: {rate: 1mbit}\n", "p.yaml"))
    with pytest.raises(Exception):
        p.name = "y"  # type: ignore[misc]


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(Profile, tmp_path / "nope.yaml")
