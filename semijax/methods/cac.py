"""CAC: directional context-aware consistency (Lai et al., CVPR 2021), official recipe.

One network, no EMA teacher (official `models/model.py`, `CAC.forward`). After a supervised-only
warm-up (`train.supervised_warmup_steps`, 5 epochs), each step:

  1. Labeled images: CE of the upsampled logits (one BN batch).
  2. Unlabeled images arrive as two overlapping crops with independent flips
     (`semijax.data.pair_crops.PairCrops`, the method's `unlabeled_transform`); each crop gets
     its own photometric draw on the device (preset 'cac') and its own forward pass (two more
     BN batches, as the official code).
  3. Decoder features are 2 x 2 average-pooled (stride 8, `cac.downsample`), projected by
     Phi (1x1 conv - ReLU - 1x1 conv to 128, no BN) and L2-normalised; the classifier on the
     pooled features (dropout on, train mode) gives pseudo-labels and confidences (detached).
  4. Flips undone, view 2 moved onto view 1's grid: positives are the same pixel in two
     contexts (`semijax.sampling.overlap`).
  5. Negatives: every pixel of both crops of every unlabeled image of the global batch (or a
     random `negatives_per_view` of each view), detached, plus a FIFO memory of the previous
     steps' (`memory_steps`, or `memory_size` slots; `semijax.banks.queue`).
  6. L = L_ce + w(t) (lambda L_dc [+ lambda_w L_w]), with L_dc the directional contrastive loss
     (eqs. 1-8, `semijax.losses.directional`), lambda = 0.1, and L_w the optional image-level
     extension (eqs. 10-11): an auxiliary classifier C_w on both crops' features taught the
     weak pseudo-labels `weak_label` that the unlabeled records carry.
  7. After the optimizer step the memory receives this step's negatives.

The EMA teacher of the trainer is kept equal to the network (`ema.decay = 0`, set by the config
file), so "teacher" evaluation is the network's. The method's pieces are reusable: the sampler
(`PairCrops`), the alignment, the loss and the queue are library functions, and the loss is also
a term any teacher-student recipe with two strong views can add (`cac_directional`, below).
"""

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from semijax import ops
from semijax.augment import photometric
from semijax.banks import queue as queue_lib
from semijax.losses import directional, supervised
from semijax.methods import base, diagnostics, registry, terms as terms_lib
from semijax.models import layers
from semijax.sampling import overlap

PROJECTION = "cac_projection"
WEAK_LOGITS = "cac_weak_logits"
POOLED_LOGITS = "cac_pooled_logits"
PAIR_FIELDS = ("image2", "pad2", "pair_boxes", "pair_flips")
WEAK_FIELDS = ("weak_label", "weak_label2")


