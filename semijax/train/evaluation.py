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
