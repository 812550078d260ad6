"""Dataset registry: `config.data` -> labeled, unlabeled and val sources plus metadata."""

import dataclasses
from typing import Optional

from semijax.data import embedded, sources, splits

DATASETS = ("embedded", "voc", "cityscapes", "folder")


@dataclasses.dataclass
class SemiSupervisedData:
  """The three sources of a semi-supervised run."""
  labeled: object
  unlabeled: Optional[object]
  val: object
  info: sources.DatasetInfo
  description: str


FRACTIONS = ("1/16", "1/8", "1/4", "1/2", "full")


def parse_fraction(split: str) -> float:
  """'1/16' -> 0.0625, 'full' -> 1.0 (the fraction splits of the embedded/custom data)."""
  if split == "full":
    return 1.0
  try:
    num, den = (int(x) for x in str(split).split("/"))
    if not 0 < num <= den:
      raise ValueError
  except ValueError:
    raise ValueError(f"config.data.split={split!r}; expected a fraction like "
                     f"{', '.join(FRACTIONS)}") from None
  return num / den


def _embedded(cfg) -> SemiSupervisedData:
  scene = embedded.SceneConfig(**cfg.embedded.to_dict())
  srcs = embedded.make_sources(scene)
  pool = srcs["train"]
  labeled_idx, unlabeled_idx = splits.fraction_split(len(pool), parse_fraction(cfg.split),
                                                     cfg.split_seed)
  if not len(unlabeled_idx):
    unlabeled_idx = labeled_idx   # "full": every image is also an unlabeled image
  labeled = sources.ArraySource(pool.images, pool.labels, pool.info, labeled_idx)
  unlabeled = sources.ArraySource(pool.images, None, pool.info, unlabeled_idx)
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
    from semijax.data import real  # pylint: disable=g-import-not-at-top
    return real.build(cfg)
  raise ValueError(f"config.data.dataset={cfg.dataset!r}; expected one of {DATASETS}")
