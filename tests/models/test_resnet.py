"""ResNet backbones: parameter counts, shapes, dilation / multi-grid plans, stems."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from semijax.models import layers, resnet


def random_variables(model, x, seed=0, **kwargs):
  """Variables of `model` filled from NumPy (no init compile): He-scaled kernels and
  non-trivial BN parameters and running statistics."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, **kwargs)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      values = rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name in ('scale', 'var'):
      values = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      values = rng.normal(0, 0.1, leaf.shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, size=33, batch=1):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, size, size, 3)))


def _bottleneck_resnet_count(stage_sizes, stem):
  """Parameters of a bottleneck ResNet without fc, from the architecture's description."""
  bn = lambda c: 2 * c  # scale + bias
  if stem == 'torchvision':
    count, channels = 7 * 7 * 3 * 64 + bn(64), 64
  else:  # three 3x3 convs 3->64->64->128, each followed by BN
    count = 9 * 3 * 64 + bn(64) + 9 * 64 * 64 + bn(64) + 9 * 64 * 128 + bn(128)
    channels = 128
  for width, blocks in zip((64, 128, 256, 512), stage_sizes):
    for b in range(blocks):
      count += channels * width + bn(width) + 9 * width * width + bn(width)
      count += width * 4 * width + bn(4 * width)
      if b == 0:  # projection shortcut
        count += channels * 4 * width + bn(4 * width)
      channels = 4 * width
  return count


def test_parameter_counts_equal_torchvision():
  # torchvision resnet50 / resnet101 have 25,557,032 / 44,549,160 parameters, of which the
  # fc layer holds 2048 * 1000 + 1000 = 2,049,000.
  assert 25_557_032 - 2_049_000 == 23_508_032
  r50 = _abstract_init(resnet.resnet50())
  r101 = _abstract_init(resnet.resnet101())
  assert _param_count(r50['params']) == 23_508_032
  assert _param_count(r101['params']) == 42_500_160
  assert _bottleneck_resnet_count((3, 4, 6, 3), 'torchvision') == 23_508_032
  assert _bottleneck_resnet_count((3, 4, 23, 3), 'torchvision') == 42_500_160
  # Running statistics: one mean and one var per BN channel.
  scales = [v for k, v in traverse_util.flatten_dict(r50['params']).items() if k[-1] == 'scale']
  assert _param_count(r50['batch_stats']) == 2 * _param_count(scales)


def test_deep_stem_parameter_counts():
  for preset, sizes in ((resnet.resnet50, (3, 4, 6, 3)), (resnet.resnet101, (3, 4, 23, 3))):
    params = _abstract_init(preset(stem='deep'))['params']
    assert _param_count(params) == _bottleneck_resnet_count(sizes, 'deep')
  assert _bottleneck_resnet_count((3, 4, 6, 3), 'deep') == 23_631_808
  # U2PL's stem names (`conv1.{0,1,3,4,6}`, `bn1`) and layer1's 128-channel input.
  params = _abstract_init(resnet.resnet50(stem='deep'))['params']
  assert {k for k in params if not k.startswith('layer')} == {
      'conv1_0', 'conv1_1', 'conv1_3', 'conv1_4', 'conv1_6', 'bn1'}
  assert params['conv1_6']['kernel'].shape == (3, 3, 64, 128)
  assert params['layer1_0']['downsample_0']['kernel'].shape == (1, 1, 128, 256)


@pytest.mark.parametrize('stem', ['torchvision', 'deep'])
@pytest.mark.parametrize('output_stride,l3,l4', [(8, 9, 9), (16, 5, 5), (32, 5, 3)])
def test_stage_shapes(stem, output_stride, l3, l4):
  model = resnet.resnet50(stem=stem, output_stride=output_stride)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                       jnp.zeros((2, 65, 65, 3)))
  assert {k: v.shape for k, v in out.items()} == {
      'stem': (2, 17, 17, 128 if stem == 'deep' else 64), 'layer1': (2, 17, 17, 256),
      'layer2': (2, 9, 9, 512), 'layer3': (2, l3, l3, 1024), 'layer4': (2, l4, l4, 2048)}


def test_deep_stem_pool_uses_ceil_mode_on_even_inputs():
  def layer1_size(**kwargs):
    model = resnet.resnet50(**kwargs)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0],
                         jnp.zeros((1, 64, 64, 3)))
    return out['layer1'].shape[1]

  assert layer1_size(stem='deep') == 17  # U2PL/DGCL: MaxPool2d(3, 2, 1, ceil_mode=True)
  assert layer1_size(stem='deep', pool_ceil_mode=False) == 16  # DSSN/UniMatch
  assert layer1_size(stem='torchvision') == 16


def _u2pl_layer4_dilations(output_stride):
  """U2PL/DGCL `multi_grid=True`: grids (2, 2, 4) on the previous / current dilation."""
  previous = {32: 1, 16: 1, 8: 2}[output_stride]
  current = {32: 1, 16: 2, 8: 4}[output_stride]
  return (previous * 2, current * 2, current * 4)


