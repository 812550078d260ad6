"""CAC: step time and peak memory against the number of negatives (the paper's Table 4 grid).

    python -m experiments.benchmarks.cac_overhead --out=results/cac_overhead.json
    python -m experiments.benchmarks.cac_overhead --cac_scale=small        # seconds, for tests
    python -m experiments.benchmarks.cac_overhead --cac_run_dir=runs/cac_1_16   # Fig. 6 per epoch

The paper (Sec. 4.3): from 500 to 19.2k negatives per GPU, +800 MB of memory and 0.96 -> 1.18 s per
iteration (+23 %), thanks to gradient checkpointing over chunks. Target here: 500 -> 19.2k costs at
most +10 % step time and +10 % peak memory, measured side by side.

Two measurements, one process:

* **Train step** (`full`): the whole jitted CAC train step (labeled CE, both crops' forward and
  backward, projector, pooled classifier, alignment, directional loss over the negatives, memory
  push, SGD) of the VOC recipe's DeepLabv3+ ResNet-101 (torchvision stem, OS16, multi-grid, CAC
  decoder) at 320 x 320, once per negative count, all compiled first and then timed in interleaved
  rounds (the host's throughput drifts; stack-facts section 4). The recipe's per-device batch is
  4 labeled + 4 unlabeled pairs; on a 2-core CPU that step takes minutes, so the CPU default is
  `--cac_labeled_batch=1 --cac_unlabeled_batch=1` (the JSON records it). Both the model's cost and
  the loss's cost grow linearly with the batch at a fixed number of negatives per device, so the
  relative overhead does not depend on it. A count above the batch's own pixels (2 crops x 40 x
  40 per unlabeled image) is filled from the memory (`cac.memory_size`), below it by a random
  subset per view (`cac.negatives_per_view`), as the official code's `selected_num`/`step_save`.
  Peak memory: XLA's compiled memory analysis (arguments + outputs + temporaries - aliased, the
  state donated as in the trainer).
* **Loss only** (`loss`): `directional_contrastive_loss` value and gradient at the recipe's
  per-device batch (4 images x 40 x 40 pairs, 128-d projections), per negative count: time and
  XLA temporaries, chunked (`--cac_chunk_size`, official 8000) and, for reference, unchunked.
"""

import os
import time
from typing import Dict, List

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments import cli
from experiments.benchmarks import step_time

flags.DEFINE_enum("cac_scale", "recipe", ["recipe", "small"],
                  "recipe: DeepLabv3+ R101 at 320; small: the embedded model (seconds, tests).")
flags.DEFINE_list("cac_negatives", ["500", "2000", "6400", "12800", "19200", "25600"],
                  "Negatives per device (Table 4 grid).")
flags.DEFINE_integer("cac_labeled_batch", None, "Labeled images per step (default per preset).")
flags.DEFINE_integer("cac_unlabeled_batch", None, "Unlabeled pairs per step (default per preset).")
flags.DEFINE_integer("cac_loss_batch", 4, "Unlabeled pairs per device for the loss-only part.")
flags.DEFINE_integer("cac_chunk_size", 8000, "Negatives per streamed chunk (official 8000).")
flags.DEFINE_integer("cac_reps", 3, "Interleaved timing rounds.")
flags.DEFINE_integer("cac_timed_steps", 2, "Timed steps per configuration per round.")
flags.DEFINE_bool("cac_full", True, "Measure the whole train step.")
flags.DEFINE_bool("cac_loss", True, "Measure the loss alone.")
flags.DEFINE_string("cac_run_dir", None,
                    "Instead of measuring: the per-epoch negative-sample precision (Fig. 6) of a "
                    "finished embedded CAC run, from its metrics.jsonl.")
FLAGS = flags.FLAGS

# CAC's DeepLabv3+ (experiments/configs/cac.py) on the VOC recipe.
PRESETS = {
    "recipe": dict(model="deeplabv3plus_resnet101", crop=320, labeled=1, unlabeled=1,
                   downsample=True, stride=8, dim=128),
    "small": dict(model="deeplabv3plus_small", crop=32, labeled=2, unlabeled=2,
                  downsample=False, stride=4, dim=32),
}


