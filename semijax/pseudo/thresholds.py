"""Confidence-based pseudo-label selection: a fixed threshold and DSSN's class-aware CPLG.

Each rule returns `(pseudo_labels, mask, aux)`: the argmax labels `[B, H, W]` int32, the
selected pixels `[B, H, W]` bool, and a flat dict of scalar diagnostics; the threshold helper
`cplg_thresholds` returns `(thresholds, aux)`. Masks mean True = keep: `valid` marks real
(non-padding) pixels. Selection is never differentiable; pass the labels and mask to
`semijax.losses.supervised.cross_entropy_loss`.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import _deprecation, collectives

CPLG_RULES = ("official", "max")


def _ratio(selected: jax.Array, valid: jax.Array, axis_name: Optional[str]) -> jax.Array:
  num = collectives.global_sum(jnp.sum(selected.astype(jnp.float32)), axis_name)
  den = collectives.global_sum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  return num / jnp.maximum(den, 1.0)


@_deprecation.renamed_args({"pad": _deprecation.pad_to_valid()})
def confidence_mask(
    probs: jax.typing.ArrayLike,
    *,
    threshold: float = 0.95,
    inclusive: bool = True,
    valid: Optional[jax.typing.ArrayLike] = None,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, jax.Array, dict]:
  """Fixed-threshold pseudo-labels (FixMatch; UniMatch `conf >= conf_thresh`).

  y_hat(x) = argmax_j p_j(x), selected iff max_j p_j(x) >= threshold (`>` with
  `inclusive=False`) and x is valid. DSSN's Cityscapes recipe is this rule with threshold 0,
  i.e. every non-padding pixel.

  Args:
    probs: `[B, H, W, C]` class probabilities (any float dtype).
    threshold: confidence threshold.
    inclusive: `>=` (FixMatch, UniMatch) if True, `>` otherwise.
    valid: optional `[B, H, W]` bool, True on real pixels (default all); invalid (padded)
      pixels are never selected nor counted. Deprecated alias: `pad=` (True on padding).
    axis_name: mapped axis, for a global `selected_ratio`.

  Returns:
    pseudo_labels `[B, H, W]` int32, mask `[B, H, W]` bool, aux with `selected_ratio`
    (selected / valid pixels) and `mean_confidence` (over valid pixels).
  """
  probs = lax.stop_gradient(jnp.asarray(probs, jnp.float32))
  conf = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  mask = conf >= threshold if inclusive else conf > threshold
  valid = jnp.ones(conf.shape, bool) if valid is None else jnp.asarray(valid, bool)
  mask = mask & valid
  conf_sum = collectives.global_sum(jnp.sum(jnp.where(valid, conf, 0.0)), axis_name)
  n_valid = collectives.global_sum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  aux = {"selected_ratio": _ratio(mask, valid, axis_name),
         "mean_confidence": conf_sum / jnp.maximum(n_valid, 1.0)}
  return labels, mask, aux


@_deprecation.renamed_args({"ratio": "peak_fraction", "peak_mask": "valid"})
def cplg_thresholds(
    probs: jax.typing.ArrayLike,
    *,
    peak_fraction: float = 0.96,
    tau_low: float = 0.92,
    rule: str = "official",
    valid: Optional[jax.typing.ArrayLike] = None,
) -> Tuple[jax.Array, dict]:
  """DSSN's class-wise thresholds tau_{b,j} (eqs. 20-21), per image b and class j.

  m_{b,j} = max_x p_{b,j}(x) (eq. 20) and r = `peak_fraction`. The paper leaves eq. 21 out;
  the official code (`get_adaptive_binary_mask`) uses
    'official': tau = r m if m > tau_low else m    (a class peaking at or below tau_low
                                                    then selects nothing, since p > m never
                                                    holds)
  and the alternative reading of the text is
    'max':      tau = max(r m, tau_low).

  Args:
    probs: `[B, H, W, C]` float32 probabilities.
    peak_fraction: r, the fraction of a class's peak confidence its threshold is (DSSN 0.96;
      deprecated alias: `ratio`).
    tau_low: the lower bound on a class peak.
    rule: one of `CPLG_RULES`.
    valid: optional `[B, H, W]` bool of the pixels the peak is taken over (default all,
      padding included, as the official code; deprecated alias: `peak_mask`).

  Returns:
    `(thresholds, aux)`: tau `[B, C]` float32 and aux with `peaks`, m `[B, C]` float32.
  """
  if rule not in CPLG_RULES:
    raise ValueError(f"rule={rule!r}; expected one of {CPLG_RULES}")
  probs = jnp.asarray(probs, jnp.float32)
  if valid is not None:
    probs = jnp.where(jnp.asarray(valid, bool)[..., None], probs, 0.0)
  peaks = jnp.max(probs, axis=(1, 2))
  scaled = jnp.float32(peak_fraction) * peaks
  if rule == "official":
    tau = jnp.where(peaks > tau_low, scaled, peaks)
  else:
    tau = jnp.maximum(scaled, jnp.float32(tau_low))
  return tau, {"peaks": peaks}


_CPLG_RENAMES = {"ratio": "peak_fraction", "pad": _deprecation.pad_to_valid(),
                 "peaks_include_pad": "peaks_include_invalid"}


@_deprecation.renamed_args(_CPLG_RENAMES)
def cplg_select(
    probs: jax.typing.ArrayLike,
    *,
    peak_fraction: float = 0.96,
    tau_low: float = 0.92,
    rule: str = "official",
    valid: Optional[jax.typing.ArrayLike] = None,
    peaks_include_invalid: bool = True,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, jax.Array, dict]:
  """Class-aware pseudo-label generation (CPLG, DSSN eqs. 20-22) from probabilities.

  Pixel x of image b is selected iff p_{b,c}(x) > tau_{b,c} (strict, eq. 22) for its argmax
  class c = argmax_j p_{b,j}(x) (eqs. 2-3), with tau_{b,c} = peak_fraction * max_x p_{b,c}(x)
  (see `cplg_thresholds`). The official code selects x if *any* class passes its threshold;
  the two agree whenever every threshold is above 1/2 (the defaults give
  tau >= 0.96 * 0.92 > 0.88), because only the argmax can then exceed it.

  Args:
    probs: `[B, H, W, C]` probabilities (any float dtype).
    peak_fraction: r (0.96 in DSSN; deprecated alias: `ratio`).
    tau_low: lower bound on a class peak (0.92 in DSSN).
    rule: `'official'` or `'max'`, see `cplg_thresholds`.
    valid: optional `[B, H, W]` bool, True on real pixels (default all); invalid (padded)
      pixels are removed from the mask and from the ratios. Deprecated alias: `pad=` (True on
      padding).
    peaks_include_invalid: take the class peaks over invalid pixels too (official) or not
      (deprecated alias: `peaks_include_pad`).
    axis_name: mapped axis, for global aux values (the thresholds are per image and need no
      communication).

  Returns:
    pseudo_labels `[B, H, W]` int32, mask `[B, H, W]` bool, aux with `selected_ratio`
    (selected / valid pixels) and `classes_kept` (mean over images of the number of
    classes with at least one selected pixel).
  """
  probs = lax.stop_gradient(jnp.asarray(probs, jnp.float32))
  num_classes = probs.shape[-1]
  given = valid is not None
  valid = jnp.ones(probs.shape[:3], bool) if valid is None else jnp.asarray(valid, bool)
  peak_valid = valid if (given and not peaks_include_invalid) else None
  tau, _ = cplg_thresholds(probs, peak_fraction=peak_fraction, tau_low=tau_low, rule=rule,
                           valid=peak_valid)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  top = jnp.max(probs, axis=-1)
  tau_at = jnp.take_along_axis(tau, labels.reshape(labels.shape[0], -1), axis=1).reshape(
      labels.shape)
  mask = (top > tau_at) & valid
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[..., None]
  kept = jnp.sum(jnp.max(onehot, axis=(1, 2)))
  images = collectives.global_sum(jnp.float32(labels.shape[0]), axis_name)
  aux = {"selected_ratio": _ratio(mask, valid, axis_name),
         "classes_kept": collectives.global_sum(kept, axis_name) / images}
  return labels, mask, aux


@_deprecation.renamed_args(_CPLG_RENAMES)
def cplg_mask(
    logits: jax.typing.ArrayLike,
    *,
    peak_fraction: float = 0.96,
    tau_low: float = 0.92,
    rule: str = "official",
    valid: Optional[jax.typing.ArrayLike] = None,
    peaks_include_invalid: bool = True,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, jax.Array, dict]:
  """CPLG (DSSN, Tian et al., ACM MM 2023, eqs. 20-22) from logits: softmax, then `cplg_select`.

  DSSN applies it at full resolution to the teacher's CutMix-mixed logits for the strong
  views and to the student's detached clean logits for the feature-dropout views; the
  Cityscapes recipe does not use it (`confidence_mask(threshold=0)` instead).

  Args:
    logits: `[B, H, W, C]` (any float dtype; softmax in float32).
    peak_fraction, tau_low, rule, valid, peaks_include_invalid, axis_name: see `cplg_select`
      (deprecated aliases `ratio`, `pad`, `peaks_include_pad` as there).

  Returns:
    pseudo_labels `[B, H, W]` int32, mask `[B, H, W]` bool, aux (see `cplg_select`).
  """
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return cplg_select(probs, peak_fraction=peak_fraction, tau_low=tau_low, rule=rule,
                     valid=valid, peaks_include_invalid=peaks_include_invalid,
                     axis_name=axis_name)
