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
