"""The wire protocol both planes speak: length-prefixed frames with a small JSON header.

A frame is ``PREFIX | header | payload``:

* ``PREFIX`` is fixed-size (``!4sIQ``): a 4-byte magic, the header length and the
  payload length. Both lengths are checked against bounds *before* anything is
  allocated, so a garbage or hostile prefix cannot make a peer allocate gigabytes.
* ``header`` is UTF-8 JSON, one object, at most ``MAX_HEADER_BYTES`` and nested at most
  ``MAX_HEADER_DEPTH`` deep; NaN/Infinity are refused. JSON rather than a binary struct
  because it is small next to the tensors, self-describing, and leaves room for new
  fields (codec parameters, timestamps) without a version bump. Never pickle.
* ``payload`` is opaque bytes: on the data plane the concatenated tensor buffers, on the
  control plane a part file, an input, one-layer models...

**Admission** — what a frame may carry is decided from its header, before the payload
is allocated or read (``recv_frame(admit=...)``):

* control requests (``admit_request``): the run token first; then only ``load_part``,
  ``stage_part`` (a part, up to ``MAX_PAYLOAD_BYTES``), ``set_inputs`` and
  ``profile_layers`` (exactly the sizes their arguments announce) carry a payload;
  every other request carries none;
* data frames (``admit_data_frame``): ``tensors``/``result`` carry exactly what their
  descriptors add up to (nothing when they announce ``udp``: the bytes come as
  datagrams, ``nodes.udp``), ``part`` a model part; ``hello``, ``challenge``, ``auth``,
  ``welcome``, ``ping``, ``pong``, ``begin``, ``ready``, ``trigger``, ``fetch``, ``error``
  carry none.

Tensors travel as descriptors in the header (``name, dtype, shape, codec, nbytes`` plus
codec ``params``; at most ``MAX_DIMS`` dimensions of at most ``MAX_DIM`` each) and their
bytes back to back in the payload. ``send_frame`` hands the numpy buffers to ``sendmsg``
without copying them; ``recv_frame`` reads the payload with ``recv_into`` into one
buffer and ``decode_tensors`` views it with ``np.frombuffer``, so the raw codec is
zero-copy on both sides.

**Control plane**: requests are frames whose header has ``op``, ``token`` and ``args``;
replies have ``ok`` and either ``result`` or ``error`` (with ``kind``: ``protocol`` for a
refused frame, ``busy`` for the connection cap, ``node`` for a failed operation). A
result too large for a header (``run``'s sample rows) travels as JSON in the payload,
announced by ``result_bytes`` (``ok_reply`` / ``reply_result``). A token is 1..256
printable ASCII characters (``valid_token``); anything else is a refusal, not a crash.

**Data plane**: a connection starts with a mutual challenge-response, and the token
itself never crosses the link (``data_handshake_local`` / ``data_handshake_remote``)::

    local -> remote  hello     {nonce_l}
    remote -> local  challenge {nonce_r, proof = HMAC(token, "remote" | nonce_l | nonce_r)}
    local -> remote  auth      {proof = HMAC(token, "local" | nonce_l | nonce_r)}
    remote -> local  welcome   {node, boot_id, timens}

The remote proves first, so the local sends nothing derived from the token to a peer
that has not shown it knows it; side labels keep one proof from passing for the other.

Anything that does not parse raises ``FrameError``; a server answers with an error
frame, drops that connection and keeps serving. Deadlines and caps on connections are
``nodes.serving``'s (the constants they use, ``*_PREAUTH_S`` and ``CONTROL_IDLE_S``, are
here because the client must know them too).

This module owns framing, bounds, admission, the handshake and the raw codec. Other
codecs (PNG/JPEG for the k=0 input) live in ``nodes.codecs``; the agent's behaviour
lives in ``nodes.agent``; the orchestrator's client in ``testbed.deploy.agent_client``
(which maps ``FrameError`` to ``testbed.errors.ProtocolError``). It imports only numpy
and the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

MAGIC = b"TBF1"
PREFIX = struct.Struct("!4sIQ")
MAX_HEADER_BYTES = 64 * 1024
#: Largest payload a peer accepts in one frame: room for a float32 part of a few
#: hundred MB, small enough that a bogus length is refused instead of allocated.
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
MAX_TENSORS = 256
MAX_NAME_CHARS = 512
MAX_DIMS = 8
#: Largest single dimension: TFLite and numpy index with signed 32/64-bit ints; a
#: bigger one is garbage even when another dimension is 0 and the product looks small.
MAX_DIM = 2**31 - 1
#: Deepest nesting of arrays/objects a header may have. Real headers nest about 5 deep
#: (set_inputs: args.sets[].tensors[].shape); json.loads would recurse ~1000 deep and
#: raise RecursionError, so a deep header is refused with FrameError instead.
MAX_HEADER_DEPTH = 32
#: The run token: printable ASCII without spaces. Checked as such before it is encoded,
#: so a lone surrogate in a header (legal JSON, not encodable) is a refusal, not a crash.
MAX_TOKEN_CHARS = 256
#: From accept until the first request is authenticated (control) or the data-link
#: handshake is done (data): a peer that is slower than this is cut off, however it
#: trickles its bytes in (the deadline is total, not per read). The data link's is
#: longer because its handshake takes two round trips over the shaped link.
CONTROL_PREAUTH_S = 10.0
DATA_PREAUTH_S = 30.0
#: An authenticated control connection waiting this long for its next request (or
#: stalling this long mid-frame) is closed; ``AgentClient`` reconnects before it
#: would hit this. The orchestrator's lease connection is exempt.
CONTROL_IDLE_S = 300.0
#: Control operations that may carry a payload; every other request carries none.
PAYLOAD_OPS = frozenset({"load_part", "stage_part", "set_inputs", "profile_layers"})
#: Data frames that may carry a payload: tensors/result (exactly their descriptors'
#: byte counts) and part (a model part, up to MAX_PAYLOAD_BYTES).
DATA_PAYLOAD_KINDS = frozenset({"tensors", "result", "part"})
#: Tensor dtypes the data plane carries (numpy names, as TFLite parts produce them).
DTYPES = frozenset({"float32", "float16", "float64", "int8", "uint8", "int16", "uint16",
                    "int32", "uint32", "int64", "uint64", "bool"})


class FrameError(Exception):
    """A frame did not parse, broke a bound, or a request lacked the token."""


class PeerClosed(FrameError):
    """The peer closed the connection (cleanly, between frames, or mid-frame)."""


@dataclass(frozen=True)
class TensorDesc:
    """How one tensor sits in a payload: what it is and how it was encoded.

    ``nbytes`` is the size on the wire (after the codec); ``params`` carries codec
    parameters (e.g. the quantisation range of PNG/JPEG) and stays empty for ``raw``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    nbytes: int
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                               "codec": self.codec, "nbytes": self.nbytes}
        if self.params:
            out["params"] = dict(self.params)
        return out

    @property
    def raw_nbytes(self) -> int:
        """Size of the decoded tensor."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @classmethod
    def from_json(cls, obj: Any) -> "TensorDesc":
        """Validate one descriptor from a header; raises FrameError on anything odd."""
        if not isinstance(obj, dict):
            raise FrameError("tensor descriptor is not an object")
        name, dtype, shape = obj.get("name"), obj.get("dtype"), obj.get("shape")
        codec, nbytes, params = obj.get("codec"), obj.get("nbytes"), obj.get("params", {})
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise FrameError("tensor name missing or too long")
        if dtype not in DTYPES:
            raise FrameError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
            raise FrameError(f"tensor {name!r}: shape must be at most {MAX_DIMS} ints "
                             f"in 0..{MAX_DIM}")
        if not isinstance(codec, str) or not codec or len(codec) > MAX_NAME_CHARS:
            raise FrameError(f"tensor {name!r}: codec missing")
        if not _is_int(nbytes) or not 0 <= nbytes <= MAX_PAYLOAD_BYTES:
            raise FrameError(f"tensor {name!r}: bad byte count {nbytes!r}")
        if not isinstance(params, dict):
            raise FrameError(f"tensor {name!r}: params must be an object")
        desc = cls(name, dtype, tuple(shape), codec, nbytes, params)
        if desc.raw_nbytes > MAX_PAYLOAD_BYTES:
            raise FrameError(f"tensor {name!r}: decoded size exceeds {MAX_PAYLOAD_BYTES} bytes")
        if codec == "raw" and nbytes != desc.raw_nbytes:
            raise FrameError(f"tensor {name!r}: {nbytes} bytes for shape {shape} {dtype}")
        return desc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------- codecs

Buffer = Any  # bytes | bytearray | memoryview | contiguous ndarray


@dataclass(frozen=True)
class Codec:
    """Turns an array into wire buffers and back.

    ``encode(array) -> (buffers, params)``; ``decode(view, desc) -> array`` where ``view``
    is a memoryview of exactly ``desc.nbytes`` bytes inside the received payload.
    """

    name: str
    encode: Callable[[np.ndarray], tuple[list[Buffer], dict[str, Any]]]
    decode: Callable[[memoryview, TensorDesc], np.ndarray]


def _raw_encode(array: np.ndarray) -> tuple[list[Buffer], dict[str, Any]]:
    # ascontiguousarray is a no-op for the C-contiguous arrays LiteRT returns; the
    # memoryview then goes straight into sendmsg without a copy.
    arr = np.ascontiguousarray(array)
    return [memoryview(arr).cast("B")] if arr.nbytes else [], {}


def _raw_decode(view: memoryview, desc: TensorDesc) -> np.ndarray:
    # A view into the receive buffer, not a copy. Writable because the buffer is a
    # bytearray, so it can be handed to set_tensor directly.
    return np.frombuffer(view, dtype=desc.dtype).reshape(desc.shape)


RAW = Codec("raw", _raw_encode, _raw_decode)


def codec_registry(extra: Iterable[Codec] = ()) -> dict[str, Codec]:
    """The codecs a peer understands: ``raw`` plus any given (e.g. from ``nodes.codecs``)."""
    reg = {RAW.name: RAW}
    for c in extra:
        reg[c.name] = c
    return reg


def encode_tensors(tensors: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]],
                   codecs: Mapping[str, Codec], choose: Callable[[str], str] | None = None,
                   ) -> tuple[list[dict[str, Any]], list[Buffer], int]:
    """Encode named arrays; returns (descriptor JSON list, buffers, raw bytes total).

    ``choose(name) -> codec name`` picks a codec per tensor (default ``raw``).
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    descs: list[dict[str, Any]] = []
    buffers: list[Buffer] = []
    raw_total = 0
    for name, array in items:
        codec = codecs[choose(name) if choose else "raw"]
        array = np.asarray(array)
        bufs, params = codec.encode(array)
        nbytes = sum(memoryview(b).nbytes for b in bufs)
        descs.append(TensorDesc(name, array.dtype.name, tuple(array.shape), codec.name,
                                nbytes, params).to_json())
        buffers.extend(bufs)
        raw_total += array.nbytes
    if len(descs) > MAX_TENSORS:
        raise FrameError(f"more than {MAX_TENSORS} tensors in one frame")
    return descs, buffers, raw_total


