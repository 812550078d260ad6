"""Image and label file reading/writing: modes, palettes, and errors that name the file."""

import os

import numpy as np
import pytest
from PIL import Image

from semijax.data import image_io, voc
from semijax.data.sources import DataError

from . import fixtures


def test_read_image_converts_modes_to_rgb(tmp_path):
  rgb = fixtures.random_image("x")
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
  Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)).save(
      tmp_path / "rgba.png")
  np.testing.assert_array_equal(image_io.read_image(tmp_path / "rgb.png"), rgb)
  gray = image_io.read_image(tmp_path / "gray.png")
  assert gray.shape == rgb.shape and gray.dtype == np.uint8
  np.testing.assert_array_equal(gray, np.repeat(rgb[..., :1], 3, -1))
  np.testing.assert_array_equal(image_io.read_image(tmp_path / "rgba.png"), rgb)


def test_read_image_jpeg(tmp_path):
  rgb = fixtures.random_image("j")
  image_io.write_image(tmp_path / "a.jpg", rgb)
  out = image_io.read_image(tmp_path / "a.jpg")
  assert out.shape == rgb.shape and out.dtype == np.uint8
  assert np.abs(out.astype(int) - rgb).mean() < 12  # lossy, but the same picture


def test_voc_palette_png_reads_indices_not_colours(tmp_path):
  label = np.array([[0, 1, 15], [20, 255, 0]], np.uint8)
  image_io.write_label(tmp_path / "l.png", label, voc.voc_palette())
  img = Image.open(tmp_path / "l.png")
  assert img.mode == "P"
  assert tuple(img.convert("RGB").getpixel((2, 0))) == (192, 128, 128)  # person colour
  np.testing.assert_array_equal(image_io.read_label(tmp_path / "l.png"), label)


def test_gray_and_one_bit_labels(tmp_path):
  label = np.array([[0, 18, 255]], np.uint8)
  image_io.write_label(tmp_path / "g.png", label)
  np.testing.assert_array_equal(image_io.read_label(tmp_path / "g.png"), label)
  Image.fromarray(np.array([[0, 1, 1]], bool)).save(tmp_path / "b.png")
  np.testing.assert_array_equal(image_io.read_label(tmp_path / "b.png"), [[0, 1, 1]])


def test_label_lut(tmp_path):
  image_io.write_label(tmp_path / "g.png", np.array([[7, 8, 0]], np.uint8))
  lut = np.full(256, 255, np.uint8)
  lut[7], lut[8] = 0, 1
  np.testing.assert_array_equal(image_io.read_label(tmp_path / "g.png", lut=lut), [[0, 1, 255]])


def test_rgb_label_is_refused_without_palette_and_decoded_with_it(tmp_path):
  palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
  ids = np.array([[0, 1], [2, 1]], np.uint8)
  rgb = palette[ids]
  rgb[0, 0] = image_io.IGNORE_COLOUR
  Image.fromarray(rgb).save(tmp_path / "c.png")
  with pytest.raises(DataError, match=r"c\.png.*colour"):
    image_io.read_label(tmp_path / "c.png")
  out = image_io.read_label(tmp_path / "c.png", rgb_palette=palette)
  np.testing.assert_array_equal(out, [[255, 1], [2, 1]])
  rgb[1, 1] = (1, 2, 3)
  Image.fromarray(rgb).save(tmp_path / "d.png")
  with pytest.raises(DataError, match=r"d\.png.*\(1, 2, 3\)"):
    image_io.read_label(tmp_path / "d.png", rgb_palette=palette)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_and_corrupt_files_name_the_file(tmp_path, ext):
  path = tmp_path / f"img.{ext}"
  image_io.write_image(path, fixtures.random_image("t", (64, 64)))
  size = os.path.getsize(path)
  fixtures.corrupt(path, keep=size // 2)
  with pytest.raises(DataError, match=rf"img\.{ext}.*(truncated|corrupt)"):
    image_io.read_image(path)
  path.write_bytes(b"this is not an image")
  with pytest.raises(DataError, match=rf"img\.{ext}: cannot decode"):
    image_io.read_image(path)


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(DataError, match=r"nope\.png: file not found"):
    image_io.read_label(tmp_path / "nope.png")
  with pytest.raises(DataError, match="not a regular file"):
    image_io.read_image(tmp_path)
  with pytest.raises(DataError, match="nope.png: file not found"):
    image_io.image_size(tmp_path / "nope.png")


def test_sixteen_bit_image_refused_and_label_range_checked(tmp_path):
  Image.fromarray(np.array([[0, 4000]], np.uint16)).save(tmp_path / "d.png")
  with pytest.raises(DataError, match=r"d\.png.*8-bit"):
    image_io.read_image(tmp_path / "d.png")
  with pytest.raises(DataError, match=r"d\.png.*4000"):
    image_io.read_label(tmp_path / "d.png")
  Image.fromarray(np.array([[0, 19]], np.uint16)).save(tmp_path / "ok.png")
  np.testing.assert_array_equal(image_io.read_label(tmp_path / "ok.png"), [[0, 19]])


def test_read_pair_size_mismatch_names_both_files(tmp_path):
  image_io.write_image(tmp_path / "a.png", fixtures.random_image("a", (10, 12)))
  image_io.write_label(tmp_path / "a_label.png", np.zeros((10, 11), np.uint8))
  with pytest.raises(DataError, match=r"a_label\.png: label size 11x10.*a\.png size 12x10"):
    image_io.read_pair(tmp_path / "a.png", tmp_path / "a_label.png")
  assert image_io.image_size(tmp_path / "a.png") == (12, 10)


def test_decode_from_bytes():
  label = np.array([[1, 2], [3, 255]], np.uint8)
  data = image_io.encode_png(label)
  np.testing.assert_array_equal(image_io.read_label("mem", data=data), label)
  with pytest.raises(DataError, match="record7"):
    image_io.read_image("record7", data=b"garbage")


def test_colorize_and_overlay():
  palette = voc.voc_palette(21)
  label = np.array([[0, 1], [15, 255]], np.uint8)
  colour = image_io.colorize(label, palette)
  assert colour.shape == (2, 2, 3)
  np.testing.assert_array_equal(colour[0, 1], [128, 0, 0])
  np.testing.assert_array_equal(colour[1, 1], image_io.IGNORE_COLOUR)
  image = np.full((2, 2, 3), 100, np.uint8)
  out = image_io.overlay(image, label, palette, alpha=0.5)
  np.testing.assert_array_equal(out[1, 1], [100, 100, 100])  # ignore: image unchanged
  np.testing.assert_array_equal(out[0, 1], [114, 50, 50])
  with pytest.raises(DataError):
    image_io.overlay(image, label[:1], palette)


def test_write_label_rejects_bad_maps(tmp_path):
  with pytest.raises(DataError, match="2-D"):
    image_io.write_label(tmp_path / "x.png", np.zeros((2, 2, 3)))
  with pytest.raises(DataError, match="8 bits"):
    image_io.write_label(tmp_path / "x.png", np.array([[300]]))
