"""Deprecated argument and function names, kept working for one release (issue 13).

The public API uses one vocabulary (BUILD_NOTES.md, "Conventions": the renames table). An old
keyword still works through `renamed_args`: it warns with a `DeprecationWarning` naming the new
keyword and is converted to it (e.g. `pad=` becomes `valid=~pad`), so the result is the same
bit for bit. Imports only jax/numpy, like the packages that use it.
"""

import functools
import inspect
import warnings
from typing import Any, Callable, Mapping, Sequence, Tuple, Union

import jax.numpy as jnp

# old name -> new name, or (new name, function converting the old value to the new one).
Rename = Union[str, Tuple[str, Callable[[Any], Any]]]


def invert_mask(pad: Any) -> Any:
  """`pad` (True = padding, drop) -> `valid` (True = real pixel, keep); None stays None."""
  return None if pad is None else ~jnp.asarray(pad, bool)


def pad_to_valid() -> Tuple[str, Callable[[Any], Any]]:
  """The rename of a True-means-drop `pad` argument to a True-means-keep `valid` one."""
  return ("valid", invert_mask)


def warn(message: str, stacklevel: int = 3) -> None:
  """A `DeprecationWarning` pointing at the caller of the deprecated function."""
  warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


class _DeprecatedAlias:
  """The default shown for an old argument name in a signature (never passed on)."""

  def __init__(self, new: str):
    self.new = new

  def __repr__(self) -> str:
    return f"<deprecated alias of {self.new}>"


def _new_name(rename: Rename) -> Tuple[str, Callable[[Any], Any]]:
  if isinstance(rename, str):
    return rename, lambda value: value
  return rename


def renamed_args(renames: Mapping[str, Rename], *,
                 positional: Sequence[str] = ()) -> Callable[[Callable], Callable]:
  """Decorator: `fn` still accepts its old argument names, with a `DeprecationWarning`.

  Args:
    renames: old name -> new name, or `(new name, convert)` when the value changes too
      (`pad_to_valid()`: `pad=m` becomes `valid=~m`).
    positional: old names of arguments that used to be positional right after `fn`'s current
      positional parameters (in order); surplus positional arguments are taken as them, e.g.
      `weak_to_strong_loss(logits, labels, mask, pad)` of the previous release.

  Returns:
    A decorator. The wrapped function's signature is `fn`'s plus the old names as keyword-only
    parameters at the end (so `jax.jit(static_argnames=...)` accepts old and new names); its
    renames are listed in `deprecated_args`.
  """
  renames = {old: _new_name(new) for old, new in renames.items()}
  for name in positional:
    if name not in renames:
      raise ValueError(f"positional alias {name!r} needs an entry in renames")

  def decorate(fn: Callable) -> Callable:
    params = inspect.signature(fn).parameters
    for old, (new, _) in renames.items():
      if new not in params or old in params:
        raise ValueError(f"{fn.__qualname__}: cannot rename {old!r} to {new!r}")
    num_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                         for p in params.values())

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if positional and len(args) > num_positional:
        extra = args[num_positional:]
        if len(extra) > len(positional):
          raise TypeError(f"{fn.__qualname__}() takes at most "
                          f"{num_positional + len(positional)} positional arguments")
        args = args[:num_positional]
        for old, value in zip(positional, extra):
          if old in kwargs:
            raise TypeError(f"{fn.__qualname__}() got multiple values for {old!r}")
          kwargs[old] = value
      for old in [k for k in kwargs if k in renames]:
        new, convert = renames[old]
        if new in kwargs:
          raise TypeError(f"{fn.__qualname__}() got both {new!r} and its deprecated name "
                          f"{old!r}")
        how = f"{new}=~{old}" if convert is invert_mask else f"{new}="
        warn(f"{fn.__qualname__}: argument {old!r} is deprecated and will be removed in the "
             f"next release; pass {how} instead", stacklevel=3)
        kwargs[new] = convert(kwargs.pop(old))
      return fn(*args, **kwargs)

    # The signature lists the old names too (keyword-only, last), so that code of the previous
    # release that jits the function with an old name in `static_argnames` keeps working.
    kinds = [p for p in params.values() if p.kind is not p.VAR_KEYWORD]
    varkw = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
    aliases = [inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY,
                                 default=_DeprecatedAlias(new))
               for old, (new, _) in renames.items()]
    wrapper.__signature__ = inspect.signature(fn).replace(parameters=kinds + aliases + varkw)
    wrapper.deprecated_args = {old: new for old, (new, _) in renames.items()}
    return wrapper

  return decorate
