"""Segmentation models (flax.linen): ResNet backbones, DeepLabv3+, per-pixel heads.

`registry.build_model(name, num_classes, **kwargs)` is the entry point for configs;
`weights.load_torchvision_weights` loads ImageNet backbones from torchvision-format
state dicts.
"""

from semijax.models.alonso_heads import ClassAttention as ClassAttention
from semijax.models.deeplab import ASPP, DeepLabV3Plus, FCNHead
from semijax.models.deeplabv2 import DeepLabV2 as DeepLabV2
from semijax.models.heads import ConvProjection, PixelMLP, RepresentationHead
from semijax.models.layers import BatchNorm
from semijax.models.registry import build_model, model_names
from semijax.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, small_resnet
from semijax.models.weights import (
  LoadReport,
  backbone_state_dict,
  load_backbone,
  load_torchvision_weights,
  read_state_dict,
  save_torchvision_safetensors,
)

__all__ = [
    'ASPP', 'BatchNorm', 'ConvProjection', 'DeepLabV3Plus', 'FCNHead', 'LoadReport',
    'PixelMLP', 'RepresentationHead', 'ResNet', 'backbone_state_dict', 'build_model',
    'load_backbone', 'load_torchvision_weights', 'model_names', 'read_state_dict',
    'resnet18', 'resnet34', 'resnet50', 'resnet101', 'save_torchvision_safetensors',
    'small_resnet',
]
