"""Extra loss terms any teacher-student method can add, selected by `config.method.terms`.

A term reads what the method's stages computed (`teacher_student.Views`), may own model heads
and state (a memory bank) and has its own config block `config.<term name>` with a `weight`:

    L = L_sup + w(t) (lambda_u L_unsup + sum_k weight_k L_k)

Each paper's extra term is here once and its recipe runs it by default, e.g. DGCL's recipe is
mean-teacher-like weak-to-strong training plus `dgcl_contrast`; mean teacher with DGCL's
contrast, or DGCL with DSSN's consistency, is a config switch:

    --config=experiments/configs/mean_teacher.py:split=1/16,terms=dgcl_contrast
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from semijax import ops
from semijax.augment import feature
from semijax.losses import consistency, contrastive
from semijax.methods import base, diagnostics, registry
from semijax.models import heads as heads_lib
from semijax.pseudo import entropy
from semijax.sampling import dgcl as dgcl_sampling


class Term:
  """An extra term bound to a run's config; `config[name]` is its block (with `weight`).

  Class attributes:
    name: registry name and config block name.
    needs_weak: reads the student's outputs on the weak unlabeled images
      (`Views.student_unlabeled`); recipes then include them in their student pass.
    has_state: owns state in `TrainState.method_state[name]` (`init_state`/`update_state`).
  """
  name = "base"
  needs_weak = False
  has_state = False

  def __init__(self, config, info=None):
    self.config = config
    self.info = info   # the dataset's `DatasetInfo`, if known (e.g. its background class)
    self.cfg = config[self.name]
    self.weight = self.cfg.weight

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    raise NotImplementedError

  @classmethod
  def smoke(cls, config) -> None:
    """Shrinks the term's settings for a smoke run."""
    del config

  def heads(self, num_classes: int) -> dict:
    del num_classes
    return {}

  def init_state(self, rng, *, num_classes, outputs):
    del rng, num_classes, outputs
    return {}

  def loss(self, ctx: base.StepContext, views) -> Tuple[jax.Array, Dict, Dict]:
    """`(unweighted loss, metrics, extras for update_state)`."""
    raise NotImplementedError

  def update_state(self, state, extras, rng, step):
    del extras, rng, step
    return state


def oracle_enabled(config) -> bool:
  """`config.diagnostics.oracle_pseudo_labels`: terms that label unlabeled pixels themselves
  must then use the hidden ground truth too."""
  diag = config.get("diagnostics")
  return bool(diag and diag.get("oracle_pseudo_labels"))


def build(name: str, config, info=None) -> Term:
  """The term `name`, bound to `config` (its block must be in the config) and the dataset."""
  cls = registry.get_term(name)
  if name not in config:
    raise ValueError(f"config.method.terms includes {name!r} but the config has no "
                     f"'{name}' block: select terms in the config argument (e.g. "
                     f"'...py:terms={name}'), which adds their blocks")
  return cls(config, info)


def default_config(name: str) -> ml_collections.ConfigDict:
  """The config block of term `name`."""
  return registry.get_term(name).default_config()


# --------------------------------------------------------------------------------------------
# DGCL: density-guided contrastive learning (Wang et al., CVPR 2023), eqs. 7-13.
# --------------------------------------------------------------------------------------------


