"""DSSN: dual-level siamese structure network with CPLG (Tian et al., ACM MM 2023).

One step, following the official `voc/DSSN.py`:
  * Image level: two independent strong views s1, s2 of each unlabeled image (photometric
    preset 'dssn', each with its own CutMix box). The EMA teacher's prediction on the weak
    view x_w (box regions from the mix source) supervises both, where the rule (CPLG,
    eqs. 15-17) selects, and the two views' logits are pulled together (L_cl^ls, eq. 10).
  * Feature level: the student's encoder features of [x_l ; x_w] are decoded three times,
    clean and with two independent channel-dropout (p = 0.5) perturbations of the low-level
    and high-level features (one BN batch); the student's own clean prediction (rule-masked)
    supervises both perturbed ones (eqs. 18-19) and they are pulled together (L_cl^hs, eq. 14).
  * L = s * [L_sup + g2 (L_w2s(s1) + L_w2s(s2) + L_w2s(fp1) + L_w2s(fp2)) + g1 (L_cl^ls + L_cl^hs)
    + sum_k L_k] with g1 = 0.01, g2 = 0.25 and the official overall factor s = 1/2
    (`dssn.overall_scale`).
The rule runs on the teacher's logits after they are mixed with each view's box (official),
so a class-aware rule sees the mixed image it teaches.
"""

import jax
import jax.numpy as jnp
import ml_collections

from semijax.augment import mix
from semijax.losses import consistency
from semijax.methods import base, registry, teacher_student, terms


