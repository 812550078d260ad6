"""One-call accelerator benchmark: step time, model FLOP utilisation and peak memory.

    python -m experiments.benchmarks.accelerator --preset=voc_r101 --out=results/accelerator.json
    python -m experiments.benchmarks.accelerator --preset=tiny       # CPU, about a minute

For supervised, mean teacher, DGCL and DSSN, each method's official VOC recipe step
(`experiments/configs/<method>.py:dataset=voc,protocol=blended_cps,split=1/16`, no data on
disk: synthetic batches; DeepLabv3+ ResNet-101, 513 crop, bfloat16 compute) is measured on
one device in two settings:

  * `per_gpu`: the recipe's per-GPU batch (its global batch / its GPU count, e.g. DGCL
    4 + 4) with the recipe's `model.remat`;
  * `global`: the recipe's whole global batch on this one device (DGCL, mean teacher and
    supervised 16 + 16 or 16; DSSN's recipe is 8 + 8) with `--global_remat` (blocks).

Per setting: compile seconds, median step seconds over `--steps` steps after two warm-up
steps, the step's model FLOPs (2 x multiply-adds of every convolution and matmul, scanned
ResNet blocks counted once per block; XLA's cost analysis counts a loop body once and is
reported next to it), the model FLOP utilisation against the device's nominal dense bf16
peak (`PEAK_TFLOPS`) and against a bf16 matmul peak measured in the same run, XLA's
compiled memory analysis of the step and the runtime's peak bytes in use. DGCL's banks are
filled first (its loss waits for full banks, as the official code).

All steps are traced and lowered one after the other, compiled in parallel threads, and
timed only once every compile has finished (autotuning would disturb the timings);
`--budget_s` stops the timing early (the JSON still lists what was measured). The module
imports only JAX, flax, optax, numpy, absl, ml_collections and semijax's model / method /
train-step code: no grain, TensorFlow Datasets, tensorboardX or orbax
(`heavy_modules_loaded` in the JSON proves it). `experiments/benchmarks/gpu_run.sh` runs it
on a machine whose JAX is already installed.
"""

import os

if __name__ == "__main__":
  # Let one step use most of the accelerator (JAX preallocates 75 % by default).
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import concurrent.futures  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli  # noqa: E402
from experiments.benchmarks import recipe_step  # noqa: E402

flags.DEFINE_integer("timed_steps", None, "Timed steps per setting (default: the preset's).")
flags.DEFINE_string("global_remat", "blocks", "model.remat of the `global` setting.")
flags.DEFINE_float("budget_s", None, "Stop timing new settings after this many seconds "
                   "(default: the preset's, 450 for voc_r101 so that it ends within 8 minutes).")
flags.DEFINE_integer("compile_threads", 4, "Parallel compiles.")
FLAGS = flags.FLAGS

# Nominal dense (no sparsity) bfloat16 tensor-core peaks, TFLOP/s, matched in `device_kind`
# in this order. H200 has H100 SXM's compute (more and faster memory).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),      # SXM5
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
)
HEAVY_MODULES = ("grain", "tensorflow_datasets", "tensorflow", "tensorboardX", "orbax", "torch")

PRESETS = {
    "voc_r101": dict(methods=("supervised", "mean_teacher", "dgcl", "dssn"), timed_steps=10,
                     matmul_size=8192, budget_s=450.0, overrides={}),
    # CPU check of the same code path: the recipes with the small CPU model and tiny crops.
    "tiny": dict(methods=("supervised", "mean_teacher", "dgcl", "dssn"), timed_steps=2,
                 matmul_size=512, budget_s=float("inf"), per_gpu_batch=1, global_batch=2,
                 overrides={
                     "model.name": "deeplabv3plus_small", "model.dtype": "float32",
                     "data.crop_size": 33}),
}
# The small model's own arguments replace the recipe's ResNet-101 ones.
_TINY_KWARGS = dict(widths=(8, 16, 16, 16), stem_width=8, stem_stride=2, stem_pool=True,
                    output_stride=8)
