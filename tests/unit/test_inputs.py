"""Input images arrive at the model's shape, dtype and value range, deterministically."""

import numpy as np
import pytest
from PIL import Image

from testbed.errors import ConfigError
from testbed.inputs import folder_images, synthetic_images

pytestmark = pytest.mark.unit


def test_synthetic_images_are_deterministic_and_in_range():
    a = synthetic_images((1, 33, 17, 3), "float32", 3, seed=4)
    b = synthetic_images((1, 33, 17, 3), "float32", 3, seed=4)
    assert len(a) == 3 and all(x.shape == (1, 33, 17, 3) and x.dtype == np.float32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1])
    assert min(x.min() for x in a) >= -1.0 and max(x.max() for x in a) <= 1.0
    assert synthetic_images((1, 8, 8, 3), "uint8", 1)[0].dtype == np.uint8


def test_folder_images_are_resized_to_the_model_input(tmp_path):
    Image.new("RGB", (640, 480), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("L", (10, 10), 0).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    imgs = folder_images(tmp_path, (1, 257, 257, 3), "float32", 10)
    assert len(imgs) == 2 and all(x.shape == (1, 257, 257, 3) for x in imgs)
    assert np.allclose(imgs[0], -1.0)                       # a.jpg: black
    assert np.allclose(imgs[1][..., 0], 1.0) and np.allclose(imgs[1][..., 1], -1.0)  # b.png: red


def test_folder_without_images_and_non_image_models_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        folder_images(tmp_path, (1, 8, 8, 3), "float32", 1)
    with pytest.raises(ConfigError, match="NHWC"):
        synthetic_images((1, 100), "float32", 1)


def _png_claiming(tmp_path, width: int, height: int):
    """A tiny PNG whose header claims ``width`` x ``height`` (decoding it would allocate that)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]                                   # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    return path


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    import warnings

    from testbed.errors import ConfigError
    from testbed.inputs import folder_images, open_image

    _png_claiming(tmp_path, 30_000, 30_000)              # 900 M: Pillow's own bomb error (not an OSError)
    with pytest.raises(ConfigError, match="decompression bomb"):
        open_image(tmp_path / "bomb.png")
    _png_claiming(tmp_path, 10_000, 10_000)              # 100 M: only a warning from Pillow
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # and no warning on stderr beside the one error line
        with pytest.raises(ConfigError, match="at most 64000000 are decoded"):
            open_image(tmp_path / "bomb.png")
    with pytest.raises(ConfigError, match="bomb.png"):
        folder_images(tmp_path, (1, 8, 8, 3), "float32", 1)


def test_a_fifo_among_the_images_is_refused_not_opened(tmp_path):
    import os

    from testbed.errors import ConfigError
    from testbed.inputs import folder_images

    os.mkfifo(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="a FIFO"):
        folder_images(tmp_path, (1, 8, 8, 3), "float32", 1)