@registry.register
class DSSN(teacher_student.TeacherStudent):
  """Config: `config.dssn` (below), `config.pseudo_label` (rule `cplg`)."""
  name = "dssn"
  teacher_bn = "ema"   # official EMA covers the whole state_dict; teacher in eval mode
  default_rule = "cplg"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.w2s_weight = 0.25                # gamma_2: weak-to-strong CE terms (image and feature level)
    c.consistency_weight = 0.01        # gamma_1: dual-level consistency terms
    c.overall_scale = 0.5              # official overall factor 1/2 on the whole loss (paper: 1)
    c.image_level_views = 2            # strong views per unlabeled image (1 disables L_cl^ls)
    c.feature_level = True             # feature-level siamese branch (channel dropout)
    c.feature_dropout = 0.5            # Dropout2d rate on low- and high-level features
    c.consistency_image = True         # L_cl^ls between the two strong views (Table 5)
    c.consistency_feature = True       # L_cl^hs between the two dropout views (Table 5)
    c.consistency_form = "standardized_mse"  # standardized_mse (official) | l2 (paper eqs. 10, 14)
    c.strong_augment = "dssn"          # photometric preset of the strong views
    c.cutmix_prob = 0.5                # per-view, per-image CutMix probability
    c.w2s_start_step = 1               # image-level w2s terms start here (official: after step 0)
    return c

  @classmethod
  def smoke(cls, config):
    config.dssn.w2s_start_step = min(config.dssn.w2s_start_step, 1)

  def loss(self, ctx):
    cfg = self.cfg
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_l, n_u = lab["image"].shape[0], unl["image"].shape[0]
    size = lab["label"].shape[1:]
    x_w, pad = unl["image"], unl["pad"]
    hidden = self.hidden_labels(ctx)
    metrics = {}

    # Teacher on the weak view; the mix source of image i is image i+1 (see BUILD_NOTES).
    t_feat = self.teacher_logits(ctx, x_w)
    t_logits = base.upsample_logits({"logits": t_feat}, size)

    # Feature level: encode once, decode clean + two channel-dropout copies in one batch.
    feats = ctx.student(jnp.concatenate([lab["image"], x_w]), method="encode")
    n = n_l + n_u
    if cfg.feature_level:
      decoded = terms.feature_perturbed_decode(ctx, feats, rate=cfg.feature_dropout)
      all_logits = base.upsample_logits(decoded, size)
      clean_logits, fp1_logits, fp2_logits = (all_logits[:n], all_logits[n:2 * n],
                                              all_logits[2 * n:])
      clean = teacher_student.rows(decoded, 0, n)
    else:
      clean = ctx.student(feats, method="decode")
      clean_logits = base.upsample_logits(clean, size)
    loss_sup, sup_aux = base.supervised_loss(clean_logits[:n_l], lab["label"], self.config.loss)

    # Image level: two strong views, each with its own photometric draw and CutMix box; the
    # teacher's logits (and the hidden labels) travel with the pixels.
    views = []
    for v in range(2 if cfg.image_level_views == 2 else 1):
      view, _, _ = self.strong_view(ctx, x_w, pad, None, preset=cfg.strong_augment,
                                    cutmix="per_image", cutmix_prob=cfg.cutmix_prob,
                                    keys=(f"strong{v}", f"cutmix{v}"))
      views.append(view)
    s_out = ctx.student(jnp.concatenate([v.images for v in views]))
    s_logits = jnp.split(base.upsample_logits(s_out, size), len(views))

    w2s = []
    for v, (view, logits_v) in enumerate(zip(views, s_logits)):
      view.logits = logits_v
      view.outputs = teacher_student.rows(s_out, v * n_u, (v + 1) * n_u)
      mixed_t = mix.mix(view.box, t_logits, mix.roll_batch(t_logits))
      mixed_hidden = None if hidden is None else mix.mix(view.box, hidden,
                                                         mix.roll_batch(hidden))
      view.labels, view.mask, aux = self.pseudo_label(ctx, mixed_t, view.pad, mixed_hidden,
                                                      metrics)
      loss_v, _ = consistency.weak_to_strong_loss(logits_v, view.labels, view.mask,
                                                  valid=~view.pad)
      w2s.append(loss_v)
      metrics[f"loss_w2s_strong{v + 1}"] = loss_v
      metrics[f"pseudo_label_ratio_strong{v + 1}"] = aux["selected_ratio"]
    # The very first step has no teacher yet (official: s1/s2 terms left out at step 0).
    w2s_weight = base.schedule_weight(ctx.step, start=max(self.config.train.supervised_warmup_steps,
                                                         cfg.w2s_start_step))
    loss_w2s_image = w2s_weight * sum(w2s)

    loss_w2s_feature = jnp.zeros((), jnp.float32)
    loss_cl_feature = jnp.zeros((), jnp.float32)
    if cfg.feature_level:
      u_clean = jax.lax.stop_gradient(clean_logits[n_l:])
      pseudo_fp, select_fp, aux_fp = self.pseudo_label(ctx, u_clean, pad, hidden, metrics,
                                                       prefix="pl_feature")
      l1, _ = consistency.weak_to_strong_loss(fp1_logits[n_l:], pseudo_fp, select_fp,
                                              valid=~pad)
      l2, _ = consistency.weak_to_strong_loss(fp2_logits[n_l:], pseudo_fp, select_fp,
                                              valid=~pad)
      loss_w2s_feature = l1 + l2
      metrics["pseudo_label_ratio_feature"] = aux_fp["selected_ratio"]
      if cfg.consistency_feature:
        loss_cl_feature, _ = consistency.logit_consistency_loss(fp1_logits[n_l:],
                                                               fp2_logits[n_l:],
                                                               form=cfg.consistency_form)
    loss_cl_image = jnp.zeros((), jnp.float32)
    if cfg.consistency_image and len(s_logits) == 2:
      loss_cl_image, _ = consistency.logit_consistency_loss(s_logits[0], s_logits[1],
                                                           form=cfg.consistency_form)

    terms_total, extras = self.apply_terms(ctx, teacher_student.Views(
        labeled=lab, unlabeled=unl, teacher_logits=t_feat, pseudo_labels=None, pseudo_mask=None,
        student_labeled=teacher_student.rows(clean, 0, n_l),
        student_unlabeled=teacher_student.rows(clean, n_l), strong=views, size=size), metrics)
    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps)
    unsup = (cfg.w2s_weight * (loss_w2s_image + loss_w2s_feature)
             + cfg.consistency_weight * (loss_cl_image + loss_cl_feature) + terms_total)
    total = cfg.overall_scale * (loss_sup + weight * unsup)
    metrics.update({"loss_sup": loss_sup, "loss_w2s_image": loss_w2s_image,
                    "loss_w2s_feature": loss_w2s_feature, "loss_cl_image": loss_cl_image,
                    "loss_cl_feature": loss_cl_feature, "unsup_weight": weight,
                    "sup_selected_ratio": sup_aux["selected_ratio"]})
    return total, metrics, extras