# DGCL's bank and sample sizes, under the field names of its config blocks.
_TINY_METHOD = {"bank_size": 64, "push_per_class": 16, "min_bank_size": 16, "max_per_class": 64,
                "num_anchors": 8, "num_batch_keys": 4, "num_bank_keys": 4,
                "num_negatives": 16, "projection_dim": 16}
_TINY_BLOCKS = ("dgcl", "dgcl_contrast")


if "preset" not in FLAGS:   # another benchmark imported in the same process may define it
  flags.DEFINE_enum("preset", "voc_r101", list(PRESETS), "What to measure.")


def peak_tflops(device) -> Optional[float]:
  """The nominal bf16 peak of `device` (None for CPUs and unknown devices)."""
  kind = getattr(device, "device_kind", "") or ""
  for name, peak in PEAK_TFLOPS:
    if name in kind:
      return peak
  return None


def measured_matmul_tflops(size: int, reps: int = 10) -> Dict[str, float]:
  """Best-of-`reps` throughput of a `size`^3 matmul in bfloat16 (and float32 on CPU)."""
  out = {}
  dtypes = ("bfloat16",) if jax.default_backend() != "cpu" else ("bfloat16", "float32")
  for dtype in dtypes:
    a = jnp.ones((size, size), dtype)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(mm(a))
      best = min(best, time.perf_counter() - t)
    out[dtype] = 2 * size ** 3 / best / 1e12
  return out


def settings_config(method: str, setting: str, preset: dict, global_remat: str):
  """A method's recipe config for one setting ('per_gpu' or 'global')."""
  config = recipe_step.recipe_config(method)
  gpus = int(config.recipe.gpus)
  global_batch = int(config.data.labeled_batch)
  semi = int(config.data.unlabeled_batch) > 0
  if "per_gpu_batch" in preset:   # tiny
    batch = preset["per_gpu_batch"] if setting == "per_gpu" else preset["global_batch"]
  else:
    batch = global_batch // gpus if setting == "per_gpu" else global_batch
  fields = {"data.labeled_batch": batch, "data.unlabeled_batch": batch if semi else 0,
            "train.num_devices": 1, **preset["overrides"]}
  if setting == "global":
    fields["model.remat"] = global_remat
  config = recipe_step.override(config, **fields)
  if preset is PRESETS["tiny"]:
    with config.unlocked():
      config.model.kwargs = type(config.model.kwargs)(_TINY_KWARGS)
      for block in _TINY_BLOCKS:
        for field, value in _TINY_METHOD.items():
          if block in config and field in config[block]:
            config[block][field] = value
  return config


def _time(step, steps: int) -> Dict[str, Any]:
  state, batch = recipe_step.concrete_inputs(step)
  state = recipe_step.fill_banks(state)
  compiled = step.compiled
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  finite = bool(np.asarray(metrics.get("finite", 1.0)))
  dgcl_full = metrics.get("dgcl/bank_full")
  out = {"step_seconds_median": float(np.median(times)), "step_seconds_min": float(np.min(times)),
         "step_seconds": [round(x, 5) for x in times], "loss_finite": finite}
  if dgcl_full is not None:
    out["dgcl_bank_full"] = float(dgcl_full)
  del state, batch
  return out


