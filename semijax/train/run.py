"""The run object and its builders: data, method, model, optimizer, state, evaluation.

`Run(config, workdir)` builds everything a run needs without reading a record or writing a
file; `prepare` adds every check that can refuse a run (config, workdir, batches, data, an
existing checkpoint), in an order that writes nothing. Also used by evaluate and predict.
"""

import functools
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semijax import checkpoint, methods, parallel
from semijax.data import datasets, pipeline, validation
from semijax.eval import inference
from semijax.methods import base as method_base
from semijax.models import registry as model_registry
from semijax.train import schedules, state as state_lib, step as step_lib
from semijax.train.config_checks import ConfigError, as_config_error, check_config


def build_model(config, num_classes: int, method, *, bn_batch_groups: int = 1):
  """The segmenter named by `config.model`, with the method's heads attached.

  `bn_batch_groups` > 1 gives every BatchNorm per-group statistics (`train.sync_bn=False`,
  see `parallel.bn_groups_per_forward`).
  """
  kwargs = dict(config.model.kwargs.to_dict()) if config.model.get("kwargs") else {}
  if "bn_batch_groups" in kwargs or "bn_axis_name" in kwargs:
    raise ValueError("config.model.kwargs sets a BatchNorm synchronisation field; use "
                     "train.sync_bn and train.bn_groups instead")
  if bn_batch_groups > 1:
    kwargs["bn_batch_groups"] = bn_batch_groups
  if config.model.get("remat", "none") != "none":
    kwargs["remat"] = config.model.remat
  return model_registry.build_model(config.model.name, num_classes=num_classes,
                                    dtype=config.model.dtype, heads=method.heads(num_classes),
                                    **kwargs)


def _eval_images(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  return {"image": batch["image"].astype(np.float32) / 255.0,
          "label": batch["label"].astype(np.int32), "valid": batch["valid"]}


def make_optimizer(config, model):
  """The configured optimizer (its per-parameter LR multipliers need the parameter tree)."""
  size = config.data.crop_size
  params_shape = jax.eval_shape(
      lambda rng: step_lib.init_variables(model, rng, (1, size, size, 3)), jax.random.key(0))
  return schedules.make_optimizer(
      name=config.optim.name, base_lr=config.optim.base_lr,
      total_steps=config.train.total_steps, head_lr_mult=config.optim.head_lr_mult,
      momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
      power=config.optim.power, warmup_steps=config.optim.warmup_steps,
      params=params_shape[0])


def init_train_state(model, tx, method, rng, *, num_classes: int,
                     crop_size: int) -> state_lib.TrainState:
  """A fresh TrainState: model variables, optimizer state, teacher copy, method state."""
  params, batch_stats = step_lib.init_variables(model, rng, (1, crop_size, crop_size, 3))
  outputs = jax.eval_shape(
      lambda: model.apply({"params": params, "batch_stats": batch_stats},
                          np.zeros((1, crop_size, crop_size, 3), np.float32), train=False))
  method_state = method.init_state(jax.random.fold_in(rng, 1), num_classes=num_classes,
                                   outputs=outputs)
  return state_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                     batch_stats=batch_stats, method_state=method_state)


