"""Backbone weights that ship with semijax, by name (`config.model.pretrained=<name>`).

* `embedded`: the small ResNet of the embedded benchmark (`experiments/configs/base.py`
  `model.kwargs`), pretrained by `python -m experiments.pretrain` on typeset characters
  (`semijax.data.glyphs`), the benchmark's ImageNet. `embedded_small.json` beside the weights
  records the command, settings, held-out accuracy and versions that made them.
"""

import os

NAMES = {"embedded": "embedded_small"}


def path(name: str) -> str:
  """The `.safetensors` file of a shipped backbone; a ValueError if it is missing."""
  if name not in NAMES:
    raise ValueError(f"no shipped backbone {name!r}; expected one of {sorted(NAMES)}")
  out = os.path.join(os.path.dirname(__file__), NAMES[name] + ".safetensors")
  if not os.path.isfile(out):
    raise ValueError(f"{out} is missing: reinstall semijax, or rebuild it with "
                     "`python -m experiments.pretrain`")
  return out
