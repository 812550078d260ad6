"""Optional dependencies: the extras of pyproject.toml and the error a missing one raises.

The base install is the training stack; a package that only one path needs is an extra:

* `embedded`: scikit-learn and scikit-image, whose bundled images make the embedded dataset.
* `sbd`: scipy, for the SBD `.mat` files of the VOC converter.
* `tensorboard`: tensorboardX (TensorBoard event files; without it a run writes
  `metrics.jsonl` only) and the `tensorboard` viewer.
* `demo`: what `make demo` needs (`embedded` and tensorboardX); `dev` adds the test tools.

This module imports nothing itself, so `semijax.losses` and the other pure packages stay free
of the training stack.
"""

import importlib
import types


class MissingExtraError(ImportError):
  """An optional package is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
  """The command that installs `extra` into a checkout's environment."""
  return f"pip install -e '.[{extra}]'"


def require(module: str, package: str, extra: str, purpose: str) -> types.ModuleType:
  """Imports `module` or raises `MissingExtraError` naming the extra to install.

  Args:
    module: the module to import, e.g. `"skimage.data"`.
    package: its distribution name on the package index, e.g. `"scikit-image"`.
    extra: the extra of pyproject.toml that installs it, e.g. `"embedded"`.
    purpose: what needs it, the start of the message, e.g. `"the embedded dataset"`.

  Returns:
    The imported module.
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingExtraError(
        f"{purpose} needs {package}, which is not installed; it is in the optional extra "
        f"`{extra}`: {install_hint(extra)} (from the semijax checkout)") from e
