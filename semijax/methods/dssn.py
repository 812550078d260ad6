"""DSSN: dual-level siamese structure network with CPLG (Tian et al., ACM MM 2023).

One step, following the official `voc/DSSN.py`:
  * Image level: two independent strong views s1, s2 of each unlabeled image (photometric
    preset 'dssn', each with its own CutMix box). The EMA teacher's prediction on the weak
    view x_w (box regions from the mix source) supervises both, where CPLG selects
    (weak-to-strong, eqs. 15-17), and the two views' logits are pulled together
    (L_cl^ls, eq. 10).
  * Feature level: the student's encoder features of [x_l ; x_w] are decoded three times,
    clean and with two independent channel-dropout (p = 0.5) perturbations of the low-level
    and high-level features (one BN batch); the student's own clean prediction (CPLG-masked)
    supervises both perturbed ones (eqs. 18-19) and they are pulled together (L_cl^hs, eq. 14).
  * L = s * [L_sup + g2 (L_w2s(s1) + L_w2s(s2) + L_w2s(fp1) + L_w2s(fp2)) + g1 (L_cl^ls + L_cl^hs)]
    with g1 = 0.01, g2 = 0.25 and the official overall factor s = 1/2 (`dssn.overall_scale`).
"""

import jax
import jax.numpy as jnp

from semijax import ops
from semijax.augment import feature, mix, photometric
from semijax.losses import consistency
from semijax.methods import base
from semijax.pseudo import thresholds

PSEUDO_RULES = ("cplg", "confidence")


class DSSN(base.Method):
  """Config: `config.dssn` (see experiments/configs/base.py for every field)."""
  name = "dssn"
  uses_unlabeled = True
  teacher_bn = "ema"   # official EMA covers the whole state_dict; teacher in eval mode

  def _pseudo(self, logits, pad):
    """Pseudo-labels and selection mask from logits `[B, H, W, C]` (CPLG or a fixed threshold)."""
    cfg = self.config.dssn
    if cfg.pseudo_rule == "cplg":
      return thresholds.cplg_mask(logits, ratio=cfg.cplg_ratio, tau_low=cfg.cplg_tau_low,
                                  rule=cfg.cplg_rule, pad=pad)
    if cfg.pseudo_rule == "confidence":
      probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
      return thresholds.confidence_mask(probs, threshold=cfg.conf_threshold, pad=pad)
    raise ValueError(f"dssn.pseudo_rule={cfg.pseudo_rule!r}; expected one of {PSEUDO_RULES}")

  def loss(self, ctx):
    cfg = self.config.dssn
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_l, n_u = lab["image"].shape[0], unl["image"].shape[0]
    size = lab["label"].shape[1:]
    x_w, pad = unl["image"], unl["pad"]

    # Teacher on the weak view; the mix source of image i is image i+1 (see BUILD_NOTES).
    t_logits = base.upsample_logits(ctx.teacher(x_w), size).astype(jnp.float32)

    # Feature level: encode once, decode clean + two channel-dropout copies in one batch.
    feats = ctx.student(jnp.concatenate([lab["image"], x_w]), method="encode")
    if cfg.feature_level:
      k1, k2 = jax.random.split(ctx.key("feature_dropout"))
      perturbed = {}
      for name, value in feats.items():
        if name in ("layer1", "layer4"):
          perturbed[name] = jnp.concatenate([
              value, feature.channel_dropout(k1, value, rate=cfg.feature_dropout),
              feature.channel_dropout(k2, value, rate=cfg.feature_dropout)])
        else:
          perturbed[name] = jnp.concatenate([value] * 3)
      decoded = ctx.student(perturbed, method="decode")
      n = n_l + n_u
      all_logits = base.upsample_logits(decoded, size)
      clean, fp1, fp2 = all_logits[:n], all_logits[n:2 * n], all_logits[2 * n:]
    else:
      clean = base.upsample_logits(ctx.student(feats, method="decode"), size)
    loss_sup, sup_aux = base.supervised_loss(clean[:n_l], lab["label"], self.config.loss)

    # Image level: two strong views, each with its own photometric draw and CutMix box.
    views, boxes = [], []
    for v in range(2 if cfg.image_level_views == 2 else 1):
      strong = photometric.strong_augment(ctx.key(f"strong{v}"), x_w, preset=cfg.strong_augment,
                                          pad=pad)
      box = mix.cutmix_box(ctx.key(f"cutmix{v}"), n_u, *size, p=cfg.cutmix_prob)
      views.append(mix.mix(box, strong, mix.roll_batch(strong)))
      boxes.append(box)
    s_logits = base.upsample_logits(ctx.student(jnp.concatenate(views)), size)
    s_logits = jnp.split(s_logits, len(views))

    w2s, metrics = [], {}
    for v, (logits_v, box) in enumerate(zip(s_logits, boxes)):
      mixed_t = mix.mix(box, t_logits, mix.roll_batch(t_logits))
      mixed_pad = mix.mix(box, pad, mix.roll_batch(pad))
      pseudo, select, aux = self._pseudo(mixed_t, mixed_pad)
      loss_v, _ = consistency.weak_to_strong_loss(logits_v, pseudo, select, mixed_pad)
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
      u_clean = jax.lax.stop_gradient(clean[n_l:])
      pseudo_fp, select_fp, aux_fp = self._pseudo(u_clean, pad)
      l1, _ = consistency.weak_to_strong_loss(fp1[n_l:], pseudo_fp, select_fp, pad)
      l2, _ = consistency.weak_to_strong_loss(fp2[n_l:], pseudo_fp, select_fp, pad)
      loss_w2s_feature = l1 + l2
      metrics["pseudo_label_ratio_feature"] = aux_fp["selected_ratio"]
      if cfg.consistency_feature:
        loss_cl_feature, _ = consistency.logit_consistency_loss(fp1[n_l:], fp2[n_l:],
                                                               form=cfg.consistency_form)
    loss_cl_image = jnp.zeros((), jnp.float32)
    if cfg.consistency_image and len(s_logits) == 2:
      loss_cl_image, _ = consistency.logit_consistency_loss(s_logits[0], s_logits[1],
                                                           form=cfg.consistency_form)

    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps)
    unsup = (cfg.w2s_weight * (loss_w2s_image + loss_w2s_feature)
             + cfg.consistency_weight * (loss_cl_image + loss_cl_feature))
    total = cfg.overall_scale * (loss_sup + weight * unsup)
    metrics.update({"loss_sup": loss_sup, "loss_w2s_image": loss_w2s_image,
                    "loss_w2s_feature": loss_w2s_feature, "loss_cl_image": loss_cl_image,
                    "loss_cl_feature": loss_cl_feature, "unsup_weight": weight,
                    "sup_selected_ratio": sup_aux["selected_ratio"]})
    return total, metrics, {}