@registry.register_term
class DGCLContrast(Term):
  """DGCL's L_contra on the student's projections of [x_l ; x_u], with its class bank.

  Contrastive labels: ground truth on x_l; on x_u the teacher's argmax at feature resolution
  with its own entropy filter alpha_t = max(alpha_0 (1 - progress), alpha_min) (official
  code; the paper has none: `contra_label_filter=False`). After the optimizer step the bank
  receives (features, projections, density) of [x_l ; x_u] under the same labels, once the
  semi-supervised phase has started (official).
  """
  name = "dgcl_contrast"
  needs_weak = True
  has_state = True

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.weight = 0.5                     # lambda_c (paper 1; official effective weight 0.5 / #GPUs)
    c.contra_label_filter = True       # separate entropy filter for contrastive labels (official)
    c.drop_percent = 80.0              # alpha_0: drop max(alpha_0 (1 - progress), alpha_min) %
    c.drop_min = 10.0                  # alpha_min
    c.steps_per_epoch = 0              # >0: progress advances per epoch (official)
    c.projection_dim = 256             # projection width (Linear-BN-ReLU-Linear, decoder features)
    c.num_anchors = 200                # N_q lowest-density anchors per class (paper 256)
    c.num_batch_keys = 50              # highest-density positive keys from the batch (paper 256)
    c.num_bank_keys = 50               # highest-density positive keys from the bank (paper 256)
    c.num_negatives = 512              # R- random negatives from other classes of the batch
    c.temperature = 0.5                # tau
    c.ks = (8, 16, 32)                 # multi-scale kNN sizes of the density (eqs. 7-8)
    c.loss_form = "supcon"             # supcon: positive in denominator (official) | paper (eq 13)
    # The dataset's background class gets no anchors (official: class 0, also Cityscapes' road).
    c.exclude_background = True
    c.exclude_classes = ()             # further classes never used as anchors
    c.wait_for_full_bank = True        # loss is 0 until every class bank is full (official)
    c.bank_size = 10000                # bank capacity per class
    c.push_per_class = 1000            # pixels pushed per class per step (random subset)
    c.min_bank_size = 1000             # stored density is computed only above this fill (else 0)
    c.max_per_class = 10000            # candidate pixels per class per step (random subset)
    return c

  @classmethod
  def smoke(cls, config):
    c = config[cls.name]
    c.bank_size = 64
    c.push_per_class = 32
    c.min_bank_size = 32
    c.max_per_class = 256
    c.steps_per_epoch = min(c.steps_per_epoch, 1)

  def heads(self, num_classes):
    del num_classes
    return {"projection": heads_lib.PixelMLP(hidden=self.cfg.projection_dim,
                                             out=self.cfg.projection_dim, source="decoder")}

  def init_state(self, rng, *, num_classes, outputs):
    del rng
    return {"bank": dgcl_sampling.init_bank(
        num_classes, self.cfg.bank_size, feature_dim=outputs["decoder"].shape[-1],
        projection_dim=outputs["projection"].shape[-1])}

  def loss(self, ctx, views):
    cfg = self.cfg
    lab, unl = views.labeled, views.unlabeled
    s_lab, s_unl = views.student_labeled, views.student_unlabeled
    feat_size = s_lab["decoder"].shape[1:3]
    gt_small = ops.resize_nearest(lab["label"], feat_size)
    t_small_probs = jax.nn.softmax(views.teacher_logits, axis=-1)
    pad_small = ops.resize_nearest(unl["pad"], feat_size)
    alpha = entropy.dgcl_contrastive_drop_percent(
        ctx.step, alpha0=cfg.drop_percent, alpha_min=cfg.drop_min,
        start_step=self.config.train.supervised_warmup_steps,
        total_steps=self.config.train.total_steps, steps_per_epoch=cfg.steps_per_epoch or None)
    if oracle_enabled(self.config) and ctx.hidden_labels is not None:
      # The oracle switch: the true masks instead of the teacher's labels (diagnostics).
      u_small = ops.resize_nearest(jnp.where(unl["pad"], ops.IGNORE_INDEX, ctx.hidden_labels),
                                   feat_size)
    elif cfg.contra_label_filter:
      u_small, _, _ = entropy.filtered_pseudo_labels(t_small_probs, ~pad_small,
                                                     drop_percent=alpha)
    else:
      u_small = jnp.where(pad_small, ops.IGNORE_INDEX,
                          jnp.argmax(t_small_probs, -1).astype(jnp.int32))
    labels = jnp.concatenate([gt_small, u_small])
    projections = jnp.concatenate([s_lab["projection"], s_unl["projection"]])
    features = jax.lax.stop_gradient(jnp.concatenate(
        [s_lab["decoder"], s_unl["decoder"]])).astype(jnp.float32)
    bank = ctx.method_state[self.name]["bank"]
    loss, aux = contrastive.dgcl_contrastive_loss(
        projections, features, labels, bank, ctx.key("contrastive"),
        num_anchors=cfg.num_anchors, num_batch_keys=cfg.num_batch_keys,
        num_bank_keys=cfg.num_bank_keys, num_negatives=cfg.num_negatives,
        max_per_class=cfg.max_per_class, ks=tuple(cfg.ks),
        temperature=cfg.temperature, form=cfg.loss_form,
        exclude_classes=self.excluded_classes(), wait_for_full_bank=cfg.wait_for_full_bank)
    selection = aux.pop("selection", None)
    metrics = {"loss_contra": loss, "contra_drop_percent": alpha,
               "contra_label_ratio": jnp.mean((u_small != ops.IGNORE_INDEX).astype(jnp.float32))}
    metrics.update({f"dgcl/{k}": v for k, v in aux.items()})
    metrics.update(bank_metrics(bank))
    if selection is not None and ctx.hidden_labels is not None:
      metrics.update(_selection_diagnostics(selection, labels, ctx.hidden_labels, unl["pad"],
                                            gt_small, feat_size))
    extras = {"features": features, "projections": jax.lax.stop_gradient(projections),
              "labels": labels}
    return loss, metrics, extras

  def excluded_classes(self) -> Tuple[int, ...]:
    """Classes that get no anchors: the dataset's background (from its metadata, never a
    hard-coded id; none for a dataset without one) and `exclude_classes`."""
    out = tuple(int(c) for c in self.cfg.exclude_classes)
    background = getattr(self.info, "background_class", None)
    if self.cfg.exclude_background and background is not None and background not in out:
      out = (int(background),) + out
    return out

  def update_state(self, state, extras, rng, step):
    cfg = self.cfg
    bank = dgcl_sampling.push_bank(
        state["bank"], extras["features"], extras["projections"].astype(jnp.float32),
        extras["labels"], rng, push_per_class=cfg.push_per_class, ks=tuple(cfg.ks),
        min_bank_size=cfg.min_bank_size)
    # The bank starts filling once the semi-supervised phase starts (official).
    started = step >= self.config.train.supervised_warmup_steps
    return {"bank": jax.tree.map(lambda new, old: jnp.where(started, new, old), bank,
                                 state["bank"])}


