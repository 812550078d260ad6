"""What a method is: a loss over a step's batch plus an optional state update (banks).

A method is a plugin (`semijax.methods.registry`): one class, registered with one line
(`@registry.register`), that owns

* its config block (`default_config()`, merged into the run config under the method's name),
  its smoke shrink (`smoke(config)`) and the extra terms it runs by default (`terms`);
* its extra model heads (`heads`) and its state (`init_state`, e.g. banks);
* its data needs: a host transform for the unlabeled stream (`unlabeled_transform`) and the
  extra batch fields that reach its `StepContext` unchanged (`batch_fields`);
* the loss (`loss(ctx) -> (loss, metrics, extras)`) and the state update after the optimizer
  step (`update_state`).

A method never sees the optimizer or the device mesh. The trainer gives it a `StepContext`
with the batch, the step's random key and two forward functions (student, with gradients
and BatchNorm updates; EMA teacher, without), and after the optimizer step calls
`update_state` with whatever the loss returned in `extras`.
"""

import dataclasses
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from semijax import ops

PyTree = Any
Metrics = Dict[str, jax.Array]


@dataclasses.dataclass
class StepContext:
  """One step's inputs, handed to `Method.loss` (inside `jax.grad`).

  Attributes:
    batch: `{'labeled': {...}, 'unlabeled': {...}}`; images float32 in [0, 1]
      `[B, H, W, 3]`, labels int32 `[B, H, W]` (255 ignore; the unlabeled part has none),
      `pad` bool `[B, H, W]`, plus the method's `batch_fields` as the pipeline gave them.
    rng: this step's key, `fold_in(key(seed), step)`.
    step: int32 scalar (traced).
    method_state: the method's state before this step (banks to read).
    student_fn: `(variables, images, train, rngs, **kwargs) -> (outputs, new_batch_stats)`.
    teacher_fn: `(images, **kwargs) -> (outputs, new_teacher_batch_stats)`.
    params, batch_stats: the student's variables (`params` is what is differentiated).
    hidden_labels: ground truth of the unlabeled images `[B, H, W]` int32 (255 where
      unknown), or None. Only for diagnostics (`semijax.methods.diagnostics`) and the oracle
      switch (`config.diagnostics.oracle_pseudo_labels`): a loss never reads it otherwise
      (tested: the loss and its gradient do not depend on it).
  """
  batch: Dict[str, Dict[str, jax.Array]]
  rng: jax.Array
  step: jax.Array
  method_state: PyTree
  params: PyTree
  batch_stats: PyTree
  student_fn: Callable
  teacher_fn: Callable
  teacher_batch_stats: PyTree = None
  hidden_labels: Optional[jax.Array] = None
  _calls: int = 0

  def key(self, name: str) -> jax.Array:
    """A key for one purpose, stable across code changes elsewhere in the step."""
    # zlib.crc32, not hash(): str hashes change between processes.
    return jax.random.fold_in(self.rng, zlib.crc32(name.encode()) % (2 ** 31))

  def student(self, images: Any, *, train: bool = True, **kwargs) -> Dict[str, jax.Array]:
    """Student forward; successive calls chain the BatchNorm running statistics."""
    self._calls += 1
    rngs = {"dropout": jax.random.fold_in(self.key("dropout"), self._calls)}
    outputs, self.batch_stats = self.student_fn(
        {"params": self.params, "batch_stats": self.batch_stats}, images, train, rngs,
        **kwargs)
    return outputs

  def teacher(self, images: jax.Array, **kwargs) -> Dict[str, jax.Array]:
    """EMA teacher forward (no gradient); BN mode is the method's `teacher_bn`."""
    outputs, self.teacher_batch_stats = self.teacher_fn(images, self.teacher_batch_stats,
                                                        **kwargs)
    return jax.tree.map(jax.lax.stop_gradient, outputs)


