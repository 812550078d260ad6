"""Compile time of every method's ResNet-101 train step, scanned blocks vs one module per block.

    python -m experiments.benchmarks.compile_time --out=results/compile_time.json \\
        [--methods=supervised,mean_teacher,dgcl,dssn] [--layouts=scanned,unscanned]

Each method's official VOC recipe step (DeepLabv3+ ResNet-101 deep stem, its output stride
and multi-grid, bfloat16 compute, the full train step: teacher, strong views, losses,
optimizer, EMA) is traced, lowered and compiled for one device with `model.kwargs.
scan_blocks` True (the default since issue 17: identical residual blocks run as one
`nn.scan`) and False (one module per block, the layout before it), in the same process.
Crop and batch are reduced (`--crop`, `--batch`): compile time depends on the program, not
on the array sizes. The persistent compilation cache is off.

Reported per entry: wall and process-CPU seconds of lowering and of XLA's compile, the
number of fusions in the compiled program, and the load average. The host is shared and its
speed drifts (stack-facts): CPU seconds are the contention-robust figure (on a quiet
2-core host XLA's compile runs mostly on one core, so wall ~ CPU seconds there).
"""

import os
import time

import jax
from absl import app, flags

from experiments import cli
from experiments.benchmarks import recipe_step

flags.DEFINE_list("layouts", ["scanned", "unscanned"], "ResNet block layouts to compile.")
flags.DEFINE_integer("crop", 321, "Crop side of the compiled step.")
flags.DEFINE_integer("batch", 2, "Global labeled (and unlabeled) batch of the compiled step.")
flags.DEFINE_string("dtype", "", "Override model.dtype (default: the recipe's bfloat16).")
FLAGS = flags.FLAGS


def measure(method: str, scanned: bool, *, crop: int = 321, batch: int = 2,
            dtype: str = "", embedded: bool = False) -> dict:
  """Lower and compile one method's step; seconds (wall and CPU) of both phases."""
  if embedded:
    config = recipe_step.embedded_config(method)
  else:
    config = recipe_step.recipe_config(method)
    config = recipe_step.override(config, **{
        "data.crop_size": crop, "data.labeled_batch": batch, "data.unlabeled_batch": batch,
        "model.dtype": dtype or None})
    with config.unlocked():
      config.model.kwargs.scan_blocks = scanned
  step = recipe_step.build_step(config, num_devices=1)
  load = os.getloadavg()[0]
  t, c = time.perf_counter(), time.process_time()
  traced = step.trace()
  lowered = traced.lower()
  lower_wall, lower_cpu = time.perf_counter() - t, time.process_time() - c
  t, c = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_wall, compile_cpu = time.perf_counter() - t, time.process_time() - c
  return {**step.info, "layout": "scanned" if scanned else "unscanned",
          "lower_seconds": lower_wall, "lower_cpu_seconds": lower_cpu,
          "compile_seconds": compile_wall, "compile_cpu_seconds": compile_cpu,
          "total_seconds": lower_wall + compile_wall,
          "total_cpu_seconds": lower_cpu + compile_cpu,
          "fusions": compiled.as_text().count(" fusion("),
          # XLA counts a loop body once (scanned blocks once); the jaxpr count multiplies
          # scan bodies by their length and includes padding taps (see recipe_step).
          "xla_flops": recipe_step.cost_flops(compiled),
          "model_flops": recipe_step.jaxpr_matmul_flops(traced.jaxpr),
          "loadavg_before": load, "loadavg_after": os.getloadavg()[0]}


def main(argv):
  del argv
  cli.setup()
  jax.config.update("jax_enable_compilation_cache", False)
  entries = []
  for layout in FLAGS.layouts:   # every method's scanned step first: the slow ones last
    for method in FLAGS.methods:
      e = measure(method, layout == "scanned", crop=FLAGS.crop, batch=FLAGS.batch,
                  dtype=FLAGS.dtype)
      entries.append(e)
      if FLAGS.out:   # kept if the run is interrupted
        import json  # pylint: disable=g-import-not-at-top
        with open(FLAGS.out + ".partial", "w") as f:
          json.dump(entries, f, indent=1)
      print(f"{method:13s} {layout:9s} lower {e['lower_seconds']:.1f} s, compile "
            f"{e['compile_seconds']:.1f} s wall / {e['compile_cpu_seconds']:.1f} s CPU, "
            f"{e['fusions']} fusions, load {e['loadavg_before']:.1f}", flush=True)
  summary = {}
  for method in FLAGS.methods:
    by = {e["layout"]: e for e in entries if e["method"] == method}
    summary[method] = {f"{k}_{layout}": by[layout][k] for layout in by
                       for k in ("total_seconds", "total_cpu_seconds")}
    if len(by) == 2:
      summary[method]["speedup_cpu"] = (by["unscanned"]["total_cpu_seconds"]
                                        / by["scanned"]["total_cpu_seconds"])
  cli.report_json({"crop": FLAGS.crop, "batch": FLAGS.batch, "jax": jax.__version__,
                   "cpu_count": os.cpu_count(), "entries": entries, "summary": summary},
                  FLAGS.out)


if __name__ == "__main__":
  app.run(main)
