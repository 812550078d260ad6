"""DeepLabv3+ as in DGCL/U2PL's `dec_deeplabv3_plus`, with named extra heads.

Layout (defaults = DGCL; U2PL/CSC differ only in `low_level_channels=256`):

  layer4 -> ASPP: [image pool -> 1x1, 1x1, 3x3 r1, 3x3 r2, 3x3 r3] each conv-BN-ReLU
            (`aspp_channels`), concatenated in that order -> `aspp_project_kernel` conv
            (3x3 in U2PL/DGCL, 1x1 in the original paper, CAC and UniMatch/DSSN) -> BN
            -> ReLU -> Dropout2d(`aspp_dropout`)                               = 'aspp'
  layer1 -> 1x1 conv (`low_level_channels`, with bias as in U2PL) -> BN -> ReLU
  concat([low, upsample(aspp)])  (align-corners bilinear to layer1's size)      = 'concat'
  -> 2 x [3x3 conv (`decoder_channels`, bias) -> BN -> ReLU -> Dropout2d(0.1)]   = 'decoder'
  -> [Dropout(`classifier_dropout`)] -> 1x1 conv (num_classes)                 = 'logits'

'decoder' is DGCL's `fts`; 'concat' is what U2PL/CSC's representation head reads.
Logits stay at stride 4 (callers upsample with `ops.resize_bilinear`) and in the compute
dtype (losses cast to float32). Dropout is channel-wise like PyTorch's `Dropout2d`
unless `dropout_2d=False`.

Other codebases' decoders as configurations:
  * UniMatch (DSSN builds on it): `aspp_project_kernel=1, aspp_dropout=0, decoder_dropout=0,
    decoder_bias=False` (ASPP concat order differs: pool last; matters only for loading
    their checkpoints).
  * CAC (`models/modeling`): `aspp_project_kernel=1, aspp_dropout=0.5,
    decoder_dropout=(0.5, 0.0), classifier_dropout=0.1, decoder_bias=False,
    dropout_2d=False`, and it concatenates [ASPP, low-level] (ours: [low-level, ASPP]).
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from semijax import ops
from semijax.models import layers

Dtype = Any


def default_aspp_rates(output_stride: int) -> tuple:
  """(6, 12, 18) at output stride 16, (12, 24, 36) at 8; scaled likewise otherwise."""
  return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with U2PL's branch order.

  Attributes:
    channels: channels of every branch and of the output.
    rates: the three atrous rates.
    project_kernel: kernel of the conv fusing the five branches (3 in U2PL/DGCL).
    dropout: dropout rate after the fusion.
    dropout_2d: channel-wise (True) or element-wise dropout.
    dtype: compute dtype.
    bn_axis_name: SyncBN axis, see `layers.BatchNorm`.
    bn_batch_groups: per-group BN statistics, see `layers.BatchNorm`.
  """
  channels: int = 256
  rates: Sequence[int] = (6, 12, 18)
  project_kernel: int = 3
  dropout: float = 0.1
  dropout_2d: bool = True
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  bn_batch_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`[B, h, w, C_in]` -> `[B, h, w, channels]`."""
    if len(self.rates) != 3:
      raise ValueError(f'ASPP needs three atrous rates, got {tuple(self.rates)}')

    def branch(inputs, kernel, dilation, name):
      y = layers.conv(self.channels, kernel, dilation=dilation, dtype=self.dtype,
                      name=f'{name}_conv')(inputs)
      y = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                           axis_name=self.bn_axis_name, batch_groups=self.bn_batch_groups,
                           name=f'{name}_bn')(y)
      return nn.relu(y)

    # Mean in float32; upsampling a 1x1 map with align_corners is a broadcast.
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    pooled = branch(pooled, 1, 1, 'pool')
    feats = [jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[3:]), branch(x, 1, 1, 'b0')]
    feats += [branch(x, 3, r, f'b{i + 1}') for i, r in enumerate(self.rates)]
    y = branch(jnp.concatenate(feats, axis=-1), self.project_kernel, 1, 'project')
    return layers.channel_dropout(self.dropout, channelwise=self.dropout_2d)(
        y, deterministic=not train)


class FCNHead(nn.Module):
  """U2PL's `Aux_Module`: 3x3 conv (bias) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv.

  Attributes:
    num_classes: output channels.
    channels: hidden channels.
    dropout: channel-dropout rate.
    dtype: compute dtype.
    bn_axis_name: SyncBN axis.
    bn_batch_groups: per-group BN statistics.
  """
  num_classes: int
  channels: int = 256
  dropout: float = 0.1
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  bn_batch_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`[B, h, w, C_in]` -> `[B, h, w, num_classes]`."""
    y = layers.conv(self.channels, 3, use_bias=True, dtype=self.dtype, name='conv')(x)
    y = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                         axis_name=self.bn_axis_name, batch_groups=self.bn_batch_groups,
                         name='bn')(y)
    y = layers.channel_dropout(self.dropout)(nn.relu(y), deterministic=not train)
    return layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                       name='classifier')(y)


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+ segmenter: `encode` (normalise + backbone), then `decode`.

  Attributes:
    num_classes: classifier outputs.
    backbone: a module mapping `[B, H, W, 3]` to a dict with 'layer1', 'layer3' and
      'layer4' (e.g. `resnet.ResNet`); it must have an `output_stride` attribute when
      `aspp_rates` is None.
    aspp_channels: channels of the ASPP branches and output.
    aspp_rates: three atrous rates; None = `default_aspp_rates(backbone.output_stride)`.
    aspp_project_kernel: kernel of the ASPP fusion conv (3 = U2PL/DGCL, 1 = paper/UniMatch).
    aspp_dropout: channel dropout after the ASPP fusion (0.1 in U2PL/DGCL).
    low_level_channels: layer1 projection width (48 = DGCL/paper, 256 = U2PL/CSC).
    decoder_channels: width of the two 3x3 decoder convs (the 'decoder' feature).
    decoder_dropout: dropout after each decoder conv: one rate for both (0.1 in
      U2PL/DGCL) or a pair.
    classifier_dropout: dropout before the 1x1 classifier (0 in U2PL/DGCL, 0.1 in CAC).
    dropout_2d: channel-wise (`Dropout2d`, U2PL/DGCL) or element-wise (CAC) dropout in the
      ASPP and decoder.
    decoder_bias: bias in the low-level and decoder convs (True in U2PL/DGCL).
    aux_head: add an FCN head on layer3 returning 'aux_logits' (Cityscapes recipes).
    aux_channels: hidden width of the auxiliary head.
    heads: extra per-pixel heads by output name; each has a `source` attribute naming the
      feature it reads (any key of `decode`'s output, including an earlier head's) and
      is called as `head(features[source], train=train)`; heads run in dict order.
    mean: RGB mean subtracted from `[0, 1]` images first; None skips normalisation.
    std: RGB std divided by.
    dtype: compute dtype of the head (the backbone has its own `dtype`).
    bn_axis_name: SyncBN axis of the head's BatchNorms.
    bn_batch_groups: per-group BN statistics of the head's BatchNorms.
  """
  num_classes: int
  backbone: nn.Module
  aspp_channels: int = 256
  aspp_rates: Optional[Sequence[int]] = None
  aspp_project_kernel: int = 3
  aspp_dropout: float = 0.1
  low_level_channels: int = 48
  decoder_channels: int = 256
  decoder_dropout: Union[float, Sequence[float]] = 0.1
  classifier_dropout: float = 0.0
  dropout_2d: bool = True
  decoder_bias: bool = True
  aux_head: bool = False
  aux_channels: int = 256
  heads: Optional[Mapping[str, nn.Module]] = None
  mean: Optional[Sequence[float]] = layers.IMAGENET_MEAN
  std: Optional[Sequence[float]] = layers.IMAGENET_STD
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  bn_batch_groups: int = 1

  def setup(self):
    rates = self.aspp_rates
    if rates is None:
      rates = default_aspp_rates(self.backbone.output_stride)
    bn = dict(dtype=self.dtype, axis_name=self.bn_axis_name, batch_groups=self.bn_batch_groups)
    self.aspp = ASPP(self.aspp_channels, tuple(rates), self.aspp_project_kernel,
                     self.aspp_dropout, self.dropout_2d, dtype=self.dtype,
                     bn_axis_name=self.bn_axis_name, bn_batch_groups=self.bn_batch_groups)
    self.low_conv = layers.conv(self.low_level_channels, 1, use_bias=self.decoder_bias,
                                dtype=self.dtype)
    self.low_bn = layers.BatchNorm(**bn)
    self.fuse1_conv = layers.conv(self.decoder_channels, 3, use_bias=self.decoder_bias,
                                  dtype=self.dtype)
    self.fuse1_bn = layers.BatchNorm(**bn)
    self.fuse2_conv = layers.conv(self.decoder_channels, 3, use_bias=self.decoder_bias,
                                  dtype=self.dtype)
    self.fuse2_bn = layers.BatchNorm(**bn)
    drop = self.decoder_dropout
    drop = (drop, drop) if isinstance(drop, (int, float)) else tuple(drop)
    self.fuse1_dropout, self.fuse2_dropout, self.classifier_dropout_layer = [
        layers.channel_dropout(r, channelwise=self.dropout_2d)
        for r in drop + (self.classifier_dropout,)]
    self.classifier = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype)
    if self.aux_head:
      self.aux = FCNHead(self.num_classes, self.aux_channels, dtype=self.dtype,
                         bn_axis_name=self.bn_axis_name, bn_batch_groups=self.bn_batch_groups)

  def encode(self, x: jax.typing.ArrayLike, train: bool = False) -> Dict[str, jax.Array]:
    """Normalises images and runs the backbone.

    Args:
      x: `[B, H, W, 3]` float RGB in [0, 1] (already normalised if `mean` is None).
      train: BN batch statistics (and `batch_stats` updates) when True.

    Returns:
      The backbone's dict: 'stem', 'layer1' `[B, H/4, W/4, C1]`, ..., 'layer4'
      `[B, H/os, W/os, C4]`.
    """
    x = jnp.asarray(x, jnp.float32)
    if self.mean is not None:
      x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    return self.backbone(x, train=train)

  def decode(self, features: Mapping[str, jax.Array], train: bool = False) -> Dict[str, jax.Array]:
    """Runs ASPP, decoder, classifier and heads on (possibly modified) backbone features.

    Args:
      features: `encode`'s dict; 'layer1' and 'layer4' are read, and 'layer3' when
        `aux_head` is set. DSSN passes channel-dropped copies here.
      train: BN batch statistics and dropout (rng collection 'dropout') when True.

    Returns:
      A flat dict: 'logits' `[B, h, w, num_classes]` (h, w = layer1's size, stride 4),
      'decoder' `[B, h, w, decoder_channels]`, 'concat' `[B, h, w, low + aspp]`,
      'aspp' `[B, H/os, W/os, aspp_channels]`, 'encoder' (= layer4), 'low_level'
      (= layer1), 'layer3', optional 'aux_logits' `[B, H/os', W/os', num_classes]`, and
      one entry per extra head.
    """
    low_level, encoder = features['layer1'], features['layer4']
    aspp = self.aspp(encoder, train=train)
    low = nn.relu(self.low_bn(self.low_conv(low_level), use_running_average=not train))
    up = ops.resize_bilinear(aspp, low.shape[1:3], align_corners=True)
    concat = jnp.concatenate([low, up.astype(low.dtype)], axis=-1)
    y = concat
    for conv, bn, dropout in ((self.fuse1_conv, self.fuse1_bn, self.fuse1_dropout),
                              (self.fuse2_conv, self.fuse2_bn, self.fuse2_dropout)):
      y = dropout(nn.relu(bn(conv(y), use_running_average=not train)), deterministic=not train)
    logits = self.classifier(self.classifier_dropout_layer(y, deterministic=not train))
    out = {'logits': logits, 'decoder': y, 'concat': concat, 'aspp': aspp,
           'encoder': encoder, 'low_level': low_level}
    if 'layer3' in features:
      out['layer3'] = features['layer3']
    if self.aux_head:
      out['aux_logits'] = self.aux(features['layer3'], train=train)
    for name, head in (self.heads or {}).items():
      if name in out:
        raise ValueError(f'head name {name!r} clashes with a built-in output')
      if head.source not in out:
        raise KeyError(f'head {name!r} reads {head.source!r}; available: {sorted(out)}')
      out[name] = head(out[head.source], train=train)
    return out

  def __call__(self, x: jax.typing.ArrayLike, train: bool = False) -> Dict[str, jax.Array]:
    """`decode(encode(x))`; see `decode` for the returned dict."""
    return self.decode(self.encode(x, train=train), train=train)
