"""Pseudo-label rules a teacher-student method can use, selected by `config.pseudo_label.rule`.

A rule turns the teacher's logits `[B, H, W, C]` into `(labels [B, H, W] int32, mask
[B, H, W] bool, aux)`: the class each pixel is taught and whether it is taught at all.
Every method's default is its paper's rule; any other one is a config switch away, e.g. DGCL
with DSSN's class-aware thresholds:

    --config=experiments/configs/dgcl.py:split=1/16 --config.pseudo_label.rule=cplg

`config.pseudo_label` holds every rule's settings (one sub-block per rule), so that switching
rules needs no other edit. Each rule's math lives in `semijax.pseudo`; this module binds it
to the run's config and schedule.
"""

import jax
import jax.numpy as jnp
import ml_collections

from semijax.methods import registry
from semijax.pseudo import entropy, thresholds


class Rule:
  """A pseudo-label rule bound to a run's config.

  Class attributes:
    name: registry name and the name of its sub-block of `config.pseudo_label`.
  """
  name = "base"

  def __init__(self, config):
    self.config = config
    self.cfg = config.pseudo_label[self.name]

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict()

  def __call__(self, logits: jax.Array, pad: jax.Array, step: jax.Array):
    """`logits` float32 `[B, H, W, C]`, `pad` bool `[B, H, W]` -> (labels, mask, aux).

    `pad` is the batch record's field (True on padding); a rule hands `valid=~pad` to the
    functions of `semijax.pseudo`, whose masks all mean True = keep.
    """
    raise NotImplementedError


@registry.register_rule
class Confidence(Rule):
  """FixMatch / mean teacher: argmax where the teacher's confidence >= `threshold`."""
  name = "confidence"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.threshold = 0.95          # tau (UniMatch/DSSN 0.95; DSSN Cityscapes 0: every pixel)
    return c

  def __call__(self, logits, pad, step):
    del step
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return thresholds.confidence_mask(probs, threshold=self.cfg.threshold, valid=~pad)


@registry.register_rule
class EntropyPercentile(Rule):
  """DGCL (eqs. 4-6): drop the beta_t % highest-entropy pixels, beta_t = beta_0 (1 - progress).

  Progress runs from the end of the supervised warm-up to the end of training, per step or
  (official) per epoch of `steps_per_epoch` steps.
  """
  name = "entropy_percentile"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.drop_percent = 20.0       # beta_0 (DGCL/U2PL)
    c.steps_per_epoch = 0       # >0: progress advances once per epoch (official DGCL)
    return c

  def __call__(self, logits, pad, step):
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    beta = entropy.dgcl_drop_percent(
        step, beta0=self.cfg.drop_percent,
        start_step=self.config.train.supervised_warmup_steps,
        total_steps=self.config.train.total_steps,
        steps_per_epoch=self.cfg.steps_per_epoch or None)
    labels, keep, aux = entropy.filtered_pseudo_labels(probs, ~pad, drop_percent=beta)
    return labels, keep, {"selected_ratio": aux["selected_ratio"], "drop_percent": beta}


@registry.register_rule
class ClassAware(Rule):
  """DSSN's CPLG (eqs. 15-17): per image and class, tau_j = r * max confidence of class j;
  a class peaking at or below `tau_low` selects nothing (`rule='max'`: max(r m_j, tau_low))."""
  name = "cplg"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.ratio = 0.96              # r (cplg_mask's peak_fraction): tau_j = r * peak of class j
    c.tau_low = 0.92            # tau_low
    c.rule = "official"         # official | max
    return c

  def __call__(self, logits, pad, step):
    del step
    return thresholds.cplg_mask(logits, peak_fraction=self.cfg.ratio, tau_low=self.cfg.tau_low,
                                rule=self.cfg.rule, valid=~pad)


def default_config(rule: str) -> ml_collections.ConfigDict:
  """`config.pseudo_label`: the selected rule plus every registered rule's settings."""
  c = ml_collections.ConfigDict()
  c.rule = rule
  for name in registry.names()["rules"]:
    c[name] = registry.get_rule(name).default_config()
  return c


def build(config) -> Rule:
  """The rule `config.pseudo_label.rule`, bound to `config`."""
  return registry.get_rule(config.pseudo_label.rule)(config)
