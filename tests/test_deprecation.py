"""Names of the previous release (issue 13's renames) still work: same result, and they warn."""

import functools
import importlib
import inspect
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semijax import _deprecation
from semijax.augment import photometric as P
from semijax.banks import fifo
from semijax.losses import consistency, contrastive, supervised
from semijax.methods import diagnostics
from semijax.pseudo import sharpened, thresholds
from semijax.sampling import dgcl, overlap, semihard

pytestmark = pytest.mark.usefixtures("fast_compiles")

B, H, W, NC = 2, 8, 8, 4
_rng = np.random.default_rng(0)
IMAGES = _rng.random((B, H, W, 3)).astype(np.float32)
PAD = np.zeros((B, H, W), bool)
PAD[0, 5:] = True
PAD[1, :, 6:] = True
LOGITS = (3 * _rng.normal(size=(B, H, W, NC))).astype(np.float32)
PROBS = np.asarray(jax.nn.softmax(LOGITS, -1))
LABELS = _rng.integers(0, NC, (B, H, W)).astype(np.int32)
MASK = _rng.random((B, H, W)) < 0.6
KEY = jax.random.key(0)

# The DGCL pieces: a full bank and a small batch.
_C, _K, _D = 3, 8, 4
BANK = dgcl.bank_from_entries(_rng.normal(size=(_C, _K, _D)).astype(np.float32),
                              _rng.normal(size=(_C, _K, _D)).astype(np.float32),
                              _rng.uniform(-1, 1, (_C, _K)).astype(np.float32))
FEATS = _rng.normal(size=(2, 4, 4, _D)).astype(np.float32)
PROJ = _rng.normal(size=(2, 4, 4, _D)).astype(np.float32)
DLABELS = _rng.integers(0, _C, (2, 4, 4)).astype(np.int32)
DGCL_KW = dict(num_anchors=3, num_batch_keys=2, num_bank_keys=2, num_negatives=8, ks=(2, 4),
               chunk_size=8)
FIFO_ITEMS = {"x": _rng.normal(size=(10, 2)).astype(np.float32)}
FIFO_LABELS = _rng.integers(0, 3, 10).astype(np.int32)
FIFO_ARGS = (fifo.init(3, 4, {"x": ((2,), jnp.float32)}), FIFO_ITEMS, FIFO_LABELS,
             np.ones(10, bool), KEY)
SEMIHARD_PRED = np.where(_rng.random((B, H, W)) < 0.5, LABELS, 0).astype(np.int32)

_order = np.stack([_rng.permutation(4) for _ in range(B)]).astype(np.int32)
_factors = np.array([[1.3, 0.6, 1.2, 0.1], [0.8, 1.4, 0.7, -0.2]], np.float32)
_dssn = dict(enhance=np.full(B, 0.4, np.float32), sigma=np.full(B, 1.2, np.float32),
             bits=np.full(B, 5, np.int32), threshold=np.full(B, 0.5, np.float32),
             hue=np.full(B, 0.2, np.float32))