class PooledProjection(nn.Module):
  """CAC's projector Phi: [k x k average pool] -> 1x1 conv -> ReLU -> 1x1 conv, no BN.

  Attributes:
    out: output width (official `proj_final_dim` 128).
    hidden: hidden width; 0 = the input width (official 256 -> 256).
    pool: average-pool window and stride (2 for DeepLabv3+'s stride-4 features; 1 for none).
    source: model output read (the decoder's features, the input of the classifier).
    dtype: compute dtype.
  """
  out: int = 128
  hidden: int = 0
  pool: int = 2
  source: str = "decoder"
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H / pool, W / pool, out]` (not normalised)."""
    del train
    x = average_pool(x, self.pool)
    hidden = self.hidden or x.shape[-1]
    y = nn.relu(layers.conv(hidden, 1, use_bias=True, dtype=self.dtype, name="conv1")(x))
    return layers.conv(self.out, 1, use_bias=True, dtype=self.dtype, name="conv2")(y)


class WeakClassifier(nn.Module):
  """C_w of the image-level extension (eq. 10): dropout -> 1x1 conv, like the main classifier."""
  num_classes: int
  dropout: float = 0.1
  source: str = "decoder"
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="conv")(x)


def average_pool(x: jax.Array, pool: int) -> jax.Array:
  """`F.avg_pool2d(kernel=stride=pool)` of `[B, H, W, C]` (floor at odd sizes)."""
  if pool <= 1:
    return x
  return nn.avg_pool(x, (pool, pool), strides=(pool, pool))


def forward_with_pooled_logits(module, images, train: bool = False, *, pool: int = 2):
  """The model's forward plus the classifier applied to the `pool`-averaged decoder features.

  Official CAC computes pseudo-labels from `classifier(avg_pool(features))` with the classifier's
  dropout active in training; this runs the segmenter's own classifier (and its dropout) on the
  pooled features (`model.apply(..., method=functools.partial(forward_with_pooled_logits,
  pool=2))`).
  """
  out = module(images, train=train)
  pooled = average_pool(out["decoder"], pool)
  pooled = module.classifier_dropout_layer(pooled, deterministic=not train)
  out[POOLED_LOGITS] = module.classifier(pooled)
  return out


def _confidence_and_labels(logits: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Max softmax and argmax of `[..., C]` logits, detached (official: `.detach()`)."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
  return jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1).astype(jnp.int32)


def contrast_config() -> ml_collections.ConfigDict:
  """The settings of the directional contrast shared by the method and the term."""
  c = ml_collections.ConfigDict()
  c.temperature = 0.1                 # tau
  c.threshold = 0.75                  # gamma of the positive filtering (strict >, official)
  c.directional = True                # directional mask + stop-gradient (False: vanilla CL)
  c.negative_sampling = True          # drop negatives sharing the anchor's pseudo-label (eq. 5)
  c.negatives_per_view = 0            # negatives per view from the global batch (0: all, official)
  c.negatives_include_padding = False  # padded pixels as negatives (official: yes; see BUILD_NOTES)
  c.memory_steps = 0                  # previous steps' negatives kept (official `step_save`)
  c.memory_size = 0                   # >0: memory slots instead of memory_steps' worth
  c.chunk_size = 8000                 # negatives per streamed chunk (official 8000)
  c.reduction = "selected"            # selected: / selected pairs (official) | per_image (eq. 8)
  c.projection_dim = 128              # Phi output width
  c.downsample = True                 # 2x2 average pool before Phi (DeepLabv3+; PSPNet: False)
  return c


def shrink_contrast(cfg) -> None:
  """The smoke shrink of a `contrast_config()` block: small chunks and memory."""
  cfg.chunk_size = min(cfg.chunk_size, 64)
  if cfg.memory_steps or cfg.memory_size:
    cfg.memory_size = min(cfg.memory_size or 128, 128)


def memory_slots(cfg, *, unlabeled_batch: int, pixels_per_view: int) -> int:
  """Slots of the negative memory: `memory_size`, or `memory_steps` steps' worth of negatives
  (2 views x `negatives_per_view`, or x every pixel of the unlabeled batch), as the official
  list of the last `step_save` steps holds once full."""
  if cfg.memory_size > 0:
    return int(cfg.memory_size)
  per_view = cfg.negatives_per_view or unlabeled_batch * pixels_per_view
  return int(cfg.memory_steps) * 2 * int(per_view)


class DirectionalContrast:
  """The contrast of two aligned views: pairs, negatives (batch + memory), loss, diagnostics.

  Shared by the `cac` method and the `cac_directional` term; `cfg` is a `contrast_config()`
  block. The memory (`memory_slots` > 0) is a `semijax.banks.queue` of fields `feature`,
  `label` and `truth` (the hidden ground truth, for the negative-precision diagnostic only).
  """

  def __init__(self, cfg, *, oracle: bool = False, measure: bool = True):
    self.cfg = cfg
    self.oracle = oracle
    self.measure = measure

  def init_memory(self, projection_shape, *, unlabeled_batch: int):
    """`{'memory': Queue}` sized by `memory_slots` for projections of one image's shape
    `[1, h, w, D]`, or `{}` without a memory."""
    _, h, w, dim = projection_shape
    slots = memory_slots(self.cfg, unlabeled_batch=unlabeled_batch, pixels_per_view=h * w)
    if slots <= 0:
      return {}
    return {"memory": queue_lib.init(slots, {
        "feature": ((dim,), jnp.float32), "label": ((), jnp.int32),
        "truth": ((), jnp.int32)})}

  def __call__(self, rng: jax.Array, state: Dict, pairs1: Dict[str, jax.Array],
               pairs2: Dict[str, jax.Array], pair_valid: jax.Array,
               negatives: Sequence[Tuple[Dict[str, jax.Array], jax.Array]], *,
               num_classes: int) -> Tuple[jax.Array, Dict, Dict]:
    """The directional loss of two views aligned on one grid, negatives from their own grids.

    Args:
      rng: key for the negative subsets.
      state: `{'memory': Queue}` or `{}`.
      pairs1, pairs2: dicts of `[B, h, w, ...]` maps on one grid (position (i, j) of both is
        the same pixel): `projection` (float), `logits` (float; confidence and pseudo-label)
        and optionally `truth` (the hidden ground truth, diagnostics only).
      pair_valid: `[B, h, w]` bool, positions that are real pairs.
      negatives: `(view, valid)` per view on its own grid (every pixel once), `view` with the
        same keys, `valid` `[B, h, w]` bool.
      num_classes: C.

    Returns:
      `(loss, metrics, extras)`; extras feed `update_memory`.
    """
    cfg = self.cfg
    flat = lambda x: x.reshape((-1,) + x.shape[3:])  # noqa: E731
    with_truth = "truth" in pairs1

    def unpack(view):
      proj = ops.l2_normalize(flat(view["projection"]))
      conf, labels = _confidence_and_labels(flat(view["logits"]))
      truth = (flat(view["truth"]).astype(jnp.int32) if with_truth
               else jnp.full(labels.shape, ops.IGNORE_INDEX, jnp.int32))
      if self.oracle:
        if not with_truth:
          raise ValueError("config.diagnostics.oracle_pseudo_labels needs unlabeled images "
                           "with ground truth (the embedded data, or a folder with unlabeled "
                           "masks)")
        labels = jnp.where(truth != ops.IGNORE_INDEX, truth, labels)
      return proj, conf, labels, truth

    p1, c1, y1, t1 = unpack(pairs1)
    p2, c2, y2, t2 = unpack(pairs2)
    negs = [unpack(view) + (flat(valid),) for view, valid in negatives]
    metrics = {}
    if with_truth and self.measure:
      neg_y = jnp.concatenate([n[2] for n in negs])
      neg_t = jnp.concatenate([n[3] for n in negs])
      for name, sel in (("pl", jnp.concatenate([n[4] for n in negs])),
                        ("pl_confident", jnp.concatenate([n[4] & (n[1] > cfg.threshold)
                                                          for n in negs]))):
        metrics.update(diagnostics.pseudo_label_metrics(
            neg_y, sel, neg_t, num_classes=num_classes, prefix=name, per_class=name == "pl"))

    # Negatives of this step: every pixel of each view, or a random subset per view.
    feats, labels, truths, valids = [], [], [], []
    for (proj, _, lab, tru, val), key in zip(negs, jax.random.split(rng, len(negs))):
      if not cfg.negatives_include_padding:
        take = val
      else:
        take = jnp.ones(val.shape, bool)
      if cfg.negatives_per_view > 0:
        idx, take = ops.random_subset(key, take, min(cfg.negatives_per_view, take.shape[0]))
        proj, lab, tru = proj[idx], lab[idx], tru[idx]
      feats.append(proj)
      labels.append(lab)
      truths.append(tru)
      valids.append(take)
    neg_f = jax.lax.stop_gradient(jnp.concatenate(feats))
    neg_y, neg_t, neg_v = (jnp.concatenate(labels), jnp.concatenate(truths),
                           jnp.concatenate(valids))
    memory = None
    if "memory" in state:
      entries, mem_valid = queue_lib.read(state["memory"])
      memory = (entries["feature"], entries["label"], mem_valid)

    loss, aux = directional.directional_contrastive_loss(
        p1, p2, c1, c2, y1, y2, flat(pair_valid), neg_f, neg_y, neg_v, memory=memory,
        temperature=cfg.temperature, threshold=cfg.threshold, directional=cfg.directional,
        negative_sampling=cfg.negative_sampling, chunk_size=cfg.chunk_size,
        reduction=cfg.reduction, pairs_per_image=pairs1["projection"][0, ..., 0].size)
    selection = aux.pop("selection")
    metrics.update({f"cac/{k}": v for k, v in aux.items()})
    if memory is not None:
      metrics["cac/memory_fill"] = (queue_lib.count(state["memory"]).astype(jnp.float32)
                                    / queue_lib.capacity(state["memory"]))
    if with_truth and self.measure:
      all_y, all_t = neg_y, neg_t
      if memory is not None:
        all_y = jnp.concatenate([neg_y, entries["label"]])
        all_t = jnp.concatenate([neg_t, entries["truth"]])
      metrics.update(self._selection_metrics(
          selection, jnp.concatenate([y1, y2]), jnp.concatenate([t1, t2]), all_y, all_t,
          num_classes=num_classes))
    extras = {"feature": neg_f, "label": neg_y, "truth": neg_t, "valid": neg_v}
    return loss, metrics, extras

  def _selection_metrics(self, selection, labels, truth, neg_labels, neg_truth, *,
                         num_classes: int) -> Dict:
    """Share of anchors, positive keys and negatives whose pseudo-label is right, and the
    precision of the negative pairs (CAC Fig. 6: selected negatives whose true class differs
    from the anchor's, with and without the pseudo-label negative sampling)."""
    n = labels.shape[0] // 2
    anchors = jnp.concatenate([selection["anchor_mask_1"], selection["anchor_mask_2"]])
    idx = jnp.arange(2 * n, dtype=jnp.int32)
    partner = jnp.concatenate([idx[n:], idx[:n]])
    everywhere = jnp.ones(labels.shape, bool)
    out = {}
    out.update(diagnostics.selection_metrics(idx, anchors, labels, truth, everywhere,
                                             name="contrast/anchors"))
    out.update(diagnostics.selection_metrics(partner, anchors, labels, truth, everywhere,
                                             name="contrast/positive_keys"))
    neg_valid = selection["negative_valid"]
    out.update(diagnostics.selection_metrics(
        jnp.arange(neg_valid.shape[0], dtype=jnp.int32), neg_valid, neg_labels, neg_truth,
        jnp.ones(neg_valid.shape, bool), name="contrast/negatives"))
    # Fig. 6 from a [C, C] histogram of the negatives (pseudo-label x truth), no [N, M] array.
    known = neg_valid & (neg_truth != ops.IGNORE_INDEX)
    oh_y = jax.nn.one_hot(neg_labels, num_classes) * known[:, None]
    oh_t = jax.nn.one_hot(neg_truth, num_classes)
    hist = oh_y.T @ oh_t                       # [C (pseudo), C (true)]
    total, rows, cols = jnp.sum(hist), jnp.sum(hist, 1), jnp.sum(hist, 0)
    a_known = anchors & (truth != ops.IGNORE_INDEX)
    ya = jnp.clip(labels, 0, num_classes - 1)
    ta = jnp.clip(truth, 0, num_classes - 1)
    if self.cfg.negative_sampling:
      selected = total - rows[ya]
      true_sel = total - rows[ya] - cols[ta] + hist[ya, ta]
    else:
      selected = jnp.full(ya.shape, total)
      true_sel = total - cols[ta]
    w = a_known.astype(jnp.float32)
    out.update(diagnostics.ratio_metric("contrast/negative_pairs_precision",
                                        jnp.sum(w * true_sel), jnp.sum(w * selected)))
    out.update(diagnostics.ratio_metric("contrast/negative_pairs_precision_random",
                                        jnp.sum(w * (total - cols[ta])), jnp.sum(w * total)))
    return out

  def update_memory(self, state: Dict, extras: Dict) -> Dict:
    if "memory" not in state:
      return state
    return {"memory": queue_lib.push(state["memory"], {
        "feature": extras["feature"], "label": extras["label"], "truth": extras["truth"]},
        extras["valid"])}


@registry.register
class CAC(base.Method):
  """Config: `config.cac` (below). Single network; see the module docstring."""
  name = "cac"
  uses_unlabeled = True
  teacher_bn = "ema"
  batch_fields = PAIR_FIELDS + WEAK_FIELDS

  def __init__(self, config, info=None):
    super().__init__(config, info)
    self.cfg = config[self.name]
    diag = config.get("diagnostics")
    self.contrast = DirectionalContrast(
        self.cfg, oracle=bool(diag and diag.get("oracle_pseudo_labels")),
        measure=bool(diag is None or diag.get("pseudo_label_metrics", True)))
    self.pool = 2 if self.cfg.downsample else 1

  @classmethod
  def default_config(cls):
    c = contrast_config()
    c.weight = 0.1                      # lambda (official `weight_unsup`)
    c.stride = 8                        # stride of the compared maps (4 x pool) = crop offset step
    c.iou_range = (0.1, 1.0)            # IoU of the two crops ([1, 1]: no context change, Fig. 7)
    c.max_tries = 50                    # crop-2 draws before crop 2 = crop 1 (official)
    c.unlabeled_scale_range = (0.8, 2.0)  # unlabeled long side / data.base_size (official)
    c.photometric = "cac"               # per-crop photometric preset on the device
    c.weak_weight = 0.0                 # lambda_w, image-level extension (eqs. 10-11; CCT 0.4)
    c.weak_dropout = 0.1                # dropout of C_w
    return c

  @classmethod
  def smoke(cls, config):
    shrink_contrast(config[cls.name])

  # -- Model, state and data. ----------------------------------------------------------------

  def heads(self, num_classes):
    dtype = self.config.model.dtype
    out = {PROJECTION: PooledProjection(out=self.cfg.projection_dim, pool=self.pool,
                                        dtype=None if dtype == "float32" else dtype)}
    if self.cfg.weak_weight > 0:
      out[WEAK_LOGITS] = WeakClassifier(num_classes, dropout=self.cfg.weak_dropout)
    return out

  def init_state(self, rng, *, num_classes, outputs):
    del rng, num_classes
    return self.contrast.init_memory(outputs[PROJECTION].shape,
                                     unlabeled_batch=self.config.data.unlabeled_batch)

  def unlabeled_transform(self, default):
    from semijax.data import pair_crops  # pylint: disable=g-import-not-at-top
    data = self.config.data
    return pair_crops.PairCrops(
        crop_size=data.crop_size, scale_range=tuple(self.cfg.unlabeled_scale_range),
        base_size=data.base_size or None, stride=self.cfg.stride,
        iou_range=tuple(self.cfg.iou_range), max_tries=self.cfg.max_tries, flip=data.flip)

  # -- The step. -----------------------------------------------------------------------------

  def loss(self, ctx):
    cfg = self.cfg
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    missing = [f for f in PAIR_FIELDS if f not in unl]
    if missing:
      raise ValueError(f"method 'cac' needs the unlabeled pair fields {missing} from its "
                       "unlabeled_transform (semijax.data.pair_crops.PairCrops)")
    size = lab["label"].shape[1:]
    metrics = {}

    out_l = ctx.student(lab["image"])
    loss_sup, sup_aux = base.supervised_loss(base.upsample_logits(out_l, size), lab["label"],
                                             self.config.loss)

    # Two crops, each with its own photometric draw and BN batch (official).
    pads = (unl["pad"], unl["pad2"])
    images = [unl["image"], unl["image2"].astype(jnp.float32) / 255.0]
    forward = functools.partial(forward_with_pooled_logits, pool=self.pool)
    outs = []
    for v, (x, pad) in enumerate(zip(images, pads)):
      if cfg.photometric != "none":
        x = photometric.strong_augment(ctx.key(f"cac/photometric{v + 1}"), x,
                                       preset=cfg.photometric, valid=~pad)
      outs.append(ctx.student(x, method=forward))

    crop = unl["image"].shape[1]
    h = outs[0][PROJECTION].shape[1]
    if crop % h or crop // h != cfg.stride:
      raise ValueError(f"config.cac.stride={cfg.stride} but the projections are {h} pixels "
                       f"for a {crop}-pixel crop (stride {crop / h:g}); set cac.stride to "
                       f"{crop // h if crop % h == 0 else 'a divisor of the crop'}")
    views = []
    hidden = ctx.hidden_labels
    for v, (out, pad) in enumerate(zip(outs, pads)):
      view = {"projection": out[PROJECTION].astype(jnp.float32),
              "logits": out[POOLED_LOGITS].astype(jnp.float32)}
      if hidden is not None:
        truth = jnp.where(pad, ops.IGNORE_INDEX, hidden[..., v])
        view["truth"] = ops.resize_nearest(truth, (h, h))
      views.append(view)
    valid = [overlap.valid_blocks(~pad, cfg.stride) for pad in pads]
    pairs1, pairs2, pair_valid = overlap.pair_views(
        views[0], views[1], unl["pair_boxes"], unl["pair_flips"], stride=cfg.stride,
        valid1=valid[0], valid2=valid[1])
    # Negatives: every pixel of each view once, on its own grid (the aligned copy of view 2
    # repeats border pixels and lacks the ones outside the overlap).
    loss_dc, dc_metrics, extras = self.contrast(
        ctx.key("cac/negatives"), ctx.method_state, pairs1, pairs2, pair_valid,
        [(views[0], valid[0]), (views[1], valid[1])], num_classes=out_l["logits"].shape[-1])
    metrics.update(dc_metrics)

    loss_weak = jnp.zeros((), jnp.float32)
    if cfg.weak_weight > 0:
      loss_weak = self._weak_loss(unl, outs, size)
      metrics["loss_weak"] = loss_weak

    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps)
    total = loss_sup + weight * (cfg.weight * loss_dc + cfg.weak_weight * loss_weak)
    metrics.update({"loss_sup": loss_sup, "loss_dc": loss_dc, "unsup_weight": weight,
                    "sup_selected_ratio": sup_aux["selected_ratio"],
                    "cac/pair_ratio": jnp.mean(pair_valid.astype(jnp.float32))})
    return total, metrics, extras

  def _weak_loss(self, unl, outs, size):
    """Eq. 11: (CE(C_w(f_u1), y_p1) + CE(C_w(f_u2), y_p2)) / 2 at image resolution."""
    missing = [f for f in WEAK_FIELDS if f not in unl]
    if missing:
      raise ValueError(f"config.cac.weak_weight > 0 needs the unlabeled records to carry "
                       f"image-level pseudo-labels as 'weak_label' (cropped by PairCrops into "
                       f"{list(WEAK_FIELDS)}); missing {missing}")
    losses = []
    for out, name in zip(outs, WEAK_FIELDS):
      logits = ops.resize_bilinear(out[WEAK_LOGITS], size, align_corners=True)
      labels = jnp.asarray(unl[name], jnp.int32)
      value, _ = supervised.cross_entropy_loss(logits, labels)
      losses.append(value)
    return 0.5 * (losses[0] + losses[1])

  def update_state(self, method_state, extras, rng, step):
    del rng, step
    return self.contrast.update_memory(method_state, extras)


@registry.register_term
class CACDirectional(terms_lib.Term):
  """CAC's directional contrast as a term: the same pixel in a teacher-student recipe's two
  strong views (`mean_teacher.strong_views=2`, DSSN's image level).

  Both views come from one crop, so the pairs are the identity (no alignment); they differ by
  their photometric draws and, with CutMix, by their context: pixels pasted from another image
  (either view's box) are not pairs, and every pixel of both views is a negative. Confidence and
  pseudo-labels are the student's own, from its logits average-pooled to the projector's grid (the
  classifier is affine, so this is the classifier on pooled features up to dropout). This is the
  IoU [1, 1] setting of the paper plus CutMix context; CAC's own two-crop context change needs the
  `cac` method's data hook (`PairCrops`).

      --config=experiments/configs/mean_teacher.py:split=1/16,terms=cac_directional \\
          --config.mean_teacher.strong_views=2
  """
  name = "cac_directional"
  has_state = True

  def __init__(self, config, info=None):
    super().__init__(config, info)
    diag = config.get("diagnostics")
    self.contrast = DirectionalContrast(
        self.cfg, measure=bool(diag is None or diag.get("pseudo_label_metrics", True)))
    self.pool = 2 if self.cfg.downsample else 1

  @classmethod
  def default_config(cls):
    c = contrast_config()
    c.weight = 0.1                      # lambda
    return c

  @classmethod
  def smoke(cls, config):
    shrink_contrast(config[cls.name])

  def heads(self, num_classes):
    del num_classes
    return {PROJECTION: PooledProjection(out=self.cfg.projection_dim, pool=self.pool)}

  def init_state(self, rng, *, num_classes, outputs):
    del rng, num_classes
    return self.contrast.init_memory(outputs[PROJECTION].shape,
                                     unlabeled_batch=self.config.data.unlabeled_batch)

  def loss(self, ctx, views):
    from semijax.augment import mix  # pylint: disable=g-import-not-at-top
    if len(views.strong) < 2:
      raise ValueError(f"term {self.name!r} needs two strong views (e.g. "
                       "--config.mean_teacher.strong_views=2)")
    size = views.size
    hidden = ctx.hidden_labels
    if hidden is not None:
      hidden = jnp.where(views.unlabeled["pad"], ops.IGNORE_INDEX, hidden)
    maps, pair_valid, negatives = [], None, []
    for s in views.strong[:2]:
      proj = s.outputs[PROJECTION].astype(jnp.float32)
      h = proj.shape[1]
      stride = size[0] // h
      view = {"projection": proj,
              "logits": average_pool(s.outputs["logits"].astype(jnp.float32), self.pool)}
      if hidden is not None:
        truth = mix.mix(s.box, hidden, mix.roll_batch(hidden))
        view["truth"] = ops.resize_nearest(jnp.where(s.pad, ops.IGNORE_INDEX, truth),
                                           proj.shape[1:3])
      own = overlap.valid_blocks(~(s.pad | s.box), stride)   # pixels of the image itself
      pair_valid = own if pair_valid is None else pair_valid & own
      negatives.append((view, overlap.valid_blocks(~s.pad, stride)))
      maps.append(view)
    loss, metrics, extras = self.contrast(
        ctx.key(self.name), ctx.method_state[self.name], maps[0], maps[1], pair_valid,
        negatives, num_classes=views.teacher_logits.shape[-1])
    # Prefixed: the recipe's own pseudo-label diagnostics are 'pl/...'.
    metrics = {"cac_term/" + k.removeprefix("cac/"): v for k, v in metrics.items()}
    metrics["loss_cac_directional"] = loss
    return loss, metrics, extras

  def update_state(self, state, extras, rng, step):
    del rng, step
    return self.contrast.update_memory(state, extras)
