"""Fixed-threshold and CPLG pseudo-label selection vs explicit NumPy loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.pseudo import thresholds as T


def np_softmax(logits):
  z = logits - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_cplg(probs, ratio, tau_low, rule, pad=None, peaks_include_pad=True):
  """DSSN eqs. 20-22 with explicit loops over images, classes and pixels."""
  b_, h_, w_, c_ = probs.shape
  labels = np.zeros((b_, h_, w_), np.int64)
  mask = np.zeros((b_, h_, w_), bool)
  kept = np.zeros(b_)
  for b in range(b_):
    tau = np.zeros(c_, np.float32)
    for j in range(c_):
      region = probs[b, :, :, j]
      if pad is not None and not peaks_include_pad:
        region = region[~pad[b]]
      m = np.float32(region.max())
      if rule == "official":
        tau[j] = np.float32(ratio) * m if m > tau_low else m
      else:
        tau[j] = max(np.float32(ratio) * m, np.float32(tau_low))
    classes = set()
    for y in range(h_):
      for x in range(w_):
        c = int(np.argmax(probs[b, y, x]))
        labels[b, y, x] = c
        sel = probs[b, y, x, c] > tau[c] and (pad is None or not pad[b, y, x])
        mask[b, y, x] = sel
        if sel:
          classes.add(c)
    kept[b] = len(classes)
  return labels, mask, kept


def _logits(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(3, 6, 7, 5)).astype(np.float32) * 5.0
  # Image 0: class 4 is the argmax at two pixels but never confident (peak <= 0.92).
  logits[0, :2, :2] = 0.0
  logits[0, 0, 0, 4] = 1.0
  logits[0, 1, 1, 4] = 1.5
  logits[0, :, :, 4] = np.minimum(logits[0, :, :, 4], 1.5)
  return logits


@pytest.mark.parametrize("rule", T.CPLG_RULES)
def test_cplg_matches_numpy_loops(rule):
  logits = _logits()
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  labels, mask, aux = jax.jit(lambda l: T.cplg_mask(l, rule=rule))(logits)
  ref_labels, ref_mask, kept = np_cplg(probs, 0.96, 0.92, rule)
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_array_equal(mask, ref_mask)
  np.testing.assert_allclose(aux["selected_ratio"], ref_mask.mean(), rtol=1e-6)
  np.testing.assert_allclose(aux["classes_kept"], kept.mean(), rtol=1e-6)
  # The test covers a class that is the argmax somewhere but peaks at or below tau_low.
  low = probs[0, :, :, 4].max()
  assert low <= 0.92 and (ref_labels[0] == 4).any() and not mask[0][ref_labels[0] == 4].any()
  assert 0 < ref_mask.mean() < 1


def test_cplg_strict_ties_and_rules_differ():
  # Dyadic probabilities are exact in float32, so the ties below are exact.
  p = np.zeros((1, 1, 6, 3), np.float32)
  p[0, 0, 0] = [0.875, 0.0625, 0.0625]     # class 0 peak m = 0.875
  p[0, 0, 1] = [0.4375, 0.28125, 0.28125]  # exactly r * m for r = 0.5
  p[0, 0, 2] = [0.5, 0.25, 0.25]           # just above r * m
  p[0, 0, 3] = [0.25, 0.75, 0.0]           # class 1 peak 0.75 = tau_low: not above it
  p[0, 0, 4] = [0.25, 0.0, 0.75]           # class 2 peak 0.75 ...
  p[0, 0, 5] = [0.125, 0.0625, 0.8125]     # ... no: class 2 peak 0.8125 > tau_low
  common = dict(peak_fraction=0.5, tau_low=0.75)
  _, official, _ = T.cplg_select(p, rule="official", **common)
  _, maxrule, _ = T.cplg_select(p, rule="max", **common)
  # official: tau_0 = 0.4375 (strict: pixel 1 out), tau_1 = 0.75 (its own peak: nothing),
  # tau_2 = 0.40625. max rule: tau = max(r m, 0.75) = 0.75 for every class.
  np.testing.assert_array_equal(official[0, 0], [True, False, True, False, True, True])
  np.testing.assert_array_equal(maxrule[0, 0], [True, False, False, False, False, True])
  for rule, got in (("official", official), ("max", maxrule)):
    np.testing.assert_array_equal(got, np_cplg(p, 0.5, 0.75, rule)[1])


def test_cplg_padding():
  logits = _logits(1)
  pad = np.zeros(logits.shape[:3], bool)
  pad[:, 4:, :] = True
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
  for include in (True, False):
    labels, mask, aux = T.cplg_mask(logits, valid=~pad, peaks_include_invalid=include)
    _, ref_mask, kept = np_cplg(probs, 0.96, 0.92, "official", pad, include)
    np.testing.assert_array_equal(mask, ref_mask)
    assert not np.asarray(mask)[pad].any()
    np.testing.assert_allclose(aux["selected_ratio"], ref_mask[~pad].mean(), rtol=1e-6)
    np.testing.assert_allclose(aux["classes_kept"], kept.mean(), rtol=1e-6)


def test_cplg_thresholds_returns_thresholds_and_peaks():
  p = np.zeros((1, 1, 3, 3), np.float32)
  p[0, 0, 0] = [0.875, 0.0625, 0.0625]
  p[0, 0, 1] = [0.25, 0.75, 0.0]
  p[0, 0, 2] = [0.125, 0.0625, 0.8125]
  tau, aux = T.cplg_thresholds(p, peak_fraction=0.5, tau_low=0.75)
  np.testing.assert_array_equal(aux["peaks"], [[0.875, 0.75, 0.8125]])
  np.testing.assert_array_equal(tau, [[0.4375, 0.75, 0.40625]])
  # Peaks over the valid pixels only.
  _, aux = T.cplg_thresholds(p, valid=np.array([[[False, True, True]]]))
  np.testing.assert_array_equal(aux["peaks"], [[0.25, 0.75, 0.8125]])


def test_confidence_mask_inclusive_and_strict():
  p = np.array([[[[0.5, 0.25, 0.25], [0.75, 0.125, 0.125], [0.25, 0.375, 0.375]]]], np.float32)
  conf = jax.jit(chex.assert_max_traces(lambda p: T.confidence_mask(p, threshold=0.5), n=1))
  conf(p[..., ::-1] + 0.0)
  labels, incl, aux = conf(p)
  _, strict, _ = T.confidence_mask(p, threshold=0.5, inclusive=False)
  np.testing.assert_array_equal(labels[0, 0], [0, 0, 1])
  np.testing.assert_array_equal(incl[0, 0], [True, True, False])
  np.testing.assert_array_equal(strict[0, 0], [False, True, False])
  np.testing.assert_allclose(aux["selected_ratio"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(aux["mean_confidence"], (0.5 + 0.75 + 0.375) / 3, rtol=1e-6)
  pad = np.array([[[False, True, False]]])
  _, masked, aux = T.confidence_mask(p, threshold=0.5, valid=~pad)
  np.testing.assert_array_equal(masked[0, 0], [True, False, False])
  np.testing.assert_allclose(aux["selected_ratio"], 0.5, rtol=1e-6)
  # DSSN's Cityscapes setting: threshold 0 keeps every non-padding pixel.
  _, everything, _ = T.confidence_mask(p, threshold=0.0, valid=~pad)
  np.testing.assert_array_equal(everything, ~pad)


def test_aux_is_global_under_pmap_and_no_retrace():
  logits = np.concatenate([_logits(2), _logits(3), _logits(4)[:2]])  # 8 images
  pad = np.zeros(logits.shape[:3], bool)
  pad[::3, 5:] = True
  _, mask, aux = T.cplg_mask(logits, valid=~pad)

  @chex.assert_max_traces(n=1)
  def per_device(l, v):
    return T.cplg_mask(l, valid=v, axis_name="d")

  f = jax.pmap(per_device, axis_name="d")
  pm_labels, pm_mask, pm_aux = f(logits[:, None], ~pad[:, None])
  f(logits[:, None] + 1.0, ~pad[:, None])
  np.testing.assert_array_equal(pm_mask[:, 0], mask)
  for k in aux:
    np.testing.assert_allclose(pm_aux[k], np.full(8, aux[k]), rtol=1e-6)
