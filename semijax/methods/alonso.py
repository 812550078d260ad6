"""Alonso et al. (ICCV 2021): pixel-level contrastive learning from a class-wise memory bank.

The recipe (`alonso`), following the official `trainSSL.py` (`Shathe/SemiSeg-Contrastive`):

  1. The EMA teacher (train-mode BatchNorm, parameters EMA'd) labels the unlabeled images x_u:
     argmax pseudo-labels with per-pixel weights beta = (max prob)^6 (rule `sharpened`, eq. 3).
  2. A = 2 strong views of x_u (augmentation anchoring, eq. 6; Table 1: ClassMix, rescale,
     flip, colour jitter, blur), the pseudo-labels, weights and hidden labels carried along;
     one weak view of x_l (ClassMix p = 0.2 on the ground truth, rescale, flip, light jitter).
  3. Student passes: the two strong views in one BatchNorm batch, then the labeled view.
  4. L = L_sup + ramp(t) L_pseudo + 0.01 L_ent + 0.1 L_contr: L_sup the CE of the labeled
     view, L_pseudo the beta-weighted CE over the pixels of both views (eq. 3 with N = all
     pixels, eq. 6), L_ent the entropy of the strong views (term `entropy_min`, eq. 7), L_contr
     the class-wise memory-bank contrast on the labeled and the unlabeled predictions (term
     `alonso_contrast`, eqs. 8-11), which also fills the bank from the teacher's projections
     of the labeled view (FQF, attention ranking, FIFO).
  5. Cityscapes: per-class weights alpha_c = sqrt(f_m / f_c) on both CEs (`class_balance`), from a
     window of ground-truth and pseudo-label frequencies.

Also here, for any recipe: the pseudo-label rule `sharpened` and the terms `alonso_contrast` and
`entropy_min` (e.g. `--config=experiments/configs/mean_teacher.py:terms=alonso_contrast`).
BUILD_NOTES (Alonso) lists where paper, official code and semijax differ.
"""

import dataclasses
import functools
from typing import Dict

import jax
import jax.numpy as jnp
import ml_collections

from semijax import ops
from semijax.augment import alonso as alonso_aug
from semijax.banks import alonso as alonso_bank, fifo
from semijax.losses import alonso as alonso_loss, supervised
from semijax.methods import base, diagnostics, pseudo_labels, registry, teacher_student, terms
from semijax.models import alonso_heads, heads as heads_lib
from semijax.pseudo import sharpened

PROJECTION = "alonso_projection"
PREDICTION = "alonso_prediction"
ATTENTION = "alonso_attention"


# ---------------------------------------------------------------------------------------------
# Pseudo-label rule.


@registry.register_rule
class Sharpened(pseudo_labels.Rule):
  """Every pixel's argmax, weighted by the sharpened confidence (max prob)^power (CBC, Alonso
  et al. eq. 3 with s = 6). The mask it returns is float: per-pixel weights."""
  name = "sharpened"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.power = 6.0               # s
    c.threshold = 0.0           # confidence below which a pixel gets weight 0 (0: none, the paper)
    return c

  def __call__(self, logits, pad, step):
    del step
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return sharpened.sharpened_confidence(probs, power=self.cfg.power,
                                          threshold=self.cfg.threshold, valid=~pad)


# ---------------------------------------------------------------------------------------------
# Terms.


def _flat(x: jax.Array, trailing: int = 0) -> jax.Array:
  return x.reshape((-1,) + x.shape[x.ndim - trailing:]) if trailing else x.reshape(-1)


