"""CSC: the method's train step, its bank and diagnostics, configs, and 1 vs 8 devices."""

import importlib

import jax
import numpy as np
import pytest

from experiments.benchmarks import step_time
from experiments.configs import base, csc as csc_config, recipes
from semijax import methods, parallel
from semijax.train import loop, step as step_lib
from tests.parallel import harness

_CACHE = {}


def _config(arg="smoke", **overrides):
  config = importlib.import_module("experiments.configs.csc").get_config(arg)
  config.train.num_devices = 1
  config.update_from_flattened_dict(overrides)
  return config


def _batch(config, run, seed, hidden=None):
  batch = step_time.synthetic_batch(config, run.info.num_classes, True, seed=seed)
  if hidden is not None:
    batch["unlabeled"]["hidden_label"] = hidden
  return batch


def _steps(config, steps=3, hidden_fn=None):
  key = repr(sorted(config.to_dict().items()))
  if key not in _CACHE:
    run = loop.Run(config, "/tmp/unused")
    _CACHE[key] = (run, jax.jit(step_lib.make_train_step(run.model, run.method, config)))
  run, fn = _CACHE[key]
  state = run.init_state()
  history = []
  for t in range(steps):
    hidden = None if hidden_fn is None else hidden_fn(t)
    state, metrics = fn(state, parallel.put_batch(_batch(config, run, t, hidden), run.mesh))
    history.append(jax.device_get(metrics))
  return run, jax.device_get(state), history


def test_step_is_finite_fills_the_bank_and_reports_separation_and_cons():
  run, state, history = _steps(_config(), steps=3)
  for m in history:
    assert {"loss_sup", "loss_unsup", "loss_contra", "loss_contra_labeled",
            "loss_contra_unlabeled", "csc/labeled_num_anchors", "csc/unlabeled_keep_fraction",
            "csc/separation/num", "csc/cons/num", "csc/bank/fill_mean"} <= set(m)
    assert all(np.isfinite(v) for v in m.values()) and m["finite"] == 1.0
  # Step 0: the bank is empty, so the contrast is in-batch (Algorithm 1's fallback); the
  # first update fills every class (synthetic labels hold all of them) and the bank is used.
  assert history[0]["csc/labeled_bank_used"] == 0.0 and history[0]["csc/separation/den"] == 0
  assert history[1]["csc/labeled_bank_used"] == 1.0 and history[1]["csc/separation/den"] == 1
  assert history[1]["csc/unlabeled_positive_from_bank"] > 0
  tstate = state.method_state["csc_contrast"]
  gated = tstate["bank"]
  c = run.info.num_classes
  assert gated.bank.count.shape == (c,) and int(gated.bank.count.min()) > 0
  e = np.asarray(gated.bank.entries["feature"])
  v = np.arange(e.shape[1])[None] < np.asarray(gated.bank.count)[:, None]
  np.testing.assert_allclose(np.linalg.norm(e[v], axis=-1), 1.0, rtol=1e-5)
  assert float(gated.best) < 2 * c * c
  # The gate was consulted (both calls: consistency and enqueue) at the last update.
  assert tstate["gate"][1] == 2 and tstate["gate"][3] == 2
  # Cons(T): probe stored at step 0, measured at steps 1 and 2 (smoke: T = 1).
  assert history[0]["csc/cons/den"] == 0 and history[1]["csc/cons/den"] > 0
  assert -1.0 <= history[2]["csc/cons/num"] / history[2]["csc/cons/den"] <= 1.0
  assert bool(tstate["probe"]["filled"]) and int(tstate["probe"]["last"]) == 2
  # The unlabeled filter keeps a growing share of queries (the code's log schedule).
  keep = [m["csc/unlabeled_keep_fraction"] for m in history]
  assert keep[0] == pytest.approx(0.1) and keep[0] < keep[1] < keep[2]


