"""ImageNet backbone weights from (and to) torchvision-format state dicts.

Reads `.safetensors` with `safetensors.numpy` (no torch needed) and `.pth`/`.pt` with torch
when it is installed. Covers torchvision's ResNets (7x7 stem) and the deep-stem ResNets of
the U2PL/DGCL/CSC/DSSN family, whose checkpoints name the stem `conv1.0` (conv 3->64),
`conv1.1` (BN), `conv1.3` (conv 64->64), `conv1.4` (BN), `conv1.6` (conv 64->128) and
`bn1` (BN 128); everything else is torchvision's naming.

Name mapping: our flax module path with every `_` turned into `.` is the torch module
name (`('layer1_0', 'downsample_1')` <-> `layer1.0.downsample.1`). Leaves: conv `kernel`
HWIO <-> `weight` OIHW, dense `kernel` `[in, out]` <-> `weight` `[out, in]`, BN `scale` /
`bias` (params) <-> `weight` / `bias`, BN `mean` / `var` (batch_stats) <->
`running_mean` / `running_var`. `num_batches_tracked` and `fc.*` are skipped.

Scanned blocks (`resnet.ResNet(scan_blocks=True)`, the default for ResNet-50/101) keep a run
of identical blocks stacked under one module, `('layer3_scan1', 'conv1', 'kernel')` `[22, ...]`
for torch's `layer3.1.conv1.weight` ... `layer3.22.conv1.weight`. `unstack_blocks` turns such
a tree into one entry per block (`layer3_1`, ..., `layer3_22`, torchvision's layout) and
`stack_blocks` back into a given layout; the loader and writer go through them, so state
dicts always use torchvision's names whatever the model's layout.
"""

import dataclasses
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
Source = Union[str, os.PathLike, Mapping[str, Any]]

# Checkpoint wrappers seen in the wild: `{'state_dict': ...}` (mmcv, Lightning), `{'model':
# ...}` (DeiT-style), `{'model_state': ...}` (U2PL's own checkpoints).
_WRAPPERS = ('state_dict', 'model_state', 'model')
_SKIPPED_SUFFIXES = ('num_batches_tracked',)
_SKIPPED_PREFIXES = ('fc.',)
# `resnet.SCAN_NAME` (not imported: this module stays importable without the model code).
_SCAN_NAME = re.compile(r'^(layer\d+)_scan(\d+)$')


@dataclasses.dataclass
class LoadReport:
  """What `load_torchvision_weights` did; all names are torch-style keys.

  Attributes:
    loaded: keys copied into the model.
    missing: model entries the state dict has no key for (left unchanged).
    unexpected: state-dict keys the model has no entry for.
    shape_mismatch: `(key, state-dict shape, expected shape)`, both in torch layout.
    skipped: keys ignored on purpose (`num_batches_tracked`, `fc.*`, other prefixes).
  """
  loaded: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = dataclasses.field(
      default_factory=list)
  skipped: List[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    """True when every model entry was loaded and every key was used."""
    return not (self.missing or self.unexpected or self.shape_mismatch)

  def summary(self, limit: int = 20) -> str:
    """One line of counts, then the problems (first `limit` of each kind)."""

    def listing(title, items):
      if not items:
        return []
      more = f' (+{len(items) - limit} more)' if len(items) > limit else ''
      return [f'{title} ({len(items)}): {items[:limit]}{more}']

    mism = [f'{k}: checkpoint {tuple(a)} vs model {tuple(b)}' for k, a, b in self.shape_mismatch]
    head = (f'loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected '
            f'{len(self.unexpected)}, shape mismatches {len(mism)}, skipped {len(self.skipped)}')
    return '\n'.join([head] + listing('missing', self.missing) +
                     listing('unexpected', self.unexpected) + listing('shape mismatch', mism))


def _to_numpy(value: Any) -> Optional[np.ndarray]:
  if hasattr(value, 'detach'):  # a torch tensor; copy, as torch may later update it in place
    return value.detach().cpu().numpy().copy()
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    return np.asarray(value)
  return None


def read_state_dict(source: Source) -> Dict[str, np.ndarray]:
  """Reads a torch-style state dict into NumPy arrays.

  Args:
    source: a `.safetensors` file, a `.pth`/`.pt`/`.tar`/`.bin` file (needs torch), or an
      in-memory mapping of names to arrays/tensors.

  Returns:
    `{name: array}` with wrappers (`state_dict`, `model_state`, `model`) removed and a
    DataParallel `module.` prefix stripped. Non-array entries are dropped.

  Raises:
    ImportError: a pickle checkpoint without torch installed.
  """
  if isinstance(source, Mapping):
    raw = source
  else:
    path = os.fspath(source)
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      raw = load_file(path)
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            f'reading {path!r} needs torch (pickle checkpoint); install torch or convert it '
            'to .safetensors with safetensors.torch.save_file') from e
      raw = torch.load(path, map_location='cpu', weights_only=True)
  while True:
    inner = [k for k in _WRAPPERS if isinstance(raw.get(k), Mapping)]
    if not inner:
      break
    raw = raw[inner[0]]
  out = {}
  for key, value in raw.items():
    array = _to_numpy(value)
    if array is not None:
      out[key[len('module.'):] if key.startswith('module.') else key] = array
  return out


