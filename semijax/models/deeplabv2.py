"""DeepLabv2 (Chen et al., TPAMI 2017) without multi-scale inputs: Alonso et al.'s main model.

Layout:

  ResNet-101 at output stride 8 (layer3 dilation 2, layer4 dilation 4)          = 'encoder'
  -> ASPP classifier: sum over rates r of 3x3 conv (2048 -> C, dilation r, bias)  = 'logits'
     with rates (6, 12, 18, 24), all four summed.

The official code (`Shathe/SemiSeg-Contrastive`, `model/deeplabv2*.py`, from ClassMix) returns
from inside the summing loop, so only the rates 6 and 12 contribute; we sum the four branches
of the published DeepLabv2 (`aspp_rates=(6, 12)` gives the official head). The features the
per-pixel heads read ('decoder', Alonso et al.'s V = f(x)) are layer4's 2048-d map at stride
8, where the logits also are (callers upsample with `ops.resize_bilinear`).

The output dict has `DeepLabV3Plus`'s keys where they apply ('logits', 'decoder', 'encoder',
'low_level', 'layer3', one per extra head), and `encode` / `decode` split the forward the
same way, so methods and heads written for DeepLabv3+ run unchanged.

Backbone: the torchvision (ImageNet) bottleneck layout, stride in the 3x3 conv, which is the
official `deeplabv2_imagenet.py`. Its COCO-pretrained variant (`deeplabv2.py`) strides in the
first 1x1 conv (Caffe ResNet) and freezes every BatchNorm's affine parameters; neither is
reproduced here (BUILD_NOTES, Alonso).
"""

from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from semijax.models import layers

Dtype = Any
DEFAULT_RATES = (6, 12, 18, 24)


class ASPPClassifier(nn.Module):
  """DeepLabv2's classifier: the sum of one dilated 3x3 conv (with bias) per rate.

  Attributes:
    num_classes: outputs.
    rates: dilation of each branch.
    dtype: compute dtype.
  """
  num_classes: int
  rates: Sequence[int] = DEFAULT_RATES
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, h, w, C_in]` -> `[B, h, w, num_classes]`."""
    if not self.rates:
      raise ValueError("ASPPClassifier needs at least one rate")
    # Official initialisation: weights N(0, 0.01).
    init = nn.initializers.normal(0.01)
    out = None
    for i, r in enumerate(self.rates):
      y = layers.conv(self.num_classes, 3, dilation=r, use_bias=True, dtype=self.dtype,
                      kernel_init=init, name=f"branch{i}")(x)
      out = y if out is None else out + y
    return out


class DeepLabV2(nn.Module):
  """DeepLabv2 segmenter: `encode` (normalise + backbone), then `decode`.

  Attributes:
    num_classes: classifier outputs.
    backbone: a module mapping `[B, H, W, 3]` to a dict with 'layer1' and 'layer4' (e.g.
      `resnet.resnet101(output_stride=8)`).
    aspp_rates: dilations of the summed classifier branches ((6, 12, 18, 24); the official
      code's effective head is (6, 12)).
    heads: extra per-pixel heads by output name, as `DeepLabV3Plus.heads` ('decoder' is the
      layer4 feature map here).
    mean: RGB mean subtracted from `[0, 1]` images; None skips normalisation.
    std: RGB std divided by.
    dtype: compute dtype of the classifier (the backbone has its own).
  """
  num_classes: int
  backbone: nn.Module
  aspp_rates: Sequence[int] = DEFAULT_RATES
  heads: Optional[Mapping[str, nn.Module]] = None
  mean: Optional[Sequence[float]] = layers.IMAGENET_MEAN
  std: Optional[Sequence[float]] = layers.IMAGENET_STD
  dtype: Optional[Dtype] = None

  def setup(self):
    self.classifier = ASPPClassifier(self.num_classes, tuple(self.aspp_rates), dtype=self.dtype)

  def encode(self, x: jax.typing.ArrayLike, train: bool = False) -> Dict[str, jax.Array]:
    """Normalises `[B, H, W, 3]` images in [0, 1] and runs the backbone (its dict)."""
    x = jnp.asarray(x, jnp.float32)
    if self.mean is not None:
      x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    return self.backbone(x, train=train)

  def decode(self, features: Mapping[str, jax.Array], train: bool = False) -> Dict[str, jax.Array]:
    """Classifier and heads on `encode`'s features.

    Returns:
      'logits' `[B, H/8, W/8, num_classes]`, 'decoder' = 'encoder' = layer4 `[B, H/8, W/8,
      2048]`, 'low_level' (= layer1), 'layer3' when present, and one entry per extra head.
    """
    encoder = features["layer4"]
    out = {"logits": self.classifier(encoder), "decoder": encoder, "encoder": encoder,
           "low_level": features["layer1"]}
    if "layer3" in features:
      out["layer3"] = features["layer3"]
    for name, head in (self.heads or {}).items():
      if name in out:
        raise ValueError(f"head name {name!r} clashes with a built-in output")
      if head.source not in out:
        raise KeyError(f"head {name!r} reads {head.source!r}; available: {sorted(out)}")
      out[name] = head(out[head.source], train=train)
    return out

  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> Dict[str, jax.Array]:
    """`decode(encode(x))`."""
    return self.decode(self.encode(x, train=train), train=train)
