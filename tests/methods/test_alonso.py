"""The `alonso` recipe, its rule and terms: train steps on the smoke config, configs, ablations."""

import importlib

import jax
import numpy as np
import pytest

from experiments.benchmarks import ablations, step_time
from semijax import methods, parallel
from semijax.methods import alonso as alonso_method
from semijax.train import loop, step as step_lib


def _config(name="alonso", arg="smoke", **overrides):
  config = importlib.import_module(f"experiments.configs.{name}").get_config(arg)
  config.train.num_devices = 1
  config.update_from_flattened_dict(overrides)
  return config


def _batch(config, num_classes, seed, hidden_seed=None):
  batch = step_time.synthetic_batch(config, num_classes, True, seed=seed)
  if hidden_seed is not None:
    rng = np.random.default_rng(hidden_seed)
    unl = batch["unlabeled"]
    unl["hidden_label"] = rng.integers(0, num_classes, unl["label"].shape).astype(np.uint8)
  return batch


@pytest.fixture(scope="module")
def alonso_run():
  """The smoke recipe with the FQF off, so that the bank fills from a random teacher."""
  config = _config(**{"alonso_contrast.quality_filter": False})
  run = loop.Run(config, "/tmp/unused")
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  return config, run, fn


def test_step_fills_the_bank_and_trains_every_term(alonso_run):
  config, run, fn = alonso_run
  state = run.init_state()
  init = jax.device_get(state.params)
  history = []
  for t in range(3):
    batch = _batch(config, run.info.num_classes, seed=t, hidden_seed=t)
    state, metrics = fn(state, parallel.put_batch(batch, run.mesh))
    history.append(jax.device_get(metrics))
  for m in history:
    assert m["finite"] == 1.0 and all(np.isfinite(v) for v in m.values())
    assert {"loss_sup", "loss_pseudo", "loss_ent", "loss_contr", "bank/fill_mean",
            "contrast/fqf_ratio", "pl/precision/num", "pl/weighted_precision/den",
            "contrast/anchors_precision/den", "contrast/anchors_weighted_precision/num",
            "contrast/positive_keys_unlabeled_share/den"} <= set(m), sorted(m)
  counts = np.asarray(state.method_state["alonso_contrast"]["bank"].count)
  assert counts.max() > 0
  # From step 1 (smoke start) the contrast is on and the bank holds entries.
  assert history[1]["contrast/on"] == 1.0 and history[2]["loss_contr"] > 0
  assert history[2]["contrast/labeled_num_classes"] > 0
  # The attention weights are not all 1 ...
  assert history[2]["contrast/labeled_prediction_weight_std"] > 0
  assert history[2]["contrast/labeled_bank_weight_std"] > 0
  # ... and both sides' modules learn: their zero-initialised output biases moved, which only a
  # gradient can do (decoupled weight decay keeps zeros at zero).
  att = jax.device_get(state.params)["heads_alonso_attention"]
  for side in ("prediction", "projection"):
    assert np.all(init["heads_alonso_attention"][f"{side}_bias2"] == 0)
    assert np.any(att[f"{side}_bias2"] != 0), side


def test_hidden_labels_never_reach_the_loss(alonso_run):
  config, run, fn = alonso_run
  state = run.init_state()
  batch = _batch(config, run.info.num_classes, seed=0, hidden_seed=1)
  s1, m1 = fn(state, parallel.put_batch(batch, run.mesh))
  batch["unlabeled"]["hidden_label"] = np.roll(batch["unlabeled"]["hidden_label"], 3, axis=2)
  s2, m2 = fn(run.init_state(), parallel.put_batch(batch, run.mesh))
  assert float(m1["loss"]) == float(m2["loss"])
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)
  assert float(m1["pl/precision/num"]) != float(m2["pl/precision/num"])


def test_ablation_switches_run():
  """Table 8's switches together: student features, no attention (random K), no FQF."""
  config = _config(**{"alonso_contrast.bank_source": "student",
                      "alonso_contrast.attention": False,
                      "alonso_contrast.quality_filter": False})
  run = loop.Run(config, "/tmp/unused")
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  state = run.init_state()
  for t in range(2):
    state, m = fn(state, parallel.put_batch(_batch(config, run.info.num_classes, t), run.mesh))
    m = jax.device_get(m)
    assert m["finite"] == 1.0
  assert m["contrast/labeled_prediction_weight_std"] == 0.0 and m["loss_contr"] > 0
  assert np.asarray(state.method_state["alonso_contrast"]["bank"].count).max() > 0


