"""Image and mask reading: conversions, EXIF rotation, bad files, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fsdiff.errors import FsdiffError
from fsdiff.io import atomic_path, read_image, read_label, read_mask, write_image


def test_rgb_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (2, 2, 3)
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_sixteen_bit_scaled_to_eight(tmp_path):
    g16 = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    # 65535 -> 255, 32768 -> round(32768 * 255 / 65535) = 128, 257 -> 1
    np.testing.assert_array_equal(out[..., 0], np.array([[0, 255], [128, 1]], np.uint8))


def test_exif_rotation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # landscape 20x10, left half bright
    arr[:, :10] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (20, 10, 3)  # displayed as portrait
    # the bright left half ends up on top after a clockwise rotation
    assert out[:10].mean() > 200 and out[10:].mean() < 50


def test_truncated_jpeg_gives_clear_error(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(FsdiffError, match=r"cut\.jpg.*truncated or corrupt"):
        read_image(tmp_path / "cut.jpg")


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "x.jpg").write_text("hello")
    with pytest.raises(FsdiffError, match=r"x\.jpg.*not an image"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(FsdiffError, match=r"not found: .*nope\.png"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 255], [0, 1]),
        ([0, 1], [0, 1]),
        ([0, 1, 255], [0, 1, 255]),
    ],
)
def test_binary_masks(tmp_path, values, expected):
    m = np.array([values], np.uint8)
    Image.fromarray(m, mode="L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), np.array([expected], np.uint8))


def _palette_png(path, arr):
    img = Image.fromarray(arr.astype(np.uint8), mode="P")
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192])
    img.save(path)


def test_palette_mask_needs_a_class(tmp_path):
    arr = np.array([[0, 15, 15], [255, 3, 0]])
    _palette_png(tmp_path / "p.png", arr)
    with pytest.raises(FsdiffError, match=r"p\.png.*class-index or palette.*class_value=N"):
        read_mask(tmp_path / "p.png")
    out = read_mask(tmp_path / "p.png", class_value=15)
    np.testing.assert_array_equal(out, np.array([[0, 1, 1], [255, 0, 0]], np.uint8))
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), arr)


def test_colour_mask_needs_a_colour(tmp_path):
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[0, 0] = (128, 0, 0)
    Image.fromarray(arr).save(tmp_path / "c.png")
    with pytest.raises(FsdiffError, match="colour-coded"):
        read_mask(tmp_path / "c.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png", class_value=(128, 0, 0)), [[1, 0], [0, 0]])


def test_sixteen_bit_binary_mask(tmp_path):
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m16.png"), [[0, 1]])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_image(target, np.zeros((2, 2), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
