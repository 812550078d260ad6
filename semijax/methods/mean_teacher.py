"""Mean-teacher weak-to-strong pseudo-labelling baseline (FixMatch-style with an EMA teacher).

The EMA teacher labels the weak view of each unlabeled image; the student learns those
labels, where the rule selects them (default: confidence >= 0.95), on a strong view
(photometric augmentation and CutMix). This is the baseline every method here is compared
against, and the plainest recipe of `TeacherStudent`:

    L = L_sup(x_l) + w(t) [lambda_u CE(student(strong(x_u)), rule(teacher(x_u))) + sum_k L_k]
"""

import jax.numpy as jnp
import ml_collections

from semijax import ops
from semijax.losses import supervised
from semijax.methods import base, registry, teacher_student


@registry.register
class MeanTeacher(teacher_student.TeacherStudent):
  """Config: `config.mean_teacher` (below), `config.pseudo_label` (rule `confidence`)."""
  name = "mean_teacher"
  teacher_bn = "ema"
  default_rule = "confidence"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.unsup_weight = 1.0                # lambda_u
    c.strong_augment = "unimatch"       # photometric preset of the strong views
    c.strong_views = 1                  # strong views per unlabeled image (2: DSSN-style siamese)
    c.cutmix = True                     # CutMix on the strong views
    c.cutmix_prob = 0.5                 # per-image CutMix probability
    c.rampup_steps = 0                  # linear ramp of the unsupervised weight after warm-up
    return c

  def loss(self, ctx):
    cfg = self.cfg
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_l = lab["image"].shape[0]
    size = lab["label"].shape[1:]
    metrics = {}

    t_logits = self.teacher_logits(ctx, unl["image"])
    labels, mask, pl_aux = self.pseudo_label(
        ctx, base.upsample_logits({"logits": t_logits}, size), unl["pad"],
        self.hidden_labels(ctx), metrics)
    views = []
    for v in range(cfg.strong_views):
      # The first view keeps the stream names of the one-view recipe (same draws).
      name = "unlabeled" if v == 0 else f"unlabeled{v}"
      view, (v_labels, v_mask), _ = self.strong_view(
          ctx, unl["image"], unl["pad"], (labels, mask), preset=cfg.strong_augment,
          cutmix="per_image" if cfg.cutmix else "none", cutmix_prob=cfg.cutmix_prob,
          keys=(f"{name}/photometric", f"{name}/cutmix"))
      view.labels = jnp.where(view.pad, ops.IGNORE_INDEX, v_labels)
      view.mask = v_mask
      views.append(view)

    # One BatchNorm batch: [x_l ; (x_u if a term reads it) ; strong views].
    parts = [lab["image"]] + ([unl["image"]] if self.needs_weak else []) + [
        v.images for v in views]
    out = ctx.student(jnp.concatenate(parts))
    logits = base.upsample_logits(out, size)
    loss_sup, sup_aux = base.supervised_loss(logits[:n_l], lab["label"], self.config.loss)
    start = n_l + (unl["image"].shape[0] if self.needs_weak else 0)
    loss_unsup = jnp.zeros((), jnp.float32)
    for i, view in enumerate(views):
      lo, hi = start + i * view.images.shape[0], start + (i + 1) * view.images.shape[0]
      view.logits, view.outputs = logits[lo:hi], teacher_student.rows(out, lo, hi)
      loss_v, unsup_aux = supervised.cross_entropy_loss(view.logits, view.labels, view.mask)
      loss_unsup = loss_v if i == 0 else loss_unsup + loss_v

    terms_total, extras = self.apply_terms(ctx, teacher_student.Views(
        labeled=lab, unlabeled=unl, teacher_logits=t_logits, pseudo_labels=labels,
        pseudo_mask=mask, student_labeled=teacher_student.rows(out, 0, n_l),
        student_unlabeled=teacher_student.rows(out, n_l, start) if self.needs_weak else None,
        strong=views, size=size), metrics)
    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps,
                                  rampup=cfg.rampup_steps)
    total = loss_sup + weight * (cfg.unsup_weight * loss_unsup + terms_total)
    metrics.update({"loss_sup": loss_sup, "loss_unsup": loss_unsup, "unsup_weight": weight,
                    "pseudo_label_ratio": unsup_aux["selected_ratio"],
                    "teacher_confident_ratio": pl_aux["selected_ratio"],
                    "sup_selected_ratio": sup_aux["selected_ratio"]})
    if "mean_confidence" in pl_aux:
      metrics["teacher_mean_confidence"] = pl_aux["mean_confidence"]
    return total, metrics, extras