def config_for(negatives: int, preset: Dict, *, chunk_size: int) -> ml_collections.ConfigDict:
  """CAC's config with `negatives` per step: a subset of the batch's pixels, or all of them
  plus a memory of the remainder."""
  from experiments.configs import cac as cac_config  # pylint: disable=g-import-not-at-top
  c = cac_config.get_config("")
  c.train.num_devices = 1
  c.model.name = preset["model"]
  if preset["model"] != "deeplabv3plus_small":
    c.model.kwargs = ml_collections.ConfigDict(dict(
        output_stride=16, multi_grid=(1, 2, 4), **cac_config._MODEL))  # pylint: disable=protected-access
    c.model.pretrained = ""     # embedded configs default to the small model's weights
    c.optim.name = "sgd"
    c.optim.base_lr = 0.001
    c.optim.head_lr_mult = 10.0
  c.data.crop_size = preset["crop"]
  c.data.labeled_batch = preset["labeled"]
  c.data.unlabeled_batch = preset["unlabeled"]
  c.train.supervised_warmup_steps = 0
  c.cac.downsample = preset["downsample"]
  c.cac.stride = preset["stride"]
  c.cac.projection_dim = preset["dim"]
  c.cac.chunk_size = chunk_size
  current = cac_config.negatives_per_step(c)
  c.cac.memory_steps = 0
  if negatives <= current:
    c.cac.negatives_per_view = negatives // 2
    c.cac.memory_size = 0
  else:
    c.cac.negatives_per_view = 0
    c.cac.memory_size = negatives - current
  return c


def pair_batch(config, method, n: int, *, seed: int = 0, num_classes: int = 11) -> dict:
  """`n` unlabeled records through the method's `unlabeled_transform` (random images 1.25 x the
  crop, random hidden labels), stacked like the pipeline's batches."""
  rng = np.random.default_rng(seed)
  s = config.data.crop_size
  transform = method.unlabeled_transform(None)
  records = []
  for i in range(n):
    side = int(s * 1.25)
    rec = {"image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
           "label": np.full((side, side), 255, np.uint8),
           "hidden_label": rng.integers(0, num_classes, (side, side)).astype(np.uint8),
           "index": np.int64(i)}
    records.append(transform.random_map(rec, np.random.default_rng([seed, i])))
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


def cac_batch(config, run, *, seed: int = 0) -> dict:
  """A global batch for CAC's train step: synthetic labeled part, `pair_batch` unlabeled part."""
  batch = step_time.synthetic_batch(config, run.info.num_classes, False, seed=seed)
  batch["unlabeled"] = pair_batch(config, run.method, config.data.unlabeled_batch, seed=seed,
                                  num_classes=run.info.num_classes)
  return batch


def _capacity(config) -> int:
  """Negatives per step once the memory is full: the batch's share plus the memory."""
  from experiments.configs import cac as cac_config  # pylint: disable=g-import-not-at-top
  per_view = config.cac.negatives_per_view or cac_config.negatives_per_step(config) // 2
  return 2 * per_view + config.cac.memory_size


def _memory(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp",
                                                            "alias", "generated_code")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def full_step(grid: List[int], preset: Dict) -> Dict:
  """Compiles the train step for every count, then interleaved timing rounds."""
  from semijax import parallel  # pylint: disable=g-import-not-at-top
  from semijax.train import loop, step as step_lib  # pylint: disable=g-import-not-at-top
  entries = {}
  for n in grid:
    config = config_for(n, preset, chunk_size=FLAGS.cac_chunk_size)
    run = loop.Run(config, "/tmp/semijax-benchmark")
    state = run.init_state()
    batch = parallel.put_batch(cac_batch(config, run), run.mesh)
    fn = jax.jit(step_lib.make_train_step(run.model, run.method, config), donate_argnums=0)
    t = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, batch)   # warm-up
    jax.block_until_ready(metrics)
    entries[n] = dict(compiled=compiled, state=state, batch=batch, times=[],
                      info={"compile_seconds": compile_s, "memory": _memory(compiled),
                            "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
                            "negatives_per_view": config.cac.negatives_per_view,
                            "memory_size": config.cac.memory_size,
                            "negative_capacity": _capacity(config),
                            "valid_negatives_first_step": float(metrics["cac/num_negatives"])})
    print(f"compiled {n} negatives in {compile_s:.0f} s: {entries[n]['info']}", flush=True)
  for r in range(FLAGS.cac_reps):
    for n in grid:
      e = entries[n]
      e["state"], times = step_time.time_steps(e["compiled"], e["state"], e["batch"],
                                               FLAGS.cac_timed_steps)
      e["times"] += times
    print(f"round {r + 1}: " + ", ".join(f"{n}: {np.median(entries[n]['times']):.2f} s"
                                         for n in grid), flush=True)
  rows = {}
  for n in grid:
    e = entries[n]
    rows[n] = {**e["info"], "step_seconds_median": float(np.median(e["times"])),
               "step_seconds_min": float(np.min(e["times"])), "step_seconds": e["times"]}
  return rows


