"""The teacher-student plumbing: strong views keep images and labels aligned, the hidden ground
truth never reaches a loss, the oracle switch and the pseudo-label diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mean_teacher
from semijax import ops
from semijax.methods import base, diagnostics, registry, teacher_student
from semijax.train import loop, step as step_lib


def _ctx(seed=0):
  return base.StepContext(batch={}, rng=jax.random.key(seed), step=jnp.int32(0),
                          method_state={}, params={}, batch_stats={}, student_fn=None,
                          teacher_fn=None)


def _method():
  return registry.get("mean_teacher")(mean_teacher.get_config("smoke"))


@pytest.mark.parametrize("cutmix", ["per_image", "per_batch"])
def test_strong_view_moves_labels_and_padding_with_their_pixels(cutmix):
  rng = np.random.default_rng(0)
  b, s = 6, 16
  # Every pixel's value names its image, row and column, so its label can be recomputed.
  ids = np.arange(b * s * s, dtype=np.float32).reshape(b, s, s)
  images = np.stack([ids / ids.max(), ids / ids.max(), np.zeros_like(ids)], axis=-1)
  labels = (ids.astype(np.int64) % 7).astype(np.int32)
  pad = rng.random((b, s, s)) < 0.1
  method = _method()
  for seed in range(4):
    view, (mixed_labels, mixed_pad_again), _ = method.strong_view(
        _ctx(seed), jnp.asarray(images), jnp.asarray(pad), (jnp.asarray(labels), jnp.asarray(pad)),
        preset="none", cutmix=cutmix, cutmix_prob=1.0, keys=("p", "c", "cp"))
    pixel = np.rint(np.asarray(view.images)[..., 0] * ids.max()).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(mixed_labels), pixel % 7)
    np.testing.assert_array_equal(np.asarray(view.pad), pad.reshape(-1)[pixel])
    np.testing.assert_array_equal(np.asarray(mixed_pad_again), np.asarray(view.pad))
    # Inside the box the pixels come from image i + 1, outside from image i.
    source = pixel // (s * s)
    expect = np.where(np.asarray(view.box), (np.arange(b)[:, None, None] + 1) % b,
                      np.arange(b)[:, None, None])
    np.testing.assert_array_equal(source, expect)


def _batch(config, rng, hidden):
  s, n = config.data.crop_size, config.data.unlabeled_batch
  part = lambda k: {"image": rng.integers(0, 256, (k, s, s, 3), dtype=np.uint8),
                    "label": rng.integers(0, 11, (k, s, s)).astype(np.uint8),
                    "pad": np.zeros((k, s, s), bool), "index": np.arange(k)}
  batch = {"labeled": part(config.data.labeled_batch), "unlabeled": part(n)}
  batch["unlabeled"]["label"][:] = 255
  batch["unlabeled"]["hidden_label"] = hidden
  return batch


def _loss_and_grad(config, batch):
  config.train.num_devices = 1
  run = loop.Run(config, "/tmp/unused")
  state = run.init_state()
  fn = jax.jit(step_lib.make_train_step(run.model, run.method, config))
  new, metrics = fn(state, batch)
  return metrics, jax.device_get(new.params)


def test_hidden_labels_never_reach_the_loss_but_feed_the_diagnostics():
  config = mean_teacher.get_config("smoke")
  config.pseudo_label.confidence.threshold = 0.0   # select every pixel
  rng = np.random.default_rng(1)
  shape = (config.data.unlabeled_batch, config.data.crop_size, config.data.crop_size)
  h1 = rng.integers(0, 11, shape).astype(np.uint8)
  h2 = (h1 + 1) % 11
  base_batch = _batch(config, rng, h1)
  other = dict(base_batch, unlabeled=dict(base_batch["unlabeled"], hidden_label=h2))
  m1, p1 = _loss_and_grad(config, base_batch)
  m2, p2 = _loss_and_grad(config, other)
  assert float(m1["loss"]) == float(m2["loss"])
  jax.tree.map(np.testing.assert_array_equal, p1, p2)   # same update, bit for bit
  # The diagnostics did see them: precision changes with the ground truth.
  prec = lambda m: float(m["pl/precision/num"]) / float(m["pl/precision/den"])
  assert float(m1["pl/coverage/num"]) == float(m1["pl/coverage/den"]) > 0
  assert prec(m1) != prec(m2)


def test_oracle_teaches_the_hidden_labels():
  config = mean_teacher.get_config("smoke")
  config.diagnostics.oracle_pseudo_labels = True
  rng = np.random.default_rng(2)
  shape = (config.data.unlabeled_batch, config.data.crop_size, config.data.crop_size)
  hidden = rng.integers(0, 11, shape).astype(np.uint8)
  metrics, _ = _loss_and_grad(config, _batch(config, rng, hidden))
  # Oracle pseudo-labels are the ground truth: precision and coverage exactly 1.
  for name in ("precision", "coverage"):
    assert float(metrics[f"pl/{name}/num"]) == float(metrics[f"pl/{name}/den"]) > 0
  # Without ground truth the switch is refused with a message.
  with pytest.raises(ValueError, match="oracle"):
    method = _method()
    method.oracle = True
    method.pseudo_label(_ctx(), jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4), bool), None, {})


def test_pseudo_label_metrics_match_a_numpy_count():
  rng = np.random.default_rng(3)
  c = 4
  labels = rng.integers(0, c, (3, 8, 8))
  truth = rng.integers(0, c, (3, 8, 8))
  truth[0, :2] = ops.IGNORE_INDEX
  mask = rng.random((3, 8, 8)) < 0.6
  out = diagnostics.pool_ratios({k: float(v) for k, v in diagnostics.pseudo_label_metrics(
      labels, mask, truth, num_classes=c).items()})
  known = truth != ops.IGNORE_INDEX
  sel = mask & known
  assert out["pl/precision"] == pytest.approx((sel & (labels == truth)).sum() / sel.sum())
  assert out["pl/coverage"] == pytest.approx(sel.sum() / known.sum())
  for k in range(c):
    by_label = sel & (labels == k)
    assert out[f"pl/precision_class_{k}"] == pytest.approx(
        (by_label & (truth == k)).sum() / by_label.sum())
    assert out[f"pl/coverage_class_{k}"] == pytest.approx(
        (sel & (truth == k)).sum() / (truth == k).sum())


def test_selection_metrics_count_only_unlabeled_draws():
  labels = np.array([0, 1, 2, 1, 1, 2])
  truth = np.array([0, 1, 2, 2, 1, 255])
  from_unlabeled = np.array([False, False, False, True, True, True])
  idx = np.array([[0, 3, 4], [5, 1, 3]])
  valid = np.array([[True, True, True], [True, True, False]])
  out = diagnostics.pool_ratios({k: float(v) for k, v in diagnostics.selection_metrics(
      idx, valid, labels, truth, from_unlabeled, name="x").items()})
  # Drawn from unlabeled pixels with known truth: 3 (wrong), 4 (right); 5 has no truth.
  assert out["x_precision"] == pytest.approx(1 / 2)
  assert out["x_unlabeled_share"] == pytest.approx(3 / 5)


def test_views_rows_split_a_concatenated_pass():
  out = {"logits": jnp.arange(10).reshape(5, 2)}
  np.testing.assert_array_equal(teacher_student.rows(out, 1, 3)["logits"], out["logits"][1:3])