def test_hidden_labels_feed_diagnostics_only():
  config = _config()
  rng = np.random.default_rng(0)
  shape = (config.data.unlabeled_batch, config.data.crop_size, config.data.crop_size)
  truths = [rng.integers(0, 11, shape).astype(np.uint8) for _ in range(2)]
  _, state_a, hist_a = _steps(config, steps=2, hidden_fn=lambda t: truths[0])
  _, state_b, hist_b = _steps(config, steps=2, hidden_fn=lambda t: truths[1])
  for a, b in zip(jax.tree.leaves((state_a.params, state_a.method_state)),
                  jax.tree.leaves((state_b.params, state_b.method_state))):
    np.testing.assert_array_equal(a, b)
  for ma, mb in zip(hist_a, hist_b):
    assert ma["loss"] == mb["loss"]
    for name in ("contrast/anchors_precision", "contrast/positive_keys_precision",
                 "contrast/negatives_precision", "pl/precision"):
      assert name + "/num" in ma and ma[name + "/den"] >= 0
    assert ma["contrast/anchors_unlabeled_share/den"] > 0
  assert any(ma["contrast/anchors_precision/num"] != mb["contrast/anchors_precision/num"]
             for ma, mb in zip(hist_a, hist_b))
  # The oracle switch: the term's unlabeled labels are the true masks too.
  _, _, hist = _steps(_config(**{"diagnostics.oracle_pseudo_labels": True}), steps=1,
                      hidden_fn=lambda t: truths[0])
  m = hist[0]
  assert m["contrast/anchors_precision/den"] > 0
  assert m["contrast/anchors_precision/num"] == m["contrast/anchors_precision/den"]
  assert m["pl/precision/num"] == m["pl/precision/den"]


def test_ablation_switches_and_the_paper_preset_train():
  # Bank off + all positives + no consistency/gate in one run, and the paper preset.
  _, state, history = _steps(_config(**{"csc_contrast.memory_bank": False,
                                        "csc_contrast.top_n": 0}), steps=2)
  assert "bank" not in state.method_state["csc_contrast"]
  assert all(m["csc/labeled_bank_used"] == 0 and np.isfinite(m["loss"]) for m in history)
  _, state, history = _steps(_config("smoke,preset=paper",
                                     **{"csc_contrast.update_every": 2}), steps=3)
  cfg = _config("smoke,preset=paper").csc_contrast
  assert (cfg.contrast_labels, cfg.empty_bank, cfg.gate_rule, cfg.unlabeled_filter,
          cfg.normalize_mean) == ("pseudo_labels", "pixel", "algorithm1", False, True)
  assert all(np.isfinite(m["loss"]) for m in history)
  # update_every = 2: updates after steps 0 and 2 only; step 1 kept the bank.
  assert history[1]["csc/labeled_bank_used"] == 1.0
  assert history[2]["csc/consistency_accepted/den"] == 0   # step 1 did not update


def test_csc_contrast_runs_in_mean_teacher():
  config = importlib.import_module("experiments.configs.mean_teacher").get_config(
      "smoke,terms=csc_contrast")
  config.train.num_devices = 1
  _, state, history = _steps(config, steps=2)
  assert "csc_contrast" in state.method_state
  assert all(np.isfinite(m["loss_contra"]) and m["finite"] == 1.0 for m in history)


def test_configs_official_recipes_and_presets():
  c = csc_config.get_config("dataset=voc,split=1/8,root=/data/voc")
  base_c = base.get_config()
  loop.check_config(c, reference=methods.reference_config(base_c, c))
  assert (c.data.protocol, c.data.split) == ("blended_u2pl", "1_8")   # U2PL's lists
  # 10582 - 1323 unlabeled, 1 GPU x 4: floor(9259 / 4) = 2314 steps/epoch x 80 epochs.
  assert (c.recipe.steps_per_epoch, c.train.total_steps) == (2314, 80 * 2314)
  assert (c.optim.base_lr, c.optim.head_lr_mult, c.optim.weight_decay) == (0.00025, 10.0, 1e-4)
  assert (c.data.labeled_batch, c.data.unlabeled_batch, c.data.crop_size) == (4, 4, 469)
  assert (c.model.kwargs.output_stride, c.model.kwargs.multi_grid) == (8, (1, 2, 4))
  assert c.model.kwargs.low_level_channels == 256 and c.loss.supervised == "ce"
  assert (c.train.supervised_warmup_steps, c.ema.decay, c.ema.copy_steps) == (0, 0.99, 2314)
  t = c.csc_contrast
  assert (t.temperature, t.memory_size, t.weak_classes) == (0.2, 2000, (2, 4, 5, 9, 11, 16,
                                                                        18, 20))
  half = csc_config.get_config("dataset=voc,split=1/2,root=/data/voc")
  assert half.data.protocol == "blended_cps"   # U2PL ships no 1/2 list
  city = csc_config.get_config("dataset=cityscapes,split=1/16,root=/data/city")
  # 2975 - 186 unlabeled, 1 GPU x 2: 1394 steps/epoch x 200 epochs.
  assert (city.recipe.steps_per_epoch, city.train.total_steps) == (1394, 200 * 1394)
  assert (city.optim.base_lr, city.optim.head_lr_mult, city.optim.weight_decay) == (
      0.00125, 1.0, 5e-4)
  assert (city.data.labeled_batch, city.data.crop_size, city.loss.supervised) == (2, 640, "ohem")
  assert (city.csc_contrast.temperature, city.csc_contrast.memory_size) == (0.1, 5000)
  paper = csc_config.get_config("dataset=voc,split=1/16,root=/data/voc,preset=paper")
  assert (paper.data.crop_size, paper.csc_contrast.pixels_per_update,
          paper.csc_contrast.memory_size) == (480, 10, 2000)
  paper_city = csc_config.get_config("dataset=cityscapes,split=1/8,root=/x,preset=paper")
  assert paper_city.csc_contrast.memory_size == 2000 and paper_city.data.crop_size == 640
  smoke = csc_config.get_config("dataset=cityscapes,split=1/8,root=/x,preset=paper,smoke")
  assert smoke.csc_contrast.memory_size == 16 and smoke.train.total_steps == 4
  emb = csc_config.get_config()
  assert (emb.csc_contrast.representation_dim, emb.csc_contrast.memory_size,
          emb.model.name, emb.recipe.global_batch) == (32, 500, "deeplabv3plus_small", 0)
  assert emb.csc_contrast.contrast_labels == "argmax"
  assert csc_config.get_config("preset=paper").csc_contrast.memory_size == 500   # sizes kept
  with pytest.raises(ValueError, match="preset"):
    csc_config.get_config("preset=official")
  assert recipes.DATASETS == ("voc", "cityscapes")


