"""CAC as a method: configs and recipes, the train step (pairs, memory, diagnostics), the hidden
truth never reaching the update, the pooled classifier, the image-level extension, devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import cac_overhead, step_time
from experiments.configs import base, cac as cac_config
from semijax import parallel
from semijax.methods import cac
from semijax.models import build_model
from semijax.train import loop, step as step_lib

_STEPS = {}


def smoke(**overrides):
  c = cac_config.get_config("smoke")
  c.train.num_devices = 1
  c.cac.threshold = 0.0     # a freshly initialised network is rarely 0.75-confident
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def run_steps(config, batches):
  """Runs the (cached) jitted step over `batches`; returns run, states and host metrics."""
  run = loop.Run(config, "/tmp/unused")
  key = str(config)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  state = run.init_state()
  states, history = [], []
  for batch in batches:
    state, metrics = _STEPS[key](state, parallel.put_batch(batch, run.mesh))
    states.append(state)
    history.append(jax.device_get(metrics))
  return run, states, history


def make_batches(config, n=3):
  run = loop.Run(config, "/tmp/unused")
  return [cac_overhead.cac_batch(config, run, seed=t) for t in range(n)]


# -- Configs. ------------------------------------------------------------------------------


def test_embedded_config_and_presets():
  c = cac_config.get_config("")
  loop.check_config(c, reference=base.get_config())
  assert c.method.name == "cac" and c.ema.decay == 0.0 and c.ema.warmup == "none"
  assert c.cac.weight == 0.1 and c.cac.temperature == 0.1 and c.cac.threshold == 0.75
  assert c.cac.stride == 4 and not c.cac.downsample
  assert c.cac.memory_steps == 2 and c.cac.memory_size == 0
  # 2 steps x 2 views x 8 images x 64 pixels
  assert cac.memory_slots(c.cac, unlabeled_batch=8, pixels_per_view=64) == 2048
  assert c.cac.iou_range == (0.1, 1.0) and c.cac.reduction == "selected"
  assert cac_config.get_config("preset=no_context").cac.iou_range == (1.0, 1.0)
  assert cac_config.get_config("preset=paper").cac.reduction == "per_image"
  with pytest.raises(ValueError, match="preset='x'"):
    cac_config.get_config("preset=x")


@pytest.mark.parametrize("dataset,split,model,steps,memory,crop,lr", [
    ("voc", "1/16", "deeplabv3plus_resnet101", 2, 2 * 2 * 8 * 40 * 40, 320, 0.001),
    ("voc", "1/8", "deeplabv3plus_resnet101", 2, 2 * 2 * 8 * 40 * 40, 320, 0.001),
    ("voc", "1/4", "deeplabv3plus_resnet101", 2, 2 * 2 * 8 * 40 * 40, 320, 0.001),
    ("cityscapes", "1/8", "deeplabv3plus_resnet50", 0, 0, 720, 0.01),
    ("cityscapes", "1/4", "deeplabv3plus_resnet50", 0, 0, 720, 0.01),
])
def test_official_recipes(dataset, split, model, steps, memory, crop, lr):
  c = cac_config.get_config(f"dataset={dataset},split={split},root=/data/{dataset}")
  loop.check_config(c, reference=base.get_config())
  assert c.data.protocol in ("blended_cps", "cps")
  assert c.recipe.steps_per_epoch == 1157 and c.train.total_steps == 80 * 1157
  assert c.train.supervised_warmup_steps == 5 * 1157
  assert c.model.name == model and c.model.kwargs.stem == "torchvision"
  assert c.model.kwargs.multi_grid == (1, 2, 4) and c.model.kwargs.output_stride == 16
  assert c.model.kwargs.classifier_dropout == 0.1 and not c.model.kwargs.dropout_2d
  assert c.data.crop_size == crop and c.data.labeled_batch == c.data.unlabeled_batch == 8
  assert c.data.base_size == cac_config.BASE_SIZE[dataset]
  assert c.optim.name == "sgd" and c.optim.base_lr == lr and c.optim.head_lr_mult == 10.0
  assert c.optim.weight_decay == 1e-4 and c.eval.mode == "whole"
  assert c.cac.memory_steps == steps and c.cac.stride == 8 and c.cac.downsample
  # Official VOC R101: the list of the last 3 steps = this step's 25,600 gathered negatives
  # (2 views x 8 images x 40 x 40) + 2 previous steps.
  assert cac.memory_slots(c.cac, unlabeled_batch=c.data.unlabeled_batch,
                          pixels_per_view=(crop // 8) ** 2) == memory


def test_full_split_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="split=full"):
    cac_config.get_config("dataset=voc,split=full,root=/data/voc")


# -- The step. -----------------------------------------------------------------------------


def test_step_reports_its_terms_fills_the_memory_and_keeps_teacher_equal():
  config = smoke()
  run, states, history = run_steps(config, make_batches(config))
  for m in history:
    for k, v in m.items():
      assert np.isfinite(v), (k, v)
    for k in ("loss_sup", "loss_dc", "cac/loss_1", "cac/num_selected_1", "cac/num_negatives",
              "cac/memory_fill", "pl/precision/num", "contrast/anchors_precision/num",
              "contrast/negatives_precision/num", "contrast/negative_pairs_precision/num"):
      assert k in m, k
  assert all(m["loss_dc"] > 0 for m in history)
  # Negatives: the batch's pixels, then also the memory of the previous steps.
  assert history[1]["cac/num_negatives"] > history[0]["cac/num_negatives"]
  queue = states[-1].method_state["memory"]
  assert int(queue.count[0]) == 128     # smoke: 128 slots, full after a step
  # One network: the trainer's teacher is the network.
  for a, b in zip(jax.tree.leaves(states[-1].params), jax.tree.leaves(states[-1].ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  del run


def test_hidden_truth_never_reaches_the_update():
  config = smoke()
  batches = make_batches(config, 1)
  other = jax.tree.map(lambda x: x, batches[0])
  other["unlabeled"] = dict(other["unlabeled"])
  other["unlabeled"]["hidden_label"] = (other["unlabeled"]["hidden_label"] + 1) % 11
  _, (state_a,), (ma,) = run_steps(config, batches)
  _, (state_b,), (mb,) = run_steps(config, [other])
  for a, b in zip(jax.tree.leaves((state_a.params, state_a.method_state["memory"].entries[
      "feature"])), jax.tree.leaves((state_b.params, state_b.method_state["memory"].entries[
          "feature"]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ma["loss"] == mb["loss"]
  assert ma["pl/precision/num"] != mb["pl/precision/num"]   # only the diagnostics see it


def test_pooled_logits_are_the_classifier_on_pooled_features():
  model = build_model("deeplabv3plus_small", num_classes=5, widths=(8, 8, 16, 16),
                      stem_width=8, heads={cac.PROJECTION: cac.PooledProjection(out=6, pool=2)})
  x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x, method=functools.partial(cac.forward_with_pooled_logits,
                                                           pool=2))
  # The classifier is affine, so without dropout it commutes with the average pool.
  pooled = cac.average_pool(out["logits"], 2)
  np.testing.assert_allclose(out[cac.POOLED_LOGITS], pooled, rtol=1e-5, atol=1e-5)
  assert out[cac.PROJECTION].shape == (2, 4, 4, 6)
  # Phi: pool -> 1x1 conv -> ReLU -> 1x1 conv.
  p = variables["params"]["heads_" + cac.PROJECTION]
  h = jnp.maximum(cac.average_pool(out["decoder"], 2) @ p["conv1"]["kernel"][0, 0]
                  + p["conv1"]["bias"], 0)
  np.testing.assert_allclose(out[cac.PROJECTION], h @ p["conv2"]["kernel"][0, 0]
                             + p["conv2"]["bias"], rtol=1e-5, atol=1e-5)


def test_image_level_extension():
  config = smoke(**{"cac.weak_weight": 0.4})
  batches = make_batches(config, 2)
  rng = np.random.default_rng(0)
  for b in batches:
    shape = b["unlabeled"]["pad"].shape
    b["unlabeled"]["weak_label"] = rng.integers(0, 11, shape).astype(np.uint8)
    b["unlabeled"]["weak_label2"] = rng.integers(0, 11, shape).astype(np.uint8)
  run, states, history = run_steps(config, batches)
  assert "heads_" + cac.WEAK_LOGITS in states[-1].params
  assert all(np.isfinite(m["loss_weak"]) and m["loss_weak"] > 0 for m in history)
  for b in batches:
    del b["unlabeled"]["weak_label"], b["unlabeled"]["weak_label2"]
  with pytest.raises(ValueError, match="weak_label"):
    run_steps(smoke(**{"cac.weak_weight": 0.4, "cac.temperature": 0.2}), batches[:1])
  del run


def test_no_context_gives_identical_crops():
  config = cac_config.get_config("preset=no_context,smoke")
  method = cac.CAC(config)
  batch = cac_overhead.pair_batch(config, method, 6)
  boxes = batch["pair_boxes"]
  np.testing.assert_array_equal(boxes[:, 0], boxes[:, 1])


@pytest.mark.slow
def test_one_device_and_eight_devices_agree():
  from tests.parallel import harness  # pylint: disable=g-import-not-at-top

  def batch_fn_for(config):
    method = cac.CAC(config)
    counter = iter(range(100))

    def batch_fn(batch):
      batch["unlabeled"] = cac_overhead.pair_batch(config, method,
                                                   config.data.unlabeled_batch,
                                                   seed=next(counter))
      return batch
    return batch_fn

  results = []
  for devices in (1, 8):
    config = harness.smoke_config("cac", **{"train.num_devices": devices, "cac.threshold": 0.0})
    results.append(harness.train(config, 3, batch_fn=batch_fn_for(config)))
  (a, hist_a), (b, hist_b) = results
  worst = harness.compare_histories(hist_a, hist_b)
  states = harness.compare_states(a, b, ("params", "batch_stats", "method_state", "opt_state"))
  assert int(a.method_state["memory"].count[0]) > 0 and hist_a[-1]["loss_dc"] > 0
  print(f"cac: 1 vs 8 devices, largest relative difference: metrics {worst}, state {states}")


def test_directional_term_in_mean_teacher_with_two_strong_views():
  from experiments.configs import mean_teacher  # pylint: disable=g-import-not-at-top
  c = mean_teacher.get_config("smoke,terms=cac_directional")
  c.train.num_devices = 1
  c.mean_teacher.strong_views = 2
  c.cac_directional.threshold = 0.0
  c.cac_directional.memory_size = 256
  run = loop.Run(c, "/tmp/unused")
  state = run.init_state()
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, c))
  history = []
  for t in range(2):
    batch = step_time.synthetic_batch(c, run.info.num_classes, True, seed=t)
    state, metrics = fn(state, parallel.put_batch(batch, run.mesh))
    history.append(jax.device_get(metrics))
  for m in history:
    assert m["loss_cac_directional"] > 0 and np.isfinite(m["loss"])
    assert "cac_term/num_pairs" in m and "loss_unsup" in m
    assert m["cac_term/num_pairs"] > 0
  assert history[1]["cac_term/num_negatives"] > history[0]["cac_term/num_negatives"]
  assert int(state.method_state["cac_directional"]["memory"].count[0]) > 0
