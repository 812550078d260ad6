"""Per-image photometric augmentation on the device, inside the jitted train step.

Images are float RGB in [0, 1], NHWC `[B, H, W, 3]`. Every random function takes a PRNG
key and draws its parameters independently for each image of the batch, with static
shapes only, so the same `(seed, step)` key gives the same views on any backend and a
second strong view costs no host work.

Only the ops an image gets are computed: the random functions run over the images one at a
time (`lax.map`) and pick each image's op with `lax.switch` / `lax.cond` (a `vmap` would turn
those into selects that compute every branch). A DSSN strong view thus costs about the 1-3
ops it applies instead of all 11 per slot (issue 17: the earlier batched version computed
every op for every image and kept one with `jnp.where`; same parameters, same arithmetic).

Semantics follow what the reference codebases run, which is torchvision's `ColorJitter`,
`RandomGrayscale` and PIL's `ImageFilter`/`ImageOps`/`ImageEnhance` on uint8 PIL images:

* UniMatch (`dataset/semi.py`) and DSSN (`voc/dataset/semi.py`): ColorJitter(0.5, 0.5, 0.5,
  0.25) with p = 0.8, RandomGrayscale p = 0.2, PIL `GaussianBlur(radius=sigma)` with
  sigma ~ U[0.1, 2] and p = 0.5 (preset `'unimatch'`).
* DSSN adds `strong_img_aug(num_aug=3, random_num_sampling=True)`: k ~ U{1, 2, 3} ops drawn
  *with replacement* from an 11-op list that is entirely photometric (preset `'dssn'`, see
  `DSSN_OPS`). No op in it moves pixels, so pseudo-labels stay aligned.
* CAC (`dataloaders/voc.py`): cv2 `GaussianBlur((5, 5), 0)` with p = 0.5 (the binomial
  kernel [1, 4, 6, 4, 1] / 16, reflect-101 border), then ColorJitter(0.4, 0.4, 0.4, 0.1)
  with p = 0.8, then grayscale p = 0.2 (preset `'cac'`).

Deviations, all deliberate: arithmetic is in float32 without the reference's rounding to
uint8 after every op (ops that are defined on 8-bit levels, `equalize` and `posterize`,
quantise their input first); the grayscale weights are PIL's 0.299/0.587/0.114 (torchvision's
tensor path uses 0.2989); the hue shift uses torchvision's float HSV formulas where PIL
images go through 8-bit HSV (hue on 256 levels); the blur is PIL's own three-pass extended
box filter (`blur`), without its rounding after each pass.

Every function takes an optional `valid` mask `[B, H, W]` bool, True on real pixels: the other
(padding) pixels are returned unchanged and left out of image statistics (contrast mean,
autocontrast range, equalize histogram); the references compute those over the zero-padded
crop and alter the padding. Passing `valid=None` on an image whose padding is 0 reproduces the
reference arithmetic. The previous `pad=` (True on padding) still works for one release, with
a `DeprecationWarning`, as `valid=~pad`.
"""

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from semijax import _deprecation

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
PRESETS = ("unimatch", "dssn", "cac", "none")
# DSSN's `get_augment_list(flag_using_wide=False)`, in its order.
DSSN_OPS = ("identity", "autocontrast", "equalize", "blur", "contrast", "brightness", "color",
            "sharpness", "posterize", "solarize", "hue")

_OptArray = Optional[jax.typing.ArrayLike]
# `pad=` (True on padding) of the previous release, as `valid=~pad`.
_PAD_TO_VALID = _deprecation.renamed_args({"pad": _deprecation.pad_to_valid()})


# ----------------------------------------------------------------------------------------
# Helpers.


def _per_image(value: jax.typing.ArrayLike, batch: int, dtype=jnp.float32) -> jax.Array:
  """A scalar or `[B]` parameter as `[B, 1, 1, 1]`."""
  value = jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))
  return value[:, None, None, None]


def _keep_invalid(out: jax.Array, images: jax.Array, valid: _OptArray) -> jax.Array:
  """`out` on valid pixels, `images` (unchanged) on the others."""
  if valid is None:
    return out
  return jnp.where(jnp.asarray(valid, bool)[..., None], out, images)


def _valid(images: jax.Array, valid: _OptArray) -> jax.Array:
  """`[B, H, W]` bool, the pixels that count in image statistics."""
  if valid is None:
    return jnp.ones(images.shape[:3], bool)
  return jnp.asarray(valid, bool)


