"""A TEST DOUBLE of an Android phone, reached by the real adb server over adb's own transport.

Why a double: the testbed's Android path (testbed.android) drives phones through the
real adb server with adbutils; no phone exists where the tests run, and an emulator
image cannot be fetched. This double stands in for the phone *behind* the adb server,
so everything in front of it is the real thing: the ``adb`` binary as server (and
``adb connect``), adbutils, the testbed.

What it speaks (AOSP ``adb/protocol.txt``): messages of a 24-byte little-endian header
(command, arg0, arg1, length, checksum, magic) and a payload; CNXN (banner with
``features=shell_v2,cmd``), AUTH (only to play an unauthorized phone: it never accepts
a key), OPEN, OKAY, WRTE, CLSE with one-WRTE-per-OKAY flow control. Services:
``shell:`` (v1: output then close), ``shell,v2,…:`` (packets: 1 stdout, 2 stderr,
3 exit), ``sync:`` (STAT, LIST, SEND, RECV, QUIT). Anything else is refused with CLSE.

What it is: a device root in a temporary folder (``/data/local/tmp/x`` is
``ROOT/data/local/tmp/x``; modes pushed with SEND are applied to the host file),
``getprop``, ``/sys`` CPU-frequency and thermal-zone files, ``dumpsys battery`` and
``dumpsys thermalservice`` from a JSON fixture describing a phone (``phone.json``),
a few toybox commands the testbed sends (``cat``, ``grep -sH``, ``ls``, ``mkdir -p``,
``rm -rf``, ``chmod``, ``df -k``, ``taskset``, ``echo``), and a ``benchmark_model``:
a pushed file whose ELF header names the phone's architecture and which carries a
``TESTBED-DOUBLE-BENCHMARK`` marker runs the pushed model with LiteRT on this host and
prints what the real tool prints for the flags given (``bm_double``). Each benchmark
warms the phone's thermal zones; past ``throttle_at_mC`` the thermal status rises and
the big cores' current frequency drops, so throttling can be observed.

Faults on demand: ``--unauthorized`` (answers CNXN with AUTH tokens forever),
``--offline`` (never answers CNXN), ``--disconnect-after N`` (drops every connection
and stops listening when benchmark N+1 starts: a phone unplugged mid-run).

Run: ``python -m tests.android.adb_double --root DIR [--port P]``; it prints
``listening 127.0.0.1:PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import shlex
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

A_CNXN, A_AUTH, A_OPEN, A_OKAY, A_CLSE, A_WRTE = 0x4E584E43, 0x48545541, 0x4E45504F, 0x59414B4F, 0x45534C43, 0x45545257
VERSION = 0x01000001             # skip-checksum version, what current adb servers speak
MAX_PAYLOAD = 256 * 1024
MARKER = b"TESTBED-DOUBLE-BENCHMARK"
ELF_MACHINE = {"arm64-v8a": 0xB7, "armeabi-v7a": 0x28, "x86_64": 0x3E, "x86": 0x03}


class Phone:
    """The phone's state: fixture, device root, thermal state, benchmark count."""

    def __init__(self, fixture: dict[str, Any], root: Path, disconnect_after: int | None) -> None:
        self.fx = fixture
        self.root = root
        self.zones = [dict(z) for z in fixture["thermal_zones"]]
        self.cpus = [dict(c) for c in fixture["cpus"]]
        self.benchmarks = 0
        self.disconnect_after = disconnect_after
        self.on_disconnect: Any = None
        self.last_taskset: str | None = None

    # ---- file system --------------------------------------------------------
    def host(self, device_path: str) -> Path:
        p = os.path.normpath("/" + device_path.lstrip("/"))
        return self.root / p.lstrip("/")

    def virtual(self) -> dict[str, str]:
        files = {"/sys/devices/system/cpu/possible": f"0-{len(self.cpus) - 1}\n"}
        for i, c in enumerate(self.cpus):
            base = f"/sys/devices/system/cpu/cpu{i}/cpufreq/"
            files[base + "cpuinfo_max_freq"] = f"{c['max_khz']}\n"
            files[base + "scaling_cur_freq"] = f"{c['cur_khz']}\n"
        for i, z in enumerate(self.zones):
            files[f"/sys/class/thermal/thermal_zone{i}/type"] = z["type"] + "\n"
            files[f"/sys/class/thermal/thermal_zone{i}/temp"] = f"{z['temp_mC']}\n"
        return files

    def read(self, path: str) -> bytes:
        v = self.virtual()
        if path in v:
            return v[path].encode()
        return self.host(path).read_bytes()

    def glob(self, pattern: str) -> list[str]:
        if not any(c in pattern for c in "*?["):
            return [pattern]
        names = list(self.virtual())
        base = self.root
        for dirpath, dirs, files in os.walk(base):
            rel = "/" + os.path.relpath(dirpath, base).lstrip(".")
            names += [os.path.normpath(rel + "/" + f) for f in files + dirs]
        hits = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        return hits or [pattern]

    def used_kb(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            total += sum((Path(dirpath) / f).stat().st_size for f in files)
        return total // 1024

    # ---- thermal ------------------------------------------------------------
    def heat(self) -> None:
        for z in self.zones:
            z["temp_mC"] += int(self.fx.get("heat_per_benchmark_mC", 0))
        if self.thermal_status() >= 2:
            top = max(c["max_khz"] for c in self.cpus)
            for c in self.cpus:
                if c["max_khz"] == top:
                    c["cur_khz"] = int(c["max_khz"] * 0.6)

    def thermal_status(self) -> int:
        hottest = max(z["temp_mC"] for z in self.zones)
        return 2 if hottest >= self.fx.get("throttle_at_mC", 10**9) else 0

    def benchmark_started(self) -> bool:
        """Count a benchmark; False when this one is where the phone gets unplugged."""
        self.benchmarks += 1
        if self.disconnect_after is not None and self.benchmarks > self.disconnect_after:
            if self.on_disconnect:
                self.on_disconnect()
            return False
        return True


# ---------------------------------------------------------------------------- shell

def run_shell(phone: Phone, command: str) -> tuple[bytes, bytes, int]:
    """Run a shell command line (``;`` and ``&&`` sequences); returns stdout, stderr, exit."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    tokens = list(lex)
    out, err, status = b"", b"", 0
    seq: list[str] = []
    pending_and = False
    for tok in tokens + [";"]:
        if tok in (";", "&&"):
            if seq and not (pending_and and status != 0):
                seq = [t.replace("$?", str(status)) for t in seq]
                o, e, status = _command(phone, seq)
                out, err = out + o, err + e
            pending_and = tok == "&&"
            seq = []
        else:
            seq.append(tok)
    return out, err, status


def _command(phone: Phone, argv: list[str]) -> tuple[bytes, bytes, int]:
    args: list[str] = [argv[0]]
    for a in argv[1:]:
        args += phone.glob(a) if a.startswith("/") else [a]
    name, rest = args[0], args[1:]
    try:
        if name == "getprop":
            props = phone.fx["props"]
            if rest:
                return (props.get(rest[0], "") + "\n").encode(), b"", 0
            return "".join(f"[{k}]: [{v}]\n" for k, v in sorted(props.items())).encode(), b"", 0
        if name == "echo":
            return (" ".join(rest) + "\n").encode(), b"", 0
        if name in ("true", ":"):
            return b"", b"", 0
        if name == "cat":
            return b"".join(phone.read(p) for p in rest), b"", 0
        if name == "grep":
            return _grep(phone, rest)
        if name == "ls":
            paths = [p for p in rest if not p.startswith("-")]
            names = []
            for p in paths:
                h = phone.host(p)
                names += sorted(os.listdir(h)) if h.is_dir() else [p] if h.exists() else []
                if not h.exists():
                    return b"", f"ls: {p}: No such file or directory\n".encode(), 1
            return "".join(n + "\n" for n in names).encode(), b"", 0
        if name == "mkdir":
            for p in (p for p in rest if not p.startswith("-")):
                phone.host(p).mkdir(parents=True, exist_ok=True)
            return b"", b"", 0
        if name == "rm":
            for p in (p for p in rest if not p.startswith("-")):
                h = phone.host(p)
                if h.is_dir():
                    shutil.rmtree(h, ignore_errors=True)
                elif h.exists():
                    h.unlink()
            return b"", b"", 0
        if name == "chmod":
            mode, paths = int(rest[0], 8), rest[1:]
            for p in paths:
                os.chmod(phone.host(p), mode)
            return b"", b"", 0
        if name == "df":
            cap = int(phone.fx["data_capacity_kb"])
            used = phone.used_kb()
            line = f"/dev/block/dm-46{cap:>13}{used:>10}{cap - used:>10} {used * 100 // max(cap, 1):>3}% /data\n"
            return ("Filesystem        1K-blocks      Used Available Use% Mounted on\n" + line).encode(), b"", 0
        if name == "dumpsys":
            return _dumpsys(phone, rest), b"", 0
        if name == "taskset":
            phone.last_taskset = rest[0]
            return _command(phone, rest[1:])
        if name.startswith("/"):
            return _execute(phone, name, rest)
        return b"", f"/system/bin/sh: {name}: inaccessible or not found\n".encode(), 127
    except FileNotFoundError as e:
        return b"", f"{name}: {e.filename}: No such file or directory\n".encode(), 1
    except PermissionError as e:
        return b"", f"{name}: {e.filename}: Permission denied\n".encode(), 1


def _grep(phone: Phone, rest: list[str]) -> tuple[bytes, bytes, int]:
    flags = [a for a in rest if a.startswith("-")]
    operands = [a for a in rest if not a.startswith("-")]
    pattern, files = operands[0], operands[1:]
    silent = any("s" in f for f in flags)
    out, err = [], b""
    for f in files:
        try:
            text = phone.read(f).decode()
        except OSError:
            if not silent:
                err += f"grep: {f}: No such file or directory\n".encode()
            continue
        out += [f"{f}:{line}\n" for line in text.splitlines() if pattern in line]
    return "".join(out).encode(), err, 0 if out else 1


def _dumpsys(phone: Phone, rest: list[str]) -> bytes:
    if rest[:1] == ["battery"]:
        b = phone.fx["battery"]
        return ("Current Battery Service state:\n"
                f"  AC powered: {str(b['ac']).lower()}\n  USB powered: {str(b['usb']).lower()}\n"
                "  Wireless powered: false\n  Max charging current: 500000\n  Max charging voltage: 5000000\n"
                f"  Charge counter: 3870000\n  status: {b['status']}\n  health: 2\n  present: true\n"
                f"  level: {b['level']}\n  scale: 100\n  voltage: 4215\n  temperature: {b['temperature_dC']}\n"
                "  technology: Li-ion\n").encode()
    if rest[:1] == ["thermalservice"]:
        temps = "".join(f"\tTemperature{{mValue={z['temp_mC'] / 1000.0}, mType=3, mName={z['type']}, "
                        f"mStatus={phone.thermal_status()}}}\n" for z in phone.zones)
        return ("IsStatusOverride: false\nThermalEventListeners:\n\tcallbacks: 1\n\tkilled: false\n"
                "\tbroadcasts count: -1\nThermalStatusListeners:\n\tcallbacks: 1\n\tkilled: false\n"
                f"\tbroadcasts count: -1\nThermal Status: {phone.thermal_status()}\nCached temperatures:\n{temps}"
                "HAL Ready: true\nHAL connection:\n\tThermalHAL 2.0 connected: yes\n"
                f"Current temperatures from HAL:\n{temps}").encode()
    return f"Can't find service: {' '.join(rest)}\n".encode()


def _execute(phone: Phone, path: str, args: list[str]) -> tuple[bytes, bytes, int]:
    h = phone.host(path)
    if not h.exists():
        return b"", f"/system/bin/sh: {path}: inaccessible or not found\n".encode(), 127
    if not os.access(h, os.X_OK):
        return b"", f"/system/bin/sh: {path}: can't execute: Permission denied\n".encode(), 126
    head = h.read_bytes()[:4096]
    machine = struct.unpack_from("<H", head, 18)[0] if head[:4] == b"\x7fELF" and len(head) > 20 else None
    if machine != ELF_MACHINE.get(phone.fx["props"]["ro.product.cpu.abi"]):
        return b"", f"/system/bin/sh: {path}: not executable: wrong architecture\n".encode(), 126
    if MARKER not in head:
        return b"", f"/system/bin/sh: {path}: can't execute: Exec format error\n".encode(), 126
    variant = json.loads(head[head.index(MARKER) + len(MARKER):].split(b"\n", 1)[0])
    from tests.android import bm_double

    if "--help" not in args and not phone.benchmark_started():
        time.sleep(3600)               # unplugged: this command never answers
    out, err, status = bm_double.run(phone, path, args, variant)
    phone.heat()
    return out, err, status


# ---------------------------------------------------------------------------- transport

class Stream:
    def __init__(self, transport: "Transport", local_id: int, remote_id: int) -> None:
        self.t, self.local, self.remote = transport, local_id, remote_id
        self.ready = asyncio.Event()
        self.ready.set()
        self.inbox = bytearray()
        self.arrived = asyncio.Event()
        self.closed = False

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.t.max_payload):
            await self.ready.wait()
            if self.closed:
                return
            self.ready.clear()
            self.t.send(A_WRTE, self.local, self.remote, data[i:i + self.t.max_payload])

    async def read(self, n: int) -> bytes:
        while len(self.inbox) < n:
            if self.closed:
                raise EOFError
            self.arrived.clear()
            await self.arrived.wait()
        out = bytes(self.inbox[:n])
        del self.inbox[:n]
        return out

    async def close(self) -> None:
        await self.ready.wait()
        if not self.closed:
            self.closed = True
            self.t.send(A_CLSE, self.local, self.remote)
            self.t.streams.pop(self.local, None)


class Transport:
    def __init__(self, phone: Phone, mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.phone, self.mode, self.reader, self.writer = phone, mode, reader, writer
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD

    def send(self, cmd: int, a0: int, a1: int, data: bytes = b"") -> None:
        head = struct.pack("<6I", cmd, a0, a1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF)
        self.writer.write(head + data)

    def banner(self) -> bytes:
        p = self.phone.fx["props"]
        return (f"device::ro.product.name={p['ro.product.name']};ro.product.model={p['ro.product.model']};"
                f"ro.product.device={p['ro.product.device']};features=shell_v2,cmd\0").encode()

    async def run(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(24)
                cmd, a0, a1, length, _, magic = struct.unpack("<6I", head)
                data = await self.reader.readexactly(length) if length else b""
                if magic != cmd ^ 0xFFFFFFFF:
                    break
                await self.handle(cmd, a0, a1, data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for s in list(self.streams.values()):
                s.closed = True
                s.ready.set()
                s.arrived.set()
            self.writer.close()

    async def handle(self, cmd: int, a0: int, a1: int, data: bytes) -> None:
        if cmd == A_CNXN:
            self.max_payload = min(MAX_PAYLOAD, a1 or MAX_PAYLOAD)
            if self.mode == "offline":
                return
            if self.mode == "unauthorized":
                self.send(A_AUTH, 1, 0, os.urandom(20))      # TOKEN; no signature is ever accepted
                return
            self.send(A_CNXN, VERSION, MAX_PAYLOAD, self.banner())
        elif cmd == A_AUTH:
            if a0 == 2:                                        # SIGNATURE: refuse, ask again
                self.send(A_AUTH, 1, 0, os.urandom(20))
        elif cmd == A_OPEN and self.mode == "device":
            dest = data.rstrip(b"\0").decode(errors="replace")
            local = self.next_id
            self.next_id += 1
            if not dest.startswith(("shell", "sync:")):
                self.send(A_CLSE, 0, a0)
                return
            stream = Stream(self, local, a0)
            self.streams[local] = stream
            self.send(A_OKAY, local, a0)
            asyncio.get_running_loop().create_task(self.serve(stream, dest))
        elif cmd == A_OKAY and a1 in self.streams:
            self.streams[a1].ready.set()
        elif cmd == A_WRTE and a1 in self.streams:
            s = self.streams[a1]
            s.inbox += data
            s.arrived.set()
            self.send(A_OKAY, a1, a0)
        elif cmd == A_CLSE and a1 in self.streams:
            s = self.streams.pop(a1)
            s.closed = True
            s.ready.set()
            s.arrived.set()

    async def serve(self, stream: Stream, dest: str) -> None:
        try:
            if dest.startswith("sync:"):
                await self.sync(stream)
            else:
                service, _, command = dest.partition(":")
                v2 = "v2" in service.split(",")
                out, err, status = await asyncio.to_thread(run_shell, self.phone, command)
                if v2:
                    packet = lambda i, b: bytes([i]) + struct.pack("<I", len(b)) + b  # noqa: E731
                    await stream.write((packet(1, out) if out else b"") + (packet(2, err) if err else b"")
                                       + packet(3, bytes([status & 0xFF])))
                else:
                    await stream.write(out + err)
        except (EOFError, ConnectionError):
            pass
        finally:
            await stream.close()

    async def sync(self, s: Stream) -> None:
        while True:
            req = await s.read(8)
            rid, n = req[:4], struct.unpack("<I", req[4:])[0]
            arg = (await s.read(n)).decode(errors="replace") if n else ""
            if rid == b"QUIT":
                return
            if rid == b"STAT":
                st = self._stat(arg)
                await s.write(b"STAT" + struct.pack("<3I", *st))
            elif rid == b"LIST":
                h = self.phone.host(arg)
                for name in sorted(os.listdir(h)) if h.is_dir() else []:
                    mode, size, mtime = self._stat(arg.rstrip("/") + "/" + name)
                    await s.write(b"DENT" + struct.pack("<4I", mode, size, mtime, len(name.encode())) + name.encode())
                await s.write(b"DONE" + bytes(16))
            elif rid == b"SEND":
                await self._receive_file(s, arg)
            elif rid == b"RECV":
                h = self.phone.host(arg)
                try:
                    data = h.read_bytes() if h.is_file() else self.phone.read(arg)
                except OSError as e:
                    msg = (e.strerror or "No such file or directory").encode()
                    await s.write(b"FAIL" + struct.pack("<I", len(msg)) + msg)
                    continue
                for i in range(0, len(data), 64 * 1024):
                    chunk = data[i:i + 64 * 1024]
                    await s.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
                await s.write(b"DONE" + bytes(4))
            else:
                return

    def _stat(self, path: str) -> tuple[int, int, int]:
        h = self.phone.host(path)
        try:
            st = h.stat()
        except OSError:
            return 0, 0, 0
        return st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF, int(st.st_mtime)

    async def _receive_file(self, s: Stream, arg: str) -> None:
        path, _, mode = arg.rpartition(",")
        h = self.phone.host(path)
        data = bytearray()
        while True:
            rid = await s.read(4)
            n = struct.unpack("<I", await s.read(4))[0]
            if rid == b"DATA":
                data += await s.read(n)
            elif rid == b"DONE":
                break
            else:
                return
        free_kb = int(self.phone.fx["data_capacity_kb"]) - self.phone.used_kb()
        if len(data) // 1024 > free_kb:
            msg = f"write failed: No space left on device: {path}".encode()
            await s.write(b"FAIL" + struct.pack("<I", len(msg)) + msg)
            return
        h.parent.mkdir(parents=True, exist_ok=True)
        h.write_bytes(bytes(data))
        os.chmod(h, int(mode) & 0o777)
        await s.write(b"OKAY" + bytes(4))


async def serve(phone: Phone, host: str, port: int, mode: str) -> None:
    transports: list[Transport] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = Transport(phone, mode, reader, writer)
        transports.append(t)
        await t.run()

    server = await asyncio.start_server(accept, host, port)
    loop = asyncio.get_running_loop()

    def unplug() -> None:
        def drop() -> None:
            server.close()
            for t in transports:
                t.writer.transport.abort()
        loop.call_soon_threadsafe(drop)

    phone.on_disconnect = unplug
    print(f"listening {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            pass
    await asyncio.sleep(3600)        # unplugged: stay alive but unreachable until killed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="adb device double (tests only)")
    ap.add_argument("--root", required=True)
    ap.add_argument("--fixture", default=str(Path(__file__).with_name("phone.json")))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--unauthorized", action="store_true")
    ap.add_argument("--offline", action="store_true")
    ap.add_argument("--disconnect-after", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a top-level fixture key, e.g. data_capacity_kb=10")
    a = ap.parse_args(argv)
    fixture = json.loads(Path(a.fixture).read_text())
    for item in a.set:
        k, _, v = item.partition("=")
        fixture[k] = json.loads(v)
    mode = "unauthorized" if a.unauthorized else "offline" if a.offline else "device"
    phone = Phone(fixture, Path(a.root), a.disconnect_after)
    try:
        asyncio.run(serve(phone, "127.0.0.1", a.port, mode))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