@registry.register_term
class AlonsoContrast(terms.Term):
  """Alonso et al.'s class-wise memory-bank contrast (eqs. 8-11) with its bank and heads.

  Heads on the segmenter: projection g ('decoder' -> 256 -> 256, Linear-BN-ReLU-Linear),
  prediction q (same, on g's output) and the 2 x C attention modules S_c
  (`models.alonso_heads.ClassAttention`). Each step:

  * bank candidates: the teacher's projections of the labeled images, at feature resolution,
    where the teacher predicts the label with confidence > phi (FQF); per image and class the
    K highest by the teacher's attention score are pushed (before the loss reads the bank, as
    the official code does; `push_before_loss`);
  * loss: the student's predictions of the labeled images (ground truth) and of the strong
    views (pseudo-labels where the rule's mask is > 0), each against the bank entries of their
    class, attention-weighted (eq. 8); the two losses are summed (official), each over the
    classes present.

  The loss is positive-only (no negatives). Diagnostics: the share of the unlabeled vectors
  used whose pseudo-label is right, plain and attention-weighted (views need a `hidden`
  attribute, which the `alonso` recipe sets), the FQF pass rate and the bank's fill.
  """
  name = "alonso_contrast"
  has_state = True

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.weight = 0.1                    # lambda_contr, on the labeled and the unlabeled loss each
    c.dim = 256                       # width of the projection / prediction vectors
    c.hidden = 256                    # hidden width of the heads and attention modules
    c.bank_size = 256                 # psi, entries per class
    c.per_image = 1                   # K per image and class and step: max(1, psi / |X_l|)
    c.push_scope = "image"            # image: K per image and class | batch: B K per class
    c.quality_filter = True           # FQF: teacher right with confidence > phi (Table 8)
    c.quality_threshold = 0.95        # phi
    c.attention = True                # S_c weights and ranking (Table 8); off: 1, random K
    c.bank_attention = True           # learned memory weights w_z (paper); False: 1 (official)
    c.bank_source = "teacher"         # teacher: f_xi (paper, Table 8) | student: f_theta
    c.rank_side = "prediction"        # ranking module: prediction (official) | projection
    c.class_reduction = "present"     # present: mean over classes present | all: / C (official)
    c.unlabeled = True                # also pull the strong views' predictions (pseudo-labels)
    c.bank_start_step = 1001          # first step that fills the bank (official: i_iter > 1000)
    c.start_step = 2001               # first step of the loss (official: i_iter > 2000)
    c.push_before_loss = True         # the loss reads the bank with this step's entries (official)
    c.min_predictions = 2             # a class needs this many vectors ...
    c.min_bank = 2                    # ... and bank entries to count (official: > 1 each)
    c.attention_impl = "tiles"        # tiles | dense: class-wise evaluation of S_c on vectors
    c.attention_tile = 512            # rows per tile of 'tiles'
    return c

  @classmethod
  def smoke(cls, config):
    c = config[cls.name]
    c.dim = min(c.dim, 16)
    c.hidden = min(c.hidden, 16)
    c.bank_size = min(c.bank_size, 16)
    c.per_image = min(c.per_image, 2)
    c.bank_start_step = 0
    c.start_step = min(c.start_step, 1)

  def heads(self, num_classes):
    cfg = self.cfg
    if cfg.bank_source not in ("teacher", "student"):
      raise ValueError(f"config.{self.name}.bank_source={cfg.bank_source!r}; expected "
                       "'teacher' or 'student'")
    if cfg.rank_side not in alonso_heads.SIDES:
      raise ValueError(f"config.{self.name}.rank_side={cfg.rank_side!r}; expected one of "
                       f"{alonso_heads.SIDES}")
    return {PROJECTION: heads_lib.PixelMLP(hidden=cfg.hidden, out=cfg.dim, source="decoder"),
            PREDICTION: heads_lib.PixelMLP(hidden=cfg.hidden, out=cfg.dim, source=PROJECTION),
            ATTENTION: alonso_heads.ClassAttention(
                num_classes, features=cfg.dim, hidden=cfg.hidden, impl=cfg.attention_impl,
                tile=cfg.attention_tile, source=PREDICTION)}

  def init_state(self, rng, *, num_classes, outputs):
    del rng
    return {"bank": alonso_bank.init_bank(num_classes, self.cfg.bank_size,
                                          outputs[PROJECTION].shape[-1])}

  # -- Pieces. --------------------------------------------------------------------------------

  def _scores(self, forward, x, groups, valid, side):
    fn = alonso_heads.attention_method(ATTENTION, "scores", side)
    return forward((x, groups, valid), method=fn)

  def _candidates(self, ctx, views, labels_small):
    """Teacher (or student) projections of the labeled images, FQF mask and ranking scores."""
    cfg = self.cfg
    lab = views.labeled
    if cfg.bank_source == "teacher":
      out, forward = ctx.teacher(lab["image"]), ctx.teacher
    else:
      out = jax.tree.map(jax.lax.stop_gradient, views.student_labeled)
      forward = lambda x, **kw: jax.lax.stop_gradient(ctx.student(x, **kw))  # noqa: E731
    proj = jax.lax.stop_gradient(out[PROJECTION]).astype(jnp.float32)
    feat_size = proj.shape[1:3]
    probs = jax.nn.softmax(base.upsample_logits(out, views.size).astype(jnp.float32), -1)
    pred = ops.resize_nearest(jnp.argmax(probs, -1).astype(jnp.int32), feat_size)
    conf = ops.resize_nearest(jnp.max(probs, -1), feat_size)
    if cfg.quality_filter:
      valid = alonso_bank.quality_mask(pred, conf, labels_small,
                                       threshold=cfg.quality_threshold)
    else:
      valid = labels_small != ops.IGNORE_INDEX
    if cfg.attention:
      # Official: the raw projection through the prediction-side module; the projection-side
      # module reads normalised entries, as in the loss.
      x = _flat(proj, 1)
      if cfg.rank_side == "projection":
        x = ops.l2_normalize(x)
      scores = self._scores(forward, x, _flat(labels_small), _flat(valid), cfg.rank_side)
      scores = jax.lax.stop_gradient(scores).reshape(valid.shape)
    else:
      # No attention: a random K (random scores, drawn here so that the push in
      # `update_state` makes the same choice).
      scores = jax.random.uniform(ctx.key(f"{self.name}/random_rank"), valid.shape)
    return {"projections": proj, "labels": labels_small, "valid": valid, "scores": scores}

  def _push(self, bank, extras):
    return alonso_bank.push(bank, extras["projections"], extras["labels"], extras["valid"],
                            extras["scores"], per_image=self.cfg.per_image,
                            scope=self.cfg.push_scope)

  def _loss_on(self, ctx, predictions, labels, entries, valid_bank, bank_scores):
    cfg = self.cfg
    flat_p = _flat(predictions, 1)
    flat_y = _flat(labels)
    ok = flat_y != ops.IGNORE_INDEX
    scores = None
    if cfg.attention:
      # Official: the selector reads the prediction detached (it learns; p is not pushed).
      scores = self._scores(ctx.student, jax.lax.stop_gradient(flat_p).astype(jnp.float32),
                            flat_y, ok, "prediction")
    return alonso_loss.class_contrastive_loss(
        flat_p, flat_y, entries, valid_bank, scores, bank_scores,
        class_reduction=cfg.class_reduction, min_predictions=cfg.min_predictions,
        min_bank=cfg.min_bank)

  # -- The term. ------------------------------------------------------------------------------

  def loss(self, ctx, views):
    cfg = self.cfg
    lab = views.labeled
    s_lab = views.student_labeled
    feat_size = s_lab[PREDICTION].shape[1:3]
    y_l = ops.resize_nearest(jnp.where(lab["pad"], ops.IGNORE_INDEX, lab["label"]), feat_size)
    bank = ctx.method_state[self.name]["bank"]
    extras = self._candidates(ctx, views, y_l)
    if cfg.push_before_loss:
      started = ctx.step >= cfg.bank_start_step
      pushed = self._push(bank, extras)
      bank = jax.tree.map(lambda new, old: jnp.where(started, new, old), pushed, bank)
    entries, valid_bank = fifo.read(bank)
    entries = entries[alonso_bank.PROJECTION].astype(jnp.float32)
    bank_scores = None
    if cfg.attention and cfg.bank_attention:
      fn = alonso_heads.attention_method(ATTENTION, "class_scores", "projection")
      bank_scores = ctx.student((ops.l2_normalize(entries), valid_bank), method=fn)

    metrics = {}
    loss_l, aux_l = self._loss_on(ctx, s_lab[PREDICTION], y_l, entries, valid_bank,
                                  bank_scores)
    aux_l.pop("selection")
    total = loss_l
    metrics["loss_contr_labeled"] = loss_l
    metrics.update({f"contrast/labeled_{k}": v for k, v in aux_l.items()})
    if cfg.unlabeled and views.strong:
      preds = jnp.concatenate([v.outputs[PREDICTION] for v in views.strong])
      small = []
      for v in views.strong:
        taught = v.labels if v.mask is None else jnp.where(v.mask > 0, v.labels,
                                                           ops.IGNORE_INDEX)
        small.append(ops.resize_nearest(taught, feat_size))
      y_u = jnp.concatenate(small)
      loss_u, aux_u = self._loss_on(ctx, preds, y_u, entries, valid_bank, bank_scores)
      selection = aux_u.pop("selection")
      total = total + loss_u
      metrics["loss_contr_unlabeled"] = loss_u
      metrics.update({f"contrast/unlabeled_{k}": v for k, v in aux_u.items()})
      hidden = [getattr(v, "hidden", None) for v in views.strong]
      if all(h is not None for h in hidden):
        truth = jnp.concatenate([ops.resize_nearest(h, feat_size) for h in hidden])
        metrics.update(_anchor_diagnostics(selection, y_u, truth))
    on = (ctx.step >= cfg.start_step).astype(jnp.float32)
    total = on * total
    labeled_valid = jnp.sum((y_l != ops.IGNORE_INDEX).astype(jnp.float32))
    metrics.update({
        "loss_contr": total, "contrast/on": on,
        "contrast/fqf_ratio": jnp.sum(extras["valid"].astype(jnp.float32))
                              / jnp.maximum(labeled_valid, 1.0)})
    # The bank's entries all come from labeled images (ground-truth classes).
    metrics.update(diagnostics.ratio_metric("contrast/positive_keys_unlabeled_share", 0.0,
                                            jnp.sum(valid_bank.astype(jnp.float32))))
    metrics.update(terms.bank_metrics(bank))
    return total, metrics, extras

  def update_state(self, state, extras, rng, step):
    del rng
    pushed = self._push(state["bank"], extras)
    started = step >= self.cfg.bank_start_step
    return {"bank": jax.tree.map(lambda new, old: jnp.where(started, new, old), pushed,
                                 state["bank"])}


