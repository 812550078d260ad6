"""Checkpoint cost: how long a save blocks the train loop, and how long until it is on disk.

    python -m experiments.benchmarks.checkpoint_time --preset=demo \
        --out=results/checkpoint_demo.json
    python -m experiments.benchmarks.checkpoint_time --preset=r101 \
        --out=results/checkpoint_r101.json

Each repetition saves the whole TrainState (student, EMA teacher, optimizer state, BN
statistics, method state), the data iterator state and the metadata through
`semijax.checkpoint.Checkpointer` exactly as the train loop does, and times
  blocking: `save()` returning, i.e. the time the step loop stands still (orbax copies the
            arrays to host memory, then writes in a background thread);
  total:    `save()` + `wait()`, i.e. until the checkpoint is committed (renamed) on disk.
The first save (which also creates the directories and warms up orbax) is reported apart.
Float arrays hold random numbers (zeros would compress unrealistically well).

Presets:
  demo  the config `make demo` trains (experiments/configs/dgcl.py, split 1/8), with the
        state `train_and_evaluate` builds for it;
  r101  DeepLabv3+ ResNet-101 (deep stem, 21 classes) under the
        mean-teacher recipe (student + EMA teacher + SGD momentum): the state shapes only,
        no dataset needed.
"""

import importlib
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from experiments import cli

flags.DEFINE_enum("preset", "demo", ["demo", "r101"], "What to checkpoint.")
flags.DEFINE_integer("reps", 5, "Timed saves after the first one.")
flags.DEFINE_string("dir", None, "Where to write the checkpoints (default: a temp dir, removed).")
FLAGS = flags.FLAGS


def _random_like(tree, seed: int = 0):
  """Concrete arrays of `tree`'s shapes (abstract or not): floats random, the rest zeros."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if np.issubdtype(x.dtype, np.floating):
      return jax.device_put(rng.standard_normal(x.shape).astype(x.dtype))
    return jax.device_put(np.zeros(x.shape, x.dtype))
  return jax.tree.map(fill, tree)


def demo_state():
  """The demo run's config, state and checkpoint metadata (built as train_and_evaluate does)."""
  from semijax.train import loop  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("experiments.configs.dgcl").get_config("split=1/8")
  run = loop.Run(config, "/tmp/unused")
  return config, _random_like(run.init_state()), run.meta()


def r101_state():
  """DeepLabv3+ R101 (deep stem) mean-teacher state: shapes from the model, random values."""
  from semijax import checkpoint, methods  # pylint: disable=g-import-not-at-top
  from semijax.train import loop, state as state_lib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("experiments.configs.mean_teacher").get_config("")
  with config.unlocked():
    config.model.name = "deeplabv3plus_resnet101"
    config.model.kwargs = {"stem": "deep"}
    config.data.crop_size = 513
  num_classes = 21
  method = methods.get(config.method.name)(config)
  model = loop.build_model(config, num_classes, method)
  tx = loop.make_optimizer(config, model)
  shapes = jax.eval_shape(   # parameter shapes do not depend on the crop: init at 65
      lambda rng: loop.init_train_state(model, tx, method, rng, num_classes=num_classes,
                                        crop_size=65), jax.random.key(0))
  state = _random_like(shapes)
  meta = {"model": config.model.name, "method": config.method.name, "dataset": "voc",
          "num_classes": num_classes, "crop_size": config.data.crop_size,
          "num_params": state_lib.num_params(state.params),
          "state_fingerprint": checkpoint.state_fingerprint(state)}
  return config, state, meta


def _filesystem(path: str) -> str:
  """The mount point and type holding `path` (from /proc/mounts), for the record."""
  path, best = os.path.realpath(path), ("?", "?")
  try:
    with open("/proc/mounts") as f:
      for line in f:
        _, mount, kind = line.split()[:3]
        inside = path == mount or path.startswith(mount.rstrip("/") + "/")
        if inside and (best[0] == "?" or len(mount) > len(best[0])):
          best = (mount, kind)
  except OSError:
    pass
  return f"{best[0]} ({best[1]})"


def _size_on_disk(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def time_saves(state, meta, reps: int, directory: str) -> dict:
  from semijax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(directory, keep=2, keep_best=False)
  data_state = {"next_index": 0}
  blocking, total = [], []
  first = None
  for i in range(reps + 1):
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    ckpt.save(i + 1, state, data_state, meta)
    t1 = time.perf_counter()
    ckpt.wait()
    t2 = time.perf_counter()
    if i == 0:
      first = {"blocking_seconds": t1 - t0, "total_seconds": t2 - t0}
    else:
      blocking.append(t1 - t0)
      total.append(t2 - t0)
  size = _size_on_disk(os.path.join(ckpt.directory, str(reps + 1)))
  ckpt.close()
  return {"first_save": first,
          "blocking_seconds_median": float(np.median(blocking)),
          "blocking_seconds_min": float(np.min(blocking)),
          "total_seconds_median": float(np.median(total)),
          "total_seconds_min": float(np.min(total)),
          "checkpoint_bytes": size,
          "write_mb_per_second_median": size / 1e6 / float(np.median(total))}


def main(argv):
  del argv
  cli.setup()
  from semijax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  config, state, meta = demo_state() if FLAGS.preset == "demo" else r101_state()
  directory = FLAGS.dir or tempfile.mkdtemp(prefix="semijax-ckpt-bench-")
  filesystem = _filesystem(directory)
  try:
    timings = time_saves(state, meta, FLAGS.reps, directory)
  finally:
    if not FLAGS.dir:
      shutil.rmtree(directory, ignore_errors=True)
  result = {
      "preset": FLAGS.preset, "method": config.method.name, "model": config.model.name,
      "num_params": state_lib.num_params(state.params),
      "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state)
                             if hasattr(x, "nbytes"))),
      "reps": FLAGS.reps, "filesystem": filesystem,
      "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(), **timings}
  cli.report_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