@pytest.mark.parametrize('output_stride,strides,expected,expected_mg', [
    (32, [1, 2, 2, 2], [[1], [1], [1, 1], [1, 1, 1]], (1, 2, 4)),
    (16, [1, 2, 2, 1], [[1], [1], [1, 1], [1, 2, 2]], (2, 4, 8)),
    (8, [1, 2, 1, 1], [[1], [1], [1, 2], [2, 4, 4]], (4, 8, 16)),
])
def test_dilations_and_multi_grid(output_stride, strides, expected, expected_mg):
  kwargs = dict(stage_sizes=(1, 1, 2, 3), widths=(4, 4, 4, 4), output_stride=output_stride)
  plan = resnet.ResNet(**kwargs).plan()
  assert [list(d) for _, d in plan] == expected
  assert [s for s, _ in plan] == strides
  mg = resnet.ResNet(multi_grid=(1, 2, 4), **kwargs).plan()
  assert mg[3][1] == expected_mg
  if output_stride != 32:
    assert mg[3][1] == _u2pl_layer4_dilations(output_stride)

  # The 3x3 convs that actually run have these dilations (read off the jaxpr; the input is
  # large enough that no dilated tap reads only padding, which `layers.Conv` would skip).
  model = resnet.ResNet(multi_grid=(1, 2, 4), **kwargs)
  x = jnp.zeros((1, 129, 129, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(model.apply)(variables, x)
  dilations = [e.params['rhs_dilation'][0] for e in jaxpr.eqns
               if e.primitive.name == 'conv_general_dilated' and e.invars[1].aval.shape[0] == 3]
  assert dilations == [d for _, ds in mg for d in ds]


def test_plan_errors():
  with pytest.raises(ValueError, match='multi_grid'):
    resnet.resnet50(output_stride=16, multi_grid=(1, 2)).plan()
  with pytest.raises(ValueError, match='output_stride'):
    resnet.resnet50(output_stride=12).plan()
  with pytest.raises(ValueError, match='stem'):
    resnet.resnet50(stem='vit').plan()


def test_small_resnet_runs_and_updates_batch_stats():
  model = resnet.small_resnet()
  x = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3))
  variables = random_variables(model, x)
  out, state = jax.jit(lambda v, a: model.apply(v, a, train=True, mutable=['batch_stats']))(
      variables, x)
  assert {k: v.shape for k, v in out.items()} == {
      'stem': (2, 12, 12, 16), 'layer1': (2, 12, 12, 16), 'layer2': (2, 6, 6, 32),
      'layer3': (2, 6, 6, 64), 'layer4': (2, 6, 6, 128)}
  assert not np.allclose(state['batch_stats']['bn1']['mean'],
                         variables['batch_stats']['bn1']['mean'])
  assert _param_count(variables['params']) < 400_000
  # Stride-1 stem without max-pool at output stride 4: layer3 and layer4 dilated.
  plain = resnet.small_resnet(stem_stride=1, stem_pool=False, output_stride=4)
  shapes = jax.eval_shape(lambda a: plain.init_with_output(jax.random.key(0), a)[0], x)
  assert shapes['layer1'].shape[1:3] == (48, 48) and shapes['layer4'].shape[1:3] == (12, 12)


