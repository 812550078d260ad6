"""Reading and writing the image and label files of segmentation datasets.

Every failure (missing file, truncated or corrupt file, unexpected image mode, image/label size
mismatch) raises `DataError` with the file's path and what was expected, so that a bad file is
named the moment it is met, whether in `experiments/prepare_data.py` or in a grain worker.

Label files hold class ids directly:

- palette PNGs (mode `P`, PASCAL VOC `SegmentationClass`): the palette *indices* are the ids; the
  colours are only for display and are never looked at;
- 8-bit gray PNGs (mode `L`: SBD-converted `SegmentationClassAug`, Cityscapes
  `*_labelTrainIds.png`): the gray values are the ids;
- 1-bit PNGs (mode `1`): 0 and 1;
- colour-coded RGB masks are read only when the caller passes the palette that decodes them
  (`rgb_palette`); without it they are an error, since reading an RGB mask as gray silently
  produces garbage ids.
"""

import io
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from semijax.data.errors import IGNORE_INDEX, DataError

PathLike = Union[str, os.PathLike]

# Colour given to ignore (255) pixels when no palette entry covers them; it is the colour of
# index 255 in the PASCAL VOC palette (the "void" border).
IGNORE_COLOUR = (224, 224, 192)

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_IMAGE_MODES_TO_RGB = ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1", "PA", "RGBX")
_LABEL_INDEX_MODES = ("P", "L", "1")


def _open(source: Union[PathLike, bytes], where: str) -> Image.Image:
  """Opens and fully decodes an image file (or its bytes); raises `DataError` naming `where`."""
  if isinstance(source, (bytes, bytearray)):
    stream = io.BytesIO(source)
  else:
    if not os.path.exists(source):
      raise DataError(f"{where}: file not found")
    if not os.path.isfile(source):
      raise DataError(f"{where}: not a regular file")
    stream = source
  try:
    img = Image.open(stream)
    img.load()  # decode now, so truncated files fail here rather than later
  except _DECODE_ERRORS as e:
    raise DataError(f"{where}: cannot decode image file ({type(e).__name__}: {e}); the file is "
                    f"corrupt, truncated or not an image") from e
  return img


def read_image(path: PathLike, *, data: Optional[bytes] = None) -> np.ndarray:
  """Reads an RGB image (JPEG/PNG/...), converting gray, palette and RGBA images to RGB.

  Args:
    path: the image file. With `data`, only used to name the file in errors.
    data: optional encoded bytes of the file (e.g. from an array_record), read instead of `path`.

  Returns:
    `[H, W, 3]` uint8.

  Raises:
    DataError: the file is missing, unreadable, or not an 8-bit image (16-bit and float images
      are refused rather than silently clipped).
  """
  where = os.fspath(path)
  img = _open(path if data is None else data, where)
  if img.mode not in _IMAGE_MODES_TO_RGB:
    raise DataError(f"{where}: image mode {img.mode!r} is not an 8-bit image; expected RGB, gray "
                    f"(L), palette (P) or RGBA; convert 16-bit or float images to 8-bit first")
  if img.mode != "RGB":
    img = img.convert("RGB")  # RGBA: alpha dropped; L/P/1: replicated or looked up
  return np.asarray(img, dtype=np.uint8)


def _colour_codes(colours: np.ndarray) -> np.ndarray:
  """`[..., 3]` uint8 colours -> `[...]` int64 codes `R << 16 | G << 8 | B`."""
  colours = np.asarray(colours).astype(np.int64)
  return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]