# (function, positional args, keyword args both calls share, new keywords, old keywords).
CASES = [
    (supervised.ohem_cross_entropy_loss, (LOGITS, LABELS), dict(min_kept=20),
     dict(threshold=0.6), dict(thresh=0.6)),
    (consistency.weak_to_strong_loss, (LOGITS, LABELS, MASK), {}, dict(valid=~PAD),
     dict(pad=PAD)),
    (contrastive.dgcl_contrastive_loss, (PROJ, FEATS, DLABELS, BANK, KEY), DGCL_KW,
     dict(max_per_class=5), dict(max_pixels_per_class=5)),
    (thresholds.confidence_mask, (PROBS,), dict(threshold=0.5), dict(valid=~PAD),
     dict(pad=PAD)),
    (thresholds.cplg_thresholds, (PROBS,), dict(tau_low=0.5),
     dict(peak_fraction=0.9, valid=~PAD), dict(ratio=0.9, peak_mask=~PAD)),
    (thresholds.cplg_select, (PROBS,), dict(tau_low=0.5),
     dict(peak_fraction=0.9, valid=~PAD, peaks_include_invalid=False),
     dict(ratio=0.9, pad=PAD, peaks_include_pad=False)),
    (thresholds.cplg_mask, (LOGITS,), dict(tau_low=0.5),
     dict(peak_fraction=0.9, valid=~PAD, peaks_include_invalid=False),
     dict(ratio=0.9, pad=PAD, peaks_include_pad=False)),
    (sharpened.sharpened_confidence, (PROBS,), dict(threshold=0.3), dict(valid=~PAD),
     dict(pad=PAD)),
    (fifo.push, FIFO_ARGS, {}, dict(push_per_class=2), dict(max_per_class=2)),
    (dgcl.push_bank, (BANK, FEATS, PROJ, DLABELS, KEY), dict(ks=(2, 4), min_bank_size=2),
     dict(push_per_class=3), dict(max_per_class=3)),
    (dgcl.sample, (FEATS, DLABELS, BANK, KEY), DGCL_KW, dict(max_per_class=5),
     dict(max_pixels_per_class=5)),
    (diagnostics.oracle_labels, (LABELS,), {}, dict(valid=~PAD), dict(pad=PAD)),
    # Photometric augmentation: every public function took `pad`.
    (P.grayscale, (IMAGES,), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.adjust_brightness, (IMAGES, 1.4), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.adjust_contrast, (IMAGES, 0.5), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.adjust_saturation, (IMAGES, 0.5), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.adjust_hue, (IMAGES, 0.2), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.adjust_sharpness, (IMAGES, 0.3), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.autocontrast, (IMAGES,), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.equalize, (IMAGES,), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.posterize, (IMAGES, 5), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.solarize, (IMAGES, 0.5), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.separable_filter, (IMAGES, np.array([0.25, 0.5, 0.25], np.float32)), {},
     dict(valid=~PAD), dict(pad=PAD)),
    (P.blur, (IMAGES, np.array([0.7, 1.5], np.float32)), dict(sigma_max=2.0), dict(valid=~PAD),
     dict(pad=PAD)),
    (P.apply_color_jitter, (IMAGES, _order, _factors), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.color_jitter, (KEY, IMAGES), dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
     dict(valid=~PAD), dict(pad=PAD)),
    (P.random_grayscale, (KEY, IMAGES), dict(p=0.5), dict(valid=~PAD), dict(pad=PAD)),
    (P.gaussian_blur, (KEY, IMAGES), dict(p=1.0), dict(valid=~PAD), dict(pad=PAD)),
    (P.apply_dssn_op, (IMAGES, np.array([2, 4], np.int32)), _dssn, dict(valid=~PAD),
     dict(pad=PAD)),
    (P.apply_dssn_ops, (IMAGES, P.dssn_ops_params(KEY, B)), {}, dict(valid=~PAD),
     dict(pad=PAD)),
    (P.random_photometric_ops, (KEY, IMAGES), {}, dict(valid=~PAD), dict(pad=PAD)),
    (P.strong_augment, (KEY, IMAGES), dict(preset="dssn"), dict(valid=~PAD), dict(pad=PAD)),
]


_OURS = "will be removed in the next release"


def _id(case):
  return case[0].__name__ + "(" + ",".join(case[4]) + ")"


def _call(fn, args, kwargs):
  """`fn(*args, **kwargs)` jitted (one compile beats op-by-op dispatch); keywords are baked in
  as constants, so the old and the new names reach the function exactly as written."""
  return jax.jit(functools.partial(fn, **kwargs))(*args)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_old_names_work_give_the_same_result_and_warn(case):
  fn, args, common, new_kw, old_kw = case
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    want = _call(fn, args, {**common, **new_kw})
  assert not [w for w in record if _OURS in str(w.message)]   # the new names never warn
  with pytest.warns(DeprecationWarning) as record:
    got = _call(fn, args, {**common, **old_kw})
  messages = " ".join(str(w.message) for w in record)
  for old, new in fn.deprecated_args.items():
    if old in old_kw:
      assert f"{old!r}" in messages and f"{new}=" in messages
  chex.assert_trees_all_equal(got, want)


