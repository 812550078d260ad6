"""CSC: consistency and separation regularization for contrastive learning (the paper, Alg. 1).

Two plugins:

* the term `csc_contrast` (any teacher-student recipe can run it, e.g.
  `mean_teacher.py:terms=csc_contrast`): a U2PL representation head on the decoder's input
  concat; the TopN InfoNCE L_c (eq. 6) of semi-hard queries from the labeled images (ground
  truth) and from the strong unlabeled view (pseudo-labels) against [queries ; class bank];
  the fallback while a class bank is empty (Algorithm 1); after the optimizer step the bank's
  gated consistency update (eq. 8) and gated enqueue (Separ, eq. 9); Cons(T) (eq. 7) of a
  fixed probe set of labeled images as a diagnostic;
* the recipe `csc` (U2PL-style, as the CSC candidate code `KJingfdu/CS@212c80a`): the EMA
  teacher in eval mode labels the weak unlabeled view; pixels above the entropy percentile
  beta_t = 20 (1 - progress) are dropped (rule `entropy_percentile`); CutMix (U2PL's
  half-image box, every batch) makes the strong view; the student runs once on
  [x_l ; x_strong]; L = L_s + l_u L_u + l_c L_c with l_u = l_c = 1 and the U2PL-weighted CE.

BUILD_NOTES ("CSC") lists every difference between the paper, the candidate code and this.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from semijax import ops
from semijax.augment import mix
from semijax.banks import csc as csc_bank
from semijax.losses import csc as csc_loss, supervised
from semijax.methods import base, diagnostics, registry, teacher_student, terms
from semijax.models import heads as heads_lib
from semijax.sampling import semihard

HEAD = "csc_representation"
CONTRAST_LABELS = ("argmax", "pseudo_labels")
GATE_RULES = ("code", "algorithm1", "best")


def gate_settings(rule: str, tolerance: float) -> Dict[str, object]:
  """`banks.csc.gated_update` gate arguments for `csc_contrast.gate_rule`.

  'code' (candidate code): a consistency move must lower Separ, an enqueue must lower it or
  stay below best + tolerance; 'algorithm1': both must lower Separ; 'best' (the paper's text,
  "within a range x of the best Separ"): both must stay below best + tolerance.
  """
  if rule == "code":
    return dict(consistency_tolerance=None, consistency_improve=True,
                enqueue_tolerance=tolerance, enqueue_improve=True)
  if rule == "algorithm1":
    return dict(consistency_tolerance=None, consistency_improve=True,
                enqueue_tolerance=None, enqueue_improve=True)
  if rule == "best":
    return dict(consistency_tolerance=tolerance, consistency_improve=False,
                enqueue_tolerance=tolerance, enqueue_improve=False)
  raise ValueError(f"config.csc_contrast.gate_rule={rule!r}; expected one of {GATE_RULES}")


def _first_rows(x: jax.Array, rows: int) -> jax.Array:
  """The first micro-batch's rows of an extra merged by gradient accumulation (else `x`)."""
  if x.shape[0] == rows:
    return x
  return x.reshape((rows, x.shape[0] // rows) + x.shape[1:])[:, 0]


@registry.register_term
class CSCContrast(terms.Term):
  """CSC's contrastive term with its gated class bank and the Cons(T) diagnostic.

  Contrastive labels: ground truth on x_l; on the strong view, the teacher's argmax mixed
  with the view's CutMix box, unfiltered (`contrast_labels='argmax'`, candidate code) or the
  rule's pseudo-labels (`'pseudo_labels'`, eq. 4a). Hard/easy queries are split by the
  student's argmax on the same forward. Both calls read the bank as it was before the step;
  after the optimizer step the labeled, then the unlabeled, call's queries and pixels update
  it (each a gated consistency move and a gated enqueue).
  """
  name = "csc_contrast"
  needs_weak = False
  has_state = True

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.weight = 1.0                     # lambda_c (paper and code: 1; applies to both calls)
    c.representation_dim = 256         # D: the representation head's output (U2PL `rep`, 256)
    c.representation_channels = 256    # width of its two 3x3 conv blocks (U2PL 256)
    c.temperature = 0.1                # tau (code: 0.1 Cityscapes, 0.2 VOC; paper: not stated)
    c.top_n = 1                        # N of eq. 6 (paper 1); 0 = all positives (L_p, "TopN off")
    c.positive_reduction = "mean"      # over a query's positives: mean (code) | sum (paper)
    c.memory_bank = True               # the class bank (False: in-batch contrast only)
    c.memory_size = 2000               # S, entries per class (code: 2000 VOC, 5000 Cityscapes)
    c.pixels_per_update = 20           # pixels enqueued per image, class (code 20; paper U_f 10)
    c.region_means = True              # also enqueue each class region's mean feature (code)
    c.update_every = 1                 # steps between bank updates (code 1; U_f as steps: 10)
    c.consistency = True               # f_cons, eq. 8 (off with separation_gate: "module off")
    c.normalize_mean = False           # eq. 8a normalises the batch class mean (code: raw mean)
    c.separation_gate = True           # the Separ gate of Algorithm 1
    c.gate_rule = "code"               # code | algorithm1 | best (see gate_settings)
    c.gate_tolerance = 1.0             # x: accept below best Separ + x (code: 1)
    c.num_views = 16                   # queries per image and class (code: neg_num // 4)
    c.num_views_weak = 64              # ... for the weak classes (code: neg_num = 64)
    c.weak_classes = ()                # code: VOC (2,4,5,9,11,16,18,20), Cityscapes (3,...,18)
    c.max_anchors = 2048               # static cap on the queries per call (code: none)
    c.chunk_size = 512                 # queries per block of similarities (memory; 0: one)
    c.contrast_labels = "argmax"       # x_u labels: argmax (code) | pseudo_labels (paper)
    c.empty_bank = "topn"              # a class bank empty: topn (code) | pixel: L_p (Alg. 1)
    c.unlabeled_filter = True          # code's UnlabelFilter on x_u queries (not in paper)
    c.filter_start = 0.1               # kept share of unlabeled queries at the start ...
    c.filter_end = 0.9                 # ... and at the end of training
    c.filter_schedule = "log"          # log (code) | exp | linear
    c.detach_batch_keys = False        # stop gradients of the in-batch keys (code: no)
    c.cons_interval = 25               # T of Cons(T) (eq. 7), steps between probe measurements
    c.cons_probe_images = 4            # labeled images kept as the Cons probe (0: off)
    return c

  @classmethod
  def smoke(cls, config):
    c = config[cls.name]
    c.representation_dim = min(c.representation_dim, 16)
    c.representation_channels = min(c.representation_channels, 16)
    c.memory_size = min(c.memory_size, 16)
    c.pixels_per_update = min(c.pixels_per_update, 4)
    c.num_views = min(c.num_views, 2)
    c.num_views_weak = min(c.num_views_weak, 4)
    c.max_anchors = min(c.max_anchors, 64)
    c.cons_interval = 1
    c.cons_probe_images = min(c.cons_probe_images, 2)

  def __init__(self, config, info=None):
    super().__init__(config, info)
    cfg = self.cfg
    if cfg.contrast_labels not in CONTRAST_LABELS:
      raise ValueError(f"config.csc_contrast.contrast_labels={cfg.contrast_labels!r}; "
                       f"expected one of {CONTRAST_LABELS}")
    if cfg.top_n < 0:
      raise ValueError(f"config.csc_contrast.top_n={cfg.top_n}; expected N >= 1, or 0 for all "
                       "positives")
    if cfg.update_every < 1:
      raise ValueError(f"config.csc_contrast.update_every={cfg.update_every}; expected >= 1")
    self.gate_kwargs = gate_settings(cfg.gate_rule, float(cfg.gate_tolerance))
    accum = int(config.train.get("grad_accum_steps", 1) or 1)
    self.probe_rows = max(0, min(int(cfg.cons_probe_images),
                                 int(config.data.labeled_batch) // accum))

  def heads(self, num_classes):
    del num_classes
    return {HEAD: heads_lib.RepresentationHead(channels=self.cfg.representation_channels,
                                               out=self.cfg.representation_dim,
                                               source="concat")}

  def views(self, num_classes: int):
    cfg = self.cfg
    return semihard.views_per_class(num_classes, num_views=cfg.num_views,
                                    num_views_weak=cfg.num_views_weak,
                                    weak_classes=tuple(cfg.weak_classes))

  def init_state(self, rng, *, num_classes, outputs):
    del rng
    cfg = self.cfg
    self.views(num_classes)   # refuses bad weak classes before training
    dim = outputs[HEAD].shape[-1]
    h, w = outputs["logits"].shape[1:3]
    state = {"gate": jnp.zeros((4,), jnp.float32)}
    if cfg.memory_bank:
      state["bank"] = csc_bank.init_gated(num_classes, cfg.memory_size, dim)
    if self.probe_rows:
      s, p = self.config.data.crop_size, self.probe_rows
      state["probe"] = {"images": jnp.zeros((p, s, s, 3), jnp.float32),
                        "pad": jnp.ones((p, s, s), bool),
                        "features": jnp.zeros((p, h, w, dim), jnp.float32),
                        "filled": jnp.zeros((), bool), "last": jnp.zeros((), jnp.int32)}
    return state

  # -- The loss. -----------------------------------------------------------------------------

  def _unlabeled_labels(self, ctx, views, size):
    """The strong view's contrastive labels at image resolution (ignore on padding)."""
    strong = views.strong[0]
    if terms.oracle_enabled(self.config) and ctx.hidden_labels is not None:
      # The oracle switch: the true masks, mixed like the view (diagnostics only).
      hidden = jnp.where(views.unlabeled["pad"], ops.IGNORE_INDEX, ctx.hidden_labels)
      hidden = mix.mix(strong.box, hidden, mix.roll_batch(hidden))
      return jnp.where(strong.pad, ops.IGNORE_INDEX, hidden)
    if self.cfg.contrast_labels == "pseudo_labels":
      if strong.labels is None or strong.mask is None:
        raise ValueError("csc_contrast.contrast_labels='pseudo_labels' needs a recipe that "
                         "labels its strong view with the rule")
      keep = (jnp.asarray(strong.mask, jnp.float32) > 0) & ~strong.pad
      return jnp.where(keep, strong.labels, ops.IGNORE_INDEX)
    t = jnp.argmax(base.upsample_logits({"logits": views.teacher_logits}, size),
                   axis=-1).astype(jnp.int32)
    t = mix.mix(strong.box, t, mix.roll_batch(t))
    return jnp.where(strong.pad, ops.IGNORE_INDEX, t)

  def loss(self, ctx, views):
    cfg = self.cfg
    if not views.strong or views.strong[0].outputs is None:
      raise ValueError(f"term {self.name!r} needs the student's outputs on a strong view")
    lab, strong = views.labeled, views.strong[0]
    size = views.size
    num_classes = views.teacher_logits.shape[-1]
    s_lab, s_str = views.student_labeled, strong.outputs
    feat_size = s_lab["logits"].shape[1:3]
    state = ctx.method_state[self.name]
    view_counts = self.views(num_classes)
    gated = state.get("bank")
    bank = gated.bank if gated is not None else None

    feats_l = csc_loss.l2_normalize(s_lab[HEAD])
    feats_u = csc_loss.l2_normalize(s_str[HEAD])
    labels_l = ops.resize_nearest(jnp.where(lab["pad"], ops.IGNORE_INDEX, lab["label"]),
                                  feat_size)
    labels_u = ops.resize_nearest(self._unlabeled_labels(ctx, views, size), feat_size)
    pred_l = jnp.argmax(s_lab["logits"], axis=-1).astype(jnp.int32)
    pred_u = jnp.argmax(s_str["logits"], axis=-1).astype(jnp.int32)
    warmup = self.config.train.supervised_warmup_steps
    keep = None
    if cfg.unlabeled_filter:
      keep = csc_loss.unlabeled_keep_fraction(
          ctx.step, total_steps=self.config.train.total_steps, start_step=warmup,
          start=cfg.filter_start, end=cfg.filter_end, schedule=cfg.filter_schedule)
    kw = dict(views=view_counts, max_anchors=cfg.max_anchors,
              top_n=cfg.top_n if cfg.top_n > 0 else None, temperature=cfg.temperature,
              positive_reduction=cfg.positive_reduction, empty_bank=cfg.empty_bank,
              detach_batch_keys=cfg.detach_batch_keys, chunk_size=cfg.chunk_size or None)
    loss_l, aux_l = csc_loss.csc_contrastive_loss(feats_l, labels_l, pred_l, bank,
                                                  ctx.key("csc/labeled"), **kw)
    loss_u, aux_u = csc_loss.csc_contrastive_loss(feats_u, labels_u, pred_u, bank,
                                                  ctx.key("csc/unlabeled"),
                                                  keep_fraction=keep, **kw)
    sel_l, sel_u = aux_l.pop("selection"), aux_u.pop("selection")

    metrics = {"loss_contra": loss_l + loss_u, "loss_contra_labeled": loss_l,
               "loss_contra_unlabeled": loss_u}
    metrics.update({f"csc/labeled_{k}": v for k, v in aux_l.items()})
    metrics.update({f"csc/unlabeled_{k}": v for k, v in aux_u.items()})
    metrics["csc/contrast_label_ratio"] = jnp.mean(
        (labels_u != ops.IGNORE_INDEX).astype(jnp.float32))
    metrics.update(self._bank_metrics(state, gated))
    if ctx.hidden_labels is not None:
      metrics.update(self._selection_metrics(ctx, views, sel_l, sel_u, labels_u, feat_size))

    extras = {}
    if gated is not None:
      f_l, f_u = lax.stop_gradient(feats_l), lax.stop_gradient(feats_u)
      items_l, valid_l = csc_bank.enqueue_items(
          f_l, labels_l, None, ctx.key("csc/enqueue_labeled"), num_classes=num_classes,
          pixels_per_class=cfg.pixels_per_update, region_means=cfg.region_means)
      items_u, valid_u = csc_bank.enqueue_items(
          f_u, labels_u, None, ctx.key("csc/enqueue_unlabeled"), num_classes=num_classes,
          pixels_per_class=cfg.pixels_per_update, region_means=cfg.region_means)
      extras.update(
          anchors_l=sel_l.features, anchor_labels_l=sel_l.labels, anchor_valid_l=sel_l.valid,
          items_l=items_l, items_valid_l=valid_l,
          anchors_u=sel_u.features, anchor_labels_u=sel_u.labels, anchor_valid_u=sel_u.valid,
          items_u=items_u, items_valid_u=valid_u)
    if self.probe_rows:
      probe_extras, probe_metrics = self._probe(ctx, lab, state["probe"], feat_size)
      extras.update(probe_extras)
      metrics.update(probe_metrics)
    return loss_l + loss_u, metrics, extras

  def _bank_metrics(self, state, gated) -> Dict:
    out = {}
    g = state["gate"]
    out.update(diagnostics.ratio_metric("csc/consistency_accepted", g[0], g[1]))
    out.update(diagnostics.ratio_metric("csc/enqueue_accepted", g[2], g[3]))
    if gated is None:
      return out
    complete = csc_bank.is_complete(gated.bank).astype(jnp.float32)
    separ = csc_bank.separation(gated.bank)
    out.update(diagnostics.ratio_metric("csc/separation", separ * complete, complete))
    out.update(diagnostics.ratio_metric("csc/separation_best", gated.best * complete,
                                        complete))
    out.update(terms.bank_metrics(gated.bank, prefix="csc/bank"))
    return out

  def _selection_metrics(self, ctx, views, sel_l, sel_u, labels_u, feat_size) -> Dict:
    """Share of queries, chosen positive keys and in-batch negatives from x_u that are right."""
    strong = views.strong[0]
    hidden = jnp.where(views.unlabeled["pad"], ops.IGNORE_INDEX, ctx.hidden_labels)
    hidden = mix.mix(strong.box, hidden, mix.roll_batch(hidden))
    truth_u = ops.resize_nearest(jnp.where(strong.pad, ops.IGNORE_INDEX, hidden),
                                 feat_size).reshape(-1)
    flat_u = labels_u.reshape(-1)
    out = {}
    # Queries: the labeled call's are never from x_u (they only count in the share).
    n_l = sel_l.valid.shape[0]
    out = diagnostics.merge(out, diagnostics.selection_metrics(
        jnp.zeros((n_l,), jnp.int32), sel_l.valid, jnp.zeros((1,), jnp.int32),
        jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool), name="contrast/anchors"))
    out = diagnostics.merge(out, diagnostics.selection_metrics(
        sel_u.pixel_index, sel_u.valid, flat_u, truth_u, jnp.ones_like(truth_u, bool),
        name="contrast/anchors"))
    # Chosen positives that are queries of the unlabeled call (bank entries are not judged).
    num_a = sel_u.valid.shape[0]
    in_batch = sel_u.positive_valid & (sel_u.positive_index < num_a) & sel_u.counted[:, None]
    key_pixel = jnp.take(sel_u.pixel_index, jnp.where(in_batch, sel_u.positive_index, 0))
    out.update(diagnostics.selection_metrics(key_pixel, in_batch, flat_u, truth_u,
                                             jnp.ones_like(truth_u, bool),
                                             name="contrast/positive_keys"))
    # In-batch negatives, pair-weighted: for a query of class c every query of another class.
    q_truth = jnp.take(truth_u, sel_u.pixel_index)
    judged = sel_u.valid & (q_truth != ops.IGNORE_INDEX)
    right = judged & (q_truth == sel_u.labels)
    onehot = jax.nn.one_hot(sel_u.labels, views.teacher_logits.shape[-1], dtype=jnp.float32)
    right_c = jnp.sum(onehot * right[:, None], 0)
    judged_c = jnp.sum(onehot * judged[:, None], 0)
    w = sel_u.counted.astype(jnp.float32)
    own = lambda per_class: jnp.sum(onehot * per_class[None, :], 1)  # noqa: E731
    num = jnp.sum(w * (jnp.sum(right_c) - own(right_c)))
    den = jnp.sum(w * (jnp.sum(judged_c) - own(judged_c)))
    out.update(diagnostics.ratio_metric("contrast/negatives_precision", num, den))
    return out

  def _probe(self, ctx, lab, probe, feat_size):
    """Cons(T) (eq. 7): mean pixel cosine of a fixed labeled probe set's features, T apart."""
    p = self.probe_rows
    due, refill = self._probe_schedule(probe, ctx.step)
    images = jnp.where(probe["filled"], probe["images"], lab["image"][:p].astype(jnp.float32))
    pad = jnp.where(probe["filled"], probe["pad"], lab["pad"][:p])
    variables = {"params": jax.lax.stop_gradient(ctx.params), "batch_stats": ctx.batch_stats}

    def forward():
      out, _ = ctx.student_fn(variables, images, False, {})
      return csc_loss.l2_normalize(out[HEAD])

    new = lax.cond(due | refill, forward, lambda: jnp.zeros(probe["features"].shape,
                                                            jnp.float32))
    new = lax.stop_gradient(new)
    ok = ~ops.resize_nearest(pad, feat_size)
    cos = jnp.sum(new * probe["features"], axis=-1)
    measured = due & probe["filled"]
    count = jnp.where(measured, jnp.sum(ok.astype(jnp.float32)), 0.0)
    total = jnp.where(measured, jnp.sum(jnp.where(ok, cos, 0.0)), 0.0)
    metrics = diagnostics.ratio_metric("csc/cons", total, count)
    return {"probe_images": images, "probe_pad": pad, "probe_features": new}, metrics

  def _probe_schedule(self, probe, step):
    """(due: measure Cons now, refill: store the probe set for the first time)."""
    started = step >= self.config.train.supervised_warmup_steps
    due = probe["filled"] & (step - probe["last"] >= self.cfg.cons_interval)
    refill = ~probe["filled"] & started
    return due, refill

  # -- After the optimizer step. --------------------------------------------------------------

  def update_state(self, state, extras, rng, step):
    del rng
    cfg = self.cfg
    out = dict(state)
    warmup = self.config.train.supervised_warmup_steps
    started = step >= warmup
    if "bank" in state:
      due = started & ((step - warmup) % cfg.update_every == 0)
      kw = dict(consistency=cfg.consistency, gate=cfg.separation_gate,
                normalize_mean=cfg.normalize_mean, **self.gate_kwargs)

      def apply(gated):
        stats = jnp.zeros((4,), jnp.float32)
        for part in ("l", "u"):
          gated, aux = csc_bank.gated_update(
              gated, extras[f"anchors_{part}"], extras[f"anchor_labels_{part}"],
              extras[f"anchor_valid_{part}"], extras[f"items_{part}"],
              extras[f"items_valid_{part}"], **kw)
          stats = stats + jnp.stack([aux["consistency_accepted"], aux["consistency_tried"],
                                     aux["enqueue_accepted"], aux["enqueue_tried"]])
        return gated, stats

      def skip(gated):
        return gated, jnp.zeros((4,), jnp.float32)

      out["bank"], out["gate"] = lax.cond(due, apply, skip, state["bank"])
    if "probe" in state:
      probe = state["probe"]
      due, refill = self._probe_schedule(probe, step)
      run = due | refill
      rows = self.probe_rows
      pick = lambda name: _first_rows(extras[name], rows)  # noqa: E731
      out["probe"] = {
          "images": jnp.where(refill, pick("probe_images"), probe["images"]),
          "pad": jnp.where(refill, pick("probe_pad"), probe["pad"]),
          "features": jnp.where(run, pick("probe_features"), probe["features"]),
          "filled": probe["filled"] | refill,
          "last": jnp.where(run, step, probe["last"]).astype(jnp.int32)}
    return out


@registry.register
class CSC(teacher_student.TeacherStudent):
  """Config: `config.csc` (below), `config.csc_contrast` (the term), `config.pseudo_label`.

  Teacher BN: eval mode (`teacher_bn='ema'`). The candidate code labels x_u with the teacher in
  eval mode whose running statistics come from its own train-mode forwards; ours are the EMA
  of the student's (BUILD_NOTES).
  """
  name = "csc"
  teacher_bn = "ema"
  default_rule = "entropy_percentile"
  terms = ("csc_contrast",)

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.unsup_weight = 1.0                # lambda_u (paper and code: 1)
    c.cutmix_prob = 1.0                 # probability that a batch is CutMixed (code: always)
    c.strong_augment = "none"           # photometric preset on the strong view (code: none)
    c.unsup_reduction = "u2pl"          # selected | all | u2pl: U2PL's re-weighted CE (code)
    return c

  def loss(self, ctx):
    cfg = self.cfg
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_l, n_u = lab["image"].shape[0], unl["image"].shape[0]
    size = lab["label"].shape[1:]
    metrics = {}

    # 1. The EMA teacher (eval mode) on the weak view; entropy-percentile pseudo-labels.
    t_logits = self.teacher_logits(ctx, unl["image"])
    labels, mask, pl_aux = self.pseudo_label(
        ctx, base.upsample_logits({"logits": t_logits}, size), unl["pad"],
        self.hidden_labels(ctx), metrics)

    # 2. Strong view: CutMix (U2PL box of half the image from image i + 1).
    view, (v_labels, v_mask), view_aux = self.strong_view(
        ctx, unl["image"], unl["pad"], (labels, mask), preset=cfg.strong_augment,
        cutmix="per_batch", cutmix_prob=cfg.cutmix_prob,
        keys=("photometric", "cutmix", "cutmix_prob"))
    view.labels, view.mask = jnp.where(view.pad, ops.IGNORE_INDEX, v_labels), v_mask

    # 3. Student on [x_l ; (x_u if a term reads it) ; strong] in one BN batch.
    parts = [lab["image"]] + ([unl["image"]] if self.needs_weak else []) + [view.images]
    out = ctx.student(jnp.concatenate(parts))
    logits = base.upsample_logits(out, size)
    loss_sup, sup_aux = base.supervised_loss(logits[:n_l], lab["label"], self.config.loss)
    start = n_l + (n_u if self.needs_weak else 0)
    view.logits, view.outputs = logits[start:], teacher_student.rows(out, start)
    loss_unsup, unsup_aux = supervised.cross_entropy_loss(view.logits, view.labels, view.mask,
                                                          reduction=cfg.unsup_reduction)

    # 4. Extra terms (CSC's contrast by default).
    terms_total, extras = self.apply_terms(ctx, teacher_student.Views(
        labeled=lab, unlabeled=unl, teacher_logits=t_logits, pseudo_labels=labels,
        pseudo_mask=mask, student_labeled=teacher_student.rows(out, 0, n_l),
        student_unlabeled=teacher_student.rows(out, n_l, start) if self.needs_weak else None,
        strong=[view], size=size), metrics)
    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps)
    total = loss_sup + weight * (cfg.unsup_weight * loss_unsup + terms_total)
    metrics.update(self.loss_metrics(loss_sup, loss_unsup, weight, sup_aux, unsup_aux, pl_aux,
                                     view_aux))
    return total, metrics, extras
