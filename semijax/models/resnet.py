"""ResNet backbones (torchvision v1.5 layout) with dilation, multi-grid and three stems.

Parameter names follow torchvision so that state dicts map one to one (see `weights.py`):
a torch key `layer3.4.downsample.1.running_var` is the flax path
`('layer3_4', 'downsample_1', 'var')`, i.e. every `.` inside a module name becomes `_`.

Scanned blocks (`scan_blocks=True`, the default): within a stage, blocks 1..n-1 have identical
shapes, and each run of them with one dilation is a single `nn.scan` over a stacked block
(`('layer3_scan1', 'conv1', 'kernel')` of shape `[22, 1, 1, 1024, 256]` holds torch's
`layer3.1.conv1.weight` ... `layer3.22.conv1.weight`), so XLA compiles one block body per run
instead of one per block: ResNet-101's 33 bottlenecks compile as 4 first blocks and 4 scanned
bodies. Block 0 of a stage (stride, projection shortcut, the previous stage's dilation) and
runs of a single block (multi-grid layer4) stay unscanned under their torchvision names.
`weights.unstack_blocks` / `weights.stack_blocks` convert between the two layouts, and the
torchvision loader and writer go through them, so checkpoints keep torchvision's names.

Rematerialisation (`remat`): 'none'; 'blocks' checkpoints every residual block keeping only
its convolution outputs (BatchNorm and ReLU are recomputed in the backward pass, no
convolution is); 'full' keeps only each block's input (the whole forward of a block is
recomputed in the backward pass, about one extra backbone forward). The stem is never
rematerialised (its modules sit directly in the backbone's namespace).

Stems:
  * 'torchvision': 7x7/2 conv (64), BN, ReLU, 3x3/2 max-pool. CAC, Alonso's DeepLabv3+.
  * 'deep': the U2PL/DGCL/CSC/DSSN stem (ResNet-v1c): 3x3/2 conv 3->64, BN, ReLU,
    3x3 conv 64->64, BN, ReLU, 3x3 conv 64->128, BN, ReLU, max-pool; torch names
    `conv1.{0,1,3,4,6}` and `bn1`, as in those repositories' checkpoints. layer1 then
    starts from 128 channels.
  * 'small': one 3x3 conv (configurable stride), BN, ReLU, optional max-pool, for CPU runs.
"""

import functools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax import lax

from semijax.models import layers

Dtype = Any

STAGES = ('layer1', 'layer2', 'layer3', 'layer4')
REMAT = ('none', 'blocks', 'full')
# Module name of a scanned run of blocks: `{stage}_scan{first block}`; its leading axis
# counts the blocks.
SCAN_NAME = re.compile(r'^(layer\d+)_scan(\d+)$')


def scan_name(stage: str, first: int) -> str:
  """Module name of the scanned run of `stage`'s blocks starting at block `first`."""
  return f'{stage}_scan{first}'


