"""Prediction figures: image | ground truth | each model's prediction, as one PNG."""

from typing import Dict, Tuple

import jax
import numpy as np
from PIL import Image

from semijax.data import image_io, pipeline


def prediction_grid(images: np.ndarray, labels: np.ndarray, predictions: Dict[str, np.ndarray],
                    palette: np.ndarray, *, scale: int = 1) -> np.ndarray:
  """Rows of [image, ground truth, prediction per model], `[R*H, (2+M)*W, 3]` uint8."""
  rows = []
  for i in range(len(images)):
    tiles = [images[i], image_io.colorize(labels[i], palette)]
    tiles += [image_io.colorize(p[i], palette) for p in predictions.values()]
    sep = np.full((images.shape[1], 2, 3), 255, np.uint8)
    rows.append(np.concatenate([np.concatenate([t, sep], 1) for t in tiles], 1))
  grid = np.concatenate(rows, 0)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
  return grid


def save_prediction_figure(path: str, run, models: Dict[str, Tuple], *, num: int = 8) -> str:
  """Writes the first `num` val images with ground truth and each model's prediction.

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
  Image.fromarray(grid).save(path)
  return path
