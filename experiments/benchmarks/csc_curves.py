"""Separ and Cons(T) curves of CSC runs (the paper's Figs. 1-2), as one PNG.

    python -m experiments.benchmarks.csc_curves --runs=csc=runs/csc_1_16 \\
        [--runs=csc_nocsm=runs/ablate/csc_nocsm_1_16_seed0 ...] \\
        --out=results/figures/csc_curves.png

Three panels against the training step, one line per run, from each run's `metrics.jsonl`
(the same scalars are in its TensorBoard logs, `train/csc/...`):
  * Separ (eq. 9) of the class bank, lower = class means further apart (solid), and the best
    value the gate has seen (dashed);
  * Cons(T) (eq. 7): mean pixel cosine between the representation of a fixed probe set of
    labeled images and the same images' representation T steps earlier
    (`csc_contrast.cons_interval`);
  * the validation mIoU of the teacher.
Needs matplotlib (`pip install -e '.[results]'`).
"""

import os
from typing import Dict

from experiments.benchmarks import figures

SEPARATION = "train/csc/separation"
BEST = "train/csc/separation_best"
CONS = "train/csc/cons"


def plot_csc_curves(run_dirs: Dict[str, str], out_png: str) -> str:
  """Writes the three-panel figure for `{label: run_dir}`; returns `out_png`.

  Raises:
    FileNotFoundError: a run folder without `metrics.jsonl`.
    ValueError: no run logged Separ or Cons (not a CSC run).
  """
  plt = figures._pyplot()  # pylint: disable=protected-access
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  drew = False
  for i, (label, run_dir) in enumerate(run_dirs.items()):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run folder)")
    series = figures.read_metrics(path)
    colour = f"C{i % 10}"
    for key, ax, style, name in ((SEPARATION, axes[0], "-", label),
                                 (BEST, axes[0], "--", f"{label} (best)"),
                                 (CONS, axes[1], "-", label),
                                 (figures.TEACHER_KEY, axes[2], "-", label)):
      if key in series:
        steps, values = zip(*series[key])
        ax.plot(steps, values, style, color=colour, label=name, marker="o" if
                key == figures.TEACHER_KEY else None)
        drew |= key in (SEPARATION, CONS)
  if not drew:
    raise ValueError(f"none of {sorted(run_dirs.values())} logged {SEPARATION} or {CONS}")
  for ax, title in zip(axes, ("Separ (eq. 9) of the class bank, lower = more separate",
                              "Cons(T) (eq. 7), probe images", "val mIoU (teacher)")):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
  return out_png


def main(argv=None) -> int:
  """The command line (module docstring)."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks.csc_curves",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", action="append", required=True,
                      help="label=run_dir (repeatable); a bare run_dir is labelled by its name")
  parser.add_argument("--out", default="results/figures/csc_curves.png", help="PNG path")
  args = parser.parse_args(argv)
  runs = {}
  for item in args.runs:
    label, sep, path = item.partition("=")
    if not sep:
      label, path = os.path.basename(os.path.normpath(item)), item
    runs[label] = path
  print(f"[semijax] wrote {plot_csc_curves(runs, args.out)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