def rgb_to_label(rgb: np.ndarray, palette: np.ndarray, where: str,
                 ignore_colour: Optional[Sequence[int]] = None) -> np.ndarray:
  """Decodes a colour-coded mask: the pixel of colour `palette[c]` gets id `c`.

  Args:
    rgb: `[H, W, 3]` uint8 colour mask.
    palette: `[C, 3]` uint8 colours, one per class (must be distinct).
    where: name of the file, for errors.
    ignore_colour: optional colour that maps to 255.

  Returns:
    `[H, W]` uint8 ids.

  Raises:
    DataError: a pixel has a colour that is neither a class colour nor `ignore_colour`.
  """
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  codes = _colour_codes(rgb)
  keys = _colour_codes(palette)
  if len(np.unique(keys)) != len(keys):
    raise DataError(f"{where}: the palette has repeated colours, so RGB masks cannot be decoded")
  ids = np.arange(len(keys))
  if ignore_colour is not None:
    c = tuple(int(v) for v in ignore_colour)
    keys = np.append(keys, (c[0] << 16) | (c[1] << 8) | c[2])
    ids = np.append(ids, IGNORE_INDEX)
  order = np.argsort(keys)
  keys, ids = keys[order], ids[order]
  pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
  unknown = keys[pos] != codes
  if unknown.any():
    bad = np.unique(codes[unknown])[:5]
    colours = [((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255) for v in bad]
    raise DataError(f"{where}: {int(unknown.sum())} pixels have colours {colours} that are not in "
                    f"the palette ({len(palette)} classes)")
  return ids[pos].astype(np.uint8)


def read_label(path: PathLike, *, data: Optional[bytes] = None,
               rgb_palette: Optional[np.ndarray] = None,
               lut: Optional[np.ndarray] = None) -> np.ndarray:
  """Reads a label map: palette PNG indices, 8-bit gray values or 1-bit values are the class ids.

  Args:
    path: the label file. With `data`, only used to name the file in errors.
    data: optional encoded bytes, read instead of `path`.
    rgb_palette: `[C, 3]` colours; when given, RGB masks are decoded with `rgb_to_label`
      (otherwise an RGB mask is an error).
    lut: optional `[256]` uint8 lookup table applied to the raw ids (e.g. Cityscapes
      labelIds -> trainIds, or a custom dataset's ignore value -> 255).

  Returns:
    `[H, W]` uint8 ids (not yet range-checked: see `sources.check_label`).

  Raises:
    DataError: missing or unreadable file, or a mode that does not hold ids.
  """
  where = os.fspath(path)
  img = _open(path if data is None else data, where)
  if img.mode in _LABEL_INDEX_MODES:
    label = np.asarray(img, dtype=np.uint8)  # P: palette indices; 1: bool -> 0/1
  elif img.mode in ("I", "I;16", "I;16B", "I;16L") and rgb_palette is None:
    raw = np.asarray(img)
    if raw.size and (raw.min() < 0 or raw.max() > 255):
      raise DataError(f"{where}: 16/32-bit label map has values up to {int(raw.max())}; expected "
                      f"8-bit class ids (palette or gray PNG)")
    label = raw.astype(np.uint8)
  elif img.mode in ("RGB", "RGBA") and rgb_palette is not None:
    label = rgb_to_label(np.asarray(img.convert("RGB")), rgb_palette, where, IGNORE_COLOUR)
  elif img.mode in ("RGB", "RGBA"):
    raise DataError(f"{where}: label is a colour ({img.mode}) image; expected a palette (P) or "
                    f"8-bit gray (L) PNG whose values are class ids. If the colours encode the "
                    f"classes, give the palette (e.g. `mask_format: rgb` in dataset.json)")
  else:
    raise DataError(f"{where}: label mode {img.mode!r}; expected a palette (P) or 8-bit gray (L) "
                    f"PNG whose values are class ids")
  if lut is not None:
    label = np.asarray(lut, np.uint8)[label]
  return label


def read_pair(image_path: PathLike, label_path: PathLike, *,
              rgb_palette: Optional[np.ndarray] = None,
              lut: Optional[np.ndarray] = None) -> tuple:
  """Reads an image and its label and checks that their sizes match.

  Returns:
    `(image [H, W, 3] uint8, label [H, W] uint8)`.

  Raises:
    DataError: either file fails to read, or the sizes differ (both files named).
  """
  image = read_image(image_path)
  label = read_label(label_path, rgb_palette=rgb_palette, lut=lut)
  check_same_size(image, label, image_path, label_path)
  return image, label


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: PathLike,
                    label_path: PathLike) -> None:
  """Raises `DataError` naming both files if `image` `[H, W, 3]` and `label` `[H, W]` differ."""
  if image.shape[:2] != label.shape[:2]:
    raise DataError(f"{os.fspath(label_path)}: label size {label.shape[1]}x{label.shape[0]} (WxH) "
                    f"does not match image {os.fspath(image_path)} size "
                    f"{image.shape[1]}x{image.shape[0]}")


