"""PNG figures of the results: mIoU against the label fraction, and training curves.

    python -m experiments.benchmarks.figures --results=results/embedded.json \
        --runs=runs/embedded_results --out=results/figures

writes
  label_fraction.png   teacher mIoU against the labeled fraction, one line per method: the
                       mean over seeds with error bars of +- one sample std, each seed a dot
                       (`results/embedded.json`, written by `embedded_results`);
  training_curves.png  one run per method (`--split`, `--seed`; found under `--runs`):
                       the supervised loss on labeled images (the loss all methods share) and
                       validation mIoU (teacher solid, student dashed) against the step, from
                       each run's `metrics.jsonl`.
A run folder is any folder holding `metrics.jsonl` and `results.json` or `config.json`. Needs
matplotlib (`pip install -e '.[results]'`).
"""

import json
import os
from typing import Dict, Optional

import numpy as np

# The supervised loss on labeled images is the one loss every method logs and means the same in
# all of them (totals add method-specific terms of different scales); the total is the fallback.
LOSS_KEYS = ("train/loss_sup", "train/loss")
TEACHER_KEY = "val_teacher/miou"
STUDENT_KEY = "val_student/miou"
# Methods in this order get colours C0, C1, ... in every figure; others follow.
METHOD_ORDER = ("supervised", "mean_teacher", "dgcl", "dssn")


def method_colours(methods) -> Dict[str, str]:
  """`{method: 'C<k>'}`, the same colour for a method in every figure."""
  ordered = [m for m in METHOD_ORDER if m in methods] + [m for m in methods
                                                         if m not in METHOD_ORDER]
  known = list(METHOD_ORDER) + [m for m in ordered if m not in METHOD_ORDER]
  return {m: f"C{known.index(m) % 10}" for m in ordered}


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend, or an error naming the extra to install."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the figures need matplotlib: pip install -e '.[results]'") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def fraction_value(split: str) -> float:
  """`'1/16'` -> 0.0625, `'full'` -> 1.0, `'0.25'` -> 0.25."""
  if split == "full":
    return 1.0
  if "/" in str(split):
    num, den = str(split).split("/")
    return int(num) / int(den)
  return float(split)


def read_rows(results_json_path: str) -> list:
  """The per-run rows of a results JSON (`{'rows': [{method, split, seed, miou_teacher}]}`).

  Raises:
    ValueError: naming the file and the missing keys when it is not such a file.
  """
  with open(results_json_path) as f:
    data = json.load(f)
  rows = data.get("rows") if isinstance(data, dict) else None
  if not rows:
    raise ValueError(f"{results_json_path}: no 'rows' list (expected the JSON written by "
                     "experiments.benchmarks.embedded_results)")
  need = {"method", "split", "miou_teacher"}
  for i, row in enumerate(rows):
    if not need <= set(row):
      raise ValueError(f"{results_json_path}: row {i} lacks {sorted(need - set(row))}")
  return rows


def label_fraction_series(rows: list) -> Dict[str, dict]:
  """`{method: {'x': fractions, 'mean', 'std', 'points': [(x, value)], 'n': [...]}}`.

  `std` is the sample std over seeds (0 with one seed); methods keep their first-seen order.
  """
  out = {}
  for method in dict.fromkeys(r["method"] for r in rows):
    by_x = {}
    for r in rows:
      if r["method"] == method:
        by_x.setdefault(fraction_value(r["split"]), []).append(float(r["miou_teacher"]))
    xs = sorted(by_x)
    out[method] = {
        "x": np.array(xs),
        "mean": np.array([np.mean(by_x[x]) for x in xs]),
        "std": np.array([np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs]),
        "n": [len(by_x[x]) for x in xs],
        "points": [(x, v) for x in xs for v in by_x[x]],
    }
  return out


