"""CutMix and ClassMix masks and the mixing itself, per image, static shapes.

Convention: a mix mask is `[B, H, W]` bool and **True marks the pixels taken from the mix
source** `b`; `mix(mask, a, b) = where(mask, b, a)`. The source is whatever the caller passes:

* UniMatch/DSSN: a second, independently augmented draw of unlabeled images (the same
  images under a different augmentation, because both loaders share the sampler order), so
  `b` is a separate batch; the box comes from `cutmix_box` (p = 0.5 per image).
* U2PL/DGCL: image (i + 1) mod B of the same batch, `b = roll_batch(a)`; the box comes
  from `cutmix_box_u2pl` (half the image), and DGCL applies CutMix to the whole batch with
  probability 0.5 (`apply_batch_prob`).
* Alonso et al. (ClassMix): classes of image (i + 1) mod B are pasted onto image i, so the
  mask is computed on the source's labels and rolled with it:
  `mix(roll_batch(classmix_mask(rng, labels, ...)), a, roll_batch(a))`.

Images, labels, logits, probabilities and padding masks are all mixed by the same call, with
any trailing shape after `[B, H, W]`.
"""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from semijax import collectives, ops


def roll_batch(x: Any) -> Any:
  """`y[i] = x[(i + 1) mod B]` along the leading axis, for arrays or pytrees of arrays."""
  return jax.tree.map(lambda v: jnp.roll(jnp.asarray(v), -1, axis=0), x)


def mix(mask: jax.typing.ArrayLike, a: Any, b: Any) -> Any:
  """`where(mask, b, a)` with a `[B, H, W]` mask broadcast over trailing axes.

  Args:
    mask: `[B, H, W]` bool (or 0/1), True where the pixel comes from `b`.
    a: array `[B, H, W, ...]` (or a pytree of such arrays), the base.
    b: same structure and shapes as `a`, the source.

  Returns:
    The mixed array(s), dtype of `a`.
  """
  mask = jnp.asarray(mask).astype(bool)

  def one(x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape[:3] != mask.shape:
      raise ValueError(f"mask {mask.shape} does not lead array shape {x.shape}")
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 3))
    return jnp.where(m, y.astype(x.dtype), x)

  return jax.tree.map(one, a, b)


def _uniform_int(u: jax.Array, low, high) -> jax.Array:
  """Integers uniform on {low, ..., high - 1} from uniforms u in [0, 1) (one PRNG draw per
  function keeps compile time down)."""
  span = high - low
  return low + jnp.minimum(jnp.floor(u * span).astype(jnp.int32), span - 1)


def _box_mask(y0, x0, h, w, height: int, width: int) -> jax.Array:
  """`[B, H, W]` bool, True on rows [y0, y0 + h) and columns [x0, x0 + w) of each image."""
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= y0[:, None]) & (rows < (y0 + h)[:, None])
  in_cols = (cols >= x0[:, None]) & (cols < (x0 + w)[:, None])
  return in_rows[:, :, None] & in_cols[:, None, :]