def _blend(a: jax.Array, b: jax.Array, factor: jax.Array) -> jax.Array:
  """`clip(factor * a + (1 - factor) * b, 0, 1)` (torchvision `_blend`, PIL `Image.blend`)."""
  return jnp.clip(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def _as_float(images: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(images, jnp.float32)


def _uniform_int(u: jax.Array, low, high) -> jax.Array:
  """Integers uniform on {low, ..., high - 1} from uniforms u in [0, 1) (bounds may be arrays).

  Deriving every random parameter from one `uniform` draw keeps a single PRNG kernel per
  function, which is what dominates compile time on CPU.
  """
  span = high - low
  return low + jnp.minimum(jnp.floor(u * span).astype(jnp.int32), span - 1)


def _quantize(images: jax.Array) -> jax.Array:
  """Float [0, 1] to the 8-bit levels `round(255 x)` as int32."""
  return jnp.clip(jnp.round(images * 255.0), 0, 255).astype(jnp.int32)


def _map_images(fn, images: jax.Array, valid: _OptArray, *args) -> jax.Array:
  """`fn(image [1, H, W, 3], valid [1, H, W] or None, *args_b)` for each image b in turn.

  Every leaf of `args` has a leading batch axis (`[B, ...]`); `fn` receives row b with a
  batch axis of 1 and returns `[1, H, W, 3]`. Sequential (`lax.map`), so that `lax.switch` and
  `lax.cond` inside `fn` compute only the branch an image takes.
  """
  has_valid = valid is not None
  valids = jnp.asarray(valid, bool) if has_valid else jnp.zeros((images.shape[0], 0), bool)

  def one(row):
    x, v, rest = row
    out = fn(x[None], v[None] if has_valid else None, *jax.tree.map(lambda a: a[None], rest))
    return out[0]

  return lax.map(one, (images, valids, jax.tree.map(jnp.asarray, tuple(args))))


def _when(flag: jax.Array, fn, x: jax.Array) -> jax.Array:
  """`fn(x)` if the scalar `flag` (a `[1]` array) is set, else `x`; only one is computed."""
  return lax.cond(jnp.reshape(flag, ()), fn, lambda v: v, x)


# ----------------------------------------------------------------------------------------
# Deterministic ops with per-image parameters (scalars or `[B]`).


def rgb_to_grayscale(images: jax.typing.ArrayLike) -> jax.Array:
  """Luma `0.299 R + 0.587 G + 0.114 B` (PIL's `convert("L")` weights).

  Args:
    images: `[..., 3]` float.

  Returns:
    `[...]` float32.
  """
  images = _as_float(images)
  r, g, b = GRAY_WEIGHTS
  return r * images[..., 0] + g * images[..., 1] + b * images[..., 2]


@_PAD_TO_VALID
def grayscale(images: jax.typing.ArrayLike, *, valid: _OptArray = None) -> jax.Array:
  """RGB to luma replicated on 3 channels (`RandomGrayscale` with 3 output channels)."""
  images = _as_float(images)
  out = jnp.broadcast_to(rgb_to_grayscale(images)[..., None], images.shape)
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def adjust_brightness(images: jax.typing.ArrayLike, factor: jax.typing.ArrayLike, *,
                      valid: _OptArray = None) -> jax.Array:
  """`clip(f x, 0, 1)`: blend with black (torchvision `adjust_brightness`).

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    factor: scalar or `[B]`.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  out = _blend(images, jnp.zeros_like(images), _per_image(factor, images.shape[0]))
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def adjust_contrast(images: jax.typing.ArrayLike, factor: jax.typing.ArrayLike, *,
                    valid: _OptArray = None) -> jax.Array:
  """`clip(f x + (1 - f) m, 0, 1)` with m the mean luma of the image (torchvision).

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    factor: scalar or `[B]`.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are left out of m and
      returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  weights = _valid(images, valid).astype(jnp.float32)
  gray = rgb_to_grayscale(images)
  mean = jnp.sum(gray * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
  out = _blend(images, mean[:, None, None, None], _per_image(factor, images.shape[0]))
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def adjust_saturation(images: jax.typing.ArrayLike, factor: jax.typing.ArrayLike, *,
                      valid: _OptArray = None) -> jax.Array:
  """`clip(f x + (1 - f) gray(x), 0, 1)` (torchvision `adjust_saturation`, PIL `Color`)."""
  images = _as_float(images)
  gray = rgb_to_grayscale(images)[..., None]
  out = _blend(images, gray, _per_image(factor, images.shape[0]))
  return _keep_invalid(out, images, valid)


def rgb_to_hsv(images: jax.typing.ArrayLike) -> jax.Array:
  """RGB to HSV, all channels in [0, 1], with torchvision's tensor formulas (`_rgb2hsv`)."""
  images = _as_float(images)
  r, g, b = images[..., 0], images[..., 1], images[..., 2]
  maxc = jnp.max(images, axis=-1)
  minc = jnp.min(images, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  divisor = jnp.where(eqc, 1.0, cr)
  rc = (maxc - r) / divisor
  gc = (maxc - g) / divisor
  bc = (maxc - b) / divisor
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.typing.ArrayLike) -> jax.Array:
  """Inverse of `rgb_to_hsv` (torchvision `_hsv2rgb`)."""
  hsv = _as_float(hsv)
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)

  def pick(*values):
    return jnp.select([i == k for k in range(5)], list(values[:5]), values[5])

  return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)],
                   axis=-1)


