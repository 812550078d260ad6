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
  dataset = folder.FolderDataset(cfg.root)
  if dataset.explicit is not None:
    # dataset.json lists the splits: config.data.split must say so (a fraction would be ignored).
    if cfg.split != "explicit" or cfg.val_fraction:
      raise DataError(f"{cfg.root}/{folder.METADATA} gives explicit splits: set "
                      f"config.data.split='explicit' (got {cfg.split!r}) and leave "
                      f"config.data.val_fraction at 0 (got {cfg.val_fraction})")
    parts = dataset.split(seed=cfg.split_seed)
  else:
    if cfg.split == "explicit":
      raise DataError(f"{cfg.root}/{folder.METADATA} has no \"splits\" object, so "
                      "config.data.split='explicit' has nothing to use; give a fraction "
                      f"({', '.join(datasets.FRACTIONS)})")
    parts = dataset.split(fraction=datasets.parse_fraction(cfg.split), seed=cfg.split_seed,
                          val_fraction=cfg.val_fraction, val_seed=0)
  if parts.val is None or not len(parts.val):
    raise DataError(f"{cfg.root}: no validation images; give explicit splits in dataset.json "
                     "or set config.data.val_fraction > 0")
  unlabeled = parts.unlabeled if len(parts.unlabeled) else None
  desc = (f"folder {cfg.root} {cfg.split}: {len(parts.labeled)} labeled, "
          f"{len(parts.unlabeled)} unlabeled, {len(parts.val)} val")
  return datasets.SemiSupervisedData(parts.labeled, unlabeled, parts.val, parts.labeled.info,
                                     desc)
