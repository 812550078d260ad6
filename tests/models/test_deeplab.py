"""DeepLabv3+: shapes, analytic parameter counts, encode/decode, dtypes, heads, registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.models import deeplab, heads, registry, resnet

from .test_resnet import random_variables

NUM_CLASSES = 21


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, size=65, batch=2, **kwargs):
  """(outputs, variables) shapes without running anything."""
  return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, **kwargs),
                        jnp.zeros((batch, size, size, 3)))


def _head_count(*, c4=2048, c1=256, aspp=256, low=48, dec=256, classes=NUM_CLASSES,
                project_kernel=3, bias=True):
  """Parameters of the DeepLabv3+ head, from U2PL/DGCL's layer list."""
  bn = lambda c: 2 * c
  b = lambda c: c if bias else 0
  n = 2 * (c4 * aspp + bn(aspp))  # image-pool branch and 1x1 branch
  n += 3 * (9 * c4 * aspp + bn(aspp))  # three atrous branches
  n += project_kernel ** 2 * 5 * aspp * aspp + bn(aspp)  # fusion conv, no bias
  n += c1 * low + b(low) + bn(low)  # low-level projection
  n += 9 * (low + aspp) * dec + b(dec) + bn(dec)  # decoder conv 1
  n += 9 * dec * dec + b(dec) + bn(dec)  # decoder conv 2
  return n + dec * classes + classes  # classifier


@pytest.mark.parametrize('stem', ['torchvision', 'deep'])
@pytest.mark.parametrize('output_stride', [8, 16])
def test_output_shapes(stem, output_stride):
  model = registry.build_model('deeplabv3plus_resnet50', NUM_CLASSES, stem=stem,
                               output_stride=output_stride, aux_head=True)
  out, _ = _abstract(model)
  e = 9 if output_stride == 8 else 5
  assert {k: v.shape for k, v in out.items()} == {
      'logits': (2, 17, 17, NUM_CLASSES), 'decoder': (2, 17, 17, 256),
      'concat': (2, 17, 17, 304), 'aspp': (2, e, e, 256), 'encoder': (2, e, e, 2048),
      'low_level': (2, 17, 17, 256), 'layer3': (2, e, e, 1024),
      'aux_logits': (2, e, e, NUM_CLASSES)}
  assert deeplab.default_aspp_rates(output_stride) == ((12, 24, 36) if output_stride == 8
                                                       else (6, 12, 18))


def test_head_parameter_counts():
  model = registry.build_model('deeplabv3plus_resnet101', NUM_CLASSES, stem='deep',
                               multi_grid=(1, 2, 4))
  _, variables = _abstract(model, size=33, batch=1)
  params = variables['params']
  backbone = _count(params.pop('backbone'))
  assert backbone == 42_500_160 - 9_536 + 112_832 + 64 * 64 + 64 * 256  # deep stem
  assert _count(params) == _head_count()
  # U2PL/CSC: 256-channel low-level projection, representation head on the 512-d concat.
  model = registry.build_model(
      'deeplabv3plus_resnet50', 19, low_level_channels=256, aux_head=True,
      heads={'rep': heads.RepresentationHead()})
  _, variables = _abstract(model, size=33, batch=1)
  params = variables['params']
  params.pop('backbone')
  rep = _count(params.pop('heads_rep'))
  aux = _count(params.pop('aux'))
  assert _count(params) == _head_count(low=256, classes=19)
  assert rep == 9 * 512 * 256 + 256 + 512 + 9 * 256 * 256 + 256 + 512 + 256 * 256 + 256
  assert aux == 9 * 1024 * 256 + 256 + 512 + 256 * 19 + 19
  # The paper / UniMatch variant: 1x1 fusion, no decoder biases.
  model = registry.build_model('deeplabv3plus_resnet50', NUM_CLASSES, aspp_project_kernel=1,
                               decoder_bias=False)
  _, variables = _abstract(model, size=33, batch=1)
  variables['params'].pop('backbone')
  assert _count(variables['params']) == _head_count(project_kernel=1, bias=False)
  # CAC's dropout layout (0.5 / none / 0.1 before the classifier) adds no parameters.
  cac = registry.build_model('deeplabv3plus_resnet50', NUM_CLASSES, aspp_project_kernel=1,
                             decoder_bias=False, aspp_dropout=0.5, decoder_dropout=(0.5, 0.0),
                             classifier_dropout=0.1, dropout_2d=False)
  out, variables = _abstract(cac, size=33, batch=1)
  variables['params'].pop('backbone')
  assert _count(variables['params']) == _head_count(project_kernel=1, bias=False)
  assert out['logits'].shape == (1, 9, 9, NUM_CLASSES)


def _small(**kwargs):
  return registry.build_model('deeplabv3plus_small', 5, **kwargs)


def test_encode_decode_equals_call():
  model = _small(aux_head=True)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = random_variables(model, x)
  rngs = {'dropout': jax.random.key(3)}

  @jax.jit
  def run(v, a):
    outs = []
    for train in (False, True):
      feats = model.apply(v, a, train, method='encode', mutable=['batch_stats'])[0]
      split = model.apply(v, feats, train, method='decode', rngs=rngs, mutable=['batch_stats'])
      outs.append((split[0], model.apply(v, a, train, rngs=rngs, mutable=['batch_stats'])[0]))
    return outs

  for split, full in run(variables, x):
    assert split.keys() == full.keys()
    for k in full:
      np.testing.assert_allclose(split[k], full[k], rtol=1e-6, atol=1e-6, err_msg=k)
  eval_out = run(variables, x)[0][1]
  assert eval_out['logits'].shape == (2, 8, 8, 5)
  assert eval_out['aux_logits'].shape == (2, 4, 4, 5)


