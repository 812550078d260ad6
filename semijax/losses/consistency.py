"""DSSN's logit consistency ("contrastive") terms and its weak-to-strong CE.

Tian et al., "Improving Semi-Supervised Semantic Segmentation with Dual-Level Siamese
Structure Network", ACM MM 2023 (DSSN), eqs. 10, 14 (consistency) and 18-19 (weak-to-strong).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from semijax import _deprecation, collectives, ops
from semijax.losses import supervised

FORMS = ("standardized_mse", "l2")


def standardize_logits(logits: jax.typing.ArrayLike) -> jax.Array:
  """Each pixel's logit vector minus its mean over classes, divided by its unbiased std.

  `(h - mean_c h) / std_c(h, ddof=1)`, as DSSN's official code (`torch.std`, dim=1). A pixel
  whose logits are all equal standardises to 0 (the official code gives NaN there).

  Args:
    logits: `[..., C]`, C >= 2.

  Returns:
    `[..., C]` float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"need at least 2 classes to standardise, got {num_classes}")
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  var = jnp.sum(centred * centred, axis=-1, keepdims=True) / (num_classes - 1)
  safe = var > 0
  return jnp.where(safe, centred / jnp.sqrt(jnp.where(safe, var, 1.0)), 0.0)


def pixel_consistency(logits_a: jax.typing.ArrayLike, logits_b: jax.typing.ArrayLike, *,
                      form: str = "standardized_mse") -> jax.Array:
  """Unreduced per-pixel consistency term between two predictions of the same pixels.

    'l2':               d(x) = sum_j (h^a_j(x) - h^b_j(x))^2                   (eqs. 10, 14)
    'standardized_mse': d(x) = mean_j (z^a_j(x) - z^b_j(x))^2, z = standardize_logits(h)

  Args:
    logits_a, logits_b: `[B, H, W, C]`.
    form: one of `FORMS`.

  Returns:
    `[B, H, W]` float32.
  """
  if form not in FORMS:
    raise ValueError(f"form={form!r}; expected one of {FORMS}")
  a = jnp.asarray(logits_a, jnp.float32)
  b = jnp.asarray(logits_b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
  if form == "l2":
    return jnp.sum((a - b) ** 2, axis=-1)
  diff = standardize_logits(a) - standardize_logits(b)
  return jnp.mean(diff * diff, axis=-1)


def logit_consistency_loss(
    logits_a: jax.typing.ArrayLike,
    logits_b: jax.typing.ArrayLike,
    mask: Optional[jax.typing.ArrayLike] = None,
    *,
    form: str = "standardized_mse",
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """DSSN's dual-level consistency between two strong views (paper: "contrastive" loss).

  Paper (eqs. 10 and 14, `form='l2'`), for the image-level views (ls1, ls2) and the
  feature-dropout views (hs1, hs2):

    L_cl = 1 / (W H) sum_i || h_i^{s1} - h_i^{s2} ||_2^2

  Official code (`form='standardized_mse'`, the default): `MSELoss` between the per-pixel
  class-standardised logits, i.e. the mean over B C H W of (z^{s1} - z^{s2})^2 with
  z = (h - mean_c h) / std_c(h) (unbiased std). Both forms are a masked mean over pixels of
  `pixel_consistency`, so with no mask 'standardized_mse' equals the official mean over
  B·C·H·W and 'l2' the paper's per-image pixel mean, averaged over the batch. Gradients flow
  into both views (no stop-gradient on either side, as the official code).

  Args:
    logits_a: `[B, H, W, C]` first view (any float dtype; computed in float32).
    logits_b: `[B, H, W, C]` second view, the same pixels.
    mask: optional `[B, H, W]` bool/float pixel weights (default: every pixel, as official,
      padding included).
    form: `'standardized_mse'` (official code) or `'l2'` (paper).
    axis_name: mapped axis for the global mean inside `pmap`/`shard_map`.

  Returns:
    `(loss, aux)`: scalar float32; aux has `selected_ratio` (weighted pixels / pixels).
    Exactly 0 with zero gradients when the mask is empty.
  """
  per_pixel = pixel_consistency(logits_a, logits_b, form=form)
  weights = jnp.ones(per_pixel.shape, jnp.float32) if mask is None else jnp.asarray(
      mask, jnp.float32)
  loss = ops.masked_mean(per_pixel, weights, axis_name=axis_name)
  n_sel = collectives.global_sum(jnp.sum(jax.lax.stop_gradient(weights)), axis_name)
  n_all = collectives.global_sum(jnp.float32(per_pixel.size), axis_name)
  return loss, {"selected_ratio": n_sel / jnp.maximum(n_all, 1.0)}


@_deprecation.renamed_args({"pad": _deprecation.pad_to_valid()}, positional=("pad",))
def weak_to_strong_loss(
    logits: jax.typing.ArrayLike,
    pseudo_labels: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    valid: Optional[jax.typing.ArrayLike] = None,
    axis_name: Optional[str] = None,
) -> Tuple[jax.Array, dict]:
  """DSSN's weak-to-strong pseudo-label CE (eqs. 18-19) as the official code normalises it.

    L_w2s = sum_x m(x) CE(h^s(x), y_hat(x)) / #{x : valid(x)}

  with m the CPLG mask (`semijax.pseudo.cplg_mask`) of the weak view, restricted to valid
  (non-padding) pixels. A thin wrapper of `cross_entropy_loss(reduction='all',
  normalizer_mask=valid)`; call it once per strong view (DSSN sums s1, s2, fp, Fp with
  weight 0.25 each). Pseudo-labels are constants: stop-gradient them (done here too).

  Args:
    logits: `[B, H, W, C]` strong-view logits.
    pseudo_labels: `[B, H, W]` int, the weak view's (CutMix-mixed) argmax.
    mask: `[B, H, W]` bool, the selection (CPLG or confidence mask).
    valid: optional `[B, H, W]` bool, True on real pixels (the normaliser counts them; default
      every pixel). Deprecated alias: `pad=` (True on padding), also as the 4th positional
      argument, converted to `valid=~pad`.
    axis_name: mapped axis for the global value.

  Returns:
    `(loss, aux)` with `selected_ratio` (selected / valid pixels).
  """
  pseudo_labels = jax.lax.stop_gradient(jnp.asarray(pseudo_labels, jnp.int32))
  mask = jnp.asarray(mask, bool)
  normalizer = None
  if valid is not None:
    normalizer = jnp.asarray(valid, bool)
    mask = mask & normalizer
  return supervised.cross_entropy_loss(logits, pseudo_labels, mask, reduction="all",
                                       normalizer_mask=normalizer, axis_name=axis_name)
