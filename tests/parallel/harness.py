"""Shared by the data-parallel tests: smoke configs, K train steps, tree comparisons.

Compiling a train step dominates these tests (15-50 s each on 2 cores), so step functions
are cached per config for the whole session, and the configs are chosen so that tests share
them (the supervised 1-device step serves test_equivalence and test_grad_accum).
"""

import importlib
import json

import jax
import numpy as np
from jax.tree_util import keystr, tree_flatten_with_path

from experiments.benchmarks import step_time
from semijax import parallel
from semijax.models import layers
from semijax.train import loop, step as step_lib

METHODS = ("supervised", "mean_teacher", "dgcl", "dssn")

# Equivalence tolerances: float32 results of the same computation whose reductions (BN
# statistics, loss means, the gradient all-reduce, micro-batch sums) are summed in another
# order. A sum of N terms is exact to ~N eps in the worst case, sqrt(N) eps typically
# (eps = 1.2e-7). Every float leaf must agree to `rtol` of its own largest magnitude, or to
# FLOOR of the largest magnitude in its tree (values that are rounding residue, e.g. the
# bias of a conv followed by BatchNorm, whose exact gradient is 0).
#   RTOL, values (losses, parameters, BN statistics, EMA teacher, banks): observed <= 2.0e-6
#     over 3 steps (1 vs 8 devices, all methods; 1.1e-6 for 4 x 2 vs 8); 2e-5 (~170 eps)
#     leaves a margin of 10x and is far below what a layout bug gives (a gradient share
#     missing on one of 8 devices, per-device instead of global statistics: relative errors
#     of 1e-2 to 1).
#   GRAD_RTOL, gradients (the optimizer's momentum, `grad_norm`): backpropagation through
#     BatchNorm cancels large terms (dy - mean(dy) - ...), more so with small statistic
#     groups, so gradients carry ~1e-4 relative rounding differences even between 1 and 8
#     devices on one batch (observed up to 1.1e-4 for 1 vs 8 devices, with BN groups of 2
#     rows, and 3.5e-4 for 4 x 2 vs 8 over 3 steps); 2e-3.
RTOL = 2e-5
GRAD_RTOL = 2e-3
FLOOR = 1e-6
GRADIENT_METRICS = ("grad_norm",)

_STEPS_CACHE = {}


def smoke_config(name: str, **overrides):
  """`experiments/configs/<name>.py:smoke` with SGD and `overrides` ('section.field': value).

  SGD, not the embedded configs' AdamW: Adam's first update is lr * g / (|g| + eps), so a
  parameter whose gradient is mathematically 0 (a conv bias followed by BatchNorm) moves by
  +-lr with the sign of float rounding noise, and two equal-within-rounding runs differ by
  2 lr there. SGD keeps parameter differences at lr times gradient differences.
  """
  c = importlib.import_module(f"experiments.configs.{name}").get_config("smoke")
  c.optim.name = "sgd"
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _step_fn(config, run):
  """One jitted step per config (the shardings come from the inputs)."""
  key = json.dumps(config.to_dict(), sort_keys=True, default=str)
  if key not in _STEPS_CACHE:
    _STEPS_CACHE[key] = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  return _STEPS_CACHE[key]


def batches(config, run, steps: int):
  """Synthetic global batches (random images and labels, as tests/methods)."""
  return [step_time.synthetic_batch(config, run.info.num_classes, run.method.uses_unlabeled,
                                    seed=t) for t in range(steps)]


