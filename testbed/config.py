"""YAML loading that remembers lines, and validation errors that name them.

Owns: reading experiment/profile/trace files safely (regular files only, size
bounded, strict UTF-8; ``yaml.SafeLoader`` with nesting depth and alias
expansion bounded), the map from a field path to its line, and turning a
pydantic ``ValidationError`` into one ``ConfigError`` that reads
``file:line: field: what was expected``. Schemas themselves live with what they
configure (``testbed.link.profile`` for link profiles, ``testbed.experiment``
for experiments) and subclass :class:`Frozen` so unknown keys are refused,
objects cannot change, floats are finite and booleans are not numbers.

Limits (each breach is one ``ConfigError``, never a traceback or a hang):
``MAX_YAML_BYTES`` per file, ``MAX_DEPTH`` levels of nesting, ``MAX_VALUES``
values per document after aliases are expanded (a "billion laughs" file
composes in microseconds and would expand to 10^9 values), no alias that
contains itself, no complex (``? [a, b]``) or merge (``<<``) keys, keys are text.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Strict, ValidationError

from testbed.errors import ConfigError

Loc = tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)

MAX_YAML_BYTES = 1 << 20   # 1 MiB: an experiment is ~1 KiB, a profile with 1,000 trace steps ~40 KiB
MAX_DEPTH = 32             # the deepest schema (trace.steps[i].loss.gemodel.p) is 6 levels
MAX_VALUES = 100_000       # values in one document, aliases expanded

# Numbers in schemas. pydantic's lax mode reads YAML ``true`` as 1 (``threads:
# true`` ran one thread) and ``.inf``/``.nan`` as floats; these refuse both.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]   # strict float still takes ints, never booleans


class Frozen(BaseModel):
    """Base of every schema: immutable, unknown keys rejected, floats finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Located:
    """Parsed YAML data plus the line of every mapping key and sequence item."""

    def __init__(self, data: Any, lines: dict[Loc, int], file: str) -> None:
        self.data, self.lines, self.file = data, lines, file

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest known prefix of ``loc`` (1-based)."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return None

    def error(self, message: str, loc: Loc = ()) -> ConfigError:
        """A ConfigError at ``loc`` in this file."""
        return ConfigError(message, file=self.file, line=self.line_of(loc),
                           field=".".join(str(p) for p in loc) or None)


# --- reading files --------------------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | Path, max_bytes: int, what: str) -> int:
    """Size of ``path`` after checking it is a regular file (symlinks followed)
    of at most ``max_bytes``. Touches nothing: ``stat`` only, so a FIFO or a
    device is refused before anything opens it (opening one can block or have
    side effects).

    Raises:
        ConfigError: naming the file and what was expected.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot read {what}: {reason}", file=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} must be a regular file, this is {_kind(st.st_mode)}", file=str(path))
    if st.st_size > max_bytes:
        raise ConfigError(f"{what} is {st.st_size} bytes; at most {max_bytes} bytes are read", file=str(path))
    return st.st_size


def read_regular_file(path: str | Path, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    Trap: ``Path.read_text`` on a FIFO blocks until a writer comes, and on
    ``/dev/zero`` never ends. The file is checked with ``stat`` first, opened
    non-blocking, checked again on the open descriptor (it may have been
    swapped meanwhile) and read to at most ``max_bytes + 1`` (files such as
    ``/proc`` ones report size 0 and still have content).

    Raises:
        ConfigError: missing, not a regular file, or too large.
    """
    check_regular_file(path, max_bytes, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror}", file=str(path)) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{what} must be a regular file, this is {_kind(mode)}", file=str(path))
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise ConfigError(f"cannot read {what}: {e.strerror}", file=str(path)) from None
    if len(data) > max_bytes:
        raise ConfigError(f"{what} is larger than {max_bytes} bytes", file=str(path))
    return data


