"""Codecs of the intermediate data: chains such as ``fp16+zstd:3`` applied per cut tensor.

A chain is at most one *lossy* stage followed by at most one *lossless compressor*,
joined by ``+`` (``raw`` alone means neither):

==================  ===========================================================================
``fp16``            float tensors as IEEE half floats (non-float tensors pass unchanged)
``int8``            affine per tensor: ``q = round((x - lo) / s) - 128``, ``s = (hi - lo) / 255``;
                    ``lo`` and ``s`` travel in the descriptor's ``params``
``int8-per-channel`` the same per channel of the last axis (NHWC: per feature map); the
                    ``lo`` and ``s`` vectors travel as float32 in front of the codes (a header
                    holding 1,024 channels of JSON floats would not fit the 64 KiB header bound)
``zstd[:level]``    Zstandard (``zstandard``), level 1..22, default 3
``lz4``             LZ4 block format (``lz4``)
==================  ===========================================================================

Encoding runs where the tensor is produced, decoding where it is consumed; the
descriptor's ``params`` (``q`` for the lossy stage's numbers, ``mid`` for the size
the compressor was given) let the consumer check every size *before* it
decompresses: a compressed blob that claims to expand beyond the tensor it
describes is refused, not inflated (no decompression bombs). The compressors
are maintained libraries, imported when a chain first needs them, so an agent
that only ever sees ``raw`` runs without them.

This module owns the chains, their parsing (``parse_chain``, also what the
experiment schema checks ``codec:`` with) and the registry the data plane looks
codecs up in (``CodecRegistry``). Framing is ``nodes.protocol``'s; the image
codecs of the k = 0 input are ``nodes.codecs``'.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from nodes.protocol import RAW, Buffer, Codec, FrameError, TensorDesc

LOSSY = ("fp16", "int8", "int8-per-channel")
COMPRESSORS = ("zstd", "lz4")
LOSSLESS_CHAINS = ("raw", "zstd", "lz4")  # examples; any chain without a lossy stage is lossless
ZSTD_DEFAULT_LEVEL = 3
_STAGE = re.compile(r"(fp16|int8-per-channel|int8|lz4|zstd)(?::([0-9]{1,2}))?")
#: Chain names parsed from peers' headers are cached; the cache is bounded.
_MAX_CACHED = 64


@dataclass(frozen=True)
class Chain:
    """A parsed chain: the lossy stage (or None), the compressor (or None) and its level."""

    lossy: str | None
    compressor: str | None
    level: int | None = None

    @property
    def name(self) -> str:
        parts = [self.lossy] if self.lossy else []
        if self.compressor == "zstd":
            parts.append("zstd" if self.level in (None, ZSTD_DEFAULT_LEVEL) else f"zstd:{self.level}")
        elif self.compressor:
            parts.append(self.compressor)
        return "+".join(parts) or "raw"

    @property
    def lossless(self) -> bool:
        return self.lossy is None


def parse_chain(text: str) -> Chain:
    """``"int8+zstd:9"`` -> Chain; raises ValueError saying what is allowed."""
    if not isinstance(text, str) or not text or len(text) > 64:
        raise ValueError("a codec is a short string such as 'raw', 'fp16+zstd' or 'int8+lz4'")
    if text == "raw":
        return Chain(None, None)
    lossy = compressor = None
    level = None
    for i, piece in enumerate(text.split("+")):
        m = _STAGE.fullmatch(piece.strip())
        if not m:
            raise ValueError(f"unknown codec stage {piece!r}: expected one of {', '.join(LOSSY)}, "
                             "zstd[:level], lz4 (joined by '+')")
        stage, lv = m.group(1), m.group(2)
        if stage in LOSSY:
            if i != 0 or lossy is not None:
                raise ValueError(f"{text!r}: the lossy stage ({stage}) must come first, and only one")
            lossy = stage
        else:
            if compressor is not None:
                raise ValueError(f"{text!r}: at most one compressor (zstd or lz4), last")
            compressor = stage
        if lv is not None:
            if stage != "zstd":
                raise ValueError(f"{text!r}: only zstd takes a level")
            level = int(lv)
            if not 1 <= level <= 22:
                raise ValueError(f"{text!r}: zstd level must be 1..22")
        elif stage == "zstd":
            level = ZSTD_DEFAULT_LEVEL
    return Chain(lossy, compressor, level)


# --------------------------------------------------------------------------- lossy stages

def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f"


def _affine(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of float32 ``x`` for ranges ``[lo, hi]`` (scalars or per last axis).

    All in float32 and in place: a float64 scale would promote the whole tensor."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    scale = np.where(hi > lo, (hi - lo) / np.float32(255), np.float32(1)).astype(np.float32)
    t = np.subtract(x, lo, dtype=np.float32)
    t *= np.float32(1) / scale
    np.rint(t, out=t)
    np.clip(t, 0, 255, out=t)
    t -= np.float32(128)
    return t.astype(np.int8), scale


def _lossy_encode(kind: str, arr: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Array -> (the array the compressor sees, params). Non-float arrays pass unchanged."""
    if not _is_float(arr.dtype) or arr.size == 0 or (arr.ndim == 0 and kind == "int8-per-channel"):
        return arr, {"q": "none"}
    if kind == "fp16":
        return arr.astype(np.float16), {}
    x = arr.astype(np.float32, copy=False)
    if kind == "int8":
        lo, hi = x.min(), x.max()
        q, scale = _affine(x, lo, hi)
        return q, {"lo": float(lo), "scale": float(scale)}
    lo_v, hi_v = x.min(axis=tuple(range(x.ndim - 1))), x.max(axis=tuple(range(x.ndim - 1)))
    q, scale = _affine(x, lo_v, hi_v)
    side = np.concatenate([lo_v.astype(np.float32), np.asarray(scale, np.float32)])
    return np.concatenate([side.view(np.int8), q.reshape(-1)]), {"channels": int(x.shape[-1])}


