"""Dataset registry: `config.data` -> labeled, unlabeled and val sources plus metadata.

The embedded data, PASCAL VOC 2012, Cityscapes and custom folders; the modules it builds on
(`sources`, `splits`, the dataset layouts) never import it.
"""

import dataclasses
from typing import Optional

from semijax.data import cityscapes, embedded, folder, sources, splits, voc
from semijax.data.sources import DataError

DATASETS = ("embedded", "voc", "cityscapes", "folder")


@dataclasses.dataclass
class SemiSupervisedData:
  """The three sources of a semi-supervised run and the dataset's metadata.

  Attributes:
    labeled, unlabeled, val: the sources (`unlabeled` None when there are no unlabeled images).
    info: `DatasetInfo`: class names, palette, `ignore_index`, `background_class`.
    description: one line for the run's log.
  """
  labeled: object
  unlabeled: Optional[object]
  val: object
  info: sources.DatasetInfo
  description: str

  @property
  def background_class(self) -> Optional[int]:
    """The dataset's background class id, or None (`DatasetInfo.background_class`)."""
    return self.info.background_class

  @property
  def ignore_index(self) -> int:
    """The label value of unlabeled pixels in the records (`DatasetInfo.ignore_index`)."""
    return self.info.ignore_index


FRACTIONS = ("1/16", "1/8", "1/4", "1/2", "full")


def parse_fraction(split, *, name: str = "config.data.split") -> float:
  """A labeled fraction from `'1/8'`, `'0.125'`, `0.125` or `'full'` (-> 1.0).

  Raises:
    ValueError: naming `name`, the value and the accepted forms, for anything else or a
      fraction outside (0, 1].
  """
  if isinstance(split, (int, float)) and not isinstance(split, bool):
    value = float(split)
  elif str(split).strip() == "full":
    return 1.0
  else:
    text = str(split).strip()
    try:
      if "/" in text:
        num, den = (int(x) for x in text.split("/"))
        value = num / den
      else:
        value = float(text)
    except (ValueError, ZeroDivisionError):
      value = None
    if value is None:
      raise ValueError(f"{name}={split!r}; expected a fraction like "
                       f"{', '.join(FRACTIONS)} (or a decimal such as 0.125)")
  if not 0.0 < value <= 1.0:
    raise ValueError(f"{name}={split!r}; a fraction must be in (0, 1], like "
                     f"{', '.join(FRACTIONS)}")
  return value


def _embedded(cfg) -> SemiSupervisedData:
  scene = embedded.SceneConfig(**cfg.embedded.to_dict())
  srcs = embedded.make_sources(scene)
  pool = srcs["train"]
  labeled_idx, unlabeled_idx = splits.fraction_split(len(pool), parse_fraction(cfg.split),
                                                     cfg.split_seed)
  if not len(unlabeled_idx):
    unlabeled_idx = labeled_idx   # "full": every image is also an unlabeled image
  labeled = sources.ArraySource(pool.images, pool.labels, pool.info, labeled_idx)
  # Unlabeled images keep their masks out of sight, for the diagnostics (hidden_label).
  unlabeled = sources.ArraySource(pool.images, pool.labels, pool.info, unlabeled_idx,
                                  hide_labels=True)
  return SemiSupervisedData(
      labeled, unlabeled, srcs["val"], pool.info,
      f"embedded digits {scene.canvas}x{scene.canvas}: {len(labeled)} labeled "
      f"({cfg.split}, split seed {cfg.split_seed}), {len(unlabeled)} unlabeled, "
      f"{len(srcs['val'])} val")


def build(cfg) -> SemiSupervisedData:
  """Builds the sources named by `config.data.dataset`.

  Raises:
    ValueError: for an unknown dataset, listing the valid ones.
  """
  if cfg.dataset == "embedded":
    return _embedded(cfg)
  if cfg.dataset in DATASETS:
    return _real(cfg)
  raise ValueError(f"config.data.dataset={cfg.dataset!r}; expected one of {DATASETS}")


def _real(cfg) -> "SemiSupervisedData":
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
    return SemiSupervisedData(labeled, unlabeled, val, labeled.info, desc)
  return _folder(cfg)


def _folder(cfg) -> "SemiSupervisedData":
  """A custom folder: `split` is a fraction (`1/8`, `full`) or `explicit` (dataset.json's
  `splits.labeled`); the val set is `splits.val` or `val_fraction` of the masked images."""
  dataset = folder.FolderDataset(cfg.root)
  where = f"{cfg.root}/{folder.METADATA}"
  if cfg.split == "explicit":
    if not dataset.explicit_labeled:
      raise DataError(f"{where} has no \"splits\": {{\"labeled\": [...]}} list, so "
                      "config.data.split='explicit' has nothing to use; give a fraction "
                      f"({', '.join(FRACTIONS)})")
    fraction = None
  else:
    try:
      fraction = parse_fraction(cfg.split)
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
  return SemiSupervisedData(parts.labeled, unlabeled, parts.val, parts.labeled.info,
                                     desc)


def _background(info) -> str:
  if info.background_class is None:
    return "none"
  return f"{info.background_class} ({info.class_names[info.background_class]})"
