"""Alonso et al.'s weak and strong augmentations (Table 1) on the device, with ClassMix.

One view is, in the official order (`trainSSL.py: augmentationTransform`):

  ClassMix (image i receives the chosen classes of image i+1)
  -> random rescale by s ~ U[0.75, 1.75] (pad centred when s < 1, random crop when s > 1)
  -> horizontal flip -> colour jitter -> Gaussian blur.

Labels, pseudo-labels, confidences, hidden labels and padding travel with the pixels: linear
arrays (images, confidences) are resampled bilinearly (`align_corners=True`, fill 0), label
arrays with PyTorch's floor-nearest rule (fill `ignore_index`), padding with nearest (fill
True). Everything is static-shape: a rescale is a per-image resampling at the input size.

Presets (`PRESETS`), Table 1 and the official code (`Shathe/SemiSeg-Contrastive` HEAD):

| | flip | rescale | jitter p | jitter s (b, c, s/2, h/3) | blur p | ClassMix p |
|---|---|---|---|---|---|---|
| official weak (labeled) | 0.5 | 0.5 | 0.2 | 0.125 | 0 | 0.2 |
| official strong | 0.5 | 0.8 | 0.8 | 0.25 | 0.2 | 0.75 |
| paper weak (Table 1) | 0.5 | 0.5 | 0.2 | 0.15 | 0 | 0.2 |
| paper strong (Table 1) | 0.5 | 0.8 | 0.8 | 0.3 | 0.2 | 0.8 |

The official code draws every decision (and the scale) once per batch; `per_image=True` draws
them per image. Jitter parameters are per image in both (kornia). Blur sigma ~ U[0.1, 1.5]
per image (the official kornia call passes (0.1, 1.5) as a fixed anisotropic (sigma_x,
sigma_y) pair, which we take for a slip: BUILD_NOTES, Alonso).
"""

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from semijax import ops
from semijax.augment import mix, photometric


@dataclasses.dataclass(frozen=True)
class ViewAugment:
  """Probabilities and strengths of one view's augmentation (see `PRESETS`).

  Attributes:
    flip_prob: horizontal flip.
    scale_prob: random rescale.
    scale_range: rescale factor range.
    jitter_prob: colour jitter.
    jitter_strength: s: brightness and contrast s, saturation s / 2, hue s / 3 (kornia's
      `ColorJitter(s, s, s/2, s/3)` in the official code).
    blur_prob: Gaussian blur.
    blur_sigma: blur sigma range (pixels).
    classmix_prob: ClassMix.
  """
  flip_prob: float = 0.5
  scale_prob: float = 0.8
  scale_range: Tuple[float, float] = (0.75, 1.75)
  jitter_prob: float = 0.8
  jitter_strength: float = 0.25
  blur_prob: float = 0.2
  blur_sigma: Tuple[float, float] = (0.1, 1.5)
  classmix_prob: float = 0.75


PRESETS = {
    "official_weak": ViewAugment(flip_prob=0.5, scale_prob=0.5, jitter_prob=0.2,
                                 jitter_strength=0.125, blur_prob=0.0, classmix_prob=0.2),
    "official_strong": ViewAugment(flip_prob=0.5, scale_prob=0.8, jitter_prob=0.8,
                                   jitter_strength=0.25, blur_prob=0.2, classmix_prob=0.75),
    "paper_weak": ViewAugment(flip_prob=0.5, scale_prob=0.5, jitter_prob=0.2,
                              jitter_strength=0.15, blur_prob=0.0, classmix_prob=0.2),
    "paper_strong": ViewAugment(flip_prob=0.5, scale_prob=0.8, jitter_prob=0.8,
                                jitter_strength=0.3, blur_prob=0.2, classmix_prob=0.8),
}


class Geometry(NamedTuple):
  """Per-image geometric parameters of a view (a pytree).

  out(y, x) = scaled(y - top, x' - left), x' = W - 1 - x if flipped else x, where `scaled` is
  the input resized to `floor(H s) x floor(W s)` (PyTorch `interpolate(scale_factor=s)`).
  """
  scale: jax.Array  # [B] float32, 1 = unchanged
  top: jax.Array  # [B] int32, row of the scaled image's origin in the output (< 0: cropped)
  left: jax.Array  # [B] int32
  flip: jax.Array  # [B] bool


