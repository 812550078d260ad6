"""The official VOC / Cityscapes recipes of every method config (no dataset on disk needed)."""

import importlib

import pytest

from experiments.configs import base, common, recipes
from semijax import methods
from semijax.data import splits
from semijax.train import loop

METHODS = ("supervised", "mean_teacher", "dgcl", "dssn")
# Every shipped split list: (dataset, protocol, split as a user writes it).
SPLITS = ([("voc", "classic", n) for n in ("92", "183", "366", "732", "1464")]
          + [("voc", "blended_cps", f"1/{d}") for d in (16, 8, 4, 2)]
          + [("voc", "blended_u2pl", f"1/{d}") for d in (16, 8, 4)]
          + [("cityscapes", "cps", f"1/{d}") for d in (16, 8, 4, 2)]
          + [("cityscapes", "unimatch", "1/30")])
NUM_CLASSES = {"voc": 21, "cityscapes": 19}


def get_config(method: str, arg: str = ""):
  return importlib.import_module(f"experiments.configs.{method}").get_config(arg)


def real_arg(dataset, protocol, split, extra=""):
  return f"dataset={dataset},protocol={protocol},split={split},root=/data/{dataset}" + extra


def test_every_shipped_split_is_covered():
  listed = {(d, p, splits.normalize_name(n)) for d, p, n in SPLITS}
  shipped = {(d, p, n) for d in splits.DATASETS for p, names in splits.protocols(d).items()
             for n in names}
  assert listed == shipped


