"""Alonso et al.'s class-specific attention modules S_c as one module with a class axis.

Each S_c is Linear(D, H) -> BatchNorm -> LeakyReLU(0.2) -> Linear(H, 1) -> Sigmoid (H = 256),
and there are two per class: one for the student's prediction vectors p (side 'prediction',
official `contrastive_class_selector_c`) and one for the memory entries z' (side
'projection', official `contrastive_class_selector_memory_c`). Here the C modules of a side
are one set of parameters with a leading class axis (`[C, D, H]` kernels, `[C, H]` BatchNorm),
evaluated without a Python loop over classes:

* `class_scores(x [C, M, D], valid [C, M])`: row c through S_c (the memory bank `[C, K, D]`).
* `scores(x [N, D], groups [N], valid [N])`: every vector through the module of its own class.
  `impl='tiles'` sorts the vectors by class and lays them out in tiles of `tile` rows, each
  tile holding one class (at most N / tile + C tiles, a static bound), so the cost is that of
  one Linear over ~N rows, not C of them; `impl='dense'` runs all C modules on every vector and
  keeps its class's output (C times the work; simple, for small C and tests).

BatchNorm follows the official per-class `BatchNorm1d`: in training, statistics of the valid
vectors of each class (global under `bn_axis_name`), running statistics updated for the classes
present (PyTorch's unbiased variance, flax momentum 0.9 = PyTorch 0.1).

Attached to a segmenter as a head (`DeepLabV3Plus(heads={'alonso_attention': ...})`), the module
only owns parameters: its call in `decode` returns an empty `[B, h, w, 0]` map. Methods
evaluate it through `model.apply(..., method=attention_method(name, ...))`.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
SIDES = ("prediction", "projection")
IMPLS = ("tiles", "dense")


def group_tiles(groups: jax.Array, valid: jax.Array, num_groups: int, tile: int):
  """Static-shape layout of N rows in tiles of `tile` rows, each tile holding one group.

  Returns:
    `(order, pos, tile_group, num_tiles)`: `order` `[N]` sorts rows by group; `pos` `[N]` is the
    padded position of sorted row r (`num_tiles * tile` = dropped, for invalid rows);
    `tile_group` `[num_tiles]` the group of each tile (unused tiles repeat the last group).
  """
  n = groups.shape[0]
  g = jnp.where(valid & (groups >= 0) & (groups < num_groups), groups, num_groups)
  g = g.astype(jnp.int32)
  order = jnp.argsort(g, stable=True)
  gs = g[order]
  counts = jnp.zeros((num_groups + 1,), jnp.int32).at[g].add(1)[:num_groups]
  tiles_per = (counts + tile - 1) // tile
  tile_end = jnp.cumsum(tiles_per)
  tile_start = tile_end - tiles_per
  row_start = jnp.cumsum(counts) - counts
  num_tiles = -(-n // tile) + num_groups
  gc = jnp.minimum(gs, num_groups - 1)
  r = jnp.arange(n, dtype=jnp.int32)
  pos = jnp.where(gs < num_groups, tile_start[gc] * tile + r - row_start[gc], num_tiles * tile)
  tile_group = jnp.searchsorted(tile_end, jnp.arange(num_tiles, dtype=jnp.int32), side="right")
  return order, pos, jnp.minimum(tile_group, num_groups - 1).astype(jnp.int32), num_tiles


class ClassAttention(nn.Module):
  """The 2 x C attention modules S_c of Alonso et al. (see the module docstring).

  Attributes:
    num_classes: C.
    features: D, the input width (projection / prediction dimension).
    hidden: H (256).
    sides: module sets, by name ('prediction' for p, 'projection' for z').
    negative_slope: LeakyReLU slope (0.2).
    impl: 'tiles' or 'dense' for `scores`.
    tile: rows per tile of `impl='tiles'` (capped at about N / C for small batches).
    source: model output read when used as a head (only for the head protocol).
    dtype: compute dtype of the two Linears (statistics and sigmoid in float32).
    bn_momentum: flax-convention momentum of the running statistics.
    bn_epsilon: BatchNorm epsilon.
    bn_axis_name: SyncBN axis inside a user's `pmap`/`shard_map`.
  """
  num_classes: int
  features: int = 256
  hidden: int = 256
  sides: Sequence[str] = SIDES
  negative_slope: float = 0.2
  impl: str = "tiles"
  tile: int = 512
  source: str = "alonso_projection"
  dtype: Optional[Dtype] = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_axis_name: Optional[str] = None

  def setup(self):
    c, d, h = self.num_classes, self.features, self.hidden
    # One Linear per class: variance scaling over each class's own fan-in.
    k_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    k2_init = nn.initializers.lecun_normal(in_axis=-1, out_axis=(), batch_axis=(0,))
    sides = {}
    for side in self.sides:
      sides[side] = dict(
          kernel1=self.param(f"{side}_kernel1", k_init, (c, d, h), jnp.float32),
          bias1=self.param(f"{side}_bias1", nn.initializers.zeros, (c, h), jnp.float32),
          scale=self.param(f"{side}_bn_scale", nn.initializers.ones, (c, h), jnp.float32),
          bias=self.param(f"{side}_bn_bias", nn.initializers.zeros, (c, h), jnp.float32),
          kernel2=self.param(f"{side}_kernel2", k2_init, (c, h), jnp.float32),
          bias2=self.param(f"{side}_bias2", nn.initializers.zeros, (c,), jnp.float32),
          mean=self.variable("batch_stats", f"{side}_mean", lambda: jnp.zeros((c, h), jnp.float32)),
          var=self.variable("batch_stats", f"{side}_var", lambda: jnp.ones((c, h), jnp.float32)))
    self.side_params = sides

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Head protocol: owns the parameters, computes nothing (`[..., 0]`)."""
    del train
    return jnp.zeros(x.shape[:-1] + (0,), x.dtype)

  def _side(self, side: str) -> dict:
    if side not in self.sides:
      raise ValueError(f"side={side!r}; this module has {tuple(self.sides)}")
    return {k: v if k in ("mean", "var") else jnp.asarray(v)
            for k, v in self.side_params[side].items()}

  def _hidden_stats(self, h, groups, valid, p, train):
    """Per-class BatchNorm of hidden rows `h` `[R, H]` with class `groups` `[R]`."""
    c = self.num_classes
    g = jnp.where(valid, groups, c)
    m = valid.astype(jnp.float32)[:, None]
    if train:
      seg = functools.partial(jax.ops.segment_sum, segment_ids=g, num_segments=c + 1)
      def total(x):
        x = seg(x)[:c]
        return x if self.bn_axis_name is None else lax.psum(x, self.bn_axis_name)
      n = total(m[:, 0])  # [C]
      mean = total(h * m) / jnp.maximum(n, 1.0)[:, None]
      var = total(((h - mean[jnp.minimum(g, c - 1)]) ** 2) * m) / jnp.maximum(n, 1.0)[:, None]
      if not self.is_initializing():
        present = (n > 0)[:, None]
        unbiased = var * (n / jnp.maximum(n - 1.0, 1.0))[:, None]
        mom = self.bn_momentum
        p["mean"].value = jnp.where(present, mom * p["mean"].value + (1 - mom) * mean,
                                    p["mean"].value)
        p["var"].value = jnp.where(present, mom * p["var"].value + (1 - mom) * unbiased,
                                   p["var"].value)
    else:
      mean, var = p["mean"].value, p["var"].value
    return mean, var

  def _head(self, h, groups, valid, p, train):
    """BN -> LeakyReLU -> Linear(H, 1) -> sigmoid for rows of known class."""
    mean, var = self._hidden_stats(h, groups, valid, p, train)
    gc = jnp.clip(groups, 0, self.num_classes - 1)
    y = (h - mean[gc]) * lax.rsqrt(var[gc] + self.bn_epsilon) * p["scale"][gc] + p["bias"][gc]
    y = nn.leaky_relu(y, self.negative_slope)
    logit = jnp.sum(y * p["kernel2"][gc], axis=-1) + p["bias2"][gc]
    return jnp.where(valid, jax.nn.sigmoid(logit), 0.0)

  def _first_linear(self, spec, x, kernel, bias):
    """`einsum(spec, x, kernel) + bias` in the compute dtype, accumulated in float32."""
    dt = self.dtype or jnp.float32
    return (jnp.einsum(spec, x.astype(dt), kernel.astype(dt),
                       preferred_element_type=jnp.float32) + bias)

  def class_scores(self, x: jax.typing.ArrayLike, valid: Optional[jax.typing.ArrayLike] = None,
                   *, side: str = "projection", train: bool = False) -> jax.Array:
    """Row c of `x` through S_c: `[C, M, D]` -> `[C, M]` in (0, 1) (0 where invalid).

    BatchNorm statistics of class c come from its valid rows (`valid` `[C, M]` bool).
    """
    p = self._side(side)
    x = jnp.asarray(x)
    c, m = x.shape[0], x.shape[1]
    if c != self.num_classes:
      raise ValueError(f"x has {c} class rows, the module {self.num_classes}")
    valid = jnp.ones((c, m), bool) if valid is None else jnp.asarray(valid, bool)
    h = self._first_linear("cmd,cdh->cmh", x, p["kernel1"], p["bias1"][:, None])
    groups = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, m))
    out = self._head(h.reshape(c * m, -1), groups.reshape(-1), valid.reshape(-1), p, train)
    return out.reshape(c, m)

  def scores(self, x: jax.typing.ArrayLike, groups: jax.typing.ArrayLike,
             valid: Optional[jax.typing.ArrayLike] = None, *, side: str = "prediction",
             train: bool = False) -> jax.Array:
    """Every row of `x` `[N, D]` through the module of its class `groups` `[N]` -> `[N]`.

    Rows that are invalid or whose group is outside [0, C) get 0 and take no part in the
    BatchNorm statistics.
    """
    p = self._side(side)
    x = jnp.asarray(x)
    n = x.shape[0]
    c = self.num_classes
    groups = jnp.asarray(groups, jnp.int32).reshape(-1)
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool).reshape(-1)
    valid = valid & (groups >= 0) & (groups < c)
    if self.impl == "dense":
      h_all = self._first_linear("nd,cdh->nch", x, p["kernel1"], p["bias1"][None])
      h = jnp.take_along_axis(h_all, jnp.clip(groups, 0, c - 1)[:, None, None], axis=1)[:, 0]
      return self._head(h, groups, valid, p, train)
    if self.impl != "tiles":
      raise ValueError(f"impl={self.impl!r}; expected one of {IMPLS}")
    # Tile rows: at most `tile`, and no more than ~N / C so small batches pad little.
    tile = max(8, min(self.tile, -(-max(n // c, 1) // 8) * 8))
    order, pos, tile_group, num_tiles = group_tiles(groups, valid, c, tile)
    rows = num_tiles * tile
    xs = jnp.zeros((rows, x.shape[1]), x.dtype).at[pos].set(x[order], mode="drop")
    vs = jnp.zeros((rows,), bool).at[pos].set(True, mode="drop")
    gs = jnp.repeat(tile_group, tile)
    h = self._first_linear("ntd,ndh->nth", xs.reshape(num_tiles, tile, -1),
                           p["kernel1"][tile_group],
                           p["bias1"][tile_group][:, None])
    out = self._head(h.reshape(rows, -1), gs, vs, p, train)
    sorted_out = jnp.take(out, pos, mode="fill", fill_value=0.0)
    return jnp.zeros((n,), jnp.float32).at[order].set(sorted_out)


def attention_method(name: str, kind: str, side: str):
  """A `model.apply(..., method=...)` function evaluating the attention head `name`.

  The returned `fn(model, inputs, train)` takes `inputs = (x, groups, valid)` for
  kind 'scores' or `(x, valid)` for kind 'class_scores', so that a method can run the
  student's (`ctx.student(inputs, method=fn)`) or the teacher's attention, BatchNorm statistics
  included, through the usual forward functions.
  """
  if kind not in ("scores", "class_scores"):
    raise ValueError(f"kind={kind!r}; expected 'scores' or 'class_scores'")

  def fn(model, inputs, train=False):
    head = model.heads[name]
    return getattr(head, kind)(*inputs, side=side, train=train)

  fn.__name__ = f"{name}_{kind}_{side}"
  return fn
