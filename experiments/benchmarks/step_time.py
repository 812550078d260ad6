"""Train-step benchmark: compile time, steady-state step time, and the machine's peak.

    python -m experiments.benchmarks.step_time --preset=demo --out=results/step_time_demo.json
    python -m experiments.benchmarks.step_time --preset=r101_cpu --out=results/step_time_r101.json
    python -m experiments.benchmarks.step_time --config=experiments/configs/dgcl.py:split=1/8
    # the same preset before issue 17 (git revision) and now, timed alternately:
    python -m experiments.benchmarks.step_time --preset=demo --baseline=12589ec \
        --out=results/step_time_demo_vs_baseline.json

In the same process it measures float32 matmul and conv throughput (best of several
repetitions, before and after the step timings, since CPU throughput here drifts by up to
2x within an hour) and reports the step's XLA-counted FLOPs as a fraction of that peak.
The batch is synthetic (random images and labels of the configured shapes): the data
pipeline is not part of the step.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import cli

flags.DEFINE_integer("steps", 10, "Timed steady-state steps (after one warm-up step).")
config_flags.DEFINE_config_file("config", None, "Config file (path.py:args).",
                                lock_config=True)
FLAGS = flags.FLAGS

PRESETS = {
    # The demo's own config (embedded data, small DeepLabv3+), as `make demo` trains it.
    "demo": ("dgcl", {}),
    # DeepLabv3+ ResNet-101 (deep stem, OS16) at 321x321, 2 labeled + 2 unlabeled images.
    "r101_cpu": ("mean_teacher", {
        "model.name": "deeplabv3plus_resnet101", "model.kwargs": {"stem": "deep"},
        "data.crop_size": 321, "data.labeled_batch": 2, "data.unlabeled_batch": 2,
        "train.num_devices": 1}),
}


if "preset" not in flags.FLAGS:   # the accelerator benchmark defines one too
  flags.DEFINE_enum("preset", None, list(PRESETS), "A named benchmark entry.")


def _best_time(fn, reps: int) -> float:
  fn()  # compile / warm
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def machine_peak(reps: int = 5) -> dict:
  """Best-of-`reps` float32 GFLOP/s of a 2048^3 matmul and a 3x3 conv (NHWC)."""
  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  t_mm = _best_time(lambda: mm(a), reps)
  x = jnp.ones((8, 128, 128, 64), jnp.float32)
  w = jnp.ones((3, 3, 64, 64), jnp.float32)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  t_conv = _best_time(lambda: conv(x, w), reps)
  return {"matmul_gflops": 2 * 2048 ** 3 / t_mm / 1e9,
          "conv_gflops": 2 * 8 * 128 * 128 * 64 * 64 * 9 / t_conv / 1e9}


def synthetic_batch(config, num_classes: int, uses_unlabeled: bool, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  s = config.data.crop_size

  def part(n):
    return {"image": rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, (n, s, s)).astype(np.uint8),
            "pad": np.zeros((n, s, s), bool), "index": np.arange(n)}
  batch = {"labeled": part(config.data.labeled_batch)}
  if uses_unlabeled:
    batch["unlabeled"] = part(config.data.unlabeled_batch)
  return batch


def compile_step(config, lib: str = "semijax"):
  """The config's compiled train step, a fresh state and a synthetic batch, plus its facts.

  `lib` names the package: 'semijax', or a baseline revision's `semijax_base`
  (`legacy.import_baseline`).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  parallel = importlib.import_module(f"{lib}.parallel")
  loop = importlib.import_module(f"{lib}.train.loop")
  step_lib = importlib.import_module(f"{lib}.train.step")
  run = loop.Run(config, "/tmp/semijax-benchmark")
  state = run.init_state()
  batch = parallel.put_batch(synthetic_batch(config, run.info.num_classes,
                                             run.method.uses_unlabeled), run.mesh)
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, config), donate_argnums=0)
  t = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  info = {"compile_seconds": compile_s,
          "step_flops": float(cost.get("flops", 0.0)) if cost else 0.0,
          "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
          "devices": run.mesh.devices.size, "platform": jax.devices()[0].platform}
  state, metrics = compiled(state, batch)   # warm-up step
  jax.block_until_ready(metrics)
  return compiled, state, batch, info


