"""`make demo`: supervised and semi-supervised training on the same labels, side by side.

    python -m experiments.demo [--runs=supervised:1/16,mean_teacher:1/16] [--workdir=runs/demo]

Each entry of --runs is `<config>:<split>` (a file in experiments/configs), trained on the
embedded default dataset from the shipped pretrained backbone; every run resumes if its
workdir already holds a checkpoint, so an interrupted demo continues. The table ends with
each semi-supervised run's gain over the supervised run on the same labeled images.
"""

import os
import time

from absl import app, flags

from experiments import cli

flags.DEFINE_list("runs", ["supervised:1/16", "mean_teacher:1/16"],
                  "config:split entries to train, in order.")
flags.DEFINE_string("workdir", "runs/demo", "Parent directory of the runs.")
flags.DEFINE_integer("seed", 0, "Seed of every run.")
FLAGS = flags.FLAGS


def _table(rows) -> str:
  head = f"{'method':<14} {'labels':>7} {'mIoU teacher':>13} {'mIoU student':>13} {'train':>8}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['method']:<14} {r['split']:>7} {r['miou_teacher']:13.1f} "
                 f"{r['miou_student']:13.1f} {r['train_seconds'] / 60:7.1f}m")
  return "\n".join(lines)


def main(argv):
  del argv
  cli.setup()
  import importlib  # pylint: disable=g-import-not-at-top

  from semijax.train import loop  # pylint: disable=g-import-not-at-top
  rows, t0 = [], time.time()
  for entry in FLAGS.runs:
    name, _, split = entry.partition(":")
    module = importlib.import_module(f"experiments.configs.{name}")
    config = module.get_config(f"split={split or '1/8'},seed={FLAGS.seed}")
    workdir = os.path.join(FLAGS.workdir, f"{name}_{(split or '1/8').replace('/', '_')}")
    print(f"\n=== {name} on {split or '1/8'} of the labels -> {workdir}", flush=True)
    rows.append(loop.train_and_evaluate(config, workdir))
  print("\nResults (embedded digits val set, whole-image mIoU %):")
  print(_table(rows))
  for r in rows:
    ref = next((s for s in rows if s["method"] == "supervised" and s["split"] == r["split"]),
               None)
    if ref is not None and r is not ref:
      print(f"  gain of {r['method']} over supervised on the same {r['split']} labels: "
            f"{r['miou_teacher'] - ref['miou_teacher']:+.1f} mIoU (teacher)")
  for r in rows:
    print(f"  {r['method']} {r['split']}: TensorBoard logs  {r['tensorboard']}")
    print(f"  {r['method']} {r['split']}: predictions figure {r['figure']}")
  print(f"  (tensorboard --logdir {os.path.abspath(FLAGS.workdir)})")
  print(f"demo wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
