"""Regenerates the README results table: methods x splits x seeds on the embedded dataset.

    python -m experiments.benchmarks.embedded_results --out=results/embedded.json \
        [--methods=supervised,mean_teacher,dgcl,dssn] [--splits=1/16,1/8] [--seeds=0,1,2] \
        [--grid_dir=runs/embedded_results] [--readme=README.md]

Each run is an ordinary `experiments.train` run in its own workdir (so an interrupted grid
resumes where it stopped; finished runs are read from their results.json). The seed changes
the labeled subset (`split_seed`), the initialisation and the data order together. The table
reports the teacher's final whole-image mIoU on the val set, mean +- sample std over seeds.
"""

import importlib
import json
import os
import time

import numpy as np
from absl import app, flags

from experiments import cli
from semijax import checkpoint

flags.DEFINE_list("splits", ["1/16", "1/8"], "Labeled fractions.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (split, init and data order).")
flags.DEFINE_string("grid_dir", "runs/embedded_results", "Parent of the run directories.")
flags.DEFINE_string("readme", "", "If set, replace the results table in this README.")
flags.DEFINE_list("extra", [], "Extra full-label supervised reference runs: 'full'.")
flags.DEFINE_bool("only_finished", False,
                  "Report the runs that already finished; train none (e.g. while a grid runs).")
FLAGS = flags.FLAGS

def run_one(method: str, split: str, seed: int, workdir: str, overrides: dict = None) -> dict:
  """Trains `experiments/configs/<method>.py` (plus dotted-path `overrides`) into `workdir`, or
  reads the results of a run that already finished there."""
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from semijax.train import loop  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"experiments.configs.{method}").get_config(
      f"split={split},split_seed={seed},seed={seed}")
  if overrides:
    config.update_from_flattened_dict(overrides)
  return loop.train_and_evaluate(config, workdir)


DIAGNOSTICS = ("pl/precision", "pl/coverage", "contrast/anchors_precision",
               "contrast/positive_keys_precision", "contrast/negatives_precision")


def diagnostics(workdir: str, warmup_steps: int) -> dict:
  """The pseudo-label diagnostics of a run at the start and end of its semi-supervised phase.

  Reads `metrics.jsonl`: the first logging window after the warm-up and the last one.

  Returns:
    `{name: [start, end]}` for each of `DIAGNOSTICS` the run logged (as fractions): its first
    and last logged window after the warm-up.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  windows = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get("step", 0) > warmup_steps and "train/pl/precision" in record:
        windows.append(record)
  if not windows:
    return {}
  out = {}
  for k in DIAGNOSTICS:   # contrastive ones start when the term does (e.g. a full bank)
    have = [w[f"train/{k}"] for w in windows if f"train/{k}" in w]
    if have:
      out[k] = [have[0], have[-1]]
  return out


def diagnostics_table(rows: list) -> str:
  """Markdown: per method and split, the diagnostics' seed means, start -> end of the phase."""
  lines = ["| method | labels | pseudo-label precision | coverage | contrastive anchors / "
           "positives / negatives right |", "|---|---|---|---|---|"]
  keys = sorted({(r["method"], r["split"]) for r in rows if r.get("diagnostics")},
                key=lambda k: ([r["method"] for r in rows].index(k[0]), k[1]))
  for method, split in keys:
    diags = [r["diagnostics"] for r in rows if (r["method"], r["split"]) == (method, split)
             and r.get("diagnostics")]

    def cell(name):
      vals = [d[name] for d in diags if name in d]
      if not vals:
        return None
      start, end = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
      return f"{100 * start:.1f} → {100 * end:.1f}"
    contrast = [cell(f"contrast/{n}_precision") for n in ("anchors", "positive_keys",
                                                          "negatives")]
    contrast = " / ".join(c for c in contrast if c) or "—"
    lines.append(f"| {method} | {split} | {cell('pl/precision') or '—'} | "
                 f"{cell('pl/coverage') or '—'} | {contrast} |")
  return "\n".join(lines)


def table(rows: list) -> str:
  """Markdown table: one row per method, one column per split, mean +- std (n)."""
  splits = sorted({r["split"] for r in rows}, key=lambda s: (s == "full", s))
  methods = []
  for r in rows:
    if r["method"] not in methods:
      methods.append(r["method"])
  head = "| method | " + " | ".join(f"{s} labels" for s in splits) + " | train time / run |"
  lines = [head, "|---" * (len(splits) + 2) + "|"]
  for m in methods:
    cells, minutes = [], []
    for s in splits:
      vals = [r["miou_teacher"] for r in rows if r["method"] == m and r["split"] == s]
      minutes += [r["train_seconds"] / 60 for r in rows if r["method"] == m and r["split"] == s]
      if not vals:
        cells.append("—")
      elif len(vals) == 1:
        cells.append(f"{vals[0]:.1f} (n=1)")
      else:
        cells.append(f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f} (n={len(vals)})")
    lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean(minutes):.1f} min |")
  return "\n".join(lines)