def bank_metrics(bank, prefix: str = "bank") -> Dict:
  """Fill level of a class bank: mean, number of full classes, and per class."""
  fill = bank.count.astype(jnp.float32) / bank.capacity
  out = {f"{prefix}/fill_mean": jnp.mean(fill), f"{prefix}/full_classes": jnp.sum(fill >= 1.0)}
  out.update({f"{prefix}/fill_class_{c}": fill[c] for c in range(fill.shape[0])})
  return out


def _selection_diagnostics(selection, labels, hidden, pad, gt_small, feat_size) -> Dict:
  """Share of DGCL's anchors, batch keys and negatives from x_u whose label is right."""
  hidden_small = ops.resize_nearest(jnp.where(pad, ops.IGNORE_INDEX, hidden), feat_size)
  truth = jnp.concatenate([gt_small, hidden_small]).reshape(-1)
  n_l = gt_small.size
  from_unlabeled = jnp.arange(truth.shape[0]) >= n_l
  flat = labels.reshape(-1)
  out = {}
  for name, idx, valid in (("anchors", selection.anchor_idx, selection.anchor_valid),
                           ("positive_keys", selection.batch_key_idx, selection.batch_key_valid),
                           ("negatives", selection.negative_idx, selection.negative_valid)):
    out.update(diagnostics.selection_metrics(idx, valid, flat, truth, from_unlabeled,
                                             name=f"contrast/{name}"))
  return out


# --------------------------------------------------------------------------------------------
# DSSN: dual-level siamese structure (Tian et al., ACM MM 2023), eqs. 10, 14, 18-19.
# --------------------------------------------------------------------------------------------


