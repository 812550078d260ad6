"""Building blocks with PyTorch semantics: BatchNorm, padded convolutions, pooling.

The reference codebases are PyTorch, so the defaults here are PyTorch's: BatchNorm momentum
0.1 (flax 0.9) and eps 1e-5 with an unbiased running variance, symmetric explicit conv
padding (flax's 'SAME' pads stride-2 convs asymmetrically), and `MaxPool2d(ceil_mode=...)`.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]

# torchvision / U2PL initialise every conv with kaiming_normal(mode='fan_out', relu).
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's defaults and statistics.

  * `momentum` is flax's (running = momentum * running + (1 - momentum) * batch), so the
    default 0.9 is PyTorch's 0.1. The running variance is updated with the *unbiased*
    batch variance, as PyTorch does; normalisation uses the biased one.
  * `axis_name`: inside a user's `pmap`/`shard_map`, statistics are averaged over that
    axis (SyncBN). Under `jax.jit` on a global batch, BN is synchronised by construction.
  * `batch_groups` = G > 1 computes statistics separately for G groups of consecutive
    batch rows (`[G, B/G, ...]`). Under jit on a global batch sharded over G devices this
    reproduces per-device (unsynchronised) BN; the running statistics then move towards
    the mean of the G groups' statistics.

  Statistics are computed in float32 whatever the input dtype; the output has `dtype`
  (default: the input's). Parameters are `param_dtype` (float32).

  Attributes:
    use_running_average: if True use the running statistics (eval mode); may instead be
      given at call time.
    momentum: flax-convention momentum of the running statistics.
    epsilon: added to the variance.
    dtype: output dtype; None keeps the input dtype.
    param_dtype: dtype of `scale` and `bias`.
    axis_name: mapped axis to synchronise statistics over, or None.
    batch_groups: number of independent statistics groups along the batch axis.
    scale_init: initialiser of `scale` (zeros for zero-init residual branches).
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  batch_groups: int = 1
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    """Normalises `x`.

    Args:
      x: `[B, ..., C]`.
      use_running_average: overrides the attribute of the same name.

    Returns:
      `[B, ..., C]` in `dtype` (or `x.dtype`).
    """
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    features = x.shape[-1]
    out_dtype = self.dtype or x.dtype
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    xf = x.astype(jnp.float32)

    if use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale.astype(jnp.float32)
      y = (xf - ra_mean.value) * mul + bias.astype(jnp.float32)
      return y.astype(out_dtype)

    groups = self.batch_groups
    if x.shape[0] % groups:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by batch_groups={groups}')
    xg = xf.reshape((groups, x.shape[0] // groups, -1, features))
    count = xg.shape[1] * xg.shape[2]
    # Two-pass statistics (mean first, then centred second moment): as accurate as PyTorch.
    mean = jnp.mean(xg, axis=(1, 2))
    if self.axis_name is not None:
      mean = lax.pmean(mean, self.axis_name)
    centred = xg - mean[:, None, None]
    var = jnp.mean(jnp.square(centred), axis=(1, 2))
    if self.axis_name is not None:
      var = lax.pmean(var, self.axis_name)
      count *= lax.axis_size(self.axis_name)
    mul = lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = centred * mul[:, None, None] + bias.astype(jnp.float32)

    if not self.is_initializing():
      unbiased = var * (count / max(count - 1, 1))
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(jnp.mean(mean, 0))
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(jnp.mean(unbiased, 0))
    return y.reshape(x.shape).astype(out_dtype)


def _useful_taps(size: int, kernel: int, stride: int, dilation: int, pad: int) -> range:
  """Kernel taps that reach an input pixel for some output pixel (the rest read padding).

  Output pixel i reads input `i * stride - pad + t * dilation` through tap t; over the
  `out` outputs a tap is useful iff that range meets `[0, size)`. The useful taps are
  contiguous.
  """
  out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
  return range(kernel)[next((t for t in range(kernel)
                             if t * dilation - pad + (out - 1) * stride >= 0), kernel):
                       next((t for t in range(kernel - 1, -1, -1)
                             if t * dilation - pad <= size - 1), -1) + 1]


class Conv(nn.Module):
  """A square convolution padded like PyTorch's `padding = dilation * (k - 1) // 2`.

  Parameters and arithmetic are `nn.Conv`'s (`kernel` `[k, k, C_in, features]` HWIO,
  optional `bias`, inputs and parameters promoted to `dtype`). One difference in cost, not
  in value: kernel taps that can only ever read padding are left out of the computation.
  This happens when the dilation is at least the input size, e.g. DeepLab's ASPP rates
  12/24/36 on the 4 x 4 layer4 map of a 32-pixel crop, where a padded dilated 3x3 conv cost
  ~80 % of the CPU demo's step for what is a 1x1 conv; at the papers' sizes (33 x 33 at
  rate 18) every tap is used and nothing changes.

  Attributes:
    features: output channels.
    kernel_size: odd kernel size k.
    strides: stride.
    dilation: kernel dilation (atrous rate).
    use_bias: whether to add a bias.
    dtype: compute dtype (None: the promoted input/parameter dtype).
    param_dtype: parameter dtype.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dilation: int = 1
  use_bias: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = CONV_INIT
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, H, W, C_in]` -> `[B, H', W', features]` (PyTorch's output size)."""
    k, d, s = self.kernel_size, self.dilation, self.strides
    pad = d * (k - 1) // 2
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = []
    for axis, size in enumerate(x.shape[1:3]):
      taps = _useful_taps(size, k, s, d, pad)
      if len(taps) and len(taps) < k:
        kernel = lax.slice_in_dim(kernel, taps.start, taps.stop, axis=axis)
        out = (size + 2 * pad - d * (k - 1) - 1) // s + 1
        low = pad - taps.start * d
        padding.append((low, (out - 1) * s + (len(taps) - 1) * d + 1 - size - low))
      else:
        padding.append((pad, pad))
    y = lax.conv_general_dilated(x, kernel, (s, s), padding, rhs_dilation=(d, d),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if bias is not None:
      y += bias.reshape((1, 1, 1, -1))
    return y


def conv(features: int, kernel_size: int, *, strides: int = 1, dilation: int = 1,
         use_bias: bool = False, dtype: Optional[Dtype] = None,
         kernel_init: Initializer = CONV_INIT, name: Optional[str] = None) -> Conv:
  """A square `Conv` padded like PyTorch's `padding = dilation * (k - 1) // 2`.

  Args:
    features: output channels.
    kernel_size: odd kernel size k.
    strides: stride.
    dilation: kernel dilation (atrous rate).
    use_bias: whether to add a bias.
    dtype: compute dtype (parameters stay float32).
    kernel_init: kernel initialiser (He normal, fan-out, by default).
    name: module name.

  Returns:
    An unbound `Conv` module.
  """
  return Conv(features, kernel_size, strides=strides, dilation=dilation, use_bias=use_bias,
              dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init, name=name)


def max_pool(x: jax.Array, window: int = 3, strides: int = 2, padding: int = 1,
             ceil_mode: bool = False) -> jax.Array:
  """PyTorch's `MaxPool2d(window, strides, padding, ceil_mode)` on `[B, H, W, C]`.

  Padding never wins the max. With `ceil_mode` the output size rounds up, except that a
  window may not start inside the right/bottom padding (PyTorch's rule).
  """
  pads = []
  for n in x.shape[1:3]:
    span = n + 2 * padding - window
    out = (-(-span // strides) if ceil_mode else span // strides) + 1
    if ceil_mode and (out - 1) * strides >= n + padding:
      out -= 1
    pads.append((padding, (out - 1) * strides + window - n - padding))
  return nn.max_pool(x, (window, window), strides=(strides, strides), padding=tuple(pads))


def channel_dropout(rate: float, name: Optional[str] = None, *,
                    channelwise: bool = True) -> nn.Dropout:
  """PyTorch's `Dropout2d`: whole channels of `[B, H, W, C]` dropped, rng 'dropout'.

  With `channelwise=False` it is element-wise `Dropout` instead (CAC's decoder).
  """
  return nn.Dropout(rate, broadcast_dims=(1, 2) if channelwise else (), name=name)