def _mid_nbytes(kind: str | None, desc: TensorDesc, params: Mapping[str, Any]) -> int:
    """Bytes the lossy stage produced for ``desc`` (what the compressor was given)."""
    n = math.prod(desc.shape)
    if kind is None or params.get("q") == "none" or not _is_float(np.dtype(desc.dtype)) or n == 0:
        return desc.raw_nbytes
    if kind == "fp16":
        return 2 * n
    if kind == "int8":
        return n
    return n + 8 * (desc.shape[-1] if desc.shape else 1)


def _num(params: Mapping[str, Any], key: str) -> float:
    v = params.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise FrameError(f"codec parameter {key!r} missing or not a finite number")
    return float(v)


def _lossy_decode(kind: str | None, data: memoryview, desc: TensorDesc, params: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(desc.dtype)
    if kind is None or params.get("q") == "none" or not _is_float(dtype) or math.prod(desc.shape) == 0:
        return np.frombuffer(data, dtype=dtype).reshape(desc.shape)
    if kind == "fp16":
        return np.frombuffer(data, dtype=np.float16).astype(dtype).reshape(desc.shape)
    if kind == "int8":
        scale, lo = np.float32(_num(params, "scale")), np.float32(_num(params, "lo"))
        return _dequantise(np.frombuffer(data, dtype=np.int8), scale, lo).astype(dtype, copy=False) \
            .reshape(desc.shape)
    c = desc.shape[-1]
    if params.get("channels") != c:
        raise FrameError(f"int8-per-channel: {params.get('channels')!r} channels for shape {list(desc.shape)}")
    side = np.frombuffer(data[:8 * c], dtype=np.float32)
    q = np.frombuffer(data[8 * c:], dtype=np.int8).reshape(-1, c)
    return _dequantise(q, side[c:], side[:c]).astype(dtype, copy=False).reshape(desc.shape)


def _dequantise(q: np.ndarray, scale: Any, lo: Any) -> np.ndarray:
    """``(q + 128) * scale + lo`` in float32, in place."""
    t = q.astype(np.float32)
    t += np.float32(128)
    t *= scale
    t += lo
    return t


# --------------------------------------------------------------------------- compressors

def _compress(chain: Chain, data: Buffer) -> Buffer:
    if chain.compressor == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=chain.level or ZSTD_DEFAULT_LEVEL).compress(data)
    if chain.compressor == "lz4":
        import lz4.block
        return lz4.block.compress(data, store_size=False)
    return data