class Run:
  """Everything a run needs, built once from the config (also used by evaluate/predict).

  Building it reads no record and writes nothing: data sources are listed (split lists,
  missing files) and the model and optimizer are constructed.
  """

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    try:
      self.mesh = parallel.make_mesh(config.train.num_devices or None)
    except ValueError as e:
      raise ConfigError(f"config.train.num_devices={config.train.num_devices}: {e}") from e
    with as_config_error():
      self.data = datasets.build(config.data)
      self.info = self.data.info
      self.method = methods.get(config.method.name)(config, self.info)
      self.grad_accum_steps = int(config.train.get("grad_accum_steps", 1) or 1)
      self.bn_groups = parallel.bn_groups_per_forward(
          sync_bn=bool(config.train.get("sync_bn", True)),
          bn_groups=int(config.train.get("bn_groups", 0) or 0),
          recipe_gpus=int(config.get("recipe", {}).get("gpus", 0) or 0),
          num_devices=self.mesh.devices.size, grad_accum_steps=self.grad_accum_steps)
      self.model = build_model(config, self.info.num_classes, self.method,
                               bn_batch_groups=self.bn_groups)
    self.tx = make_optimizer(config, self.model)
    self.logits_fn = functools.partial(_logits, self.model)
    self.predict = jax.jit(self.logits_fn)   # `(variables, images) -> logits`, for figures
    self._state_shapes = None

  def _init(self, rng) -> state_lib.TrainState:
    return init_train_state(self.model, self.tx, self.method, rng,
                            num_classes=self.info.num_classes,
                            crop_size=self.config.data.crop_size)

  def state_shapes(self) -> state_lib.TrainState:
    """The abstract TrainState (shapes and dtypes; nothing is computed)."""
    if self._state_shapes is None:
      self._state_shapes = jax.eval_shape(self._init, jax.random.key(self.config.seed))
    return self._state_shapes

  def init_state(self) -> state_lib.TrainState:
    """Fresh state (pretrained backbone loaded if configured), replicated on the mesh."""
    config = self.config
    state = jax.jit(self._init, out_shardings=parallel.replicated(self.mesh))(
        jax.random.key(config.seed))
    source = _pretrained_source(config.model.pretrained)
    if source is not None:
      from semijax.models import weights  # pylint: disable=g-import-not-at-top
      with as_config_error():
        params, batch_stats, report = weights.load_backbone(
            source, state.params, state.batch_stats, stem=self.model.backbone.stem,
            strict=False)
      if report.missing or report.shape_mismatch or not report.loaded:
        raise ConfigError(
            f"config.model.pretrained={config.model.pretrained!r} ({source}) does not fit "
            f"the backbone of {config.model.name} (model.kwargs {dict(config.model.kwargs)}): "
            f"{report.summary()}")
      logging.info("pretrained backbone %s: %s", source, report.summary())
      # The teacher starts as a copy: one buffer in two state fields cannot be donated.
      state = state.replace(params=params, batch_stats=batch_stats,
                            ema_params=jax.tree.map(jnp.copy, params),
                            ema_batch_stats=jax.tree.map(jnp.copy, batch_stats))
      state = jax.device_put(state, parallel.replicated(self.mesh))
    return state

  def meta(self) -> Dict[str, Any]:
    """What a checkpoint must match to be restored into this run."""
    shapes = self.state_shapes()
    return {"model": self.config.model.name, "method": self.config.method.name,
            "dataset": self.config.data.dataset, "num_classes": self.info.num_classes,
            "crop_size": self.config.data.crop_size, "optimizer": self.config.optim.name,
            "num_params": state_lib.num_params(shapes.params),
            "state_fingerprint": checkpoint.state_fingerprint(shapes)}

  def check_batches(self) -> None:
    """Global batches must split evenly over micro-batches, devices and BatchNorm groups."""
    config = self.config
    train = dict(grad_accum_steps=self.grad_accum_steps, bn_groups=self.bn_groups)
    for what, b, kw in (("data.labeled_batch", config.data.labeled_batch, train),
                        ("data.unlabeled_batch", config.data.unlabeled_batch
                         if self.method.uses_unlabeled else 0, train),
                        ("data.eval_batch", config.data.eval_batch, {})):
      if b:
        try:
          parallel.check_batch_divisible(b, self.mesh, what, **kw)
        except ValueError as e:
          raise ConfigError(str(e)) from e

  def describe(self) -> str:
    """The data-parallel layout in one line (printed at the start of a run)."""
    config = self.config
    return parallel.describe(
        self.mesh, config.data.labeled_batch,
        config.data.unlabeled_batch if self.method.uses_unlabeled else 0,
        grad_accum_steps=self.grad_accum_steps, bn_groups=self.bn_groups)

  def check_data(self, *, full: bool = False) -> Dict[str, int]:
    """Reads the data up front (`validation.check_data`); raises `DataError` naming a file."""
    return validation.check_data(self.data, full=full)

  def evaluate(self, params, batch_stats, *, mode: Optional[str] = None) -> Dict[str, Any]:
    """mIoU on the val source with the configured protocol."""
    cfg = self.config.eval
    # Global arrays sharded over the mesh: each device scores its rows, and with several
    # processes every process contributes its own rows to one confusion matrix.
    batches = (parallel.put_batch(_eval_images(b), self.mesh) for b in pipeline.eval_batches(
        self.data.val, global_batch=self.config.data.eval_batch,
        size=tuple(self.config.data.eval_size) if self.config.data.eval_size else None,
        process_index=jax.process_index(), process_count=jax.process_count()))
    return inference.evaluate(
        self.logits_fn, batches, self.info.num_classes, mode=mode or cfg.mode,
        window=cfg.window or None, stride=cfg.stride or None, crop=cfg.crop or None,
        variables={"params": params, "batch_stats": batch_stats})


def _pretrained_source(value: str) -> Optional[str]:
  """`model.pretrained`: '' / 'none' -> None, 'embedded' -> the shipped weights, else a path."""
  if value in ("", "none"):
    return None
  from semijax.models import pretrained  # pylint: disable=g-import-not-at-top
  if value in pretrained.NAMES:
    return pretrained.path(value)
  if not os.path.isfile(value):
    raise ConfigError(f"config.model.pretrained={value!r}: no such file; expected a "
                      f".pth/.safetensors backbone, one of {list(pretrained.NAMES)} or 'none'")
  return value


def _logits(model, variables, images):
  outputs = model.apply(variables, images, train=False)
  return method_base.upsample_logits(outputs, images.shape[1:3])


def existing_checkpoint(run: Run, workdir: str) -> Optional[int]:
  """The latest checkpoint step in `workdir` after checking it belongs to this run (read-only).

  Raises:
    CheckpointMismatchError: the checkpoint is of another model, method, dataset or state, or
      was trained with a config that differs in a field that changes the result (listed).
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is not None:
      ckpt.check_compatible(step, run.meta())
      checkpoint.check_resume_config(workdir, run.config)
    return step
  finally:
    ckpt.manager.close()


def prepare(config, workdir: str, *, full_data_check: bool = False):
  """Every check that can refuse a run, in an order that writes nothing.

  Returns:
    `(run, latest checkpoint step or None, {source: records checked})`.

  Raises:
    ConfigError, DataError (naming the file), CheckpointMismatchError, WorkdirError.
  """
  check_config(config)
  checkpoint.check_workdir(workdir)   # cheap: fail before reading the data
  run = Run(config, workdir)
  run.check_batches()
  checked = run.check_data(full=full_data_check)
  resume = existing_checkpoint(run, workdir)
  return run, resume, checked