def decode_tensors(descs_json: Any, payload: Buffer, codecs: Mapping[str, Codec],
                   ) -> dict[str, np.ndarray]:
    """Check descriptors against the payload and decode them (raw: views, no copies)."""
    descs = parse_descs(descs_json)
    view = memoryview(payload).cast("B")
    if sum(d.nbytes for d in descs) != view.nbytes:
        raise FrameError("tensor byte counts do not add up to the payload size")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for d in descs:
        codec = codecs.get(d.codec)
        if codec is None:
            raise FrameError(f"tensor {d.name!r}: unknown codec {d.codec!r}")
        try:
            arr = codec.decode(view[offset:offset + d.nbytes], d)
        except FrameError:
            raise
        except Exception as e:  # a codec library rejecting corrupt data
            raise FrameError(f"tensor {d.name!r}: {d.codec} decode failed: {e}") from e
        if tuple(arr.shape) != d.shape or arr.dtype.name != d.dtype:
            raise FrameError(f"tensor {d.name!r}: decoded to {arr.dtype}{list(arr.shape)}")
        out[d.name] = arr
        offset += d.nbytes
    return out


def parse_descs(descs_json: Any) -> list[TensorDesc]:
    """Validate a header's tensor list (unique names, bounded count)."""
    if not isinstance(descs_json, list) or len(descs_json) > MAX_TENSORS:
        raise FrameError(f"'tensors' must be a list of at most {MAX_TENSORS} descriptors")
    descs = [TensorDesc.from_json(o) for o in descs_json]
    if len({d.name for d in descs}) != len(descs):
        raise FrameError("duplicate tensor names in one frame")
    return descs


