"""Mean-teacher weak-to-strong pseudo-labelling baseline (FixMatch-style with an EMA teacher).

The EMA teacher labels the weak view of each unlabeled image; the student learns those
labels, where the teacher is confident, on a strong view (photometric augmentation and
CutMix). This is the baseline every method here is compared against: DGCL, DSSN and the
others add their terms on top of the same weak-to-strong core.

    L = L_sup(x_l) + w(t) * lambda_u * CE(student(strong(x_u)), argmax teacher(x_u); conf > tau)
"""

import jax
import jax.numpy as jnp

from semijax.augment import mix, photometric
from semijax.losses import supervised
from semijax.methods import base
from semijax.pseudo import thresholds


def strong_view(ctx: base.StepContext, images, pseudo_labels, mask, pad, cfg, name: str):
  """Photometric strong augmentation, then CutMix with the batch rolled by one image.

  Pseudo-labels and masks are mixed with the same boxes, so each pixel keeps the teacher's
  label of the image it came from; padding travels with its pixels.

  Returns:
    (strong images, pseudo-labels, mask, pad, box mask).
  """
  strong = photometric.strong_augment(ctx.key(f"{name}/photometric"), images,
                                      preset=cfg.strong_augment, pad=pad)
  if not cfg.cutmix:
    return strong, pseudo_labels, mask, pad, jnp.zeros(pad.shape, bool)
  b, h, w = pseudo_labels.shape
  box = mix.cutmix_box(ctx.key(f"{name}/cutmix"), b, h, w, p=cfg.cutmix_prob)
  # The mix source of image i is image i+1 of the same batch (U2PL), with its own labels.
  mixed = mix.mix(box, (strong, pseudo_labels, mask, pad),
                  mix.roll_batch((strong, pseudo_labels, mask, pad)))
  return mixed + (box,)


class MeanTeacher(base.Method):
  """Weak-to-strong mean teacher with a fixed confidence threshold and CutMix.

  Config (`config.mean_teacher`): `unsup_weight`, `conf_threshold`, `strong_augment`
  (photometric preset), `cutmix`, `cutmix_prob`, `rampup_steps`.
  """
  name = "mean_teacher"
  uses_unlabeled = True
  teacher_bn = "ema"

  def loss(self, ctx):
    cfg = self.config.mean_teacher
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    size = lab["label"].shape[1:]

    probs = jax.nn.softmax(base.upsample_logits(ctx.teacher(unl["image"]), size).astype(
        jnp.float32), axis=-1)
    pseudo, conf_mask, pl_aux = thresholds.confidence_mask(probs, threshold=cfg.conf_threshold,
                                                           pad=unl["pad"])
    strong, pseudo, conf_mask, pad, _ = strong_view(ctx, unl["image"], pseudo, conf_mask,
                                                     unl["pad"], cfg, "unlabeled")
    pseudo = jnp.where(pad, 255, pseudo)

    n_l = lab["image"].shape[0]
    logits = base.upsample_logits(ctx.student(jnp.concatenate([lab["image"], strong])), size)
    loss_sup, sup_aux = base.supervised_loss(logits[:n_l], lab["label"], self.config.loss)
    loss_unsup, unsup_aux = supervised.cross_entropy_loss(logits[n_l:], pseudo, conf_mask)
    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps,
                                  rampup=cfg.rampup_steps)
    total = loss_sup + weight * cfg.unsup_weight * loss_unsup
    metrics = {"loss_sup": loss_sup, "loss_unsup": loss_unsup, "unsup_weight": weight,
               "pseudo_label_ratio": unsup_aux["selected_ratio"],
               "teacher_confident_ratio": pl_aux["selected_ratio"],
               "teacher_mean_confidence": pl_aux["mean_confidence"],
               "sup_selected_ratio": sup_aux["selected_ratio"]}
    return total, metrics, {}