def _anchor_diagnostics(selection, labels, truth) -> Dict:
  """Share of the unlabeled vectors pulled to the bank whose pseudo-label is right, plain
  (`contrast/anchors_precision`) and attention-weighted (`..._weighted_precision`)."""
  flat_y, flat_t = _flat(labels), _flat(truth)
  n = flat_y.shape[0]
  out = diagnostics.selection_metrics(jnp.arange(n), selection["valid"], flat_y, flat_t,
                                      jnp.ones((n,), bool), name="contrast/anchors")
  judged = selection["valid"] & (flat_t != ops.IGNORE_INDEX)
  w = jnp.where(judged, selection["weight"], 0.0)
  out.update(diagnostics.ratio_metric("contrast/anchors_weighted_precision",
                                      jnp.sum(jnp.where(flat_y == flat_t, w, 0.0)), jnp.sum(w)))
  return out


@registry.register_term
class EntropyMin(terms.Term):
  """Direct entropy minimisation (Alonso et al. eq. 7) on the student's strong views.

  Official: entropy in bits over log2 C (`normalize`), averaged over the pixels whose
  pseudo-label is not ignore (`mask='valid'`: not padding); eq. 7: nats over all pixels.
  """
  name = "entropy_min"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.weight = 0.01                   # lambda_ent
    c.normalize = True                # divide by log C (official)
    c.mask = "valid"                  # valid: pixels with a pseudo-label (official) | all (eq. 7)
    return c

  def loss(self, ctx, views):
    del ctx
    if not views.strong:
      raise ValueError(f"term {self.name!r} needs strong views")
    if self.cfg.mask not in ("valid", "all"):
      raise ValueError(f"config.{self.name}.mask={self.cfg.mask!r}; expected 'valid' or 'all'")
    logits = jnp.concatenate([v.logits for v in views.strong])
    mask = None
    if self.cfg.mask == "valid":
      mask = jnp.concatenate([v.labels != ops.IGNORE_INDEX for v in views.strong])
    value, aux = alonso_loss.entropy_loss(logits, mask, normalize=self.cfg.normalize)
    return value, {"loss_ent": value}, {}


