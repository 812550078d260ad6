"""`build_model(name, num_classes, **kwargs)`: the models a config can name.

Keyword arguments are routed by name: `ResNet` attributes go to the backbone,
`DeepLabV3Plus` attributes to the segmenter. `dtype`, `bn_axis_name` and
`bn_batch_groups` go to the backbone, the segmenter and every extra head that has them,
so one switch gives SyncBN / bf16 everywhere.
"""

import dataclasses
from typing import Any, Dict

from semijax.models import deeplab, resnet

_SHARED = ('dtype', 'bn_axis_name', 'bn_batch_groups')

# Segmenter defaults of the CPU model: the full-size head (256 channels, 3x3 ASPP fusion)
# would cost far more than the small backbone.
_SMALL_HEAD = dict(aspp_channels=32, aspp_project_kernel=1, low_level_channels=16,
                   decoder_channels=32)

_MODELS: Dict[str, tuple] = {
    'deeplabv3plus_resnet50': (resnet.resnet50, dict(output_stride=16), {}),
    'deeplabv3plus_resnet101': (resnet.resnet101, dict(output_stride=16), {}),
    'deeplabv3plus_small': (resnet.small_resnet, {}, _SMALL_HEAD),
}


def _fields(cls) -> set:
  return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}


def model_names() -> list:
  """The valid `build_model` names."""
  return sorted(_MODELS)


def build_model(name: str, num_classes: int, **kwargs: Any) -> deeplab.DeepLabV3Plus:
  """Builds a segmenter by name.

  Args:
    name: one of `model_names()`, e.g. 'deeplabv3plus_resnet101'.
    num_classes: classifier outputs.
    **kwargs: `ResNet` attributes (e.g. `stem='deep'`, `output_stride=8`,
      `multi_grid=(1, 2, 4)`, `remat='blocks'` (config `model.remat`), `scan_blocks=False`
      for one module per block; for 'deeplabv3plus_small' `small_resnet`'s arguments such
      as `widths`, `stage_sizes`, `block`, `stem_width`, `stem_stride`, `stem_pool`) and
      `DeepLabV3Plus` attributes (e.g. `aux_head=True`, `heads={...}`,
      `low_level_channels=256`).

  Returns:
    An unbound `DeepLabV3Plus`.

  Raises:
    ValueError: for an unknown name or keyword, listing the valid ones.
  """
  if name not in _MODELS:
    raise ValueError(f'unknown model {name!r}; valid names: {model_names()}')
  backbone_fn, backbone_defaults, head_defaults = _MODELS[name]
  backbone_keys = _fields(resnet.ResNet) - {'stage_sizes'}
  if backbone_fn is resnet.small_resnet:  # its own argument names, stem fixed
    backbone_keys = (backbone_keys - {'stem', 'small_stem_stride', 'small_stem_pool'}) | {
        'stage_sizes', 'stem_stride', 'stem_pool'}
  model_keys = _fields(deeplab.DeepLabV3Plus) - {'num_classes', 'backbone'}
  unknown = set(kwargs) - backbone_keys - model_keys
  if unknown:
    raise ValueError(f'unknown arguments {sorted(unknown)} for {name!r}; valid: '
                     f'{sorted(backbone_keys | model_keys)}')

  shared = {k: kwargs[k] for k in _SHARED if k in kwargs}
  backbone_kwargs = {**backbone_defaults,
                     **{k: v for k, v in kwargs.items() if k in backbone_keys}}
  model_kwargs = {**head_defaults, **{k: v for k, v in kwargs.items() if k in model_keys}}
  if model_kwargs.get('heads'):
    model_kwargs['heads'] = {k: _with_shared(h, shared) for k, h in model_kwargs['heads'].items()}
  return deeplab.DeepLabV3Plus(num_classes=num_classes, backbone=backbone_fn(**backbone_kwargs),
                               **model_kwargs)


def _with_shared(head: Any, shared: Dict[str, Any]) -> Any:
  """`head` with the model-wide dtype / BN settings it has fields for."""
  own = {k: v for k, v in shared.items() if k in _fields(type(head))}
  return head.clone(**own) if own else head

