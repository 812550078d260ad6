"""Every method trains the same on 1 device and on a mesh of 8 (fake CPU) devices.

Randomness inside the jitted step is global (`fold_in(key(seed), step)`, keys never depend
on the device count) and every selection (percentiles, anchors, bank pushes) is over the
global batch, so K steps on 1 and on 8 devices give the same losses, parameters, BatchNorm
statistics, EMA teacher, optimizer state and DGCL banks up to float32 reduction order
(harness.RTOL). Also: every public function with an `axis_name` has a pmap/shard_map test.
"""

import ast
import importlib
import inspect
import pathlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import semijax
from semijax.losses import consistency
from semijax.pseudo import entropy, thresholds

from . import harness

FIELDS = ("params", "batch_stats", "ema_params", "ema_batch_stats", "method_state", "opt_state")
STEPS = 3


@pytest.mark.parametrize("name", [
    pytest.param(m, marks=pytest.mark.slow) if m in ("dgcl", "dssn") else m
    for m in harness.METHODS])
def test_one_device_and_eight_devices_agree(name):
  # supervised runs with per-group BN (4 groups, train.sync_bn=False), the others SyncBN.
  overrides = harness.SUPERVISED_GROUPED if name == "supervised" else {}
  a, hist_a = harness.train(harness.smoke_config(name, **{**overrides, "train.num_devices": 1}),
                            STEPS)
  b, hist_b = harness.train(harness.smoke_config(name, **{**overrides, "train.num_devices": 8}),
                            STEPS)
  assert int(a.step) == int(b.step) == STEPS and int(a.skipped_steps) == 0
  worst = harness.compare_histories(hist_a, hist_b)
  states = harness.compare_states(a, b, FIELDS)
  if name == "dgcl":   # the bank was written (not trivially equal)
    assert int(a.method_state["dgcl_contrast"]["bank"].count.sum()) > 0
  print(f"{name}: 1 vs 8 devices, largest relative difference: metrics {worst}, "
        f"state {states}")


# ------------------------------------------------------------------------------------------
# The axis_name contract covers every public function that has the argument.
# ------------------------------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[2]
MAPPED = ("pmap", "shard_map")


def _axis_name_functions():
  out = {}
  for info in pkgutil.walk_packages(semijax.__path__, "semijax."):
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
      if (inspect.isfunction(obj) and obj.__module__ == module.__name__
          and not name.startswith("_") and "axis_name" in inspect.signature(obj).parameters):
        out[f"{module.__name__}.{name}"] = obj
  return out


def _names_used_under_a_mapped_transform():
  """Identifiers in test functions (and the module-level helpers they call) that use pmap
  or shard_map."""
  covered = set()
  for path in (REPO / "tests").rglob("test_*.py"):
    tree = ast.parse(path.read_text())
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def names(node):
      return ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
              | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)})

    for node in tree.body:
      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
        used = names(node)
        if used & set(MAPPED):
          for helper in used & set(helpers):
            used |= names(helpers[helper])
          covered |= used
  return covered


def test_every_public_axis_name_function_has_a_mapped_test():
  functions = _axis_name_functions()
  assert len(functions) > 10
  covered = _names_used_under_a_mapped_transform()
  missing = sorted(full for full, fn in functions.items()
                   if fn.__name__ not in covered and not full.startswith("semijax.collectives"))
  assert not missing, f"no pmap/shard_map test calls {missing}"


def _pseudo_and_w2s(logits, labels, select, pad, axis_name=None):
  """The functions the audit found without a mapped test, on one shard or the whole batch."""
  probs = jax.nn.softmax(logits, -1)
  valid = ~pad
  ent = -jnp.sum(probs * jnp.log(probs + 1e-8), -1)
  w2s = lambda x: consistency.weak_to_strong_loss(x, labels, select, valid=valid,
                                                  axis_name=axis_name)
  (loss, aux), grad = jax.value_and_grad(w2s, has_aux=True)(logits)
  conf_labels, conf_mask, conf_aux = thresholds.confidence_mask(
      probs, threshold=0.5, valid=valid, axis_name=axis_name)
  cplg_labels, cplg_mask, cplg_aux = thresholds.cplg_select(
      probs, peak_fraction=0.9, tau_low=0.4, valid=valid, axis_name=axis_name)
  filtered, keep, filtered_aux = entropy.filtered_pseudo_labels(
      probs, valid, drop_percent=30.0, axis_name=axis_name)
  return {"w2s": loss, "w2s_ratio": aux["selected_ratio"], "w2s_grad": grad,
          "filtered_ratio": filtered_aux["selected_ratio"],
          "percentile": entropy.masked_percentile(ent, valid, 70.0, axis_name=axis_name),
          "threshold": entropy.entropy_threshold(probs, valid, drop_percent=30.0,
                                                 axis_name=axis_name),
          "filtered": filtered, "keep": keep, "conf_labels": conf_labels,
          "conf_mask": conf_mask, "conf_ratio": conf_aux["selected_ratio"],
          "cplg_labels": cplg_labels, "cplg_mask": cplg_mask,
          "cplg_ratio": cplg_aux["selected_ratio"]}


def test_pseudo_labels_and_w2s_under_pmap_equal_the_global_batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 4, 5, 3)).astype(np.float32) * 2
  labels = rng.integers(0, 3, (8, 4, 5)).astype(np.int32)
  select = rng.random((8, 4, 5)) < 0.6
  pad = rng.random((8, 4, 5)) < 0.2
  want = jax.jit(_pseudo_and_w2s)(logits, labels, select, pad)
  got = jax.pmap(lambda *a: _pseudo_and_w2s(*a, axis_name="d"), axis_name="d")(
      *[x[:, None] for x in (logits, labels, select, pad)])
  for key, value in want.items():
    value, mapped = np.asarray(value), np.asarray(got[key])
    if value.ndim == 0:   # a global scalar, the same on every device
      np.testing.assert_allclose(mapped, np.full(8, value), rtol=1e-6, err_msg=key)
    else:                 # per-pixel outputs and gradient shares: the device's own rows
      np.testing.assert_allclose(mapped.reshape(value.shape), value, rtol=1e-5, atol=1e-8,
                                 err_msg=key)
  assert 0 < float(want["w2s"]) and 0 < float(want["cplg_ratio"]) < 1