class Method:
  """Base class; subclasses set the class attributes and override `loss`.

  Class attributes:
    name: registry name; also the name of the method's config block.
    uses_unlabeled: whether the step needs an unlabeled batch.
    teacher_bn: 'ema' (teacher in eval mode with EMA'd BN statistics: mean teacher, DSSN) or
      'batch' (teacher in train mode using batch statistics and keeping its own running
      statistics, as U2PL/DGCL/CSC).
    terms: names of the extra terms (`semijax.methods.terms`) the recipe runs by default;
      `config.method.terms` selects them per run.
    batch_fields: extra record fields of the unlabeled stream (made by `unlabeled_transform`)
      that reach `StepContext.batch['unlabeled']` unchanged.
  """
  name: str = "base"
  uses_unlabeled: bool = True
  teacher_bn: str = "ema"
  terms: Tuple[str, ...] = ()
  batch_fields: Tuple[str, ...] = ()

  def __init__(self, config, info=None):
    self.config = config
    self.info = info   # the dataset's `DatasetInfo` (class names, background, ignore), if known

  # -- Config (class level: needed before a run is built). ----------------------------------

  @classmethod
  def default_config(cls):
    """The method's config block (an `ml_collections.ConfigDict`), or None for none."""
    return None

  @classmethod
  def smoke(cls, config) -> None:
    """Shrinks the method's own settings for a seconds-long smoke run (tests, CI)."""
    del config

  # -- Model, state and data. ----------------------------------------------------------------

  def heads(self, num_classes: int) -> dict:
    """Extra per-pixel heads (`semijax.models.heads`) to attach to the segmenter."""
    del num_classes
    return {}

  def init_state(self, rng: jax.Array, *, num_classes: int, outputs: Dict[str, Any]) -> PyTree:
    """Initial method state (e.g. empty banks); `outputs` are the model's output shapes."""
    del rng, num_classes, outputs
    return {}

  def unlabeled_transform(self, default):
    """The host transform of the unlabeled stream (a grain `RandomMap`); default: `default`,
    the labeled stream's geometric augmentation."""
    return default

  # -- The step. -----------------------------------------------------------------------------

  def loss(self, ctx: StepContext) -> Tuple[jax.Array, Metrics, PyTree]:
    """Returns `(total_loss, metrics, extras)`; `extras` go to `update_state`."""
    raise NotImplementedError

  def update_state(self, method_state: PyTree, extras: PyTree, rng: jax.Array,
                   step: jax.Array) -> PyTree:
    """Method state after the optimizer step (bank pushes). Default: unchanged."""
    del extras, rng, step
    return method_state


def upsample_logits(outputs: Dict[str, jax.Array], size) -> jax.Array:
  """The model's stride-4 logits at input resolution (bilinear, align_corners=True)."""
  return ops.resize_bilinear(outputs["logits"], size, align_corners=True)


def schedule_weight(step: jax.Array, *, start: int, rampup: int = 0) -> jax.Array:
  """0 before `start`, then a linear ramp to 1 over `rampup` steps (1 at once if 0)."""
  t = jnp.asarray(step, jnp.float32) - start
  if rampup <= 0:
    return (t >= 0).astype(jnp.float32)
  return jnp.clip((t + 1.0) / rampup, 0.0, 1.0) * (t >= 0)


def supervised_loss(logits: jax.Array, labels: jax.Array, loss_config) -> Tuple[jax.Array, Metrics]:
  """The labeled-batch loss every method shares: CE, or OHEM CE (Cityscapes recipes).

  Args:
    logits: `[B, H, W, C]` at label resolution.
    labels: `[B, H, W]`.
    loss_config: `config.loss` (fields `supervised`, `ohem_thresh`, `ohem_min_kept`).
  """
  from semijax.losses import supervised  # pylint: disable=g-import-not-at-top
  if loss_config.supervised == "ce":
    return supervised.cross_entropy_loss(logits, labels)
  if loss_config.supervised == "ohem":
    return supervised.ohem_cross_entropy_loss(logits, labels, threshold=loss_config.ohem_thresh,
                                              min_kept=loss_config.ohem_min_kept)
  raise ValueError(f"config.loss.supervised={loss_config.supervised!r}; expected 'ce' or 'ohem'")
