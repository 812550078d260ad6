"""How the semi-supervised gain depends on the regime: start (scratch / pretrained) x schedule.

    python -m experiments.benchmarks.regime --out=results/regime.json \\
        [--methods=supervised,mean_teacher] [--steps=1200,2400,4800] [--starts=none,embedded] \\
        [--split=1/16] [--seed=0] [--png=results/figures/regime.png] [--readme=README.md]

Every run is the method's embedded config with `model.pretrained` = the start and
`train.total_steps` = the schedule (the supervised warm-up stays a quarter of it), trained into
`<grid_dir>/<method>_<start>_<steps>_seed<seed>` (finished runs are read back, so an
interrupted grid continues). One seed: a map of the regime, not a significance test (that is the
3-seed headline table's job). Writes a table (JSON, README block `regime`) and a PNG of mIoU
against steps, one line per method and start.
"""

import os
import time

from absl import app, flags

from experiments import cli
from experiments.benchmarks import embedded_results

flags.DEFINE_list("steps", ["1200", "2400", "4800"], "Schedules (optimizer steps).")
flags.DEFINE_list("starts", ["none", "embedded"], "model.pretrained values.")
flags.DEFINE_string("split", "1/16", "Labeled fraction.")
flags.DEFINE_integer("seed", 0, "Seed (split, init and data order).")
flags.DEFINE_string("regime_dir", "runs/regime", "Parent of the run directories.")
flags.DEFINE_string("png", "results/figures/regime.png", "The figure ('' for none).")
FLAGS = flags.FLAGS   # --methods, --out: the package; --readme: embedded_results

START_NAMES = {"none": "from scratch", "embedded": "pretrained"}


def run_grid(methods, starts, steps, *, split: str, seed: int, root: str) -> list:
  """Trains (or reads back) every run of the grid; returns one row per run."""
  rows = []
  for start in starts:
    for total in steps:
      for method in methods:
        workdir = os.path.join(root, f"{method}_{start}_{total}_seed{seed}")
        print(f"=== {method} start={start} steps={total} -> {workdir}", flush=True)
        res = embedded_results.run_one(
            method, split, seed, workdir,
            {"model.pretrained": start, "train.total_steps": int(total),
             "train.supervised_warmup_steps": int(total) // 4})
        rows.append({"method": method, "start": start, "steps": int(total), "seed": seed,
                     "miou_teacher": res["miou_teacher"], "miou_student": res["miou_student"],
                     "train_seconds": res["train_seconds"]})
  return rows


def table(rows: list) -> str:
  """Markdown: one row per (start, method), one column per schedule, plus each start's gain."""
  steps = sorted({r["steps"] for r in rows})
  value = {(r["start"], r["method"], r["steps"]): r["miou_teacher"] for r in rows}
  lines = ["| start | method | " + " | ".join(f"{s} steps" for s in steps) + " |",
           "|---" * (len(steps) + 2) + "|"]
  for start in dict.fromkeys(r["start"] for r in rows):
    methods = list(dict.fromkeys(r["method"] for r in rows if r["start"] == start))
    for m in methods:
      cells = [f"{value[(start, m, s)]:.1f}" if (start, m, s) in value else "—" for s in steps]
      lines.append(f"| {START_NAMES.get(start, start)} | {m} | " + " | ".join(cells) + " |")
    if "supervised" in methods:
      for m in methods:
        if m == "supervised":
          continue
        cells = [f"{value[(start, m, s)] - value[(start, 'supervised', s)]:+.1f}"
                 if (start, m, s) in value and (start, "supervised", s) in value else "—"
                 for s in steps]
        lines.append(f"| {START_NAMES.get(start, start)} | {m} − supervised | "
                     + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list, path: str) -> None:
  """mIoU against steps, one line per (method, start)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  styles = {"none": "--", "embedded": "-"}
  for start in dict.fromkeys(r["start"] for r in rows):
    for method in dict.fromkeys(r["method"] for r in rows):
      pts = sorted((r["steps"], r["miou_teacher"]) for r in rows
                   if r["start"] == start and r["method"] == method)
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(start, ":"), marker="o",
                label=f"{method}, {START_NAMES.get(start, start)}")
  ax.set_xscale("log", base=2)
  steps = sorted({r["steps"] for r in rows})
  ax.set_xticks(steps, [str(s) for s in steps])
  ax.set_xlabel("optimizer steps")
  ax.set_ylabel("val mIoU (teacher, %)")
  ax.set_title(f"embedded data, {rows[0].get('split', '1/16')} labels, one seed")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  cli.setup()
  t0 = time.time()
  methods = FLAGS.methods if FLAGS["methods"].present else ["supervised", "mean_teacher"]
  rows = run_grid(methods, FLAGS.starts, FLAGS.steps, split=FLAGS.split, seed=FLAGS.seed,
                  root=FLAGS.regime_dir)
  for r in rows:
    r["split"] = FLAGS.split
  md = table(rows)
  if FLAGS.png:
    plot(rows, FLAGS.png)
  cli.report_json({"rows": rows, "table": md, "split": FLAGS.split, "seed": FLAGS.seed,
                   "wall_seconds": time.time() - t0}, FLAGS.out or "results/regime.json")
  print(md)
  if FLAGS.readme:
    embedded_results.replace_block(FLAGS.readme, "regime", md)


if __name__ == "__main__":
  app.run(main)
