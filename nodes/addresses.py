"""``HOST:PORT``, parsed the same way by the agent and the orchestrator.

One parser for every listen and connect address of the testbed (the agent's
``--*-listen``, the experiment's ``metrics.listen``, ``--metrics-listen``,
the monitor's ``--listen``): IPv6 in brackets (``[::1]:9400``), an empty host
meaning loopback, port 0 meaning "any free port". Standard library only: the
agent imports nothing from ``testbed``.
"""

from __future__ import annotations

import re

_HOST_PORT = re.compile(r"\[?([^\[\]\s\x00]{0,253}?)\]?:([0-9]{1,5})")


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def parse_host_port(text: str, *, default_host: str = "127.0.0.1",
                    default_port: int | None = None) -> tuple[str, int]:
    """``'127.0.0.1:9400'`` → ('127.0.0.1', 9400); ``'[::1]:0'`` → ('::1', 0).

    Args:
        default_host: the host when the text gives none (``':9400'``).
        default_port: the port when the text has no ``:PORT`` at all (else one is required).

    Raises:
        ValueError: not HOST:PORT with a port in 0..65535 (the message shows what was given).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:9400', got {text!r}")
    stripped = text.strip()
    if default_port is not None and ":" not in stripped and "\x00" not in stripped:
        return stripped or default_host, default_port
    m = _HOST_PORT.fullmatch(stripped)
    if not m or int(m.group(2)) > 65535:
        raise ValueError(f"expected HOST:PORT such as '127.0.0.1:9400', got {_shown(text)}")
    return m.group(1) or default_host, int(m.group(2))
