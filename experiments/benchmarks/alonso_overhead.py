"""Alonso et al. overhead: the class-wise contrast (heads, attention, loss, bank) vs the model step.

    python -m experiments.benchmarks.alonso_overhead --alonso_scale=voc_v2 \\
        --out=results/alonso_overhead.json
    python -m experiments.benchmarks.alonso_overhead --alonso_scale=small      # seconds, for tests

The issue's measurement, at the official VOC DeepLabv2 scale (21 classes, 321 x 321 crops, 41 x 41
x 2048 layer4 features; 14 labeled images and 2 strong views of 7 unlabeled ones per step;
psi = 256 entries of 256-d per class, all full), side by side in one process:

* `contrast` (one jitted function): the student's projection and prediction heads on the 28
  images' features, the prediction-side attention of every vector, the memory-side attention
  of the bank, the labeled and the unlabeled loss (eqs. 8-11), their gradient w.r.t. the heads'
  parameters and the features; then the bank update: the teacher's projection head on the
  labeled features, the FQF, the teacher's ranking attention and the top-K push. Variants:
  `attention_impl` 'tiles' (default) and 'dense' (all C modules on every vector).
* `model`: the DeepLabv2 ResNet-101 supervised train step (forward in train mode, CE, backward,
  SGD) at the same 28 images, measured at `--alonso_model_batches` and extrapolated linearly
  (28 images of 321 x 321 do not fit a CPU's time budget).
* `teacher_forward`: the extra teacher pass over the 14 labeled images the bank needs (forward,
  train-mode BatchNorm, no gradient), extrapolated the same way; reported apart, since the
  official code pays it too.

Rounds interleave contrast, model and teacher calls (medians and minima); XLA's FLOP counts give
a load-independent second estimate (the CPU's speed drifts by up to 2x here: stack-facts.md).
"""

import dataclasses
import os
import time
from typing import Dict, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli

flags.DEFINE_enum("alonso_scale", "voc_v2", ["voc_v2", "small"],
                  "voc_v2: the official VOC DeepLabv2 scale; small: a seconds-long smoke run.")
flags.DEFINE_string("alonso_model_batches", None,
                    "Comma-separated model batch sizes to measure (default per scale).")
flags.DEFINE_string("alonso_images", None,
                    "labeled,strong_views images of the contrast (default: the scale's 14,14; "
                    "fewer keep the measurement within a small host's memory, the ratio to the "
                    "model step at the same images is what is reported).")
FLAGS = flags.FLAGS   # --rounds (interleaved rounds) and --out come from the package


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that defines one measurement (written to the JSON)."""
  scale: str
  num_classes: int = 21
  crop_size: int = 321
  feature_dim: int = 2048
  dim: int = 256
  hidden: int = 256
  bank_size: int = 256
  labeled: int = 14
  strong_views: int = 14
  per_image: int = 1
  quality_fraction: float = 0.6      # share of labeled pixels passing the FQF
  tile: int = 512
  model_batches: Tuple[int, ...] = (1, 2)
  backbone: str = "resnet101"
  reps: int = 3
  seed: int = 0

  @property
  def feature_size(self) -> int:
    return -(-self.crop_size // 8)   # stride 8 (DeepLabv2), PyTorch rounding

  @property
  def student_images(self) -> int:
    return self.labeled + self.strong_views


def settings_for(scale: str, **overrides) -> Settings:
  if scale == "voc_v2":
    base = Settings(scale=scale)
  elif scale == "small":
    base = Settings(scale=scale, num_classes=5, crop_size=33, feature_dim=16, dim=8, hidden=8,
                    bank_size=8, labeled=2, strong_views=2, tile=16, backbone="small", reps=2)
  else:
    raise ValueError(f"unknown scale {scale!r}; expected voc_v2 or small")
  return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


class _Heads(nn.Module):
  """Alonso et al.'s heads as the segmenter attaches them: g, q and the 2 x C modules."""
  num_classes: int
  dim: int
  hidden: int
  impl: str
  tile: int

  def setup(self):
    from semijax.models import alonso_heads, heads  # pylint: disable=g-import-not-at-top
    self.g = heads.PixelMLP(hidden=self.hidden, out=self.dim)
    self.q = heads.PixelMLP(hidden=self.hidden, out=self.dim)
    self.att = alonso_heads.ClassAttention(self.num_classes, features=self.dim,
                                           hidden=self.hidden, impl=self.impl, tile=self.tile)

  def __call__(self, feats, train=True):
    z = self.g(feats, train=train)
    return z, self.q(z, train=train)

  def project(self, feats, train=True):
    return self.g(feats, train=train)

  def scores(self, x, groups, valid, side, train=True):
    return self.att.scores(x, groups, valid, side=side, train=train)

  def class_scores(self, x, valid, side, train=True):
    return self.att.class_scores(x, valid, side=side, train=train)

  def init_all(self, feats):
    z, p = self(feats)
    flat = p.reshape(-1, p.shape[-1])
    groups = jnp.zeros((flat.shape[0],), jnp.int32)
    return (self.scores(flat, groups, None, "prediction"),
            self.class_scores(jnp.zeros((self.num_classes, 2, self.dim)), None, "projection"))


