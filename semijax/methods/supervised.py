"""Supervised-only baseline: the labeled batch and nothing else."""

from semijax.methods import base, registry


@registry.register
class Supervised(base.Method):
  """L = L_sup on the labeled batch (CE, or OHEM with `config.loss.supervised = 'ohem'`)."""
  name = "supervised"
  uses_unlabeled = False

  def loss(self, ctx):
    lab = ctx.batch["labeled"]
    logits = base.upsample_logits(ctx.student(lab["image"]), lab["label"].shape[1:])
    loss, aux = base.supervised_loss(logits, lab["label"], self.config.loss)
    return loss, {"loss_sup": loss, "sup_selected_ratio": aux["selected_ratio"]}, {}