def test_train_mode_dropout_and_batch_stats():
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = random_variables(model, x)

  @jax.jit
  def run(v, a, key):
    return model.apply(v, a, True, rngs={'dropout': key}, mutable=['batch_stats'])

  (out1, state), (out2, _) = run(variables, x, jax.random.key(1)), run(variables, x,
                                                                          jax.random.key(2))
  assert not np.allclose(out1['logits'], out2['logits'])
  assert set(state['batch_stats']) == set(variables['batch_stats'])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_normalisation_and_dtype():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  model = _small()
  raw = _small(mean=None, std=None)
  variables = random_variables(model, x)
  normalised = (x - jnp.asarray((0.485, 0.456, 0.406))) / jnp.asarray((0.229, 0.224, 0.225))
  a = jax.jit(model.apply)(variables, x)['logits']
  b = jax.jit(raw.apply)(variables, normalised)['logits']
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # bf16 compute: bf16 activations and logits (losses cast), float32 parameters.
  bf16 = _small(dtype=jnp.bfloat16, heads={'proj': heads.PixelMLP(16, 8)})
  v16 = random_variables(bf16, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v16))
  out = jax.jit(bf16.apply)(v16, x)
  assert {k: v.dtype for k, v in out.items()} == {k: jnp.bfloat16 for k in out}
  assert bf16.backbone.dtype == jnp.bfloat16 and bf16.heads['proj'].dtype == jnp.bfloat16
  # Same network: bf16 logits within a few percent of the float32 ones' scale.
  ref = np.asarray(jax.jit(model.apply)(v16, x)['logits'])
  assert np.abs(np.asarray(out['logits'], np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_heads_by_name_and_source():
  model = _small(heads={
      'projection': heads.PixelMLP(16, 12),
      'prediction': heads.PixelMLP(16, 12, source='projection'),
      'cac': heads.ConvProjection(16, 8),
      'rep': heads.RepresentationHead(16, 10, source='concat'),
      'plain': heads.PixelMLP(8, 4, norm=False, source='encoder'),
  })
  out, variables = _abstract(model, size=32)
  assert {k: out[k].shape for k in ('projection', 'prediction', 'cac', 'rep', 'plain')} == {
      'projection': (2, 8, 8, 12), 'prediction': (2, 8, 8, 12), 'cac': (2, 8, 8, 8),
      'rep': (2, 8, 8, 10), 'plain': (2, 4, 4, 4)}
  params = variables['params']
  assert params['heads_projection']['fc1']['kernel'].shape == (32, 16)
  assert params['heads_prediction']['fc1']['kernel'].shape == (12, 16)
  assert set(params['heads_plain']) == {'fc1', 'fc2'}
  assert set(variables['batch_stats']['heads_projection']) == {'bn'}
  with pytest.raises(KeyError, match='nowhere'):
    _abstract(_small(heads={'bad': heads.PixelMLP(source='nowhere')}), size=32)
  with pytest.raises(ValueError, match='clashes'):
    _abstract(_small(heads={'logits': heads.PixelMLP()}), size=32)


def test_decode_on_channel_dropped_features():
  """DSSN's feature perturbation: decode [clean; dropped] copies of layer1 and layer4."""
  model = _small()
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = random_variables(model, x)

  @jax.jit
  def run(v, a, key):
    feats = model.apply(v, a, False, method='encode')
    keys = jax.random.split(key, 2)
    dropped = {}
    for k, name in zip(keys, ('layer1', 'layer4')):
      f = feats[name]
      keep = jax.random.bernoulli(k, 0.5, (f.shape[0], 1, 1, f.shape[-1]))
      dropped[name] = jnp.concatenate([f, jnp.where(keep, f * 2, 0)])
    return model.apply(v, dropped, False, method='decode'), model.apply(v, a, False)

  perturbed, clean = run(variables, x, jax.random.key(1))
  assert perturbed['logits'].shape == (4, 8, 8, 5)
  assert 'layer3' not in perturbed
  np.testing.assert_allclose(perturbed['logits'][:2], clean['logits'], rtol=1e-5, atol=1e-5)
  assert not np.allclose(perturbed['logits'][2:], clean['logits'])


def test_registry():
  assert registry.model_names() == ['deeplabv3plus_resnet101', 'deeplabv3plus_resnet50',
                                    'deeplabv3plus_small']
  with pytest.raises(ValueError, match='deeplabv3plus_resnet101'):
    registry.build_model('deeplabv3_resnet50', 21)
  with pytest.raises(ValueError, match="'output_stride'"):
    registry.build_model('deeplabv3plus_resnet50', 21, outputstride=8)
  with pytest.raises(ValueError, match='unknown arguments'):
    registry.build_model('deeplabv3plus_small', 21, stem='deep')
  model = registry.build_model('deeplabv3plus_resnet101', 19, stem='deep', output_stride=8,
                               bn_axis_name='batch', bn_batch_groups=2,
                               heads={'rep': heads.PixelMLP()})
  assert isinstance(model.backbone, resnet.ResNet)
  assert model.backbone.stage_sizes == (3, 4, 23, 3) and model.backbone.output_stride == 8
  assert model.bn_axis_name == model.backbone.bn_axis_name == 'batch'
  assert model.heads['rep'].bn_axis_name == 'batch' and model.heads['rep'].bn_batch_groups == 2
  small = registry.build_model('deeplabv3plus_small', 3, stem_stride=1, widths=(8, 8, 8, 8),
                               decoder_channels=16)
  assert small.backbone.small_stem_stride == 1 and small.decoder_channels == 16