def make_contrast(s: Settings, impl: str):
  """`fn(params, stats, feats_l, feats_u, y_l, y_u, t_feats, t_pred, t_conf, bank)`."""
  from semijax import ops  # pylint: disable=g-import-not-at-top
  from semijax.banks import (
    alonso as alonso_bank,  # pylint: disable=g-import-not-at-top
    fifo,  # pylint: disable=g-import-not-at-top
  )
  from semijax.losses import alonso as alonso_loss  # pylint: disable=g-import-not-at-top
  heads = _Heads(s.num_classes, s.dim, s.hidden, impl, s.tile)

  def apply(params, stats, *args, method):
    out, new = heads.apply({"params": params, "batch_stats": stats}, *args, method=method,
                           mutable=["batch_stats"])
    return out, new["batch_stats"]

  def fn(params, stats, feats_l, feats_u, y_l, y_u, t_feats, t_pred, t_conf, bank):
    entries, valid = fifo.read(bank)
    entries = entries[alonso_bank.PROJECTION]

    def loss_fn(params, feats_l, feats_u):
      total, st = 0.0, stats
      (_, p_all), st = apply(params, st, jnp.concatenate([feats_l, feats_u]),
                             method=_Heads.__call__)
      z_scores, st = apply(params, st, ops.l2_normalize(entries), valid, "projection",
                           method=_Heads.class_scores)
      n_l = feats_l.shape[0]
      for p, y in ((p_all[:n_l], y_l), (p_all[n_l:], y_u)):
        flat, fy = p.reshape(-1, p.shape[-1]), y.reshape(-1)
        s_p, st = apply(params, st, jax.lax.stop_gradient(flat), fy, fy != 255, "prediction",
                        method=_Heads.scores)
        loss, _ = alonso_loss.class_contrastive_loss(flat, fy, entries, valid, s_p, z_scores)
        total = total + loss
      return total, st

    (loss, st), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
        params, feats_l, feats_u)
    # Bank update: teacher projections, FQF, teacher ranking, top-K per image and class.
    z, st = apply(params, st, t_feats, method=_Heads.project)
    z = jax.lax.stop_gradient(z)
    ok = alonso_bank.quality_mask(t_pred, t_conf, y_l)
    rank, st = apply(params, st, z.reshape(-1, z.shape[-1]), y_l.reshape(-1),
                     ok.reshape(-1), "prediction", method=_Heads.scores)
    new_bank = alonso_bank.push(bank, z, y_l, ok, rank.reshape(ok.shape),
                                per_image=s.per_image)
    return loss, grads, new_bank

  return heads, fn


