"""DGCL: density-guided contrastive learning (Wang et al., CVPR 2023), official recipe.

One step (after the supervised warm-up), following the official `train_semi.py`:
  1. The EMA teacher (train-mode BN, as U2PL) labels x_u in one BN batch with x_l: argmax
     with the top beta_t % entropy pixels dropped, beta_t = 20 (1 - progress) (eqs. 4-6;
     rule `entropy_percentile`).
  2. With probability 0.5 per batch, CutMix (a box of half the image, from image i+1) mixes
     x_u, its pseudo-labels and padding into the strong view (the official strong view has
     no photometric augmentation; `dgcl.strong_augment` adds one).
  3. The student runs once on [x_l ; x_u ; strong] (one BN batch).
  4. L = L_sup + l_u * L_unsup + l_c * L_contra, with L_unsup the U2PL-weighted CE on the
     strong view and L_contra the density-guided contrastive loss (term `dgcl_contrast`,
     eqs. 7-13) on the student's projections of [x_l ; x_u] against the class memory bank.
  5. After the optimizer step the bank receives (features, projections, density) of
     [x_l ; x_u] (`DGCLContrast.update_state`).
"""

import jax.numpy as jnp
import ml_collections

from semijax import ops
from semijax.losses import supervised
from semijax.methods import base, registry, teacher_student


@registry.register
class DGCL(teacher_student.TeacherStudent):
  """Config: `config.dgcl` (below), `config.dgcl_contrast` (the term), `config.pseudo_label`."""
  name = "dgcl"
  teacher_bn = "batch"
  default_rule = "entropy_percentile"
  terms = ("dgcl_contrast",)

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.unsup_weight = 0.5                # lambda_u (paper 1)
    c.cutmix_prob = 0.5                 # probability that a batch is CutMixed (U2PL half-image box)
    c.strong_augment = "none"           # photometric preset on the strong view (official: none)
    c.unsup_reduction = "u2pl"          # selected | all | u2pl: the official U2PL-weighted CE
    return c

  def loss(self, ctx):
    cfg = self.cfg
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_l, n_u = lab["image"].shape[0], unl["image"].shape[0]
    size = lab["label"].shape[1:]
    metrics = {}

    # 1. Teacher on [x_l ; x_u] in one train-mode BN batch, as the official code.
    t_logits = self.teacher_logits(ctx, jnp.concatenate([lab["image"], unl["image"]]))[n_l:]
    hidden = self.hidden_labels(ctx)
    labels, mask, pl_aux = self.pseudo_label(
        ctx, base.upsample_logits({"logits": t_logits}, size), unl["pad"], hidden, metrics)

    # 2. Strong view: optional photometric augmentation, CutMix with probability per batch.
    view, (v_labels, v_mask), view_aux = self.strong_view(
        ctx, unl["image"], unl["pad"], (labels, mask), preset=cfg.strong_augment,
        cutmix="per_batch", cutmix_prob=cfg.cutmix_prob,
        keys=("photometric", "cutmix", "cutmix_prob"))
    view.labels, view.mask = jnp.where(view.pad, ops.IGNORE_INDEX, v_labels), v_mask

    # 3. Student on [x_l ; x_u ; strong].
    out = ctx.student(jnp.concatenate([lab["image"], unl["image"], view.images]))
    logits = base.upsample_logits(out, size)
    loss_sup, sup_aux = base.supervised_loss(logits[:n_l], lab["label"], self.config.loss)
    view.logits, view.outputs = logits[n_l + n_u:], teacher_student.rows(out, n_l + n_u)
    loss_unsup, unsup_aux = supervised.cross_entropy_loss(view.logits, view.labels, view.mask,
                                                          reduction=cfg.unsup_reduction)

    # 4. Extra terms (DGCL's contrast by default) on [x_l ; x_u].
    terms_total, extras = self.apply_terms(ctx, teacher_student.Views(
        labeled=lab, unlabeled=unl, teacher_logits=t_logits, pseudo_labels=labels,
        pseudo_mask=mask, student_labeled=teacher_student.rows(out, 0, n_l),
        student_unlabeled=teacher_student.rows(out, n_l, n_l + n_u), strong=[view],
        size=size), metrics)
    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps)
    total = loss_sup + weight * (cfg.unsup_weight * loss_unsup + terms_total)
    metrics.update(self.loss_metrics(loss_sup, loss_unsup, weight, sup_aux, unsup_aux, pl_aux,
                                     view_aux))
    return total, metrics, extras