def image_size(path: PathLike) -> tuple:
  """Returns `(width, height)` from the file header without decoding the pixels.

  Raises:
    DataError: the file is missing or its header cannot be read.
  """
  where = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{where}: file not found")
  try:
    with Image.open(path) as img:
      return img.size
  except _DECODE_ERRORS as e:
    raise DataError(f"{where}: cannot read image header ({type(e).__name__}: {e})") from e


def _full_palette(palette: np.ndarray, ignore_colour: Sequence[int]) -> list:
  """A 256-entry flat PIL palette: class colours, then black, with 255 = `ignore_colour`."""
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  full = np.zeros((256, 3), np.uint8)
  n = min(len(palette), 256)
  full[:n] = palette[:n]
  if n < 256:
    full[255] = ignore_colour
  return full.reshape(-1).tolist()


def write_label(path: PathLike, label: np.ndarray, palette: Optional[np.ndarray] = None,
                ignore_colour: Sequence[int] = IGNORE_COLOUR) -> None:
  """Writes a label map as a PNG whose pixel values are the class ids.

  Args:
    path: output `.png` (parent folders are created).
    label: `[H, W]` integer ids in `[0, 256)`.
    palette: optional `[C, 3]` (or `[256, 3]`) colours: a palette PNG is written, which viewers
      show in colour and `read_label` reads back as ids. Without it, an 8-bit gray PNG.
    ignore_colour: colour of index 255 when `palette` has fewer than 256 entries.
  """
  label = np.asarray(label)
  if label.ndim != 2:
    raise DataError(f"{os.fspath(path)}: label map must be 2-D [H, W], got shape {label.shape}")
  if label.size and (label.min() < 0 or label.max() > 255):
    raise DataError(f"{os.fspath(path)}: label values must fit in 8 bits, got "
                    f"[{label.min()}, {label.max()}]")
  img = Image.fromarray(label.astype(np.uint8))  # mode L
  if palette is not None:
    img.putpalette(_full_palette(palette, ignore_colour))  # L -> P, pixel values kept as indices
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path, format="PNG")


def encode_png(array: np.ndarray) -> bytes:
  """Encodes an `[H, W]` or `[H, W, 3]` uint8 array as lossless PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def colorize(label: np.ndarray, palette: np.ndarray,
             ignore_colour: Sequence[int] = IGNORE_COLOUR) -> np.ndarray:
  """Maps `[H, W]` ids to `[H, W, 3]` uint8 colours; ids past the palette get `ignore_colour`."""
  lut = np.asarray(_full_palette(palette, ignore_colour), np.uint8).reshape(256, 3)
  return lut[np.asarray(label, np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, *, alpha: float = 0.5,
            ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Blends a colourised label map over an image; ignore pixels show the plain image.

  Args:
    image: `[H, W, 3]` uint8.
    label: `[H, W]` ids.
    palette: `[C, 3]` colours.
    alpha: weight of the label colour.
    ignore_index: id left uncoloured.

  Returns:
    `[H, W, 3]` uint8.
  """
  image = np.asarray(image, np.uint8)
  label = np.asarray(label)
  if image.shape[:2] != label.shape:
    raise DataError(f"overlay: image {image.shape[:2]} and label {label.shape} sizes differ")
  colour = colorize(label, palette).astype(np.float32)
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colour
  out = np.where((label == ignore_index)[..., None], image.astype(np.float32), blend)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def write_image(path: PathLike, image: np.ndarray, quality: int = 95) -> None:
  """Writes an `[H, W, 3]` uint8 image; the format follows the extension (`.png`, `.jpg`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = Image.fromarray(np.asarray(image, np.uint8))
  if os.fspath(path).lower().endswith((".jpg", ".jpeg")):
    img.save(path, quality=quality, subsampling=0)  # 4:4:4: no chroma blur on masks overlays
  else:
    img.save(path)