def decode_utf8(data: bytes, file: str) -> str:
    """Strict UTF-8, or a ConfigError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded",
                          file=file, line=line) from None


# --- parsing ----------------------------------------------------------------------

_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than ``MAX_DEPTH``.

    PyYAML composes recursively (three Python frames per level): 5,000 nested
    ``[`` ended in RecursionError. The parser and scanner are not recursive,
    so counting here, before recursing, is enough."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"nested deeper than {MAX_DEPTH} levels", line=mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _field(loc: Loc) -> str | None:
    return ".".join(str(p) for p in loc) or None


class _Builder:
    """Turns a composed node graph into plain data and the line of every path,
    counting values (aliases expanded) and refusing cycles."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.values = 0
        self._open: set[int] = set()   # ids of collections being built: an alias back to one is a cycle
        self._constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(loc, line)
        self.values += 1
        if self.values > MAX_VALUES:
            raise ConfigError(f"more than {MAX_VALUES} values (aliases expanded); "
                              "is an alias repeated into a bomb?", line=line, field=_field(loc))
        if len(loc) > MAX_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_DEPTH} levels (aliases expanded)",
                              line=line, field=_field(loc))
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, loc)
        if node.tag not in _PLAIN_TAGS:
            # Collections are built here, not by the constructor, so refuse tags
            # explicitly rather than silently ignoring them.
            raise ConfigError(f"unsupported YAML tag {node.tag}", line=line, field=_field(loc))
        if id(node) in self._open:
            raise ConfigError("an alias refers to a collection that contains it (a recursive structure)",
                              line=line, field=_field(loc))
        self._open.add(id(node))
        try:
            return self._mapping(node, loc) if isinstance(node, yaml.MappingNode) else self._sequence(node, loc)
        finally:
            self._open.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"not valid YAML: {problem}", line=node.start_mark.line + 1,
                              field=_field(loc)) from None
        except (ValueError, OverflowError, TypeError) as e:
            # e.g. ``!!int 0x`` or ``!!timestamp 2020-13-45``: the constructor's own parse fails
            raise ConfigError(f"cannot read {node.value!r} as {node.tag.rsplit(':', 1)[-1]}: {e}",
                              line=node.start_mark.line + 1, field=_field(loc)) from None

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                raise ConfigError("merge keys (<<) are not supported; write the fields out",
                                  line=line, field=_field(loc))
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("a mapping key must be a plain value, not a list or mapping "
                                  "(complex '? ' keys are not supported)", line=line, field=_field(loc))
            key = self._scalar(key_node, loc)
            if not isinstance(key, str):
                # every schema is keyed by names; ``~:``, ``true:``, ``.nan:`` or a date as a key is a
                # mistake, and True == 1 would even collide with another key's line
                raise ConfigError(f"a mapping key must be text, got {key!r} (quote it if it is meant as a name)",
                                  line=line, field=_field(loc))
            if key in out:
                raise ConfigError(f"duplicate key {key!r}", line=line, field=_field((*loc, key)))
            self.lines[(*loc, key)] = line
            out[key] = self.build(value_node, (*loc, key))
        return out

    def _sequence(self, node: yaml.SequenceNode, loc: Loc) -> list[Any]:
        items = []
        for i, item in enumerate(node.value):
            self.lines[(*loc, i)] = item.start_mark.line + 1
            items.append(self.build(item, (*loc, i)))
        return items


def _reader_line(e: yaml.YAMLError, text: str) -> int | None:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(e, "position", None)   # ReaderError (a control character) has only this
    return text.count("\n", 0, position) + 1 if isinstance(position, int) else None


def parse_yaml(text: str, file: str = "<string>") -> Located:
    """Parse YAML text safely, keeping lines.

    Raises:
        ConfigError: bad syntax, too large, too deep, too many values, a
            recursive alias, a tag on a collection, a complex or merge key.
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"larger than {MAX_YAML_BYTES} bytes", file=file)
    loader = None
    try:
        loader = _BoundedLoader(text)   # the reader refuses control characters here already
        root = loader.get_single_node()
    except ConfigError as e:
        raise ConfigError(e.reason, file=file, line=e.line, field=e.field) from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}", file=file, line=_reader_line(e, text)) from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        return Located({}, {(): 1}, file)
    builder = _Builder()
    try:
        data = builder.build(root, ())
    except ConfigError as e:
        raise ConfigError(e.reason, file=file, line=e.line, field=e.field) from None
    return Located(data, builder.lines, file)


def load_yaml(path: str | Path) -> Located:
    """Read and parse a YAML file (regular, at most ``MAX_YAML_BYTES``, UTF-8).

    Raises:
        ConfigError: missing, not a regular file, too large, not UTF-8, invalid.
    """
    data = read_regular_file(path, MAX_YAML_BYTES, "a YAML file")
    return parse_yaml(decode_utf8(data, str(path)), str(path))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _message(err: dict[str, Any]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, (dict, list)) and not (kind.endswith("_type") or kind.endswith("_parsing")):
        return msg
    return f"{msg} (got {_short(value)})"


def validate(schema: type[M], located: Located, loc: Loc = (), context: dict[str, Any] | None = None) -> M:
    """Validate ``located.data`` (or the part at ``loc``) against ``schema``.

    Raises:
        ConfigError: naming the file, the line and the field of the first error.
    """
    data = located.data
    for part in loc:
        data = data[part]
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as e:
        first = e.errors()[0]
        field_loc = (*loc, *first["loc"])
        raise located.error(_message(first), field_loc) from None


def load(schema: type[M], path: str | Path, context: dict[str, Any] | None = None) -> M:
    """Load a YAML file and validate it against ``schema`` in one step."""
    return validate(schema, load_yaml(path), context=context)
