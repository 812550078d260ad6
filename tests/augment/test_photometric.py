"""On-device photometric augmentation vs NumPy re-implementations and PIL."""

import colorsys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from semijax.augment import photometric as P

B, H, W = 3, 12, 14
GRAY = np.array([0.299, 0.587, 0.114])


def _images(seed=0, batch=B, quantized=False):
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, (batch, H, W, 3))
  if quantized:
    x = np.round(x * 255.0) / 255.0
  return x.astype(np.float32)


def _pad(batch=B):
  pad = np.zeros((batch, H, W), bool)
  pad[0, 8:, :] = True
  pad[1, :, 10:] = True
  return pad


# ---------------------------------------------------------------------------------------
# NumPy references (torchvision's formulas, float64).


def np_gray(x):
  return x @ GRAY


def np_brightness(x, f):
  return np.clip(f * x, 0, 1)


def np_contrast(x, f, valid):
  mean = np_gray(x)[valid].mean()
  return np.clip(f * x + (1 - f) * mean, 0, 1)


def np_saturation(x, f):
  return np.clip(f * x + (1 - f) * np_gray(x)[..., None], 0, 1)


def np_hue(x, f):
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[idx])
    out[idx] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
  return out


def _jit_once(fn, **kwargs):
  """`jax.jit` that fails the test if the function is traced twice."""
  return jax.jit(chex.assert_max_traces(fn, n=1), **kwargs)


def _to_pil(x):
  return Image.fromarray(np.round(x * 255).astype(np.uint8))


def _from_pil(img):
  return np.asarray(img, np.float64) / 255.0


# ---------------------------------------------------------------------------------------
# Deterministic ops.


def test_grayscale_weights():
  x = _images()
  np.testing.assert_allclose(P.rgb_to_grayscale(x), np_gray(x.astype(np.float64)), atol=1e-6)
  g = np.asarray(P.grayscale(x))
  np.testing.assert_allclose(g, np.repeat(np_gray(x.astype(np.float64))[..., None], 3, -1),
                             atol=1e-6)


def test_brightness_contrast_saturation_match_numpy_and_respect_pad():
  x, pad = _images(1), _pad()
  f = np.array([0.3, 1.0, 1.6], np.float32)
  x64 = x.astype(np.float64)
  got_b = np.asarray(P.adjust_brightness(x, f))
  got_c = np.asarray(P.adjust_contrast(x, f, valid=~pad))
  got_s = np.asarray(P.adjust_saturation(x, f))
  for i in range(B):
    np.testing.assert_allclose(got_b[i], np_brightness(x64[i], f[i]), atol=1e-6)
    want_c = np.where(pad[i][..., None], x64[i], np_contrast(x64[i], f[i], ~pad[i]))
    np.testing.assert_allclose(got_c[i], want_c, atol=1e-6)
    np.testing.assert_allclose(got_s[i], np_saturation(x64[i], f[i]), atol=1e-6)
  # Padded pixels neither change nor count in the mean.
  x_other = np.where(pad[..., None], 0.0, x).astype(np.float32)
  got_other = np.asarray(P.adjust_contrast(x_other, f, valid=~pad))
  np.testing.assert_array_equal(got_other[~pad], got_c[~pad])
  np.testing.assert_array_equal(got_other[pad], 0.0)


def test_hue_matches_colorsys():
  x = _images(2)
  f = np.array([-0.4, 0.13, 0.5], np.float32)
  got = np.asarray(jax.jit(P.adjust_hue)(x, f))
  for i in range(B):
    np.testing.assert_allclose(got[i], np_hue(x[i].astype(np.float64), float(f[i])), atol=2e-6)
  # A zero shift is the identity (up to the HSV round trip) and hsv->rgb inverts rgb->hsv.
  np.testing.assert_allclose(jax.jit(P.adjust_hue)(x, np.zeros(B, np.float32)), x, atol=2e-6)
  np.testing.assert_allclose(jax.jit(lambda x: P.hsv_to_rgb(P.rgb_to_hsv(x)))(x), x, atol=2e-6)


