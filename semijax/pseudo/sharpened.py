"""Soft pseudo-label weights from the sharpened teacher confidence (CBC; Alonso et al., eq. 3).

Every pixel keeps the teacher's argmax as its pseudo-label and gets the per-pixel weight
beta = max_c p_c ** s (s = 6 in Alonso et al., following Feng et al.'s CBC), so confident
pixels dominate the pseudo-label cross-entropy without a hard threshold. Pass the weights as
the `mask` of `semijax.losses.supervised.cross_entropy_loss` (float masks are weights).
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import _deprecation, collectives


@_deprecation.renamed_args({"pad": _deprecation.pad_to_valid()})
def sharpened_confidence(probs: jax.typing.ArrayLike, *, power: float = 6.0,
                         threshold: float = 0.0, valid: Optional[jax.typing.ArrayLike] = None,
                         axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array, dict]:
  """Argmax pseudo-labels weighted by the sharpened confidence, beta = (max_c p_c)^power.

  Args:
    probs: `[B, H, W, C]` teacher class probabilities (any float dtype; no gradient).
    power: sharpening exponent s (6).
    threshold: pixels whose confidence is below it get weight 0 (0: none, the paper).
    valid: optional `[B, H, W]` bool, True on real pixels (default all); invalid (padded)
      pixels get weight 0. Deprecated alias: `pad=` (True on padding).
    axis_name: mapped axis, for global diagnostics.

  Returns:
    pseudo_labels `[B, H, W]` int32, weights `[B, H, W]` float32 in [0, 1], aux with
    `selected_ratio` (pixels with weight > 0 / valid pixels), `mean_weight` and
    `mean_confidence` (over valid pixels).
  """
  probs = lax.stop_gradient(jnp.asarray(probs, jnp.float32))
  conf = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  valid = jnp.ones(conf.shape, bool) if valid is None else jnp.asarray(valid, bool)
  weights = jnp.where(valid & (conf >= threshold), conf ** power, 0.0)
  total = lambda x: collectives.global_sum(jnp.sum(x.astype(jnp.float32)), axis_name)  # noqa: E731
  n_valid = jnp.maximum(total(valid), 1.0)
  aux = {"selected_ratio": total(weights > 0) / n_valid,
         "mean_weight": total(weights) / n_valid,
         "mean_confidence": total(jnp.where(valid, conf, 0.0)) / n_valid}
  return labels, weights, aux
