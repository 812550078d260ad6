"""Diagnostics against the hidden ground truth of unlabeled images: is the method's input right?

When the unlabeled images have masks (the embedded data; a custom folder whose unlabeled
images have masks), the pipeline carries them as `hidden_label`; the step hands them to the
method as `StepContext.hidden_labels`, which a loss never reads. These functions measure,
per step, what the unlabeled losses are fed:

* pseudo-label **precision** = selected pixels whose label is right / selected pixels, and
  **coverage** = selected pixels / pixels with ground truth; overall and per class
  (precision by the pseudo-label's class, coverage by the true class);
* for contrastive terms, the share of anchors, positive keys and negatives drawn from
  unlabeled pixels whose pseudo-label is right (CAC's negative-sample precision, Fig. 6).

Metrics come as `(name/num, name/den)` sums; the host divides the window sums (so a ratio
is pooled over the logging window, and a class absent from a window is not logged), as
scenic's `psum_metric_normalizer`.
"""

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from semijax import _deprecation, ops

NUM, DEN = "/num", "/den"


def ratio_metric(name: str, num: jax.typing.ArrayLike, den: jax.typing.ArrayLike) -> Dict:
  """`{name/num: num, name/den: den}` as float32 scalars (divided on the host)."""
  return {name + NUM: jnp.asarray(num, jnp.float32), name + DEN: jnp.asarray(den, jnp.float32)}


def pool_ratios(means: Dict[str, float]) -> Dict[str, float]:
  """Host side: replaces every `name/num`, `name/den` pair by `name` = num / den.

  A pair whose denominator is 0 (nothing to measure in the window) is dropped.
  """
  out = {k: v for k, v in means.items() if not k.endswith((NUM, DEN))}
  for key, num in means.items():
    if key.endswith(NUM):
      name = key[:-len(NUM)]
      den = means.get(name + DEN, 0.0)
      if den > 0:
        out[name] = num / den
  return out


def pseudo_label_metrics(labels: jax.typing.ArrayLike, mask: jax.typing.ArrayLike,
                         truth: jax.typing.ArrayLike, *, num_classes: int,
                         prefix: str = "pl", per_class: bool = True,
                         ignore_index: int = ops.IGNORE_INDEX) -> Dict:
  """Precision and coverage of pseudo-labels against the ground truth.

  Only pixels with ground truth count (`truth != ignore_index`): precision =
  sum(mask & labels == truth) / sum(mask), coverage = sum(mask) / sum(truth valid); per
  class c, precision_c over pixels selected with label c, coverage_c over pixels of true
  class c.

  Args:
    labels: `[...]` int pseudo-labels (values outside `[0, C)` count as wrong).
    mask: `[...]` bool/float selection (a weight > 0 counts as selected).
    truth: `[...]` int ground truth with `ignore_index`.
    num_classes: C.
    prefix: metric name prefix.
    per_class: add the per-class pairs.
    ignore_index: the ground truth's unknown value.

  Returns:
    `ratio_metric` pairs: `{prefix}/precision`, `{prefix}/coverage` and, with `per_class`,
    `{prefix}/precision_class_{c}`, `{prefix}/coverage_class_{c}`.
  """
  labels = jax.lax.stop_gradient(jnp.asarray(labels, jnp.int32))
  truth = jnp.asarray(truth, jnp.int32)
  known = truth != ignore_index
  selected = (jax.lax.stop_gradient(jnp.asarray(mask, jnp.float32)) > 0) & known
  right = selected & (labels == truth)
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))
  out = {}
  out.update(ratio_metric(f"{prefix}/precision", f32(right), f32(selected)))
  out.update(ratio_metric(f"{prefix}/coverage", f32(selected), f32(known)))
  if per_class:
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    flat = lambda x: x.reshape(-1)
    by_label = flat(labels)[:, None] == classes
    by_truth = flat(truth)[:, None] == classes
    sel = flat(selected)[:, None]
    right_c = jnp.sum((by_label & sel & flat(right)[:, None]).astype(jnp.float32), 0)
    sel_c = jnp.sum((by_label & sel).astype(jnp.float32), 0)
    cov_c = jnp.sum((by_truth & sel).astype(jnp.float32), 0)
    true_c = jnp.sum((by_truth & flat(known)[:, None]).astype(jnp.float32), 0)
    for c in range(num_classes):
      out.update(ratio_metric(f"{prefix}/precision_class_{c}", right_c[c], sel_c[c]))
      out.update(ratio_metric(f"{prefix}/coverage_class_{c}", cov_c[c], true_c[c]))
  return out


