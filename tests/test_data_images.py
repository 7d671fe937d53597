"""Safe image loading: every mode becomes RGB, EXIF orientation is applied, bad files fail clearly."""

import numpy as np
import pytest
from PIL import Image

from data.images import ImageLoadError, UnsafePathError, load_image, resolve_image_path


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (200, 0, 0, 255)   # opaque red
    pixels[0, 1] = (200, 0, 0, 0)     # fully transparent
    pixels[1, 0] = (0, 0, 200, 128)   # half transparent blue
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    out = np.asarray(image).astype(int)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    expected = np.round(np.array([0, 0, 200]) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(out[1, 0] - expected).max() <= 1


def test_la_palette_and_grey_modes(tmp_path):
    Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), "LA").save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png")).tolist() == [[[255, 255, 255], [10, 10, 10]]]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[0, 255, 0], [0, 0, 255]]]
    palette.save(tmp_path / "p_transparent.png", transparency=0)
    assert np.asarray(load_image(tmp_path / "p_transparent.png")).tolist() == [[[255, 255, 255], [0, 0, 255]]]

    Image.fromarray(np.array([[0, 77]], dtype=np.uint8), "L").save(tmp_path / "l.png")
    assert np.asarray(load_image(tmp_path / "l.png")).tolist() == [[[0, 0, 0], [77, 77, 77]]]


def test_sixteen_bit_grey_is_rescaled(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    red = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert red.shape == (4, 4, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high, red pixel at the top left
    pixels[0, 0] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.png", exif=exif.tobytes())
    upright = np.asarray(load_image(tmp_path / "rotated.png"))
    assert upright.shape == (4, 2, 3)
    assert upright[0, 1].tolist() == [255, 0, 0]  # top left moves to the top right


def test_bad_files_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    for name in ("truncated.png", "garbage.png", "missing.png"):
        with pytest.raises(ImageLoadError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "full.png", max_pixels=64 * 63)
    assert load_image(tmp_path / "full.png", max_pixels=64 * 64).size == (64, 64)


def test_paths_cannot_leave_the_root(tmp_path):
    assert resolve_image_path(tmp_path, "sub/a.png") == tmp_path / "sub" / "a.png"
    for bad in ("../a.png", "sub/../../a.png", "/etc/passwd", "C:\\images\\a.png", "\\\\server\\a.png", ""):
        with pytest.raises(UnsafePathError):
            resolve_image_path(tmp_path, bad)
