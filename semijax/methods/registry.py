"""Registries of methods, pseudo-label rules and extra terms, by name.

A method registers itself where it is defined, with one line:

    @registry.register
    class MyMethod(teacher_student.TeacherStudent):
      name = "my_method"
      ...

and so do rules (`registry.register_rule`) and terms (`registry.register_term`). Lookups import
every module of `semijax.methods` the first time a name is missing, so a new module in that
package is found with no edit anywhere else. A method defined outside the package is named
`package.module:Class` (its module is imported, which registers it).
"""

import importlib
import pkgutil
from typing import Dict

_METHODS: Dict[str, type] = {}
_RULES: Dict[str, type] = {}
_TERMS: Dict[str, type] = {}
_LOADED = False


def _register(table: Dict[str, type], kind: str, cls: type) -> type:
  name = cls.name
  if name in table and table[name] is not cls:
    raise ValueError(f"two {kind}s named {name!r}: {table[name].__module__} and {cls.__module__}")
  table[name] = cls
  return cls


def register(cls: type) -> type:
  """Class decorator: registers a `Method` subclass under `cls.name`."""
  return _register(_METHODS, "method", cls)


def register_rule(cls: type) -> type:
  """Class decorator: registers a pseudo-label rule under `cls.name`."""
  return _register(_RULES, "pseudo-label rule", cls)


def register_term(cls: type) -> type:
  """Class decorator: registers an extra loss term under `cls.name`."""
  return _register(_TERMS, "term", cls)


def _load_all() -> None:
  """Imports every module of `semijax.methods` (each registers what it defines)."""
  global _LOADED
  if _LOADED:
    return
  import semijax.methods as package  # pylint: disable=g-import-not-at-top
  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"{package.__name__}.{info.name}")
  _LOADED = True


def _lookup(table: Dict[str, type], kind: str, field: str, name: str) -> type:
  if ":" in name:   # an external plugin: importing its module registers it
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)
  if name not in table:
    _load_all()
  if name not in table:
    raise ValueError(f"{field}={name!r}: no such {kind}; expected one of {sorted(table)} "
                     f"(or 'package.module:Class' for one defined elsewhere)")
  return table[name]


def get(name: str) -> type:
  """The `Method` class registered as `name`; a ValueError lists the valid names."""
  return _lookup(_METHODS, "method", "config.method.name", name)


def get_rule(name: str) -> type:
  """The pseudo-label rule registered as `name`."""
  return _lookup(_RULES, "pseudo-label rule", "config.pseudo_label.rule", name)


def get_term(name: str) -> type:
  """The extra term registered as `name`."""
  return _lookup(_TERMS, "term", "config.method.terms", name)


def names() -> Dict[str, list]:
  """`{'methods': [...], 'rules': [...], 'terms': [...]}`: everything registered."""
  _load_all()
  return {"methods": sorted(_METHODS), "rules": sorted(_RULES), "terms": sorted(_TERMS)}
