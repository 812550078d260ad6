"""Single-seed ablations on the embedded data: why DGCL trails mean teacher, DSSN's CPLG against
fixed thresholds (DSSN Fig. 4) with the IoU of the hardest classes (Fig. 5), and DSSN Table 5.

    python -m experiments.benchmarks.ablations --out=results/ablations.json [--readme=README.md] \\
        [--names=dgcl_nocontra,...] [--split=1/16] [--seed=0]

Each variant is its method's embedded config plus dotted-path overrides, trained into
`<ablation_dir>/<name>_<split>_seed<seed>` (finished runs are read back). A group's reference
is the unchanged method, read from (or trained into) the `embedded_results` grid's run directory,
so the ablation and the results table share that run. One seed per call: same-seed differences
vary by about 1 point (paired std in the results table), so a single-seed difference of 1-2 points
needs the other seeds (`--seed=1`, `--seed=2`) before it means anything.
"""

import os
import time

import numpy as np
from absl import app, flags

from experiments import cli
from experiments.benchmarks import embedded_results

# name -> (group, method, overrides). Group references: the method's default config.
VARIANTS = {
    "dgcl_nocontra": ("dgcl", "dgcl", {"dgcl_contrast.weight": 0.0}),
    "dgcl_unimatch_aug": ("dgcl", "dgcl", {"dgcl.strong_augment": "unimatch"}),
    "dssn_conf092": ("dssn_threshold", "dssn",
                     {"pseudo_label.rule": "confidence",
                      "pseudo_label.confidence.threshold": 0.92}),
    "dssn_conf096": ("dssn_threshold", "dssn",
                     {"pseudo_label.rule": "confidence",
                      "pseudo_label.confidence.threshold": 0.96}),
    "dssn_no_consistency": ("dssn_table5", "dssn", {"dssn.consistency_image": False,
                                                    "dssn.consistency_feature": False}),
    "dssn_only_feature_cl": ("dssn_table5", "dssn", {"dssn.consistency_image": False}),
    "dssn_only_image_cl": ("dssn_table5", "dssn", {"dssn.consistency_feature": False}),
    # Alonso et al. Table 8 (teacher features, attention, FQF), each removed from the full model.
    "alonso_student_features": ("alonso_table8", "alonso", {"alonso_contrast.bank_source": "student"}),  # noqa: E501
    "alonso_no_attention": ("alonso_table8", "alonso", {"alonso_contrast.attention": False}),
    "alonso_no_fqf": ("alonso_table8", "alonso", {"alonso_contrast.quality_filter": False}),
    "alonso_base": ("alonso_table8", "alonso", {"alonso_contrast.bank_source": "student", "alonso_contrast.attention": False, "alonso_contrast.quality_filter": False}),  # noqa: E501
    "alonso_no_contrast": ("alonso_table8", "alonso", {"alonso_contrast.weight": 0.0}),
    "alonso_uniform_bank_weights": ("alonso_table8", "alonso", {"alonso_contrast.bank_attention": False}),  # noqa: E501
    # Why the recipe may trail mean teacher / supervised on the embedded data: each piece off.
    "alonso_no_labeled_aug": ("alonso_recipe", "alonso", {"alonso.labeled_augment": False}),
    "alonso_no_rescale": ("alonso_recipe", "alonso", {"alonso.rescale": False}),
    "alonso_no_entropy": ("alonso_recipe", "alonso", {"entropy_min.weight": 0.0}),
    "alonso_no_pseudo": ("alonso_recipe", "alonso", {"alonso.pseudo_weight": 0.0}),
    "alonso_threshold095": ("alonso_recipe", "alonso", {"pseudo_label.sharpened.threshold": 0.95}),
    "alonso_ema099": ("alonso_recipe", "alonso", {"ema.decay": 0.99, "ema.warmup": "u2pl"}),
    # CSC Table III (bank, TopN, consistency/separation module), cumulative as in the paper
    # (baseline, +B, +B+TopN; the reference is the full method) and one at a time.
    "csc_nocontra": ("csc_table3", "csc", {"csc_contrast.weight": 0.0}),
    "csc_bank_only": ("csc_table3", "csc", {"csc_contrast.top_n": 0, "csc_contrast.consistency": False, "csc_contrast.separation_gate": False}),  # noqa: E501
    "csc_nocsm": ("csc_table3", "csc", {"csc_contrast.consistency": False, "csc_contrast.separation_gate": False}),  # noqa: E501
    "csc_nobank": ("csc_table3", "csc", {"csc_contrast.memory_bank": False}),
    "csc_allpos": ("csc_table3", "csc", {"csc_contrast.top_n": 0}),
    # Why CSC trails: its strong view (CutMix only, as the code) and the contrast's weight.
    "csc_unimatch_aug": ("csc_why", "csc", {"csc.strong_augment": "unimatch"}),
    "csc_weight01": ("csc_why", "csc", {"csc_contrast.weight": 0.1}),
    # CAC: no context change (both crops identical, IoU in [1, 1]: Table 3 VI, Fig. 7), Table 3's
    # components one at a time, no memory, and oracle pseudo-labels for negative sampling.
    "cac_no_context": ("cac_table3", "cac", {"cac.iou_range": (1.0, 1.0)}),
    "cac_no_direction": ("cac_table3", "cac", {"cac.directional": False}),
    "cac_no_negative_sampling": ("cac_table3", "cac", {"cac.negative_sampling": False}),
    "cac_no_positive_filter": ("cac_table3", "cac", {"cac.threshold": 0.0}),
    "cac_no_memory": ("cac_table3", "cac", {"cac.memory_steps": 0}),
    "cac_no_contrast": ("cac_table3", "cac", {"cac.weight": 0.0}),
    "cac_oracle_labels": ("cac_table3", "cac", {"diagnostics.oracle_pseudo_labels": True}),
}