def test_bad_term_settings_name_the_field():
  for field, value, match in (("contrast_labels", "gt", "contrast_labels"),
                              ("gate_rule", "strict", "gate_rule"),
                              ("top_n", -1, "top_n"), ("update_every", 0, "update_every")):
    config = _config(**{f"csc_contrast.{field}": value})
    with pytest.raises(ValueError, match=match):
      methods.get("csc")(config)
  config = _config(**{"csc_contrast.weak_classes": (99,)})
  with pytest.raises(ValueError, match="weak_classes"):
    loop.Run(config, "/tmp/unused").init_state()


@pytest.mark.slow
def test_one_device_and_eight_devices_agree():
  a, hist_a = harness.train(harness.smoke_config("csc", **{"train.num_devices": 1}), 3)
  b, hist_b = harness.train(harness.smoke_config("csc", **{"train.num_devices": 8}), 3)
  assert int(a.step) == int(b.step) == 3 and int(a.skipped_steps) == 0
  harness.compare_histories(hist_a, hist_b)
  harness.compare_states(a, b, ("params", "batch_stats", "ema_params", "ema_batch_stats",
                                "method_state", "opt_state"))
  assert int(a.method_state["csc_contrast"]["bank"].bank.count.sum()) > 0


@pytest.mark.slow
def test_trains_end_to_end_on_a_folder_and_resumes_with_its_bank(tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  from tests.data import fixtures  # pylint: disable=g-import-not-at-top
  data = fixtures.make_folder(str(tmp_path / "data"), num_images=8, num_unlabeled=2)
  c = csc_config.get_config("smoke,split=1/2")
  c.data.dataset, c.data.root, c.data.val_fraction = "folder", data["root"], 0.25
  c.data.crop_size = 16
  c.train.num_devices = 1
  c.train.total_steps, c.train.eval_every, c.train.checkpoint_every = 4, 0, 2
  # Stopped after 3 of 4 steps (as a preempted job), then resumed with the same config (a
  # changed schedule is refused: checkpoint.check_resume_config).
  res = loop.train_and_evaluate(c, str(tmp_path / "run"), progress=False, max_steps=3)
  assert res == {"stopped_at": 3}
  lines = [json.loads(rec) for rec in open(tmp_path / "run" / "metrics.jsonl")]
  train = [rec for rec in lines if "train/loss" in rec]
  assert train and all(np.isfinite(v) for rec in train for v in rec.values())
  assert any("train/csc/separation" in rec for rec in train)   # num/den pooled on the host
  # Resuming restores the GatedBank and the Cons probe with the rest of the state.
  res = loop.train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  assert res["steps"] == 4 and res["steps_this_run"] == 1 and 0 <= res["miou_teacher"] <= 100
