"""Pure losses: `(loss, aux)` in float32, exactly 0 when nothing is selected."""

from semijax.losses import consistency, contrastive, supervised
from semijax.losses.alonso import (
  class_contrastive_loss as class_contrastive_loss,
  entropy_loss as entropy_loss,
)
from semijax.losses.consistency import logit_consistency_loss, weak_to_strong_loss
from semijax.losses.contrastive import dgcl_contrastive_loss, dgcl_loss
from semijax.losses.csc import csc_contrastive_loss, pixel_contrastive_loss, topn_contrastive_loss
from semijax.losses.directional import directional_contrastive_loss
from semijax.losses.supervised import (
  cross_entropy_loss,
  ohem_cross_entropy_loss,
  pixel_cross_entropy,
)

__all__ = ["consistency", "contrastive", "supervised", "cross_entropy_loss",
           "csc_contrastive_loss", "dgcl_contrastive_loss", "dgcl_loss",
           "directional_contrastive_loss", "logit_consistency_loss", "ohem_cross_entropy_loss",
           "pixel_contrastive_loss", "pixel_cross_entropy", "topn_contrastive_loss",
           "weak_to_strong_loss"]
