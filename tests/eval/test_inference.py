"""Evaluation protocols vs NumPy references, and `evaluate` end to end."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from semijax.eval import inference, metrics

C = 4
_RNG = np.random.default_rng(0)
_M = _RNG.normal(size=(3, C)).astype(np.float32)
_M_UP = _RNG.normal(size=(3, C)).astype(np.float32)
_ROW = _RNG.normal(size=C).astype(np.float32)
_COL = _RNG.normal(size=C).astype(np.float32)


def _positional_logits(x):
  """A position-dependent network: pixel, the pixel above (0 at the top) and coordinates
  relative to the input, so every window sees something different in the overlaps."""
  h, w = x.shape[1:3]
  up = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :h]
  rows = (jnp.arange(h, dtype=jnp.float32) / h)[:, None, None]
  cols = (jnp.arange(w, dtype=jnp.float32) / w)[None, :, None]
  return x @ _M + up @ _M_UP + rows * _ROW + cols * _COL


def _positional_logits_np(x):
  h, w = x.shape[1:3]
  up = np.zeros_like(x)
  up[:, 1:] = x[:, :-1]
  rows = (np.arange(h, dtype=np.float32) / h)[:, None, None]
  cols = (np.arange(w, dtype=np.float32) / w)[None, :, None]
  return x @ _M + up @ _M_UP + rows * _ROW + cols * _COL


def _softmax_np(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sliding_reference(images, window, stride, pad_value=0.0, softmax=False):
  """DGCL/U2PL's `scale_crop_process` written out in NumPy (loops, explicit count)."""
  (wh, ww), (sh, sw) = window, stride
  _, h, w, _ = images.shape
  ph, pw = max(wh - h, 0), max(ww - w, 0)
  img = np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
               constant_values=pad_value)
  hp, wp = img.shape[1:3]
  total = np.zeros(img.shape[:3] + (C,), np.float64)
  count = np.zeros((hp, wp))
  for r in range(int(math.ceil((hp - wh) / sh)) + 1):
    for c in range(int(math.ceil((wp - ww) / sw)) + 1):
      y1 = min(r * sh + wh, hp) - wh
      x1 = min(c * sw + ww, wp) - ww
      out = _positional_logits_np(img[:, y1:y1 + wh, x1:x1 + ww])
      total[:, y1:y1 + wh, x1:x1 + ww] += _softmax_np(out) if softmax else out
      count[y1:y1 + wh, x1:x1 + ww] += 1
  assert count.min() >= 1
  total /= count[None, :, :, None]
  return total[:, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


def _images(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_sliding_window_starts():
  assert inference.sliding_window_starts(2048, 801, 534) == [0, 534, 1068, 1247]
  assert inference.sliding_window_starts(1024, 801, 534) == [0, 223]
  assert inference.sliding_window_starts(801, 801, 534) == [0]
  assert inference.default_stride(800) == (534, 534)  # ceil(533.3), DGCL.
  assert inference.default_stride((801, 6)) == (534, 4)
  with pytest.raises(ValueError):
    inference.sliding_window_starts(10, 4, 5)  # Stride beyond the window leaves gaps.


@pytest.mark.parametrize("size,window,stride,per_call", [
    ((13, 17), (6, 8), None, 1),    # Default stride (4, 6); sizes not multiples of it.
    ((13, 17), (6, 8), None, 4),    # 9 windows, 4 per call: one padded call.
    ((13, 17), (6, 8), (3, 5), 2),
    ((5, 17), (6, 8), None, 1),     # Shorter than the window in one axis.
    ((4, 5), (6, 8), None, 1),      # Smaller than the window.
])
def test_sliding_window_matches_numpy_reference(size, window, stride, per_call):
  images = _images((2,) + size + (3,))
  got = inference.predict_sliding_window(_positional_logits, images, window=window,
                                         stride=stride, num_classes=C,
                                         windows_per_call=per_call)
  assert got.shape == (2,) + size + (C,) and got.dtype == jnp.float32
  ref = _sliding_reference(images, window, stride or inference.default_stride(window))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_pad_value_and_softmax():
  images = _images((1, 9, 5, 3))
  got = inference.predict_sliding_window(_positional_logits, images, window=7, num_classes=C,
                                         pad_value=0.5, combine="softmax", windows_per_call=3)
  ref = _sliding_reference(images, (7, 7), (5, 5), pad_value=0.5, softmax=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


_KERNEL = np.random.default_rng(7).normal(size=(3, 3, 3, C)).astype(np.float32)


def _conv_logits(x):
  """A 3x3 SAME convolution: zero padding at the border of its input."""
  return jax.lax.conv_general_dilated(x, _KERNEL, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_sliding_window_equals_whole_when_one_window_covers():
  images = _images((2, 10, 12, 3))
  whole = inference.predict_whole(_positional_logits, images)
  got = inference.predict_sliding_window(_positional_logits, images, window=(10, 12),
                                         num_classes=C)
  np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6)
  # A larger window pads with zeros, which a zero-padded SAME conv cannot tell apart.
  whole = inference.predict_whole(_conv_logits, images)
  got = inference.predict_sliding_window(_conv_logits, images, window=16, num_classes=C)
  np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)


def _center_crop_np(images, labels, crop):
  """DGCL/U2PL's `Crop(crop_type='center')`: centred pad (0 / ignore), then centred slice."""
  (h, w), (ch, cw) = images.shape[1:3], crop
  ph, pw = max(ch - h, 0), max(cw - w, 0)
  pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
  images = np.pad(images, pads + ((0, 0),))
  labels = np.pad(labels, pads, constant_values=255)
  top, left = (images.shape[1] - ch) // 2, (images.shape[2] - cw) // 2
  return (images[:, top:top + ch, left:left + cw], labels[:, top:top + ch, left:left + cw])


@pytest.mark.parametrize("size,crop", [((11, 14), (6, 6)), ((4, 5), (7, 8)), ((4, 14), (6, 6)),
                                       ((6, 7), (6, 7))])
def test_center_crop_matches_numpy(size, crop):
  images = _images((2,) + size + (3,))
  labels = np.random.default_rng(3).integers(0, C, (2,) + size).astype(np.int32)
  ref_img, ref_lab = _center_crop_np(images, labels, crop)
  logits, got_labels = inference.predict_center_crop(lambda x: 2.0 * x[..., [0, 1, 2, 0]],
                                                     images, labels, crop)
  np.testing.assert_array_equal(got_labels, ref_lab)
  np.testing.assert_allclose(logits, 2.0 * ref_img[..., [0, 1, 2, 0]], rtol=1e-6)
  assert got_labels.dtype == jnp.int32 and logits.shape == (2,) + crop + (C,)
  if size == (4, 5):  # Padded labels are ignore, padded image pixels 0.
    assert (np.asarray(got_labels)[:, 0] == 255).all() and (np.asarray(logits)[:, 0] == 0).all()


def test_logits_at_wrong_resolution_raise():
  with pytest.raises(ValueError, match="input resolution"):
    inference.predict_whole(lambda x: x[:, ::2, ::2], _images((1, 4, 4, 3)))


def test_protocol_validation():
  with pytest.raises(ValueError, match="whole.*center_crop.*sliding_window"):
    inference.evaluate(_positional_logits, [], C, mode="slide")
  with pytest.raises(ValueError, match="crop"):
    inference.make_protocol("center_crop")
  with pytest.raises(ValueError, match="window"):
    inference.make_protocol("sliding_window")
  with pytest.raises(ValueError, match="gaps"):
    inference.make_protocol("sliding_window", window=8, stride=9)
  assert str(inference.make_protocol("sliding_window", window=801)) == (
      "sliding_window(801x801, stride 534)")
  assert str(inference.make_protocol("sliding_window", window=(6, 8), stride=(2, 3),
                                     combine="softmax")) == (
                                         "sliding_window(6x8, stride 2x3, softmax)")
  assert str(inference.make_protocol("center_crop", crop=513)) == "center_crop(513x513)"
  assert str(inference.make_protocol("center_crop", crop=(5, 6), pad_value=-1)) == (
      "center_crop(5x6, pad -1)")


# ----------------------------------------------------------------------------------------
# evaluate()


def _toy_apply(variables, images):
  return images @ variables["w"] + variables["b"]


def _toy_batches(seed=0):
  rng = np.random.default_rng(seed)
  batches = []
  for shape, valid in [((3, 8, 10), [True, True, False]), ((2, 6, 6), [True, True]),
                       ((3, 8, 10), [True, False, False])]:
    labels = rng.integers(0, C, shape).astype(np.int32)
    labels[rng.random(shape) < 0.1] = 255
    batches.append({"image": rng.normal(size=shape + (3,)).astype(np.float32),
                    "label": labels, "valid": np.array(valid)})
  return batches


def _reference_result(batches, variables, predict):
  total = np.zeros((C, C), np.int64)
  for batch in batches:
    keep = batch["valid"]
    logits, labels = predict(batch["image"][keep], batch["label"][keep], variables)
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    ok = labels != 255
    total += np.bincount(labels[ok] * C + preds[ok], minlength=C * C).reshape(C, C)
  return total


def test_evaluate_whole_end_to_end_with_padding_and_no_retrace():
  traced = chex.assert_max_traces(_toy_apply, n=2)  # Two batch shapes.
  batches = _toy_batches()
  for seed in range(2):  # New variables reuse the compiled steps.
    rng = np.random.default_rng(10 + seed)
    variables = {"w": rng.normal(size=(3, C)).astype(np.float32),
                 "b": rng.normal(size=(C,)).astype(np.float32)}
    out = inference.evaluate(traced, batches, C, mode="whole", variables=variables)
    ref = _reference_result(batches, variables,
                            lambda x, y, v: (x @ v["w"] + v["b"], y))
    np.testing.assert_array_equal(out["confusion_matrix"], ref)
    expected = metrics.iou_from_confusion(ref)
    np.testing.assert_allclose(out["miou"], expected["miou"], rtol=1e-12)
    np.testing.assert_allclose(out["per_class_iou"], expected["per_class_iou"], rtol=1e-12)
    assert out["mode"] == "whole" and out["num_images"] == 5
    assert out["num_unknown_label_pixels"] == 0
    # Padded examples would change the result if they were counted.
    assert out["confusion_matrix"].sum() < sum((b["label"] != 255).sum() for b in batches)


def test_evaluate_sliding_window_and_center_crop():
  batches = _toy_batches(1)
  fn = lambda images: _positional_logits(images)  # noqa: E731

  out = inference.evaluate(fn, batches, C, mode="sliding_window", window=(5, 6),
                           windows_per_call=2)
  ref = _reference_result(batches, None, lambda x, y, v: (
      _sliding_reference(x, (5, 6), inference.default_stride((5, 6))), y))
  np.testing.assert_array_equal(out["confusion_matrix"], ref)
  assert out["mode"] == "sliding_window(5x6, stride 4)"

  out = inference.evaluate(fn, batches, C, mode="center_crop", crop=7)

  def crop_then_predict(x, y, _):
    x, y = _center_crop_np(x, y, (7, 7))
    return _positional_logits_np(x), y

  ref = _reference_result(batches, None, crop_then_predict)
  np.testing.assert_array_equal(out["confusion_matrix"], ref)
  assert out["mode"] == "center_crop(7x7)"


def test_evaluate_warns_on_labels_outside_the_classes():
  batch = _toy_batches()[1]
  batch["label"] = batch["label"].copy()
  batch["label"][0, 0, :3] = 33  # e.g. a Cityscapes labelId where a trainId was expected.
  with pytest.warns(UserWarning, match="labelTrainIds"):
    out = inference.evaluate(lambda x: _positional_logits(x), [batch], C, mode="whole")
  assert out["num_unknown_label_pixels"] == 3


def test_evaluate_on_a_device_mesh(mesh8):
  """Batches sharded over the `data` mesh and replicated variables give the same counts."""
  rng = np.random.default_rng(5)
  variables = {"w": rng.normal(size=(3, C)).astype(np.float32),
               "b": rng.normal(size=(C,)).astype(np.float32)}
  batch = {"image": rng.normal(size=(8, 6, 5, 3)).astype(np.float32),
           "label": rng.integers(0, C, (8, 6, 5)).astype(np.int32),
           "valid": np.arange(8) < 6}
  ref = inference.evaluate(_toy_apply, [batch], C, mode="sliding_window", window=4,
                           variables=variables)
  data, replicated = NamedSharding(mesh8, P("data")), NamedSharding(mesh8, P())
  sharded = {k: jax.device_put(v, data) for k, v in batch.items()}
  out = inference.evaluate(_toy_apply, [sharded], C, mode="sliding_window", window=4,
                           variables=jax.device_put(variables, replicated))
  np.testing.assert_array_equal(out["confusion_matrix"], ref["confusion_matrix"])
  assert out["num_images"] == 6
