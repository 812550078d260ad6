"""Confusion matrices, the exact on-device accumulator and IoU scores vs NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.eval import metrics

C = 5


def _random_batch(seed, shape=(8, 6, 7), num_classes=C, ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  preds = rng.integers(0, num_classes, shape).astype(np.int32)
  labels = rng.integers(0, num_classes, shape).astype(np.int32)
  labels[rng.random(shape) < ignore_frac] = 255
  return preds, labels


def _reference_cm(preds, labels, num_classes, pixel_mask=None, ignore_index=255):
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  keep &= (preds >= 0) & (preds < num_classes)
  if pixel_mask is not None:
    keep &= pixel_mask
  idx = labels[keep].astype(np.int64) * num_classes + preds[keep]
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def test_confusion_matrix_matches_bincount():
  preds, labels = _random_batch(0)
  cm = metrics.confusion_matrix(preds, labels, C)
  assert cm.dtype == jnp.int32 and cm.shape == (C, C)
  np.testing.assert_array_equal(cm, _reference_cm(preds, labels, C))
  # Rows are ground truth: row sums count the labelled pixels of each class.
  np.testing.assert_array_equal(np.asarray(cm).sum(1), [(labels == c).sum() for c in range(C)])


def test_confusion_matrix_valid_masks():
  preds, labels = _random_batch(1)
  example_valid = np.array([True, False, True, True, False, True, True, False])
  cm = metrics.confusion_matrix(preds, labels, C, valid=example_valid)
  np.testing.assert_array_equal(
      cm, _reference_cm(preds, labels, C, np.broadcast_to(example_valid[:, None, None],
                                                          labels.shape)))
  pixel_valid = np.random.default_rng(2).random(labels.shape) < 0.5
  cm = metrics.confusion_matrix(preds, labels, C, valid=pixel_valid)
  np.testing.assert_array_equal(cm, _reference_cm(preds, labels, C, pixel_valid))


def test_out_of_range_labels_and_predictions_are_skipped():
  preds, labels = _random_batch(3)
  labels[0, 0, :3] = [7, -1, 254]  # Not ignore_index, but not a class either.
  preds[1, 0, :2] = [C, -3]
  cm = metrics.confusion_matrix(preds, labels, C)
  np.testing.assert_array_equal(cm, _reference_cm(preds, labels, C))
  # A different ignore value.
  cm = metrics.confusion_matrix(preds, np.where(labels == 255, 0, labels + 1), C + 1,
                                ignore_index=0)
  ref = _reference_cm(preds, np.where(labels == 255, 0, labels + 1), C + 1, ignore_index=0)
  np.testing.assert_array_equal(cm, ref)


def test_confusion_matrix_jit_does_not_retrace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def cm_fn(preds, labels, valid):
    return metrics.confusion_matrix(preds, labels, C, valid=valid)

  for seed in range(3):
    preds, labels = _random_batch(seed)
    valid = np.arange(8) % (seed + 2) != 0
    np.testing.assert_array_equal(
        cm_fn(preds, labels, valid),
        _reference_cm(preds, labels, C, np.broadcast_to(valid[:, None, None], labels.shape)))


def test_pmap_axis_name_gives_global_matrix():
  preds, labels = _random_batch(4, shape=(16, 5, 4))
  valid = np.arange(16) < 13  # A padded final batch.
  out = jax.pmap(lambda p, y, v: metrics.confusion_matrix(p, y, C, valid=v, axis_name="d"),
                 axis_name="d")(preds.reshape(8, 2, 5, 4), labels.reshape(8, 2, 5, 4),
                                valid.reshape(8, 2))
  ref = _reference_cm(preds, labels, C, np.broadcast_to(valid[:, None, None], labels.shape))
  np.testing.assert_array_equal(out, np.broadcast_to(ref, (8, C, C)))


def test_jit_over_sharded_batch(mesh8):
  preds, labels = _random_batch(5, shape=(16, 5, 4))
  sharding = NamedSharding(mesh8, P("data"))
  out = jax.jit(lambda p, y: metrics.confusion_matrix(p, y, C))(
      jax.device_put(preds, sharding), jax.device_put(labels, sharding))
  np.testing.assert_array_equal(out, _reference_cm(preds, labels, C))


def test_accumulator_is_exact_beyond_int32():
  big = np.array([[2**31 - 1, 5], [2**30, 0]], np.int64)
  step = jax.jit(metrics.accumulate, donate_argnums=0)
  acc = metrics.init_accumulator(2)
  total = np.zeros((2, 2), np.int64)
  for i in range(5):
    counts = big - i
    counts[counts < 0] = 0
    acc = step(acc, jnp.asarray(counts, jnp.int32))
    total += counts
  got = metrics.read_accumulator(acc)
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, total)
  assert total.max() > 2**33  # Far beyond int32.


def test_accumulator_sums_batches():
  acc = metrics.init_accumulator(C)
  total = np.zeros((C, C), np.int64)
  for seed in range(4):
    preds, labels = _random_batch(seed)
    acc = metrics.accumulate(acc, metrics.confusion_matrix(preds, labels, C))
    total += _reference_cm(preds, labels, C)
  np.testing.assert_array_equal(metrics.read_accumulator(acc), total)


def _reference_scores(cm):
  c = cm.shape[0]
  ious, accs = [], []
  for k in range(c):
    tp = cm[k, k]
    fp = sum(cm[j, k] for j in range(c) if j != k)
    fn = sum(cm[k, j] for j in range(c) if j != k)
    ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else np.nan)
    accs.append(tp / (tp + fn) if tp + fn > 0 else np.nan)
  return np.array(ious), np.array(accs)


def test_iou_from_confusion_matches_reference():
  preds, labels = _random_batch(6, shape=(4, 9, 9))
  cm = np.asarray(metrics.confusion_matrix(preds, labels, C), np.int64)
  out = metrics.iou_from_confusion(cm)
  ious, accs = _reference_scores(cm)
  np.testing.assert_allclose(out["per_class_iou"], ious, rtol=1e-12)
  np.testing.assert_allclose(out["miou"], ious.mean(), rtol=1e-12)
  np.testing.assert_allclose(out["miou_all_classes"], ious.mean(), rtol=1e-12)
  np.testing.assert_allclose(out["pixel_accuracy"], np.trace(cm) / cm.sum(), rtol=1e-12)
  np.testing.assert_allclose(out["mean_accuracy"], accs.mean(), rtol=1e-12)


def test_iou_absent_class_is_nan_and_excluded():
  cm = np.array([[5, 1, 0, 0],
                 [2, 3, 0, 0],
                 [0, 0, 0, 0],   # Class 2: never present, never predicted.
                 [0, 0, 0, 0]])  # Class 3: absent from the ground truth but predicted:
  cm[0, 3] = 4                   # IoU 0, and it counts in the mean.
  out = metrics.iou_from_confusion(cm)
  ious, accs = _reference_scores(cm)
  assert np.isnan(out["per_class_iou"][2]) and out["per_class_iou"][3] == 0
  np.testing.assert_allclose(out["per_class_iou"], ious, rtol=1e-12)
  np.testing.assert_allclose(out["miou"], np.nanmean(ious), rtol=1e-12)
  # U2PL/UniMatch-style mean over all classes counts class 2 as 0.
  np.testing.assert_allclose(out["miou_all_classes"], np.nansum(ious) / 4, rtol=1e-12)
  np.testing.assert_allclose(out["mean_accuracy"], np.nanmean(accs), rtol=1e-12)
  np.testing.assert_allclose(out["pixel_accuracy"], 8 / 15, rtol=1e-12)


def test_iou_of_empty_matrix_is_nan():
  out = metrics.iou_from_confusion(np.zeros((3, 3), np.int64))
  assert np.isnan(out["miou"]) and np.isnan(out["pixel_accuracy"])
  assert np.all(np.isnan(out["per_class_iou"]))
  with pytest.raises(ValueError):
    metrics.iou_from_confusion(np.zeros((3, 2)))