def paired_table(rows: list, reference: str) -> str:
  """Per-seed differences to `reference` (same seed = same labeled subset and data order), which
  cancel most of the split-to-split variance: mean +- sample std (n) of the paired differences."""
  splits = sorted({r["split"] for r in rows}, key=lambda s: (s == "full", s))
  by_key = {(r["method"], r["split"], r["seed"]): r["miou_teacher"] for r in rows}
  lines = ["| paired difference | " + " | ".join(f"{s} labels" for s in splits) + " |",
           "|---" * (len(splits) + 1) + "|"]
  for m in dict.fromkeys(r["method"] for r in rows):
    if m == reference:
      continue
    cells = []
    for s in splits:
      d = [v - by_key[(reference, s, seed)] for (mm, ss, seed), v in by_key.items()
           if mm == m and ss == s and (reference, s, seed) in by_key]
      cells.append("—" if not d else f"{np.mean(d):+.1f}" + (
          f" ± {np.std(d, ddof=1):.1f} (n={len(d)})" if len(d) > 1 else " (n=1)"))
    lines.append(f"| {m} − {reference} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def targets(rows: list, split: str = "1/16") -> str:
  """Issue 12's targets at `split`: every semi-supervised method above supervised (paired mean
  minus its std > 0), and the best method's share of the full-label supervised mIoU."""
  by_key = {(r["method"], r["split"], r["seed"]): r["miou_teacher"] for r in rows}
  full = [v for (m, s, _), v in by_key.items() if m == "supervised" and s == "full"]
  lines = []
  best = None
  for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "supervised"):
    d = [v - by_key[("supervised", split, seed)] for (mm, ss, seed), v in by_key.items()
         if mm == m and ss == split and ("supervised", split, seed) in by_key]
    vals = [v for (mm, ss, _), v in by_key.items() if mm == m and ss == split]
    if len(d) > 1:
      low = np.mean(d) - np.std(d, ddof=1)
      lines.append(f"{m}: paired mean − std = {low:+.1f} ({'above' if low > 0 else 'not above'} "
                   "supervised)")
    if vals and (best is None or np.mean(vals) > best[1]):
      best = (m, float(np.mean(vals)))
  if full and best:
    share = 100 * best[1] / np.mean(full)
    lines.append(f"best at {split}: {best[0]} {best[1]:.1f} = {share:.1f} % of full-label "
                 f"supervised ({np.mean(full):.1f})")
  return "; ".join(lines)


def replace_block(readme: str, name: str, text: str) -> None:
  """Replaces what lies between `<!-- name:begin -->` and `<!-- name:end -->` in `readme`."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  with open(readme) as f:
    content = f.read()
  if begin not in content or end not in content:
    raise ValueError(f"{readme}: no {begin} ... {end} block to replace")
  head, rest = content.split(begin, 1)
  _, tail = rest.split(end, 1)
  checkpoint.atomic_write_text(readme, f"{head}{begin}\n{text}\n{end}{tail}")


def main(argv):
  del argv
  cli.setup()
  rows, t0 = [], time.time()
  grid = [(m, s, int(seed)) for m in FLAGS.methods for s in FLAGS.splits for seed in FLAGS.seeds]
  grid += [("supervised", s, int(seed)) for s in FLAGS.extra for seed in FLAGS.seeds]
  for method, split, seed in grid:
    workdir = os.path.join(FLAGS.grid_dir, f"{method}_{split.replace('/', '_')}_seed{seed}")
    if FLAGS.only_finished and not os.path.exists(os.path.join(workdir, "results.json")):
      continue
    print(f"=== {method} {split} seed {seed} -> {workdir}", flush=True)
    res = run_one(method, split, seed, workdir)
    row = {k: res[k] for k in ("method", "split", "seed", "miou_teacher", "miou_student",
                               "train_seconds", "per_class_iou_teacher")}
    row["diagnostics"] = diagnostics(workdir, res.get("warmup_steps", 0))
    rows.append(row)
  md = table(rows)
  # Each method against each baseline present; the baselines' own comparison listed once.
  baselines = [m for m in ("supervised", "mean_teacher") if any(r["method"] == m for r in rows)]
  for i, reference in enumerate(baselines):
    md += "\n\n" + paired_table([r for r in rows if r["method"] not in baselines[:i]], reference)
  summary = targets(rows)
  if summary:
    md += f"\n\nTargets at 1/16 (issue 12): {summary}."
  if any(r.get("diagnostics") for r in rows):
    md += ("\n\nWhat the unlabeled losses were taught, against the unlabeled images' hidden masks "
           "(mean over seeds; first logging window after the warm-up → last window):\n\n"
           + diagnostics_table([r for r in rows if r["split"] != "full"]))
  cli.report_json({"rows": rows, "table": md, "wall_seconds": time.time() - t0},
                  FLAGS.out or "results/embedded.json")
  print(md)
  if FLAGS.readme:
    replace_block(FLAGS.readme, "results", md)


if __name__ == "__main__":
  app.run(main)