# ---------------------------------------------------------------------------------------------
# The recipe.


@registry.register
class Alonso(teacher_student.TeacherStudent):
  """Config: `config.alonso` (below), `config.alonso_contrast`, `config.entropy_min`,
  `config.pseudo_label` (rule `sharpened`)."""
  name = "alonso"
  teacher_bn = "batch"   # official: the EMA model stays in train mode; only parameters EMA'd
  default_rule = "sharpened"
  terms = ("alonso_contrast", "entropy_min")

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.pseudo_weight = 1.0             # lambda_pseudo
    c.views = 2                       # A strong views per unlabeled image (augmentation anchoring)
    c.rampup = "sigmoid"              # sigmoid: exp(-5 (1 - t/T)^2) (official) | step: 0 until T
    c.rampup_steps = 2000             # T (official RAMP_UP_ITERS)
    c.augment = "official"            # official | paper: Table 1 strengths (augment.alonso.PRESETS)
    c.flip = True                     # device-side flips (off for digits)
    c.rescale = True                  # device-side random rescale of both views (Table 1)
    c.labeled_augment = True          # weak view of x_l (Table 1); False: x_l as loaded
    c.per_image_augment = False       # one draw of each decision per batch (official) or per image
    c.classmix_start_step = 2001      # strong views ClassMixed from here (official i_iter > 2000)
    c.exclude_background = False      # ClassMix never pastes class 0 (official on VOC)
    c.pseudo_reduction = "all"        # all: CE / all pixels (eq. 3) | selected: / sum of weights
    c.class_balance = False           # alpha_c = sqrt(f_m / f_c) on both CEs (official Cityscapes)
    c.balance_labeled_rows = 1        # frequency window: steps of ground truth (official N_l / B_l)
    c.balance_unlabeled_rows = 1      # steps of pseudo-labels (official N_u / B_u)
    return c

  @classmethod
  def smoke(cls, config):
    c = config[cls.name]
    c.rampup_steps = min(c.rampup_steps, 2)
    c.classmix_start_step = min(c.classmix_start_step, 1)

  def __init__(self, config, info=None):
    super().__init__(config, info)
    cfg = self.cfg
    for field, value, allowed in (("rampup", cfg.rampup, ("sigmoid", "step")),
                                  ("augment", cfg.augment, ("official", "paper")),
                                  ("pseudo_reduction", cfg.pseudo_reduction,
                                   ("all", "selected"))):
      if value not in allowed:
        raise ValueError(f"config.alonso.{field}={value!r}; expected one of {allowed}")
    if cfg.views < 1:
      raise ValueError(f"config.alonso.views={cfg.views}; expected >= 1")
    self.strong = alonso_aug.PRESETS[f"{cfg.augment}_strong"]
    self.weak = alonso_aug.PRESETS[f"{cfg.augment}_weak"]
    if not cfg.rescale:
      self.strong = dataclasses.replace(self.strong, scale_prob=0.0)
      self.weak = dataclasses.replace(self.weak, scale_prob=0.0)

  def init_state(self, rng, *, num_classes, outputs):
    state = super().init_state(rng, num_classes=num_classes, outputs=outputs)
    if self.cfg.class_balance:
      state["class_balance"] = alonso_loss.frequency_window_init(
          num_classes, self.cfg.balance_labeled_rows, self.cfg.balance_unlabeled_rows)
    return state

  def update_state(self, method_state, extras, rng, step):
    out = super().update_state(method_state, extras, rng, step)
    if self.cfg.class_balance:
      out["class_balance"] = alonso_loss.frequency_window_update(
          method_state["class_balance"], extras["class_balance"]["labels"],
          extras["class_balance"]["pseudo_labels"])
    return out

  def ramp(self, step: jax.Array) -> jax.Array:
    """lambda_pseudo's schedule: official sigmoid ramp-up, or 0 then 1 (paper)."""
    t = jnp.asarray(step, jnp.float32)
    total = float(max(self.cfg.rampup_steps, 1))
    if self.cfg.rampup == "step":
      return (t >= total).astype(jnp.float32)
    return jnp.where(t >= total, 1.0, jnp.exp(-5.0 * (1.0 - t / total) ** 2))

  def loss(self, ctx):
    cfg = self.cfg
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_u = unl["image"].shape[0]
    size = lab["label"].shape[1:]
    metrics = {}
    aug = functools.partial(alonso_aug.augment_view, flip=cfg.flip,
                            per_image=cfg.per_image_augment,
                            exclude_background=cfg.exclude_background)

    # 1. Teacher on x_u as loaded; the rule's labels and per-pixel weights.
    t_logits = self.teacher_logits(ctx, unl["image"])
    num_classes = t_logits.shape[-1]
    hidden = self.hidden_labels(ctx)
    labels, weights, pl_aux = self.pseudo_label(
        ctx, base.upsample_logits({"logits": t_logits}, size), unl["pad"], hidden, metrics)
    weights = jnp.asarray(weights, jnp.float32)
    if hidden is not None:
      known = hidden != ops.IGNORE_INDEX
      w = jnp.where(known, weights, 0.0)
      metrics.update(diagnostics.ratio_metric(
          "pl/weighted_precision", jnp.sum(jnp.where(labels == hidden, w, 0.0)), jnp.sum(w)))

    # Class balancing (Cityscapes): weights from the window including this step.
    alpha = jnp.ones((num_classes,), jnp.float32)
    extras = {}
    if cfg.class_balance:
      window = alonso_loss.frequency_window_update(ctx.method_state["class_balance"],
                                                   lab["label"], labels)
      alpha = alonso_loss.frequency_window_weights(window)
      extras["class_balance"] = {"labels": lab["label"], "pseudo_labels": labels}
      metrics["class_weight_max"] = jnp.max(alpha)

    # 2. Strong views of x_u, weak view of x_l.
    classmix_on = ctx.step >= cfg.classmix_start_step
    views = []
    for a in range(cfg.views):
      out = aug(ctx.key(f"strong{a}"), unl["image"], labels, settings=self.strong,
                pad=unl["pad"], linear={"weight": weights},
                nearest={} if hidden is None else {"hidden": hidden},
                classmix_enabled=classmix_on)
      v_labels = out["label"]
      v_mask = out["linear"]["weight"] * alpha[jnp.clip(v_labels, 0, num_classes - 1)]
      view = teacher_student.StrongView(images=out["image"], pad=out["pad"],
                                        box=out["mix_mask"], labels=v_labels,
                                        mask=jnp.where(v_labels != ops.IGNORE_INDEX, v_mask, 0.0))
      view.hidden = out["nearest"].get("hidden")
      views.append(view)
      metrics[f"classmix_applied_view{a + 1}"] = out["classmix_applied"]
    if cfg.labeled_augment:
      weak = aug(ctx.key("weak"), lab["image"], lab["label"], settings=self.weak,
                 pad=lab["pad"], classmix_enabled=True)
      labeled = {"image": weak["image"], "label": weak["label"], "pad": weak["pad"]}
      metrics["classmix_applied_labeled"] = weak["classmix_applied"]
    else:
      labeled = {"image": lab["image"], "pad": lab["pad"],
                 "label": jnp.where(lab["pad"], ops.IGNORE_INDEX, lab["label"])}

    # 3. Student: the strong views in one BatchNorm batch, then the labeled view (official).
    out_u = ctx.student(jnp.concatenate([v.images for v in views]))
    logits_u = base.upsample_logits(out_u, size)
    out_l = ctx.student(labeled["image"])
    logits_l = base.upsample_logits(out_l, size)
    out_w = ctx.student(unl["image"]) if self.needs_weak else None

    # 4. Losses.
    if cfg.class_balance:
      y = labeled["label"]
      loss_sup, sup_aux = supervised.cross_entropy_loss(
          logits_l, y, alpha[jnp.clip(y, 0, num_classes - 1)])
    else:
      loss_sup, sup_aux = base.supervised_loss(logits_l, labeled["label"], self.config.loss)
    loss_pseudo = jnp.zeros((), jnp.float32)
    for a, view in enumerate(views):
      lo, hi = a * n_u, (a + 1) * n_u
      view.logits, view.outputs = logits_u[lo:hi], teacher_student.rows(out_u, lo, hi)
      loss_a, _ = supervised.cross_entropy_loss(view.logits, view.labels, view.mask,
                                                reduction=cfg.pseudo_reduction)
      loss_pseudo = loss_pseudo + loss_a / len(views)

    terms_total, term_extras = self.apply_terms(ctx, teacher_student.Views(
        labeled=labeled, unlabeled=unl, teacher_logits=t_logits, pseudo_labels=labels,
        pseudo_mask=weights, student_labeled=out_l, student_unlabeled=out_w, strong=views,
        size=size), metrics)
    extras.update(term_extras)
    ramp = self.ramp(ctx.step)
    total = loss_sup + cfg.pseudo_weight * ramp * loss_pseudo + terms_total
    metrics.update({"loss_sup": loss_sup, "loss_pseudo": loss_pseudo, "pseudo_ramp": ramp,
                    "sup_selected_ratio": sup_aux["selected_ratio"],
                    "teacher_confident_ratio": pl_aux["selected_ratio"]})
    for key in ("mean_weight", "mean_confidence"):
      if key in pl_aux:
        metrics[f"pseudo_{key}"] = pl_aux[key]
    return total, metrics, extras
