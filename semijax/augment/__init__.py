"""On-device augmentation: photometric strong views, CutMix/ClassMix, feature dropout.

Geometric augmentation (scale, crop, flip) happens on the host in the data pipeline; what is
here runs per image inside the jitted train step from a JAX key. The mixing function itself
is `semijax.augment.mix.mix(mask, a, b)` (the name `mix` here is the module).
"""

from semijax.augment import alonso as alonso, feature, mix, photometric
from semijax.augment.feature import channel_dropout
from semijax.augment.mix import (
  apply_batch_prob,
  classmix_mask,
  cutmix_box,
  cutmix_box_u2pl,
  roll_batch,
)
from semijax.augment.photometric import (
  color_jitter,
  gaussian_blur,
  random_grayscale,
  random_photometric_ops,
  strong_augment,
)

__all__ = [
    "feature", "mix", "photometric", "channel_dropout", "apply_batch_prob", "classmix_mask",
    "cutmix_box", "cutmix_box_u2pl", "roll_batch", "color_jitter",
    "gaussian_blur", "random_grayscale", "random_photometric_ops", "strong_augment",
]