def inputs(s: Settings, rng: np.random.Generator) -> dict:
  """Synthetic features and VOC-like labels at feature resolution (background ~70 %)."""
  from semijax.banks import alonso as alonso_bank  # pylint: disable=g-import-not-at-top
  h, c = s.feature_size, s.num_classes

  def labels(n):
    y = np.zeros((n, h, h), np.int32)
    for i in range(n):
      for k in rng.choice(np.arange(1, c), size=min(3, c - 1), replace=False):
        y0, x0 = rng.integers(0, h // 2, 2)
        y[i, y0:y0 + h // 3, x0:x0 + h // 3] = k
    y[rng.random(y.shape) < 0.05] = 255
    return y

  y_l, y_u = labels(s.labeled), labels(s.strong_views)
  f = lambda n: rng.standard_normal((n, h, h, s.feature_dim), dtype=np.float32)  # noqa: E731
  t_pred = np.where(rng.random(y_l.shape) < s.quality_fraction, y_l, 0)
  bank = alonso_bank.from_entries(
      [rng.standard_normal((s.bank_size, s.dim)).astype(np.float32) for _ in range(c)],
      s.bank_size)
  return {"feats_l": f(s.labeled), "feats_u": f(s.strong_views), "y_l": y_l, "y_u": y_u,
          "t_feats": f(s.labeled), "t_pred": t_pred,
          "t_conf": np.full(y_l.shape, 0.99, np.float32), "bank": bank}


def make_model(s: Settings):
  from semijax.models import deeplabv2, resnet  # pylint: disable=g-import-not-at-top
  if s.backbone == "resnet101":
    # One module per block: XLA:CPU runs the backward of the scanned, dilated layer3 (OS8) about
    # 5x slower than the unrolled blocks (measured 58 s vs 11.5 s per step at 161 px); same math.
    backbone = resnet.resnet101(output_stride=8, scan_blocks=False)
  else:
    backbone = resnet.small_resnet(widths=(8, 8, 8, s.feature_dim), output_stride=8)
  return deeplabv2.DeepLabV2(s.num_classes, backbone)


def make_model_fns(s: Settings, model):
  import optax  # pylint: disable=g-import-not-at-top

  from semijax.losses import supervised  # pylint: disable=g-import-not-at-top
  from semijax.methods import base  # pylint: disable=g-import-not-at-top
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(2e-4, momentum=0.9))

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      out, new = model.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
      loss, _ = supervised.cross_entropy_loss(base.upsample_logits(out, labels.shape[1:]),
                                              labels)
      return loss, new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  def forward(params, batch_stats, images):
    out, new = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                           mutable=["batch_stats"])
    return out["logits"], new["batch_stats"]

  return tx, step, forward


def _flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0
  except Exception:  # pylint: disable=broad-except
    return 0.0