def cutmix_box_params(
    rng: jax.Array, batch: int, height: int, width: int, *, p: float = 0.5,
    area: Tuple[float, float] = (0.02, 0.4), ratio: Tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 512,
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """UniMatch's `obtain_cutmix_box` draws, as `(y0, x0, h, w, apply)`, each `[B]` int32/bool.

  Per image: with probability p a box is drawn. Its area s ~ U[area] * H * W is drawn once;
  then (r, x, y) with r ~ U[ratio], x ~ U{0..W-1}, y ~ U{0..H-1}, w = floor(sqrt(s / r)),
  h = floor(sqrt(s r)) are redrawn until the box fits (x + w <= W and y + h <= H). The
  rejection loop is unrolled into `max_tries` proposals and the first fitting one is used,
  which is exactly the reference distribution whenever one fits; at the defaults the
  worst-case chance that none of 512 fits is about 1e-14 (area 0.4, about 6 % of proposals
  fit). If none does, the last proposal is clipped to the image.

  Args:
    rng: PRNG key.
    batch, height, width: static sizes.
    p: per-image probability of a box (apply False gives an empty mask).
    area: `(min, max)` box area as a fraction of H * W.
    ratio: `(min, max)` of r = h / w.
    max_tries: static number of proposals.

  Returns:
    y0, x0, h, w (int32) and apply (bool), each `[B]`.
  """
  u = jax.random.uniform(rng, (batch, 2 + 3 * max_tries))
  apply = u[:, 0] < p
  size = (area[0] + (area[1] - area[0]) * u[:, 1:2]) * (height * width)
  r = ratio[0] + (ratio[1] - ratio[0]) * u[:, 2:2 + max_tries]
  w = jnp.floor(jnp.sqrt(size / r)).astype(jnp.int32)
  h = jnp.floor(jnp.sqrt(size * r)).astype(jnp.int32)
  x = _uniform_int(u[:, 2 + max_tries:2 + 2 * max_tries], 0, width)
  y = _uniform_int(u[:, 2 + 2 * max_tries:], 0, height)
  fits = (x + w <= width) & (y + h <= height)
  first = jnp.where(jnp.any(fits, axis=1), jnp.argmax(fits, axis=1), max_tries - 1)
  take = lambda v: jnp.take_along_axis(v, first[:, None], axis=1)[:, 0]  # noqa: E731
  w, h = jnp.minimum(take(w), width), jnp.minimum(take(h), height)
  x0 = jnp.minimum(take(x), width - w)
  y0 = jnp.minimum(take(y), height - h)
  return y0, x0, h, w, apply


def cutmix_box(rng: jax.Array, batch: int, height: int, width: int, *, p: float = 0.5,
               area: Tuple[float, float] = (0.02, 0.4),
               ratio: Tuple[float, float] = (0.3, 1 / 0.3), max_tries: int = 512) -> jax.Array:
  """UniMatch/DSSN CutMix box per image (`obtain_cutmix_box`), see `cutmix_box_params`.

  Args:
    rng: PRNG key.
    batch, height, width: static sizes.
    p: per-image probability of a box.
    area: `(min, max)` fraction of the image area.
    ratio: `(min, max)` aspect ratio h / w.
    max_tries: static number of rejection proposals.

  Returns:
    `[B, H, W]` bool, True inside the box (pixels taken from the mix source).
  """
  y0, x0, h, w, apply = cutmix_box_params(rng, batch, height, width, p=p, area=area,
                                          ratio=ratio, max_tries=max_tries)
  return _box_mask(y0, x0, h, w, height, width) & apply[:, None, None]


def cutmix_box_u2pl_params(rng: jax.Array, batch: int, height: int, width: int, *,
                           ratio: float = 2.0) -> Tuple[jax.Array, ...]:
  """U2PL's `generate_cutout_mask(img_size, ratio)` draws, as `(y0, x0, h, w)`, each `[B]`.

  The box area is H W / ratio; w ~ U{floor(W / ratio) + 1, ..., W - 1}, h = round(area / w)
  (half to even, as NumPy), x0 ~ U{0..W-w}, y0 ~ U{0..H-h}.
  """
  u = jax.random.uniform(rng, (3, batch))
  box_area = height * width / ratio
  w = _uniform_int(u[0], int(width / ratio + 1), width)
  h = jnp.minimum(jnp.round(box_area / w), height).astype(jnp.int32)
  x0 = _uniform_int(u[1], 0, width - w + 1)
  y0 = _uniform_int(u[2], 0, height - h + 1)
  return y0, x0, h, w


def cutmix_box_u2pl(rng: jax.Array, batch: int, height: int, width: int, *,
                    ratio: float = 2.0) -> jax.Array:
  """U2PL/DGCL/CSC CutMix box, one per image, always present (see `cutmix_box_u2pl_params`).

  U2PL's own mask is 1 outside the box (kept from image i); ours is True inside it, the
  pixels taken from image (i + 1) mod B. Pair with `roll_batch` and, for DGCL's "CutMix with
  probability 0.5 per batch", with `apply_batch_prob`.

  Args:
    rng: PRNG key.
    batch, height, width: static sizes.
    ratio: the box covers 1 / ratio of the image.

  Returns:
    `[B, H, W]` bool, True inside the box.
  """
  y0, x0, h, w = cutmix_box_u2pl_params(rng, batch, height, width, ratio=ratio)
  return _box_mask(y0, x0, h, w, height, width)


def apply_batch_prob(rng: jax.Array, mask: jax.typing.ArrayLike, *, p: float,
                     axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array]:
  """Keeps a whole batch's mix mask with probability p, else empties it (DGCL, U2PL).

  One Bernoulli draw for the batch; with `axis_name` the draw of device 0 is used on every
  device, so the decision is global as under our `jit` trainer.

  Args:
    rng: PRNG key.
    mask: `[B, H, W]` bool.
    p: probability of mixing this batch.
    axis_name: mapped axis inside `pmap`/`shard_map`.

  Returns:
    mask `[B, H, W]` bool and applied (scalar bool).
  """
  rng = collectives.same_rng(rng, axis_name)
  applied = jax.random.uniform(rng, ()) < p
  return jnp.asarray(mask, bool) & applied, applied


def classmix_classes(rng: jax.Array, labels: jax.typing.ArrayLike, *,
                     ignore_index: int = ops.IGNORE_INDEX, exclude_background: bool = False,
                     num_values: int = 256) -> Tuple[jax.Array, jax.Array]:
  """Alonso et al.'s ClassMix class choice: (n - n mod 2) / 2 + 1 of the n classes present.

  Per image (`augment_samples` in `trainSSL.py`): the candidates are the label values present;
  `ignore_index` is removed if anything else is present; with `exclude_background` (their VOC
  setting) class 0 is removed if anything else remains; then n // 2 + 1 of the n candidates
  are chosen uniformly without replacement.

  Args:
    rng: PRNG key.
    labels: `[B, H, W]` int (pseudo-)labels in [0, num_values).
    ignore_index: label value that is not a class.
    exclude_background: drop class 0 from the candidates.
    num_values: static bound on label values (256 covers uint8 label maps).

  Returns:
    chosen `[B, num_values]` bool and the candidate count n `[B]` int32.
  """
  labels = jnp.asarray(labels, jnp.int32)
  batch = labels.shape[0]
  flat = labels.reshape(batch, -1)
  present = jax.vmap(lambda q: jnp.bincount(q, length=num_values) > 0)(flat)
  values = jnp.arange(num_values)

  def drop(candidates, value):
    others = jnp.sum(candidates & (values != value), axis=-1, keepdims=True) > 0
    return candidates & ~((values == value) & others)

  candidates = drop(present, ignore_index) if 0 <= ignore_index < num_values else present
  if exclude_background:
    candidates = drop(candidates, 0)
  count = jnp.sum(candidates, axis=-1).astype(jnp.int32)
  k = count // 2 + 1
  scores = jnp.where(candidates, jax.random.uniform(rng, (batch, num_values)), -1.0)
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
  chosen = candidates & (rank < k[:, None])
  return chosen, count


def classmix_mask(rng: jax.Array, labels: jax.typing.ArrayLike, *,
                  ignore_index: int = ops.IGNORE_INDEX, exclude_background: bool = False,
                  num_values: int = 256) -> jax.Array:
  """ClassMix mask of each image: its pixels whose label is one of the chosen classes.

  See `classmix_classes` for the choice. The mask marks pixels of *this* image to paste onto
  another one; for Alonso et al.'s pairing (image i receives from (i + 1) mod B) use
  `mix(roll_batch(mask), a, roll_batch(a))`.

  Args:
    rng: PRNG key.
    labels: `[B, H, W]` int.
    ignore_index: label value that is not a class.
    exclude_background: drop class 0 from the candidates (Alonso's VOC setting).
    num_values: static bound on label values.

  Returns:
    `[B, H, W]` bool.
  """
  labels = jnp.asarray(labels, jnp.int32)
  chosen, _ = classmix_classes(rng, labels, ignore_index=ignore_index,
                               exclude_background=exclude_background, num_values=num_values)
  safe = jnp.clip(labels, 0, num_values - 1)
  return jnp.take_along_axis(chosen, safe.reshape(labels.shape[0], -1), axis=1).reshape(
      labels.shape)
