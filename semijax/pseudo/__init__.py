"""Pseudo-label selection rules: fixed and class-aware thresholds, entropy percentiles."""

from semijax.pseudo import entropy, thresholds
from semijax.pseudo.entropy import (
  dgcl_contrastive_drop_percent,
  dgcl_drop_percent,
  entropy_percentile_mask,
  filtered_pseudo_labels,
)
from semijax.pseudo.sharpened import sharpened_confidence as sharpened_confidence
from semijax.pseudo.thresholds import confidence_mask, cplg_mask, cplg_select, cplg_thresholds

__all__ = ["entropy", "thresholds", "confidence_mask", "cplg_mask", "cplg_select",
           "cplg_thresholds", "dgcl_contrastive_drop_percent", "dgcl_drop_percent",
           "entropy_percentile_mask", "filtered_pseudo_labels"]