flags.DEFINE_list("names", list(VARIANTS), "Variants to run (see VARIANTS).")
flags.DEFINE_string("split", "1/16", "Labeled fraction.")
flags.DEFINE_integer("seed", 0, "Seed (split, init and data order).")
flags.DEFINE_string("ablation_dir", "runs/ablate", "Parent of the variants' run directories.")
flags.DEFINE_integer("hardest", 3, "Report the IoU of this many hardest foreground classes.")
FLAGS = flags.FLAGS   # --grid_dir (references), --readme: embedded_results; --out: the package


def hardest_classes(per_class_iou: list, count: int) -> list:
  """Indices of the `count` foreground classes (index > 0) with the lowest IoU."""
  order = np.argsort(np.asarray(per_class_iou[1:])) + 1
  return [int(c) for c in order[:count]]


def table(rows: list, hardest: list) -> str:
  """Markdown: one row per run, its mIoU, the difference to its group's reference and the IoU of
  the classes in `hardest`."""
  head = ("| group | variant | overrides | teacher mIoU | vs reference | "
          + " | ".join(f"IoU digit {c - 1}" for c in hardest) + " |")
  lines = [head, "|---" * (5 + len(hardest)) + "|"]
  ref = {r["group"]: r["miou_teacher"] for r in rows if r["name"] == "reference"}
  for r in rows:
    over = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "(default)"
    diff = "—" if r["name"] == "reference" else f"{r['miou_teacher'] - ref[r['group']]:+.1f}"
    ious = " | ".join(f"{r['per_class_iou_teacher'][c]:.1f}" for c in hardest)
    lines.append(f"| {r['group']} | {r['name']} | {over} | {r['miou_teacher']:.1f} | {diff} | "
                 f"{ious} |")
  return "\n".join(lines)


def main(argv):
  del argv
  cli.setup()
  unknown = sorted(set(FLAGS.names) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--names: unknown variants {unknown}; valid: {sorted(VARIANTS)}")
  t0, split, seed = time.time(), FLAGS.split, FLAGS.seed
  tag = f"{split.replace('/', '_')}_seed{seed}"
  rows, groups = [], {}
  for name in FLAGS.names:
    group, method, overrides = VARIANTS[name]
    if group not in groups:   # the group's reference, shared with the results grid
      groups[group] = method
      workdir = os.path.join(FLAGS.grid_dir, f"{method}_{tag}")
      print(f"=== {group} reference: {method} {split} seed {seed} -> {workdir}", flush=True)
      res = embedded_results.run_one(method, split, seed, workdir)
      rows.append(dict(group=group, name="reference", method=method, overrides={}, **_keep(res)))
    workdir = os.path.join(FLAGS.ablation_dir, f"{name}_{tag}")
    print(f"=== {name}: {method} {overrides} -> {workdir}", flush=True)
    res = embedded_results.run_one(method, split, seed, workdir, overrides)
    rows.append(dict(group=group, name=name, method=method, overrides=overrides, **_keep(res)))
  rows.sort(key=lambda r: (list(groups).index(r["group"]), r["name"] != "reference"))
  # The hardest classes of the DSSN reference (Fig. 5); of the first reference without DSSN.
  refs = [r for r in rows if r["name"] == "reference"]
  hard_ref = next((r for r in refs if r["method"] == "dssn"), refs[0])
  hardest = hardest_classes(hard_ref["per_class_iou_teacher"], FLAGS.hardest)
  md = table(rows, hardest)
  out = FLAGS.out or "results/ablations.json"
  cli.report_json({"split": split, "seed": seed, "rows": rows, "hardest_classes": hardest,
                   "table": md, "wall_seconds": time.time() - t0}, out)
  print(md)
  if FLAGS.readme:
    embedded_results.replace_block(FLAGS.readme, "ablations", md)


def _keep(res: dict) -> dict:
  return {k: res[k] for k in ("miou_teacher", "miou_student", "per_class_iou_teacher",
                              "train_seconds")}


if __name__ == "__main__":
  app.run(main)
