"""DGCL overhead: density + sampling + loss + bank push vs a DeepLabv3+ ResNet-101 step.

    python -m experiments.benchmarks.dgcl_overhead --scale=official \
        --out=results/dgcl_overhead.json
    python -m experiments.benchmarks.dgcl_overhead --scale=small        # seconds, for tests

The DGCL issue's measurement: the forward+backward time of DGCL's contrastive machinery at
the official VOC scale (21 classes, a full bank of 10,000 x 256 per class, 16 images of
129 x 129 feature pixels) as a fraction of a DeepLabv3+ ResNet-101 train step at the same
batch, measured side by side in one process. Target: at most 15 %.

* DGCL part (one jitted function, the bank donated as in the train step):
  `dgcl_contrastive_loss` value and gradient w.r.t. the projections `[16, 129, 129, 256]`
  (full bank, so `wait_for_full_bank` passes and the candidates' density runs), then
  `push_bank` of the same batch (1000 per class, density computed since the bank holds
  more than 1000). Official defaults: 200 anchors, 50 + 50 keys, 512 negatives, at most
  10,000 candidates per class, ks (8, 16, 32). Variant: `compute_dtype=bfloat16` for the
  density matmuls. Labels are VOC-like: background ~70 % of the labelled pixels, 1-3
  object blobs per image from 20 classes, ~20 % ignore (boundary bands and blobs, like
  GT boundaries plus entropy-filtered pseudo-labels).
* Model part: DeepLabv3+ ResNet-101 (deep stem, OS16, 21 classes, DGCL/U2PL head) train
  step at 513 x 513 (the VOC crop; its decoder features are 129 x 129): forward in train
  mode, CE on the upsampled logits, backward, SGD (momentum 0.9, weight decay 1e-4).
  Sixteen 513 x 513 images take minutes (and too much memory) on a CPU, so the step is
  measured at `--model_batches` (e.g. 2 and 4), checked for linearity and extrapolated
  to 16 (`model_extrapolated: true`, fit in `model_fit`).
* DGCL, model, DGCL, model, ... are interleaved (`--reps` rounds; medians and minima), and
  the machine's matmul/conv peak (`step_time.machine_peak`) is measured before and after,
  since CPU throughput here drifts by up to 2x (stack-facts section 4).
* A breakdown (`--breakdown`) times the pieces separately: candidate selection, candidate
  density, negatives, the whole sampler, loss value+grad, bank push.

FLOPs: XLA's cost analysis counts a while-loop body once, and the density runs in
`lax.map` loops (classes x query chunks) with a `lax.cond` skipping empty chunks, so the
XLA number undercounts it. `flops_density_analytic` counts the similarity matmuls of the
chunks actually computed for these labels, and `flops_estimate` = XLA's count with its
per-loop single chunk replaced by that analytic count.
"""

import dataclasses
import importlib
import inspect
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli

# `step_time` defines --out (JSON output path) and the machine-peak measurement we reuse.
from experiments.benchmarks import step_time

flags.DEFINE_enum("scale", "official", ["official", "small"],
                  "official: the issue's VOC scale; small: a seconds-long smoke run.")
flags.DEFINE_string("model_batches", None,
                    "Comma-separated model batch sizes to measure (default per scale: "
                    "official 2,4; small 1,2).")
flags.DEFINE_integer("reps", 3, "Interleaved rounds (DGCL, model, DGCL, model, ...).")
flags.DEFINE_integer("dgcl_inner", 3, "DGCL calls per round (each timed).")
flags.DEFINE_integer("dgcl_images", None, "Images in the DGCL batch (default: the scale's).")
flags.DEFINE_bool("breakdown", True, "Also time the DGCL pieces separately.")
flags.DEFINE_bool("bf16_variant", True, "Also time compute_dtype=bfloat16 density matmuls.")
flags.DEFINE_string("from_json", None,
                    "Recompute the derived figures of a saved result (no measurement).")
