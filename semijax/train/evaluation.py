"""Evaluating a finished (or running) workdir: restore a checkpoint, score teacher and student."""

import json
import os
from typing import Any, Dict, Optional, Union

import ml_collections

from semijax import checkpoint
from semijax.train import loop


def _tuples(x):
  """JSON turns tuples into lists; configs (and flax module fields) want tuples back."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (`workdir/config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a semijax run directory?")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def restore(workdir: str, step: Union[str, int] = "best", config=None):
  """`(run, state, step)` for a workdir's checkpoint ('best', 'latest' or a number)."""
  config = config or load_config(workdir)
  run = loop.Run(config, workdir)
  # Read-only: the workdir may belong to a run still training (whose save in progress a
  # writable Checkpointer would delete as unfinished).
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  if step == "best":
    chosen = ckpt.best_step() or ckpt.latest_step()
  elif step == "latest":
    chosen = ckpt.latest_step()
  else:
    chosen = int(step)
  if chosen is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  state, _, _ = ckpt.restore(chosen, run.init_state(), run.meta())
  ckpt.manager.close()
  return run, state, chosen


def evaluate_workdir(workdir: str, *, step: Union[str, int] = "best", mode: Optional[str] = None,
                     window: Optional[int] = None, stride: Optional[int] = None,
                     crop: Optional[int] = None, verbose: bool = True) -> Dict[str, Any]:
  """Scores teacher and student of a checkpoint; prints and returns a small table."""
  config = load_config(workdir)
  with config.unlocked():
    if mode:
      config.eval.mode = mode
    if window:
      config.eval.window = window
    if stride:
      config.eval.stride = stride
    if crop:
      config.eval.crop = crop
  run, state, chosen = restore(workdir, step, config)
  out = {"step": chosen}
  for name, (params, stats) in {"teacher": (state.ema_params, state.ema_batch_stats),
                                "student": (state.params, state.batch_stats)}.items():
    res = run.evaluate(params, stats)
    out[name] = {"miou": res["miou"] * 100, "mode": res["mode"],
                 "per_class_iou": [float(x) * 100 for x in res["per_class_iou"]]}
  if verbose:
    print(f"{workdir} @ step {chosen}, {out['teacher']['mode']}")
    print(f"{'model':<8} {'mIoU':>6}")
    for name in ("teacher", "student"):
      print(f"{name:<8} {out[name]['miou']:6.2f}")
    names = run.info.class_names
    print("per-class IoU (teacher): " + ", ".join(
        f"{n}={v:.1f}" for n, v in zip(names, out["teacher"]["per_class_iou"])))
  return out


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def predict_folder(workdir: str, images_dir: str, out_dir: str, *, step: Union[str, int] = "best",
                   model: str = "teacher", window: Optional[int] = None,
                   stride: Optional[int] = None, max_side: Optional[int] = None) -> Dict[str, Any]:
  """Segments every image of a folder with a trained run.

  For each image `NAME.ext` writes `out_dir/NAME.png` (raw class ids, palette PNG) and
  `out_dir/NAME_overlay.jpg` (colour overlay). Images larger than `window` (default: the
  run's training crop when the image exceeds it by more than 2x, else whole-image) are
  processed with overlapping sliding windows (stride default 2/3 of the window).

  Returns:
    `{'images': n, 'out_dir': ..., 'mode': ...}`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from semijax.data import image_io  # pylint: disable=g-import-not-at-top
  from semijax.eval import inference  # pylint: disable=g-import-not-at-top

  names = sorted(f for f in os.listdir(images_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
  run, state, chosen = restore(workdir, step)
  params, stats = ((state.ema_params, state.ema_batch_stats) if model == "teacher"
                   else (state.params, state.batch_stats))
  variables = {"params": params, "batch_stats": stats}
  crop = run.config.data.crop_size
  predict_whole = jax.jit(lambda v, x: run.logits_fn(v, x).argmax(-1))

  def sliding(v, x, win, st):
    logits = inference.predict_sliding_window(lambda im: run.logits_fn(v, im), x, window=win,
                                              stride=st, num_classes=run.info.num_classes)
    return logits.argmax(-1)
  predict_sliding = jax.jit(sliding, static_argnums=(2, 3))

  os.makedirs(out_dir, exist_ok=True)
  modes = set()
  for name in names:
    image = image_io.read_image(os.path.join(images_dir, name))
    x = image[None].astype(np.float32) / 255.0
    win = window or (crop if max(image.shape[:2]) > 2 * crop else None)
    if max_side and max(image.shape[:2]) > max_side and not win:
      win = max_side
    if win:
      st = stride or None
      pred = predict_sliding(variables, x, (win, win), (st, st) if st else None)
      modes.add(f"sliding_window({win}x{win})")
    else:
      pred = predict_whole(variables, x)
      modes.add("whole")
    label = np.asarray(jax.device_get(pred[0])).astype(np.uint8)
    stem = os.path.splitext(name)[0]
    image_io.write_label(os.path.join(out_dir, f"{stem}.png"), label, run.info.palette)
    image_io.write_image(os.path.join(out_dir, f"{stem}_overlay.jpg"),
                         image_io.overlay(image, label, run.info.palette))
  return {"images": len(names), "out_dir": os.path.abspath(out_dir), "step": chosen,
          "model": model, "mode": ", ".join(sorted(modes))}