def geometry_params(rng: jax.Array, batch: int, height: int, width: int, *,
                    scale_prob: float, scale_range: Tuple[float, float] = (0.75, 1.75),
                    flip_prob: float = 0.5, per_image: bool = False) -> Geometry:
  """Draws a view's rescale (probability, factor, crop offset) and flip.

  Rescaled down (s < 1) the image is padded centred (the official pad puts the odd extra row
  on top and the odd extra column on the right); rescaled up, a random crop of the input size
  is taken. With `per_image=False` (official) one draw serves the whole batch.
  """
  n = batch if per_image else 1
  k_apply, k_scale, k_crop, k_flip = jax.random.split(rng, 4)
  apply = jax.random.uniform(k_apply, (n,)) < scale_prob
  scale = jax.random.uniform(k_scale, (n,), minval=scale_range[0], maxval=scale_range[1])
  scale = jnp.where(apply, scale, 1.0)
  sh = jnp.floor(height * scale).astype(jnp.int32)
  sw = jnp.floor(width * scale).astype(jnp.int32)
  u = jax.random.uniform(k_crop, (n, 2))
  crop_y = jnp.floor(u[:, 0] * (jnp.maximum(sh - height, 0) + 1)).astype(jnp.int32)
  crop_x = jnp.floor(u[:, 1] * (jnp.maximum(sw - width, 0) + 1)).astype(jnp.int32)
  top = jnp.where(sh > height, -crop_y, (height - sh + 1) // 2)
  left = jnp.where(sw > width, -crop_x, (width - sw) // 2)
  flip = jax.random.uniform(k_flip, (n,)) < flip_prob
  geo = Geometry(scale=scale, top=top, left=left, flip=flip)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,)), geo)


def _axis_coords(geo_scale, origin, size, flip=None):
  """Source coordinates along one axis: `(u, valid, n_scaled)`, each `[B, size]`."""
  n_scaled = jnp.floor(size * geo_scale).astype(jnp.int32)[:, None]
  out = jnp.arange(size, dtype=jnp.int32)[None, :]
  if flip is not None:
    out = jnp.where(flip[:, None], size - 1 - out, out)
  u = out - origin[:, None]
  return u, (u >= 0) & (u < n_scaled), n_scaled


def warp_linear(x: jax.typing.ArrayLike, geo: Geometry, *, fill: float = 0.0) -> jax.Array:
  """Bilinear resampling of `[B, H, W, ...]` under `geo` (align_corners=True, as the official
  `interpolate(..., mode='bilinear', align_corners=True)`); pixels outside get `fill`."""
  x = jnp.asarray(x)
  h, w = x.shape[1], x.shape[2]

  def coords(scale, origin, size, flip=None):
    u, ok, n = _axis_coords(scale, origin, size, flip)
    src = u.astype(jnp.float32) * ((size - 1) / jnp.maximum(n - 1, 1)).astype(jnp.float32)
    lo = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, size - 1)
    hi = jnp.minimum(lo + 1, size - 1)
    return lo, hi, jnp.clip(src - lo, 0.0, 1.0), ok

  r0, r1, fr, rok = coords(geo.scale, geo.top, h)
  c0, c1, fc, cok = coords(geo.scale, geo.left, w, geo.flip)

  def one(img, r0, r1, fr, c0, c1, fc):
    img = img.astype(jnp.float32)
    extra = (1,) * (img.ndim - 2)
    rows = img[r0] * (1 - fr).reshape((-1, 1) + extra) + img[r1] * fr.reshape((-1, 1) + extra)
    return (rows[:, c0] * (1 - fc).reshape((1, -1) + extra)
            + rows[:, c1] * fc.reshape((1, -1) + extra))

  out = jax.vmap(one)(x, r0, r1, fr, c0, c1, fc)
  ok = rok[:, :, None] & cok[:, None, :]
  ok = ok.reshape(ok.shape + (1,) * (x.ndim - 3))
  return jnp.where(ok, out, fill).astype(x.dtype)


