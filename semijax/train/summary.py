"""The end-of-run summary: what a run reached and where everything it wrote lies.

    print(format_run_summary(results, workdir))

prints, after the progress bar closes:

    [semijax] done: mean_teacher on folder, split 1/8 (split seed 0, seed 0), 1200 steps in 3.4 min
    [semijax] val mIoU (whole): teacher 81.2, student 80.7; best teacher 81.9 at step 800
    [semijax] per-class IoU (teacher): stripes 83.0, checks 80.1, speckles 80.5
    [semijax] results:     runs/tex/results.json
    [semijax] figure:      runs/tex/predictions.png
    [semijax] checkpoints: runs/tex/checkpoints (steps 800, 1200; --step=best picks 800)
    [semijax] logs:        runs/tex/metrics.jsonl; tensorboard --logdir runs/tex/tensorboard
    [semijax] next:        python -m experiments.evaluate --workdir=runs/tex ...
"""

import importlib.util
import json
import os
from typing import Any, Dict, Optional, Tuple

from semijax import extras

PREFIX = "[semijax] "
BEST_KEY = "val_teacher/miou"   # what the trainer logs to metrics.jsonl at each evaluation


def best_from_metrics(path: str) -> Optional[Tuple[int, float]]:
  """`(step, mIoU)` of the best teacher evaluation in a `metrics.jsonl`, or None if none."""
  if not os.path.isfile(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue   # a half-written last line of a killed run
      if BEST_KEY in record and (best is None or record[BEST_KEY] > best[1]):
        best = (int(record["step"]), float(record[BEST_KEY]))
  return best


def checkpoint_steps(workdir: str) -> list:
  """The finished checkpoint steps in `workdir/checkpoints`, ascending."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _minutes(seconds: Optional[float]) -> str:
  if seconds is None:
    return "?"
  return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_run_summary(results: Dict[str, Any], workdir: str) -> str:
  """The lines printed when a run ends (see the module docstring), joined by newlines.

  Args:
    results: the dict the trainer writes to `results.json` (`method`, `dataset`, `split`,
      `split_seed`, `seed`, `steps`, `eval_mode`, `miou_teacher`, `miou_student`,
      `train_seconds`; optional `per_class_iou_teacher` with `class_names`, `best_step` and
      `best_val_miou`, `figure`, `tensorboard`, `skipped_steps`). Missing keys are shown as
      `?` or left out, never an error.
    workdir: the run directory; its `metrics.jsonl` gives the best evaluation when `results`
      lacks it, and its `checkpoints/` the steps on disk.

  Returns:
    Several lines, each starting with `[semijax] `, without a final newline.
  """
  r = results
  lines = []
  what = f"{r.get('method', '?')} on {r.get('dataset', '?')}, split {r.get('split', '?')}"
  seeds = f"split seed {r.get('split_seed', '?')}, seed {r.get('seed', '?')}"
  lines.append(f"done: {what} ({seeds}), {r.get('steps', '?')} steps in "
               f"{_minutes(r.get('train_seconds'))}")

  def pct(key):
    value = r.get(key)
    return "?" if value is None else f"{value:.1f}"
  best = None
  if r.get("best_step") is not None and r.get("best_val_miou") is not None:
    best = (int(r["best_step"]), float(r["best_val_miou"]))
  else:
    best = best_from_metrics(os.path.join(workdir, "metrics.jsonl"))
  best_text = f"; best teacher {best[1]:.1f} at step {best[0]}" if best else ""
  lines.append(f"val mIoU ({r.get('eval_mode', '?')}): teacher {pct('miou_teacher')}, student "
               f"{pct('miou_student')}{best_text}")
  per_class = r.get("per_class_iou_teacher")
  if per_class:
    names = r.get("class_names") or [str(i) for i in range(len(per_class))]
    lines.append("per-class IoU (teacher): " + ", ".join(
        f"{n} {'-' if v is None else f'{v:.1f}'}" for n, v in zip(names, per_class)))
  if r.get("skipped_steps"):
    lines.append(f"WARNING: {r['skipped_steps']} update(s) were skipped (non-finite loss)")

  def shown(path: str) -> str:
    """Relative to the working directory when inside it (shorter, and what the user typed)."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.abspath(path)
  lines.append(f"results:     {shown(os.path.join(workdir, 'results.json'))}")
  if r.get("figure"):
    lines.append(f"figure:      {shown(r['figure'])}")
  steps = checkpoint_steps(workdir)
  if steps:
    pick = f"; --step=best picks {best[0]}" if best and best[0] in steps else ""
    lines.append(f"checkpoints: {shown(os.path.join(workdir, 'checkpoints'))} (steps "
                 f"{', '.join(map(str, steps))}{pick})")
  logdir = r.get("tensorboard") or os.path.join(workdir, "tensorboard")
  board = f"tensorboard --logdir {shown(logdir)}"
  if not os.path.isdir(logdir) and importlib.util.find_spec("tensorboardX") is None:
    board = ("no TensorBoard event files (tensorboardX missing: "
             f"{extras.install_hint('tensorboard')})")
  elif importlib.util.find_spec("tensorboard") is None:
    board += " (install: pip install -e '.[tensorboard]' or make tensorboard)"
  lines.append(f"logs:        {shown(os.path.join(workdir, 'metrics.jsonl'))}; {board}")
  run = shown(workdir)
  lines.append(f"next:        python -m experiments.evaluate --workdir={run}; python -m "
               f"experiments.predict --workdir={run} --images=DIR --out=DIR")
  return "\n".join(PREFIX + line for line in lines)
