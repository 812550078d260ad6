"""CSC overhead: contrastive loss + gated bank update vs a DeepLabv3+ ResNet-101 train step.

    python -m experiments.benchmarks.csc_overhead --scale=official --out=results/csc_overhead.json
    python -m experiments.benchmarks.csc_overhead --scale=small        # seconds, for tests

What CSC adds to a train step, measured side by side with the model step in one process, at
the paper's VOC scale (21 classes, a full bank of S = 2000 x 256 per class, 4 labeled + 4
unlabeled images of the candidate code's 469 crop, i.e. 118 x 118 stride-4 features):

* CSC part (one jitted function, the bank donated as in the train step): value and gradient
  of the labeled and the unlabeled `csc_contrastive_loss` w.r.t. the two representation maps
  `[4, 118, 118, 256]` (semi-hard queries with the code's VOC counts, 16 / 64 for the weak
  classes, capped at 2048 per call; contrast set [queries ; 42,000 bank entries]; TopN = 1;
  the unlabeled filter), then `enqueue_items` of both calls (the code's 20 pixels per image
  and class plus region means) and two `gated_update`s (consistency move, Separ gate,
  enqueue, Separ gate). Pieces timed alone with `--breakdown`: loss value+grad, bank update.
* Model part: the supervised DeepLabv3+ ResNet-101 train step of the CSC recipe's model
  (deep stem, OS8, multi-grid, 256-channel low-level projection; forward, CE, backward, SGD)
  at the same crop, measured at `--model_batches` and extrapolated linearly to the student's
  8 images (4 + 4); on a host short of memory, timed at `--csc_model_crop` and scaled to the
  CSC crop by the ratio of the two compiled steps' XLA FLOPs (convolutions dominate). The
  EMA teacher's forward is not counted, so the fraction is an upper bound. The
  representation head CSC adds to the model (two 3x3 convs on the 512-channel
  concat and a 1x1 conv) is counted analytically (`head_flops_*`), beside the model's XLA
  FLOPs.
* CSC, model, CSC, model, ... are interleaved (`--reps` rounds) and the machine's matmul/conv
  peak is measured before and after (`step_time.machine_peak`), as CPU throughput drifts.
"""

import dataclasses
import os
import time
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from experiments.benchmarks import dgcl_overhead, step_time

# --scale (official = the paper's VOC scale | small), --model_batches, --reps and --breakdown
# are dgcl_overhead's flags (defined when it is imported); --out is the package's.
flags.DEFINE_integer("csc_inner", 3, "CSC calls per round (each timed).")
flags.DEFINE_integer("csc_memory_size", None, "Bank entries per class (default: the scale's).")
flags.DEFINE_bool("csc_measure_model", True, "Also compile and time the model step.")
flags.DEFINE_integer("csc_model_crop", None, "Time the model step at this crop (fits a host short "
                     "of memory) and scale it to the CSC crop by the XLA FLOPs of both "
                     "(default: the CSC crop).")
