"""Train-step cost of every method relative to mean teacher, measured side by side.

    python -m experiments.benchmarks.method_cost --out=results/method_cost.json \\
        [--methods=supervised,mean_teacher,dgcl,dssn] [--rounds=3] [--steps=10]

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

flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
flags.DEFINE_string("reference", "mean_teacher", "Method the ratios are relative to.")
flags.DEFINE_string("config_arg", "", "Argument of every config (e.g. 'smoke', 'split=1/8').")
FLAGS = flags.FLAGS   # --steps (per method per round) comes from step_time, --out from the package


def main(argv):
  del argv
  cli.setup()
  runs = {}
  for name in FLAGS.methods:
    config = importlib.import_module(f"experiments.configs.{name}").get_config(FLAGS.config_arg)
    config.train.num_devices = 1
    runs[name] = list(step_time.compile_step(config)) + [[]]
    print(f"compiled {name}: {runs[name][3]['compile_seconds']:.1f} s", flush=True)
  for _ in range(FLAGS.rounds):
    for name, r in runs.items():
      r[1], times = step_time.time_steps(r[0], r[1], r[2], FLAGS.steps)
      r[4].extend(times)
  methods = {}
  for name, (_, _, _, info, times) in runs.items():
    methods[name] = {**info, "step_seconds_median": float(np.median(times)),
                     "step_seconds_min": float(np.min(times))}
  ref = methods.get(FLAGS.reference)
  for m in methods.values():
    if ref:
      m["time_ratio_to_reference"] = m["step_seconds_median"] / ref["step_seconds_median"]
      m["flops_ratio_to_reference"] = m["step_flops"] / max(ref["step_flops"], 1.0)
  cli.report_json({"reference": FLAGS.reference, "rounds": FLAGS.rounds, "steps": FLAGS.steps,
                   "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
                   "methods": methods}, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
