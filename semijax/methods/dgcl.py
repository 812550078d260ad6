"""DGCL: density-guided contrastive learning (Wang et al., CVPR 2023), official recipe.

One step (after the supervised warm-up), following the official `train_semi.py`:
  1. The EMA teacher (train-mode BN, as U2PL) labels x_u: argmax with the top beta_t % entropy
     pixels dropped, beta_t = 20 (1 - progress) (eqs. 4-6).
  2. With probability 0.5 per batch, CutMix (a box of half the image, from image i+1) mixes
     x_u, its pseudo-labels and padding into the strong view (the official strong view has
     no photometric augmentation; `dgcl.strong_augment` adds one).
  3. The student runs once on [x_l ; x_u ; strong] (one BN batch).
  4. L = L_sup + l_u * L_unsup + l_c * L_contra, with L_unsup the U2PL-weighted CE on the
     strong view and L_contra the density-guided contrastive loss (eqs. 7-13) on the
     student's projections of [x_l ; x_u] against the class memory bank, with contrastive
     labels = GT (labeled) and the teacher's argmax at feature resolution with a separate
     entropy filter alpha_t = max(80 (1 - progress), 10) (unlabeled).
  5. After the optimizer step the bank receives (features, projections, density) of
     [x_l ; x_u] under the same contrastive labels.
"""

import jax
import jax.numpy as jnp

from semijax import ops
from semijax.augment import mix, photometric
from semijax.losses import contrastive, supervised
from semijax.methods import base
from semijax.models import heads as heads_lib
from semijax.pseudo import entropy
from semijax.sampling import dgcl as dgcl_sampling