def test_color_jitter_params_follow_torchvision_ranges():
  n = 4000
  order, factors, apply = jax.jit(lambda k: P.color_jitter_params(
      k, n, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, p=0.8))(jax.random.key(3))
  order, factors, apply = map(np.asarray, (order, factors, apply))
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (n, 1)))
  assert factors[:, :3].min() >= 0.5 and factors[:, :3].max() <= 1.5
  assert factors[:, 3].min() >= -0.25 and factors[:, 3].max() <= 0.25
  # Uniform factors: mean within 5 standard errors; 24 orders roughly equally likely.
  se = np.array([1.0, 1.0, 1.0, 0.5]) / np.sqrt(12 * n)
  assert np.all(np.abs(factors.mean(0) - np.array([1, 1, 1, 0])) < 5 * se)
  assert abs(apply.mean() - 0.8) < 5 * np.sqrt(0.8 * 0.2 / n)
  first_op = np.bincount(order[:, 0], minlength=4) / n
  assert np.all(np.abs(first_op - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n))


def test_color_jitter_applies_ops_in_per_image_order():
  x, pad = _images(4), _pad()
  key = jax.random.key(5)
  strengths = dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25)
  jitter = _jit_once(lambda k, x, m: (P.color_jitter(k, x, p=0.7, valid=~m, **strengths),
                                       P.color_jitter_params(k, B, p=0.7, **strengths)))
  jitter(jax.random.key(0), x + 0.0, ~pad)
  got, params = jitter(key, x, pad)
  got, (order, factors, apply) = np.asarray(got), map(np.asarray, params)
  for i in range(B):
    y = x[i].astype(np.float64)
    if apply[i]:
      for op in order[i]:
        f = float(factors[i, op])
        y = [np_brightness(y, f), np_contrast(y, f, ~pad[i]), np_saturation(y, f),
             np_hue(y, f)][op]
    want = np.where(pad[i][..., None], x[i], y)
    np.testing.assert_allclose(got[i], want, atol=2e-5)


def test_random_grayscale_is_all_or_nothing_per_image():
  x = _images(6, batch=64)
  gray = _jit_once(lambda k, x: P.random_grayscale(k, x, p=0.5))
  gray(jax.random.key(0), x + 0.0)
  got = np.asarray(gray(jax.random.key(7), x))
  is_gray = np.all(np.abs(got - np_gray(x.astype(np.float64))[..., None]) < 1e-6, axis=(1, 2, 3))
  unchanged = np.all(got == x, axis=(1, 2, 3))
  assert np.all(is_gray ^ unchanged) and 10 < is_gray.sum() < 54


# ---------------------------------------------------------------------------------------
# Blur.


def _np_box_pass(x, radius, axis):
  """One pass of PIL's extended box blur, float64, edge replicated."""
  l = int(np.floor(radius))
  inner = 1.0 / (2 * radius + 1)
  far = (1.0 - (2 * l + 1) * inner) / 2
  n = x.shape[axis]
  out = np.zeros_like(x)
  for k in range(-l - 1, l + 2):
    idx = np.clip(np.arange(n) + k, 0, n - 1)
    out += (inner if abs(k) <= l else far) * np.take(x, idx, axis=axis)
  return out


