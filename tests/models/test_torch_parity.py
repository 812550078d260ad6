"""Numerical parity with torchvision's ResNets (skipped unless torch and torchvision import).

The deep-stem (U2PL/DGCL) and multi-grid variants are built by editing a torchvision
ResNet in place the way those repositories' modules are laid out (same key names), so
this also checks `weights.py`'s name mapping end to end.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax.models import resnet, weights

_HOW = 'torch parity needs the torch extra: run `make test-torch`'
torch = pytest.importorskip('torch', reason=_HOW)
torchvision = pytest.importorskip('torchvision', reason=_HOW)
nn = torch.nn

STAGES = ('layer1', 'layer2', 'layer3', 'layer4')


def _randomise_bn(model, seed=0):
  """Non-trivial BN affine parameters and running statistics."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
  return model


def _torch_stages(model, x):
  out = {}
  y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  for name in STAGES:
    y = getattr(model, name)(y)
    out[name] = y.detach().permute(0, 2, 3, 1).numpy()
  return out


def _deep_stem(model, ceil_mode=True):
  """U2PL/DGCL's stem on a torchvision ResNet: conv1 = Sequential(conv, bn, relu, conv,
  bn, relu, conv), bn1 over 128 channels, layer1 reading 128 channels."""
  model.conv1 = nn.Sequential(
      nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
      nn.Conv2d(64, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
      nn.Conv2d(64, 128, 3, 1, 1, bias=False))
  model.bn1 = nn.BatchNorm2d(128)
  model.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
  block = model.layer1[0]
  block.conv1 = nn.Conv2d(128, block.conv1.out_channels, 1, bias=False)
  block.downsample[0] = nn.Conv2d(128, block.downsample[0].out_channels, 1, bias=False)
  return model


def _compare(torch_model, ours, size, *, batch=2, train=False, seed=0):
  """Max abs difference of the four stage outputs (and running stats when training)."""
  torch_model = _randomise_bn(torch_model, seed)
  sd = {k: v for k, v in torch_model.state_dict().items()}
  x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
  abstract = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  params, stats, report = weights.load_torchvision_weights(
      abstract['params'], abstract['batch_stats'], sd)
  assert report.ok, report.summary()
  torch_model.train(train)
  with torch.no_grad():
    expected = _torch_stages(torch_model, x)
  x_nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  fn = jax.jit(lambda p, s, a: ours.apply({'params': p, 'batch_stats': s}, a, train=train,
                                          mutable=['batch_stats']))
  got, new_state = fn(params, stats, x_nhwc)
  diffs = {name: (float(np.abs(np.asarray(got[name]) - expected[name]).max()),
                  float(np.abs(expected[name]).max())) for name in STAGES}
  for name in STAGES:
    # float32 summation-order noise (oneDNN vs XLA convs) grows with depth and, in train
    # mode, with BN over few pixels; a layout or semantics error is O(scale).
    scale = max(1.0, float(np.abs(expected[name]).max()))
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=2e-4 * scale,
                               err_msg=name)
  if train:  # running statistics after one step, torch momentum 0.1 == ours 0.9
    moved = weights.backbone_state_dict(params, new_state['batch_stats'])
    after = torch_model.state_dict()
    for key, value in moved.items():
      if key.endswith(('running_mean', 'running_var')):
        np.testing.assert_allclose(value, after[key].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=key)
  print(f'(max |torch - ours|, max |torch|) per stage: {diffs}')
  return diffs


@pytest.fixture(autouse=True)
def _torch_setup():
  torch.set_num_threads(1)
  torch.manual_seed(0)  # torchvision's random init happens before `_compare` runs


def test_resnet50_eval_matches_torchvision():
  _compare(torchvision.models.resnet50(), resnet.resnet50(), 65, batch=1)


def test_resnet50_train_mode_matches_torchvision():
  _compare(torchvision.models.resnet50(), resnet.resnet50(), 65, batch=2, train=True)


@pytest.mark.parametrize('output_stride,replace', [(16, [False, False, True]),
                                                   (8, [False, True, True])])
def test_dilated_resnet_matches_torchvision(output_stride, replace):
  tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 2, 3],
                                        replace_stride_with_dilation=replace)
  ours = resnet.ResNet(stage_sizes=(1, 1, 2, 3), output_stride=output_stride)
  _compare(tv, ours, 49, batch=2, train=True)


def test_multi_grid_matches_dilated_torch_convs():
  tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 2, 3],
                                        replace_stride_with_dilation=[False, False, True])
  for block, d in zip(tv.layer4, (2, 4, 8)):  # what U2PL's multi_grid=True builds at OS16
    block.conv2.dilation, block.conv2.padding = (d, d), (d, d)
  ours = resnet.ResNet(stage_sizes=(1, 1, 2, 3), output_stride=16, multi_grid=(1, 2, 4))
  _compare(tv, ours, 65, batch=1)


@pytest.mark.parametrize('size', [64, 65])
def test_deep_stem_matches_u2pl_layout(size):
  tv = _deep_stem(torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck,
                                                   [1, 1, 2, 3],
                                                   replace_stride_with_dilation=[False, True,
                                                                                 True]))
  ours = resnet.ResNet(stage_sizes=(1, 1, 2, 3), stem='deep', output_stride=8)
  _compare(tv, ours, size, batch=2, train=True)


