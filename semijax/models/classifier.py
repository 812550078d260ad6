"""An image classifier around a segmentation backbone, for backbone pretraining.

`ImageClassifier` normalises like `DeepLabV3Plus.encode`, runs the same backbone under the same
parameter scope ('backbone'), global-average-pools its last stage and applies a linear layer:
the ImageNet-classifier setting the papers' backbones come from. Its backbone weights are
written with `weights.save_torchvision_safetensors` and load into a segmenter with
`weights.load_backbone` (`fc` is the classifier, not loaded), as torchvision's.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semijax.models import layers


class ImageClassifier(nn.Module):
  """`[B, H, W, 3]` float images in [0, 1] -> `[B, num_classes]` float32 logits.

  Attributes:
    num_classes: outputs.
    backbone: a module returning a dict with 'layer4' (e.g. `resnet.ResNet`).
    mean, std: ImageNet normalisation, as `DeepLabV3Plus` (None skips it).
  """
  num_classes: int
  backbone: nn.Module
  mean: Optional[Sequence[float]] = layers.IMAGENET_MEAN
  std: Optional[Sequence[float]] = layers.IMAGENET_STD

  @nn.compact
  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if self.mean is not None:
      x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    features = self.backbone(x, train=train)["layer4"]
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(pooled)
