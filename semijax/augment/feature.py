"""Feature-level perturbations applied inside the model's forward pass.

DSSN/UniMatch's "FP" branch (`deeplabv3plus2fp.py`) runs the decoder on
`[clean ; Dropout2d(p) ; Dropout2d(p)]` copies of the encoder features (both the low-level
`c1` and the high-level `c4`), each dropped copy with its own mask.
"""

import jax
import jax.numpy as jnp


def channel_dropout(rng: jax.Array, features: jax.typing.ArrayLike, *,
                    rate: float) -> jax.Array:
  """PyTorch `nn.Dropout2d(p=rate)` in training mode, NHWC.

  Each (image, channel) pair is zeroed with probability `rate` over all its pixels; the
  surviving channels are scaled by 1 / (1 - rate), so E[output] = input. `rate = 1` gives
  zeros, as PyTorch. A new key gives a new mask; the same key reproduces it.

  Args:
    rng: PRNG key (use a different one for every perturbed copy).
    features: `[B, H, W, C]` (any float dtype; the output keeps it).
    rate: static drop probability in [0, 1].

  Returns:
    `[B, H, W, C]`, dtype of `features`.
  """
  features = jnp.asarray(features)
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate={rate} must be in [0, 1]")
  if rate == 0.0:
    return features
  if rate == 1.0:
    return jnp.zeros_like(features)
  batch, channels = features.shape[0], features.shape[-1]
  keep = jax.random.bernoulli(rng, 1.0 - rate, (batch, channels))
  shape = (batch,) + (1,) * (features.ndim - 2) + (channels,)
  scale = jnp.asarray(1.0 / (1.0 - rate), features.dtype)
  return jnp.where(keep.reshape(shape), features * scale, jnp.zeros((), features.dtype))