def _np_pil_blur(x, sigma):
  s2 = sigma * sigma / 3
  length = np.sqrt(12 * s2 + 1)
  l = np.floor((length - 1) / 2)
  radius = l + (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
  for axis in (1, 0, 1, 0, 1, 0):
    x = _np_box_pass(x, radius, axis)
  return x


def test_pil_blur_matches_numpy_and_pil():
  x = _images(8, quantized=True)
  sigma = np.array([0.37, 1.37, 1.93], np.float32)
  got = np.asarray(jax.jit(lambda x, s: P.blur(x, s, sigma_max=2.0))(x, sigma))
  for i in range(B):
    np.testing.assert_allclose(got[i], _np_pil_blur(x[i].astype(np.float64), sigma[i]),
                               atol=1e-5)
    # PIL rounds to uint8 after each of its 6 passes (0.5 / 255 each); averaging does not
    # amplify errors, so we stay within 3 / 255 of PIL itself.
    pil = _from_pil(_to_pil(x[i]).filter(ImageFilter.GaussianBlur(radius=float(sigma[i]))))
    assert np.abs(got[i] - pil).max() <= 3.0 / 255 + 1e-6


def test_gaussian_method_matches_scipy():
  ndimage = pytest.importorskip("scipy.ndimage")
  x = _images(9)
  sigma = np.array([0.3, 1.1, 2.0], np.float32)
  radius = P.blur_radius(2.0)
  blur = jax.jit(P.blur, static_argnames=("sigma_max", "method", "border"))
  for border, mode in (("edge", "nearest"), ("reflect", "mirror")):
    got = np.asarray(blur(x, sigma, sigma_max=2.0, method="gaussian", border=border))
    for i in range(B):
      want = x[i].astype(np.float64)
      for axis in (0, 1):
        want = ndimage.gaussian_filter1d(want, float(sigma[i]), axis=axis, mode=mode,
                                         truncate=radius / float(sigma[i]))
      np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_gaussian_blur_uses_its_params():
  x, pad = _images(10, batch=8), np.zeros((8, H, W), bool)
  pad[:, 0, :] = True
  key = jax.random.key(11)
  blur = _jit_once(lambda k, x, m: (P.gaussian_blur(k, x, p=0.5, valid=~m),
                                     P.gaussian_blur_params(k, 8, p=0.5)))
  blur(jax.random.key(0), x + 0.0, ~pad)
  got, (apply, sigma) = blur(key, x, pad)
  got, apply, sigma = map(np.asarray, (got, apply, sigma))
  assert 0 < apply.sum() < 8
  for i in range(8):
    want = _np_pil_blur(x[i].astype(np.float64), sigma[i]) if apply[i] else x[i]
    np.testing.assert_allclose(got[i][~pad[i]], np.asarray(want)[~pad[i]], atol=1e-5)
    np.testing.assert_array_equal(got[i][pad[i]], x[i][pad[i]])


# ---------------------------------------------------------------------------------------
# DSSN's op list vs PIL (the library the reference runs). Bounds in 1/255 units come from
# PIL's integer arithmetic: truncating blends (< 1), rounded luma (<= 0.5) and rounded
# contrast mean (<= 1).


# One compiled `apply_dssn_op` for the tests below (same shapes: a batch of _NB images).
_apply_op = jax.jit(P.apply_dssn_op)
_NB = 4


_PIL_CASES = {
    # name: (PIL op, our op, bound)
    "autocontrast": (ImageOps.autocontrast, P.autocontrast, 1.0),
    "equalize": (ImageOps.equalize, P.equalize, 0.0),
    "posterize5": (lambda im: ImageOps.posterize(im, 5), lambda x: P.posterize(x, 5), 0.0),
    "solarize100": (lambda im: ImageOps.solarize(im, 100), lambda x: P.solarize(x, 100 / 255),
                    0.0),
    "brightness": (lambda im: ImageEnhance.Brightness(im).enhance(0.4),
                   lambda x: P.adjust_brightness(x, 0.4), 1.0),
    "contrast": (lambda im: ImageEnhance.Contrast(im).enhance(0.3),
                 lambda x: P.adjust_contrast(x, 0.3), 2.0),
    "color": (lambda im: ImageEnhance.Color(im).enhance(0.2),
              lambda x: P.adjust_saturation(x, 0.2), 1.5),
    "sharpness": (lambda im: ImageEnhance.Sharpness(im).enhance(0.1),
                  lambda x: P.adjust_sharpness(x, 0.1), 2.0),
}


@pytest.fixture(scope="module")
def pil_case_outputs():
  rng = np.random.default_rng(12)
  # A low-contrast image so that autocontrast/equalize have work to do.
  x = (np.round(rng.uniform(40, 170, (_NB, H, W, 3))) / 255).astype(np.float32)
  ours = jax.jit(lambda x: {k: fn(x) for k, (_, fn, _) in _PIL_CASES.items()})(x)
  return x, {k: np.asarray(v) for k, v in ours.items()}


@pytest.mark.parametrize("name", list(_PIL_CASES))
def test_dssn_ops_match_pil(name, pil_case_outputs):
  x, ours = pil_case_outputs
  pil_fn, _, bound = _PIL_CASES[name]
  for i in range(_NB):
    want = _from_pil(pil_fn(_to_pil(x[i])))
    assert np.abs(ours[name][i] - want).max() <= bound / 255 + 1e-6, name


def test_apply_dssn_op_dispatches_every_op(pil_case_outputs):
  # Each index runs the named op: compare with the PIL-checked outputs above and with the
  # NumPy references for blur and hue. One compiled `_apply_op` (batch _NB) throughout.
  x, ours = pil_case_outputs
  pad = np.zeros(x.shape[:3], bool)
  pil_name = {"autocontrast": "autocontrast", "equalize": "equalize", "posterize": "posterize5",
              "solarize": "solarize100", "brightness": "brightness", "contrast": "contrast",
              "color": "color", "sharpness": "sharpness"}
  enhance = {"brightness": 0.4, "contrast": 0.3, "color": 0.2, "sharpness": 0.1}
  full = lambda v, dtype=jnp.float32: jnp.full((_NB,), v, dtype)  # noqa: E731
  for i, name in enumerate(P.DSSN_OPS):
    got = np.asarray(_apply_op(x, full(i, jnp.int32), enhance=full(enhance.get(name, 0.5)),
                               sigma=full(1.37), bits=full(5, jnp.int32),
                               threshold=full(100 / 255), hue=full(-0.2), valid=~pad))
    for b in range(_NB):
      if name in pil_name:
        want = ours[pil_name[name]][b]
      elif name == "blur":
        want = _np_pil_blur(x[b].astype(np.float64), np.float32(1.37))
      elif name == "hue":
        want = np_hue(x[b].astype(np.float64), -0.2)
      else:
        want = x[b]
      np.testing.assert_allclose(got[b], want, atol=1e-5, err_msg=name)


def test_dssn_ops_params_distribution():
  n = 6000
  prm = jax.jit(lambda k: P.dssn_ops_params(k, n))(jax.random.key(14))
  prm = {k: np.asarray(v) for k, v in prm.items()}
  count = prm["active"].sum(0)
  freq = np.bincount(count, minlength=4)[1:] / n
  assert np.all(np.abs(freq - 1 / 3) < 5 * np.sqrt(2 / 9 / n))
  assert np.all(prm["active"][0])  # at least one op, slots filled in order
  assert np.all(prm["active"][1] >= prm["active"][2])
  op_freq = np.bincount(prm["op"].ravel(), minlength=11) / prm["op"].size
  assert np.all(np.abs(op_freq - 1 / 11) < 5 * np.sqrt((1 / 11) * (10 / 11) / prm["op"].size))
  assert set(np.unique(prm["bits"])) == {4, 5, 6, 7}
  levels = np.round(prm["threshold"] * 255).astype(int)
  assert levels.min() >= 1 and levels.max() <= 255
  assert prm["enhance"].min() > 0.05 and prm["enhance"].max() <= 0.95
  assert np.abs(prm["hue"]).max() <= 0.5 and (prm["hue"] < 0).any() and (prm["hue"] > 0).any()


# ---------------------------------------------------------------------------------------
# Composition, padding, reproducibility, tracing.


def _strong_inputs():
  x, pad = _images(17, batch=_NB, quantized=True), np.zeros((_NB, H, W), bool)
  pad[:, 9:, :] = True
  pad[:, :, :2] = True
  return x, pad


# Traced once per preset: a retrace on the second or third call would exceed the count.
_strong = jax.jit(chex.assert_max_traces(P.strong_augment, n=len(P.PRESETS)),
                  static_argnames="preset")


@pytest.mark.parametrize("preset", P.PRESETS)
def test_strong_augment_keeps_padding_reproduces_and_does_not_retrace(preset):
  x, pad = _strong_inputs()
  a = np.asarray(_strong(jax.random.key(1), x, preset=preset, valid=~pad))
  b = np.asarray(_strong(jax.random.key(1), x, preset=preset, valid=~pad))
  c = np.asarray(_strong(jax.random.key(2), x + 0.0, preset=preset, valid=~pad))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[pad], x[pad])
  assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
  if preset != "none":
    assert not np.array_equal(a, c)


