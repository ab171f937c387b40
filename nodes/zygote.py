"""A fresh process per KPI measurement, without paying for Python's imports each time.

benchmark_model's KPIs (init time, init and peak memory) must come from a
process that has not run anything else, so the agent used to start ``python -m
nodes.benchmark`` per part. Most of that process's time was importing numpy and
LiteRT: ~0.7 s of CPU, i.e. seconds per part on a node with a small CPU quota.

The zygote is a single-threaded helper process that imports those once and
then, per request, forks a child that measures one model and exits. The child
is a fresh address space for everything the measurement touches (interpreter,
arena, delegate); what it inherits is the imported code, which a fresh
``python -m nodes.benchmark`` process would also hold before loading the model.
RSS-based KPIs are deltas from the child's own RSS before loading, as before.
One trap: fork does not copy the page-table entries of file-backed mappings
(library code), so the child would count as "init memory" every library page
it touches again, pages a freshly started process had already mapped while
importing; and its first write to each heap page it shares with the zygote is
a copy-on-write fault, which would land in ``init_s``. The zygote therefore
records which of its pages are resident after the imports
(``/proc/self/pagemap``): the child maps each file-backed one and unshares each
private writable one (``madvise`` POPULATE_READ / POPULATE_WRITE per run of
pages) before anything is timed. Its starting
RSS and its page tables are then what a fresh process's would be after the
same imports (checked: equal init/peak memory on PoseNet).

Requests and replies are one JSON object per line on the zygote's stdin and
stdout (no pickle); the child hands its result to the zygote over a pipe.
Fork is safe here because the zygote never starts a thread (numpy's BLAS pool
is limited to one thread before numpy is imported).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import threading
from typing import Any


class ZygoteError(RuntimeError):
    """The zygote or a measurement child failed; the message says how."""


class Zygote:
    """Client side: start the helper once, then ``measure`` as often as needed."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen([sys.executable, "-m", "nodes.zygote"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self._lock = threading.Lock()
        ready = self._read_line(timeout_s)
        if ready.get("ready") is not True:
            self.close()
            raise ZygoteError(f"zygote did not start: {ready}")

    def _read_line(self, timeout_s: float) -> dict[str, Any]:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            raise ZygoteError(f"zygote gave no answer within {timeout_s:g} s")
        line = self._proc.stdout.readline()
        if not line:
            raise ZygoteError(f"zygote exited (status {self._proc.poll()})")
        return json.loads(line)

    def measure(self, model_path: str, runs: int, warmup: int, threads: int | None,
                timeout_s: float = 600.0) -> dict[str, Any]:
        """KPIs of ``model_path`` measured in a freshly forked child (``nodes.benchmark.measure``)."""
        request = {"model": os.fspath(model_path), "runs": int(runs), "warmup": int(warmup), "threads": threads}
        with self._lock:
            if self._proc.poll() is not None:
                raise ZygoteError(f"zygote is gone (status {self._proc.returncode})")
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            reply = self._read_line(timeout_s)
        if "error" in reply:
            raise ZygoteError(f"benchmark of {model_path} failed: {reply['error']}")
        return reply["kpis"]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


# ----------------------------------------------------------------------------- server side

_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63


def resident_pages() -> tuple[list[int], list[int]]:
    """Addresses of this process's resident pages: (file-backed readable ones,
    private writable ones), as its page tables map them now."""
    files: list[int] = []
    writable: list[int] = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            perms, path = fields[1], fields[5] if len(fields) > 5 else ""
            if "r" not in perms or path.startswith("[v"):  # [vvar], [vdso], [vsyscall]: not ours to touch
                continue
            if path.startswith("/") and "w" not in perms:
                target = files
            elif "w" in perms and "p" in perms:
                target = writable
            else:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(lo // _PAGE * 8)
            entries = pagemap.read((hi - lo) // _PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if entry & _PRESENT:
                    target.append(lo + i * _PAGE)
    return files, writable


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+


def _runs(addresses: list[int]) -> list[tuple[int, int]]:
    """Consecutive pages as (start, length) ranges."""
    out: list[tuple[int, int]] = []
    for a in addresses:
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + _PAGE)
        else:
            out.append((a, _PAGE))
    return out


def _touch(files: list[int], writable: list[int]) -> None:
    """Map the file pages and unshare the writable ones, so neither faults later
    inside a timed region: one madvise(MADV_POPULATE_READ/WRITE) per run of
    consecutive pages (a few hundred calls; the kernel does the faulting), or,
    on kernels without it, a read / a byte rewritten with itself per page."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for pages, advice, fallback in ((files, _MADV_POPULATE_READ, lambda a: ctypes.string_at(a, 1)),
                                    (writable, _MADV_POPULATE_WRITE, lambda a: ctypes.memmove(a, a, 1))):
        for start, length in _runs(pages):
            if libc.madvise(start, length, advice) != 0:
                for address in range(start, start + length, _PAGE):
                    fallback(address)


def _child(request: dict[str, Any], write_fd: int, resident: tuple[list[int], list[int]]) -> None:
    """In the forked child: measure, write one JSON object, exit without cleanup."""
    _touch(*resident)
    # The zygote's stdout carries its replies: nothing the runtime prints may land there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        from nodes.benchmark import measure
        out = {"kpis": measure(request["model"], request["runs"], request["warmup"], request.get("threads"))}
    except BaseException as e:  # the parent reports whatever went wrong
        out = {"error": f"{type(e).__name__}: {e}"}
    data = json.dumps(out).encode()
    while data:
        data = data[os.write(write_fd, data):]
    os._exit(0)


def _serve_one(request: dict[str, Any], resident: tuple[list[int], list[int]]) -> dict[str, Any]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(request, write_fd, resident)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"measurement process died ({_describe(status)})"}
    return json.loads(b"".join(chunks))


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def main() -> int:
    import numpy  # noqa: F401 - the imports are what the zygote exists to hold

    from nodes import benchmark, runtime  # noqa: F401
    try:
        resident = resident_pages()
    except OSError:
        resident = ([], [])  # no pagemap (locked down): children count re-faulted pages
    print(json.dumps({"ready": True, "pid": os.getpid(), "resident_pages": [len(r) for r in resident]}),
          flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("model"), str):
                raise ValueError("expected {\"model\": PATH, \"runs\": N, \"warmup\": N, \"threads\": N}")
            reply = _serve_one(request, resident)
        except (ValueError, OSError) as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
