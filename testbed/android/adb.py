"""The one module that talks to adb: a private adb server and the adbutils calls through it.

Owns finding the ``adb`` binary (``ADBUTILS_ADB_PATH``, then ``PATH``, then the copy
adbutils ships), the testbed's own adb server on a private port (``TESTBED_ADB_PORT``,
default 5137, so the user's server on 5037 is never started, stopped or reconfigured),
and every adbutils call: device list, shell (v2, with a timeout), sync push/pull,
``adb connect``. adbutils' own habit of running ``adb start-server`` on the default
port when a connection fails is switched off here. adb's errors become
``AndroidError`` lines that name the phone and say what to do. What the phone is
asked (getprop, /sys, benchmark_model) is ``testbed.android.device``'s business.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from testbed.errors import TestbedError

DEFAULT_PORT = 5137
USER_PORT = 5037
_CHUNK = 64 * 1024                # sync DATA packets carry at most 64 KiB


class AndroidError(TestbedError):
    """A phone or adb fault, said in one line naming the phone and what to do."""

    def __init__(self, message: str, *, serial: str | None = None) -> None:
        self.serial = serial
        super().__init__(f"phone {serial}: {message}" if serial else message)


class Disconnected(AndroidError):
    """The phone went away (unplugged, adb transport lost) while the testbed used it."""


@dataclass
class ShellResult:
    stdout: str
    stderr: str
    exit_code: int

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def adb_binary() -> str:
    """Path of the adb binary adbutils would use. Raises AndroidError when there is none."""
    try:
        from adbutils import adb_path
    except ImportError as e:
        raise AndroidError("adbutils is not installed: pip install adbutils (scripts/setup.sh does)") from e
    env = os.environ.get("ADBUTILS_ADB_PATH")
    if env and not (Path(env).is_file() and os.access(env, os.X_OK)):
        raise AndroidError(f"ADBUTILS_ADB_PATH={env} is not an executable adb; unset it or point it at adb")
    try:
        return adb_path()
    except Exception as e:  # adbutils raises AdbError when nothing is found
        raise AndroidError("no adb binary: install Debian's 'adb' package or set ADBUTILS_ADB_PATH") from e


def server_port(port: int | None = None) -> int:
    if port is not None:
        return port
    text = os.environ.get("TESTBED_ADB_PORT")
    if text:
        try:
            value = int(text)
        except ValueError:
            raise AndroidError(f"TESTBED_ADB_PORT={text!r} is not a port number") from None
        if not 1 <= value <= 65535:
            raise AndroidError(f"TESTBED_ADB_PORT={value} is not a port number (1-65535)")
        return value
    return DEFAULT_PORT


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"000chost:version")
            return s.recv(4) == b"OKAY"
    except OSError:
        return False


class Adb:
    """The testbed's adb server (started on first use when nothing answers on its port) and
    the adbutils client on it. ``close()`` stops the server only if this object started it
    and ``keep_server`` is False."""

    def __init__(self, port: int | None = None, *, keep_server: bool = True, timeout_s: float = 600.0,
                 server_env: dict[str, str] | None = None) -> None:
        self.port = server_port(port)
        self.server_env = server_env or {}      # extra environment of a server this object starts
        self.keep_server = keep_server
        self.timeout_s = timeout_s
        self.started = False
        self._client: Any = None
        self._devices: dict[str, Any] = {}

    # ---- server -------------------------------------------------------------
    def ensure_server(self) -> None:
        if _answers(self.port):
            return
        adb = adb_binary()
        env = dict(os.environ, **self.server_env, ANDROID_ADB_SERVER_PORT=str(self.port))
        try:
            proc = subprocess.run([adb, "-P", str(self.port), "start-server"], env=env, capture_output=True,
                                  text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AndroidError(f"cannot start adb ({adb}) on port {self.port}: {e}") from e
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if time.monotonic() > deadline:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise AndroidError(f"adb server on port {self.port} did not start ({last}); "
                                   f"is the port taken? set TESTBED_ADB_PORT to a free one")
            time.sleep(0.1)
        self.started = True

    def kill_server(self) -> None:
        if self.port == USER_PORT and not self.started:
            return                       # never the user's server
        if _answers(self.port):
            try:
                self.client().server_kill()
            except Exception:  # noqa: BLE001 - it is going away anyway
                pass

    def close(self) -> None:
        if self.started and not self.keep_server:
            self.kill_server()

    def client(self) -> Any:
        if self._client is None:
            self.ensure_server()
            self._client = _client(self.port, self.timeout_s)
        return self._client

    # ---- devices ------------------------------------------------------------
    def devices(self) -> list[tuple[str, str, dict[str, str]]]:
        """(serial, state, tags) of every device the server knows, offline and unauthorized too."""
        try:
            return [(d.serial, d.state, dict(d.tags)) for d in self.client().list(extended=True)]
        except Exception as e:  # noqa: BLE001 - adbutils / socket errors at the boundary
            raise _server_error(self.port, e) from e

    def connect(self, address: str) -> str:
        """``adb connect HOST:PORT`` (what the server answered)."""
        try:
            return str(self.client().connect(address, timeout=15))
        except Exception as e:  # noqa: BLE001
            raise _server_error(self.port, e) from e

    def disconnect(self, address: str) -> None:
        try:
            self.client().disconnect(address)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _device(self, serial: str) -> Any:
        d = self._devices.get(serial)
        if d is None:
            from adbutils import AdbDevice

            d = self._devices[serial] = AdbDevice(self.client(), serial=serial)
        return d

    def shell(self, serial: str, command: str, timeout_s: float | None = 120.0) -> ShellResult:
        """Run ``command`` (a shell line; quote its parts with ``shlex.quote``) through shell v2."""
        try:
            r = self._device(serial).shell2(command, timeout=timeout_s, v2=True, rstrip=False)
        except Exception as e:  # noqa: BLE001
            raise device_error(serial, e, f"running {command.split()[0]!r}") from e
        return ShellResult(r.stdout, r.stderr, int(r.returncode))

    def push(self, serial: str, source: Path | bytes | BinaryIO, dest: str, mode: int = 0o644) -> int:
        """Sync SEND of a file (or bytes) to ``dest``; returns bytes sent. A FAIL from the phone
        (e.g. no space left) is an AndroidError quoting it."""
        src: BinaryIO
        if isinstance(source, (bytes, bytearray)):
            import io
            src = io.BytesIO(source)
        elif isinstance(source, Path):
            src = source.open("rb")
        else:
            src = source
        try:
            c = self._device(serial).open_transport(timeout=self.timeout_s)
            try:
                c.send_command("sync:")
                c.check_okay()
                target = f"{dest},{0o100000 | mode}".encode()
                c.conn.sendall(b"SEND" + struct.pack("<I", len(target)) + target)
                sent = 0
                while chunk := src.read(_CHUNK):
                    c.conn.sendall(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
                    sent += len(chunk)
                c.conn.sendall(b"DONE" + struct.pack("<I", int(time.time())))
                status = c.read_exact(8)
                if status[:4] != b"OKAY":
                    n = struct.unpack("<I", status[4:])[0]
                    reason = c.read_exact(n).decode(errors="replace") if status[:4] == b"FAIL" else repr(status)
                    raise AndroidError(f"cannot write {dest}: {reason}" + (
                        f"; free space in {os.path.dirname(dest)} and retry" if "space" in reason.lower() else ""),
                        serial=serial)
                return sent
            finally:
                c.close()
        except AndroidError:
            raise
        except Exception as e:  # noqa: BLE001
            raise device_error(serial, e, f"pushing {dest}") from e
        finally:
            if not isinstance(source, (bytes, bytearray)) and isinstance(source, Path):
                src.close()

    def pull(self, serial: str, path: str) -> bytes:
        try:
            from adbutils import Sync

            return Sync(self._device(serial)).read_bytes(path)
        except Exception as e:  # noqa: BLE001
            raise device_error(serial, e, f"reading {path}") from e


def _client(port: int, timeout_s: float) -> Any:
    """An adbutils client on ``port`` that never starts a server of its own."""
    import adbutils
    from adbutils._adb import AdbConnection

    class _Connection(AdbConnection):
        def _safe_connect(self):  # noqa: ANN202 - adbutils API
            return self._create_socket()      # no `adb start-server` on the default port

    class _Client(adbutils.AdbClient):
        def make_connection(self, timeout: float | None = None) -> AdbConnection:
            conn = _Connection(self.host, self.port)
            conn.conn.settimeout(timeout or timeout_s)
            return conn

    return _Client(host="127.0.0.1", port=port, socket_timeout=timeout_s)


def _server_error(port: int, e: Exception) -> AndroidError:
    text = str(e).strip() or type(e).__name__
    return AndroidError(f"adb server on port {port} failed: {text}; restart it with "
                        f"`adb -P {port} kill-server` and retry")


def device_error(serial: str, e: Exception, doing: str) -> AndroidError:
    """adb's error about one phone → one line with a remedy."""
    text = " ".join(str(e).split()) or type(e).__name__
    low = text.lower()
    if "unauthorized" in low:
        return AndroidError("is unauthorized: unlock it, accept the 'Allow USB debugging' prompt, then retry",
                            serial=serial)
    if "offline" in low:
        return Disconnected(f"went offline while {doing}: reconnect the cable (or `adb reconnect`), then retry",
                            serial=serial)
    if "not found" in low or "closed" in low or "eof" in low or "reset" in low or "broken pipe" in low \
            or isinstance(e, (EOFError, ConnectionError)):
        return Disconnected(f"disconnected while {doing} ({text}): plug it back in, then retry",
                            serial=serial)
    if "timeout" in low or "timed out" in low:
        return Disconnected(f"stopped answering while {doing} (timeout): check the cable and the screen lock, "
                            "then retry", serial=serial)
    return AndroidError(f"adb failed while {doing}: {text}", serial=serial)


def which_adb() -> str | None:
    """The adb on PATH, for messages (None: only adbutils' bundled copy, if any)."""
    return shutil.which("adb")
