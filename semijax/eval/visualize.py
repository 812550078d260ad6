"""Prediction figures: image | ground truth | each model's prediction, as one PNG.

Each column is headed by its name ("image", "ground truth", then the models: "teacher",
"student"), drawn with Pillow's built-in font, so no font file or matplotlib is needed.
"""

from typing import Dict, Sequence, Tuple

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semijax.data import image_io, pipeline


def prediction_grid(images: np.ndarray, labels: np.ndarray, predictions: Dict[str, np.ndarray],
                    palette: np.ndarray, *, scale: int = 1) -> np.ndarray:
  """Rows of [image, ground truth, prediction per model], `[R*H, (2+M)*W, 3]` uint8."""
  rows = []
  for i in range(len(images)):
    tiles = [images[i], image_io.colorize(labels[i], palette)]
    tiles += [image_io.colorize(p[i], palette) for p in predictions.values()]
    sep = np.full((images.shape[1], SEPARATOR, 3), 255, np.uint8)
    rows.append(np.concatenate([np.concatenate([t, sep], 1) for t in tiles], 1))
  grid = np.concatenate(rows, 0)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
  return grid


SEPARATOR = 2   # white pixels after every tile (before scaling)
HEADER_HEIGHT = 18


def _font(size: int):
  """Pillow's default font at `size` px (a bitmap font on Pillow builds without FreeType)."""
  try:
    return ImageFont.load_default(size=size)
  except TypeError:   # Pillow < 10.1: no size argument
    return ImageFont.load_default()


def add_column_headers(grid: np.ndarray, titles: Sequence[str], column_width: int, *,
                       height: int = HEADER_HEIGHT) -> np.ndarray:
  """Puts a white band with one centred title per column above `grid`.

  Args:
    grid: `[H, W, 3]` uint8 figure whose columns are `column_width` pixels wide.
    titles: one title per column, left to right.
    column_width: width of a column in pixels (tile plus separator).
    height: band height in pixels.

  Returns:
    `[height + H, W, 3]` uint8. The font shrinks (to 8 px) until every title fits its column;
    a title still too wide is shortened with "...".
  """
  band = Image.new("RGB", (grid.shape[1], height), (255, 255, 255))
  draw = ImageDraw.Draw(band)
  size = max(8, height - 6)
  font = _font(size)
  # The largest font (down to 8 px) at which every title fits its column.
  while size > 8 and max(draw.textlength(str(t), font=font) for t in titles) > column_width - 4:
    size -= 1
    font = _font(size)
  for i, title in enumerate(titles):
    text = str(title)
    while len(text) > 1 and draw.textlength(text, font=font) > column_width - 4:
      text = text[:-2] + "\u2026" if len(text) > 2 else text[:1]
    width = draw.textlength(text, font=font)
    x = i * column_width + max(0, (column_width - SEPARATOR - width) / 2)
    draw.text((x, 2), text, fill=(0, 0, 0), font=font)
  return np.concatenate([np.asarray(band), grid], 0)


def column_titles(model_names: Sequence[str]) -> list:
  """`['image', 'ground truth', *model_names]`: the columns of `prediction_grid`."""
  return ["image", "ground truth"] + list(model_names)


def save_prediction_figure(path: str, run, models: Dict[str, Tuple], *, num: int = 8) -> str:
  """Writes the first `num` val images with ground truth and each model's prediction, under a
  header naming each column.

  Args:
    path: PNG file to write.
    run: a `loop.Run` (model, val source, palette, eval protocol).
    models: `{name: (params, batch_stats)}`, e.g. teacher and student.
    num: number of val images.
  """
  batch = next(pipeline.eval_batches(
      run.data.val, global_batch=max(num, 1),
      size=tuple(run.config.data.eval_size) if run.config.data.eval_size else None))
  images = batch["image"].astype(np.float32) / 255.0
  predictions = {}
  for name, (params, batch_stats) in models.items():
    logits = run.predict({"params": params, "batch_stats": batch_stats}, images)
    predictions[name] = np.asarray(jax.device_get(logits.argmax(-1)))
  scale = max(1, 96 // batch["image"].shape[1])
  grid = prediction_grid(batch["image"], batch["label"], predictions, run.info.palette,
                         scale=scale)
  grid = add_column_headers(grid, column_titles(predictions),
                            (batch["image"].shape[2] + SEPARATOR) * scale)
  Image.fromarray(grid).save(path)
  return path
