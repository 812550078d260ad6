"""Dataset registry: `config.data` -> labeled, unlabeled and val sources plus metadata."""

import dataclasses
from typing import Optional

from semijax.data import embedded, sources, splits

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
    from semijax.data import real  # pylint: disable=g-import-not-at-top
    return real.build(cfg)
  raise ValueError(f"config.data.dataset={cfg.dataset!r}; expected one of {DATASETS}")