def train(config, steps: int = 3, *, batch_fn=None):
  """`steps` train steps from the initial state; returns (host state, [host metrics]).

  Args:
    config: the run config (`train.num_devices` picks the mesh).
    steps: number of steps.
    batch_fn: optional `global batch -> global batch` (e.g. a row permutation).
  """
  run = loop.Run(config, "/tmp/unused")
  run.check_batches()
  state = run.init_state()
  fn = _step_fn(config, run)
  history = []
  for batch in batches(config, run, steps):
    if batch_fn is not None:
      batch = batch_fn(batch)
    state, metrics = fn(state, parallel.put_batch(batch, run.mesh))
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def compare_trees(a, b, *, rtol: float = RTOL, what: str = "") -> float:
  """Asserts float leaves agree (see RTOL / FLOOR above) and the others exactly.

  Returns:
    The largest |a - b| / max|leaf| over float leaves that are not rounding residue
    (largest value at least 1e-3 of the tree's).
  """
  leaves_a = tree_flatten_with_path(a)[0]
  leaves_b = jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b), what
  floats = [np.asarray(x) for _, x in leaves_a if np.asarray(x).dtype.kind == "f"]
  tree_scale = max((float(np.max(np.abs(x))) for x in floats if x.size), default=0.0)
  worst = 0.0
  for (path, x), y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    name = f"{what}{keystr(path)}"
    assert x.shape == y.shape and x.dtype == y.dtype, name
    if x.dtype.kind != "f" or x.size == 0:
      np.testing.assert_array_equal(x, y, err_msg=name)
      continue
    scale = float(np.max(np.abs(x)))
    diff = float(np.max(np.abs(x - y)))
    tol = max(rtol * scale, FLOOR * tree_scale)
    assert diff <= tol, (f"{name}: max |diff| {diff:.3g}, largest value {scale:.3g}, "
                         f"tolerance {tol:.3g}")
    if scale >= 1e-3 * tree_scale:   # else rounding residue, bounded by the floor above
      worst = max(worst, diff / scale)
  return worst


def compare_histories(ha, hb) -> dict:
  """Per-step metrics agree to RTOL of their value (GRAD_RTOL for gradient norms).

  Returns:
    `{'values': worst relative difference, 'gradients': ...}`.
  """
  assert len(ha) == len(hb)
  worst = {"values": 0.0, "gradients": 0.0}
  for t, (ma, mb) in enumerate(zip(ha, hb)):
    assert set(ma) == set(mb)
    for key in ma:
      x, y = np.asarray(ma[key]), np.asarray(mb[key])
      if x.dtype.kind != "f" or y.dtype.kind != "f":
        np.testing.assert_array_equal(x, y, err_msg=f"step {t} {key}")
        continue
      kind = "gradients" if key in GRADIENT_METRICS else "values"
      rtol = GRAD_RTOL if kind == "gradients" else RTOL
      scale = max(abs(float(x)), abs(float(y)))
      diff = abs(float(x) - float(y))
      assert diff <= rtol * scale + FLOOR, f"step {t} {key}: {float(x)!r} vs {float(y)!r}"
      if scale > 0:
        worst[kind] = max(worst[kind], diff / scale)
  return worst


def compare_states(a, b, fields) -> dict:
  """`compare_trees` on each state field; the optimizer state is compared as gradients."""
  worst = {"values": 0.0, "gradients": 0.0}
  for field in fields:
    kind = "gradients" if field == "opt_state" else "values"
    err = compare_trees(getattr(a, field), getattr(b, field),
                        rtol=GRAD_RTOL if kind == "gradients" else RTOL, what=field)
    worst[kind] = max(worst[kind], err)
  return worst


def bn_groups_are_strided() -> bool:
  """Whether `layers.BatchNorm(batch_groups=G)` groups rows i % G (else consecutive rows).

  The grad-accumulation test needs to know which rows a one-step run's BN groups hold.
  """
  x = np.array([0.0, 0.0, 1.0, 1.0], np.float32).reshape(4, 1, 1, 1)
  bn = layers.BatchNorm(batch_groups=2)
  variables = bn.init(jax.random.key(0), x, use_running_average=True)
  y, _ = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  # Consecutive groups {0, 1}, {2, 3} are constant and normalise to 0.
  return bool(np.abs(np.asarray(y)).max() > 0.5)


# The supervised configuration of test_equivalence and test_grad_accum (one shared compile):
# no dropout (deterministic step), BatchNorm statistics per group of 2 of the 8 rows
# (train.sync_bn=False with 4 groups, the recipe's 4 unsynchronised GPUs).
SUPERVISED_GROUPED = {"model.kwargs.aspp_dropout": 0.0, "model.kwargs.decoder_dropout": 0.0,
                      "train.sync_bn": False, "train.bn_groups": 4}