def run(preset_name: str, *, timed_steps: Optional[int] = None, global_remat: str = "blocks",
        budget_s: Optional[float] = None, compile_threads: int = 4, methods=None) -> dict:
  """The whole measurement; returns the JSON-able result."""
  t_start = time.perf_counter()
  preset = PRESETS[preset_name]
  budget_s = preset["budget_s"] if budget_s is None else budget_s
  steps = timed_steps or preset["timed_steps"]
  device = jax.devices()[0]
  nominal = peak_tflops(device)
  result: Dict[str, Any] = {
      "preset": preset_name, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
      "jax": jax.__version__, "backend": jax.default_backend(),
      "device_kind": device.device_kind, "device_count": jax.device_count(),
      "peak_tflops_table": dict(PEAK_TFLOPS), "peak_tflops_nominal": nominal,
      "timed_steps": steps, "global_remat": global_remat, "settings": {}}
  result["matmul_tflops_measured"] = measured_matmul_tflops(preset["matmul_size"])
  measured = result["matmul_tflops_measured"]["bfloat16"]

  # Trace and lower every setting here (Python), compile them in threads (XLA, no GIL).
  entries = []
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=compile_threads)
  for method in methods or preset["methods"]:
    for setting in ("per_gpu", "global"):
      name = f"{method}/{setting}"
      entry: Dict[str, Any] = {"method": method, "setting": setting}
      result["settings"][name] = entry
      try:
        config = settings_config(method, setting, preset, global_remat)
        step = recipe_step.build_step(config, num_devices=1)
        entry.update(step.info)
        t = time.perf_counter()
        traced = step.trace()
        lowered = traced.lower()
        entry["lower_seconds"] = time.perf_counter() - t
        entry["model_flops"] = recipe_step.jaxpr_matmul_flops(traced.jaxpr)

        def compile_(lowered=lowered):
          t = time.perf_counter()
          compiled = lowered.compile()
          return compiled, time.perf_counter() - t
        entries.append((name, step, pool.submit(compile_)))
      except Exception as e:  # pylint: disable=broad-except
        entry["error"] = f"{type(e).__name__}: {e}"[:2000]
      print(f"[accelerator] traced {name} ({time.perf_counter() - t_start:.0f} s)", flush=True)
  compiled_steps = []
  for name, step, future in entries:
    entry = result["settings"][name]
    try:
      step.compiled, entry["compile_seconds"] = future.result()
      entry["xla_flops"] = recipe_step.cost_flops(step.compiled)
      entry["memory"] = recipe_step.memory_stats(step.compiled)
      entry["compiled_peak_gb"] = entry["memory"].get("peak_bytes", 0) / 1e9
      compiled_steps.append((name, step))
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
    print(f"[accelerator] compiled {name} ({time.perf_counter() - t_start:.0f} s)", flush=True)
  pool.shutdown()
  result["compile_wall_seconds"] = time.perf_counter() - t_start

  for name, step in compiled_steps:
    entry = result["settings"][name]
    if time.perf_counter() - t_start > budget_s:
      entry["skipped"] = f"time budget of {budget_s:.0f} s spent"
      continue
    try:
      entry.update(_time(step, steps))
      t = entry["step_seconds_median"]
      entry["achieved_tflops"] = entry["model_flops"] / t / 1e12
      entry["mfu_nominal"] = entry["achieved_tflops"] / nominal if nominal else None
      entry["mfu_measured_peak"] = entry["achieved_tflops"] / measured
      stats = device.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        entry["runtime_peak_gb_so_far"] = stats["peak_bytes_in_use"] / 1e9
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
    step.compiled = None
    gc.collect()
    print(f"[accelerator] timed {name}: {entry.get('step_seconds_median', float('nan')):.4f} s, "
          f"MFU {entry.get('mfu_nominal') or entry.get('mfu_measured_peak', 0):.3f} "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)

  dgcl = result["settings"].get("dgcl/global", {})
  result["targets"] = {
      "dgcl_global_step_seconds": dgcl.get("step_seconds_median"),
      "dgcl_global_step_at_most_0.15_s": (dgcl.get("step_seconds_median", 1e9) <= 0.15
                                          if "step_seconds_median" in dgcl else None),
      "dgcl_global_mfu_nominal": dgcl.get("mfu_nominal"),
      "dgcl_global_mfu_at_least_0.4": (dgcl["mfu_nominal"] >= 0.4
                                       if dgcl.get("mfu_nominal") else None)}
  result["heavy_modules_loaded"] = sorted({m.split(".")[0] for m in sys.modules
                                           if m.split(".")[0] in HEAVY_MODULES})
  result["wall_seconds"] = time.perf_counter() - t_start
  return result


def main(argv):
  del argv
  cli.setup()
  if FLAGS.preset not in PRESETS:
    raise app.UsageError(f"--preset={FLAGS.preset}; expected one of {sorted(PRESETS)}")
  cli.report_json(run(FLAGS.preset, timed_steps=FLAGS.timed_steps,
                      global_remat=FLAGS.global_remat, budget_s=FLAGS.budget_s,
                      compile_threads=FLAGS.compile_threads), FLAGS.out)


if __name__ == "__main__":
  app.run(main)