def _decompress(chain: Chain, data: memoryview, expect: int) -> memoryview:
    """Decompress to exactly ``expect`` bytes, never more (refused otherwise)."""
    if chain.compressor is None:
        out: Any = data
    elif chain.compressor == "zstd":
        import zstandard
        params = zstandard.get_frame_parameters(data)
        if params.content_size not in (expect, zstandard.CONTENTSIZE_UNKNOWN):
            raise FrameError(f"zstd frame claims {params.content_size} bytes, descriptor implies {expect}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expect)
    else:
        import lz4.block
        out = lz4.block.decompress(data, uncompressed_size=expect) if expect else b""
    view = memoryview(out).cast("B")
    if view.nbytes != expect:
        raise FrameError(f"{chain.compressor or 'payload'} gave {view.nbytes} bytes, expected {expect}")
    return view


# --------------------------------------------------------------------------- codecs

def make_codec(chain: Chain) -> Codec:
    """The ``nodes.protocol.Codec`` of one chain (``raw`` is protocol's zero-copy one)."""
    if chain.lossy is None and chain.compressor is None:
        return RAW

    def encode(array: np.ndarray) -> tuple[list[Buffer], dict[str, Any]]:
        arr = np.ascontiguousarray(array)
        mid, params = _lossy_encode(chain.lossy, arr) if chain.lossy else (arr, {})
        mid = np.ascontiguousarray(mid)
        params["mid"] = mid.nbytes
        data = memoryview(mid).cast("B") if mid.size else memoryview(b"")
        return [_compress(chain, data)], params

    def decode(view: memoryview, desc: TensorDesc) -> np.ndarray:
        expect = _mid_nbytes(chain.lossy, desc, desc.params)
        if desc.params.get("mid") != expect:
            raise FrameError(f"{chain.name}: params say {desc.params.get('mid')!r} bytes before "
                             f"compression, the shape implies {expect}")
        mid = _decompress(chain, view, expect)
        return _lossy_decode(chain.lossy, mid, desc, desc.params)

    return Codec(chain.name, encode, decode)


class CodecRegistry(Mapping[str, Codec]):
    """Every codec a peer understands: fixed ones (raw, png, jpeg) plus any chain,
    built the first time its name is looked up (names parse or are refused)."""

    def __init__(self, fixed: Iterable[Codec] = ()) -> None:
        self._fixed: dict[str, Codec] = {RAW.name: RAW, **{c.name: c for c in fixed}}
        self._chains: dict[str, Codec] = {}

    def __getitem__(self, name: str) -> Codec:
        if name in self._fixed:
            return self._fixed[name]
        codec = self._chains.get(name)
        if codec is None:
            try:
                chain = parse_chain(name)
            except ValueError:
                raise KeyError(name) from None
            codec = make_codec(chain)
            if len(self._chains) < _MAX_CACHED:
                self._chains[name] = codec
        return codec

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._fixed)

    def __len__(self) -> int:
        return len(self._fixed)


def round_trip(array: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Encode and decode one array through chain ``name``; returns (decoded, wire bytes).

    For tests and benchmarks: the data plane calls the same encode/decode."""
    codec = make_codec(parse_chain(name))
    bufs, params = codec.encode(array)
    blob = b"".join(bytes(memoryview(b).cast("B")) for b in bufs) if len(bufs) != 1 else bufs[0]
    view = memoryview(blob).cast("B")
    desc = TensorDesc("t", array.dtype.name, tuple(array.shape), codec.name, view.nbytes, params)
    return codec.decode(view, desc), view.nbytes