def warp_nearest(x: jax.typing.ArrayLike, geo: Geometry, *, fill: Any) -> jax.Array:
  """Floor-nearest resampling of `[B, H, W, ...]` (labels, masks; PyTorch's legacy
  `mode='nearest'`: source = floor(u * in / out)); pixels outside get `fill`."""
  x = jnp.asarray(x)
  h, w = x.shape[1], x.shape[2]

  def coords(scale, origin, size, flip=None):
    u, ok, n = _axis_coords(scale, origin, size, flip)
    src = jnp.floor(u.astype(jnp.float32) * (size / n.astype(jnp.float32))).astype(jnp.int32)
    return jnp.clip(src, 0, size - 1), ok

  r, rok = coords(geo.scale, geo.top, h)
  c, cok = coords(geo.scale, geo.left, w, geo.flip)
  out = jax.vmap(lambda img, r, c: img[r][:, c])(x, r, c)
  ok = rok[:, :, None] & cok[:, None, :]
  ok = ok.reshape(ok.shape + (1,) * (x.ndim - 3))
  return jnp.where(ok, out, jnp.asarray(fill, x.dtype))


def _decisions(rng, batch, p, per_image):
  u = jax.random.uniform(rng, (batch if per_image else 1,))
  return jnp.broadcast_to(u < p, (batch,))


def color_jitter(rng: jax.Array, images: jax.typing.ArrayLike, *, prob: float, strength: float,
                 per_image: bool = False, pad: Optional[jax.typing.ArrayLike] = None
                 ) -> jax.Array:
  """ColorJitter(s, s, s/2, s/3) with probability `prob` (per batch or per image); the factors
  are drawn per image (torchvision semantics, see `photometric.apply_color_jitter`)."""
  images = jnp.asarray(images, jnp.float32)
  b = images.shape[0]
  k_apply, k_params = jax.random.split(rng)
  order, factors, _ = photometric.color_jitter_params(
      k_params, b, brightness=strength, contrast=strength, saturation=strength / 2,
      hue=min(strength / 3, 0.5))
  apply = _decisions(k_apply, b, prob, per_image)
  valid = None if pad is None else ~jnp.asarray(pad, bool)   # photometric's masks: True = keep
  return photometric.apply_color_jitter(images, order, factors, apply, valid=valid)


def gaussian_blur(rng: jax.Array, images: jax.typing.ArrayLike, *, prob: float,
                  sigma_range: Tuple[float, float] = (0.1, 1.5), per_image: bool = False,
                  pad: Optional[jax.typing.ArrayLike] = None) -> jax.Array:
  """Isotropic Gaussian blur, sigma ~ U[sigma_range] per image, with probability `prob`."""
  images = jnp.asarray(images, jnp.float32)
  b = images.shape[0]
  if prob <= 0.0:
    return images
  k_apply, k_sigma = jax.random.split(rng)
  sigma = jax.random.uniform(k_sigma, (b,), minval=sigma_range[0], maxval=sigma_range[1])
  valid = None if pad is None else ~jnp.asarray(pad, bool)
  run = lambda x: photometric.blur(x, sigma, sigma_max=sigma_range[1], method="gaussian",  # noqa: E731
                                   valid=valid)
  apply = _decisions(k_apply, b, prob, per_image)
  if per_image:
    return jnp.where(apply[:, None, None, None], run(images), images)
  return lax.cond(apply[0], run, lambda x: x, images)


