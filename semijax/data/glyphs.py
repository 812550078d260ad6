"""The pretraining source of the embedded benchmark: typeset characters on other photographs.

The papers start from an ImageNet-pretrained backbone: a classifier trained on a large
labelled source whose images are not in the benchmark. This module is that source for the
embedded digits (`semijax.data.embedded`), built, like it, from files that ship inside
packages, and disjoint from it:

* **Characters** 0-9, A-Z, a-z (62 classes) typeset in the font bundled with Pillow
  (`ImageFont.load_default`), with random weight (stroke width), rotation, shear, aspect and
  a smooth elastic warp, then digitised the way the UCI optdigits scans behind scikit-learn's
  digits were (a 32x32 bitmap, summed over 4x4 blocks into an 8x8 grid of counts 0..16).
  No handwritten digit scan is used.
* **Backgrounds** from scikit-image photographs that the benchmark never uses (retina, cell,
  microaneurysms, horse, logo, faces of `lfw_subset`, the Shepp-Logan phantom) and from
  procedural textures.

Scenes are then painted exactly as the benchmark's (`embedded.paint_scenes`): the same
canvas, sizes, blur, contrast and ink, so the source differs from the target in its
characters and photographs, not in how they were imaged, as ImageNet and VOC photographs
share cameras but not images. Deterministic: the same config gives the same arrays.
"""

import dataclasses
import functools
import string
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semijax import extras
from semijax.data import embedded

CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase
# Photographs of scikit-image that `embedded` does not paint on (checked by a test).
SOURCE_PHOTOS = ("retina", "cell", "microaneurysms", "horse", "logo", "shepp_logan_phantom")


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
  """How the pretraining scenes are drawn."""
  num_scenes: int = 40000                 # scenes in the pretraining set
  glyphs_per_class: int = 120             # distinct rendered variants per character
  font_size: Tuple[int, int] = (22, 30)   # Pillow font size range before digitising
  stroke_width: Tuple[int, int] = (0, 1)  # extra stroke weight (pixels), inclusive
  max_rotation: float = 15.0              # degrees
  max_shear: float = 0.3
  elastic_alpha: float = 0.8              # elastic warp amplitude (pixels at 32x32)
  num_textures: int = 24                  # procedural backgrounds added to the photographs
  seed: int = 0


def _bitmap(char: str, cfg: GlyphConfig, rng: np.random.Generator) -> np.ndarray:
  """One character as a 32x32 binary bitmap (UCI optdigits: scaled into the box)."""
  font = ImageFont.load_default(size=int(rng.integers(cfg.font_size[0], cfg.font_size[1] + 1)))
  canvas = Image.new("L", (64, 64), 0)
  stroke = int(rng.integers(cfg.stroke_width[0], cfg.stroke_width[1] + 1))
  ImageDraw.Draw(canvas).text((32, 32), char, fill=255, font=font, anchor="mm",
                              stroke_width=stroke, stroke_fill=255)
  angle = np.deg2rad(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
  shear = rng.uniform(-cfg.max_shear, cfg.max_shear)
  aspect = np.exp(rng.uniform(-0.2, 0.2))
  # Inverse affine map about the centre (PIL's `transform` takes output -> input).
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  fwd = rot @ np.array([[aspect, shear], [0.0, 1.0 / aspect]])
  inv = np.linalg.inv(fwd)
  offset = np.array([32.0, 32.0]) - inv @ np.array([32.0, 32.0])
  canvas = canvas.transform((64, 64), Image.AFFINE,
                            (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]),
                            resample=Image.BILINEAR)
  ink = np.asarray(canvas, np.float32) / 255.0
  # A smooth random displacement field: the wobble of a hand-drawn stroke.
  if cfg.elastic_alpha > 0:
    coarse = rng.normal(0.0, 1.0, (2, 5, 5)).astype(np.float32)
    field = [np.asarray(Image.fromarray(c).resize((64, 64), Image.BICUBIC)) for c in coarse]
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    ys = np.clip(np.round(yy + 2 * cfg.elastic_alpha * field[0]), 0, 63).astype(int)
    xs = np.clip(np.round(xx + 2 * cfg.elastic_alpha * field[1]), 0, 63).astype(int)
    ink = ink[ys, xs]
  on = ink > 0.5
  ys, xs = np.nonzero(on)
  if ys.size == 0:
    return np.zeros((32, 32), bool)
  crop = on[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  # Scale the bounding box into 32x32 keeping the aspect ratio, centred (as optdigits).
  h, w = crop.shape
  scale = 32.0 / max(h, w)
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  img = Image.fromarray(crop.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)
  out = np.zeros((32, 32), bool)
  y0, x0 = (32 - nh) // 2, (32 - nw) // 2
  out[y0:y0 + nh, x0:x0 + nw] = np.asarray(img) > 127
  return out


def render_glyphs(cfg: GlyphConfig = GlyphConfig()) -> Tuple[np.ndarray, np.ndarray]:
  """Digitised characters as scikit-learn's digits: `[N, 8, 8]` float counts 0..16, labels.

  Returns:
    `(glyphs [62 * glyphs_per_class, 8, 8] float32, labels int32)`, label = index in
    `CHARACTERS`.
  """
  rng = np.random.default_rng([cfg.seed, 1])
  glyphs, labels = [], []
  for label, char in enumerate(CHARACTERS):
    for _ in range(cfg.glyphs_per_class):
      bitmap = _bitmap(char, cfg, rng)
      glyphs.append(bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.float32))
      labels.append(label)
  return np.stack(glyphs), np.asarray(labels, np.int32)


