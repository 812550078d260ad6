"""Alonso et al.'s view augmentation: PyTorch-semantics rescale/crop/pad, flip, ClassMix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.augment import alonso

pytestmark = pytest.mark.usefixtures("fast_compiles")


def torch_like_bilinear(img, out_h, out_w):
  """`F.interpolate(mode='bilinear', align_corners=True)` of `[H, W, ...]`, in NumPy."""
  h, w = img.shape[:2]

  def axis(n_in, n_out):
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  r0, r1, fr = axis(h, out_h)
  c0, c1, fc = axis(w, out_w)
  extra = (1,) * (img.ndim - 2)
  rows = img[r0] * (1 - fr).reshape((-1, 1) + extra) + img[r1] * fr.reshape((-1, 1) + extra)
  return rows[:, c0] * (1 - fc).reshape((1, -1) + extra) + rows[:, c1] * fc.reshape(
      (1, -1) + extra)


def torch_like_nearest(img, out_h, out_w):
  """Legacy `F.interpolate(mode='nearest')`: source = floor(dst * in / out)."""
  h, w = img.shape[:2]
  r = np.minimum(np.floor(np.arange(out_h) * h / out_h).astype(int), h - 1)
  c = np.minimum(np.floor(np.arange(out_w) * w / out_w).astype(int), w - 1)
  return img[r][:, c]


def official_scale_crop(img, scale, top, left, fill, resize):
  """The official `random_scale_crop`: resize to floor(size * s), then pad (centred) or crop."""
  h, w = img.shape[:2]
  sh, sw = int(np.floor(h * scale)), int(np.floor(w * scale))
  big = resize(img, sh, sw)
  out = np.full(img.shape, fill, dtype=np.result_type(img, np.float32))
  for y in range(h):
    for x in range(w):
      u, v = y - top, x - left
      if 0 <= u < sh and 0 <= v < sw:
        out[y, x] = big[u, v]
  return out


@pytest.mark.parametrize("scale", [0.8, 1.0, 1.37, 1.75])
def test_warps_match_resize_then_pad_or_crop(scale):
  rng = np.random.default_rng(0)
  h = w = 13
  img = rng.random((2, h, w, 3)).astype(np.float32)
  lab = rng.integers(0, 5, (2, h, w))
  sh = int(np.floor(h * np.float32(scale)))
  top = np.array([(h - sh + 1) // 2, (h - sh + 1) // 2]) if sh <= h else np.array([-2, 0])
  left = np.array([(w - sh) // 2, (w - sh) // 2]) if sh <= w else np.array([-1, -(sh - w)])
  geo = alonso.Geometry(scale=jnp.full((2,), scale, jnp.float32), top=jnp.asarray(top),
                        left=jnp.asarray(left), flip=jnp.array([False, True]))
  got = np.asarray(alonso.warp_linear(img, geo))
  got_lab = np.asarray(alonso.warp_nearest(lab, geo, fill=255))
  for b in range(2):
    want = official_scale_crop(img[b], np.float32(scale), top[b], left[b], 0.0,
                               torch_like_bilinear)
    want_lab = official_scale_crop(lab[b], np.float32(scale), top[b], left[b], 255,
                                   torch_like_nearest)
    if geo.flip[b]:
      want, want_lab = want[:, ::-1], want_lab[:, ::-1]
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_lab[b], want_lab)


def test_geometry_draws_per_batch_or_per_image():
  g = alonso.geometry_params(jax.random.key(0), 6, 16, 16, scale_prob=1.0, flip_prob=0.5)
  assert len(set(np.asarray(g.scale).tolist())) == 1 and len(set(np.asarray(g.flip))) == 1
  g = alonso.geometry_params(jax.random.key(0), 6, 16, 16, scale_prob=1.0, flip_prob=0.5,
                             per_image=True)
  assert len(set(np.asarray(g.scale).tolist())) == 6
  s = np.asarray(g.scale)
  assert np.all((s >= 0.75) & (s <= 1.75))
  off = alonso.geometry_params(jax.random.key(0), 6, 16, 16, scale_prob=0.0, flip_prob=0.0)
  np.testing.assert_array_equal(off.scale, 1.0)
  np.testing.assert_array_equal(off.top, 0)


def _scene(rng, b=4, h=12, w=12):
  """Images whose first channel encodes the label, so alignment can be checked exactly."""
  lab = np.zeros((b, h, w), np.int32)
  for i in range(b):
    for c in rng.choice(np.arange(1, 6), 2, replace=False):
      y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
      lab[i, y:y + 4, x:x + 5] = c
  img = np.stack([lab / 10.0, rng.random((b, h, w)), rng.random((b, h, w))], -1)
  return img.astype(np.float32), lab


def test_view_keeps_images_labels_and_carried_arrays_aligned():
  rng = np.random.default_rng(1)
  img, lab = _scene(rng)
  hidden = (lab + 1) * 7
  settings = alonso.ViewAugment(flip_prob=0.5, scale_prob=0.0, jitter_prob=0.0, blur_prob=0.0,
                                classmix_prob=1.0)
  fn = jax.jit(lambda k, exclude: alonso.augment_view(
      k, img, lab, settings=settings, linear={"conf": img[..., 0]},
      nearest={"hidden": hidden}, per_image=True, exclude_background=exclude),
      static_argnums=1)
  mixed = 0
  for seed in range(4):
    exclude = seed % 2 == 1
    out = jax.device_get(fn(jax.random.key(seed), exclude))
    ok = ~out["pad"]
    np.testing.assert_allclose(out["image"][..., 0][ok], out["label"][ok] / 10.0, atol=1e-6)
    np.testing.assert_allclose(out["linear"]["conf"][ok], out["label"][ok] / 10.0, atol=1e-6)
    np.testing.assert_array_equal(out["nearest"]["hidden"][ok], (out["label"][ok] + 1) * 7)
    mask = out["mix_mask"]
    mixed += mask.sum()
    # ClassMix: image i receives whole classes (n // 2 + 1 of n) of image i + 1.
    src = np.roll(lab, -1, axis=0)
    for i in range(4):
      chosen = np.unique(src[i][mask[i]])
      np.testing.assert_array_equal(mask[i], np.isin(src[i], chosen))
      present = np.unique(src[i])
      if exclude:  # the official VOC setting: background never pasted
        present = present[present > 0]
        assert 0 not in chosen
      assert len(chosen) == len(present) // 2 + 1
  assert mixed > 0


def test_rescaled_view_pads_with_ignore_and_black():
  rng = np.random.default_rng(2)
  img, lab = _scene(rng)
  settings = alonso.ViewAugment(flip_prob=0.0, scale_prob=1.0, scale_range=(0.75, 0.76),
                                jitter_prob=0.0, blur_prob=0.0, classmix_prob=0.0)
  out = jax.device_get(alonso.augment_view(jax.random.key(0), img, lab, settings=settings))
  pad = out["pad"]
  assert pad.any() and pad[:, 0].all() and not pad[:, 6, 6].any()
  assert np.all(out["label"][pad] == 255) and np.all(out["image"][pad] == 0)


def test_photometric_changes_colours_but_not_padding_or_labels():
  rng = np.random.default_rng(3)
  img, lab = _scene(rng)
  pad = np.zeros(lab.shape, bool)
  pad[:, :2] = True
  img[pad] = 0
  settings = alonso.ViewAugment(flip_prob=0.0, scale_prob=0.0, jitter_prob=1.0,
                                jitter_strength=0.25, blur_prob=1.0, classmix_prob=0.0)
  out = jax.device_get(alonso.augment_view(jax.random.key(0), img, lab, settings=settings,
                                           pad=pad))
  assert np.abs(out["image"] - img)[~pad].max() > 1e-2
  np.testing.assert_array_equal(out["image"][pad], 0)
  np.testing.assert_array_equal(out["label"], np.where(pad, 255, lab))


def test_presets_follow_table_1_and_the_official_code():
  p = alonso.PRESETS
  assert p["paper_strong"].jitter_strength == 0.3 and p["paper_weak"].jitter_strength == 0.15
  assert p["official_strong"].classmix_prob == 0.75 and p["paper_strong"].classmix_prob == 0.8
  assert p["official_weak"].blur_prob == 0 and p["official_strong"].blur_prob == 0.2
  assert p["official_weak"].scale_prob == 0.5 and p["official_strong"].scale_prob == 0.8