def test_strong_augment_rejects_unknown_preset():
  with pytest.raises(ValueError):
    P.strong_augment(jax.random.key(0), _images(), preset="randaugment")


def test_random_photometric_ops_runs_the_active_slots_in_order():
  # Replay `dssn_ops_params` slot by slot with the (separately checked) single-op dispatch.
  x, pad = _strong_inputs()
  key = jax.random.key(16)
  ops = _jit_once(lambda k, x, m: (P.random_photometric_ops(k, x, valid=~m),
                                    P.dssn_ops_params(k, _NB)))
  ops(jax.random.key(0), x + 0.0, ~pad)
  got, prm = ops(key, x, pad)
  got = np.asarray(got)
  assert len(set(np.asarray(prm["active"]).sum(0))) > 1  # images with different op counts
  want = x
  for slot in range(3):
    stepped = _apply_op(want, prm["op"][slot], enhance=prm["enhance"][slot],
                        sigma=prm["sigma"][slot], bits=prm["bits"][slot],
                        threshold=prm["threshold"][slot], hue=prm["hue"][slot], valid=~pad)
    want = np.where(np.asarray(prm["active"][slot])[:, None, None, None], stepped, want)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(got[pad], x[pad])


# ---------------------------------------------------------------------------------------
# Per-image ops (issue 17): the same views as the batched implementation they replaced.


