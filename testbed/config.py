"""YAML loading that remembers lines, and validation errors that name them.

Owns: reading experiment/profile/trace YAML safely (``yaml.SafeLoader`` only),
the map from a field path to its line, and turning a pydantic ``ValidationError``
into one ``ConfigError`` that reads ``file:line: field: what was expected``.
Schemas themselves live with what they configure (``testbed.link.profile`` for
link profiles, ``testbed.experiment`` for experiments) and subclass
:class:`Frozen` so unknown keys are refused and objects cannot change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from testbed.errors import ConfigError

Loc = tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)


class Frozen(BaseModel):
    """Base of every schema: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


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


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _construct(node: yaml.Node, loc: Loc, lines: dict[Loc, int], constructor: yaml.SafeConstructor) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
        # Collections are built here, not by the constructor, so refuse tags
        # explicitly rather than silently ignoring them.
        raise ConfigError(f"unsupported YAML tag {node.tag}", line=node.start_mark.line + 1,
                          field=".".join(str(p) for p in loc) or None)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            if key in out:
                raise ConfigError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1,
                                  field=".".join(str(p) for p in (*loc, key)))
            lines[(*loc, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*loc, key), lines, constructor)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            lines[(*loc, i)] = item.start_mark.line + 1
            items.append(_construct(item, (*loc, i), lines, constructor))
        return items
    return constructor.construct_object(node, deep=True)


def parse_yaml(text: str, file: str = "<string>") -> Located:
    """Parse YAML text safely, keeping lines. Raises ConfigError on bad syntax."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"not valid YAML: {problem}", file=file,
                          line=mark.line + 1 if mark else None) from e
    if root is None:
        return Located({}, {(): 1}, file)
    lines: dict[Loc, int] = {}
    try:
        data = _construct(root, (), lines, yaml.SafeLoader(""))
    except ConfigError as e:
        raise ConfigError(e.reason, file=file, line=e.line, field=e.field) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", file=file) from e
    return Located(data, lines, file)


def load_yaml(path: str | Path) -> Located:
    """Read and parse a YAML file. Raises ConfigError when missing or invalid."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=str(path)) from e
    return parse_yaml(text, str(path))


def _message(err: dict[str, Any]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{msg} (got {err.get('input')!r})"
    return msg


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