class DGCL(base.Method):
  """Config: `config.dgcl` (see experiments/configs/base.py for every field)."""
  name = "dgcl"
  uses_unlabeled = True
  teacher_bn = "batch"

  def heads(self, num_classes):
    del num_classes
    cfg = self.config.dgcl
    return {"projection": heads_lib.PixelMLP(hidden=cfg.projection_dim, out=cfg.projection_dim,
                                             source="decoder")}

  def init_state(self, rng, *, num_classes, outputs):
    del rng
    cfg = self.config.dgcl
    return {"bank": dgcl_sampling.init_bank(
        num_classes, cfg.bank_size, feature_dim=outputs["decoder"].shape[-1],
        projection_dim=outputs["projection"].shape[-1])}

  def _progress_kwargs(self):
    cfg = self.config.dgcl
    return dict(start_step=self.config.train.supervised_warmup_steps,
                total_steps=self.config.train.total_steps,
                steps_per_epoch=cfg.steps_per_epoch or None)

  def loss(self, ctx):
    cfg = self.config.dgcl
    lab, unl = ctx.batch["labeled"], ctx.batch["unlabeled"]
    n_l, n_u = lab["image"].shape[0], unl["image"].shape[0]
    size = lab["label"].shape[1:]
    progress = self._progress_kwargs()

    # 1. Teacher on [x_l ; x_u] in one train-mode BN batch, as the official code.
    t_out = ctx.teacher(jnp.concatenate([lab["image"], unl["image"]]))
    t_feat_logits = t_out["logits"][n_l:].astype(jnp.float32)
    t_probs = jax.nn.softmax(base.upsample_logits({"logits": t_feat_logits}, size), axis=-1)
    beta = entropy.dgcl_drop_percent(ctx.step, beta0=cfg.drop_percent, **progress)
    pseudo, keep = entropy.filtered_pseudo_labels(t_probs, ~unl["pad"], drop_percent=beta)

    # 2. Strong view: optional photometric augmentation, CutMix with probability per batch.
    strong, pad = unl["image"], unl["pad"]
    if cfg.strong_augment != "none":
      strong = photometric.strong_augment(ctx.key("photometric"), strong,
                                          preset=cfg.strong_augment, pad=pad)
    box = mix.cutmix_box_u2pl(ctx.key("cutmix"), n_u, *size)
    box, cutmix_applied = mix.apply_batch_prob(ctx.key("cutmix_prob"), box, p=cfg.cutmix_prob)
    strong, pseudo, pad = mix.mix(box, (strong, pseudo, pad),
                                  mix.roll_batch((strong, pseudo, pad)))
    pseudo = jnp.where(pad, ops.IGNORE_INDEX, pseudo)

    # 3. Student on [x_l ; x_u ; strong].
    s_out = ctx.student(jnp.concatenate([lab["image"], unl["image"], strong]))
    logits = base.upsample_logits(s_out, size)
    loss_sup, sup_aux = base.supervised_loss(logits[:n_l], lab["label"], self.config.loss)
    loss_unsup, unsup_aux = supervised.cross_entropy_loss(logits[n_l + n_u:], pseudo,
                                                          reduction=cfg.unsup_reduction)

    # 4. Contrastive labels at feature resolution for [x_l ; x_u].
    feat_size = s_out["decoder"].shape[1:3]
    gt_small = ops.resize_nearest(lab["label"], feat_size)
    t_small_probs = jax.nn.softmax(t_feat_logits, axis=-1)
    pad_small = ops.resize_nearest(unl["pad"], feat_size)
    alpha = entropy.dgcl_contrastive_drop_percent(ctx.step, alpha0=cfg.contra_drop_percent,
                                                  alpha_min=cfg.contra_drop_min, **progress)
    if cfg.contra_label_filter:
      u_small, _ = entropy.filtered_pseudo_labels(t_small_probs, ~pad_small, drop_percent=alpha)
    else:
      u_small = jnp.where(pad_small, ops.IGNORE_INDEX,
                          jnp.argmax(t_small_probs, -1).astype(jnp.int32))
    contra_labels = jnp.concatenate([gt_small, u_small])
    projections = s_out["projection"][:n_l + n_u]
    features = jax.lax.stop_gradient(s_out["decoder"][:n_l + n_u]).astype(jnp.float32)
    bank = ctx.method_state["bank"]
    loss_contra, contra_aux = contrastive.dgcl_contrastive_loss(
        projections, features, contra_labels, bank, ctx.key("contrastive"),
        num_anchors=cfg.num_anchors, num_batch_keys=cfg.num_batch_keys,
        num_bank_keys=cfg.num_bank_keys, num_negatives=cfg.num_negatives,
        max_pixels_per_class=cfg.max_pixels_per_class, ks=tuple(cfg.ks),
        temperature=cfg.temperature, form=cfg.loss_form,
        exclude_classes=tuple(cfg.exclude_classes), wait_for_full_bank=cfg.wait_for_full_bank)

    weight = base.schedule_weight(ctx.step, start=self.config.train.supervised_warmup_steps)
    total = loss_sup + weight * (cfg.unsup_weight * loss_unsup + cfg.contra_weight * loss_contra)
    metrics = {"loss_sup": loss_sup, "loss_unsup": loss_unsup, "loss_contra": loss_contra,
               "unsup_weight": weight, "sup_selected_ratio": sup_aux["selected_ratio"],
               "pseudo_label_ratio": unsup_aux["selected_ratio"],
               "pseudo_drop_percent": beta, "contra_drop_percent": alpha,
               "contra_label_ratio": jnp.mean((u_small != ops.IGNORE_INDEX).astype(jnp.float32)),
               "cutmix_applied": cutmix_applied.astype(jnp.float32)}
    metrics.update({f"dgcl/{k}": v for k, v in contra_aux.items()})
    metrics.update(_bank_metrics(bank))
    extras = {"features": features, "projections": jax.lax.stop_gradient(projections),
              "labels": contra_labels}
    return total, metrics, extras

  def update_state(self, method_state, extras, rng, step):
    cfg = self.config.dgcl
    bank = dgcl_sampling.push_bank(
        method_state["bank"], extras["features"], extras["projections"].astype(jnp.float32),
        extras["labels"], rng, max_per_class=cfg.push_per_class, ks=tuple(cfg.ks),
        min_bank_size=cfg.min_bank_size_for_density)
    # The bank starts filling once the semi-supervised phase starts (official).
    started = step >= self.config.train.supervised_warmup_steps
    return {"bank": jax.tree.map(lambda new, old: jnp.where(started, new, old), bank,
                                 method_state["bank"])}


def _bank_metrics(bank) -> dict:
  fill = bank.count.astype(jnp.float32) / bank.capacity
  out = {"bank/fill_mean": jnp.mean(fill), "bank/full_classes": jnp.sum(fill >= 1.0)}
  out.update({f"bank/fill_class_{c}": fill[c] for c in range(fill.shape[0])})
  return out
