"""A run config's method part: the method's block, its pseudo-label rule's and its terms'.

`experiments/configs/base.py` holds only what every run shares; a method's settings live in
its own file (`default_config`) and are merged here, so adding a method edits no shared file:

    c = base.get_config()
    methods.configure(c, "dgcl")                      # c.dgcl, c.pseudo_label, c.dgcl_contrast
    methods.configure(c, "mean_teacher", terms=("dgcl_contrast",))   # a cross-paper recipe
"""

import copy
from typing import Optional, Sequence

from semijax.methods import pseudo_labels, registry


def configure(config, name: str, *, terms: Optional[Sequence[str]] = None,
              rule: Optional[str] = None):
  """Sets `config.method` to method `name` and merges the blocks it needs.

  Args:
    config: a run config with a `method` block (unlocked).
    name: a registered method name.
    terms: extra terms to run (default: the method's own `terms`); their blocks are added.
    rule: pseudo-label rule (default: the method's); every rule's settings are added under
      `config.pseudo_label`, so the rule stays switchable from the command line.

  Returns:
    `config`.
  """
  cls = registry.get(name)
  config.method.name = name
  block = cls.default_config()
  if block is not None:
    config[name] = block
  default_rule = getattr(cls, "default_rule", None)
  if default_rule is not None:
    config.pseudo_label = pseudo_labels.default_config(rule or default_rule)
  elif rule:
    raise ValueError(f"method {name!r} uses no pseudo-labels; rule={rule!r} does not apply")
  terms = tuple(cls.terms if terms is None else terms)
  if terms and default_rule is None:
    raise ValueError(f"method {name!r} is not a teacher-student method; it takes no terms")
  config.method.terms = terms
  for term in terms:
    config[term] = registry.get_term(term).default_config()
  return config


def smoke(config) -> None:
  """Applies the method's and its terms' smoke shrinks to `config`."""
  registry.get(config.method.name).smoke(config)
  for term in config.method.get("terms", ()):
    registry.get_term(term).smoke(config)


def reference_config(base_config, config):
  """Every valid field of `config`: `base_config` plus the blocks of its method and terms."""
  reference = copy.deepcopy(base_config)
  return configure(reference, config.method.name, terms=config.method.get("terms", ()))
