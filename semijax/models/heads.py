"""Per-pixel heads that methods attach to `DeepLabV3Plus(heads={name: head})`.

Every head has a `source` attribute naming the model output it reads ('decoder' by
default) and is called as `head(x, train=train)` on `[B, H, W, C]` features; its output
appears in the model's dict under its name.

  * `PixelMLP`: Linear -> BN -> ReLU -> Linear per pixel. DGCL's `rep` (on 'decoder', 256
    -> 256 -> 256) and Alonso et al.'s projection / prediction heads. BatchNorm1d over the
    flattened pixels is BN over (B, H, W), which is what `layers.BatchNorm` does.
  * `ConvProjection`: 1x1 conv -> ReLU -> 1x1 conv, no BN. CAC's projector (256 -> 128).
  * `RepresentationHead`: [3x3 conv -> BN -> ReLU -> Dropout2d] x num_blocks -> 1x1 conv.
    U2PL/CSC's `representation`, which reads the decoder's input concat ('concat',
    low-level + ASPP, 512 channels with U2PL's 256-channel low-level projection) with two
    blocks.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from semijax.models import layers

Dtype = Any


class PixelMLP(nn.Module):
  """Dense(hidden) -> [BN] -> activation -> Dense(out), applied to every pixel.

  Attributes:
    hidden: hidden width.
    out: output width.
    norm: BatchNorm after the first layer.
    activation: nonlinearity (ReLU; Alonso's class selectors use leaky ReLU 0.2).
    source: model output to read.
    dtype: compute dtype.
    bn_axis_name: SyncBN axis, see `layers.BatchNorm`.
    bn_batch_groups: per-group BN statistics, see `layers.BatchNorm`.
  """
  hidden: int = 256
  out: int = 256
  norm: bool = True
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  source: str = 'decoder'
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  bn_batch_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`[B, H, W, C]` (or `[N, C]`) -> `[B, H, W, out]` (or `[N, out]`)."""
    y = nn.Dense(self.hidden, use_bias=True, dtype=self.dtype, name='fc1')(x)
    if self.norm:
      y = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                           axis_name=self.bn_axis_name, batch_groups=self.bn_batch_groups,
                           name='bn')(y)
    y = self.activation(y)
    return nn.Dense(self.out, dtype=self.dtype, name='fc2')(y)


class ConvProjection(nn.Module):
  """1x1 conv -> ReLU -> 1x1 conv (both with bias), no normalisation (CAC).

  Attributes:
    hidden: hidden width.
    out: output width.
    source: model output to read.
    dtype: compute dtype.
  """
  hidden: int = 256
  out: int = 128
  source: str = 'decoder'
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H, W, out]`; `train` is unused."""
    del train
    y = nn.relu(layers.conv(self.hidden, 1, use_bias=True, dtype=self.dtype, name='conv1')(x))
    return layers.conv(self.out, 1, use_bias=True, dtype=self.dtype, name='conv2')(y)


class RepresentationHead(nn.Module):
  """U2PL's representation head: conv-BN-ReLU-Dropout2d blocks, then a 1x1 conv.

  Attributes:
    channels: width of the 3x3 convs.
    out: output width.
    num_blocks: number of 3x3 blocks (2 in U2PL/CSC).
    dropout: channel-dropout rate after each block.
    source: model output to read ('concat' as in U2PL).
    dtype: compute dtype.
    bn_axis_name: SyncBN axis.
    bn_batch_groups: per-group BN statistics.
  """
  channels: int = 256
  out: int = 256
  num_blocks: int = 2
  dropout: float = 0.1
  source: str = 'concat'
  dtype: Optional[Dtype] = None
  bn_axis_name: Optional[str] = None
  bn_batch_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H, W, out]`."""
    for i in range(self.num_blocks):
      x = layers.conv(self.channels, 3, use_bias=True, dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                           axis_name=self.bn_axis_name, batch_groups=self.bn_batch_groups,
                           name=f'bn{i + 1}')(x)
      x = layers.channel_dropout(self.dropout)(nn.relu(x), deterministic=not train)
    return layers.conv(self.out, 1, use_bias=True, dtype=self.dtype, name='out')(x)
