"""Input images for a sweep, already at the model's input shape and dtype.

Owns turning ``input:`` of an experiment into a list of arrays: deterministic
synthetic images (smooth gradients plus noise, so PNG/JPEG encodings of the k=0
input have realistic sizes instead of compressing white noise or a flat field)
or every image of a folder, resized to the model input with Pillow. This is the
scenario's pre-processing: it happens here, before any timing starts. Sending
the arrays to the local node is the agent client's job.

Image files are user input: each must be a regular file of bounded size (a FIFO
named ``a.png`` hung the run) and at most ``MAX_PIXELS`` pixels (Pillow raises
its own DecompressionBombError, not an OSError, beyond twice its default).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from testbed.errors import ConfigError

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
MAX_IMAGE_BYTES = 64 << 20
MAX_PIXELS = 64_000_000    # an 8K photo is 33 M; decoding a larger one can take GiBs


def image_files(folder: str | Path) -> list[Path]:
    """Every file of ``folder`` with an image suffix, sorted by name (not opened)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def open_image(path: Path) -> "Any":
    """A Pillow image (header read only) of a regular, bounded file. Raises ConfigError."""
    from PIL import Image, UnidentifiedImageError

    from testbed.config import check_regular_file

    check_regular_file(path, MAX_IMAGE_BYTES, "an input image")
    try:
        with warnings.catch_warnings():
            # Pillow warns (stderr noise) between 89 M and 179 M pixels; MAX_PIXELS decides here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ConfigError(f"cannot read image: {e}", file=str(path)) from e
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise ConfigError(f"image is {im.width}x{im.height} pixels; at most {MAX_PIXELS} are decoded",
                          file=str(path))
    return im


def _layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(height, width, channels) of an NHWC image input."""
    if len(shape) != 4 or shape[0] != 1 or shape[3] not in (1, 3, 4):
        raise ConfigError(f"model input shape {shape} is not one NHWC image; use a model with an image input")
    return shape[1], shape[2], shape[3]


def _to_model_range(img: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 HWC pixels → the model's input dtype. Float models (PoseNet) take
    [-1, 1] (MobileNet's (x - 127.5) / 127.5); integer models take the pixels."""
    if np.dtype(dtype).kind == "f":
        return ((img.astype(np.float32) - 127.5) / 127.5).astype(dtype)
    return img.astype(dtype)


def synthetic_images(shape: tuple[int, ...], dtype: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` deterministic images of ``shape`` (1, H, W, C)."""
    h, w, c = _layout(tuple(shape))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(count):
        base = np.empty((h, w, c), np.float32)
        for ch in range(c):
            fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            base[..., ch] = 127.5 + 100 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + phase)
        base += rng.normal(0, 12, size=base.shape)
        img = np.clip(base, 0, 255).astype(np.uint8)
        out.append(_to_model_range(img, dtype)[None, ...])
    return out


def folder_images(folder: str | Path, shape: tuple[int, ...], dtype: str, count: int) -> list[np.ndarray]:
    """The first ``count`` images of ``folder`` (sorted by name), resized to the
    model input. Raises ConfigError when the folder holds no readable image."""
    from PIL import Image

    h, w, c = _layout(tuple(shape))
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    out = []
    for path in image_files(folder)[:count]:
        try:
            with open_image(path) as im:
                img = np.asarray(im.convert(mode).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
        except (OSError, Image.DecompressionBombError) as e:
            raise ConfigError(f"cannot read image: {e}", file=str(path)) from e
        out.append(_to_model_range(img.reshape(h, w, c), dtype)[None, ...])
    if not out:
        raise ConfigError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {folder}")
    return out
