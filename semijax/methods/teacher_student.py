"""The structure every teacher-student method shares, and the pieces it is made of.

One step of a teacher-student method is

    teacher pass -> pseudo-label rule -> strong views -> student pass -> losses + extra terms

`TeacherStudent` implements each stage once; a recipe (mean teacher, DGCL, DSSN, ...) composes
them in its paper's order with its own settings, and any recipe runs

* any pseudo-label rule (`config.pseudo_label.rule`, `semijax.methods.pseudo_labels`), and
* any extra terms (`config.method.terms`, `semijax.methods.terms`): DGCL's density-guided
  contrast, DSSN's dual-level consistency, ... each reading the stages' outputs (`Views`).

The oracle switch (`config.diagnostics.oracle_pseudo_labels`) replaces the rule's output by
the hidden ground truth, and every call of the rule is measured against it
(`semijax.methods.diagnostics`): both happen in `pseudo_label`, the one place a rule runs.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from semijax import ops
from semijax.augment import mix, photometric
from semijax.methods import base, diagnostics, pseudo_labels

CUTMIX = ("none", "per_image", "per_batch")


@dataclasses.dataclass
class StrongView:
  """One strong view of the unlabeled batch and what the student made of it.

  Attributes:
    images: `[B, H, W, 3]` float.
    pad: `[B, H, W]` bool, padding after mixing.
    box: `[B, H, W]` bool, pixels taken from the mix source (image i + 1).
    labels, mask: the pseudo-labels `[B, H, W]` int32 and selection taught on this view.
    logits: student logits at image resolution `[B, H, W, C]` (set by the student pass).
    outputs: the student's output dict for this view (feature resolution).
  """
  images: jax.Array
  pad: jax.Array
  box: jax.Array
  labels: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None
  logits: Optional[jax.Array] = None
  outputs: Optional[Dict[str, jax.Array]] = None


@dataclasses.dataclass
class Views:
  """What the stages computed, handed to extra terms (`terms.Term.loss`).

  Attributes:
    labeled: the labeled batch (`image`, `label`, `pad`).
    unlabeled: the unlabeled batch (`image`, `pad`; no labels).
    teacher_logits: the teacher's logits on the unlabeled (weak) images at feature
      resolution `[B, h, w, C]` float32.
    pseudo_labels, pseudo_mask: the rule's output on the weak view at image resolution
      (None where a recipe applies the rule per strong view only).
    student_labeled: the student's output dict on the labeled images.
    student_unlabeled: its output dict on the weak unlabeled images, or None when the recipe's
      student pass does not include them (a term that needs them says so, `Term.needs_weak`).
    strong: the strong views.
    size: `(H, W)` image size.
  """
  labeled: Dict[str, jax.Array]
  unlabeled: Dict[str, jax.Array]
  teacher_logits: jax.Array
  pseudo_labels: Optional[jax.Array]
  pseudo_mask: Optional[jax.Array]
  student_labeled: Dict[str, jax.Array]
  student_unlabeled: Optional[Dict[str, jax.Array]]
  strong: List[StrongView]
  size: Tuple[int, int]


def rows(outputs: Dict[str, jax.Array], start: int, stop: Optional[int] = None) -> Dict:
  """Rows `[start:stop]` of every batch-leading output (a pass over a concatenated batch)."""
  return {k: v[start:stop] for k, v in outputs.items()}


class TeacherStudent(base.Method):
  """Base of the teacher-student recipes: the stages and the extra-term plumbing.

  Subclasses set `name`, `teacher_bn`, `terms`, `default_config()` and write `loss` from the
  stages. The method's own block is `self.cfg` (= `config[name]`).
  """
  uses_unlabeled = True

  def __init__(self, config, info=None):
    super().__init__(config, info)
    self.cfg = config[self.name]
    self.rule = pseudo_labels.build(config)
    from semijax.methods import terms as terms_lib  # pylint: disable=g-import-not-at-top
    self.extra = [terms_lib.build(name, config, info) for name in config.method.terms]
    diag = config.get("diagnostics")
    self.oracle = bool(diag and diag.get("oracle_pseudo_labels"))
    self.measure = bool(diag is None or diag.get("pseudo_label_metrics", True))

  @property
  def needs_weak(self) -> bool:
    """Whether an extra term reads the student's outputs on the weak unlabeled images."""
    return any(t.needs_weak for t in self.extra)

  # -- Model and state: the extra terms' heads and state, by term name. -----------------------

  def heads(self, num_classes):
    out = {}
    for t in self.extra:
      out.update(t.heads(num_classes))
    return out

  def init_state(self, rng, *, num_classes, outputs):
    return {t.name: t.init_state(jax.random.fold_in(rng, i), num_classes=num_classes,
                                 outputs=outputs)
            for i, t in enumerate(self.extra) if t.has_state}

  def update_state(self, method_state, extras, rng, step):
    out = dict(method_state)
    for t in self.extra:
      if t.has_state:
        out[t.name] = t.update_state(method_state[t.name], extras[t.name], rng, step)
    return out

  # -- Stages. -------------------------------------------------------------------------------

  def teacher_logits(self, ctx: base.StepContext, images: jax.Array) -> jax.Array:
    """The teacher's logits on `images` at feature resolution, float32."""
    return ctx.teacher(images)["logits"].astype(jnp.float32)

  def pseudo_label(self, ctx: base.StepContext, logits: jax.Array, pad: jax.Array,
                   hidden: Optional[jax.Array], metrics: Dict, *, prefix: str = "pl"):
    """The rule (or, with the oracle switch, the ground truth) on image-resolution logits.

    Args:
      ctx: the step context.
      logits: `[B, H, W, C]` float32 teacher logits at image resolution.
      pad: `[B, H, W]` bool.
      hidden: `[B, H, W]` the hidden ground truth aligned with `logits`, or None.
      metrics: dict updated in place with the diagnostics (pooled over calls per prefix).
      prefix: diagnostics name.

    Returns:
      `(labels, mask, aux)` from the rule.
    """
    labels, mask, aux = self.rule(logits, pad, ctx.step)
    if self.oracle:
      if hidden is None:
        raise ValueError("config.diagnostics.oracle_pseudo_labels needs unlabeled images with "
                         "ground truth (the embedded data, or a folder with unlabeled masks)")
      labels, mask, _ = diagnostics.oracle_labels(hidden, valid=~pad)
    if hidden is not None and self.measure:
      found = diagnostics.pseudo_label_metrics(labels, mask, jnp.where(pad, ops.IGNORE_INDEX,
                                                                       hidden),
                                               num_classes=logits.shape[-1], prefix=prefix)
      metrics.update(diagnostics.merge(metrics, found))
    return labels, mask, aux

  def strong_view(self, ctx: base.StepContext, images: jax.Array, pad: jax.Array,
                  carry: Any = None, *, preset: str, cutmix: str, cutmix_prob: float,
                  keys: Sequence[str], cutmix_ratio: float = 2.0):
    """Photometric augmentation, then CutMix with the batch rolled by one image.

    Whatever travels in `carry` (pseudo-labels, masks, teacher logits, hidden labels: any
    pytree of `[B, H, W, ...]` arrays) is mixed with the same box, so each pixel keeps the
    values of the image it came from; padding travels with its pixels.

    Args:
      ctx: the step context.
      images: `[B, H, W, 3]`; pad: `[B, H, W]` bool.
      carry: pytree mixed along with the images.
      preset: photometric preset (`photometric.PRESETS`; 'none' skips it).
      cutmix: 'none', 'per_image' (UniMatch/DSSN: a box of random area and aspect with
        probability p per image) or 'per_batch' (U2PL/DGCL: a box of 1/ratio of the image
        in every image, the whole batch mixed with probability p).
      cutmix_prob: p.
      keys: names of the random streams `(photometric, cutmix[, cutmix_prob])`, so that a
        recipe keeps its draws when code elsewhere changes.
      cutmix_ratio: per_batch box area = image / ratio.

    Returns:
      `(StrongView without labels, mixed carry, aux)`; aux has `cutmix_applied` for
      'per_batch'.
    """
    aux = {}
    if preset != "none":
      images = photometric.strong_augment(ctx.key(keys[0]), images, preset=preset, valid=~pad)
    b, h, w = pad.shape
    if cutmix == "none":
      box = jnp.zeros(pad.shape, bool)
      return StrongView(images=images, pad=pad, box=box), carry, aux
    if cutmix == "per_image":
      box = mix.cutmix_box(ctx.key(keys[1]), b, h, w, p=cutmix_prob)
    elif cutmix == "per_batch":
      box = mix.cutmix_box_u2pl(ctx.key(keys[1]), b, h, w, ratio=cutmix_ratio)
      box, applied = mix.apply_batch_prob(ctx.key(keys[2]), box, p=cutmix_prob)
      aux["cutmix_applied"] = applied.astype(jnp.float32)
    else:
      raise ValueError(f"cutmix={cutmix!r}; expected one of {CUTMIX}")
    images, carry, pad = mix.mix(box, (images, carry, pad),
                                 mix.roll_batch((images, carry, pad)))
    return StrongView(images=images, pad=pad, box=box), carry, aux

  def hidden_labels(self, ctx: base.StepContext) -> Optional[jax.Array]:
    """The unlabeled batch's hidden ground truth (padding -> ignore), or None."""
    if ctx.hidden_labels is None:
      return None
    return jnp.where(ctx.batch["unlabeled"]["pad"], ops.IGNORE_INDEX, ctx.hidden_labels)

  @staticmethod
  def loss_metrics(loss_sup, loss_unsup, weight, sup_aux: Dict, unsup_aux: Dict, pl_aux: Dict,
                   view_aux: Dict) -> Dict:
    """The metrics every teacher-student recipe logs for its supervised and pseudo-label losses
    (plus the rule's and strong view's optional ones)."""
    metrics = {"loss_sup": loss_sup, "loss_unsup": loss_unsup, "unsup_weight": weight,
               "sup_selected_ratio": sup_aux["selected_ratio"],
               "pseudo_label_ratio": unsup_aux["selected_ratio"],
               "teacher_confident_ratio": pl_aux["selected_ratio"]}
    for name, aux, key in (("pseudo_drop_percent", pl_aux, "drop_percent"),
                           ("teacher_mean_confidence", pl_aux, "mean_confidence"),
                           ("cutmix_applied", view_aux, "cutmix_applied")):
      if key in aux:
        metrics[name] = aux[key]
    return metrics

  def apply_terms(self, ctx: base.StepContext, views: Views, metrics: Dict):
    """Runs the extra terms; returns `(weighted sum, extras by term name)`."""
    total, extras = jnp.zeros((), jnp.float32), {}
    for t in self.extra:
      if t.needs_weak and views.student_unlabeled is None:
        raise ValueError(f"term {t.name!r} needs the student's outputs on the weak unlabeled "
                         f"images, which {self.name}'s student pass does not compute")
      value, term_metrics, term_extras = t.loss(ctx, views)
      total = total + t.weight * value
      metrics.update(term_metrics)
      if t.has_state:
        extras[t.name] = term_extras
    return total, extras