def test_basic_blocks_match_torchvision_resnet18():
  _compare(torchvision.models.resnet18(), resnet.resnet18(), 49, batch=2, train=True)


def test_our_safetensors_file_loads_into_torchvision(tmp_path):
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  ours = resnet.resnet18()
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 49, 49, 3)), jnp.float32)
  variables = jax.jit(ours.init)(jax.random.key(0), x)
  path = tmp_path / 'r18.safetensors'
  weights.save_torchvision_safetensors(path, variables['params'], variables['batch_stats'])
  tv = torchvision.models.resnet18().eval()
  result = tv.load_state_dict(load_file(str(path)), strict=False)
  assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
  with torch.no_grad():
    expected = _torch_stages(tv, torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
  got = jax.jit(ours.apply)(variables, x)
  np.testing.assert_allclose(got['layer4'], expected['layer4'], rtol=1e-4, atol=1e-4)


class _TorchDGCLHead(nn.Module):
  """DGCL's `dec_deeplabv3_plus` layout in torch (written from its description)."""

  def __init__(self, c4, c1, aspp, low, dec, classes, rates):
    super().__init__()

    def cbr(i, o, k, d=1, bias=False):
      return nn.Sequential(nn.Conv2d(i, o, k, padding=d * (k // 2), dilation=d, bias=bias),
                           nn.BatchNorm2d(o), nn.ReLU())

    self.pool, self.b0 = cbr(c4, aspp, 1), cbr(c4, aspp, 1)
    self.atrous = nn.ModuleList([cbr(c4, aspp, 3, r) for r in rates])
    self.project = cbr(5 * aspp, aspp, 3)
    self.low = cbr(c1, low, 1, bias=True)
    self.fuse1, self.fuse2 = cbr(low + aspp, dec, 3, bias=True), cbr(dec, dec, 3, bias=True)
    self.cls = nn.Conv2d(dec, classes, 1)

  def forward(self, x1, x4):
    interp = lambda t, size: torch.nn.functional.interpolate(t, size, mode='bilinear',
                                                             align_corners=True)
    pooled = interp(self.pool(x4.mean((2, 3), keepdim=True)), x4.shape[-2:])
    a = self.project(torch.cat([pooled, self.b0(x4)] + [b(x4) for b in self.atrous], 1))
    low = self.low(x1)
    fts = self.fuse2(self.fuse1(torch.cat([low, interp(a, low.shape[-2:])], 1)))
    return self.cls(fts), fts


@pytest.mark.parametrize('train', [False, True])
def test_deeplab_head_matches_torch_dgcl_layout(train):
  from semijax.models import deeplab  # pylint: disable=g-import-not-at-top
  rates = (1, 2, 3)
  tv = _randomise_bn(_TorchDGCLHead(32, 16, 8, 4, 8, 3, rates), seed=1)
  ours = deeplab.DeepLabV3Plus(3, resnet.small_resnet(), aspp_channels=8, aspp_rates=rates,
                               low_level_channels=4, decoder_channels=8, aspp_dropout=0.0,
                               decoder_dropout=0.0)
  gen = torch.Generator().manual_seed(2)
  x1, x4 = torch.randn(2, 16, 9, 11, generator=gen), torch.randn(2, 32, 5, 6, generator=gen)
  feats = {'layer1': jnp.asarray(x1.permute(0, 2, 3, 1).numpy()),
           'layer4': jnp.asarray(x4.permute(0, 2, 3, 1).numpy())}
  abstract = jax.eval_shape(lambda f: ours.init(jax.random.key(0), f, method='decode'), feats)
  # Our head's module names -> the torch modules above.
  modules = {('aspp', 'pool'): tv.pool, ('aspp', 'b0'): tv.b0, ('aspp', 'project'): tv.project,
             ('low',): tv.low, ('fuse1',): tv.fuse1, ('fuse2',): tv.fuse2}
  modules.update({('aspp', f'b{i + 1}'): m for i, m in enumerate(tv.atrous)})
  # The loader names a flax module by its path with '_' -> '.' ('aspp', 'b0_conv') ->
  # 'aspp.b0.conv'; name the torch tensors accordingly.
  sd = {f'classifier.{k}': v for k, v in tv.cls.state_dict().items()}
  for path, seq in modules.items():
    module = '.'.join(path)
    sd.update({f'{module}.conv.{k}': v for k, v in seq[0].state_dict().items()})
    sd.update({f'{module}.bn.{k}': v for k, v in seq[1].state_dict().items()})
  params, stats, report = weights.load_torchvision_weights(
      abstract['params'], abstract['batch_stats'], sd, scope=())
  assert report.ok, report.summary()
  tv.train(train)
  with torch.no_grad():
    logits, fts = tv(x1, x4)
  out, _ = ours.apply({'params': params, 'batch_stats': stats}, feats, train, method='decode',
                      mutable=['batch_stats'])
  for name, expected in (('logits', logits), ('decoder', fts)):
    expected = expected.permute(0, 2, 3, 1).numpy()
    diff = float(np.abs(np.asarray(out[name]) - expected).max())
    print(f'head {name} train={train}: max |torch - ours| = {diff:.2e}')
    np.testing.assert_allclose(out[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)