def _log(msg):
  print(f"[alonso_overhead {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fit(batches: List[int], times: List[float], target: int) -> Dict:
  """Linear fit t = a + b * batch (proportional with one batch) evaluated at `target`."""
  bs, ts = np.asarray(batches, np.float64), np.asarray(times, np.float64)
  proportional = float(ts[-1] / bs[-1] * target)
  if len(bs) >= 2:
    slope, intercept = np.polyfit(bs, ts, 1)
    if slope > 0:
      return {"at_target": float(intercept + slope * target), "slope": float(slope),
              "intercept": float(intercept), "method": "linear fit",
              "proportional": proportional}
    # Timing noise (tiny batches on a busy host) can make the fit decrease.
    return {"at_target": proportional, "method": "proportional (fit not increasing)"}
  return {"at_target": proportional, "method": "proportional"}


def run(s: Settings) -> dict:
  t_start = time.time()
  rng = np.random.default_rng(s.seed)
  from semijax.models import alonso_heads  # pylint: disable=g-import-not-at-top
  del alonso_heads
  result = {"settings": {**dataclasses.asdict(s), "feature_size": s.feature_size,
                         "student_images": s.student_images},
            "jax": jax.__version__, "platform": jax.devices()[0].platform,
            "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg())}
  data = inputs(s, rng)
  calls, flops, compile_s = {}, {}, {}
  times: Dict[str, List[float]] = {}

  for impl in ("tiles", "dense"):
    heads, fn = make_contrast(s, impl)
    variables = heads.init(jax.random.key(1), jnp.asarray(data["feats_l"][:1]),
                           method=_Heads.init_all)
    args = (variables["params"], variables["batch_stats"], data["feats_l"], data["feats_u"],
            data["y_l"], data["y_u"], data["t_feats"], data["t_pred"], data["t_conf"],
            data["bank"])
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    name = f"contrast_{impl}"
    compile_s[name] = time.perf_counter() - t
    flops[name] = _flops(compiled)
    calls[name] = lambda compiled=compiled, args=args: compiled(*args)
    _log(f"compiled {name} in {compile_s[name]:.1f}s")

  model = make_model(s)
  size = s.crop_size
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3))))(jax.random.key(2))
  tx, step, forward = make_model_fns(s, model)
  for b in s.model_batches:
    images = jnp.asarray(rng.random((b, size, size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, s.num_classes, (b, size, size)).astype(np.int32))
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
    t = time.perf_counter()
    compiled = jax.jit(step).lower(*state, images, labels).compile()
    compile_s[f"model_b{b}"] = time.perf_counter() - t
    flops[f"model_b{b}"] = _flops(compiled)

    def call_step(compiled=compiled, state=state, images=images, labels=labels):
      out = compiled(*state, images, labels)
      return out[3]
    calls[f"model_b{b}"] = call_step
    fwd = jax.jit(forward).lower(variables["params"], variables["batch_stats"], images).compile()
    flops[f"teacher_forward_b{b}"] = _flops(fwd)
    calls[f"teacher_forward_b{b}"] = (
        lambda fwd=fwd, images=images: fwd(variables["params"], variables["batch_stats"],
                                           images))
    _log(f"compiled model and forward at batch {b} in {compile_s[f'model_b{b}']:.1f}s")

  for fn in calls.values():   # warm-up
    jax.block_until_ready(fn())
  for r in range(s.reps):
    for name, fn in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times.setdefault(name, []).append(time.perf_counter() - t)
    _log(f"round {r + 1}/{s.reps}: " + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items()))

  result["loadavg_end"] = list(os.getloadavg())
  result["timings"] = {k: {"median_s": float(np.median(v)), "min_s": float(np.min(v)),
                           "all_s": [round(x, 4) for x in v], "compile_s": compile_s.get(k),
                           "xla_flops": flops.get(k)} for k, v in times.items()}
  batches = list(s.model_batches)
  med = lambda k: float(np.median(times[k]))  # noqa: E731
  model = _fit(batches, [med(f"model_b{b}") for b in batches], s.student_images)
  teacher = _fit(batches, [med(f"teacher_forward_b{b}") for b in batches], s.labeled)
  model_flops = flops[f"model_b{batches[-1]}"] / batches[-1] * s.student_images
  teacher_flops = flops[f"teacher_forward_b{batches[-1]}"] / batches[-1] * s.labeled
  result["model_step_s"] = model
  result["teacher_forward_s"] = teacher
  result["extrapolated"] = s.student_images not in batches
  result["ratios"] = {
      name: {"time_ratio_median": med(name) / model["at_target"],
             "flops_ratio": flops[name] / model_flops if model_flops else None}
      for name in ("contrast_tiles", "contrast_dense")}
  result["ratios"]["teacher_forward"] = {
      "time_ratio_median": teacher["at_target"] / model["at_target"],
      "flops_ratio": teacher_flops / model_flops if model_flops else None}
  result["notes"] = [
      "model step = supervised DeepLabv2 train step (forward, CE, backward, SGD) over the "
      "student's images of one Alonso step (labeled + strong views); the teacher pass over the "
      "unlabeled images and the augmentation are not counted on either side.",
      "XLA counts a while-loop body once; the contrast has no loops, so its FLOPs are exact."]
  result["wall_s"] = time.time() - t_start
  return result


def main(argv):
  del argv
  cli.setup()
  batches = (tuple(int(x) for x in FLAGS.alonso_model_batches.split(","))
             if FLAGS.alonso_model_batches else None)
  labeled, views = ((int(x) for x in FLAGS.alonso_images.split(","))
                     if FLAGS.alonso_images else (None, None))
  s = settings_for(FLAGS.alonso_scale, model_batches=batches, reps=FLAGS.rounds,
                   labeled=labeled, strong_views=views)
  result = run(s)
  cli.report_json(result, FLAGS.out)


if __name__ == "__main__":
  app.run(main)