def loss_only(grid: List[int], preset: Dict) -> Dict:
  """Value and gradient of the directional loss at the recipe's per-device batch."""
  from semijax.losses import directional  # pylint: disable=g-import-not-at-top
  side = preset["crop"] // preset["stride"]
  n = FLAGS.cac_loss_batch * side * side
  d = preset["dim"]
  rng = np.random.default_rng(0)
  args = [rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32),
          rng.uniform(0.5, 1, n).astype(np.float32), rng.uniform(0.5, 1, n).astype(np.float32),
          rng.integers(0, 21, n).astype(np.int32), rng.integers(0, 21, n).astype(np.int32),
          np.ones(n, bool)]
  rows = {}
  for m in grid:
    negs = (rng.normal(size=(m, d)).astype(np.float32), rng.integers(0, 21, m).astype(np.int32),
            np.ones(m, bool))
    row = {}
    for name, chunk in (("chunked", FLAGS.cac_chunk_size), ("unchunked", m)):
      fn = jax.jit(jax.value_and_grad(
          lambda f1, f2, *r, chunk=chunk: directional.directional_contrastive_loss(
              f1, f2, *r, chunk_size=chunk)[0], argnums=(0, 1)))
      compiled = fn.lower(*args, *negs).compile()
      memory = _memory(compiled)
      if memory.get("temp", 0) > 2 * 2 ** 30:   # the unchunked reference: memory only
        row[name] = {"seconds_median": None, "memory": memory}
        continue
      jax.block_until_ready(compiled(*args, *negs))
      times = []
      for _ in range(FLAGS.cac_reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args, *negs))
        times.append(time.perf_counter() - t)
      row[name] = {"seconds_median": float(np.median(times)), "memory": memory}
    rows[m] = row
    print(f"loss {m}: {row}", flush=True)
  return {"pairs": n, "dim": d, "rows": rows}


def summary(rows: Dict, base: int = 500, target: int = 19200) -> Dict:
  """Step time and peak memory of each count relative to `base` negatives."""
  if base not in rows:
    return {}
  ref = rows[base]
  out = {}
  for n, r in rows.items():
    out[n] = {"time_vs_500": r["step_seconds_median"] / ref["step_seconds_median"],
              "peak_vs_500": (r["memory"]["peak"] / ref["memory"]["peak"]
                              if r.get("memory") else None),
              "peak_delta_mb": ((r["memory"]["peak"] - ref["memory"]["peak"]) / 2 ** 20
                                if r.get("memory") else None)}
  if target in out:
    out["target_met"] = (out[target]["time_vs_500"] <= 1.10
                         and (out[target]["peak_vs_500"] or 0) <= 1.10)
  return out


def negative_precision_per_epoch(run_dir: str) -> Dict:
  """CAC Fig. 6 on the embedded data: per epoch of the unlabeled set, the share of selected
  anchor-negative pairs whose true classes differ, with negative sampling and without (random),
  from the logged windows (`contrast/negative_pairs_precision[_random]`, pooled over the steps)."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run_dir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(run_dir, "results.json")) as f:
    unlabeled = json.load(f).get("num_unlabeled")
  data = config["data"]
  if not unlabeled:   # the embedded pool minus the labeled split
    from semijax.data.datasets import parse_fraction  # pylint: disable=g-import-not-at-top
    pool = data["embedded"]["num_train"]
    unlabeled = pool - int(round(pool * parse_fraction(data["split"])))
  steps_per_epoch = unlabeled / data["unlabeled_batch"]
  epochs = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      key = "train/contrast/negative_pairs_precision"
      if key in row:
        e = int((row["step"] - 1) // steps_per_epoch) + 1
        epochs.setdefault(e, []).append((row[key], row[key + "_random"]))
  return {"steps_per_epoch": steps_per_epoch,
          "epochs": {e: {"negative_sampling": float(np.mean([a for a, _ in v])),
                         "random": float(np.mean([b for _, b in v])), "windows": len(v)}
                     for e, v in sorted(epochs.items())}}


def main(argv):
  del argv
  if FLAGS.cac_run_dir:
    cli.report_json(negative_precision_per_epoch(FLAGS.cac_run_dir), FLAGS.out)
    return
  cli.setup()
  preset = dict(PRESETS[FLAGS.cac_scale])
  if FLAGS.cac_labeled_batch:
    preset["labeled"] = FLAGS.cac_labeled_batch
  if FLAGS.cac_unlabeled_batch:
    preset["unlabeled"] = FLAGS.cac_unlabeled_batch
  grid = [int(float(x)) for x in FLAGS.cac_negatives]
  t0 = time.time()
  peak_before = step_time.machine_peak()
  result = {"scale": FLAGS.cac_scale, "settings": preset, "chunk_size": FLAGS.cac_chunk_size,
            "grid": grid, "jax": jax.__version__, "platform": jax.devices()[0].platform,
            "cpu_count": os.cpu_count(), "peak_before": peak_before}
  if FLAGS.cac_loss:
    result["loss"] = loss_only(grid, preset)
  if FLAGS.cac_full:
    rows = full_step(grid, preset)
    result["full"] = {str(k): v for k, v in rows.items()}
    result["summary"] = {str(k): v for k, v in summary(rows).items()}
  result["peak_after"] = step_time.machine_peak()
  result["wall_seconds"] = time.time() - t0
  cli.report_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