flags.DEFINE_float("memory_fraction", 0.6,
                   "Skip a model batch whose compiled memory exceeds this fraction of "
                   "MemAvailable.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that defines one measurement (written to the JSON)."""
  scale: str
  num_classes: int = 21
  bank_size: int = 10000
  feature_dim: int = 256
  projection_dim: int = 256
  dgcl_images: int = 16
  feature_size: int = 129  # decoder (stride-4) size of a 513 crop
  num_anchors: int = 200
  num_batch_keys: int = 50
  num_bank_keys: int = 50
  num_negatives: int = 512
  max_per_class: int = 10000     # candidate pixels per class (was max_pixels_per_class)
  ks: Tuple[int, ...] = (8, 16, 32)
  push_per_class: int = 1000
  min_bank_size: int = 1000      # density stored above this fill (was ..._for_density)
  chunk_size: int = 256   # the library default since issue 17 (1024 before)
  baseline_chunk_size: int = 1024   # the baseline revision's default
  exclude_classes: Tuple[int, ...] = (0,)
  ignore_fraction: float = 0.2
  model: str = "deeplabv3plus_resnet101"
  model_kwargs: Tuple[Tuple[str, object], ...] = (("stem", "deep"), ("output_stride", 16))
  crop_size: int = 513
  model_batches: Tuple[int, ...] = (2, 4)
  target_batch: int = 16
  lr: float = 0.001
  momentum: float = 0.9
  weight_decay: float = 1e-4
  reps: int = 3
  dgcl_inner: int = 3
  breakdown: bool = True
  bf16_variant: bool = True
  memory_fraction: float = 0.6
  seed: int = 0


def settings_for(scale: str, **overrides) -> Settings:
  if scale == "official":
    base = Settings(scale="official")
  elif scale == "small":
    base = Settings(
        scale="small", num_classes=5, bank_size=64, feature_dim=16, projection_dim=16,
        dgcl_images=2, feature_size=17, num_anchors=8, num_batch_keys=4, num_bank_keys=4,
        num_negatives=16, max_per_class=64, ks=(2, 4, 8), push_per_class=16,
        min_bank_size=16, chunk_size=32, model="deeplabv3plus_small",
        model_kwargs=(), crop_size=65, model_batches=(1, 2), target_batch=2, reps=2,
        dgcl_inner=2)
  else:
    raise ValueError(f"unknown scale {scale!r}")
  return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------
# Synthetic VOC-like inputs.


def _ellipse(h, w, cy, cx, ry, rx, angle):
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  c, s = np.cos(angle), np.sin(angle)
  u = ((yy - cy) * c + (xx - cx) * s) / max(ry, 0.5)
  v = (-(yy - cy) * s + (xx - cx) * c) / max(rx, 0.5)
  return u * u + v * v <= 1.0


def voc_like_labels(rng: np.random.Generator, n: int, size: int, num_classes: int,
                    ignore_fraction: float = 0.2) -> np.ndarray:
  """`[n, size, size]` int32: background, 1-3 object blobs per image, ~`ignore_fraction` 255.

  Objects cover ~30 % of an image on average (VOC: background ~70 % of labelled pixels).
  Ignore = a band around object boundaries (GT-style) plus blobs (entropy-filtered
  pseudo-label style) until the image's ignore fraction reaches its target.
  """
  out = np.zeros((n, size, size), np.int32)
  for i in range(n):
    lab = out[i]
    k = int(rng.integers(1, 4))
    classes = rng.choice(np.arange(1, num_classes), size=min(k, num_classes - 1),
                         replace=False)
    target = rng.uniform(0.15, 0.45)  # object fraction of this image
    for c in classes:
      area = target / len(classes) * size * size
      r = np.sqrt(area / np.pi)
      aspect = rng.uniform(0.6, 1.6)
      cy, cx = rng.uniform(0.2, 0.8, 2) * size
      lab[_ellipse(size, size, cy, cx, r * aspect, r / aspect, rng.uniform(0, np.pi))] = c
    band = np.zeros((size, size), bool)
    width = max(1, size // 64)
    for d in range(1, width + 1):
      for axis in (0, 1):
        for sgn in (-1, 1):
          band |= np.roll(lab, sgn * d, axis=axis) != lab
    lab[band] = 255
    goal = rng.uniform(0.5, 1.5) * ignore_fraction
    for _ in range(50):
      if np.mean(lab == 255) >= goal:
        break
      r = rng.uniform(0.03, 0.12) * size
      lab[_ellipse(size, size, *(rng.uniform(0, 1, 2) * size), r, r * rng.uniform(0.5, 2),
                   rng.uniform(0, np.pi))] = 255
  return out


def label_stats(labels: np.ndarray, num_classes: int) -> dict:
  flat = labels.reshape(-1)
  counts = np.bincount(np.where(flat == 255, num_classes, flat), minlength=num_classes + 1)
  labelled = max(int(counts[:num_classes].sum()), 1)
  return {"pixels": int(flat.size), "ignore_fraction": float(counts[-1] / flat.size),
          "background_fraction_of_labelled": float(counts[0] / labelled),
          "classes_present": int(np.sum(counts[:num_classes] > 0)),
          "pixels_per_class": [int(x) for x in counts[:num_classes]]}


def full_bank(s: Settings, rng: np.random.Generator):
  """A full DGCL bank: class-clustered features, random projections and stored densities."""
  from semijax.banks import fifo  # pylint: disable=g-import-not-at-top
  from semijax.sampling import dgcl as dgcl_sampling  # pylint: disable=g-import-not-at-top
  c, k = s.num_classes, s.bank_size
  centres = rng.standard_normal((c, 1, s.feature_dim), dtype=np.float32)
  feats = centres + rng.standard_normal((c, k, s.feature_dim), dtype=np.float32)
  projs = rng.standard_normal((c, k, s.projection_dim), dtype=np.float32)
  dens = rng.uniform(-0.2, 0.9, (c, k)).astype(np.float32)
  bank = dgcl_sampling.init_bank(c, k, feature_dim=s.feature_dim,
                                 projection_dim=s.projection_dim)
  bank = fifo.write(bank, {dgcl_sampling.FEATURE: feats, dgcl_sampling.PROJECTION: projs,
                           dgcl_sampling.DENSITY: dens}, np.ones((c, k), bool))
  return jax.block_until_ready(bank), centres


def dgcl_inputs(s: Settings, rng: np.random.Generator, centres: np.ndarray):
  n, h = s.dgcl_images, s.feature_size
  labels = voc_like_labels(rng, n, h, s.num_classes, s.ignore_fraction)
  cls = np.where(labels == 255, 0, labels)
  feats = centres[cls, 0] + rng.standard_normal((n, h, h, s.feature_dim), dtype=np.float32)
  projs = rng.standard_normal((n, h, h, s.projection_dim), dtype=np.float32)
  return jnp.asarray(projs), jnp.asarray(feats), jnp.asarray(labels), labels


# ------------------------------------------------------------------------------------------
# The DGCL functions.


def _name(fn, new: str, old: str) -> str:
  """`new` if `fn` takes it, else `old` (a baseline revision from before issue 13's renames)."""
  return new if new in inspect.signature(fn).parameters else old


def _loss_kwargs(s: Settings, compute_dtype, loss_fn) -> dict:
  return {"num_anchors": s.num_anchors, "num_batch_keys": s.num_batch_keys,
          "num_bank_keys": s.num_bank_keys, "num_negatives": s.num_negatives,
          _name(loss_fn, "max_per_class", "max_pixels_per_class"): s.max_per_class,
          "ks": s.ks, "exclude_classes": s.exclude_classes, "chunk_size": s.chunk_size,
          "compute_dtype": compute_dtype}


def _push_kwargs(s: Settings, compute_dtype, push_fn) -> dict:
  return {_name(push_fn, "push_per_class", "max_per_class"): s.push_per_class, "ks": s.ks,
          "min_bank_size": s.min_bank_size, "chunk_size": s.chunk_size,
          "compute_dtype": compute_dtype}


def _modules(lib: str):
  """The DGCL modules of the package `lib` ('semijax', or a baseline's 'semijax_base')."""
  return {name: importlib.import_module(f"{lib}.{path}") for name, path in (
      ("ops", "ops"), ("fifo", "banks.fifo"), ("contrastive", "losses.contrastive"),
      ("density", "sampling.density"), ("dgcl", "sampling.dgcl"))}


def make_dgcl_fns(s: Settings, compute_dtype, lib: str = "semijax") -> Dict[str, callable]:
  """Name -> un-jitted fn(projections, features, labels, bank, rng) of the DGCL pieces.

  'total' is the measured quantity (loss value+grad, then push); the others are the
  breakdown. Each returns the arrays a train step would consume. `lib` names the package
  (a baseline revision imported by `legacy.import_baseline` runs with its own chunk size).
  """
  mods = _modules(lib)
  ops, fifo, contrastive = mods["ops"], mods["fifo"], mods["contrastive"]
  density_lib, dgcl_sampling = mods["density"], mods["dgcl"]
  if lib != "semijax":
    s = dataclasses.replace(s, chunk_size=s.baseline_chunk_size)
  lkw = _loss_kwargs(s, compute_dtype, contrastive.dgcl_contrastive_loss)
  pkw = _push_kwargs(s, compute_dtype, dgcl_sampling.push_bank)

  def loss_grad(projections, features, labels, bank, rng):
    def loss_fn(p):
      return contrastive.dgcl_contrastive_loss(p, features, labels, bank, rng, **lkw)
    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(projections)
    return loss, aux, grad

  def push(projections, features, labels, bank, rng):
    return dgcl_sampling.push_bank(bank, features, projections, labels, rng, **pkw)

  def total(projections, features, labels, bank, rng):
    rng_loss, rng_push = jax.random.split(rng)
    loss, aux, grad = loss_grad(projections, features, labels, bank, rng_loss)
    new_bank = push(jax.lax.stop_gradient(projections), features, labels, bank, rng_push)
    return loss, aux, grad, new_bank

  def sample(projections, features, labels, bank, rng):
    del projections
    return dgcl_sampling.sample(features, labels, bank, rng, **lkw)

  def _candidates(labels, bank, rng):
    labels = labels.reshape(-1).astype(jnp.int32)
    c = bank.num_classes
    in_range = (labels != ops.IGNORE_INDEX) & (labels >= 0) & (labels < c)
    m = min(s.max_per_class, labels.shape[0])
    idx, valid = fifo.select_per_class(labels, in_range, jax.random.split(rng)[0],
                                       num_classes=c, max_per_class=m)
    allowed = np.ones((c,), bool)
    allowed[[e for e in s.exclude_classes if 0 <= e < c]] = False
    return idx, valid & jnp.asarray(allowed)[:, None], labels, in_range

  def select_candidates(projections, features, labels, bank, rng):
    del projections, features
    return _candidates(labels, bank, rng)[:2]

  def candidate_density(projections, features, labels, bank, rng):
    del projections
    idx, valid, _, _ = _candidates(labels, bank, rng)
    feats = features.reshape(-1, features.shape[-1])
    return density_lib.class_density(feats, valid, bank, query_index=idx, field="feature",
                                     ks=s.ks, chunk_size=s.chunk_size,
                                     compute_dtype=compute_dtype)

  def negatives(projections, features, labels, bank, rng):
    del projections, features
    labels = labels.reshape(-1).astype(jnp.int32)
    c = bank.num_classes
    in_range = (labels != ops.IGNORE_INDEX) & (labels >= 0) & (labels < c)
    num = min(s.num_negatives, labels.shape[0])
    if hasattr(dgcl_sampling, "sample_negatives"):
      return dgcl_sampling.sample_negatives(rng, labels, in_range, num_classes=c, num=num)
    cls_ids = jnp.arange(c, dtype=jnp.int32)[:, None]
    mask = in_range[None, :] & (labels[None, :] != cls_ids)
    return ops.random_subset(rng, mask, num)

  return {"total": total, "loss_grad": loss_grad, "push_bank": push, "sample": sample,
          "select_candidates": select_candidates, "candidate_density": candidate_density,
          "negatives": negatives}


def density_flops(s: Settings, labels: np.ndarray) -> dict:
  """Similarity-matmul FLOPs of the density chunks computed for these labels.

  Candidates: min(n_c, max_pixels) per non-excluded present class, in chunks of
  min(chunk_size, max_pixels); push: min(n_c, push_per_class) per present class (every
  class, the bank being above `min_bank_size`), in chunks of min(chunk_size, push).
  Also returns what XLA's cost analysis counts for the two loops (one chunk each).
  """
  n = labels.size
  counts = np.bincount(labels.reshape(-1)[labels.reshape(-1) != 255],
                       minlength=s.num_classes)[:s.num_classes]
  per_query = 2 * s.bank_size * s.feature_dim

  def chunks(m_cap, classes):
    m = min(m_cap, n)
    chunk = max(1, min(s.chunk_size, m))
    rows = sum(-(-min(int(counts[c]), m) // chunk) * chunk for c in classes)
    return rows, chunk

  anchor_classes = [c for c in range(s.num_classes)
                    if counts[c] > 0 and c not in s.exclude_classes]
  cand_rows, cand_chunk = chunks(s.max_per_class, anchor_classes)
  push_rows, push_chunk = chunks(s.push_per_class,
                                 [c for c in range(s.num_classes) if counts[c] > 0])
  return {"candidate_query_rows": cand_rows, "push_query_rows": push_rows,
          "candidate_flops": float(cand_rows * per_query),
          "push_flops": float(push_rows * per_query),
          "xla_counted_candidate_chunk_flops": float(cand_chunk * per_query),
          "xla_counted_push_chunk_flops": float(push_chunk * per_query)}


# ------------------------------------------------------------------------------------------
# The model step.


def make_model(s: Settings):
  from semijax.models import registry  # pylint: disable=g-import-not-at-top
  return registry.build_model(s.model, s.num_classes, **dict(s.model_kwargs))


def make_train_step(s: Settings, model):
  import optax  # pylint: disable=g-import-not-at-top

  from semijax.losses import supervised  # pylint: disable=g-import-not-at-top
  from semijax.methods import base  # pylint: disable=g-import-not-at-top
  tx = optax.chain(optax.add_decayed_weights(s.weight_decay),
                   optax.sgd(s.lr, momentum=s.momentum))

  def step(params, batch_stats, opt_state, images, labels, rng):
    x = images.astype(jnp.float32) / 255.0

    def loss_fn(p):
      out, new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
      logits = base.upsample_logits(out, labels.shape[1:])
      loss, _ = supervised.cross_entropy_loss(logits, labels)
      return loss, new_vars["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return tx, step


# ------------------------------------------------------------------------------------------
# Measurement helpers.


def _mem_available() -> Optional[int]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def compiled_stats(compiled) -> dict:
  """XLA FLOPs / bytes accessed and the compiled memory analysis, where available."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops"] = float(cost.get("flops", 0.0)) if cost else None
    out["xla_bytes_accessed"] = float(cost.get("bytes accessed", 0.0)) if cost else None
  except Exception as e:  # pylint: disable=broad-except
    out["xla_flops"] = None
    out["cost_analysis_error"] = repr(e)
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes")
      out["memory"] = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
      m = out["memory"]
      # Live at once: arguments + outputs not aliased to (donated) arguments + temporaries.
      out["memory"]["peak_estimate_bytes"] = (
          m.get("argument_size_in_bytes", 0) + m.get("output_size_in_bytes", 0)
          - m.get("alias_size_in_bytes", 0) + m.get("temp_size_in_bytes", 0))
  except Exception as e:  # pylint: disable=broad-except
    out["memory_analysis_error"] = repr(e)
  return out


def _summary(times: Sequence[float]) -> dict:
  t = np.asarray(times, np.float64)
  return {"median_s": float(np.median(t)), "min_s": float(np.min(t)),
          "max_s": float(np.max(t)), "n": int(t.size),
          "all_s": [round(float(x), 4) for x in t]}


class _Entry:
  """One jitted, compiled callable with its state threaded between calls."""

  def __init__(self, name, compiled, call, stats, compile_s):
    self.name, self.compiled, self.call, self.stats = name, compiled, call, stats
    self.compile_s = compile_s
    self.times: List[float] = []

  def time_once(self):
    t = time.perf_counter()
    jax.block_until_ready(self.call())
    self.times.append(time.perf_counter() - t)


def _log(msg):
  print(f"[dgcl_overhead {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------


def run(s: Settings, *, measure_peak: bool = True) -> dict:
  """Runs the whole measurement; returns the JSON-able result."""
  t_start = time.time()
  rng = np.random.default_rng(s.seed)
  result: dict = {"settings": dataclasses.asdict(s), "jax": jax.__version__,
                  "platform": jax.devices()[0].platform,
                  "device_kind": jax.devices()[0].device_kind,
                  "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())}
  if measure_peak:
    result["peak_before"] = step_time.machine_peak()
    _log(f"peak before: {result['peak_before']}")

  # ---- DGCL: inputs, bank, compile.
  bank, centres = full_bank(s, rng)
  projs, feats, labels, labels_np = dgcl_inputs(s, rng, centres)
  result["dgcl_labels"] = label_stats(labels_np, s.num_classes)
  dflops = density_flops(s, labels_np)
  state = {"bank": bank}
  key = jax.random.key(s.seed)
  entries: Dict[str, _Entry] = {}

  variants = [("f32", None)] + ([("bf16", jnp.bfloat16)] if s.bf16_variant else [])
  for vname, dtype in variants:
    fns = make_dgcl_fns(s, dtype)
    names = ["total"]
    if s.breakdown:
      names += (["loss_grad", "push_bank", "sample", "candidate_density"] if vname == "f32"
                else ["candidate_density"])
      if vname == "f32":
        names += ["select_candidates", "negatives"]
    for name in names:
      full = f"dgcl_{vname}_{name}" if name != "total" else f"dgcl_{vname}"
      donate = (3,) if name == "total" else ()
      jf = jax.jit(fns[name], donate_argnums=donate)
      t = time.perf_counter()
      compiled = jf.lower(projs, feats, labels, state["bank"], key).compile()
      compile_s = time.perf_counter() - t
      stats = compiled_stats(compiled)
      if name == "total":
        def call(compiled=compiled, full=full):
          loss, aux, grad, new_bank = compiled(projs, feats, labels, state["bank"],
                                               jax.random.fold_in(key, len(entries[full].times)))
          state["bank"] = new_bank
          state[f"{full}_aux"] = aux
          return loss, grad, new_bank
        xla = stats.get("xla_flops") or 0.0
        stats["flops_density_analytic"] = dflops["candidate_flops"] + dflops["push_flops"]
        stats["flops_estimate"] = (xla - dflops["xla_counted_candidate_chunk_flops"]
                                   - dflops["xla_counted_push_chunk_flops"]
                                   + stats["flops_density_analytic"])
      else:
        def call(compiled=compiled):
          return compiled(projs, feats, labels, state["bank"], key)
      entries[full] = _Entry(full, compiled, call, stats, compile_s)
      entries[full].time_once()  # warm-up, not recorded
      entries[full].times.clear()
      _log(f"compiled {full} in {compile_s:.1f}s")

  # ---- Model: init once, compile per batch.
  model = make_model(s)
  init = jax.jit(lambda k, x: model.init(k, x, train=False))
  variables = init(jax.random.key(1), jnp.zeros((1, 65, 65, 3), jnp.float32))
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx, step = make_train_step(s, model)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  dec = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((1, s.crop_size, s.crop_size, 3), jnp.float32))
  decoder_size = list(dec["decoder"].shape[1:3])
  result["model"] = {"name": s.model, "kwargs": dict(s.model_kwargs), "num_params": num_params,
                     "crop_size": s.crop_size, "decoder_feature_size": decoder_size}
  if s.scale == "official" and decoder_size != [s.feature_size] * 2:
    raise AssertionError(f"decoder features {decoder_size} != {s.feature_size}")
  model_skipped = {}
  mem_avail = _mem_available()
  jstep = jax.jit(step, donate_argnums=(0, 1, 2))
  for b in s.model_batches:
    images = jnp.asarray(rng.integers(0, 256, (b, s.crop_size, s.crop_size, 3), np.uint8))
    small = voc_like_labels(rng, b, s.feature_size, s.num_classes, s.ignore_fraction)
    src = np.minimum(np.arange(s.crop_size) * s.feature_size // s.crop_size,
                     s.feature_size - 1)
    lab = jnp.asarray(small[:, src][:, :, src])
    mstate = {"params": jax.tree.map(jnp.copy, params),
              "batch_stats": jax.tree.map(jnp.copy, batch_stats)}
    mstate["opt"] = tx.init(mstate["params"])
    t = time.perf_counter()
    compiled = jstep.lower(mstate["params"], mstate["batch_stats"], mstate["opt"], images, lab,
                           key).compile()
    compile_s = time.perf_counter() - t
    stats = compiled_stats(compiled)
    peak = stats.get("memory", {}).get("peak_estimate_bytes")
    mem_avail = _mem_available()
    if peak and mem_avail and peak > s.memory_fraction * mem_avail:
      model_skipped[b] = f"compiled memory {peak / 2**30:.1f} GiB > {s.memory_fraction} x " \
                         f"MemAvailable {mem_avail / 2**30:.1f} GiB"
      _log(f"skipping model batch {b}: {model_skipped[b]}")
      del mstate, compiled
      continue

    def call(compiled=compiled, mstate=mstate, images=images, lab=lab):
      p, bs, o, loss = compiled(mstate["params"], mstate["batch_stats"], mstate["opt"],
                                images, lab, key)
      mstate.update(params=p, batch_stats=bs, opt=o)
      return loss, p
    name = f"model_b{b}"
    entries[name] = _Entry(name, compiled, call, stats, compile_s)
    entries[name].time_once()  # warm-up
    entries[name].times.clear()
    _log(f"compiled {name} in {compile_s:.1f}s, memory {peak and peak / 2**30:.2f} GiB, "
         f"warm-up done")

  # ---- Interleaved timing: DGCL, model, DGCL, model, ..., then the breakdown pieces.
  dgcl_main = [n for n in entries if n in ("dgcl_f32", "dgcl_bf16")]
  models = [n for n in entries if n.startswith("model_")]
  pieces = [n for n in entries if n.startswith("dgcl_") and n not in dgcl_main]
  for r in range(s.reps):
    order = []
    for i in range(max(len(dgcl_main), len(models))):
      if i < len(dgcl_main):
        order += [dgcl_main[i]] * s.dgcl_inner
      if i < len(models):
        order.append(models[i])
    order += pieces
    for name in order:
      entries[name].time_once()
    _log(f"round {r + 1}/{s.reps}: " + ", ".join(
        f"{n}={entries[n].times[-1]:.3f}s" for n in dict.fromkeys(order)))

  if measure_peak:
    result["peak_after"] = step_time.machine_peak()
    _log(f"peak after: {result['peak_after']}")
  result["loadavg_end"] = list(os.getloadavg())

  # ---- Results.
  timings = {n: {**_summary(e.times), "compile_s": e.compile_s, **e.stats}
             for n, e in entries.items()}
  for n in dgcl_main:
    aux = state.get(f"{n}_aux")
    if aux is not None:
      timings[n]["aux_last"] = {k: float(v) for k, v in aux.items() if k != "selection"}
      if float(aux["bank_full"]) != 1.0:
        raise AssertionError("the bank was not full: density did not run")
  result["timings"] = timings
  result["density_flops"] = dflops

  result["model_batch_skipped"] = {str(k): v for k, v in model_skipped.items()}
  result["dgcl_images_measured"] = s.dgcl_images
  result["dgcl_extrapolated"] = False
  summarize(result)
  result["notes"] = [
      "Model step = supervised DeepLabv3+ train step (forward, CE, backward, SGD) at the "
      "same batch; a real DGCL step also runs the EMA teacher and the strong view, so the "
      "contrastive part is a smaller fraction of it.",
      "xla_flops counts each while-loop body once; flops_estimate replaces the density "
      "loops' single chunk by the chunks computed for these labels.",
      "memory.peak_estimate_bytes = arguments + outputs - aliased (donated) + temporaries "
      "from compiled.memory_analysis().",
  ]
  result["wall_s"] = time.time() - t_start
  return result


def summarize(result: dict) -> dict:
  """Adds the derived figures (model fit and extrapolation, ratios, breakdown shares).

  Reads only `settings`, `timings` and `model_batch_skipped`, so it can be re-run on a
  saved JSON (`--from_json`) without measuring again.
  """
  s = result["settings"]
  timings = result["timings"]
  target_batch = s["target_batch"]
  measured = [b for b in s["model_batches"] if f"model_b{b}" in timings]
  dgcl_main = [n for n in ("dgcl_f32", "dgcl_bf16") if n in timings]
  result["model_batch_measured"] = measured
  result["model_target_batch"] = target_batch
  if not measured:
    return result
  med = np.array([timings[f"model_b{b}"]["median_s"] for b in measured])
  mins = np.array([timings[f"model_b{b}"]["min_s"] for b in measured])
  bs = np.array(measured, np.float64)
  per_image = med / bs
  proportional = {str(b): float(x * target_batch) for b, x in zip(measured, per_image)}
  fit = {"per_image_median_s": {str(b): float(x) for b, x in zip(measured, per_image)},
         "proportional_s": proportional}
  if len(measured) >= 2:
    slope, intercept = np.polyfit(bs, med, 1)
    slope_min, intercept_min = np.polyfit(bs, mins, 1)
    pred = slope * bs + intercept
    fit.update(slope_s_per_image=float(slope), intercept_s=float(intercept),
               max_relative_residual=float(np.max(np.abs(pred - med) / med)),
               slope_min_s_per_image=float(slope_min), intercept_min_s=float(intercept_min),
               per_image_largest_over_smallest=float(per_image[-1] / per_image[0]))
    # Proportional to the batch (per-image time within 15 %): then every estimate agrees.
    fit["linear_in_batch"] = bool(abs(per_image[-1] / per_image[0] - 1.0) <= 0.15)
    target = float(slope * target_batch + intercept)
    target_min = float(slope_min * target_batch + intercept_min)
    fit["method"] = "linear fit t = intercept + slope * batch over the measured batches"
  else:
    target = float(per_image[-1] * target_batch)
    target_min = float(mins[-1] / bs[-1] * target_batch)
    fit["method"] = "proportional: per-image time x target batch"
  result["model_fit"] = fit
  result["model_extrapolated"] = target_batch not in measured
  result["extrapolated"] = bool(result["model_extrapolated"]
                                or result.get("dgcl_extrapolated", False))
  if not result["model_extrapolated"]:
    target = timings[f"model_b{target_batch}"]["median_s"]
    target_min = timings[f"model_b{target_batch}"]["min_s"]
  # The smallest of the estimates: the ratio against it is the least favourable to DGCL.
  target_low = min([target] + ([] if not result["model_extrapolated"]
                               else list(proportional.values())))
  result["model_step_s_at_target"] = target
  result["model_step_min_s_at_target"] = target_min
  result["model_step_s_at_target_lowest_estimate"] = target_low
  result["model_step_s_per_image"] = target / target_batch
  flops_b = [timings[f"model_b{b}"].get("xla_flops") or 0.0 for b in measured]
  result["model_flops_per_image"] = float(flops_b[-1] / measured[-1])
  result["model_flops_at_target"] = float(flops_b[-1] / measured[-1] * target_batch)
  ratios = {}
  for n in dgcl_main:
    d = timings[n]
    ratios[n] = {
        "dgcl_median_s": d["median_s"],
        "ratio_median": d["median_s"] / target,
        "ratio_min": d["min_s"] / target_min,
        "ratio_worst_case": d["median_s"] / target_low,
        "flops_ratio": (d["flops_estimate"] / result["model_flops_at_target"]
                        if result["model_flops_at_target"] else None),
        "meets_target_15pct": bool(d["median_s"] / target_low <= 0.15)}
  result["ratios"] = ratios
  if "dgcl_f32" in timings:
    ref = timings["dgcl_f32"]["median_s"]
    result["breakdown_share_of_dgcl_f32"] = {
        n[len("dgcl_"):]: timings[n]["median_s"] / ref
        for n in timings if n.startswith("dgcl_") and n not in dgcl_main}
  return result


def compare_baseline(s: Settings, ref: str, *, reps: int = 5, measure_peak: bool = True) -> dict:
  """The DGCL part (loss value+grad, then push; float32) of revision `ref` vs the working tree.

  Both run on the same inputs and bank, compiled first, then timed alternately (old, new,
  old, new, ... `reps` x `dgcl_inner` calls each), so a drift of the machine's speed hits
  both alike. Each keeps pushing into its own copy of the bank, as a train step does.
  """
  from experiments.benchmarks import legacy  # pylint: disable=g-import-not-at-top
  legacy.import_baseline(ref)
  rng = np.random.default_rng(s.seed)
  bank, centres = full_bank(s, rng)
  projs, feats, labels, labels_np = dgcl_inputs(s, rng, centres)
  result: dict = {"settings": dataclasses.asdict(s), "baseline": ref, "jax": jax.__version__,
                  "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
                  "loadavg_start": list(os.getloadavg()),
                  "dgcl_labels": label_stats(labels_np, s.num_classes),
                  "density_flops_new": density_flops(s, labels_np),
                  "density_flops_old": density_flops(
                      dataclasses.replace(s, chunk_size=s.baseline_chunk_size), labels_np)}
  if measure_peak:
    result["peak_before"] = step_time.machine_peak()
  key = jax.random.key(s.seed)
  entries = {}
  for name, lib in (("old", "semijax_base"), ("new", "semijax")):
    fifo = _modules(lib)["fifo"]
    own = fifo.ClassBank(entries=dict(bank.entries), ptr=bank.ptr, count=bank.count)
    state = {"bank": jax.tree.map(jnp.copy, own)}
    fn = jax.jit(make_dgcl_fns(s, None, lib)["total"], donate_argnums=(3,))
    t = time.perf_counter()
    compiled = fn.lower(projs, feats, labels, state["bank"], key).compile()
    compile_s = time.perf_counter() - t

    def call(compiled=compiled, state=state, name=name):
      loss, aux, grad, new_bank = compiled(projs, feats, labels, state["bank"],
                                           jax.random.fold_in(key, len(entries[name].times)))
      state["bank"], state["aux"] = new_bank, aux
      return loss, grad, new_bank
    entries[name] = _Entry(name, compiled, call, compiled_stats(compiled), compile_s)
    entries[name].state = state
    entries[name].time_once()
    entries[name].times.clear()
    _log(f"compiled {name} ({lib}) in {compile_s:.1f}s")
  for r in range(reps):
    for name in ("old", "new"):
      for _ in range(s.dgcl_inner):
        entries[name].time_once()
    _log(f"round {r + 1}/{reps}: " + ", ".join(f"{n}={entries[n].times[-1]:.3f}s"
                                               for n in ("old", "new")))
  if measure_peak:
    result["peak_after"] = step_time.machine_peak()
  result["loadavg_end"] = list(os.getloadavg())
  result["timings"] = {n: {**_summary(e.times), "compile_s": e.compile_s,
                           "aux_last": {k: float(v) for k, v in e.state["aux"].items()}}
                       for n, e in entries.items()}
  old, new = result["timings"]["old"], result["timings"]["new"]
  result["speedup_median"] = old["median_s"] / new["median_s"]
  result["speedup_min"] = old["min_s"] / new["min_s"]
  return result


def main(argv):
  del argv
  cli.setup()
  batches = (tuple(int(x) for x in FLAGS.model_batches.split(","))
             if FLAGS.model_batches else None)
  s = settings_for(FLAGS.scale, model_batches=batches, reps=FLAGS.reps,
                   dgcl_inner=FLAGS.dgcl_inner, dgcl_images=FLAGS.dgcl_images,
                   breakdown=FLAGS.breakdown, bf16_variant=FLAGS.bf16_variant,
                   memory_fraction=FLAGS.memory_fraction)
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      result = summarize(json.load(f))
  elif FLAGS.baseline:
    result = compare_baseline(s, FLAGS.baseline, reps=FLAGS.reps)
  else:
    result = run(s)
  cli.report_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