def classmix(rng: jax.Array, labels_for_mask: jax.typing.ArrayLike, *, prob: float,
             per_image: bool = False, exclude_background: bool = False,
             ignore_index: int = ops.IGNORE_INDEX) -> jax.Array:
  """The `[B, H, W]` mix mask of a view: True where image i takes image i+1's pixels.

  Image i+1's classes (n // 2 + 1 of its n, `mix.classmix_classes`) are pasted onto image i
  with probability `prob` (per batch, official, or per image).
  """
  k_mask, k_apply = jax.random.split(rng)
  labels_for_mask = jnp.asarray(labels_for_mask, jnp.int32)
  mask = mix.classmix_mask(k_mask, labels_for_mask, ignore_index=ignore_index,
                           exclude_background=exclude_background)
  apply = _decisions(k_apply, labels_for_mask.shape[0], prob, per_image)
  return mix.roll_batch(mask & apply[:, None, None])


def augment_view(rng: jax.Array, images: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
                 settings: ViewAugment, pad: Optional[jax.typing.ArrayLike] = None,
                 linear: Optional[Dict[str, jax.Array]] = None,
                 nearest: Optional[Dict[str, jax.Array]] = None,
                 classmix_enabled: Any = True, flip: bool = True, per_image: bool = False,
                 exclude_background: bool = False,
                 ignore_index: int = ops.IGNORE_INDEX) -> Dict[str, Any]:
  """One augmented view (see the module docstring), everything carried along.

  Args:
    rng: PRNG key.
    images: `[B, H, W, 3]` float in [0, 1].
    labels: `[B, H, W]` int labels or pseudo-labels (ClassMix draws its classes from them).
    settings: a `ViewAugment` (e.g. `PRESETS['official_strong']`).
    pad: optional `[B, H, W]` bool padding of the input.
    linear: arrays `[B, H, W, ...]` resampled like the image (e.g. confidences), fill 0.
    nearest: arrays `[B, H, W, ...]` resampled like the labels (e.g. hidden labels), fill
      `ignore_index`.
    classmix_enabled: bool or traced scalar bool (the official schedule turns ClassMix on
      after the ramp-up).
    flip: allow flips at all (off for data where a mirror changes the class, e.g. digits).
    per_image: draw every decision per image instead of per batch.
    exclude_background: ClassMix never pastes class 0 (official VOC).
    ignore_index: label fill value.

  Returns:
    `{'image', 'label', 'pad', 'linear', 'nearest', 'mix_mask', 'geometry', 'classmix_applied'}`.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  b, h, w = labels.shape
  pad = jnp.zeros((b, h, w), bool) if pad is None else jnp.asarray(pad, bool)
  linear = dict(linear or {})
  nearest = dict(nearest or {})
  k_mix, k_geo, k_jit, k_blur = jax.random.split(rng, 4)

  mask = classmix(k_mix, labels, prob=settings.classmix_prob, per_image=per_image,
                  exclude_background=exclude_background, ignore_index=ignore_index)
  mask = mask & jnp.asarray(classmix_enabled, bool)
  images, labels, pad, linear, nearest = mix.mix(
      mask, (images, labels, pad, linear, nearest),
      mix.roll_batch((images, labels, pad, linear, nearest)))

  geo = geometry_params(k_geo, b, h, w, scale_prob=settings.scale_prob,
                        scale_range=settings.scale_range,
                        flip_prob=settings.flip_prob if flip else 0.0, per_image=per_image)
  images = warp_linear(images, geo)
  labels = warp_nearest(labels, geo, fill=ignore_index)
  pad = warp_nearest(pad, geo, fill=True)
  linear = {k: warp_linear(v, geo) for k, v in linear.items()}
  nearest = {k: warp_nearest(v, geo, fill=ignore_index) for k, v in nearest.items()}
  labels = jnp.where(pad, ignore_index, labels)

  if settings.jitter_prob > 0:
    images = color_jitter(k_jit, images, prob=settings.jitter_prob,
                          strength=settings.jitter_strength, per_image=per_image, pad=pad)
  images = gaussian_blur(k_blur, images, prob=settings.blur_prob,
                         sigma_range=settings.blur_sigma, per_image=per_image, pad=pad)
  return {"image": images, "label": labels, "pad": pad, "linear": linear, "nearest": nearest,
          "mix_mask": mask, "geometry": geo,
          "classmix_applied": jnp.any(mask).astype(jnp.float32)}