def test_rule_and_terms_in_mean_teacher():
  config = _config("mean_teacher", "smoke,terms=alonso_contrast+entropy_min",
                   **{"pseudo_label.rule": "sharpened"})
  run = loop.Run(config, "/tmp/unused")
  assert isinstance(run.method.rule, alonso_method.Sharpened)
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  state = run.init_state()
  for t in range(2):
    state, m = fn(state, parallel.put_batch(_batch(config, run.info.num_classes, t), run.mesh))
    m = jax.device_get(m)
    assert m["finite"] == 1.0 and {"loss_contr", "loss_ent"} <= set(m)
  assert "alonso_contrast" in state.method_state


def test_ramp_schedules():
  config = _config(arg="")
  method = methods.get("alonso")(config)
  t = config.alonso.rampup_steps
  np.testing.assert_allclose(method.ramp(0), np.exp(-5.0), rtol=1e-6)
  np.testing.assert_allclose(method.ramp(t // 2), np.exp(-5 * 0.25), rtol=1e-6)
  assert float(method.ramp(t)) == 1.0
  config.alonso.rampup = "step"
  method = methods.get("alonso")(config)
  assert float(method.ramp(t - 1)) == 0.0 and float(method.ramp(t)) == 1.0


def test_configs():
  c = _config(arg="")
  assert c.method.terms == ("alonso_contrast", "entropy_min")
  assert c.pseudo_label.rule == "sharpened" and c.pseudo_label.sharpened.power == 6.0
  assert (c.ema.decay, c.ema.warmup) == (0.997, "none")
  assert c.alonso_contrast.weight == 0.1 and c.entropy_min.weight == 0.01
  cos = _config(arg="ema=cosine")
  assert (cos.ema.decay, cos.ema.warmup) == (0.995, "cosine")
  paper = _config(arg="preset=paper")
  assert paper.alonso.rampup == "step" and paper.alonso.augment == "paper"
  assert paper.alonso_contrast.rank_side == "projection" and not paper.entropy_min.normalize
  voc = _config(arg="dataset=voc,split=1/50,root=/data/voc")
  assert (voc.data.protocol, voc.data.split) == ("classic", "183")
  assert voc.model.name == "deeplabv2_resnet101" and voc.model.kwargs.output_stride == 8
  assert voc.data.labeled_batch == 14 and voc.data.unlabeled_batch == 7
  assert voc.train.total_steps == 150_000 and voc.optim.weight_decay == 5e-4
  assert voc.alonso.exclude_background and not voc.alonso.class_balance
  assert voc.alonso_contrast.per_image == 7     # official VOC: int(21/3 round(256/183))
  city = _config(arg="dataset=cityscapes,split=1/30,root=/data/city,preset=paper")
  assert city.alonso.class_balance and city.data.base_size == 1024
  assert city.train.total_steps == 80_000 and city.alonso_contrast.per_image == 3
  assert city.alonso.balance_labeled_rows == 20 and city.alonso.balance_unlabeled_rows == 1437
  v3 = _config(arg="dataset=cityscapes,split=1/8,root=/data/city,model=v3plus")
  assert v3.model.name == "deeplabv3plus_resnet50" and v3.model.kwargs.stem == "torchvision"
  assert v3.optim.base_lr == 4e-4 and v3.data.labeled_batch == 7
  with pytest.raises(ValueError, match="preset"):
    _config(arg="preset=nope")


def test_ablation_variants_exist_and_name_real_fields():
  config = _config(arg="")
  names = [n for n, (_, m, _) in ablations.VARIANTS.items() if m == "alonso"]
  assert {"alonso_student_features", "alonso_no_attention", "alonso_no_fqf",
          "alonso_base"} <= set(names)
  for name in names:
    for key in ablations.VARIANTS[name][2]:
      node = config
      for part in key.split("."):
        node = node[part]  # KeyError if a field does not exist


def test_one_device_and_eight_devices_agree():
  from tests.parallel import harness  # pylint: disable=g-import-not-at-top
  overrides = {"alonso_contrast.quality_filter": False}
  a, hist_a = harness.train(harness.smoke_config("alonso", **overrides,
                                                 **{"train.num_devices": 1}), 3)
  b, hist_b = harness.train(harness.smoke_config("alonso", **overrides,
                                                 **{"train.num_devices": 8}), 3)
  harness.compare_histories(hist_a, hist_b)
  harness.compare_states(a, b, ("params", "batch_stats", "ema_params", "ema_batch_stats",
                                "method_state", "opt_state"))
  assert int(np.asarray(a.method_state["alonso_contrast"]["bank"].count).sum()) > 0
  assert hist_a[-1]["loss_contr"] > 0