def feature_perturbed_decode(ctx: base.StepContext, features: Dict[str, jax.Array], *,
                             rate: float, levels=("layer1", "layer4")) -> Dict[str, jax.Array]:
  """DSSN's feature-level siamese views: decode clean + two channel-dropout copies at once.

  The encoder features of n images are decoded in one BatchNorm batch `[clean ; fp1 ; fp2]`,
  the two perturbed copies with independent `Dropout2d(rate)` masks on the low- and
  high-level features (official `voc/DSSN.py`).

  Returns:
    The output dict of `ctx.student(..., method='decode')` over the `3 n` rows.
  """
  k1, k2 = jax.random.split(ctx.key("feature_dropout"))
  perturbed = {}
  for name, value in features.items():
    if name in levels:
      perturbed[name] = jnp.concatenate([
          value, feature.channel_dropout(k1, value, rate=rate),
          feature.channel_dropout(k2, value, rate=rate)])
    else:
      perturbed[name] = jnp.concatenate([value] * 3)
  return ctx.student(perturbed, method="decode")


@registry.register_term
class DSSNImageConsistency(Term):
  """DSSN's image-level siamese consistency L_cl^ls (eq. 10) between two strong views.

  Needs a recipe with two strong views (`dssn` has them; `mean_teacher.strong_views=2`).
  """
  name = "dssn_image_consistency"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.weight = 0.01                    # gamma_1
    c.form = "standardized_mse"        # standardized_mse (official) | l2 (paper eq. 10)
    return c

  def loss(self, ctx, views):
    if len(views.strong) < 2:
      raise ValueError(f"term {self.name!r} needs two strong views (e.g. "
                       "--config.mean_teacher.strong_views=2)")
    value, _ = consistency.logit_consistency_loss(views.strong[0].logits, views.strong[1].logits,
                                                  form=self.cfg.form)
    return value, {"loss_cl_image": value}, {}


@registry.register_term
class DSSNFeatureLevel(Term):
  """DSSN's feature-level siamese branch (eqs. 14, 18-19) as a term for other recipes.

  The student's encoder features of the weak unlabeled images are decoded clean and with two
  channel-dropout perturbations; the clean prediction, selected by the run's pseudo-label rule,
  teaches both perturbed ones (weak-to-strong CE, weight `w2s_weight`), and the two are pulled
  together (L_cl^hs, weight `consistency_weight`). The term's own forward pass costs one
  encoder and three decoder passes over the unlabeled batch.
  """
  name = "dssn_feature_level"

  @classmethod
  def default_config(cls):
    c = ml_collections.ConfigDict()
    c.weight = 1.0                     # the two weights below are DSSN's gamma_2 and gamma_1
    c.w2s_weight = 0.25                # gamma_2: CE of the perturbed views
    c.consistency_weight = 0.01        # gamma_1: L_cl^hs
    c.dropout = 0.5                    # Dropout2d rate on layer1 and layer4 features
    c.form = "standardized_mse"        # standardized_mse (official) | l2 (paper eq. 14)
    return c

  def loss(self, ctx, views):
    from semijax.methods import pseudo_labels  # pylint: disable=g-import-not-at-top
    cfg, size = self.cfg, views.size
    pad = views.unlabeled["pad"]
    feats = ctx.student(views.unlabeled["image"], method="encode")
    decoded = feature_perturbed_decode(ctx, feats, rate=cfg.dropout)
    clean, fp1, fp2 = jnp.split(base.upsample_logits(decoded, size), 3)
    clean = jax.lax.stop_gradient(clean).astype(jnp.float32)
    labels, mask, aux = pseudo_labels.build(self.config)(clean, pad, ctx.step)
    l1, _ = consistency.weak_to_strong_loss(fp1, labels, mask, valid=~pad)
    l2, _ = consistency.weak_to_strong_loss(fp2, labels, mask, valid=~pad)
    cl, _ = consistency.logit_consistency_loss(fp1, fp2, form=cfg.form)
    value = cfg.w2s_weight * (l1 + l2) + cfg.consistency_weight * cl
    return value, {"loss_w2s_feature": l1 + l2, "loss_cl_feature": cl,
                   "pseudo_label_ratio_feature": aux["selected_ratio"]}, {}
