"""Image codecs for the k = 0 anchor: the input image crosses the uplink as PNG or JPEG.

``input_encoding: png | jpeg`` (Pillow) compresses the model input before the uplink;
the encoding time counts in ``encode_s`` and decoding in ``remote_decode_s``.

Trap: PNG and JPEG store 8-bit pixels. A float input (PoseNet takes float32 in about
[-1, 1]) is first quantised to uint8 with the tensor's own min/max, carried in the
descriptor's ``params`` (``lo``, ``hi``), and dequantised on the remote as
``lo + q * (hi - lo) / 255``. So with a float input even PNG is lossy (at most
(hi - lo) / 510 per element), and the tail's outputs are close to, not bitwise equal to,
the raw anchor. A uint8 input goes through untouched (PNG then lossless).
Only image-shaped tensors qualify: ``(H, W, C)`` or ``(1, H, W, C)`` with C in 1, 3, 4
(JPEG: 1 or 3).

Pillow is imported lazily so an agent that never sees these codecs doesn't need it.
This module owns only the two codecs; framing is in ``nodes.protocol``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from nodes.protocol import Codec, FrameError, TensorDesc

_JPEG_QUALITY = 90


def _image_view(array: np.ndarray, channels: tuple[int, ...]) -> np.ndarray:
    shape = array.shape
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or shape[2] not in channels:
        raise FrameError(f"tensor of shape {list(array.shape)} is not an image "
                         f"(H, W, C) with C in {channels}")
    return array.reshape(shape)


def _quantise(img: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    if img.dtype == np.uint8:
        return img, {}
    if img.dtype.kind != "f":
        raise FrameError(f"image codecs take uint8 or float tensors, not {img.dtype}")
    lo, hi = float(img.min()), float(img.max())
    scale = (hi - lo) / 255.0 or 1.0
    q = np.clip(np.rint((img - lo) / scale), 0, 255).astype(np.uint8)
    return q, {"lo": lo, "hi": hi}


def _dequantise(q: np.ndarray, desc: TensorDesc) -> np.ndarray:
    if desc.dtype == "uint8":
        return q.reshape(desc.shape)
    lo, hi = float(desc.params.get("lo", 0.0)), float(desc.params.get("hi", 255.0))
    scale = (hi - lo) / 255.0 or 1.0
    return (lo + q.astype(np.float64) * scale).astype(desc.dtype).reshape(desc.shape)


def _make(fmt: str, channels: tuple[int, ...]) -> Codec:
    name = fmt.lower()

    def encode(array: np.ndarray) -> tuple[list[Any], dict[str, Any]]:
        from PIL import Image
        q, params = _quantise(_image_view(np.asarray(array), channels))
        if q.shape[2] == 1:
            q = q[:, :, 0]
        buf = io.BytesIO()
        kwargs = {"quality": _JPEG_QUALITY} if fmt == "JPEG" else {"compress_level": 6}
        Image.fromarray(q).save(buf, format=fmt, **kwargs)
        return [buf.getbuffer()], params

    def decode(view: memoryview, desc: TensorDesc) -> np.ndarray:
        from PIL import Image
        with Image.open(io.BytesIO(view)) as im:
            # Open reads the header only: check the pixel count against the
            # descriptor before decoding, so a few bytes claiming a huge image
            # (a decompression bomb) are refused, not decoded.
            pixels = im.size[0] * im.size[1] * len(im.getbands())
            if pixels != math.prod(desc.shape):
                raise FrameError(f"{name} image of {im.size[0]}x{im.size[1]}x"
                                 f"{len(im.getbands())} does not fit {list(desc.shape)}")
            q = np.asarray(im)
        if q.ndim == 2:
            q = q[:, :, None]
        if q.size != int(np.prod(desc.shape)):
            raise FrameError(f"{name} image of shape {list(q.shape)} does not fit {list(desc.shape)}")
        return _dequantise(q, desc)

    return Codec(name, encode, decode)


PNG = _make("PNG", (1, 3, 4))
JPEG = _make("JPEG", (1, 3))
IMAGE_CODECS = (PNG, JPEG)