@pytest.mark.parametrize("preset", [p for p in P.PRESETS if p != "none"])
@pytest.mark.parametrize("with_pad", [False, True])
def test_strong_augment_equals_the_batched_implementation(preset, with_pad):
  # `legacy.strong_augment` computes every op for every image and keeps one per image with
  # `jnp.where`; the per-image `lax.switch` version must give the same views for the same
  # key (up to float32 rounding: XLA fuses the ops differently in the two programs).
  from experiments.benchmarks import legacy  # pylint: disable=g-import-not-at-top
  x, pad = _strong_inputs()
  m = ~pad if with_pad else None
  new = jax.jit(lambda k, x, m: P.strong_augment(k, x, preset=preset, valid=m))
  old = jax.jit(lambda k, x, m: legacy.strong_augment(k, x, preset=preset, valid=m))
  for seed in range(3):
    a = np.asarray(new(jax.random.key(seed), x, m))
    b = np.asarray(old(jax.random.key(seed), x, m))
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    assert not np.array_equal(a, x)  # the view did change the images


def test_only_the_drawn_op_is_computed():
  # Images go through `lax.map` one at a time and each op slot is a `lax.switch` (a `cond`
  # with one branch per op) on that image, so an image computes only its own ops; the
  # batched version computed all eleven DSSN ops (and all four jitter ops) per slot.
  from jax.extend import core as jex  # pylint: disable=g-import-not-at-top
  x, pad = _strong_inputs()
  jaxpr = jax.make_jaxpr(lambda k, x, m: P.strong_augment(k, x, preset="dssn", valid=~m))(
      jax.random.key(0), x, pad).jaxpr

  def walk(jaxpr, inside_map=False):
    for eqn in jaxpr.eqns:
      yield eqn, inside_map
      mapped = inside_map or (eqn.primitive.name == "scan" and eqn.params["length"] == _NB)
      for sub in jex.jaxprs_in_params(eqn.params):
        yield from walk(sub, mapped)

  conds = [(len(e.params["branches"]), inside) for e, inside in walk(jaxpr)
           if e.primitive.name == "cond"]
  assert (len(P.DSSN_OPS), True) in conds and (4, True) in conds
  assert all(inside for _, inside in conds)