# --------------------------------------------------------------------------- framing

def pack_header(header: Mapping[str, Any], payload_nbytes: int) -> bytes:
    """PREFIX + JSON header bytes; raises FrameError if a bound is broken."""
    try:
        hbytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise FrameError(f"header is not JSON-serialisable: {e}") from e
    if len(hbytes) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(hbytes)} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_nbytes > MAX_PAYLOAD_BYTES:
        raise FrameError(f"payload of {payload_nbytes} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return PREFIX.pack(MAGIC, len(hbytes), payload_nbytes) + hbytes


def unpack_prefix(prefix: Buffer, max_payload: int = MAX_PAYLOAD_BYTES,
                  max_header: int = MAX_HEADER_BYTES) -> tuple[int, int]:
    """(header length, payload length) from a PREFIX, refusing bad magic and bounds."""
    magic, hlen, plen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}: not a testbed frame")
    if not 2 <= hlen <= max_header:
        raise FrameError(f"header length {hlen} outside 2..{max_header}")
    if plen > max_payload:
        raise FrameError(f"payload length {plen} exceeds {max_payload}")
    return hlen, plen


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads would accept NaN/Infinity


def parse_header(hbytes: Buffer) -> dict[str, Any]:
    """Decode the JSON header; it must be an object nested at most MAX_HEADER_DEPTH deep.

    Every way the bytes can be wrong is a FrameError: bad UTF-8, bad JSON, NaN or
    Infinity (which Python's json accepts and the standard does not), and nesting
    deep enough to exhaust the parser's recursion (RecursionError).
    """
    header = parse_json(hbytes, "header")
    if not isinstance(header, dict):
        raise FrameError("header is not a JSON object")
    return header


