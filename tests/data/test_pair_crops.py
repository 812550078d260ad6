"""CAC's overlapping two-crop sampler: the overlap maps the same pixels (unique pixel values),
offsets are multiples of the stride, IoU within range, padding, flips, extra label fields."""

import jax.numpy as jnp
import numpy as np
import pytest

from semijax.data import pair_crops
from semijax.sampling import overlap


def unique_image(h, w):
  """Every pixel a distinct value: id = row * w + col in the low two channels."""
  ids = np.arange(h * w, dtype=np.int64).reshape(h, w)
  image = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
  return image, ids


def decode(image):
  return image[..., 0].astype(np.int64) + 256 * image[..., 1].astype(np.int64)


def record(h, w, **extra):
  image, ids = unique_image(h, w)
  return dict(image=image, label=np.full((h, w), 255, np.uint8), index=np.int64(3), **extra), ids


@pytest.mark.parametrize("seed", range(40))
def test_overlap_maps_the_same_pixels(seed):
  stride, crop = 8, 48
  transform = pair_crops.PairCrops(crop_size=crop, scale_range=(1.0, 1.0), stride=stride)
  rec, ids = record(90, 130)
  out = transform.random_map(rec, np.random.default_rng(seed))
  boxes, flips = out["pair_boxes"], out["pair_flips"]
  assert out["image"].shape == out["image2"].shape == (crop, crop, 3)
  assert out["pair_stride"] == stride
  np.testing.assert_array_equal((boxes[1, :2] - boxes[0, :2]) % stride, 0)
  iou = pair_crops.crop_iou(*(boxes[1, :2] - boxes[0, :2]), crop)
  assert 0.1 <= iou <= 1.0
  # Each crop is the image's window (flipped back where it was flipped).
  for view, key in enumerate(("image", "image2")):
    top, left, bottom, right = boxes[view]
    pixels = decode(out[key])
    if flips[view]:
      pixels = pixels[:, ::-1]
    np.testing.assert_array_equal(pixels, ids[top:bottom, left:right])

  # Feature-resolution alignment: the "feature" of a block is the set of its pixel ids, which
  # a flip does not change (min over the block), so view 1 and the aligned view 2 must agree on
  # every pair, and the pairs must cover exactly the overlap.
  def block_min(x):
    x = decode(x)
    return x.reshape(crop // stride, stride, crop // stride, stride).min(axis=(1, 3))

  f1 = jnp.asarray(block_min(out["image"])[None, ..., None])
  f2 = jnp.asarray(block_min(out["image2"])[None, ..., None])
  a, b, valid = overlap.pair_views(f1, f2, boxes[None], flips[None], stride=stride)
  a, b, valid = np.asarray(a)[0, ..., 0], np.asarray(b)[0, ..., 0], np.asarray(valid)[0]
  np.testing.assert_array_equal(a[valid], b[valid])
  (dy, dx) = (boxes[1, :2] - boxes[0, :2])
  assert valid.sum() == (crop - abs(dy)) * (crop - abs(dx)) // stride ** 2
  # And nothing outside the overlap is paired: the mismatch is everywhere else.
  assert np.all(a[~valid] != b[~valid]) or valid.all()


def test_padding_and_hidden_and_extra_fields_travel_with_the_crops():
  stride, crop = 4, 32
  rng = np.random.default_rng(0)
  hidden = rng.integers(0, 5, (20, 60)).astype(np.uint8)
  weak = rng.integers(0, 5, (20, 60)).astype(np.uint8)
  rec, ids = record(20, 60, hidden_label=hidden, weak_label=weak)
  transform = pair_crops.PairCrops(crop_size=crop, scale_range=(1.0, 1.0), stride=stride)
  for seed in range(10):
    out = transform.random_map(rec, np.random.default_rng(seed))
    assert out["hidden_label"].shape == (crop, crop, 2)
    for view, (key, pad_key, weak_key) in enumerate((("image", "pad", "weak_label"),
                                                     ("image2", "pad2", "weak_label2"))):
      top, left, _, _ = out["pair_boxes"][view]
      assert top == 0          # the image (20 rows) is padded to the crop: one vertical position
      flip = out["pair_flips"][view]
      unflip = (lambda x: x[:, ::-1]) if flip else (lambda x: x)
      pad = unflip(out[pad_key])
      assert pad[20:].all() and not pad[:20].any()
      pixels = unflip(decode(out[key]))[:20]
      np.testing.assert_array_equal(pixels, ids[:, left:left + crop])
      np.testing.assert_array_equal(unflip(out["hidden_label"][..., view])[:20],
                                    hidden[:, left:left + crop])
      np.testing.assert_array_equal(unflip(out["hidden_label"][..., view])[20:], 255)
      np.testing.assert_array_equal(unflip(out[weak_key])[:20], weak[:, left:left + crop])
      np.testing.assert_array_equal(out["label"], 255)
    # Blocks touching padding never pair.
    valid = overlap.valid_blocks(~jnp.stack([jnp.asarray(out["pad"])]), stride)
    assert not np.asarray(valid)[0, 5:].any() and np.asarray(valid)[0, :5].all()


def test_iou_range_and_fallback():
  rng = np.random.default_rng(0)
  ious, tries = [], []
  for _ in range(300):
    (y1, x1), (y2, x2), k = pair_crops.sample_pair_boxes(rng, 200, 300, 64, stride=8,
                                                         iou_range=(0.3, 0.7))
    iou = pair_crops.crop_iou(y2 - y1, x2 - x1, 64)
    assert (y2 - y1) % 8 == 0 and (x2 - x1) % 8 == 0
    assert 0 <= y2 <= 200 - 64 and 0 <= x2 <= 300 - 64
    if k <= 50:
      assert 0.3 <= iou <= 0.7
      ious.append(iou)
    else:       # 50 failed draws: crop 2 = crop 1 (official)
      assert (y1, x1) == (y2, x2)
    tries.append(k)
  assert min(ious) < 0.5 < max(ious) and len(ious) > 200
  # [1, 1]: no context change, the two crops are identical.
  for _ in range(20):
    a, b, _ = pair_crops.sample_pair_boxes(rng, 200, 300, 64, iou_range=(1.0, 1.0))
    assert a == b
  # An image less than a stride larger than the crop: crop 2 stays inside.
  for _ in range(50):
    (y1, x1), (y2, x2), _ = pair_crops.sample_pair_boxes(rng, 67, 70, 64, stride=8)
    assert 0 <= y2 <= 3 and 0 <= x2 <= 6 and (y2 - y1) % 8 == 0 and (x2 - x1) % 8 == 0


def test_resize_with_base_size_and_errors():
  rec, _ = record(100, 150)
  transform = pair_crops.PairCrops(crop_size=32, scale_range=(0.8, 2.0), base_size=40,
                                   stride=8)
  for seed in range(5):
    out = transform.random_map(rec, np.random.default_rng(seed))
    bottom = out["pair_boxes"][:, 2].max()
    right = out["pair_boxes"][:, 3].max()
    assert bottom <= 80 and right <= 80 and out["image"].shape == (32, 32, 3)
  with pytest.raises(ValueError, match="multiple of stride"):
    pair_crops.PairCrops(crop_size=30, stride=8)
  with pytest.raises(ValueError, match="iou_range"):
    pair_crops.PairCrops(crop_size=32, iou_range=(0.5, 0.2))