flags.DEFINE_float("csc_memory_fraction", 0.6, "Skip a compiled function whose memory exceeds "
                   "this fraction of MemAvailable (the host is shared).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that defines one measurement (written to the JSON); 'official' = VOC."""
  scale: str
  num_classes: int = 21
  dim: int = 256
  memory_size: int = 2000
  pixels_per_class: int = 20
  num_views: int = 16
  num_views_weak: int = 64
  weak_classes: Tuple[int, ...] = (2, 4, 5, 9, 11, 16, 18, 20)
  max_anchors: int = 2048
  temperature: float = 0.2
  labeled: int = 4
  unlabeled: int = 4
  crop_size: int = 469
  model: str = "deeplabv3plus_resnet101"
  model_kwargs: Tuple[Tuple[str, object], ...] = (
      ("stem", "deep"), ("output_stride", 8), ("multi_grid", (1, 2, 4)),
      ("low_level_channels", 256), ("zero_init_residual", True))
  head_channels: int = 256
  model_batches: Tuple[int, ...] = (1, 2)
  model_crop_size: int = 0   # 0: crop_size; else timed here and scaled by XLA FLOPs
  lr: float = 0.00025
  momentum: float = 0.9
  weight_decay: float = 1e-4
  ignore_fraction: float = 0.1
  reps: int = 3
  csc_inner: int = 3
  seed: int = 0


def settings_for(scale: str, **overrides) -> Settings:
  if scale == "official":
    s = Settings(scale="official")
  elif scale == "small":
    s = Settings(scale="small", num_classes=5, dim=16, memory_size=32, pixels_per_class=4,
                 num_views=2, num_views_weak=4, weak_classes=(1,), max_anchors=64, labeled=2,
                 unlabeled=2, crop_size=33, model="deeplabv3plus_small",
                 model_kwargs=(("widths", (8, 8, 16, 16)), ("stem_width", 8)),
                 head_channels=16, reps=2, csc_inner=2)
  else:
    raise ValueError(f"unknown scale {scale!r}")
  return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


# DGCL's timing harness (an entry threads its state between calls; median/min summaries).
_Entry = dgcl_overhead._Entry  # pylint: disable=protected-access
_summary = dgcl_overhead._summary  # pylint: disable=protected-access


def _log(msg):
  print(f"[csc_overhead {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model(s: Settings, *, head: bool):
  from semijax.models import heads, registry  # pylint: disable=g-import-not-at-top
  extra = {}
  if head:
    extra["heads"] = {"csc_representation": heads.RepresentationHead(
        channels=s.head_channels, out=s.dim, source="concat")}
  return registry.build_model(s.model, s.num_classes, **dict(s.model_kwargs), **extra)


def head_flops(s: Settings, feature_size: int, concat_channels: int) -> float:
  """Forward FLOPs of the representation head per image (2 x multiply-adds)."""
  macs = feature_size ** 2 * (9 * concat_channels * s.head_channels
                              + 9 * s.head_channels * s.head_channels
                              + s.head_channels * s.dim)
  return 2.0 * macs


def inputs(s: Settings, rng: np.random.Generator, feature_size: int):
  """Class-clustered unit features, VOC-like labels, noisy predictions and a full bank."""
  from semijax import ops  # pylint: disable=g-import-not-at-top
  from semijax.banks import csc as csc_bank  # pylint: disable=g-import-not-at-top
  c, d = s.num_classes, s.dim
  centres = rng.standard_normal((c, d)).astype(np.float32)

  def part(n):
    labels = dgcl_overhead.voc_like_labels(rng, n, feature_size, c, s.ignore_fraction)
    cls = np.where(labels == 255, 0, labels)
    feats = centres[cls] + 1.5 * rng.standard_normal((n, feature_size, feature_size, d),
                                                      dtype=np.float32)
    preds = np.where(rng.random(labels.shape) < 0.7, cls, rng.integers(0, c, labels.shape))
    return (jnp.asarray(ops.l2_normalize(feats)), jnp.asarray(labels),
            jnp.asarray(preds.astype(np.int32)), labels)

  bank_feats = centres[:, None, :] + 1.5 * rng.standard_normal((c, s.memory_size, d),
                                                              dtype=np.float32)
  gated = csc_bank.GatedBank(bank=csc_bank.from_contents(ops.l2_normalize(bank_feats)),
                             best=jnp.asarray(2.0 * c * c, jnp.float32))
  return part(s.labeled), part(s.unlabeled), gated


def make_csc_fns(s: Settings) -> Dict[str, callable]:
  """name -> fn(fl, fu, ll, lu, pl, pu, gated, rng) of the CSC pieces ('total' is measured)."""
  from semijax.banks import csc as csc_bank  # pylint: disable=g-import-not-at-top
  from semijax.losses import csc as csc_loss  # pylint: disable=g-import-not-at-top
  from semijax.sampling import semihard  # pylint: disable=g-import-not-at-top
  views = semihard.views_per_class(s.num_classes, num_views=s.num_views,
                                   num_views_weak=s.num_views_weak,
                                   weak_classes=s.weak_classes)
  kw = dict(views=views, max_anchors=s.max_anchors, temperature=s.temperature)

  def loss_grad(fl, fu, ll, lu, pl, pu, gated, rng):
    k1, k2 = jax.random.split(rng)

    def loss_fn(fl, fu):
      a, aux_l = csc_loss.csc_contrastive_loss(fl, ll, pl, gated.bank, k1, **kw)
      b, aux_u = csc_loss.csc_contrastive_loss(fu, lu, pu, gated.bank, k2, keep_fraction=0.5,
                                               **kw)
      return a + b, (aux_l.pop("selection"), aux_u.pop("selection"), aux_l, aux_u)
    (loss, (sl, su, aux_l, aux_u)), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(fl, fu)
    return loss, grads, sl, su, aux_l, aux_u

  def bank_update(fl, fu, ll, lu, sl, su, gated, rng):
    k1, k2 = jax.random.split(jax.random.fold_in(rng, 1))
    stats = []
    for f, lab, sel, k in ((fl, ll, sl, k1), (fu, lu, su, k2)):
      items, valid = csc_bank.enqueue_items(jax.lax.stop_gradient(f), lab, None, k,
                                            num_classes=s.num_classes,
                                            pixels_per_class=s.pixels_per_class)
      gated, aux = csc_bank.gated_update(gated, sel.features, sel.labels, sel.valid, items,
                                         valid)
      stats.append(aux)
    return gated, stats

  def total(fl, fu, ll, lu, pl, pu, gated, rng):
    loss, grads, sl, su, aux_l, aux_u = loss_grad(fl, fu, ll, lu, pl, pu, gated, rng)
    gated, stats = bank_update(fl, fu, ll, lu, sl, su, gated, rng)
    return loss, grads, gated, (aux_l, aux_u, stats)

  def loss_only(fl, fu, ll, lu, pl, pu, gated, rng):
    return loss_grad(fl, fu, ll, lu, pl, pu, gated, rng)[:2]

  def bank_only(fl, fu, ll, lu, pl, pu, gated, rng):
    _, _, sl, su, _, _ = jax.lax.stop_gradient(loss_grad(fl, fu, ll, lu, pl, pu, gated, rng))
    return bank_update(fl, fu, ll, lu, sl, su, gated, rng)[0]

  return {"total": total, "loss_grad": loss_only, "sample_and_bank": bank_only}


def _too_big(stats: dict, fraction: float):
  """A reason to skip a compiled function whose memory would crowd the shared host, or None."""
  peak = stats.get("memory", {}).get("peak_estimate_bytes")
  avail = dgcl_overhead._mem_available()  # pylint: disable=protected-access
  if peak and avail and peak > fraction * avail:
    return f"compiled memory {peak / 2**30:.1f} GiB > {fraction} x MemAvailable " \
           f"{avail / 2**30:.1f} GiB"
  return None


def run(s: Settings, *, breakdown: bool = True, measure_model: bool = True,
        memory_fraction: float = 0.6) -> dict:
  """Runs the whole measurement; returns the JSON-able result."""
  t_start = time.time()
  rng = np.random.default_rng(s.seed)
  result = {"settings": dataclasses.asdict(s), "jax": jax.__version__,
            "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
            "peak_before": step_time.machine_peak()}
  _log(f"peak before: {result['peak_before']}")

  model = make_model(s, head=False)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
      jax.random.key(1), jnp.zeros((1, s.crop_size, s.crop_size, 3), jnp.float32))
  shapes = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                          jax.ShapeDtypeStruct((1, s.crop_size, s.crop_size, 3), jnp.float32))
  feature_size, concat_channels = shapes["concat"].shape[1], shapes["concat"].shape[-1]
  (fl, ll, pl, ll_np), (fu, lu, pu, lu_np), gated = inputs(s, rng, feature_size)
  result["feature_size"] = feature_size
  result["labels"] = {"labeled": dgcl_overhead.label_stats(ll_np, s.num_classes),
                      "unlabeled": dgcl_overhead.label_stats(lu_np, s.num_classes)}
  state = {"gated": gated}
  key = jax.random.key(s.seed)
  entries: Dict[str, _Entry] = {}
  fns = make_csc_fns(s)
  for name in ["total"] + (["loss_grad", "sample_and_bank"] if breakdown else []):
    full = "csc" if name == "total" else f"csc_{name}"
    jf = jax.jit(fns[name], donate_argnums=(6,) if name == "total" else ())
    t = time.perf_counter()
    compiled = jf.lower(fl, fu, ll, lu, pl, pu, state["gated"], key).compile()
    compile_s = time.perf_counter() - t
    stats = dgcl_overhead.compiled_stats(compiled)
    reason = _too_big(stats, memory_fraction)
    if reason:
      raise MemoryError(f"{full}: {reason}")
    if name == "total":
      def call(compiled=compiled, full=full):
        loss, grads, new, aux = compiled(fl, fu, ll, lu, pl, pu, state["gated"],
                                         jax.random.fold_in(key, len(entries[full].times)))
        state["gated"], state["aux"] = new, aux
        return loss, grads, new
    else:
      def call(compiled=compiled):
        return compiled(fl, fu, ll, lu, pl, pu, state["gated"], key)
    entries[full] = _Entry(full, compiled, call, stats, compile_s)
    entries[full].time_once()
    entries[full].times.clear()
    _log(f"compiled {full} in {compile_s:.1f}s, memory "
         f"{stats.get('memory', {}).get('peak_estimate_bytes', 0) / 2**30:.2f} GiB")

  model_crop = s.model_crop_size or s.crop_size
  flops_scale = 1.0
  if measure_model:
    tx, step = dgcl_overhead.make_train_step(s, model)
    jstep = jax.jit(step, donate_argnums=(0, 1, 2))

    def lowered(b, crop):
      images = jnp.asarray(rng.integers(0, 256, (b, crop, crop, 3), np.uint8))
      lab = jnp.asarray(rng.integers(0, s.num_classes, (b, crop, crop)))
      mstate = {"params": jax.tree.map(jnp.copy, variables["params"]),
                "batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"])}
      mstate["opt"] = tx.init(mstate["params"])
      return images, lab, mstate
    if model_crop != s.crop_size:
      # FLOPs of one image at both crops (compiled, not run): the time scales with them.
      flops = {}
      for crop in (s.crop_size, model_crop):
        images, lab, mstate = lowered(1, crop)
        compiled = jstep.lower(mstate["params"], mstate["batch_stats"], mstate["opt"], images,
                               lab, key).compile()
        flops[crop] = dgcl_overhead.compiled_stats(compiled).get("xla_flops") or 0.0
        del compiled, mstate
      flops_scale = flops[s.crop_size] / flops[model_crop]
      result["model_crop_flops_per_image"] = {str(k): v for k, v in flops.items()}
      _log(f"model timed at crop {model_crop}, scaled by FLOPs x{flops_scale:.3f}")
    for b in s.model_batches:
      images, lab, mstate = lowered(b, model_crop)
      mstate = {"params": jax.tree.map(jnp.copy, variables["params"]),
                "batch_stats": jax.tree.map(jnp.copy, variables["batch_stats"])}
      mstate["opt"] = tx.init(mstate["params"])
      t = time.perf_counter()
      compiled = jstep.lower(mstate["params"], mstate["batch_stats"], mstate["opt"], images,
                             lab, key).compile()
      compile_s = time.perf_counter() - t
      stats = dgcl_overhead.compiled_stats(compiled)
      reason = _too_big(stats, memory_fraction)
      if reason:
        result.setdefault("model_batch_skipped", {})[str(b)] = {"reason": reason, **stats,
                                                                "compile_s": compile_s}
        _log(f"skipping model batch {b}: {reason}")
        del compiled, mstate
        continue

      def call(compiled=compiled, mstate=mstate, images=images, lab=lab):
        p, bs, o, loss = compiled(mstate["params"], mstate["batch_stats"], mstate["opt"],
                                  images, lab, key)
        mstate.update(params=p, batch_stats=bs, opt=o)
        return loss, p
      name = f"model_b{b}"
      entries[name] = _Entry(name, compiled, call, stats, compile_s)
      entries[name].time_once()
      entries[name].times.clear()
      _log(f"compiled {name} in {compile_s:.1f}s, memory "
           f"{stats.get('memory', {}).get('peak_estimate_bytes', 0) / 2**30:.2f} GiB")

  models = [n for n in entries if n.startswith("model_")]
  pieces = [n for n in entries if n.startswith("csc_")]
  for r in range(s.reps):
    order = []
    for m in models or [None]:
      order += ["csc"] * s.csc_inner + ([m] if m else [])
    order += pieces
    for name in order:
      entries[name].time_once()
    _log(f"round {r + 1}/{s.reps}: " + ", ".join(
        f"{n}={entries[n].times[-1]:.3f}s" for n in dict.fromkeys(order)))
  result["peak_after"] = step_time.machine_peak()
  result["loadavg_end"] = list(os.getloadavg())
  timings = {n: {**_summary(e.times), "compile_s": e.compile_s, **e.stats}
             for n, e in entries.items()}
  result["timings"] = timings
  aux_l, aux_u, stats = state["aux"]
  result["csc_aux_last"] = {
      "labeled": {k: float(v) for k, v in aux_l.items()},
      "unlabeled": {k: float(v) for k, v in aux_u.items()},
      "bank_updates": [{k: float(v) for k, v in a.items()} for a in stats]}
  student = s.labeled + s.unlabeled
  result["student_images"] = student
  hf = head_flops(s, feature_size, concat_channels)
  result["head_flops_forward_per_image"] = hf
  result["head_flops_train_step_estimate"] = 3.0 * hf * student
  if models:
    measured = [int(n[len("model_b"):]) for n in models]
    med = np.array([timings[n]["median_s"] for n in models])
    if len(measured) >= 2:
      slope, intercept = np.polyfit(np.array(measured, np.float64), med, 1)
      model_s = float(slope * student + intercept) * flops_scale
      fit = {"slope_s_per_image": float(slope), "intercept_s": float(intercept)}
    else:
      model_s = float(med[0] / measured[0] * student) * flops_scale
      fit = {"per_image_s": float(med[0] / measured[0])}
    fit.update(timed_crop=model_crop, flops_scale_to_crop=flops_scale)
    flops = [timings[n].get("xla_flops") or 0.0 for n in models]
    model_flops = (float(flops[-1] / measured[-1] * student * flops_scale) if flops[-1]
                   else None)
    csc_s = timings["csc"]["median_s"]
    result["model"] = {"measured_batches": measured, "fit": fit,
                       "extrapolated_step_s": model_s, "flops_extrapolated": model_flops}
    result["csc_fraction_of_model_step"] = csc_s / model_s
    if model_flops:
      result["csc_flops_fraction"] = (timings["csc"].get("xla_flops") or 0.0) / model_flops
      result["head_flops_fraction"] = result["head_flops_train_step_estimate"] / model_flops
  result["wall_s"] = time.time() - t_start
  return result


def main(argv):
  del argv
  cli.setup()
  batches = (tuple(int(b) for b in FLAGS.model_batches.split(","))
             if FLAGS.model_batches else None)
  s = settings_for(FLAGS.scale, model_batches=batches, reps=FLAGS.reps,
                   csc_inner=FLAGS.csc_inner, memory_size=FLAGS.csc_memory_size,
                   model_crop_size=FLAGS.csc_model_crop)
  result = run(s, breakdown=FLAGS.breakdown, measure_model=FLAGS.csc_measure_model,
               memory_fraction=FLAGS.csc_memory_fraction)
  cli.report_json(result, FLAGS.out or "")


if __name__ == "__main__":
  app.run(main)