@_PAD_TO_VALID
def adjust_hue(images: jax.typing.ArrayLike, factor: jax.typing.ArrayLike, *,
               valid: _OptArray = None) -> jax.Array:
  """Rotates the hue by `factor` turns, `h <- (h + f) mod 1` (torchvision `adjust_hue`).

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    factor: scalar or `[B]` in [-0.5, 0.5].
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  hsv = rgb_to_hsv(images)
  h = jnp.mod(hsv[..., 0] + _per_image(factor, images.shape[0])[..., 0], 1.0)
  out = hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def adjust_sharpness(images: jax.typing.ArrayLike, factor: jax.typing.ArrayLike, *,
                     valid: _OptArray = None) -> jax.Array:
  """PIL `ImageEnhance.Sharpness`: blend with the `SMOOTH`-filtered image.

  The degenerate image is the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 on interior
  pixels and the image itself on the one-pixel border (PIL and torchvision leave it).

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    factor: scalar or `[B]`; < 1 blurs, > 1 sharpens.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  _, height, width, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  box = sum(padded[:, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
  smooth = (box + 4.0 * images) / 13.0
  interior = np.zeros((height, width), bool)
  interior[1:-1, 1:-1] = True
  degenerate = jnp.where(interior[None, :, :, None], smooth, images)
  out = _blend(images, degenerate, _per_image(factor, images.shape[0]))
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def autocontrast(images: jax.typing.ArrayLike, *, valid: _OptArray = None) -> jax.Array:
  """PIL `ImageOps.autocontrast` (cutoff 0): each channel's [min, max] stretched to [0, 1].

  A constant channel is left unchanged. Padded pixels do not count in min/max.

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    valid: optional `[B, H, W]` bool, True on real pixels; the others are left out of
      min/max and returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  counts = _valid(images, valid)[..., None]
  lo = jnp.min(jnp.where(counts, images, jnp.inf), axis=(1, 2), keepdims=True)
  hi = jnp.max(jnp.where(counts, images, -jnp.inf), axis=(1, 2), keepdims=True)
  stretch = hi > lo
  scale = jnp.where(stretch, 1.0 / jnp.where(stretch, hi - lo, 1.0), 1.0)
  out = jnp.clip((images - jnp.where(stretch, lo, 0.0)) * scale, 0.0, 1.0)
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def equalize(images: jax.typing.ArrayLike, *, valid: _OptArray = None) -> jax.Array:
  """PIL `ImageOps.equalize`: per-channel histogram equalisation on the 8-bit levels.

  With h the 256-bin histogram of a channel and `step = (sum(h) - h[last non-empty]) // 255`,
  level v maps to `min((step // 2 + sum_{u < v} h[u]) // step, 255)`; a channel with at most
  one level, or `step == 0`, is unchanged. The input is quantised to `round(255 x)` first.

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    valid: optional `[B, H, W]` bool, True on real pixels; the others are left out of the
      histogram and returned unchanged.

  Returns:
    `[B, H, W, 3]` float32 on the 8-bit grid (`level / 255`).
  """
  images = _as_float(images)
  batch, height, width, channels = images.shape
  levels = _quantize(images)
  weights = jnp.broadcast_to(_valid(images, valid)[..., None], levels.shape).astype(jnp.int32)
  flat_levels = jnp.moveaxis(levels, -1, 1).reshape(batch * channels, height * width)
  flat_weights = jnp.moveaxis(weights, -1, 1).reshape(batch * channels, height * width)
  hist = jax.vmap(lambda q, w: jnp.bincount(q, w, length=256))(flat_levels, flat_weights)
  hist = hist.astype(jnp.int32)
  nonempty = hist > 0
  last = 255 - jnp.argmax(nonempty[:, ::-1], axis=-1)
  last_count = jnp.take_along_axis(hist, last[:, None], axis=-1)[:, 0]
  step = (jnp.sum(hist, axis=-1) - last_count) // 255
  safe_step = jnp.maximum(step, 1)
  before = jnp.cumsum(hist, axis=-1) - hist
  lut = jnp.minimum((safe_step[:, None] // 2 + before) // safe_step[:, None], 255)
  identity = (jnp.sum(nonempty, axis=-1) <= 1) | (step == 0)
  lut = jnp.where(identity[:, None], jnp.arange(256, dtype=jnp.int32)[None], lut)
  mapped = jnp.take_along_axis(lut, flat_levels, axis=-1)
  mapped = jnp.moveaxis(mapped.reshape(batch, channels, height, width), 1, -1)
  out = mapped.astype(jnp.float32) / 255.0
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def posterize(images: jax.typing.ArrayLike, bits: jax.typing.ArrayLike, *,
              valid: _OptArray = None) -> jax.Array:
  """PIL `ImageOps.posterize`: keeps the top `bits` bits of each 8-bit level.

  Args:
    images: `[B, H, W, 3]` float in [0, 1] (quantised to `round(255 x)` first).
    bits: scalar or `[B]` int in [0, 8].
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  bits = _per_image(bits, images.shape[0], jnp.int32)
  keep = 256 - jnp.left_shift(1, 8 - bits)
  out = jnp.bitwise_and(_quantize(images), keep).astype(jnp.float32) / 255.0
  return _keep_invalid(out, images, valid)


@_PAD_TO_VALID
def solarize(images: jax.typing.ArrayLike, threshold: jax.typing.ArrayLike, *,
             valid: _OptArray = None) -> jax.Array:
  """Inverts pixels at or above `threshold`: `x >= t ? 1 - x : x` (PIL `ImageOps.solarize`).

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    threshold: scalar or `[B]` on the [0, 1] scale (PIL's integer threshold / 255).
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  out = jnp.where(images >= _per_image(threshold, images.shape[0]), 1.0 - images, images)
  return _keep_invalid(out, images, valid)


def gaussian_kernels(sigma: jax.typing.ArrayLike, radius: int) -> jax.Array:
  """Normalised 1-D Gaussian taps `exp(-k^2 / 2 sigma^2)`, k = -radius..radius.

  Args:
    sigma: `[B]` positive standard deviations in pixels.
    radius: static half width.

  Returns:
    `[B, 2 * radius + 1]` float32, each row summing to 1.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
  return taps / jnp.sum(taps, axis=-1, keepdims=True)


@_PAD_TO_VALID
def separable_filter(images: jax.typing.ArrayLike, kernels: jax.typing.ArrayLike, *,
                     border: str = "edge", valid: _OptArray = None) -> jax.Array:
  """Filters each image with its own symmetric 1-D kernel along H, then along W.

  Written as a loop over taps of shifted slices (exact float32, no convolution precision
  flags, one small loop body to compile).

  Args:
    images: `[B, H, W, 3]` float.
    kernels: `[B, K]` taps, K odd (or `[K]`, shared).
    border: `'edge'` replicates the last pixel (PIL's box blur), `'reflect'` mirrors without
      repeating it (cv2's default `BORDER_REFLECT_101`).
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  if border not in ("edge", "reflect"):
    raise ValueError(f"border={border!r}; expected 'edge' or 'reflect'")
  images = _as_float(images)
  batch, height, width, _ = images.shape
  kernels = jnp.broadcast_to(jnp.asarray(kernels, jnp.float32),
                             (batch, jnp.shape(kernels)[-1]))
  size = kernels.shape[-1]
  radius = size // 2
  if size % 2 != 1:
    raise ValueError(f"kernel size {size} must be odd")

  def filter_axis(x, axis, length):
    widths = [(0, 0)] * 4
    widths[axis] = (radius, radius)
    padded = jnp.pad(x, widths, mode=border)

    def tap(k, acc):
      shifted = lax.dynamic_slice_in_dim(padded, k, length, axis=axis)
      return acc + lax.dynamic_index_in_dim(kernels, k, axis=1)[:, :, None, None] * shifted

    return lax.fori_loop(0, size, tap, jnp.zeros_like(x))

  x = filter_axis(filter_axis(images, 1, height), 2, width)
  return _keep_invalid(x, images, valid)


def blur_radius(sigma_max: float, truncate: float = 4.0) -> int:
  """Half width of the exact-Gaussian kernel: `ceil(truncate * sigma_max)` (8 for sigma 2)."""
  return max(1, int(math.ceil(truncate * sigma_max)))


def pil_box_radius(sigma: jax.typing.ArrayLike, passes: int = 3) -> jax.Array:
  """PIL's `_gaussian_blur_radius`: the fractional box radius whose `passes`-fold box blur
  has variance sigma^2 (Gwosdek et al., SSVM 2011).

  With s2 = sigma^2 / passes, L = sqrt(12 s2 + 1), n = floor((L - 1) / 2) and
  a = (2n + 1)(n(n + 1) - 3 s2) / (6 (s2 - (n + 1)^2)), the radius is n + a.
  """
  xp = np if isinstance(sigma, (float, np.floating, np.ndarray)) else jnp
  sigma = xp.asarray(sigma, xp.float32)
  s2 = sigma * sigma / passes
  length = xp.sqrt(12.0 * s2 + 1.0)
  n = xp.floor((length - 1.0) / 2.0)
  a = (2.0 * n + 1.0) * (n * (n + 1.0) - 3.0 * s2) / (6.0 * (s2 - (n + 1.0) ** 2))
  return n + a


def pil_box_kernels(sigma: jax.typing.ArrayLike, sigma_max: float,
                    passes: int = 3) -> jax.Array:
  """One pass of PIL's extended box blur as `[B, K]` taps (apply it `passes` times).

  For radius R = n + a: weight 1 / (2R + 1) on |k| <= n and the remainder split on
  |k| = n + 1 (PIL's `ww`/`fw`, here in float instead of 24-bit fixed point). K is fixed by
  `sigma_max`: `2 (n_max + 1) + 1` (5 taps for sigma_max = 2).
  """
  radius = pil_box_radius(sigma, passes)
  n = jnp.floor(radius)
  n_max = int(np.floor(pil_box_radius(float(sigma_max), passes)))
  offsets = jnp.abs(jnp.arange(-(n_max + 1), n_max + 2, dtype=jnp.float32))[None, :]
  inner = 1.0 / (2.0 * radius + 1.0)
  far = (1.0 - (2.0 * n + 1.0) * inner) / 2.0
  return jnp.where(offsets[:, :] <= n[:, None], inner[:, None],
                   jnp.where(offsets == n[:, None] + 1.0, far[:, None], 0.0))


BLUR_METHODS = ("pil", "gaussian")


@_PAD_TO_VALID
def blur(images: jax.typing.ArrayLike, sigma: jax.typing.ArrayLike, *, sigma_max: float,
         method: str = "pil", truncate: float = 4.0, border: str = "edge",
         valid: _OptArray = None) -> jax.Array:
  """Blurs each image with its own sigma (deterministic part of `gaussian_blur`).

  `method='pil'` is PIL's `GaussianBlur(radius=sigma)` as the references run it: three
  passes of an extended (fractional) box filter along each axis, each pass replicating the
  edge pixels; it has variance sigma^2 per axis and a support of 3 (l + 1) pixels each side
  (6 at sigma = 2). We skip PIL's rounding to uint8 after each of the six passes, so on uint8
  input we differ from PIL by at most 3/255. `method='gaussian'` is the exact separable
  Gaussian with half width `ceil(truncate * sigma_max)`.

  Args:
    images: `[B, H, W, 3]` float.
    sigma: `[B]` standard deviations in pixels, at most `sigma_max`.
    sigma_max: static bound fixing the kernel size.
    method: one of `BLUR_METHODS`.
    truncate: Gaussian half width in units of `sigma_max` (`method='gaussian'`).
    border: `'edge'` or `'reflect'` (see `separable_filter`).
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  if method not in BLUR_METHODS:
    raise ValueError(f"method={method!r}; expected one of {BLUR_METHODS}")
  images = _as_float(images)
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (images.shape[0],))
  if method == "gaussian":
    out = separable_filter(images, gaussian_kernels(sigma, blur_radius(sigma_max, truncate)),
                           border=border)
  else:
    kernels = pil_box_kernels(sigma, sigma_max)
    out = lax.fori_loop(0, 3, lambda _, x: separable_filter(x, kernels, border=border),
                        images)
  return _keep_invalid(out, images, valid)


# ----------------------------------------------------------------------------------------
# Random ops. Each sampler turns a block of uniforms `u` `[B, n]` into per-image parameters;
# the public functions draw that block from their key, and `strong_augment` draws a single
# block for its whole chain: every PRNG draw is a separate threefry kernel to compile, which
# dominates compile time on CPU.


def _uniforms(rng: jax.Array, batch: int, n: int) -> jax.Array:
  return jax.random.uniform(rng, (batch, n))


COLOR_JITTER_UNIFORMS = 9


def _color_jitter_from(u, *, brightness, contrast, saturation, hue, p):
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f"hue={hue} must be in [0, 0.5]")
  order = jnp.argsort(u[:, 0:4], axis=-1).astype(jnp.int32)
  lo = jnp.array([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast),
                  max(0.0, 1.0 - saturation), -hue], jnp.float32)
  hi = jnp.array([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue], jnp.float32)
  factors = lo + (hi - lo) * u[:, 4:8]
  return order, factors, u[:, 8] < p


