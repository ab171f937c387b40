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
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="frozen"):
        p.name = "y"  # type: ignore[misc]


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(Profile, tmp_path / "nope.yaml")


# --- hostile YAML: every one is one ConfigError, never a traceback, a hang or a GiB ---------------

def _parse_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "y.yaml")
    return info.value


def _laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)
def test_billion_laughs_is_refused_after_a_bounded_number_of_values():
    e = _parse_error(_laughs())           # 10^9 values if expanded; refused at MAX_VALUES
    assert "more than 100000 values" in e.reason and e.file == "y.yaml" and e.line is not None


def test_aliases_that_expand_modestly_still_work():
    located = parse_yaml("base: &b {rate: 1mbit}\nuplink: *b\ndownlink: *b\n", "y.yaml")
    assert located.data["uplink"] == located.data["downlink"] == {"rate": "1mbit"}


@pytest.mark.parametrize("text", ["x: &a [*a]\n", "x: &a {b: *a}\n", "x: &a [1, {c: [*a]}]\n"])
def test_an_alias_inside_itself_is_refused(text):
    e = _parse_error(text)
    assert "recursive" in e.reason and e.line == 1


@pytest.mark.parametrize("text", ["x: " + "[" * 5000 + "]" * 5000 + "\n",
                                  "x: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
                                  "x:\n" + "".join("  " * i + "- \n" for i in range(1, 200))])
def test_deep_nesting_is_refused_before_the_composer_recurses(text):
    assert "nested deeper than 32 levels" in _parse_error(text).reason


def test_nesting_deepened_through_aliases_is_refused():
    text = "a: &a " + "[" * 30 + "]" * 30 + "\nb: &b [[[*a]]]\nc: [[[*b]]]\n"
    assert "nested deeper" in _parse_error(text).reason


@pytest.mark.parametrize("text,words", [
    ("? [a, b]\n: 1\n", "complex"),
    ("? {a: 1}\n: 1\n", "complex"),
    ("base: &b {x: 1}\nother:\n  <<: *b\n", "merge keys"),
    ("x: !!set {a: null}\n", "unsupported YAML tag"),
    ("x: !!omap [a: 1]\n", "unsupported YAML tag"),
    ("x: !!int 0x\n", "cannot read '0x' as int"),
    ("x: 1\n~: 2\n", "key must be text"),
    ("x: {true: 2}\n", "key must be text"),
    ("2020-01-01: x\n", "key must be text"),
    ("x: !!timestamp 2020-13-45\n", "cannot read"),
    ("x: !!binary 'abc'\n", "not valid YAML"),
    ("x: a\x07b\n", "not valid YAML"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
])
def test_unsupported_or_broken_constructs_are_one_error_with_a_line(text, words):
    e = _parse_error(text)
    assert words in e.reason and e.line is not None


def test_files_must_be_regular_bounded_and_utf8(tmp_path):
    import os

    from testbed.config import MAX_YAML_BYTES, load_yaml

    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_YAML_BYTES + 1))
    with pytest.raises(ConfigError, match="at most 1048576 bytes"):
        load_yaml(big)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(bad)
    assert info.value.line == 2 and "not UTF-8" in info.value.reason
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="a FIFO"):     # would block forever in read_text()
        load_yaml(fifo)
    with pytest.raises(ConfigError, match="a character device"):
        load_yaml("/dev/zero")                           # would never end
    with pytest.raises(ConfigError, match="a folder"):
        load_yaml(tmp_path)


def test_read_regular_file_bounds_what_it_reads(tmp_path):
    from testbed.config import read_regular_file

    f = tmp_path / "f"
    f.write_bytes(b"12345")
    assert read_regular_file(f, 5, "a file") == b"12345"
    with pytest.raises(ConfigError, match="at most 4 bytes"):
        read_regular_file(f, 4, "a file")


def test_booleans_are_not_integers_and_floats_are_finite():
    from testbed.config import Int, Number

    class S(Frozen):
        n: Int = 0
        x: Number = 0.0

    e = _error_for(S, "n: true\n")
    assert e.field == "n" and "valid integer" in e.reason
    assert "finite" in _error_for(S, "x: .inf\n").reason
    assert "finite" in _error_for(S, "x: .nan\n").reason
    assert validate(S, parse_yaml("n: 3\nx: 2\n", "s.yaml")).x == 2.0


def _error_for(schema, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(schema, parse_yaml(text, "s.yaml"))
    return info.value