def _slice(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def _stack(leaves: Sequence[Any]) -> Any:
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack([jnp.asarray(x) for x in leaves])


def _run_length(tree: Mapping[str, Any]) -> int:
  return int(jax.tree.leaves(tree)[0].shape[0])


def unstack_blocks(tree: PyTree) -> PyTree:
  """Scanned block runs -> one entry per block (torchvision's layout), at any depth.

  Args:
    tree: a variables tree or any sub-tree of one (`{'params': ...}`, a `DeepLabV3Plus`'s
      params with a `backbone` entry, a backbone's batch stats, ...); leaves may be arrays
      or `jax.ShapeDtypeStruct`s.

  Returns:
    The same tree with every `layerK_scanF` entry whose leaves are `[L, ...]` replaced by
    `layerK_F`, ..., `layerK_{F+L-1}` holding slice i of every leaf; other entries as given.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    match = _SCAN_NAME.match(key) if isinstance(key, str) else None
    if match and isinstance(value, Mapping):
      stage, first = match.group(1), int(match.group(2))
      for i in range(_run_length(value)):
        out[f'{stage}_{first + i}'] = jax.tree.map(lambda x, i=i: _slice(x, i), dict(value))
    else:
      out[key] = unstack_blocks(value)
  return out


def stack_blocks(tree: PyTree, like: PyTree) -> PyTree:
  """One entry per block -> the layout of `like` (the inverse of `unstack_blocks`).

  Args:
    tree: a tree in torchvision's layout (`layerK_i` entries), e.g. from `unstack_blocks` or
      from an unscanned model (`scan_blocks=False`).
    like: the target layout, e.g. the scanned model's variables or `jax.eval_shape` of its
      `init`: its `layerK_scanF` entries of `[L, ...]` leaves are built by stacking blocks
      F..F+L-1 of `tree`; every other entry is taken from `tree` as it is.

  Returns:
    A tree with the structure of `like` and the values of `tree`.

  Raises:
    KeyError: `tree` lacks an entry `like` needs.
  """
  if not isinstance(like, Mapping):
    return tree
  out = {}
  for key, ref in like.items():
    match = _SCAN_NAME.match(key) if isinstance(key, str) else None
    if match and isinstance(ref, Mapping):
      stage, first = match.group(1), int(match.group(2))
      blocks = [f'{stage}_{first + i}' for i in range(_run_length(ref))]
      missing = [b for b in blocks if b not in tree]
      if missing:
        raise KeyError(f'no entries {missing} to stack into {key!r}')
      out[key] = jax.tree.map(lambda *xs: _stack(xs), *[dict(tree[b]) for b in blocks])
    else:
      if key not in tree:
        raise KeyError(f'no entry {key!r} in the tree to convert')
      out[key] = stack_blocks(tree[key], ref)
  return out


def _torch_entries(params: PyTree, batch_stats: PyTree) -> Dict[str, Tuple[str, tuple]]:
  """`{torch key: (collection, flax path)}` for every leaf of the two trees."""
  leaf_names = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}
  entries = {}
  for collection, tree in (('params', params), ('batch_stats', batch_stats)):
    for path in traverse_util.flatten_dict(flax.core.unfreeze(tree)):
      leaf = leaf_names.get((collection, path[-1]))
      if leaf is None:
        raise ValueError(f'no torch name for {collection} leaf {path}')
      module = '.'.join(part.replace('_', '.') for part in path[:-1])
      entries[f'{module}.{leaf}'] = (collection, path)
  return entries


def _to_torch_layout(array: np.ndarray, path: tuple) -> np.ndarray:
  if path[-1] == 'kernel':
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T
  return array


def _torch_shape(shape: Sequence[int], path: tuple) -> Tuple[int, ...]:
  shape = tuple(shape)
  if path[-1] == 'kernel':
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
  return shape


def _from_torch_layout(array: np.ndarray, path: tuple) -> np.ndarray:
  if path[-1] == 'kernel':
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T
  return array


def _default_scope(params: PyTree) -> Tuple[str, ...]:
  return ('backbone',) if 'backbone' in params else ()


def _get(tree: PyTree, scope: Sequence[str]) -> PyTree:
  for key in scope:
    tree = tree[key]
  return tree


def _set(tree: PyTree, scope: Sequence[str], value: PyTree) -> PyTree:
  if not scope:
    return value
  tree = dict(tree)
  tree[scope[0]] = _set(tree[scope[0]], scope[1:], value)
  return tree


def load_torchvision_weights(params: PyTree, batch_stats: PyTree, source: Source, *,
                             scope: Optional[Sequence[str]] = None, prefix: str = '',
                             strict: bool = True) -> Tuple[PyTree, PyTree, LoadReport]:
  """Copies a torchvision-format ResNet state dict into our backbone.

  Args:
    params: model parameters (arrays, or `jax.ShapeDtypeStruct`s from `jax.eval_shape`:
      loaded leaves become arrays, missing ones stay as they are; a stacked leaf of scanned
      blocks becomes an array when every block's slice is loaded), in either block layout.
    batch_stats: model BN statistics, same convention.
    source: file or mapping, see `read_state_dict`.
    scope: keys leading to the backbone inside `params`/`batch_stats`; default
      `('backbone',)` when present (a `DeepLabV3Plus`), else the whole tree (a `ResNet`).
    prefix: only state-dict keys starting with it are used, with it removed (e.g.
      'encoder.' for a U2PL full-model checkpoint); other keys are reported as skipped.
    strict: raise unless every backbone entry is loaded and every key is used.

  Returns:
    `(params, batch_stats, report)`: updated copies (dtypes kept) and a `LoadReport`.

  Raises:
    ValueError: with `strict`, naming the missing / unexpected keys and mismatched shapes.
  """
  scope = _default_scope(params) if scope is None else tuple(scope)
  layout_params = flax.core.unfreeze(_get(params, scope))
  layout_stats = flax.core.unfreeze(_get(batch_stats, scope))
  sub_params = unstack_blocks(layout_params)
  sub_stats = unstack_blocks(layout_stats)
  entries = _torch_entries(sub_params, sub_stats)
  flat = {'params': traverse_util.flatten_dict(sub_params),
          'batch_stats': traverse_util.flatten_dict(sub_stats)}
  report = LoadReport()
  used = set()
  for key, array in read_state_dict(source).items():
    if not key.startswith(prefix):
      report.skipped.append(key)
      continue
    name = key[len(prefix):]
    if name.endswith(_SKIPPED_SUFFIXES) or name.startswith(_SKIPPED_PREFIXES):
      report.skipped.append(key)
      continue
    if name not in entries:
      report.unexpected.append(key)
      continue
    collection, path = entries[name]
    target = flat[collection][path]
    expected = _torch_shape(target.shape, path)
    used.add(name)
    if tuple(array.shape) != expected:
      report.shape_mismatch.append((key, tuple(array.shape), expected))
      continue
    flat[collection][path] = jnp.asarray(_from_torch_layout(array, path), target.dtype)
    report.loaded.append(key)
  report.missing = [prefix + k for k in entries if k not in used]
  if strict and not report.ok:
    raise ValueError('torchvision state dict does not match the backbone: ' + report.summary())
  params = _set(flax.core.unfreeze(params), scope,
                stack_blocks(traverse_util.unflatten_dict(flat['params']), layout_params))
  batch_stats = _set(flax.core.unfreeze(batch_stats), scope,
                     stack_blocks(traverse_util.unflatten_dict(flat['batch_stats']),
                                  layout_stats))
  return params, batch_stats, report


def backbone_state_dict(params: PyTree, batch_stats: PyTree, *,
                        scope: Optional[Sequence[str]] = None,
                        num_batches_tracked: bool = True) -> Dict[str, np.ndarray]:
  """Our backbone as a torchvision-named state dict (float32, torch layouts).

  Args:
    params: model parameters.
    batch_stats: model BN statistics.
    scope: as in `load_torchvision_weights`.
    num_batches_tracked: add int64 `num_batches_tracked` zeros for each BN, so that
      `torch_resnet.load_state_dict(sd, strict=False)` reports only `fc.*` missing.

  Returns:
    `{torch key: np.ndarray}`.
  """
  scope = _default_scope(params) if scope is None else tuple(scope)
  sub_params = unstack_blocks(flax.core.unfreeze(_get(params, scope)))
  sub_stats = unstack_blocks(flax.core.unfreeze(_get(batch_stats, scope)))
  trees = {'params': sub_params, 'batch_stats': sub_stats}
  out = {}
  for key, (collection, path) in _torch_entries(sub_params, sub_stats).items():
    leaf = trees[collection]
    for part in path:
      leaf = leaf[part]
    out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(leaf, np.float32), path))
    if num_batches_tracked and key.endswith('.running_mean'):
      out[key[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out


def save_torchvision_safetensors(path: Union[str, os.PathLike], params: PyTree,
                                 batch_stats: PyTree, *, scope: Optional[Sequence[str]] = None,
                                 num_batches_tracked: bool = True) -> None:
  """Writes `backbone_state_dict(...)` to a `.safetensors` file (readable by torch too)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(backbone_state_dict(params, batch_stats, scope=scope,
                                num_batches_tracked=num_batches_tracked), os.fspath(path))


def checkpoint_stem(state_dict: Mapping[str, Any]) -> Optional[str]:
  """'deep' (U2PL-family `conv1.0.weight`), 'torchvision' (`conv1.weight`) or None."""
  names = {k[len('module.'):] if k.startswith('module.') else k for k in state_dict}
  if 'conv1.0.weight' in names:
    return 'deep'
  if 'conv1.weight' in names:
    return 'torchvision'
  return None


def load_backbone(source: Source, params: PyTree, batch_stats: PyTree, *,
                  stem: Optional[str] = None, strict: bool = True, prefix: str = '',
                  scope: Optional[Sequence[str]] = None) -> Tuple[PyTree, PyTree, LoadReport]:
  """`load_torchvision_weights` with the checkpoint first, and a stem check.

  Args:
    source: checkpoint file or mapping, see `read_state_dict`.
    params: model parameters.
    batch_stats: model BN statistics.
    stem: the model's stem ('torchvision', 'deep' or 'small', e.g. `model.backbone.stem`);
      when given, a checkpoint of the other naming is an error even with `strict=False`
      (the stem would silently stay random).
    strict: as in `load_torchvision_weights`.
    prefix: as in `load_torchvision_weights`.
    scope: as in `load_torchvision_weights`.

  Returns:
    `(params, batch_stats, report)`.
  """
  state_dict = read_state_dict(source)
  found = checkpoint_stem({k[len(prefix):]: v for k, v in state_dict.items()
                           if k.startswith(prefix)})
  # The small CPU stem is named like torchvision's (`conv1`, `bn1`).
  expected = {'small': 'torchvision'}.get(stem, stem)
  if expected is not None and found is not None and found != expected:
    raise ValueError(f'checkpoint has a {found!r} stem but the model a {stem!r} one; set the '
                     "model's `stem` to match (deep = U2PL/DGCL/DSSN ResNet-v1c weights)")
  return load_torchvision_weights(params, batch_stats, state_dict, scope=scope, prefix=prefix,
                                  strict=strict)