def test_positional_pad_of_the_previous_release():
  want = consistency.weak_to_strong_loss(LOGITS, LABELS, MASK, valid=~PAD)
  with pytest.warns(DeprecationWarning, match="valid=~pad"):
    got = consistency.weak_to_strong_loss(LOGITS, LABELS, MASK, PAD)
  chex.assert_trees_all_equal(got, want)
  want = diagnostics.oracle_labels(LABELS, valid=~PAD)
  with pytest.warns(DeprecationWarning, match="valid=~pad"):
    got = diagnostics.oracle_labels(LABELS, PAD)
  chex.assert_trees_all_equal(got, want)


def test_deprecated_functions():
  with pytest.warns(DeprecationWarning, match="valid_blocks"):
    old = overlap.block_valid(PAD, 4)
  chex.assert_trees_all_equal(old, overlap.valid_blocks(~PAD, 4))
  with pytest.warns(DeprecationWarning, match="semihard.sample"):
    old = semihard.semi_hard_anchors(LABELS, SEMIHARD_PRED, KEY, views=(2, 2, 2, 2))
  chex.assert_trees_all_equal(old, semihard.sample(LABELS, SEMIHARD_PRED, KEY,
                                                   views=(2, 2, 2, 2))[0])


def test_old_static_argnames_still_jit():
  args = FIFO_ARGS
  old = jax.jit(fifo.push, static_argnames=("max_per_class",))
  new = jax.jit(fifo.push, static_argnames=("push_per_class",))
  with pytest.warns(DeprecationWarning):
    got = old(*args, max_per_class=2)
  chex.assert_trees_all_equal(got, new(*args, push_per_class=2))


def test_both_names_or_too_many_arguments_are_errors():
  with pytest.raises(TypeError, match="both"):
    thresholds.confidence_mask(PROBS, valid=~PAD, pad=PAD)
  with pytest.raises(TypeError, match="positional"):
    consistency.weak_to_strong_loss(LOGITS, LABELS, MASK, PAD, PAD)
  with pytest.raises(TypeError, match="multiple values"):
    consistency.weak_to_strong_loss(LOGITS, LABELS, MASK, PAD, pad=PAD)
  with pytest.raises(ValueError, match="cannot rename"):
    _deprecation.renamed_args({"a": "missing"})(lambda x, *, b=1: x)


# The modules whose public names issue 13 aligned (the other modules of these packages are
# aligned by their authors).
SCOPE = ("semijax.ops", "semijax.collectives", "semijax.losses.supervised",
         "semijax.losses.consistency", "semijax.losses.contrastive", "semijax.pseudo.entropy",
         "semijax.pseudo.thresholds", "semijax.pseudo.sharpened", "semijax.banks.fifo",
         "semijax.sampling.density", "semijax.sampling.dgcl", "semijax.sampling.overlap",
         "semijax.sampling.semihard", "semijax.augment.photometric", "semijax.augment.mix",
         "semijax.augment.feature", "semijax.methods.diagnostics")


def _renamed_functions():
  """Every public function of `SCOPE` that carries deprecated argument names."""
  out = {}
  for module_name in SCOPE:
    module = importlib.import_module(module_name)
    for name, obj in vars(module).items():
      if (inspect.isfunction(obj) and obj.__module__ == module.__name__
          and not name.startswith("_") and hasattr(obj, "deprecated_args")):
        out[f"{module.__name__}.{name}"] = obj
  return out


def test_every_deprecated_name_is_covered_here():
  covered = {(case[0], old) for case in CASES for old in case[4]}
  missing = [f"{full}({old}=)" for full, fn in _renamed_functions().items()
             for old in fn.deprecated_args if (fn, old) not in covered]
  assert not missing, missing
  assert len(_renamed_functions()) == len({case[0] for case in CASES})