def color_jitter_params(
    rng: jax.Array, batch: int, *, brightness: float = 0.0, contrast: float = 0.0,
    saturation: float = 0.0, hue: float = 0.0, p: float = 1.0,
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Draws torchvision `ColorJitter.get_params` for each image.

  Brightness, contrast and saturation factors are uniform in `[max(0, 1 - s), 1 + s]`, the
  hue shift uniform in `[-hue, hue]`, and the four ops run in a uniformly random order.

  Args:
    rng: PRNG key.
    batch: static B.
    brightness, contrast, saturation: strengths s >= 0 (0 disables the op).
    hue: strength in [0, 0.5].
    p: probability that an image is jittered at all (`RandomApply`).

  Returns:
    order `[B, 4]` int32 (a permutation of 0 = brightness, 1 = contrast, 2 = saturation,
    3 = hue), factors `[B, 4]` float32 in that fixed op order, apply `[B]` bool.
  """
  return _color_jitter_from(_uniforms(rng, batch, COLOR_JITTER_UNIFORMS),
                            brightness=brightness, contrast=contrast, saturation=saturation,
                            hue=hue, p=p)


@_PAD_TO_VALID
def apply_color_jitter(images: jax.typing.ArrayLike, order: jax.typing.ArrayLike,
                       factors: jax.typing.ArrayLike, apply: _OptArray = None, *,
                       valid: _OptArray = None, enabled: Sequence[bool] = (True,) * 4) -> jax.Array:
  """Applies brightness/contrast/saturation/hue with per-image factors in per-image order.

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    order: `[B, 4]` int, the op applied at each stage.
    factors: `[B, 4]` float, the factor of each op (brightness, contrast, saturation, hue).
    apply: optional `[B]` bool; images where False are returned unchanged.
    valid: optional `[B, H, W]` bool, True on real pixels (see `adjust_contrast`).
    enabled: static flags; a disabled op is the identity (torchvision's `None` parameter)
      and is not computed.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  batch = images.shape[0]
  apply = jnp.ones((batch,), bool) if apply is None else jnp.asarray(apply, bool)
  enabled = tuple(bool(e) for e in enabled)
  return _map_images(lambda x, p, o, f, a: _color_jitter_one(x, o, f, a, valid=p,
                                                             enabled=enabled),
                     images, valid, jnp.asarray(order, jnp.int32),
                     jnp.asarray(factors, jnp.float32), apply)


def _color_jitter_one(x, order, factors, apply, *, valid, enabled):
  """`apply_color_jitter` on one image (`[1, ...]` arguments), computing only its ops."""
  ops = (adjust_brightness, lambda v, f: adjust_contrast(v, f, valid=valid), adjust_saturation,
         adjust_hue)
  branches = [(lambda v, f, j=j: ops[j](v, f[:, j])) if enabled[j] else (lambda v, f: v)
              for j in range(4)]

  def jitter(v):
    return lax.fori_loop(0, 4, lambda i, v: lax.switch(order[0, i], branches, v, factors), v)

  out = _when(apply, jitter, x) if any(enabled) else x
  return _keep_invalid(out, x, valid)


def _color_jitter_u(u, images, *, brightness, contrast, saturation, hue, p, valid):
  order, factors, apply = _color_jitter_from(u, brightness=brightness, contrast=contrast,
                                             saturation=saturation, hue=hue, p=p)
  enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
  return apply_color_jitter(images, order, factors, apply, valid=valid, enabled=enabled)


def _color_jitter_one_u(u, x, *, brightness, contrast, saturation, hue, p, valid):
  order, factors, apply = _color_jitter_from(u, brightness=brightness, contrast=contrast,
                                             saturation=saturation, hue=hue, p=p)
  enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
  return _color_jitter_one(x, order, factors, apply, valid=valid, enabled=enabled)


@_PAD_TO_VALID
def color_jitter(rng: jax.Array, images: jax.typing.ArrayLike, *, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 p: float = 1.0, valid: _OptArray = None) -> jax.Array:
  """torchvision `RandomApply([ColorJitter(b, c, s, h)], p)`, drawn per image.

  Parameters are those of `color_jitter_params(rng, B, ...)`.

  Args:
    rng: PRNG key.
    images: `[B, H, W, 3]` float in [0, 1].
    brightness, contrast, saturation, hue: `ColorJitter` strengths (see
      `color_jitter_params`).
    p: per-image probability of jittering.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged
      and left out of the contrast mean.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  u = _uniforms(rng, images.shape[0], COLOR_JITTER_UNIFORMS)
  return _color_jitter_u(u, images, brightness=brightness, contrast=contrast,
                         saturation=saturation, hue=hue, p=p, valid=valid)


def _grayscale_one(u, x, *, p, valid):
  return _keep_invalid(_when(u[:, 0] < p, grayscale, x), x, valid)


def _grayscale_u(u, images, *, p, valid):
  return _map_images(lambda x, m, ub: _grayscale_one(ub, x, p=p, valid=m), images, valid, u)


@_PAD_TO_VALID
def random_grayscale(rng: jax.Array, images: jax.typing.ArrayLike, *, p: float,
                     valid: _OptArray = None) -> jax.Array:
  """torchvision `RandomGrayscale(p)`: each image becomes 3-channel luma with probability p.

  Args:
    rng: PRNG key.
    images: `[B, H, W, 3]` float in [0, 1].
    p: per-image probability.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  return _grayscale_u(_uniforms(rng, images.shape[0], 1), images, p=p, valid=valid)


def _gaussian_blur_from(u, *, p, sigma_range):
  sigma = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u[:, 1]
  return u[:, 0] < p, sigma


def gaussian_blur_params(rng: jax.Array, batch: int, *, p: float,
                         sigma_range: Tuple[float, float] = (0.1, 2.0)
                         ) -> Tuple[jax.Array, jax.Array]:
  """Per image: apply `[B]` bool (probability p) and sigma `[B]` ~ U[sigma_range]."""
  return _gaussian_blur_from(_uniforms(rng, batch, 2), p=p, sigma_range=sigma_range)


def _gaussian_blur_one(u, x, *, p, sigma_range, method="pil", truncate=4.0, border="edge",
                       valid=None):
  apply, sigma = _gaussian_blur_from(u, p=p, sigma_range=sigma_range)
  out = _when(apply, lambda v: blur(v, sigma, sigma_max=sigma_range[1], method=method,
                                    truncate=truncate, border=border), x)
  return _keep_invalid(out, x, valid)


def _gaussian_blur_u(u, images, *, p, sigma_range, method="pil", truncate=4.0, border="edge",
                     valid=None):
  kw = dict(p=p, sigma_range=sigma_range, method=method, truncate=truncate, border=border)
  return _map_images(lambda x, m, ub: _gaussian_blur_one(ub, x, valid=m, **kw), images, valid, u)


@_PAD_TO_VALID
def gaussian_blur(rng: jax.Array, images: jax.typing.ArrayLike, *, p: float,
                  sigma_range: Tuple[float, float] = (0.1, 2.0), method: str = "pil",
                  truncate: float = 4.0, border: str = "edge",
                  valid: _OptArray = None) -> jax.Array:
  """UniMatch/DSSN `blur`: with probability p, PIL `GaussianBlur(radius=sigma)`.

  sigma ~ U[sigma_range] per image (PIL's "radius" is the standard deviation), drawn as
  `gaussian_blur_params(rng, B, ...)`. The kernel size is fixed by `sigma_range[1]` for the
  whole batch; see `blur` for both methods.

  Args:
    rng: PRNG key.
    images: `[B, H, W, 3]` float in [0, 1].
    p: per-image probability.
    sigma_range: `(min, max)` standard deviation in pixels.
    method: `'pil'` (default, the references' filter) or `'gaussian'`.
    truncate: Gaussian half width in units of `sigma_range[1]` (`method='gaussian'`).
    border: `'edge'` (PIL) or `'reflect'` (cv2), see `separable_filter`.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  return _gaussian_blur_u(_uniforms(rng, images.shape[0], 2), images, p=p,
                          sigma_range=sigma_range, method=method, truncate=truncate,
                          border=border, valid=valid)


DSSN_OPS_UNIFORMS = 8  # per slot


def _dssn_ops_from(u, *, num_ops, random_num):
  batch = u.shape[0]
  u = jnp.transpose(u.reshape(batch, DSSN_OPS_UNIFORMS, num_ops), (1, 2, 0))  # [8, slots, B]
  if random_num:
    count = _uniform_int(u[0, 0], 1, num_ops + 1)
  else:
    count = jnp.full((batch,), num_ops)
  # `v = max_v - (max_v - min_v) * random()` on [0.05, 0.95].
  enhance = 0.95 - 0.9 * u[1]
  sigma = 0.1 + 1.9 * u[2]
  # posterize: `v = max(1, ceil(4 * random()))`, bits = 8 - v, uniform on {4, 5, 6, 7}.
  bits = 8 - jnp.maximum(1, jnp.ceil(4.0 * u[3]).astype(jnp.int32))
  # solarize: `v = max(1, ceil(255 * random()))`, threshold = 256 - v in {1, ..., 255}.
  level = 256 - jnp.maximum(1, jnp.ceil(255.0 * u[4]).astype(jnp.int32))
  hue = jnp.where(u[5] < 0.5, -0.5, 0.5) * u[6]
  op = _uniform_int(u[7], 0, len(DSSN_OPS))
  active = jnp.arange(num_ops)[:, None] < count[None, :]
  return dict(op=op, active=active, enhance=enhance, sigma=sigma, bits=bits,
              threshold=level.astype(jnp.float32) / 255.0, hue=hue)


def dssn_ops_params(rng: jax.Array, batch: int, *, num_ops: int = 3,
                    random_num: bool = True) -> dict:
  """Draws DSSN's `strong_img_aug` choices for each image (see `random_photometric_ops`).

  Returns:
    dict of `[num_ops, B]` arrays: `op` (index into `DSSN_OPS`), `active` (slot < k), and
    each op's magnitude: `enhance` (contrast/brightness/color/sharpness factor), `sigma`,
    `bits`, `threshold` (solarize, [0, 1] scale), `hue`.
  """
  return _dssn_ops_from(_uniforms(rng, batch, DSSN_OPS_UNIFORMS * num_ops), num_ops=num_ops,
                        random_num=random_num)


def _dssn_branches(valid):
  """One function per `DSSN_OPS` entry: `(images, magnitudes) -> images` (for `lax.switch`)."""
  return [
      lambda x, m: x,
      lambda x, m: autocontrast(x, valid=valid),
      lambda x, m: equalize(x, valid=valid),
      lambda x, m: blur(x, m["sigma"], sigma_max=2.0),
      lambda x, m: adjust_contrast(x, m["enhance"], valid=valid),
      lambda x, m: adjust_brightness(x, m["enhance"]),
      lambda x, m: adjust_saturation(x, m["enhance"]),
      lambda x, m: adjust_sharpness(x, m["enhance"]),
      lambda x, m: posterize(x, m["bits"]),
      lambda x, m: solarize(x, m["threshold"]),
      lambda x, m: adjust_hue(x, m["hue"]),
  ]


_MAGNITUDES = ("enhance", "sigma", "bits", "threshold", "hue")


def _dssn_op_one(x, op, magnitudes, *, valid):
  """`apply_dssn_op` on one image: only `DSSN_OPS[op]` is computed."""
  out = lax.switch(jnp.reshape(op, ()), _dssn_branches(valid), x, magnitudes)
  return _keep_invalid(out, x, valid)


@_PAD_TO_VALID
def apply_dssn_op(images: jax.typing.ArrayLike, op: jax.typing.ArrayLike, *, enhance, sigma,
                  bits, threshold, hue, valid: _OptArray = None) -> jax.Array:
  """Applies `DSSN_OPS[op[b]]` with the given magnitudes to each image b (all `[B]`).

  Only each image's own op is computed (per-image `lax.switch`).
  """
  images = _as_float(images)
  batch = images.shape[0]
  magnitudes = dict(
      enhance=jnp.broadcast_to(jnp.asarray(enhance, jnp.float32), (batch,)),
      sigma=jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,)),
      bits=jnp.broadcast_to(jnp.asarray(bits, jnp.int32), (batch,)),
      threshold=jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (batch,)),
      hue=jnp.broadcast_to(jnp.asarray(hue, jnp.float32), (batch,)))
  op = jnp.broadcast_to(jnp.asarray(op, jnp.int32), (batch,))
  return _map_images(lambda x, m, o, mags: _dssn_op_one(x, o, mags, valid=m), images, valid, op,
                     magnitudes)


def _dssn_ops_one(x, params, *, valid):
  """`apply_dssn_ops` on one image; `params` fields are `[num_ops, 1]`."""
  def slot(i, v):
    p = {k: lax.dynamic_index_in_dim(a, i, keepdims=False) for k, a in params.items()}
    return _when(p["active"], lambda w: _dssn_op_one(
        w, p["op"], {k: p[k] for k in _MAGNITUDES}, valid=valid), v)

  out = lax.fori_loop(0, params["op"].shape[0], slot, x)
  return _keep_invalid(out, x, valid)


@_PAD_TO_VALID
def apply_dssn_ops(images: jax.typing.ArrayLike, params: dict, *,
                   valid: _OptArray = None) -> jax.Array:
  """Runs the active slots of `dssn_ops_params` in order; per image, only its ops are computed.

  Args:
    images: `[B, H, W, 3]` float in [0, 1].
    params: `dssn_ops_params`' dict of `[num_ops, B]` arrays.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged
      and left out of image statistics.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  per_image = {k: jnp.swapaxes(jnp.asarray(v), 0, 1) for k, v in params.items()}  # [B, slots]

  def one(x, m, prm):
    return _dssn_ops_one(x, {k: jnp.swapaxes(v, 0, 1) for k, v in prm.items()}, valid=m)

  return _map_images(one, images, valid, per_image)


@_PAD_TO_VALID
def random_photometric_ops(rng: jax.Array, images: jax.typing.ArrayLike, *, num_ops: int = 3,
                           random_num: bool = True, valid: _OptArray = None) -> jax.Array:
  """DSSN's RandAugment-like `strong_img_aug(num_aug=3, random_num_sampling=True)`.

  Per image, k ~ U{1, ..., num_ops} (or k = num_ops) ops are drawn uniformly *with
  replacement* from `DSSN_OPS` and applied in sequence, each with a fresh magnitude:
  identity; autocontrast; equalize; PIL Gaussian blur sigma ~ U[0.1, 2]; contrast,
  brightness, color (saturation) and sharpness enhance factors ~ U(0.05, 0.95] (all weaken
  the image); posterize to b ~ U{4, 5, 6, 7} bits; solarize at threshold t ~ U{1, ..., 255}
  / 255; hue shift ~ +-U[0, 0.5]. All photometric: nothing moves, so no label transform is
  needed. Equivalent to `apply_dssn_ops(images, dssn_ops_params(rng, B, ...))`.

  Args:
    rng: PRNG key.
    images: `[B, H, W, 3]` float in [0, 1].
    num_ops: static maximum number of ops (DSSN's `num_aug` = 3).
    random_num: if True k is uniform on {1..num_ops}, else k = num_ops.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged
      and left out of image statistics.

  Returns:
    `[B, H, W, 3]` float32.
  """
  images = _as_float(images)
  params = dssn_ops_params(rng, images.shape[0], num_ops=num_ops, random_num=random_num)
  return apply_dssn_ops(images, params, valid=valid)


def _split_uniforms(u: jax.Array, sizes: Sequence[int]) -> list:
  bounds = np.cumsum([0] + list(sizes))
  return [u[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@_PAD_TO_VALID
def strong_augment(rng: jax.Array, images: jax.typing.ArrayLike, *, preset: str = "unimatch",
                   valid: _OptArray = None) -> jax.Array:
  """The strong photometric view of a method, one independent draw per image.

  Presets (see the module docstring for sources):
    'unimatch': ColorJitter(0.5, 0.5, 0.5, 0.25) p=0.8 -> grayscale p=0.2 -> PIL Gaussian
      blur sigma ~ U[0.1, 2] p=0.5 (UniMatch, and DSSN's first half).
    'dssn': 'unimatch' followed by `random_photometric_ops(num_ops=3, random_num=True)`.
    'cac': 5x5 binomial blur (cv2 `GaussianBlur((5, 5), 0)`, reflect-101) p=0.5 ->
      ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 -> grayscale p=0.2.
    'none': identity.
  All parameters come from one uniform draw `[B, n]` of `rng` (so the stream differs from
  calling the individual functions with split keys; the distribution is the same). CutMix and
  ClassMix are separate (`semijax.augment.mix`), applied after this.

  Args:
    rng: PRNG key (e.g. `fold_in(fold_in(seed_key, step), view)`).
    images: `[B, H, W, 3]` float in [0, 1].
    preset: one of `PRESETS`.
    valid: optional `[B, H, W]` bool, True on real pixels; the others are returned unchanged.

  Returns:
    `[B, H, W, 3]` float32.
  """
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}; expected one of {PRESETS}")
  images = _as_float(images)
  batch = images.shape[0]
  if preset == "none":
    return images
  if preset == "cac":
    sizes = (1, COLOR_JITTER_UNIFORMS, 1)
  else:
    sizes = (COLOR_JITTER_UNIFORMS, 1, 2, DSSN_OPS_UNIFORMS * (3 if preset == "dssn" else 0))
  u = _uniforms(rng, batch, sum(sizes))
  return _map_images(lambda x, m, ub: _strong_one(ub, x, preset=preset, sizes=sizes, valid=m),
                     images, valid, u)


def _strong_one(u, x, *, preset, sizes, valid):
  """`strong_augment` on one image `[1, H, W, 3]` from its uniforms `u` `[1, n]`."""
  if preset == "cac":
    u_blur, u_jitter, u_gray = _split_uniforms(u, sizes)
    binomial = jnp.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    x = _when(u_blur[:, 0] < 0.5,
              lambda v: separable_filter(v, binomial, border="reflect", valid=valid), x)
    x = _color_jitter_one_u(u_jitter, x, brightness=0.4, contrast=0.4, saturation=0.4,
                            hue=0.1, p=0.8, valid=valid)
    return _grayscale_one(u_gray, x, p=0.2, valid=valid)
  u_jitter, u_gray, u_blur, u_ops = _split_uniforms(u, sizes)
  x = _color_jitter_one_u(u_jitter, x, brightness=0.5, contrast=0.5, saturation=0.5,
                          hue=0.25, p=0.8, valid=valid)
  x = _grayscale_one(u_gray, x, p=0.2, valid=valid)
  x = _gaussian_blur_one(u_blur, x, p=0.5, sigma_range=(0.1, 2.0), valid=valid)
  if preset == "dssn":
    x = _dssn_ops_one(x, _dssn_ops_from(u_ops, num_ops=3, random_num=True), valid=valid)
  return x