def _textures(num: int, rng: np.random.Generator) -> list:
  """Procedural backgrounds: smooth noise at a few scales, stripes and checks, in colour."""
  out = []
  for i in range(num):
    size = 256
    kind = i % 3
    if kind == 0:   # multi-scale smooth noise
      img = np.zeros((size, size), np.float32)
      for cells in (4, 16, 64):
        coarse = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
        img += np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
      img = (img - img.min()) / max(np.ptp(img), 1e-6)
    else:           # stripes (kind 1) or checks (kind 2) at a random angle and period
      yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
      theta, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
      u = xx * np.cos(theta) + yy * np.sin(theta)
      img = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
      if kind == 2:
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        img = img * (0.5 + 0.5 * np.sin(2 * np.pi * v / period))
    tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    out.append(img[..., None] * tint + (1 - tint) * rng.uniform(0, 1))
  return out


def source_photos(num_textures: int, seed: int) -> list:
  """The backgrounds: `SOURCE_PHOTOS` (and the 200 `lfw_subset` faces tiled) plus textures."""
  skimage_data = extras.require("skimage.data", "scikit-image", "embedded",
                                "the glyph pretraining data (its photographs ship in scikit-image)")
  photos = []
  for name in SOURCE_PHOTOS:
    im = getattr(skimage_data, name)()
    im = im.astype(np.float32) / (255.0 if im.dtype == np.uint8 else max(float(im.max()), 1.0))
    if im.ndim == 2:
      im = np.repeat(im[..., None], 3, axis=-1)
    photos.append(im[..., :3])
  faces = skimage_data.lfw_subset().astype(np.float32)   # [200, 25, 25] in [0, 1]
  mosaic = faces[:196].reshape(14, 14, 25, 25).transpose(0, 2, 1, 3).reshape(350, 350)
  photos.append(np.repeat(mosaic[..., None], 3, axis=-1))
  photos += _textures(num_textures, np.random.default_rng([seed, 2]))
  return photos


@functools.lru_cache(maxsize=2)
def generate(cfg: GlyphConfig = GlyphConfig(),
             scene: embedded.SceneConfig = embedded.SceneConfig()) -> dict:
  """The pretraining set: `{'images': uint8 [N, S, S, 3], 'labels': int32 [N]}`.

  `scene` fixes the painting (canvas, sizes, blur, contrast, ink) and must be the
  benchmark's, so the source is imaged like the target. One character per scene; its
  label is the image's class (a classification source, as ImageNet).
  """
  glyphs, labels = render_glyphs(cfg)
  photos = source_photos(cfg.num_textures, cfg.seed)
  one = dataclasses.replace(scene, digits_per_scene=(1, 1))
  # Both halves of every photograph: `paint_scenes` crops from the half it is given.
  photos = photos + [p[:, ::-1] for p in photos]
  rng = np.random.default_rng([cfg.seed, 3])
  images, masks = embedded.paint_scenes(cfg.num_scenes, photos, 0, glyphs, labels, one, rng)
  # The class of a scene is the label painted on it (mask value - 1), read back so that a
  # glyph too faint to label anything is class -1 and dropped.
  present = masks.reshape(len(masks), -1).max(axis=1).astype(np.int32) - 1
  keep = present >= 0
  return {"images": images[keep], "labels": present[keep]}