def test_bf16_compute_keeps_f32_params():
  model = resnet.small_resnet(dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = random_variables(model, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, x)
  assert all(v.dtype == jnp.bfloat16 for v in out.values())


def test_zero_init_residual():
  norm = functools.partial(layers.BatchNorm, use_running_average=True)
  block = resnet.BottleneckBlock(4, norm=norm, zero_init_residual=True)
  variables = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
  assert variables['params']['bn3']['scale'].shape == (16,)
  np.testing.assert_array_equal(variables['params']['bn3']['scale'], 0.0)
  np.testing.assert_array_equal(variables['params']['bn1']['scale'], 1.0)
  # At init the block is then relu(projection shortcut): the residual branch is zero.
  x = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
  y = jax.jit(block.apply)(variables, x)
  shortcut = jnp.einsum('bhwc,cd->bhwd', x, variables['params']['downsample_0']['kernel'][0, 0])
  np.testing.assert_allclose(y, jax.nn.relu(shortcut), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Scanned blocks and rematerialisation (issue 17).


def test_scanned_layout_keeps_parameter_counts():
  for preset, count in ((resnet.resnet50, 23_508_032), (resnet.resnet101, 42_500_160)):
    scanned = _abstract_init(preset())['params']
    plain = _abstract_init(preset(scan_blocks=False))['params']
    assert _param_count(scanned) == _param_count(plain) == count
    assert sorted(k for k in scanned if 'scan' in k) == [
        'layer1_scan1', 'layer2_scan1', 'layer3_scan1', 'layer4_scan1']
  r101 = _abstract_init(resnet.resnet101())['params']
  assert r101['layer3_scan1']['conv2']['kernel'].shape == (22, 3, 3, 256, 256)
  assert 'layer3_0' in r101 and 'layer3_1' not in r101
  # Multi-grid layer4 blocks differ in dilation: they stay single blocks.
  mg = resnet.resnet101(output_stride=16, multi_grid=(1, 2, 4))
  assert mg.block_groups()[3] == [(0, 1, 2), (1, 1, 4), (2, 1, 8)]
  assert mg.block_groups()[2] == [(0, 1, 1), (1, 22, 1)]
  assert resnet.resnet101(scan_blocks=False).block_groups()[2] == [
      (j, 1, 1) for j in range(23)]


def _small_bottleneck(**kwargs):
  return resnet.ResNet(stage_sizes=(2, 3, 3, 3), widths=(4, 4, 8, 8), stem='deep',
                       stem_width=8, output_stride=16, **kwargs)


@pytest.mark.slow   # compiles two full ResNets forward and backward
@pytest.mark.parametrize('multi_grid', [None, (1, 2, 4)])
def test_scanned_equals_unscanned_for_the_same_weights(multi_grid):
  from semijax.models import weights  # pylint: disable=g-import-not-at-top
  plain = _small_bottleneck(scan_blocks=False, multi_grid=multi_grid)
  scanned = _small_bottleneck(multi_grid=multi_grid)
  x = jax.random.uniform(jax.random.key(3), (2, 33, 33, 3))
  variables = random_variables(plain, x)
  stacked = weights.stack_blocks(variables, jax.eval_shape(scanned.init, jax.random.key(0), x))
  assert 'layer2_scan1' in stacked['params'] and 'layer2_1' not in stacked['params']

  def run(model, v):
    def loss(params):
      out, state = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                               train=True, mutable=['batch_stats'])
      return sum(jnp.sum(o ** 2) for o in out.values()), (out, state['batch_stats'])
    (_, (out, stats)), grads = jax.value_and_grad(loss, has_aux=True)(v['params'])
    return out, stats, grads, model.apply(v, x, train=False)

  a = jax.jit(lambda v: run(plain, v))(variables)
  b = jax.jit(lambda v: run(scanned, v))(stacked)
  for name in a[0]:
    np.testing.assert_allclose(a[0][name], b[0][name], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(a[3][name], b[3][name], rtol=1e-5, atol=1e-5, err_msg=name)
  # BN statistics and gradients, compared in the per-block layout (float32 sums in another
  # order: errors relative to each leaf's largest entry).
  for tree_a, tree_b in ((a[1], b[1]), (a[2], b[2])):
    flat_a = traverse_util.flatten_dict(tree_a)
    flat_b = traverse_util.flatten_dict(weights.unstack_blocks(tree_b))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
      scale = float(np.max(np.abs(flat_a[k])))
      np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=0, atol=1e-5 * scale,
                                 err_msg=str(k))


@pytest.mark.slow   # compiles the ResNet gradient once per remat mode
def test_remat_modes_give_the_same_values_and_gradients():
  x = jax.random.uniform(jax.random.key(4), (2, 33, 33, 3))
  variables = random_variables(_small_bottleneck(), x)

  def grads(remat):
    model = _small_bottleneck(remat=remat)

    def loss(params):
      out, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                               train=True, mutable=['batch_stats'])
      return jnp.sum(out['layer4'] ** 2), state['batch_stats']
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  (ref, ref_stats), ref_grads = grads('none')
  for remat in ('blocks', 'full'):
    (value, stats), g = grads(remat)
    np.testing.assert_allclose(value, ref, rtol=1e-6)
    for u, v in zip(jax.tree.leaves((ref_stats, ref_grads)), jax.tree.leaves((stats, g))):
      np.testing.assert_allclose(u, v, rtol=0, atol=1e-5 * float(np.max(np.abs(u))))
  with pytest.raises(ValueError, match='remat'):
    resnet.remat_policy('some')


@pytest.mark.slow
def test_remat_keeps_fewer_residuals():
  # What the backward pass keeps: 'blocks' drops BatchNorm/ReLU temporaries (only conv
  # outputs), 'full' everything but each block's input.
  from semijax.models import memory  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((4, 65, 65, 3))
  variables = jax.eval_shape(_small_bottleneck().init, jax.random.key(0), x)

  def peak(remat):
    model = _small_bottleneck(remat=remat)

    def loss(params, batch_stats):
      out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                           mutable=['batch_stats'])
      return jnp.sum(out['layer4'])
    return memory.estimate_step_bytes(jax.grad(loss), variables['params'],
                                      variables['batch_stats'])

  none, blocks, full = peak('none'), peak('blocks'), peak('full')
  assert none > blocks > full