def _conv_saveable(prim, *_, **__) -> bool:
  """Checkpoint policy: keep convolution outputs, recompute everything else."""
  return prim is lax.conv_general_dilated_p


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `remat` mode (None for 'none')."""
  if remat not in REMAT:
    raise ValueError(f'remat={remat!r}; expected one of {REMAT}')
  if remat == 'blocks':
    return _conv_saveable
  if remat == 'full':
    return jax.checkpoint_policies.nothing_saveable
  return None


class BottleneckBlock(nn.Module):
  """torchvision v1.5 bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), residual.

  Attributes:
    width: the 3x3 conv's channels; the block outputs `4 * width`.
    strides: stride of the 3x3 conv and of the projection shortcut.
    dilation: dilation of the 3x3 conv.
    norm: BatchNorm constructor (already bound to the train/eval mode).
    zero_init_residual: start `bn3.scale` at 0 so the block is the identity at init.
    dtype: compute dtype.
  """
  width: int
  strides: int = 1
  dilation: int = 1
  norm: Any = layers.BatchNorm
  zero_init_residual: bool = False
  dtype: Optional[Dtype] = None
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.width * self.expansion
    y = layers.conv(self.width, 1, dtype=self.dtype, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = layers.conv(self.width, 3, strides=self.strides, dilation=self.dilation,
                    dtype=self.dtype, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = layers.conv(out_ch, 1, dtype=self.dtype, name='conv3')(y)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_init, name='bn3')(y)
    if self.strides != 1 or x.shape[-1] != out_ch:
      x = layers.conv(out_ch, 1, strides=self.strides, dtype=self.dtype, name='downsample_0')(x)
      x = self.norm(name='downsample_1')(x)
    return nn.relu(y + x)


class BasicBlock(nn.Module):
  """torchvision basic block: two 3x3 convs, residual. Dilation applies to both convs
  (torchvision refuses dilation here; segmentation ports of ResNet-18/34 do this).

  Attributes: as `BottleneckBlock`; the block outputs `width` channels.
  """
  width: int
  strides: int = 1
  dilation: int = 1
  norm: Any = layers.BatchNorm
  zero_init_residual: bool = False
  dtype: Optional[Dtype] = None
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.conv(self.width, 3, strides=self.strides, dilation=self.dilation,
                    dtype=self.dtype, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = layers.conv(self.width, 3, dilation=self.dilation, dtype=self.dtype, name='conv2')(y)
    last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_init, name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.width:
      x = layers.conv(self.width, 1, strides=self.strides, dtype=self.dtype,
                      name='downsample_0')(x)
      x = self.norm(name='downsample_1')(x)
    return nn.relu(y + x)


BLOCKS = {'bottleneck': BottleneckBlock, 'basic': BasicBlock}


def stem_stride(stem: str, small_stride: int = 2, small_pool: bool = False) -> int:
  """Total stride of a stem (the stride of layer1's output)."""
  if stem in ('torchvision', 'deep'):
    return 4
  if stem == 'small':
    return small_stride * (2 if small_pool else 1)
  raise ValueError(f"unknown stem {stem!r}; expected 'torchvision', 'deep' or 'small'")


def stage_plan(stage_sizes: Sequence[int], *, first_stride: int, output_stride: int,
               multi_grid: Optional[Sequence[int]] = None) -> List[Tuple[int, Tuple[int, ...]]]:
  """Stride and per-block dilations of the four stages.

  Follows torchvision's `replace_stride_with_dilation` (as U2PL/DGCL/DSSN do): layer2-4
  downsample by 2 until the total stride reaches `output_stride`; each later stage keeps
  stride 1 and doubles the dilation instead, and its *first* block keeps the previous
  stage's dilation. With `multi_grid` (DeepLabv3's multi-grid, e.g. (1, 2, 4)) layer4's
  block i instead gets `layer4_dilation * multi_grid[i]`. U2PL/DGCL's `multi_grid=True`
  (grids (2, 2, 4) applied on top of the previous/current dilations) gives the same
  layer4 dilations as our `(1, 2, 4)` at output stride 8 and 16: (4, 8, 16) and (2, 4, 8).
  CAC's `_make_MG_unit` is our semantics exactly.

  Args:
    stage_sizes: blocks per stage (4 entries).
    first_stride: the stem's total stride.
    output_stride: wanted total stride of layer4, `first_stride * 2**k`, k in 0..3.
    multi_grid: per-block multipliers for layer4, or None.

  Returns:
    `[(stride, dilations)]` for layer1..layer4, `dilations` one per block.
  """
  if len(stage_sizes) != 4:
    raise ValueError(f'stage_sizes needs 4 entries, got {tuple(stage_sizes)}')
  plan = []
  current, dilation = first_stride, 1
  for i, blocks in enumerate(stage_sizes):
    previous = dilation
    stride = 1 if i == 0 else 2
    if stride == 2 and current * 2 > output_stride:
      dilation *= 2
      stride = 1
    current *= stride
    dilations = (previous,) + (dilation,) * (blocks - 1)
    if i == 3 and multi_grid is not None:
      if len(multi_grid) != blocks:
        raise ValueError(f'multi_grid {tuple(multi_grid)} needs one entry per layer4 block '
                         f'({blocks})')
      dilations = tuple(dilation * g for g in multi_grid)
    plan.append((stride, dilations))
  if current != output_stride:
    raise ValueError(f'output_stride {output_stride} is not reachable from a stem of stride '
                     f'{first_stride}; use {first_stride} * 2**k with k in 0..3')
  return plan


class ResNet(nn.Module):
  """ResNet feature extractor returning every stage's output.

  Attributes:
    stage_sizes: blocks in layer1..layer4, e.g. (3, 4, 6, 3) for ResNet-50.
    block: 'bottleneck' or 'basic'.
    widths: base widths of the four stages (bottleneck outputs are 4x these).
    stem: 'torchvision', 'deep' or 'small' (see the module docstring).
    stem_width: first conv's channels (the deep stem ends with `2 * stem_width`).
    small_stem_stride: stride of the 'small' stem's conv.
    small_stem_pool: whether the 'small' stem max-pools (3x3/2).
    pool_ceil_mode: stem max-pool rounding; None = True for 'deep' (U2PL/DGCL's
      `ceil_mode=True`; DSSN/UniMatch use False), False otherwise. Only even sizes differ.
    output_stride: total stride of layer4: 8, 16 or 32 with the standard stems.
    multi_grid: layer4 dilation multipliers, see `stage_plan`.
    zero_init_residual: zero-initialise the last BN scale of each block.
    dtype: compute dtype; parameters stay float32.
    bn_momentum: flax-convention BN momentum (0.9 = PyTorch's 0.1).
    bn_axis_name: SyncBN axis inside a user's `pmap`/`shard_map`.
    bn_batch_groups: per-group BN statistics, see `layers.BatchNorm`.
    scan_blocks: run each stage's identical blocks (1..n-1, equal dilation) as one
      `nn.scan` (parameters stacked, see the module docstring); False keeps one module per
      block (torchvision's layout, slow to compile for ResNet-101).
    remat: 'none', 'blocks' or 'full' (see the module docstring).
  """
  stage_sizes: Sequence[int]
  block: str = 'bottleneck'
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = 'torchvision'
  stem_width: int = 64
  small_stem_stride: int = 2
  small_stem_pool: bool = False
  pool_ceil_mode: Optional[bool] = None
  output_stride: int = 32
  multi_grid: Optional[Sequence[int]] = None
  zero_init_residual: bool = False
  dtype: Optional[Dtype] = None
  bn_momentum: float = 0.9
  bn_axis_name: Optional[str] = None
  bn_batch_groups: int = 1
  scan_blocks: bool = True
  remat: str = 'none'

  def plan(self) -> List[Tuple[int, Tuple[int, ...]]]:
    """`stage_plan` for this configuration."""
    first = stem_stride(self.stem, self.small_stem_stride, self.small_stem_pool)
    return stage_plan(self.stage_sizes, first_stride=first, output_stride=self.output_stride,
                      multi_grid=self.multi_grid)

  def block_groups(self) -> List[List[Tuple[int, int, int]]]:
    """Per stage, the runs of blocks as `(first block, number of blocks, dilation)`.

    Block 0 is always a run of its own; with `scan_blocks` the later blocks are grouped
    into maximal runs of equal dilation (a run of several blocks is one `nn.scan`),
    otherwise every block is a run of one.
    """
    groups = []
    for _, dilations in self.plan():
      runs = [(0, 1, dilations[0])]
      for j, dilation in enumerate(dilations[1:], start=1):
        first, count, last = runs[-1]
        if self.scan_blocks and first > 0 and last == dilation:
          runs[-1] = (first, count + 1, dilation)
        else:
          runs.append((j, 1, dilation))
      groups.append(runs)
    return groups

  @property
  def out_channels(self) -> Dict[str, int]:
    """Channels of each stage output."""
    expansion = BLOCKS[self.block].expansion
    return {name: w * expansion for name, w in zip(STAGES, self.widths)}

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: `[B, H, W, 3]` normalised images.
      train: BN uses batch statistics (and updates `batch_stats`) when True.

    Returns:
      `{'stem': [B, H/s, W/s, c0], 'layer1': [B, H/s, W/s, C1], ..., 'layer4':
      [B, H/os, W/os, C4]}` where s is the stem stride and os the output stride (sizes
      round up like PyTorch's for odd inputs).
    """
    if self.block not in BLOCKS:
      raise ValueError(f"unknown block {self.block!r}; expected one of {sorted(BLOCKS)}")
    norm = functools.partial(layers.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, dtype=self.dtype,
                             axis_name=self.bn_axis_name, batch_groups=self.bn_batch_groups)
    conv = functools.partial(layers.conv, dtype=self.dtype)
    ceil_mode = self.stem == 'deep' if self.pool_ceil_mode is None else self.pool_ceil_mode
    x = x.astype(self.dtype) if self.dtype is not None else x

    if self.stem == 'torchvision':
      x = conv(self.stem_width, 7, strides=2, name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = layers.max_pool(x, ceil_mode=ceil_mode)
    elif self.stem == 'deep':
      x = conv(self.stem_width, 3, strides=2, name='conv1_0')(x)
      x = nn.relu(norm(name='conv1_1')(x))
      x = conv(self.stem_width, 3, name='conv1_3')(x)
      x = nn.relu(norm(name='conv1_4')(x))
      x = conv(2 * self.stem_width, 3, name='conv1_6')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = layers.max_pool(x, ceil_mode=ceil_mode)
    elif self.stem == 'small':
      x = conv(self.stem_width, 3, strides=self.small_stem_stride, name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      if self.small_stem_pool:
        x = layers.max_pool(x, ceil_mode=ceil_mode)
    else:
      stem_stride(self.stem)  # raises the error listing valid stems

    out = {'stem': x}
    policy = remat_policy(self.remat)
    block_cls = BLOCKS[self.block]
    if policy is not None:
      block_cls = nn.remat(block_cls, policy=policy)
      scanned_cls = nn.remat(BLOCKS[self.block], policy=policy, prevent_cse=False)
    else:
      scanned_cls = block_cls
    plans = self.plan()
    for i, (width, runs) in enumerate(zip(self.widths, self.block_groups())):
      stride = plans[i][0]
      for first, count, dilation in runs:
        kwargs = dict(dilation=dilation, norm=norm, zero_init_residual=self.zero_init_residual,
                      dtype=self.dtype)
        if count == 1:
          x = block_cls(width, strides=stride if first == 0 else 1,
                        name=f'{STAGES[i]}_{first}', **kwargs)(x)
        else:
          scan = nn.scan(lambda block, carry, _: (block(carry), None),
                         variable_axes={'params': 0, 'batch_stats': 0},
                         split_rngs={'params': True}, length=count)
          x, _ = scan(scanned_cls(width, name=scan_name(STAGES[i], first), **kwargs), x, None)
      out[STAGES[i]] = x
    return out


def resnet18(**kwargs) -> ResNet:
  """ResNet-18 (basic blocks); `kwargs` are `ResNet` attributes."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block='basic', **kwargs)


def resnet34(**kwargs) -> ResNet:
  """ResNet-34 (basic blocks)."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block='basic', **kwargs)


def resnet50(**kwargs) -> ResNet:
  """ResNet-50; `stem='deep'` for the U2PL/DGCL/DSSN variant."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block='bottleneck', **kwargs)


def resnet101(**kwargs) -> ResNet:
  """ResNet-101; `stem='deep'` for the U2PL/DGCL/DSSN variant."""
  return ResNet(stage_sizes=(3, 4, 23, 3), block='bottleneck', **kwargs)


def small_resnet(*, widths: Sequence[int] = (16, 32, 64, 128),
                 stage_sizes: Sequence[int] = (1, 1, 1, 1), block: str = 'basic',
                 stem_width: int = 16, stem_stride: int = 2, stem_pool: bool = True,
                 output_stride: int = 8, **kwargs) -> ResNet:
  """A cheap ResNet for CPU runs on ~48-64 px images (every size configurable).

  The defaults keep the big model's geometry (layer1 at stride 4, layer4 at stride 8)
  with ~0.3M parameters (basic blocks; ~0.45M with the small DeepLabv3+ head).
  """
  return ResNet(stage_sizes=tuple(stage_sizes), block=block, widths=tuple(widths),
                stem='small', stem_width=stem_width, small_stem_stride=stem_stride,
                small_stem_pool=stem_pool, output_stride=output_stride, **kwargs)