@pytest.mark.parametrize("dataset,protocol,split", SPLITS)
def test_split_resolves_to_a_shipped_list(dataset, protocol, split):
  spec = splits.load_split(dataset, protocol, split)
  name = splits.normalize_name(split)
  assert spec.num_labeled == splits.LABELED_COUNTS[(dataset, protocol)][name]
  # The recipes count an epoch from this: the unlabeled list is the rest of the train set.
  assert spec.num_unlabeled == splits.TRAIN_COUNTS[dataset] - spec.num_labeled
  assert recipes.resolve(dataset, protocol, split) == (protocol, name)
  assert recipes.resolve(dataset, "", split) == (
      ("blended_cps" if protocol == "blended_u2pl" else protocol), name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset,protocol,split", SPLITS)
def test_config_builds(method, dataset, protocol, split):
  c = get_config(method, real_arg(dataset, protocol, split))
  loop.check_config(c, reference=base.get_config())
  assert (c.data.dataset, c.data.protocol, c.data.split) == (
      dataset, protocol, splits.normalize_name(split))
  assert c.data.root == f"/data/{dataset}"
  assert c.method.name == method
  assert c.model.name == "deeplabv3plus_resnet101" and c.model.dtype == "bfloat16"
  assert c.model.kwargs.stem == "deep" and c.optim.name == "sgd" and c.train.sync_bn
  assert c.data.scale_range == (0.5, 2.0) and c.data.flip
  assert c.recipe.global_batch == c.data.labeled_batch and c.data.labeled_batch % c.recipe.gpus == 0
  assert c.recipe.base_lr == c.optim.base_lr and c.recipe.source
  assert c.train.total_steps == c.recipe.epochs * c.recipe.steps_per_epoch > 0
  assert c.data.unlabeled_batch == (0 if method == "supervised" else c.data.labeled_batch)
  # The model the run would build (constructed, not initialised).
  model = loop.build_model(c, NUM_CLASSES[dataset], methods.get(method)(c))
  plan = model.backbone.plan()
  assert len(plan) == 4 and model.backbone.output_stride == c.model.kwargs.output_stride
  if dataset == "cityscapes":
    assert c.loss.supervised == "ohem" and c.eval.mode == "sliding_window"
    assert c.eval.window == c.data.crop_size or c.eval.window == 800   # DGCL evaluates at 800


# (method, dataset, protocol, split, extra args) -> official values, computed by hand from the
# configs in `recipe.source`: steps/epoch = floor(ceil(N / GPUs) / per-GPU batch) (ceil for U2PL's
# supervised loader), N = unlabeled images (labeled ones for supervised-only codes).
OFFICIAL = [
    # method, dataset, protocol, split, extra: steps/epoch, total steps, lr, head x, wd, batch, crop
    ("dgcl", "voc", "classic", "92", "", 655, 52400, 0.001, 10.0, 1e-4, 16, 513),
    ("dgcl", "voc", "classic", "732", "", 615, 49200, 0.001, 10.0, 1e-4, 16, 513),
    ("dgcl", "voc", "classic", "1464", "", 570, 45600, 0.001, 10.0, 1e-4, 16, 513),
    ("dgcl", "voc", "blended_cps", "1/16", "", 620, 49600, 0.001, 10.0, 1e-4, 16, 513),
    ("dgcl", "voc", "blended_cps", "1/2", "", 330, 26400, 0.001, 10.0, 1e-4, 16, 513),
    ("dgcl", "voc", "blended_u2pl", "1/8", "", 578, 46240, 0.001, 10.0, 1e-4, 16, 513),
    ("dgcl", "cityscapes", "cps", "1/16", "", 174, 34800, 0.01, 1.0, 1e-4, 16, 769),
    ("dgcl", "cityscapes", "cps", "1/8", "", 163, 32600, 0.01, 1.0, 1e-4, 16, 769),
    ("dgcl", "cityscapes", "cps", "1/2", "", 93, 18600, 0.01, 1.0, 1e-4, 16, 769),
    ("dssn", "voc", "classic", "92", "", 1311, 131100, 0.002, 10.0, 1e-4, 8, 513),
    ("dssn", "voc", "classic", "1464", "", 1140, 114000, 0.002, 10.0, 1e-4, 8, 513),
    ("dssn", "voc", "blended_cps", "1/16", "", 1240, 124000, 0.002, 10.0, 1e-4, 8, 513),
    ("dssn", "cityscapes", "cps", "1/16", "", 349, 83760, 0.005, 1.0, 1e-4, 8, 801),
    ("dssn", "cityscapes", "cps", "1/8", "", 326, 78240, 0.005, 1.0, 1e-4, 8, 801),
    ("dssn", "cityscapes", "unimatch", "1/30", "", 360, 86400, 0.005, 1.0, 1e-4, 8, 801),
    ("supervised", "voc", "classic", "92", "", 6, 480, 0.001, 10.0, 1e-4, 16, 513),
    ("supervised", "voc", "classic", "1464", "", 92, 7360, 0.001, 10.0, 1e-4, 16, 513),
    ("supervised", "voc", "blended_cps", "1/2", "", 331, 26480, 0.001, 10.0, 1e-4, 16, 513),
    ("supervised", "cityscapes", "cps", "1/16", "", 12, 2400, 0.01, 1.0, 5e-4, 16, 769),
    ("supervised", "cityscapes", "cps", "1/4", "", 47, 9400, 0.01, 1.0, 5e-4, 16, 769),
    ("supervised", "voc", "classic", "92", ",recipe=dssn", 5, 500, 0.002, 10.0, 1e-4, 16, 513),
    ("supervised", "voc", "classic", "1464", ",recipe=dssn", 91, 9100, 0.002, 10.0, 1e-4, 16,
     513),
    ("supervised", "cityscapes", "cps", "1/8", ",recipe=dssn", 23, 5520, 0.005, 1.0, 1e-4, 16,
     801),
    ("mean_teacher", "voc", "classic", "1464", "", 570, 45600, 0.001, 10.0, 1e-4, 16, 513),
    ("mean_teacher", "cityscapes", "cps", "1/4", "", 139, 27800, 0.01, 1.0, 5e-4, 16, 769),
]


@pytest.mark.parametrize("method,dataset,protocol,split,extra,epoch,total,lr,head,wd,batch,crop",
                         OFFICIAL)
def test_official_steps_and_lr(method, dataset, protocol, split, extra, epoch, total, lr, head,
                               wd, batch, crop):
  c = get_config(method, real_arg(dataset, protocol, split, extra))
  assert c.recipe.steps_per_epoch == epoch
  assert c.train.total_steps == total
  assert (c.optim.base_lr, c.optim.head_lr_mult, c.optim.weight_decay) == (lr, head, wd)
  assert (c.optim.momentum, c.optim.power, c.optim.warmup_steps) == (0.9, 0.9, 0)
  assert c.data.labeled_batch == c.recipe.global_batch == batch
  assert c.data.crop_size == crop


def test_method_specific_official_settings():
  voc = get_config("dgcl", real_arg("voc", "classic", "732"))
  assert (voc.train.supervised_warmup_steps, voc.ema.decay, voc.ema.copy_steps,
          voc.pseudo_label.entropy_percentile.steps_per_epoch,
          voc.dgcl_contrast.steps_per_epoch) == (615, 0.999, 615, 615, 615)
  assert (voc.model.kwargs.output_stride, voc.model.kwargs.multi_grid) == (16, (1, 2, 4))
  assert (voc.loss.supervised, voc.eval.mode, voc.eval.crop) == ("ce", "center_crop", 513)
  assert voc.dgcl_contrast.bank_size == 10000 and voc.dgcl_contrast.num_anchors == 200  # official
  city = get_config("dgcl", real_arg("cityscapes", "cps", "1/8"))
  assert city.train.supervised_warmup_steps == 10 * 163                  # sup_only_epoch 10
  assert (city.model.kwargs.output_stride, city.loss.ohem_min_kept) == (8, 8 * 100000)
  assert (city.eval.window, city.eval.stride) == (800, 534)

  dssn_voc = get_config("dssn", real_arg("voc", "blended_cps", "1/16"))
  assert (dssn_voc.pseudo_label.rule, dssn_voc.dssn.w2s_start_step, dssn_voc.ema.copy_steps,
          dssn_voc.eval.mode) == ("cplg", 1, 1, "whole")
  assert not dssn_voc.model.kwargs.get("multi_grid")
  dssn_city = get_config("dssn", real_arg("cityscapes", "cps", "1/8"))
  assert (dssn_city.pseudo_label.rule, dssn_city.pseudo_label.confidence.threshold) == (
      "confidence", 0.0)
  assert dssn_city.dssn.w2s_start_step == dssn_city.ema.copy_steps == 5 * 326
  assert (dssn_city.eval.window, dssn_city.eval.stride, dssn_city.loss.supervised) == (
      801, 534, "ohem")
  assert all(get_config(m, real_arg("voc", "classic", "92")).train.supervised_warmup_steps == 0
             for m in ("supervised", "mean_teacher", "dssn"))


def test_smoke_on_real_data_shortens_epoch_schedules():
  c = get_config("dssn", real_arg("cityscapes", "cps", "1/8", ",smoke"))
  assert c.train.total_steps == 4 and c.dssn.w2s_start_step == 1 and c.ema.copy_steps == 1
  c = get_config("dgcl", real_arg("voc", "classic", "732", ",smoke"))
  assert c.train.supervised_warmup_steps == 1 and c.dgcl_contrast.bank_size == 64


def _embedded_reference(method, split="1/16", seed=0, split_seed=0):
  """The embedded config as the method files built it before the recipes existed."""
  c = methods.configure(base.get_config(), method)
  if method == "dgcl":
    for k, v in dict(projection_dim=32, bank_size=2000, push_per_class=200,
                     min_bank_size=200, max_per_class=2048, num_anchors=64,
                     num_batch_keys=16, num_bank_keys=16, num_negatives=256).items():
      c.dgcl_contrast[k] = v
  if method == "dssn":
    c.ema.decay, c.ema.warmup, c.ema.copy_steps = 0.996, "none", 1
  c.model.pretrained = "embedded"
  c.data.split, c.seed, c.data.split_seed = split, seed, split_seed
  return c


@pytest.mark.parametrize("method", METHODS)
def test_embedded_unchanged(method):
  for arg, kw in (("", {}), ("dataset=embedded", {}),
                  ("split=1/4,seed=3,split_seed=2", dict(split="1/4", seed=3, split_seed=2))):
    assert get_config(method, arg).to_dict() == _embedded_reference(method, **kw).to_dict()
  c = get_config(method)
  assert (c.data.dataset, c.data.protocol, c.data.root) == ("embedded", "", "")
  assert c.model.name == "deeplabv3plus_small"
  assert c.recipe.global_batch == 0 and c.recipe.steps_per_epoch == 0
  smoke = get_config(method, "smoke")
  assert (smoke.train.total_steps, smoke.data.crop_size, smoke.model.kwargs.widths) == (
      4, 24, (8, 8, 16, 16))


@pytest.mark.parametrize("method,arg,expected", [
    ("dgcl", "dataset=voc,protocol=classic,split=1/16", "92, 183, 366, 732, 1464"),
    ("dgcl", "dataset=voc,protocol=blended_u2pl,split=1/2", "1_16, 1_8, 1_4"),
    ("dssn", "dataset=voc,protocol=cps,split=1/8", "blended_cps: 1_16, 1_8, 1_4, 1_2"),
    ("dssn", "dataset=voc,split=1/30", "classic: 92"),
    ("supervised", "dataset=cityscapes,split=732", "cps: 1_16, 1_8, 1_4, 1_2; unimatch: 1_30"),
    ("mean_teacher", "dataset=cityscapes,protocol=cps,split=1/30", "1_16, 1_8, 1_4, 1_2"),
    ("mean_teacher", "dataset=coco,split=1/8", "embedded, voc, cityscapes"),
    ("dgcl", "protocol=classic", "dataset=voc|cityscapes"),
    ("dssn", "root=/data/VOC2012", "dataset=voc|cityscapes"),
    ("supervised", "dataset=voc,split=732,recipe=fixmatch", "u2pl, dssn"),
    ("supervised", "recipe=dssn", "dataset=voc|cityscapes"),
])
def test_bad_combinations_list_the_valid_choices(method, arg, expected):
  with pytest.raises(ValueError) as e:
    get_config(method, arg)
  assert expected in str(e.value)


def test_common_datasets():
  assert common.DATASETS == ("embedded", "voc", "cityscapes")
