"""Peak device memory of each method's VOC recipe step, from XLA's compiled memory analysis.

    python -m experiments.benchmarks.memory --out=results/memory.json \\
        [--methods=supervised,mean_teacher,dgcl,dssn] [--device_counts=1,2,4,8] \\
        [--remat=none,blocks,full] [--full_remat_devices=1]

For every method, its official VOC recipe (`experiments/configs/<method>.py:dataset=voc,
protocol=blended_cps,split=1/16`; ResNet-101, 513 crop, bfloat16 compute, the recipe's
global batch, e.g. DGCL 16 + 16) is compiled on 1, 2, 4 and 8 (fake CPU) devices, i.e. at
per-device batches of global / n, with each `model.remat` setting. XLA's memory analysis of
the compiled (partitioned) step gives the bytes one device holds: arguments + outputs +
temporaries - donated (aliased) bytes. No data and no accelerator are needed; nothing is
run. The recipe's own layout (its GPU count) is marked, and the cheapest setting that fits
an 80 GB device there is what `experiments/configs/recipes.py` sets.

Each entry also has `semijax.models.memory`'s traced estimate (the number the trainer can
compute before compiling) for comparison.

Caveat: this is the CPU compiler's buffer assignment. A GPU build fuses differently and adds
cuDNN workspace, so the accelerator benchmark (`accelerator.py`) reports the GPU's own
figure when one is available.
"""

import os

if __name__ == "__main__":   # fake devices for the mesh; must precede JAX's initialisation
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from experiments.benchmarks import recipe_step  # noqa: E402

flags.DEFINE_list("device_counts", ["1", "2", "4", "8"],
                 "Device counts (the global batch is split).")
flags.DEFINE_list("remat", ["none", "blocks", "full"], "model.remat settings.")
flags.DEFINE_list("full_remat_devices", ["1"],
                  "Device counts at which 'full' remat is compiled (it matters only where "
                  "'blocks' does not fit).")
flags.DEFINE_string("recipe_dataset", "voc", "Recipe dataset: voc or cityscapes.")
flags.DEFINE_string("recipe_protocol", "blended_cps", "Split protocol of the recipe.")
flags.DEFINE_string("recipe_split", "1/16", "Split of the recipe.")
flags.DEFINE_float("device_gb", 80.0, "Device memory the recipe settings must fit (GB).")
FLAGS = flags.FLAGS

GB = 1e9


def measure(method: str, devices: int, remat: str, *, dataset: str = "voc",
            protocol: str = "blended_cps", split: str = "1/16", estimate: bool = True,
            overrides=None) -> dict:
  """One compiled recipe step's memory (bytes per device) and its traced estimate."""
  from semijax.models import memory  # pylint: disable=g-import-not-at-top
  config = recipe_step.recipe_config(method, dataset=dataset, protocol=protocol, split=split)
  config = recipe_step.override(config, **{"model.remat": remat, **(overrides or {})})
  step = recipe_step.build_step(config, num_devices=devices)
  entry = {**step.info, "per_device_labeled": config.data.labeled_batch // devices,
           "per_device_unlabeled": step.info["unlabeled_batch"] // devices,
           "recipe_gpus": int(config.recipe.gpus),
           "recipe_layout": devices == int(config.recipe.gpus)}
  if estimate:
    t = time.perf_counter()
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), step.state)
    entry["estimate_bytes"] = memory.estimate_step_bytes(
        step.fn, state, memory.per_device(step.batch, devices))
    entry["estimate_seconds"] = time.perf_counter() - t
  compiled = recipe_step.compile_step(step)
  entry.update(lower_seconds=compiled["lower_seconds"],
               compile_seconds=compiled["compile_seconds"],
               **recipe_step.memory_stats(compiled["compiled"]))
  entry["peak_gb"] = entry["peak_bytes"] / GB
  return entry


def recommend(entries, device_gb: float) -> dict:
  """Per method: the cheapest remat that fits `device_gb` at the recipe's own layout."""
  order = ("none", "blocks", "full")
  out = {}
  for method in sorted({e["method"] for e in entries}):
    at_recipe = {e["remat"]: e for e in entries
                 if e["method"] == method and e["recipe_layout"]}
    fits = [r for r in order if r in at_recipe and at_recipe[r]["peak_gb"] <= device_gb]
    out[method] = {"remat": fits[0] if fits else None,
                   "peak_gb": {r: at_recipe[r]["peak_gb"] for r in order if r in at_recipe}}
  return out


def _write_partial(entries) -> None:
  """The entries so far, so that an interrupted run keeps what it measured."""
  if FLAGS.out:
    import json  # pylint: disable=g-import-not-at-top
    with open(FLAGS.out + ".partial", "w") as f:
      json.dump({"entries": entries}, f, indent=1)


def main(argv):
  del argv
  cli.setup()
  entries = []
  for method in FLAGS.methods:
    for n in (int(d) for d in FLAGS.device_counts):
      for remat in FLAGS.remat:
        if remat == "full" and str(n) not in FLAGS.full_remat_devices:
          continue
        t = time.perf_counter()
        e = measure(method, n, remat, dataset=FLAGS.recipe_dataset,
                    protocol=FLAGS.recipe_protocol, split=FLAGS.recipe_split)
        entries.append(e)
        _write_partial(entries)
        print(f"{method:13s} devices={n} remat={remat:6s} per-device "
              f"{e['per_device_labeled']}+{e['per_device_unlabeled']}: XLA {e['peak_gb']:.1f} GB, "
              f"estimate {e.get('estimate_bytes', 0) / GB:.1f} GB "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
  cli.report_json({"dataset": FLAGS.recipe_dataset, "protocol": FLAGS.recipe_protocol,
                   "split": FLAGS.recipe_split,
                   "device_gb": FLAGS.device_gb, "jax": jax.__version__,
                   "backend": jax.default_backend(), "entries": entries,
                   "recommended": recommend(entries, FLAGS.device_gb)}, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
