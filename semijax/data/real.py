"""Real datasets behind `config.data`: PASCAL VOC 2012, Cityscapes and custom folders."""

from semijax.data import cityscapes, datasets, folder, voc
from semijax.data.sources import DataError


def build(cfg) -> "datasets.SemiSupervisedData":
  """Labeled, unlabeled and val sources of `cfg.dataset` under `cfg.root`."""
  if not cfg.root:
    raise DataError(f"config.data.root is empty: set it to the {cfg.dataset} folder "
                     "(check it first with `python -m experiments.prepare_data "
                     f"{cfg.dataset} --root DIR`)")
  if cfg.dataset in ("voc", "cityscapes"):
    module = voc if cfg.dataset == "voc" else cityscapes
    protocol = cfg.protocol or ("classic" if cfg.dataset == "voc" else "cps")
    kwargs = {"label_format": cfg.label_format} if cfg.dataset == "cityscapes" else {}
    labeled, unlabeled, _ = module.load(cfg.root, protocol, cfg.split, **kwargs)
    val = module.val(cfg.root, **kwargs)
    desc = (f"{cfg.dataset} {protocol} {cfg.split}: {len(labeled)} labeled, {len(unlabeled)} "
            f"unlabeled, {len(val)} val")
    return datasets.SemiSupervisedData(labeled, unlabeled, val, labeled.info, desc)
  return _folder(cfg)


def _folder(cfg) -> "datasets.SemiSupervisedData":
  """A custom folder: `split` is a fraction (`1/8`, `full`) or `explicit` (dataset.json's
  `splits.labeled`); the val set is `splits.val` or `val_fraction` of the masked images."""
  dataset = folder.FolderDataset(cfg.root)
  where = f"{cfg.root}/{folder.METADATA}"
  if cfg.split == "explicit":
    if not dataset.explicit_labeled:
      raise DataError(f"{where} has no \"splits\": {{\"labeled\": [...]}} list, so "
                      "config.data.split='explicit' has nothing to use; give a fraction "
                      f"({', '.join(datasets.FRACTIONS)})")
    fraction = None
  else:
    try:
      fraction = datasets.parse_fraction(cfg.split)
    except ValueError as e:
      raise DataError(f"{e}, or 'explicit' for the splits.labeled list of {where}") from None
  parts = dataset.split(fraction=fraction, seed=cfg.split_seed, val_fraction=cfg.val_fraction,
                        val_seed=0)
  if parts.val is None or not len(parts.val):
    raise DataError(f"{cfg.root}: no validation images; list them in {where} "
                    "(\"splits\": {\"val\": [\"stem\", ...]}) or hold out a share with "
                    "--config.data.val_fraction=0.2")
  unlabeled = parts.unlabeled if len(parts.unlabeled) else None
  val_from = "splits.val" if dataset.explicit_val else f"val_fraction {cfg.val_fraction:g}"
  desc = (f"folder {cfg.root} {cfg.split}: {len(parts.labeled)} labeled, "
          f"{len(parts.unlabeled)} unlabeled, {len(parts.val)} val ({val_from}); "
          f"background class: {_background(dataset.info)}; ignore value "
          f"{dataset.ignore_value}" + ("" if dataset.ignore_declared else " (default)"))
  return datasets.SemiSupervisedData(parts.labeled, unlabeled, parts.val, parts.labeled.info,
                                     desc)


def _background(info) -> str:
  if info.background_class is None:
    return "none"
  return f"{info.background_class} ({info.class_names[info.background_class]})"