def parse_json(data: Buffer, what: str = "header") -> Any:
    """Strict, bounded-depth JSON (see ``parse_header``); FrameError on anything else."""
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"{what} is not JSON: {e}") from e
    except RecursionError as e:
        raise FrameError(f"{what} nests deeper than {MAX_HEADER_DEPTH} levels") from e
    if _depth(value) > MAX_HEADER_DEPTH:
        raise FrameError(f"{what} nests deeper than {MAX_HEADER_DEPTH} levels")
    return value


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion to exhaust)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, d)
        if d <= MAX_HEADER_DEPTH:  # deeper is refused anyway: stop walking
            stack.extend((child, d + 1) for child in node)
    return deepest


def send_frame(sock: socket.socket, header: Mapping[str, Any],
               buffers: Sequence[Buffer] = ()) -> int:
    """Send one frame; the payload is the buffers back to back, never copied.

    Returns the bytes sent (prefix + header + payload).
    """
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    head = pack_header(header, sum(v.nbytes for v in views))
    return send_buffers(sock, [memoryview(head), *views])


def send_buffers(sock: socket.socket, views: list[memoryview]) -> int:
    """sendmsg until every view is out, resuming after partial sends."""
    total = sum(v.nbytes for v in views)
    i = 0
    # sendmsg takes at most IOV_MAX (1024 on Linux) buffers; batch below that.
    while i < len(views):
        sent = sock.sendmsg(views[i:i + 512])
        while sent and i < len(views):
            n = views[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
    return total


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; PeerClosed if the peer goes away first."""
    got = 0
    n = view.nbytes
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise PeerClosed("peer closed the connection mid-frame" if got or n else "peer closed")
        got += r


# Linux: SO_TIMESTAMPNS makes recvmsg return, as ancillary data, the time the
# kernel received the last segment read (a struct timespec, CLOCK_REALTIME).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")


def enable_kernel_stamps(sock: socket.socket) -> bool:
    """Ask the kernel to timestamp what this socket receives; False where it cannot."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return True
    except OSError:
        return False


def recv_exact_stamped(sock: socket.socket, view: memoryview) -> int | None:
    """Like ``recv_exact_into``, also returning the kernel's receive time of the last
    segment read (CLOCK_REALTIME ns), or None when the kernel gave none."""
    got, stamp = 0, None
    n = view.nbytes
    while got < n:
        r, anc, _, _ = sock.recvmsg_into([view[got:]], 64)
        if r == 0:
            raise PeerClosed("peer closed the connection mid-frame" if got or n else "peer closed")
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(data)
                stamp = sec * 1_000_000_000 + nsec
        got += r
    return stamp


def realtime_to_monotonic(stamp_ns: int | None) -> int | None:
    """A CLOCK_REALTIME stamp on CLOCK_MONOTONIC (the clock of every timing here).

    The offset between the two clocks is read now; they only drift apart by NTP
    slewing, which is negligible over the milliseconds since the stamp."""
    import time
    if stamp_ns is None:
        return None
    return stamp_ns - (time.time_ns() - time.monotonic_ns())


@dataclass
class Frame:
    """A received frame: the parsed header, the payload, and when its last byte arrived.

    ``t_last_ns`` is when this process had the last byte in hand; with kernel
    stamps, ``t_kernel_ns`` is when the kernel received it (both CLOCK_MONOTONIC).
    The difference is how long the receiving process took to get to the data:
    scheduling and CPU-quota throttling of the receiving node, not the link.
    """

    header: dict[str, Any]
    payload: bytearray
    t_first_ns: int  # monotonic time the first prefix bytes were in hand
    t_last_ns: int  # monotonic time the last payload byte was in hand
    wire_bytes: int
    t_kernel_ns: int | None = None  # kernel receive time of the last segment (monotonic)

    @property
    def t_arrived_ns(self) -> int:
        """When the last byte arrived: the kernel's stamp when there is one."""
        return self.t_kernel_ns if self.t_kernel_ns is not None else self.t_last_ns


Admit = Callable[[dict[str, Any], int], None]


def recv_frame(sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES,
               clock: Callable[[], int] | None = None,
               before_payload: Callable[[dict[str, Any]], None] | None = None,
               kernel_stamps: bool = False, admit: Admit | None = None,
               max_header: int = MAX_HEADER_BYTES) -> Frame:
    """Read one frame. Raises PeerClosed on EOF before a frame, FrameError on garbage.

    ``clock`` (default ``time.monotonic_ns``) stamps the moment the last byte was
    received — the uplink/downlink end point of the measurement contract.
    ``admit(header, payload_length)`` (and the older ``before_payload(header)``) run
    after the header and before the payload is allocated and read: that is where a
    server checks the token and what this kind of frame may carry
    (``admit_request``, ``admit_data_frame``, ``no_payload``), so a refused frame
    costs at most its header, never its declared payload.
    ``kernel_stamps`` (socket prepared with ``enable_kernel_stamps``) also records
    the kernel's receive time of the last segment (``Frame.t_kernel_ns``).
    """
    clock = clock or time.monotonic_ns
    recv = recv_exact_stamped if kernel_stamps else recv_exact_into
    prefix = bytearray(PREFIX.size)
    pv = memoryview(prefix)
    first = sock.recv_into(pv, PREFIX.size)
    if first == 0:
        raise PeerClosed("peer closed")
    t_first = clock()
    stamp = recv(sock, pv[first:])
    hlen, plen = unpack_prefix(prefix, max_payload, max_header)
    hbytes = bytearray(hlen)
    stamp = recv(sock, memoryview(hbytes)) or stamp
    header = parse_header(hbytes)
    if before_payload is not None:
        before_payload(header)
    if admit is not None:
        admit(header, plen)
    payload = bytearray(plen)
    stamp = recv(sock, memoryview(payload)) or stamp
    t_last = clock()
    t_kernel = realtime_to_monotonic(stamp) if kernel_stamps else None
    # The last segment may have waited in the socket long before this process
    # read it (that wait is what the stamp exposes), but never arrived after
    # the read: a stamp outside that window is from a stepped clock; drop it.
    if t_kernel is not None and not t_last - 600_000_000_000 <= t_kernel <= t_last + 1_000_000:
        t_kernel = None
    return Frame(header, payload, t_first, t_last, PREFIX.size + hlen + plen, t_kernel)


def no_payload(header: Mapping[str, Any], plen: int) -> None:
    """Admit rule of frames that never carry a payload (hello, ping, begin, fetch...)."""
    if plen:
        kind = header.get("kind", header.get("op"))
        raise FrameError(f"a {shorten(kind)} frame carries no payload, "
                         f"this one declares {plen} bytes")


def admit_data_frame(header: Mapping[str, Any], plen: int) -> None:
    """Admit rule of frames on an authenticated data link, both directions.

    ``tensors``/``result`` carry exactly what their descriptors add up to (checked
    here, before the payload is allocated); ``part`` carries a model part; every
    other kind carries nothing.
    """
    kind = header.get("kind")
    if kind in ("tensors", "result"):
        declared = sum(d.nbytes for d in parse_descs(header.get("tensors")))
        if "udp" in header:  # the payload travels as datagrams (nodes.udp): none here
            no_payload(header, plen)
        elif declared != plen:
            raise FrameError(f"{kind} frame: descriptors add up to {declared} bytes, "
                             f"payload declares {plen}")
    elif kind not in DATA_PAYLOAD_KINDS:
        no_payload(header, plen)


def shorten(value: Any, limit: int = 40) -> str:
    """A bounded repr of a peer-supplied value for error messages (repr escapes
    surrogates and control characters, so the message always encodes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- control plane

def request_header(op: str, token: str, **args: Any) -> dict[str, Any]:
    """The header of a control request: operation, run token, arguments."""
    return {"op": op, "token": token, "args": args}


def valid_token(token: Any) -> bool:
    """A usable run token: 1..MAX_TOKEN_CHARS printable ASCII characters, no spaces."""
    return (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS
            and token.isascii() and token.isprintable() and " " not in token)


def check_token(header: Mapping[str, Any], token: str) -> None:
    """Refuse a request whose token is missing or wrong (constant-time compare).

    The given token is checked to be a plausible token *before* it is encoded: a
    lone surrogate (``"\\ud800"`` is legal JSON) would otherwise raise
    UnicodeEncodeError instead of a refusal.
    """
    given = header.get("token")
    if not valid_token(given) or not hmac.compare_digest(given.encode(), token.encode()):
        raise FrameError("request refused: missing or wrong run token")


def parse_request(header: Mapping[str, Any], token: str) -> tuple[str, dict[str, Any]]:
    """(op, args) of a control request after the token check."""
    check_token(header, token)
    op, args = header.get("op"), header.get("args", {})
    if not isinstance(op, str) or not isinstance(args, dict):
        raise FrameError("request needs 'op' (string) and 'args' (object)")
    return op, args


def admit_request(token: str) -> Admit:
    """Admit rule of control requests: the token first, then what the op may carry.

    Only ``PAYLOAD_OPS`` carry a payload; ``set_inputs`` and ``profile_layers``
    announce its exact size in their arguments (``sets[].payload_bytes``, ``sizes``),
    which must add up to the declared length. All of this happens before the payload
    is allocated, so neither a stranger nor a confused client makes the agent buffer
    bytes it would refuse anyway.
    """
    def admit(header: dict[str, Any], plen: int) -> None:
        op, args = parse_request(header, token)
        if op not in PAYLOAD_OPS:
            no_payload(header, plen)
            return
        announced = _announced_payload(op, args)
        if announced is not None and announced != plen:
            raise FrameError(f"{op}: arguments announce {announced} payload bytes, "
                             f"frame declares {plen}")
    return admit


def _announced_payload(op: str, args: Mapping[str, Any]) -> int | None:
    if op == "profile_layers":
        sizes = args.get("sizes")
    elif op == "set_inputs":
        sets = args.get("sets")
        sizes = ([s.get("payload_bytes") if isinstance(s, dict) else None for s in sets]
                 if isinstance(sets, list) else None)
    else:
        return None  # load_part / stage_part: a part, up to MAX_PAYLOAD_BYTES
    if not isinstance(sizes, list) or not all(_is_int(n) and n >= 0 for n in sizes):
        raise FrameError(f"{op}: payload sizes must be a list of non-negative ints")
    return sum(sizes)


def ok_header(result: Any = None) -> dict[str, Any]:
    return {"ok": True, "result": result}


#: A result whose JSON is larger than this travels in the payload (``ok_reply``).
INLINE_RESULT_BYTES = MAX_HEADER_BYTES // 2


def ok_reply(result: Any, buffers: Sequence[Buffer] = ()) -> tuple[dict[str, Any], list[Buffer]]:
    """Header and payload of a successful reply.

    A result too large for a header (2,000 sample rows of ``run`` are ~1 MB of JSON)
    travels as JSON in the payload instead, announced by ``result_bytes``; a reply
    that already carries buffers must keep its result small. Raises ValueError or
    TypeError when the result is not JSON (NaN included), FrameError when too large.
    """
    text = json.dumps(result, separators=(",", ":"), allow_nan=False).encode()
    if len(text) <= INLINE_RESULT_BYTES:
        return ok_header(result), list(buffers)
    if buffers or len(text) > MAX_PAYLOAD_BYTES:
        raise FrameError(f"reply of {len(text)} bytes of JSON is too large")
    return {"ok": True, "result_bytes": len(text)}, [text]


def reply_result(frame: Frame) -> tuple[Any, bytearray]:
    """(result, payload) of an ok reply, wherever the result travelled (``ok_reply``)."""
    n = frame.header.get("result_bytes")
    if n is None:
        return frame.header.get("result"), frame.payload
    if not _is_int(n) or n != len(frame.payload):
        raise FrameError(f"reply announces {shorten(n)} result bytes, carries {len(frame.payload)}")
    return parse_json(frame.payload, "result"), bytearray()


def error_header(message: str, kind: str = "node") -> dict[str, Any]:
    """A refusal; ``kind`` is ``protocol`` (bad frame/token) or ``node`` (op failed)."""
    return {"ok": False, "kind": kind, "error": message}


def split_blobs(payload: Buffer, sizes: Any) -> list[memoryview]:
    """Cut a payload into the blobs a header's ``sizes`` list announces."""
    view = memoryview(payload).cast("B")
    if (not isinstance(sizes, list) or not all(_is_int(s) and s >= 0 for s in sizes)
            or sum(sizes) != view.nbytes):
        raise FrameError("'sizes' must list non-negative ints adding up to the payload")
    out, off = [], 0
    for s in sizes:
        out.append(view[off:off + s])
        off += s
    return out


# --------------------------------------------------------------------------- data-link handshake

NONCE_BYTES = 32
#: Handshake frames are tiny; a stranger on the data port gets no more header than this.
HANDSHAKE_HEADER_BYTES = 4096
_MAC_LABEL = b"splitbed data link v1 "


def _proof(token: str, side: bytes, nonce_local: bytes, nonce_remote: bytes) -> str:
    # The side label keeps one side's proof from being replayed as the other's.
    msg = _MAC_LABEL + side + b" " + nonce_local + nonce_remote
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def _nonce(header: Mapping[str, Any]) -> bytes:
    text = header.get("nonce")
    if not isinstance(text, str) or len(text) != 2 * NONCE_BYTES:
        raise FrameError(f"{shorten(header.get('kind'))} needs a {NONCE_BYTES}-byte hex nonce")
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise FrameError(f"nonce is not hex: {e}") from e


def _expect(sock: socket.socket, kind: str) -> dict[str, Any]:
    """The next handshake frame; it must be ``kind`` and carry no payload."""
    header = recv_frame(sock, admit=no_payload, max_header=HANDSHAKE_HEADER_BYTES).header
    got = header.get("kind")
    if got == "error":
        raise FrameError(f"peer refused the handshake: {shorten(header.get('error'), 200)}")
    if got != kind:
        raise FrameError(f"data-link handshake: expected {kind!r}, got {shorten(got)}")
    return header


def data_handshake_local(sock: socket.socket, token: str) -> dict[str, Any]:
    """The local (connecting) side of the data-link handshake; returns the remote's
    ``welcome`` header (its node name and clock identity).

    The token itself never crosses the link: each side proves it knows it with an
    HMAC over both sides' fresh nonces. The remote proves first, so nothing derived
    from the token goes to a peer that has not shown it knows it. Raises FrameError
    when the peer does not prove it, or breaks the exchange.
    """
    nonce_local = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, {"kind": "hello", "nonce": nonce_local.hex()})
    challenge = _expect(sock, "challenge")
    nonce_remote = _nonce(challenge)
    proof = challenge.get("proof")
    if not isinstance(proof, str) or not hmac.compare_digest(
            proof.encode("ascii", "replace"),
            _proof(token, b"remote", nonce_local, nonce_remote).encode()):
        raise FrameError("the peer did not prove it knows the run token; "
                         "nothing was sent to it")
    send_frame(sock, {"kind": "auth", "proof": _proof(token, b"local", nonce_local, nonce_remote)})
    return _expect(sock, "welcome")


def data_handshake_remote(sock: socket.socket, token: str, welcome: Mapping[str, Any]) -> None:
    """The remote (accepting) side: answers ``hello`` with a challenge carrying its
    own proof, checks the local's proof, then sends ``welcome`` (with ``welcome``'s
    fields). Every handshake frame carries no payload. Raises FrameError on a wrong
    proof or a frame out of turn; the caller answers with an error and closes.
    """
    hello = recv_frame(sock, admit=no_payload, max_header=HANDSHAKE_HEADER_BYTES).header
    if hello.get("kind") != "hello":
        raise FrameError(f"first data frame must be 'hello', not {shorten(hello.get('kind'))}")
    nonce_local = _nonce(hello)
    nonce_remote = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, {"kind": "challenge", "nonce": nonce_remote.hex(),
                      "proof": _proof(token, b"remote", nonce_local, nonce_remote)})
    auth = _expect(sock, "auth")
    proof = auth.get("proof")
    if not isinstance(proof, str) or not hmac.compare_digest(
            proof.encode("ascii", "replace"),
            _proof(token, b"local", nonce_local, nonce_remote).encode()):
        raise FrameError("data link refused: the peer did not prove it knows the run token")
    send_frame(sock, {**welcome, "kind": "welcome"})