def time_steps(compiled, state, batch, steps: int):
  """Runs `steps` steps; returns (the new state, the list of per-step seconds)."""
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return state, times


def benchmark_step(config, steps: int) -> dict:
  """Compile and steady-state time of the config's train step on a synthetic batch."""
  compiled, state, batch, info = compile_step(config)
  _, times = time_steps(compiled, state, batch, steps)
  return {**info, "step_seconds_median": float(np.median(times)),
          "step_seconds_min": float(np.min(times))}


def preset_config(preset: str, configs: str = "experiments"):
  """A preset's config from the `configs` package ('experiments' or a baseline's)."""
  import importlib  # pylint: disable=g-import-not-at-top
  name, overrides = PRESETS[preset]
  config = importlib.import_module(f"{configs}.configs.{name}").get_config("")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def compare_baseline(preset: str, ref: str, *, steps: int, rounds: int) -> dict:
  """The preset's step at revision `ref` and in the working tree, timed alternately."""
  from experiments.benchmarks import legacy  # pylint: disable=g-import-not-at-top
  legacy.import_baseline(ref)
  runs = {}
  for name, lib, configs in (("old", "semijax_base", "experiments_base"),
                             ("new", "semijax", "experiments")):
    compiled, state, batch, info = compile_step(preset_config(preset, configs), lib)
    runs[name] = [compiled, state, batch, info, []]
    print(f"compiled {name}: {info['compile_seconds']:.1f} s", flush=True)
  before = machine_peak()
  for _ in range(rounds):
    for r in runs.values():
      r[1], times = time_steps(r[0], r[1], r[2], steps)
      r[4].extend(times)
  after = machine_peak()
  peak = {k: max(before[k], after[k]) for k in before}
  out = {"preset": preset, "baseline": ref, "rounds": rounds, "steps": steps,
         "peak_before": before, "peak_after": after, "jax": jax.__version__,
         "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}
  for name, (_, _, _, info, times) in runs.items():
    med = float(np.median(times))
    achieved = info["step_flops"] / med / 1e9
    out[name] = {**info, "step_seconds_median": med, "step_seconds_min": float(np.min(times)),
                 "achieved_gflops": achieved,
                 "fraction_of_matmul_peak": achieved / peak["matmul_gflops"],
                 "fraction_of_conv_peak": achieved / peak["conv_gflops"]}
  out["speedup_median"] = out["old"]["step_seconds_median"] / out["new"]["step_seconds_median"]
  out["fraction_of_peak_ratio"] = (out["new"]["fraction_of_matmul_peak"]
                                   / out["old"]["fraction_of_matmul_peak"])
  return out


def main(argv):
  del argv
  cli.setup()
  if FLAGS.preset and FLAGS.preset not in PRESETS:
    raise app.UsageError(f"--preset={FLAGS.preset}; expected one of {sorted(PRESETS)}")
  # --baseline (a git revision) and --rounds are the package's shared flags.
  if FLAGS.preset and FLAGS.baseline:
    cli.report_json(compare_baseline(FLAGS.preset, FLAGS.baseline, steps=FLAGS.steps,
                                     rounds=FLAGS.rounds), FLAGS.out)
    return
  if FLAGS.preset:
    config = preset_config(FLAGS.preset)
  elif FLAGS.config is not None:
    config = FLAGS.config
  else:
    raise app.UsageError("give --preset or --config")
  before = machine_peak()
  step = benchmark_step(config, FLAGS.steps)
  after = machine_peak()
  peak = {k: max(before[k], after[k]) for k in before}
  achieved = step["step_flops"] / step["step_seconds_median"] / 1e9
  result = {
      "preset": FLAGS.preset, "method": config.method.name, "model": config.model.name,
      "crop_size": config.data.crop_size, "labeled_batch": config.data.labeled_batch,
      "unlabeled_batch": config.data.unlabeled_batch, **step,
      "achieved_gflops": achieved, "peak_before": before, "peak_after": after,
      "fraction_of_matmul_peak": achieved / peak["matmul_gflops"],
      "fraction_of_conv_peak": achieved / peak["conv_gflops"],
      "jax": jax.__version__, "cpu_count": os.cpu_count(),
  }
  cli.report_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