def plot_label_fraction(results_json_path: str, out_png: str) -> str:
  """Teacher mIoU against the labeled fraction per method, with the seeds' spread.

  Each method's mean over seeds is a line with +- one sample std as error bars, and every
  seed's value a faint dot; methods are nudged apart around each fraction so bars don't overlap.

  Args:
    results_json_path: JSON with a `rows` list of `{method, split, seed, miou_teacher}`.
    out_png: the PNG to write (folders created).

  Returns:
    `out_png`.
  """
  plt = _pyplot()
  series = label_fraction_series(read_rows(results_json_path))
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
  all_x = sorted({x for s in series.values() for x in s["x"]})
  colours = method_colours(list(series))
  for i, (method, s) in enumerate(series.items()):
    colour = colours[method]
    label = f"{method} (n={max(s['n'])} seed{'s' if max(s['n']) > 1 else ''})"
    # Methods side by side around each fraction (log axis: a multiplicative nudge).
    nudge = 2.0 ** (0.07 * (i - (len(series) - 1) / 2))
    ax.errorbar(s["x"] * nudge, s["mean"], yerr=s["std"], fmt="-o", color=colour, label=label,
                lw=1.6, ms=4, capsize=3)
    px, py = zip(*s["points"])
    ax.scatter(np.asarray(px) * nudge, py, color=colour, s=10, alpha=0.45, lw=0)
  ax.set_xscale("log", base=2)
  ax.set_xticks(all_x)
  ax.set_xticklabels(["full" if x == 1 else f"1/{round(1 / x)}" if abs(1 / x - round(1 / x))
                      < 1e-6 else f"{x:g}" for x in all_x])
  ax.minorticks_off()
  ax.set_xlabel("labeled fraction")
  ax.set_ylabel("val mIoU, teacher (%)")
  ax.set_title("mean ± std over seeds (dots: single seeds)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png)
  plt.close(fig)
  return out_png


def read_metrics(path: str) -> Dict[str, list]:
  """`{key: [(step, value), ...]}` from a `metrics.jsonl` (bad lines skipped), by step."""
  series = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      step = record.get("step")
      if step is None:
        continue
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          series.setdefault(key, []).append((int(step), float(value)))
  return {k: sorted(v) for k, v in series.items()}


def plot_training_curves(run_dirs: Dict[str, str], out_png: str) -> str:
  """Supervised training loss and validation mIoU against the step, one run per method.

  The loss panel shows `train/loss_sup` (the same quantity in every method; a run without it
  shows its total `train/loss`); the mIoU panel the teacher (solid) and student (dashed).

  Args:
    run_dirs: `{label (e.g. method): run folder holding metrics.jsonl}`.
    out_png: the PNG to write (folders created).

  Returns:
    `out_png`.

  Raises:
    ValueError: `run_dirs` is empty, or a folder has no metrics.jsonl (named).
  """
  if not run_dirs:
    raise ValueError("plot_training_curves: no run folders given")
  plt = _pyplot()
  fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
  colours = method_colours(list(run_dirs))
  loss_names = set()
  for label, run_dir in run_dirs.items():
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
      raise ValueError(f"{run_dir}: no metrics.jsonl (not a finished or running semijax run)")
    metrics = read_metrics(path)
    colour = colours[label]
    loss_key = next((k for k in LOSS_KEYS if k in metrics), None)
    if loss_key:
      loss_names.add(loss_key.split("/", 1)[1])
      steps, values = zip(*metrics[loss_key])
      ax_loss.plot(steps, values, color=colour, label=label, lw=1.4)
    for key, style in ((TEACHER_KEY, "-o"), (STUDENT_KEY, "--")):
      if key in metrics:
        steps, values = zip(*metrics[key])
        ax_miou.plot(steps, values, style, color=colour, ms=3, lw=1.4,
                     label=f"{label} {'teacher' if key == TEACHER_KEY else 'student'}")
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel(" / ".join(sorted(loss_names)) or "loss")
  ax_loss.set_title("supervised loss on labeled images (train/loss_sup)"
                    if loss_names == {"loss_sup"} else "training loss", fontsize=9)
  ax_miou.set_xlabel("step")
  ax_miou.set_ylabel("val mIoU (%)")
  ax_miou.set_title("validation mIoU (teacher solid, student dashed)", fontsize=9)
  for ax in (ax_loss, ax_miou):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png)
  plt.close(fig)
  return out_png


def _run_info(run_dir: str) -> Optional[dict]:
  """`{method, split, seed}` of a run folder (results.json, else config.json), or None."""
  results = os.path.join(run_dir, "results.json")
  if os.path.isfile(results):
    with open(results) as f:
      r = json.load(f)
    return {"method": r.get("method"), "split": r.get("split"), "seed": r.get("seed")}
  config = os.path.join(run_dir, "config.json")
  if os.path.isfile(config):
    with open(config) as f:
      c = json.load(f)
    return {"method": c.get("method", {}).get("name"), "split": c.get("data", {}).get("split"),
            "seed": c.get("seed")}
  return None


def find_runs(runs_dir: str, *, split: Optional[str] = None, seed: int = 0) -> Dict[str, str]:
  """One run folder per method under `runs_dir` (searched two levels deep).

  Prefers the run with `seed` and `split` (default: the smallest labeled fraction found for
  that method); methods keep the order in which they are found (sorted folder names).
  """
  found = []
  if not os.path.isdir(runs_dir):
    return {}
  for name in sorted(os.listdir(runs_dir)):
    for path in [os.path.join(runs_dir, name)] + sorted(
        os.path.join(runs_dir, name, sub) for sub in (os.listdir(os.path.join(runs_dir, name))
                                                       if os.path.isdir(os.path.join(runs_dir,
                                                                                     name))
                                                       else [])):
      if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        info = _run_info(path)
        if info and info["method"]:
          found.append((info, path))
  chosen = {}
  for method in method_colours(list(dict.fromkeys(i["method"] for i, _ in found))):
    runs = [(i, p) for i, p in found if i["method"] == method]

    def rank(item):
      info = item[0]
      try:
        frac = fraction_value(info["split"])
      except (TypeError, ValueError):
        frac = 2.0
      return (info["split"] != split if split else 0, info["seed"] != seed, frac, item[1])
    chosen[method] = min(runs, key=rank)[1]
  return chosen


def main(argv=None) -> int:
  """The command line (module docstring)."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.figures",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--results", default="results/embedded.json",
                      help="results JSON with per-seed rows (embedded_results --out)")
  parser.add_argument("--runs", default="runs/embedded_results",
                      help="folder of run folders for the training curves ('' to skip)")
  parser.add_argument("--out", default="results/figures", help="output folder")
  parser.add_argument("--split", default=None, help="training curves: the split to show")
  parser.add_argument("--seed", type=int, default=0, help="training curves: the seed to show")
  args = parser.parse_args(argv)
  written = []
  if args.results:
    written.append(plot_label_fraction(args.results, os.path.join(args.out,
                                                                   "label_fraction.png")))
  if args.runs:
    runs = find_runs(args.runs, split=args.split, seed=args.seed)
    if runs:
      written.append(plot_training_curves(runs, os.path.join(args.out, "training_curves.png")))
      for method, path in runs.items():
        print(f"[semijax] training curves: {method} <- {path}")
    else:
      print(f"[semijax] no run folders with metrics.jsonl under {args.runs}: training curves "
            "skipped")
  for path in written:
    print(f"[semijax] wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
