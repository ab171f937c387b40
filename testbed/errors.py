"""Every error the testbed raises on purpose.

The CLI turns a ``TestbedError`` into one red line and exit code 1; anything else
is a bug and shows a traceback. Library exceptions (netlink, Docker, LiteRT, OS)
are wrapped at the boundary with ``raise ... from e`` so callers handle one family.
"""

from __future__ import annotations


class TestbedError(Exception):
    """Base of every error the user should see as one line."""

    __test__ = False  # not a pytest test class, despite the name


class ConfigError(TestbedError):
    """An experiment, profile or trace file is wrong.

    Carries where: ``file``, ``line`` (1-based, or None when unknown) and the
    dotted ``field`` path, so the message reads ``file:line: field: what``.
    """

    def __init__(self, message: str, *, file: str | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        super().__init__(f"{where}{field + ': ' if field else ''}{message}")


class ModelError(TestbedError):
    """A model file is unreadable, unsupported, or a split request is invalid."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class ShapingError(TestbedError):
    """The kernel refused or cannot do what a link profile asks."""

    def __init__(self, message: str, *, interface: str | None = None,
                 errno: int | None = None) -> None:
        self.interface, self.errno = interface, errno
        prefix = f"{interface}: " if interface else ""
        suffix = f" (errno {errno})" if errno is not None else ""
        super().__init__(f"{prefix}{message}{suffix}")


class NodeError(TestbedError):
    """A node could not be deployed, crashed, or answered with an error."""

    def __init__(self, message: str, *, node: str | None = None,
                 exit_status: int | None = None, stderr: str | None = None) -> None:
        self.node, self.exit_status, self.stderr = node, exit_status, stderr
        text = f"node {node}: {message}" if node else message
        if exit_status is not None:
            text += f" (exit {exit_status})"
        if stderr:
            last = stderr.strip().splitlines()[-1:] or [""]
            text += f": {last[0]}"
        super().__init__(text)


class ProtocolError(TestbedError):
    """A control or data frame did not parse, was too large, or lacked the token."""


class Interrupted(TestbedError):
    """A run was stopped by Ctrl-C or SIGTERM after cleaning up (exit 130)."""

    exit_code = 130
