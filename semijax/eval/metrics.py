"""Segmentation metrics from confusion matrices: mIoU, pixel and mean accuracy.

mIoU is only ever computed from a confusion matrix summed over the whole evaluation set
(never as a mean of per-image or per-batch IoUs), as scenic and mmseg do. The device side
builds `[C, C]` int32 matrices with static shapes (jit/pmap friendly) and sums them in a
`ConfusionAccumulator` that stays on device; the host fetches it once at the end and turns
it into numbers with `iou_from_confusion`.

Counting is exact: a single `confusion_matrix` call is exact while it counts fewer than
2**31 pixels (psum included), i.e. about 1000 Cityscapes images of 2048x1024 per call; the
accumulator keeps two int32 words per entry and is exact up to 2**61 pixels.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from semijax import collectives, ops

# The accumulator stores each count as high * 2**_LOW_BITS + low with 0 <= low < 2**_LOW_BITS.
_LOW_BITS = 30
_LOW_MASK = (1 << _LOW_BITS) - 1


def _pixel_mask(valid: Optional[jax.typing.ArrayLike], shape) -> jax.Array:
  """Broadcasts an optional `[B]` example mask or `[B, H, W]` pixel mask to `shape`."""
  if valid is None:
    return jnp.ones(shape, bool)
  valid = jnp.asarray(valid).astype(bool)
  if valid.ndim == 1:
    valid = valid.reshape((valid.shape[0],) + (1,) * (len(shape) - 1))
  return jnp.broadcast_to(valid, shape)


def confusion_matrix(preds: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
                     num_classes: int, *, ignore_index: int = ops.IGNORE_INDEX,
                     valid: Optional[jax.typing.ArrayLike] = None,
                     axis_name: Optional[str] = None) -> jax.Array:
  """Confusion matrix of a batch of label maps (rows ground truth, columns prediction).

  A pixel counts when `valid` allows it, its label is in `[0, C)` (so `ignore_index` and
  any other out-of-range label are skipped) and its prediction is in `[0, C)`. Built with
  a scatter-add of int32 ones into `C * C` bins, so it is exact and static-shape.

  Args:
    preds: `[B, H, W]` int predicted classes (e.g. `argmax(logits, -1)`).
    labels: `[B, H, W]` int ground truth, `ignore_index` where unlabelled.
    num_classes: static C.
    ignore_index: label value that never counts.
    valid: optional `[B]` bool marking the real examples of a padded fixed-size batch, or
      a `[B, H, W]` bool pixel mask.
    axis_name: mapped axis inside `pmap`/`shard_map`; the result is then the global
      matrix (psum over devices), identical on every device.

  Returns:
    `[C, C]` int32 counts; `cm[i, j]` = pixels of class i predicted as j. Exact while the
    total number of counted pixels (over all devices) is below 2**31.
  """
  preds = jnp.asarray(preds).astype(jnp.int32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if preds.shape != labels.shape:
    raise ValueError(f"preds {preds.shape} and labels {labels.shape} must have one shape")
  keep = _pixel_mask(valid, labels.shape) & ops.valid_label_mask(labels, ignore_index)
  keep &= (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
  # Skipped pixels go to the out-of-range bin C * C, which the scatter drops.
  bins = jnp.where(keep, labels * num_classes + preds, num_classes * num_classes)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[bins.reshape(-1)].add(
      1, mode="drop")
  return collectives.global_sum(counts.reshape(num_classes, num_classes), axis_name)


# ----------------------------------------------------------------------------------------
# Summing matrices across batches on device.


class ConfusionAccumulator(NamedTuple):
  """Running sum of int32 count arrays, exact beyond int32 (JAX runs without int64).

  Each entry is `high * 2**30 + low`. Only `accumulate` should touch the fields.
  """
  low: jax.Array   # [...] int32, in [0, 2**30).
  high: jax.Array  # [...] int32, multiples of 2**30.


def init_accumulator(num_classes: int) -> ConfusionAccumulator:
  """An all-zero accumulator for `[C, C]` confusion matrices."""
  return zeros_accumulator((num_classes, num_classes))


def zeros_accumulator(shape) -> ConfusionAccumulator:
  """An all-zero accumulator for count arrays of any `shape`."""
  # Two distinct buffers, so that the accumulator can be donated.
  return ConfusionAccumulator(low=jnp.zeros(shape, jnp.int32), high=jnp.zeros(shape, jnp.int32))


def accumulate(acc: ConfusionAccumulator, counts: jax.typing.ArrayLike) -> ConfusionAccumulator:
  """Adds a non-negative int32 count array (e.g. one batch's confusion matrix) to `acc`.

  Pure and jit-able; call it inside the jitted eval step (donating `acc`) so nothing leaves
  the device until `read_accumulator`. Exact for any non-negative int32 `counts`.

  Args:
    acc: running sums, same shape as `counts`.
    counts: `[...]` non-negative integers below 2**31.

  Returns:
    The updated accumulator.
  """
  counts = jnp.asarray(counts).astype(jnp.int32)
  low = acc.low + (counts & _LOW_MASK)   # < 2**31: no overflow.
  high = acc.high + (counts >> _LOW_BITS) + (low >> _LOW_BITS)
  return ConfusionAccumulator(low=low & _LOW_MASK, high=high)


def read_accumulator(acc: ConfusionAccumulator) -> np.ndarray:
  """Fetches the sums to the host (one transfer) as exact int64 NumPy counts."""
  low, high = jax.device_get((acc.low, acc.high))
  return (np.asarray(high, np.int64) << _LOW_BITS) + np.asarray(low, np.int64)


# ----------------------------------------------------------------------------------------
# Host-side scores.


def iou_from_confusion(cm: np.ndarray) -> dict:
  """IoU and accuracy scores of a summed `[C, C]` confusion matrix (host side, NumPy).

  With TP_c = cm[c, c], FP_c = column sum - TP_c and FN_c = row sum - TP_c:
  IoU_c = TP_c / (TP_c + FP_c + FN_c).

  `miou` averages IoU over the classes whose union (TP + FP + FN) is non-zero: a class that
  is neither present nor predicted has no defined IoU and is left out. U2PL, UniMatch and
  DSSN instead average `TP / (union + 1e-10)` over all C classes, which counts such a
  class as 0; that value is returned as `miou_all_classes`. The two agree whenever every
  class appears in the ground truth or the predictions, as on the full VOC and Cityscapes
  val sets; they differ on small or custom sets.

  Args:
    cm: `[C, C]` counts, rows ground truth, columns prediction (any integer dtype).

  Returns:
    dict with `miou` (float), `miou_all_classes` (float), `per_class_iou` (`[C]` float64,
    NaN where the union is 0), `pixel_accuracy` (TP / all counted pixels) and
    `mean_accuracy` (mean over classes present in the ground truth of TP_c / GT_c).
    Scalars are NaN when nothing was counted.
  """
  cm = np.asarray(cm, np.float64)  # Exact for counts below 2**53.
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"expected a square [C, C] matrix, got shape {cm.shape}")
  tp = np.diag(cm)
  gt = cm.sum(axis=1)
  union = gt + cm.sum(axis=0) - tp
  per_class_iou = np.full(tp.shape, np.nan)
  np.divide(tp, union, out=per_class_iou, where=union > 0)
  per_class_acc = np.full(tp.shape, np.nan)
  np.divide(tp, gt, out=per_class_acc, where=gt > 0)
  total = cm.sum()

  def _mean(x):
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")

  return {
      "miou": _mean(per_class_iou),
      "miou_all_classes": float(np.nan_to_num(per_class_iou, nan=0.0).mean())
                          if total > 0 else float("nan"),
      "per_class_iou": per_class_iou,
      "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
      "mean_accuracy": _mean(per_class_acc),
  }
