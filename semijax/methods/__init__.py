"""Method registry: `get(name)` returns the `Method` class of a recipe."""

from semijax.methods import base
from semijax.methods.dgcl import DGCL
from semijax.methods.dssn import DSSN
from semijax.methods.mean_teacher import MeanTeacher
from semijax.methods.supervised import Supervised

METHODS = {cls.name: cls for cls in (Supervised, MeanTeacher, DGCL, DSSN)}


def get(name: str) -> type:
  """The `Method` class registered as `name`; a ValueError lists the valid names."""
  if name not in METHODS:
    raise ValueError(f"config.method.name={name!r}; expected one of {sorted(METHODS)}")
  return METHODS[name]
