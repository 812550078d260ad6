"""Train-step time of one config on 1, 2, 4 and 8 (fake CPU) devices.

    python -m experiments.benchmarks.device_scaling --preset=demo \
        --out=results/device_scaling_demo.json [--devices=1,2,4,8 --repeats=3 --steps=10]

(`--preset` and `--steps` are step_time's; the demo preset is the default.)

Each measurement runs in its own subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (the device count is fixed when JAX
starts) and `train.num_devices=N`: the same global batch, sharded over N devices. The
variants are interleaved (round-robin, `--repeats` rounds) because CPU throughput on a
shared host drifts by up to 2x within an hour; the JSON gives every measurement and, per
device count, the median over rounds of each round's median step time.

On a CPU host the fake devices share the same cores, so no speed-up is expected: the
numbers show the cost of partitioning (collectives, smaller per-device work), not scaling.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from experiments import cli

# Also defines --preset (default here: demo), --steps and --out.
from experiments.benchmarks import step_time

flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to measure.")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds over the device counts.")
flags.DEFINE_integer("timeout", 900, "Seconds allowed to one measurement subprocess.")
flags.DEFINE_integer("worker", 0, "Internal: measure in this process on this many devices.")
FLAGS = flags.FLAGS

MARK = "DEVICE_SCALING_RESULT "


def _config(preset: str, num_devices: int):
  import importlib  # pylint: disable=g-import-not-at-top
  name, overrides = step_time.PRESETS[preset]
  config = importlib.import_module(f"experiments.configs.{name}").get_config("")
  with config.unlocked():
    for key, value in {**overrides, "train.num_devices": num_devices}.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def _worker(num_devices: int) -> None:
  cli.setup()
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == num_devices, (jax.device_count(), num_devices)
  config = _config(FLAGS.preset or "demo", num_devices)
  result = step_time.benchmark_step(config, FLAGS.steps)
  result.update(labeled_batch=config.data.labeled_batch,
                unlabeled_batch=config.data.unlabeled_batch, method=config.method.name)
  print(MARK + json.dumps(result), flush=True)


def measure(num_devices: int) -> dict:
  """One measurement in a fresh process with `num_devices` fake CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  cmd = [sys.executable, "-m", "experiments.benchmarks.device_scaling",
         f"--worker={num_devices}", f"--preset={FLAGS.preset or 'demo'}",
         f"--steps={FLAGS.steps}",
         f"--jax_cache_dir={FLAGS.jax_cache_dir}"]
  t = time.time()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=FLAGS.timeout,
                       check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
  if out.returncode or not lines:
    raise RuntimeError(f"{num_devices} devices: exit {out.returncode}\n"
                       f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  result = json.loads(lines[-1][len(MARK):])
  result["wall_seconds"] = time.time() - t
  return result


def main(argv):
  del argv
  if FLAGS.worker:
    _worker(FLAGS.worker)
    return
  counts = [int(n) for n in FLAGS.devices]
  runs = {n: [] for n in counts}
  for r in range(FLAGS.repeats):
    for n in counts:
      res = measure(n)
      runs[n].append(res)
      print(f"round {r + 1}/{FLAGS.repeats}, {n} device(s): step "
            f"{res['step_seconds_median'] * 1e3:.1f} ms (median of {FLAGS.steps}), compile "
            f"{res['compile_seconds']:.1f} s", flush=True)
  base = float(np.median([x["step_seconds_median"] for x in runs[counts[0]]]))
  summary = {}
  for n in counts:
    med = float(np.median([x["step_seconds_median"] for x in runs[n]]))
    summary[str(n)] = {
        "step_seconds_median": med,
        "step_seconds_min": float(min(x["step_seconds_min"] for x in runs[n])),
        "speedup_vs_first": base / med,
        "compile_seconds": [x["compile_seconds"] for x in runs[n]],
        "per_device_batch": [runs[n][0]["labeled_batch"] / n, runs[n][0]["unlabeled_batch"] / n],
    }
  first = runs[counts[0]][0]
  result = {
      "preset": FLAGS.preset or "demo", "method": first["method"],
      "labeled_batch": first["labeled_batch"],
      "unlabeled_batch": first["unlabeled_batch"], "steps_per_measurement": FLAGS.steps,
      "repeats": FLAGS.repeats, "platform": first["platform"], "cpu_count": os.cpu_count(),
      "load_average_at_end": list(os.getloadavg()),
      "summary": summary, "runs": {str(n): runs[n] for n in counts},
  }
  print(json.dumps(summary, indent=1))
  if FLAGS.out:
    cli.report_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
