"""A generated custom-folder dataset, to try the "own data" path before pointing it at yours.

`write_example_folder(root)` writes a small 3-class texture dataset in exactly the layout that
`semijax.data.folder` reads (README, "Train on your own data"):

    root/dataset.json            class_names, ignore_index, palette, splits.val
    root/images/tex_0000.png     RGB scenes of 3 textures (stripes, checks, speckles)
    root/masks/tex_0000.png      palette PNGs: class ids 0..2, 255 on an unannotated border
    root/unlabeled/tex_u000.png  images without masks

Every class is a real texture (none of them is background, so `background_class` is left out),
every mask has a 2-pixel unannotated border (hence `"ignore_index": 255`), and the val images
are listed in `splits.val`, so a fraction split (`split=1/8`) draws its labeled images from the
rest. Deterministic for a seed; ~1 s for the default 384 images.

    python -m experiments.prepare_data example --root data/textures
"""

import json
import os
from typing import Dict

import numpy as np

from semijax.data import image_io

CLASS_NAMES = ("stripes", "checks", "speckles")
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200)], np.uint8)
BORDER = 2  # unannotated (ignore) border of every mask, in pixels


def _texture(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """`[size, size, 3]` float32 in [0, 1]: one texture with a random phase, scale and tint."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  if kind == 0:    # oriented stripes
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(5, 9)
    value = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period
                               + rng.uniform(0, 2 * np.pi))
  elif kind == 1:  # checkerboard
    cell = int(rng.integers(4, 8))
    oy, ox = rng.integers(0, cell, 2)
    value = (((yy + oy) // cell + (xx + ox) // cell) % 2).astype(np.float32)
  else:            # speckle noise, lightly smoothed
    noise = rng.random((size + 2, size + 2)).astype(np.float32)
    value = sum(noise[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9
    value = np.clip((value - 0.5) * 4 + 0.5, 0, 1)
  tint = rng.uniform(0.35, 1.0, 3).astype(np.float32)
  base = rng.uniform(0.0, 0.3, 3).astype(np.float32)
  return base + value[..., None] * tint * (1 - base)


def _layout(size: int, rng: np.random.Generator) -> np.ndarray:
  """`[size, size]` class ids: a random background texture with 1-3 blobs of others."""
  label = np.full((size, size), rng.integers(0, 3), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size]
  for _ in range(int(rng.integers(1, 4))):
    cy, cx = rng.uniform(0, size, 2)
    ry, rx = rng.uniform(size / 8, size / 3, 2)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    label[u * u + v * v <= 1] = rng.integers(0, 3)
  return label


def make_scene(size: int, rng: np.random.Generator):
  """One scene: `(image uint8 [size, size, 3], label uint8 [size, size])` with an ignore border."""
  label = _layout(size, rng)
  image = np.zeros((size, size, 3), np.float32)
  for k in range(3):
    region = label == k
    if region.any():
      image[region] = _texture(k, size, rng)[region]
  image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
  label[:BORDER], label[-BORDER:], label[:, :BORDER], label[:, -BORDER:] = 255, 255, 255, 255
  return (image * 255).round().astype(np.uint8), label


def write_example_folder(root: str, *, num_images: int = 320, num_val: int = 64,
                         num_unlabeled: int = 64, size: int = 64, seed: int = 0) -> Dict:
  """Writes the example dataset into `root` (created; existing files are overwritten).

  Args:
    root: the dataset folder.
    num_images: images with masks (`images/` + `masks/`), the val images included.
    num_val: how many of them `dataset.json` lists in `splits.val`.
    num_unlabeled: images without masks (`unlabeled/`).
    size: image side in pixels.
    seed: generator seed.

  Returns:
    `{'root', 'num_images', 'num_val', 'num_unlabeled', 'class_names'}`.
  """
  if not 0 < num_val < num_images:
    raise ValueError(f"num_val={num_val} must be in 1..num_images-1 ({num_images - 1})")
  rng = np.random.default_rng(seed)
  stems = [f"tex_{i:04d}" for i in range(num_images)]
  for stem in stems:
    image, label = make_scene(size, rng)
    image_io.write_image(os.path.join(root, "images", stem + ".png"), image)
    image_io.write_label(os.path.join(root, "masks", stem + ".png"), label, PALETTE)
  for i in range(num_unlabeled):
    image, _ = make_scene(size, rng)
    image_io.write_image(os.path.join(root, "unlabeled", f"tex_u{i:03d}.png"), image)
  val = sorted(rng.choice(stems, size=num_val, replace=False).tolist())
  meta = {"name": "textures", "class_names": list(CLASS_NAMES), "ignore_index": 255,
          "palette": PALETTE.tolist(), "splits": {"val": val},
          "description": "semijax example: 3 textures, 2-pixel unannotated border"}
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return {"root": root, "num_images": num_images, "num_val": num_val,
          "num_unlabeled": num_unlabeled, "class_names": CLASS_NAMES}
