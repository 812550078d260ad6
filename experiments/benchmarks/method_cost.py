"""Train-step cost of every method relative to mean teacher, measured side by side.

    python -m experiments.benchmarks.method_cost --out=results/method_cost.json \\
        [--methods=supervised,mean_teacher,dgcl,dssn] [--rounds=3] [--steps=10]

With `--baseline=REV` the same methods at git revision REV are compiled too and take part
in the same alternating rounds (old and new side by side).

Every method's step (its embedded config, one device, synthetic batch) is compiled first;
then the timing alternates between methods for `rounds` rounds of `steps` steps, so a drift
of the machine's speed (up to 2x within an hour here) hits every method alike. Reports the
median step time, XLA FLOPs and the ratio of both to mean teacher's.
"""

import importlib
import os

import numpy as np
from absl import app, flags

from experiments import cli
from experiments.benchmarks import step_time

flags.DEFINE_string("reference", "mean_teacher", "Method the ratios are relative to.")
flags.DEFINE_string("config_arg", "", "Argument of every config (e.g. 'smoke', 'split=1/8').")
# --steps (per method per round) from step_time; --out, --rounds, --baseline: the package's.
FLAGS = flags.FLAGS


def _ratios(methods: dict, reference: str) -> dict:
  ref = methods.get(reference)
  for m in methods.values():
    if ref:
      m["time_ratio_to_reference"] = m["step_seconds_median"] / ref["step_seconds_median"]
      m["flops_ratio_to_reference"] = m["step_flops"] / max(ref["step_flops"], 1.0)
  return methods


def main(argv):
  del argv
  cli.setup()
  versions = [("new", "semijax", "experiments")]
  if FLAGS.baseline:
    from experiments.benchmarks import legacy  # pylint: disable=g-import-not-at-top
    legacy.import_baseline(FLAGS.baseline)
    versions.insert(0, ("old", "semijax_base", "experiments_base"))
  runs = {}
  for version, lib, configs in versions:
    for name in FLAGS.methods:
      config = importlib.import_module(f"{configs}.configs.{name}").get_config(FLAGS.config_arg)
      config.train.num_devices = 1
      runs[(version, name)] = list(step_time.compile_step(config, lib)) + [[]]
      print(f"compiled {version} {name}: {runs[(version, name)][3]['compile_seconds']:.1f} s",
            flush=True)
  for _ in range(FLAGS.rounds):
    for r in runs.values():
      r[1], times = step_time.time_steps(r[0], r[1], r[2], FLAGS.steps)
      r[4].extend(times)
  out = {"reference": FLAGS.reference, "rounds": FLAGS.rounds, "steps": FLAGS.steps,
         "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}
  for version, _, _ in versions:
    methods = {}
    for (v, name), (_, _, _, info, times) in runs.items():
      if v == version:
        methods[name] = {**info, "step_seconds_median": float(np.median(times)),
                         "step_seconds_min": float(np.min(times))}
    out["methods" if version == "new" else "baseline_methods"] = _ratios(methods,
                                                                         FLAGS.reference)
  if FLAGS.baseline:
    out["baseline"] = FLAGS.baseline
  cli.report_json(out, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