def selection_metrics(indices: jax.typing.ArrayLike, valid: jax.typing.ArrayLike,
                      labels: jax.typing.ArrayLike, truth: jax.typing.ArrayLike,
                      from_unlabeled: jax.typing.ArrayLike, *, name: str,
                      ignore_index: int = ops.IGNORE_INDEX) -> Dict:
  """How many pixels a contrastive sampler drew from unlabeled images had a right label.

  Args:
    indices: int indices (any shape) into the flattened pixel arrays below.
    valid: bool, same shape as `indices` (drawn entries).
    labels: `[N]` the labels the sampler used (ground truth on labeled pixels,
      pseudo-labels on unlabeled ones).
    truth: `[N]` the ground truth (hidden on unlabeled pixels; `ignore_index` if unknown).
    from_unlabeled: `[N]` bool, whether a pixel comes from an unlabeled image.
    name: metric name, e.g. 'contrast/negatives'.

  Returns:
    `{name}_precision` (right / drawn from unlabeled with known truth) and
    `{name}_unlabeled_share` (drawn from unlabeled / drawn) pairs.
  """
  idx = jnp.asarray(indices, jnp.int32)
  valid = jnp.asarray(valid, bool)
  take = lambda x: jnp.take(jnp.asarray(x).reshape(-1), idx.reshape(-1), axis=0).reshape(
      idx.shape)
  lab, tru, unl = take(labels), take(truth), take(from_unlabeled).astype(bool)
  judged = valid & unl & (tru != ignore_index)
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))
  out = {}
  out.update(ratio_metric(f"{name}_precision", f32(judged & (lab == tru)), f32(judged)))
  out.update(ratio_metric(f"{name}_unlabeled_share", f32(valid & unl), f32(valid)))
  return out


def merge(total: Dict, new: Dict) -> Dict:
  """Adds the pairs of `new` into `total` (several calls with one prefix pool their counts)."""
  out = dict(total)
  for k, v in new.items():
    out[k] = out[k] + v if k in out else v
  return out


@_deprecation.renamed_args({"pad": _deprecation.pad_to_valid()}, positional=("pad",))
def oracle_labels(truth: jax.typing.ArrayLike, *, valid: Optional[jax.typing.ArrayLike] = None,
                  ignore_index: int = ops.IGNORE_INDEX):
  """The oracle's pseudo-labels: the ground truth, selected wherever it is known.

  Args:
    truth: `[...]` int ground truth with `ignore_index`.
    valid: optional `[...]` bool, True on real pixels (default all); deprecated alias `pad=`
      (True on padding), also as the second positional argument.
    ignore_index: the ground truth's unknown value.

  Returns:
    `(labels [...] int32, mask [...] bool, aux)` like a pseudo-label rule; aux has
    `selected_ratio` (selected / valid pixels).
  """
  truth = jnp.asarray(truth, jnp.int32)
  mask = truth != ignore_index
  if valid is not None:
    mask = mask & jnp.asarray(valid, bool)
  valid = jnp.ones(mask.shape, bool) if valid is None else jnp.asarray(valid, bool)
  ratio = jnp.sum(mask.astype(jnp.float32)) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)),
                                                          1.0)
  return truth, mask, {"selected_ratio": ratio}
