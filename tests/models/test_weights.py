"""Loading torchvision-format state dicts (and writing ours in that format)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from semijax.models import registry, resnet, weights

from .test_resnet import random_variables


def torchvision_state_dict(stage_sizes, *, stem='torchvision', widths=(64, 128, 256, 512),
                           stem_width=64, seed=0, fc=True):
  """A state dict with torchvision's (or U2PL's deep-stem) exact names and shapes."""
  rng = np.random.default_rng(seed)
  sd = {}

  def conv(name, out_ch, in_ch, k):
    sd[f'{name}.weight'] = rng.standard_normal((out_ch, in_ch, k, k), np.float32)

  def bn(name, ch):
    sd[f'{name}.weight'] = rng.uniform(0.5, 1.5, ch).astype(np.float32)
    sd[f'{name}.bias'] = rng.standard_normal(ch, np.float32)
    sd[f'{name}.running_mean'] = rng.standard_normal(ch, np.float32)
    sd[f'{name}.running_var'] = rng.uniform(0.5, 1.5, ch).astype(np.float32)
    sd[f'{name}.num_batches_tracked'] = np.array(7, np.int64)

  if stem == 'torchvision':
    conv('conv1', stem_width, 3, 7)
    bn('bn1', stem_width)
    channels = stem_width
  else:  # U2PL/DGCL/DSSN: conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv)
    conv('conv1.0', stem_width, 3, 3)
    bn('conv1.1', stem_width)
    conv('conv1.3', stem_width, stem_width, 3)
    bn('conv1.4', stem_width)
    conv('conv1.6', 2 * stem_width, stem_width, 3)
    bn('bn1', 2 * stem_width)
    channels = 2 * stem_width
  for i, (width, blocks) in enumerate(zip(widths, stage_sizes)):
    for j in range(blocks):
      p = f'layer{i + 1}.{j}'
      conv(f'{p}.conv1', width, channels, 1)
      bn(f'{p}.bn1', width)
      conv(f'{p}.conv2', width, width, 3)
      bn(f'{p}.bn2', width)
      conv(f'{p}.conv3', 4 * width, width, 1)
      bn(f'{p}.bn3', 4 * width)
      if j == 0 and (i > 0 or channels != 4 * width):  # torchvision's rule, no dilation
        conv(f'{p}.downsample.0', 4 * width, channels, 1)
        bn(f'{p}.downsample.1', 4 * width)
      channels = 4 * width
  if fc:
    sd['fc.weight'] = rng.standard_normal((1000, channels), np.float32)
    sd['fc.bias'] = rng.standard_normal(1000, np.float32)
  return sd


def _abstract_variables(model, size=33):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_resnet50_torchvision_names_load_completely():
  model = registry.build_model('deeplabv3plus_resnet50', 21)
  variables = _abstract_variables(model)
  sd = torchvision_state_dict((3, 4, 6, 3))
  params, stats, report = weights.load_torchvision_weights(
      variables['params'], variables['batch_stats'], sd)
  assert report.ok and not report.missing and not report.unexpected
  assert not report.shape_mismatch
  assert sorted(report.skipped) == sorted(
      [k for k in sd if k.endswith('num_batches_tracked') or k.startswith('fc.')])
  assert len(report.loaded) == len(sd) - len(report.skipped)
  backbone = traverse_util.flatten_dict({'p': params['backbone'], 's': stats['backbone']})
  assert all(isinstance(v, jax.Array) for v in backbone.values())
  # The head is untouched (still abstract here).
  assert isinstance(params['aspp']['b0_conv']['kernel'], jax.ShapeDtypeStruct)
  np.testing.assert_array_equal(params['backbone']['conv1']['kernel'],
                                sd['conv1.weight'].transpose(2, 3, 1, 0))
  # ResNet-50's identical blocks are scanned (stacked); torchvision's per-block view:
  assert 'layer3_scan1' in params['backbone']
  blk = weights.unstack_blocks(params['backbone'])['layer3_5']
  np.testing.assert_array_equal(blk['conv2']['kernel'],
                                sd['layer3.5.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(blk['bn2']['scale'], sd['layer3.5.bn2.weight'])
  np.testing.assert_array_equal(stats['backbone']['layer4_0']['downsample_1']['var'],
                                sd['layer4.0.downsample.1.running_var'])


def test_deep_stem_checkpoint_with_wrappers_and_prefix():
  model = resnet.ResNet(stage_sizes=(1, 2, 1, 1), widths=(4, 4, 8, 8), stem='deep',
                        stem_width=8)
  variables = _abstract_variables(model)
  sd = torchvision_state_dict((1, 2, 1, 1), stem='deep', widths=(4, 4, 8, 8), stem_width=8)
  wrapped = {'state_dict': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 3}
  params, stats, report = weights.load_torchvision_weights(
      variables['params'], variables['batch_stats'], wrapped)
  assert report.ok and len(report.loaded) == len(sd) - len(report.skipped)
  np.testing.assert_array_equal(params['conv1_6']['kernel'],
                                sd['conv1.6.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(stats['conv1_4']['mean'], sd['conv1.4.running_mean'])
  # A full-model checkpoint (U2PL saves the encoder under `encoder.`).
  full = {'model_state': {**{f'encoder.{k}': v for k, v in sd.items()},
                          'decoder.head.0.weight': np.zeros((3, 3))}}
  _, _, report = weights.load_torchvision_weights(
      variables['params'], variables['batch_stats'], full, prefix='encoder.')
  assert report.ok and 'decoder.head.0.weight' in report.skipped


def test_strict_errors_name_keys_and_shapes():
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), widths=(4, 4, 4, 4), stem_width=8)
  variables = _abstract_variables(model)
  sd = torchvision_state_dict((1, 1, 1, 1), widths=(4, 4, 4, 4), stem_width=8)
  del sd['layer2.0.bn1.running_var']
  sd['layer3.0.conv2.weight'] = np.zeros((4, 4, 5, 5), np.float32)
  sd['layer9.0.conv1.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as err:
    weights.load_torchvision_weights(variables['params'], variables['batch_stats'], sd)
  message = str(err.value)
  for part in ('layer2.0.bn1.running_var', 'layer9.0.conv1.weight',
               'layer3.0.conv2.weight: checkpoint (4, 4, 5, 5) vs model (4, 4, 3, 3)'):
    assert part in message
  params, stats, report = weights.load_torchvision_weights(
      variables['params'], variables['batch_stats'], sd, strict=False)
  assert report.missing == ['layer2.0.bn1.running_var']
  assert report.unexpected == ['layer9.0.conv1.weight']
  assert report.shape_mismatch == [('layer3.0.conv2.weight', (4, 4, 5, 5), (4, 4, 3, 3))]
  assert isinstance(stats['layer2_0']['bn1']['var'], jax.ShapeDtypeStruct)
  assert isinstance(params['layer3_0']['conv2']['kernel'], jax.ShapeDtypeStruct)
  assert isinstance(params['layer3_0']['conv1']['kernel'], jax.Array)


def test_safetensors_round_trip(tmp_path):
  model = registry.build_model('deeplabv3plus_small', 4, block='bottleneck', stem_pool=False)
  x = jnp.zeros((1, 16, 16, 3))
  variables = random_variables(model, x)
  path = tmp_path / 'backbone.safetensors'
  weights.save_torchvision_safetensors(path, variables['params'], variables['batch_stats'])
  sd = weights.read_state_dict(path)
  assert sd['layer1.0.downsample.0.weight'].shape == (64, 16, 1, 1)
  assert sd['layer1.0.bn1.num_batches_tracked'].dtype == np.int64
  fresh = jax.eval_shape(model.init, jax.random.key(0), x)
  params, stats, report = weights.load_torchvision_weights(fresh['params'],
                                                           fresh['batch_stats'], path)
  assert report.ok
  for a, b in zip(jax.tree.leaves((params['backbone'], stats['backbone'])),
                  jax.tree.leaves((variables['params']['backbone'],
                                   variables['batch_stats']['backbone']))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec('torch') is not None, reason='torch installed')
def test_pickle_checkpoint_without_torch_is_a_clear_error(tmp_path):
  with pytest.raises(ImportError, match='needs torch'):
    weights.read_state_dict(tmp_path / 'resnet101.pth')


def test_load_backbone_checks_the_stem(tmp_path):
  # Output stride 32: every stage strides, so each has the projection the generator writes.
  model = registry.build_model('deeplabv3plus_small', 3, block='bottleneck', output_stride=32,
                               stage_sizes=(1, 1, 1, 1), widths=(4, 4, 4, 4), stem_width=8)
  variables = _abstract_variables(model, size=16)
  deep = torchvision_state_dict((1, 1, 1, 1), stem='deep', widths=(4, 4, 4, 4), stem_width=8)
  with pytest.raises(ValueError, match="'deep' stem but the model a 'torchvision'"):
    weights.load_backbone(deep, variables['params'], variables['batch_stats'],
                          stem='torchvision', strict=False)
  # The small stem is named like torchvision's (`conv1`, `bn1`), 3x3 instead of 7x7.
  tv = torchvision_state_dict((1, 1, 1, 1), widths=(4, 4, 4, 4), stem_width=8)
  tv['conv1.weight'] = tv['conv1.weight'][:, :, 2:5, 2:5]
  path = tmp_path / 'tv.safetensors'
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(tv, str(path))
  _, _, report = weights.load_backbone(path, variables['params'], variables['batch_stats'],
                                       stem='torchvision', strict=False)
  assert report.summary().splitlines()[0] == (
      f'loaded {len(report.loaded)}, missing 0, unexpected 0, shape mismatches 0, '
      f'skipped {len(report.skipped)}')
  assert weights.checkpoint_stem(deep) == 'deep' and weights.checkpoint_stem(tv) == 'torchvision'


# ----------------------------------------------------------------------------------------
# Scanned (stacked) block layout (issue 17).


def _scan_pair(**kwargs):
  kw = dict(stage_sizes=(2, 3, 1, 3), widths=(4, 4, 8, 8), stem='deep', stem_width=8, **kwargs)
  return resnet.ResNet(scan_blocks=False, **kw), resnet.ResNet(**kw)


def test_scanned_model_loads_and_writes_torchvision_names():
  plain, scanned = _scan_pair()
  sd = torchvision_state_dict((2, 3, 1, 3), stem='deep', widths=(4, 4, 8, 8), stem_width=8)
  x = jnp.zeros((1, 33, 33, 3))
  loaded = {}
  for name, model in (('plain', plain), ('scanned', scanned)):
    v = _abstract_variables(model)
    params, stats, report = weights.load_torchvision_weights(v['params'], v['batch_stats'], sd)
    assert report.ok and len(report.loaded) == len(sd) - len(report.skipped), name
    loaded[name] = {'params': params, 'batch_stats': stats}
  assert loaded['scanned']['params']['layer2_scan1']['conv1']['kernel'].shape == (2, 1, 1, 16, 4)
  np.testing.assert_array_equal(loaded['scanned']['params']['layer2_scan1']['bn3']['bias'][1],
                                sd['layer2.2.bn3.bias'])
  # Same weights, same network.
  x = jax.random.uniform(jax.random.key(0), (2, 33, 33, 3))
  out_plain = jax.jit(plain.apply)(loaded['plain'], x)
  out_scanned = jax.jit(scanned.apply)(loaded['scanned'], x)
  for k in out_plain:
    np.testing.assert_allclose(out_plain[k], out_scanned[k], rtol=1e-5, atol=1e-5)
  # Written back: torchvision's names and values, whatever the layout.
  for name in ('plain', 'scanned'):
    back = weights.backbone_state_dict(loaded[name]['params'], loaded[name]['batch_stats'])
    assert set(back) == {k for k in sd if not k.startswith('fc.')}, name
    for k, v in back.items():
      if not k.endswith('num_batches_tracked'):
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_stack_and_unstack_blocks_are_inverse():
  plain, scanned = _scan_pair(multi_grid=(1, 2, 4), output_stride=8)
  x = jnp.zeros((1, 33, 33, 3))
  variables = random_variables(plain, x)
  like = jax.eval_shape(scanned.init, jax.random.key(0), x)
  stacked = weights.stack_blocks(variables, like)
  assert jax.tree.structure(stacked) == jax.tree.structure(like)
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, like)
  assert 'layer4_1' in stacked['params']   # multi-grid: layer4 blocks stay single
  back = weights.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  # Abstract trees convert too; a missing block is named.
  abstract = weights.unstack_blocks(like)
  assert abstract['params']['layer2_2']['conv2']['kernel'].shape == (3, 3, 4, 4)
  del back['params']['layer2_2']
  with pytest.raises(KeyError, match='layer2_2'):
    weights.stack_blocks(back, like)
  # A partial load into an abstract scanned tree keeps the incomplete stack abstract.
  sd = torchvision_state_dict((2, 3, 1, 3), stem='deep', widths=(4, 4, 8, 8), stem_width=8)
  del sd['layer2.1.conv1.weight']
  params, _, report = weights.load_torchvision_weights(like['params'], like['batch_stats'], sd,
                                                       strict=False)
  assert report.missing == ['layer2.1.conv1.weight']
  assert isinstance(params['layer2_scan1']['conv1']['kernel'], jax.ShapeDtypeStruct)
  assert isinstance(params['layer2_scan1']['conv2']['kernel'], jax.Array)
