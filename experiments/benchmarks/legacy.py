"""Implementations replaced in issue 17, kept for side-by-side benchmarks and equality tests.

Not part of the library: nothing in `semijax/` imports this module.

* `strong_augment`: the batched strong view (every op of every slot computed for every image,
  one kept per image with `jnp.where`), as `semijax.augment.photometric.strong_augment` was
  before it switched to per-image `lax.switch`. Same parameter draws, same arithmetic.
* `import_baseline(ref)`: the whole library (and its configs) at a git revision, importable
  next to the working tree as `semijax_base` / `experiments_base`, so a benchmark can build
  the old and the new train step in one process and interleave their timings.
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import jax.numpy as jnp
from jax import lax

from semijax.augment import photometric as P

# The last commit before issue 17 (the "before" of its measurements).
ISSUE17_BASELINE = "12589ec"


def _select(index, candidates):
  out = candidates[0]
  for i, candidate in enumerate(candidates[1:], start=1):
    out = jnp.where((index == i)[:, None, None, None], candidate, out)
  return out


def apply_color_jitter(images, order, factors, apply=None, *, valid=None,
                       enabled=(True,) * 4):
  images = P._as_float(images)  # pylint: disable=protected-access
  ops = (P.adjust_brightness, lambda x, f: P.adjust_contrast(x, f, valid=valid),
         P.adjust_saturation, P.adjust_hue)

  def stage(i, x):
    candidates = [ops[j](x, factors[:, j]) if enabled[j] else x for j in range(4)]
    return _select(lax.dynamic_index_in_dim(order, i, axis=1, keepdims=False), candidates)

  out = lax.fori_loop(0, 4, stage, images) if any(enabled) else images
  if apply is not None:
    out = jnp.where(jnp.asarray(apply, bool)[:, None, None, None], out, images)
  return P._keep_invalid(out, images, valid)  # pylint: disable=protected-access


def _color_jitter_u(u, images, *, brightness, contrast, saturation, hue, p, valid):
  order, factors, apply = P._color_jitter_from(  # pylint: disable=protected-access
      u, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p)
  enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
  return apply_color_jitter(images, order, factors, apply, valid=valid, enabled=enabled)


def _grayscale_u(u, images, *, p, valid):
  out = jnp.where((u[:, 0] < p)[:, None, None, None], P.grayscale(images), images)
  return P._keep_invalid(out, images, valid)  # pylint: disable=protected-access


def _gaussian_blur_u(u, images, *, p, sigma_range, valid=None):
  apply, sigma = P._gaussian_blur_from(u, p=p, sigma_range=sigma_range)  # pylint: disable=protected-access
  out = jnp.where(apply[:, None, None, None], P.blur(images, sigma, sigma_max=sigma_range[1]),
                  images)
  return P._keep_invalid(out, images, valid)  # pylint: disable=protected-access


def apply_dssn_op(images, op, *, enhance, sigma, bits, threshold, hue, valid=None):
  images = P._as_float(images)  # pylint: disable=protected-access
  candidates = {
      "identity": images,
      "autocontrast": P.autocontrast(images, valid=valid),
      "equalize": P.equalize(images, valid=valid),
      "blur": P.blur(images, sigma, sigma_max=2.0),
      "contrast": P.adjust_contrast(images, enhance, valid=valid),
      "brightness": P.adjust_brightness(images, enhance),
      "color": P.adjust_saturation(images, enhance),
      "sharpness": P.adjust_sharpness(images, enhance),
      "posterize": P.posterize(images, bits),
      "solarize": P.solarize(images, threshold),
      "hue": P.adjust_hue(images, hue),
  }
  out = _select(jnp.asarray(op, jnp.int32), [candidates[name] for name in P.DSSN_OPS])
  return P._keep_invalid(out, images, valid)  # pylint: disable=protected-access


def apply_dssn_ops(images, params, *, valid=None):
  images = P._as_float(images)  # pylint: disable=protected-access

  def slot(i, x):
    p = {k: lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in params.items()}
    stepped = apply_dssn_op(x, p["op"], enhance=p["enhance"], sigma=p["sigma"], bits=p["bits"],
                            threshold=p["threshold"], hue=p["hue"], valid=valid)
    return jnp.where(p["active"][:, None, None, None], stepped, x)

  out = lax.fori_loop(0, params["op"].shape[0], slot, images)
  return P._keep_invalid(out, images, valid)  # pylint: disable=protected-access


def strong_augment(rng, images, *, preset="unimatch", valid=None):
  """The pre-issue-17 `photometric.strong_augment` (batched, every op computed)."""
  # pylint: disable=protected-access
  if preset not in P.PRESETS:
    raise ValueError(f"preset={preset!r}; expected one of {P.PRESETS}")
  images = P._as_float(images)
  batch = images.shape[0]
  if preset == "none":
    return images
  if preset == "cac":
    u_blur, u_jitter, u_gray = P._split_uniforms(
        P._uniforms(rng, batch, 1 + P.COLOR_JITTER_UNIFORMS + 1),
        (1, P.COLOR_JITTER_UNIFORMS, 1))
    binomial = jnp.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    x = jnp.where((u_blur[:, 0] < 0.5)[:, None, None, None],
                  P.separable_filter(images, binomial, border="reflect", valid=valid), images)
    x = _color_jitter_u(u_jitter, x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                        p=0.8, valid=valid)
    return _grayscale_u(u_gray, x, p=0.2, valid=valid)
  num_ops = 3 if preset == "dssn" else 0
  sizes = (P.COLOR_JITTER_UNIFORMS, 1, 2, P.DSSN_OPS_UNIFORMS * num_ops)
  u_jitter, u_gray, u_blur, u_ops = P._split_uniforms(P._uniforms(rng, batch, sum(sizes)),
                                                      sizes)
  x = _color_jitter_u(u_jitter, images, brightness=0.5, contrast=0.5, saturation=0.5,
                      hue=0.25, p=0.8, valid=valid)
  x = _grayscale_u(u_gray, x, p=0.2, valid=valid)
  x = _gaussian_blur_u(u_blur, x, p=0.5, sigma_range=(0.1, 2.0), valid=valid)
  if preset == "dssn":
    x = apply_dssn_ops(x, P._dssn_ops_from(u_ops, num_ops=num_ops, random_num=True), valid=valid)
  return x


# ------------------------------------------------------------------------------------------
# The library at a git revision.

_PACKAGES = ("semijax", "experiments")


def import_baseline(ref: str = ISSUE17_BASELINE, *, root: Optional[str] = None,
                    packages: Sequence[str] = _PACKAGES, suffix: str = "_base"):
  """Imports `semijax` and `experiments` as of git revision `ref` as `semijax_base` etc.

  The revision's files are extracted with `git archive` into a temporary folder, and every
  `semijax` / `experiments` import in them is renamed, so both versions live in one process.

  Args:
    ref: git revision.
    root: the repository (default: the one holding this file).
    packages: top-level packages to extract.
    suffix: appended to each package name.

  Returns:
    `{name: module}` of the renamed top-level packages, e.g. `{'semijax': semijax_base}`.
  """
  root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  target = tempfile.mkdtemp(prefix=f"semijax-{ref}-")
  archive = subprocess.run(["git", "-C", root, "archive", ref, *packages],
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
  for name in packages:
    os.rename(os.path.join(target, name), os.path.join(target, name + suffix))
  imports = re.compile(r"^(\s*)(from|import) (" + "|".join(packages) + r")\b", flags=re.M)
  for folder, _, files in os.walk(target):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        with open(path) as fh:
          text = fh.read()
        text = imports.sub(lambda m: f"{m.group(1)}{m.group(2)} {m.group(3)}{suffix}", text)
        with open(path, "w") as fh:
          fh.write(text)
  sys.path.insert(0, target)
  return {name: importlib.import_module(name + suffix) for name in packages}
