"""The embedded dataset: deterministic, valid labels, disjoint train/val digits, splits."""

import numpy as np
import pytest

from semijax.data import datasets, embedded, sources

SMALL = embedded.SceneConfig(canvas=32, num_train=64, num_val=16, digit_size=(14, 22))


def test_generation_is_deterministic_and_labels_are_valid():
  a = embedded.generate.__wrapped__(SMALL)
  b = embedded.generate.__wrapped__(SMALL)
  for part in ("train", "val"):
    np.testing.assert_array_equal(a[part][0], b[part][0])
    np.testing.assert_array_equal(a[part][1], b[part][1])
    images, labels = a[part]
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    assert labels.max() < len(embedded.CLASS_NAMES)
  # Every scene has a digit and a background.
  assert all(0 < (lab > 0).mean() < 1 for lab in a["train"][1])


def test_a_different_seed_gives_different_scenes():
  a = embedded.generate.__wrapped__(SMALL)
  b = embedded.generate.__wrapped__(embedded.SceneConfig(**{**SMALL.__dict__, "seed": 1}))
  assert not np.array_equal(a["train"][0], b["train"][0])


def test_default_benchmark_sizes():
  cfg = embedded.SceneConfig()
  assert cfg.num_train >= 3000 and cfg.num_val >= 500


@pytest.mark.parametrize("split", datasets.FRACTIONS)
def test_fraction_splits_are_disjoint_nested_and_sized(split):
  n = 3200
  frac = datasets.parse_fraction(split)
  lab, unl = datasets.splits.fraction_split(n, frac, seed=3)
  assert len(lab) == max(1, round(n * frac)) and len(np.intersect1d(lab, unl)) == 0
  assert len(lab) + len(unl) == n
  smaller, _ = datasets.splits.fraction_split(n, frac / 2, seed=3)
  assert np.isin(smaller, lab).all()
  other, _ = datasets.splits.fraction_split(n, frac, seed=4)
  assert frac == 1.0 or not np.array_equal(other, lab)


def test_bad_split_names_the_valid_choices():
  with pytest.raises(ValueError, match="1/16"):
    datasets.parse_fraction("1/0")
  with pytest.raises(ValueError, match="expected a fraction"):
    datasets.parse_fraction("half")


def test_out_of_range_label_names_the_record():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  labels = np.zeros((2, 4, 4), np.uint8)
  labels[1, 0, 0] = 12
  src = sources.ArraySource(images, labels, embedded.INFO)
  src[0]
  with pytest.raises(sources.DataError, match=r"embedded_digits\[1\].*\[12\]"):
    src[1]
