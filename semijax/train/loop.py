"""`train_and_evaluate(config, workdir)`: the whole run, resumable, on 1..N devices/hosts.

Kept deliberately linear: validation (nothing is written until the config, the data, the
model and any checkpoint already in the workdir have been checked), set-up, (restore), the
step loop with periodic logging, evaluation and checkpoints, then the final evaluation,
results table and figure.

Crash safety, in one place (tests/train/test_crash_safety.py exercises each point):
- Everything that determines the future of a run is in the checkpoint: the TrainState
  (student, teacher, optimizer, BN statistics, banks, step, skipped-update count), the grain
  iterator state and the partial metric sums of the current logging window; randomness is
  `fold_in(key(seed), step)`. A run killed at any moment and rerun ends bitwise equal to an
  uninterrupted one (CPU), metrics.jsonl included (lines logged after the last checkpoint
  are dropped on resume).
- SIGTERM/SIGINT: a checkpoint is saved at the next step boundary and the run returns
  normally (exit status 0); a second signal aborts at once.
- A non-finite loss or gradient skips the update on device (`step.py`); the host looks at
  the skipped-update count only when it logs or saves. `train.nonfinite='stop'` raises
  `NonFiniteLossError` there, before saving, so the last checkpoint is the last good one.
"""

import contextlib
import difflib
import functools
import json
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semijax import checkpoint, methods, parallel
from semijax.data import datasets, pipeline, transforms, validation
from semijax.data.sources import DataError
from semijax.eval import inference, visualize
from semijax.methods import base as method_base
from semijax.models import registry as model_registry
from semijax.train import schedules, step as step_lib, writer as writer_lib
from semijax.train import state as state_lib


class NonFiniteLossError(FloatingPointError):
  """The loss or a gradient became NaN/inf and `train.nonfinite == 'stop'`."""


class ConfigError(ValueError):
  """A config field is unknown, of the wrong type, or has an invalid value (named)."""


# The errors a user fixes (bad input, full disk, diverged run), as opposed to bugs:
# the train command prints their message without a traceback.
USER_ERRORS = (ConfigError, DataError, checkpoint.CheckpointMismatchError,
               checkpoint.CheckpointSaveError, NonFiniteLossError)


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
  return model_registry.build_model(config.model.name, num_classes=num_classes,
                                    dtype=config.model.dtype, heads=method.heads(num_classes),
                                    **kwargs)


# ------------------------------------------------------------------------------------------
# Config checks.
# ------------------------------------------------------------------------------------------

# Free-form sub-configs: their keys are arguments of the component they configure, which
# checks them itself (e.g. `model.kwargs` goes to the backbone builder).
FREE_FORM = ("model.kwargs",)

_CHOICES = {
    "train.nonfinite": ("stop", "skip"),
    "ema.warmup": ("none", "u2pl", "cosine"),
    "eval.mode": ("whole", "center_crop", "sliding_window"),
    "optim.name": ("sgd", "adamw"),
    "data.dataset": datasets.DATASETS,
}
_AT_LEAST = {
    "train.total_steps": 1, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": 0, "train.keep_checkpoints": 1, "train.num_devices": 0,
    "train.grad_accum_steps": 1, "train.bn_groups": 0, "train.supervised_warmup_steps": 0,
    "data.labeled_batch": 1, "data.unlabeled_batch": 0, "data.eval_batch": 1,
    "data.crop_size": 1, "data.num_workers": 0,
}


def _type_name(x) -> str:
  return "a config dict" if hasattr(x, "keys") else type(x).__name__


def _same_kind(value, ref) -> bool:
  if ref is None or value is None:
    return True
  if hasattr(ref, "keys"):
    return hasattr(value, "keys")
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(ref, bool) and isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float))
  if isinstance(ref, int):
    return isinstance(value, int)
  if isinstance(ref, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(ref))


def _check_schema(config, reference, prefix: str = "") -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      raise ConfigError(
          f"unknown config field {name!r}" + (f" (did you mean {prefix + close[0]!r}?)"
                                             if close else "")
          + f"; valid fields{' of ' + prefix[:-1] if prefix else ''}: "
          f"{sorted(reference.keys())}")
    value, ref = config[key], reference[key]
    if not _same_kind(value, ref):
      raise ConfigError(f"config.{name}={value!r} is {_type_name(value)}; expected "
                        f"{_type_name(ref)} like the default {ref!r}")
    if hasattr(value, "keys") and name not in FREE_FORM:
      _check_schema(value, ref, name + ".")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def check_config(config, reference=None) -> None:
  """Raises `ConfigError` naming the first bad field of `config`.

  Args:
    config: the run config.
    reference: optional config holding every valid field with a value of the right type
      (`experiments/configs/base.py:get_config()`): a field it lacks is unknown (a close
      match is suggested), and a value of another type is refused (an int is accepted
      where a float is expected). Sub-configs in `FREE_FORM` are not compared.
  """
  if reference is not None:
    _check_schema(config, reference)
  for name, choices in _CHOICES.items():
    value = _get(config, name)
    if value is not None and value not in choices:
      raise ConfigError(f"config.{name}={value!r}; expected one of {list(choices)}")
  for name, low in _AT_LEAST.items():
    value = _get(config, name)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"config.{name}={value!r} is {_type_name(value)}; expected an integer")
    if value < low:
      raise ConfigError(f"config.{name}={value}; expected an integer >= {low}")


# ------------------------------------------------------------------------------------------
# Signals.
# ------------------------------------------------------------------------------------------


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries; a second signal aborts.

  With several processes every process must stop at the same step (else the others wait
  in the next step's collectives forever), so the flag is not set by a local signal but
  by JAX's preemption service (`jax.distributed`: a SIGTERM to any process is propagated
  and all agree on a step, `reached_preemption_sync_point`), polled with `poll(step)`;
  SIGINT keeps its default (the run aborts; resume from the last checkpoint).
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    self._multiprocess = jax.process_count() > 1

  def poll(self, step: int) -> bool:
    """Whether to stop after `step` (called by every process at every step boundary)."""
    if self._multiprocess and not self.requested:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:   # preemption service disabled (jax_enable_preemption_service)
        pass
      if self.requested and jax.process_index() == 0:
        print(f"[semijax] preemption notice: saving a checkpoint at step {step}", flush=True)
    return self.requested

  def __enter__(self):
    if self._multiprocess:
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # second signal: the previous behaviour (KeyboardInterrupt, exit)
      self.__exit__()
      signal.raise_signal(signum)
      return
    logging.warning("signal %d: saving a checkpoint at the next step boundary", signum)
    print(f"[semijax] signal {signum}: saving a checkpoint at the next step boundary, then "
          "exiting (send it again to abort now)", flush=True)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


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


@contextlib.contextmanager
def _as_config_error():
  """Builders refuse a bad config value with ValueError/TypeError; name them ConfigError."""
  try:
    yield
  except DataError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from e


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
    with _as_config_error():
      self.data = datasets.build(config.data)
      self.info = self.data.info
      self.method = methods.get(config.method.name)(config)
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
    if config.model.pretrained:
      from semijax.models import weights  # pylint: disable=g-import-not-at-top
      params, batch_stats, report = weights.load_backbone(
          config.model.pretrained, state.params, state.batch_stats,
          stem=self.model.backbone.stem, strict=False)
      logging.info("pretrained backbone %s: %s", config.model.pretrained, report.summary())
      state = state.replace(params=params, batch_stats=batch_stats, ema_params=params,
                            ema_batch_stats=batch_stats)
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


def _logits(model, variables, images):
  outputs = model.apply(variables, images, train=False)
  return method_base.upsample_logits(outputs, images.shape[1:3])


def _recipe_warnings(config, mesh) -> list:
  """Differences between this run's data-parallel layout and the recipe it reproduces.

  The global batch per optimizer step is `data.labeled_batch` whatever the number of
  devices, processes or micro-batches (`train.grad_accum_steps` splits it, it does not
  multiply it), so the device count alone never changes the result with SyncBN; what does
  is a different global batch or learning rate, and where BatchNorm statistics are taken.
  """
  recipe = config.get("recipe")
  if not recipe or not recipe.get("global_batch"):
    return []
  out = []
  ours = config.data.labeled_batch
  accum = int(config.train.get("grad_accum_steps", 1) or 1)
  gpus = recipe.get("gpus") or 0
  per_gpu = f" ({gpus} GPUs x {recipe.global_batch // gpus})" if gpus else ""
  if ours != recipe.global_batch:
    scaled = recipe.base_lr * ours / recipe.global_batch
    out.append(
        f"global labeled batch {ours} differs from the recipe's {recipe.global_batch}"
        f"{per_gpu}. Published numbers assume the recipe's batch: keep "
        f"data.labeled_batch={recipe.global_batch} (with train.grad_accum_steps to fit "
        f"memory) or scale the LR linearly to optim.base_lr={scaled:g}.")
  elif config.optim.base_lr != recipe.base_lr:
    out.append(f"optim.base_lr={config.optim.base_lr:g} differs from the recipe's "
               f"{recipe.base_lr:g} at the same global batch")
  sync = bool(config.train.get("sync_bn", True))
  if sync and accum > 1:
    out.append(
        f"with train.grad_accum_steps={accum} BatchNorm statistics are taken over micro-batches "
        f"of {ours // accum} labeled images, not over the global batch of {ours} as the "
        "recipe's SyncBN; the closer the micro-batch to the global batch the closer the run")
  if not sync:
    groups = int(config.train.get("bn_groups", 0) or 0) or gpus or (mesh.devices.size * accum)
    if gpus and groups != gpus:
      out.append(f"train.bn_groups={groups} BatchNorm groups per step differ from the recipe's "
                 f"{gpus} GPUs (unsynchronised BN: {ours // groups} vs "
                 f"{recipe.global_batch // gpus} images per statistic)")
  return out


def _existing_checkpoint(run: Run, workdir: str) -> Optional[int]:
  """The latest checkpoint step in `workdir` after checking it belongs to this run (read-only).

  Raises:
    CheckpointMismatchError: the checkpoint is of another model, method, dataset or state.
  """
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is not None:
      ckpt.check_compatible(step, run.meta())
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
  resume = _existing_checkpoint(run, workdir)
  return run, resume, checked


# ------------------------------------------------------------------------------------------
# Metric accumulation over a logging window (sums, except the first non-finite step: min).
# ------------------------------------------------------------------------------------------


def _merge(acc, metrics):
  if acc is None:
    return dict(metrics)
  return {k: (jnp.minimum if k == step_lib.FIRST_NONFINITE else jnp.add)(acc[k], v)
          for k, v in metrics.items()}


def _acc_to_json(acc, n: int) -> Optional[dict]:
  if acc is None or not n:
    return None
  host = jax.device_get(acc)
  return {"n": n, "sums": {k: [np.asarray(v).item(), str(np.asarray(v).dtype)]
                           for k, v in host.items()}}


def _acc_from_json(saved: Optional[dict], mesh):
  if not saved:
    return None, 0
  acc = {k: jnp.asarray(np.asarray(v, dtype=dt)) for k, (v, dt) in saved["sums"].items()}
  return jax.device_put(acc, parallel.replicated(mesh)), int(saved["n"])


def _nonfinite_message(first: Optional[int], upto: int, ckpt) -> str:
  where = (f"in the update of step {first + 1}" if first is not None
           else f"before step {upto}")
  return (f"non-finite loss or gradient {where}; that update was not applied and no later "
          f"checkpoint was written: the last good checkpoint (step {ckpt.latest_step()}) in "
          f"{ckpt.directory} is intact. Lower the learning rate (or resume from an earlier "
          "checkpoint), or set train.nonfinite='skip' to skip such updates.")


def train_and_evaluate(config, workdir: str, *, progress: bool = True,
                       max_steps: Optional[int] = None) -> Dict[str, Any]:
  """Trains (resuming from `workdir` when it holds a checkpoint), evaluates, summarises.

  Nothing is written until the config, the data (`Run.check_data`), the model and a
  checkpoint already in `workdir` have been checked, so a refused run leaves the workdir
  as it was (or not created).

  Args:
    config: the run config.
    workdir: checkpoints, logs and results go here.
    progress: show a progress bar (process 0).
    max_steps: stop after this many steps in this invocation (checkpoint saved), e.g. to
      fit a job's time limit; rerunning continues.

  Returns:
    The final results dict (also written to `workdir/results.json`), or
    `{'stopped_at': step}` when stopped early by `max_steps` or a signal.

  Raises:
    ConfigError, DataError, WorkdirError, CheckpointMismatchError: refused before writing.
    CheckpointSaveError: a checkpoint could not be written (e.g. full disk).
    NonFiniteLossError: `train.nonfinite='stop'` and an update was not finite.
  """
  t_start = time.time()
  # Signals during set-up are honoured at the first step boundary.
  with _Preemption() as preempt:
    run, resume, checked = prepare(config, workdir)
    if preempt.requested:
      print("[semijax] stopped (signal) before writing anything", flush=True)
      return {"stopped_at": resume or 0}
    # Every process has inspected the workdir (e.g. an existing checkpoint) before any
    # creates something there: else they could disagree on what they found.
    parallel.sync_processes("semijax:workdir_checked")
    checkpoint.prepare_workdir(workdir)   # the first write
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    opened = []   # the metric writer, once created
    try:
      out = _train(run, workdir, ckpt, preempt, checked, t_start, opened,
                   progress=progress, max_steps=max_steps)
      ckpt.close()   # raises CheckpointSaveError if the last save failed
      return out
    finally:
      for w in opened:
        w.close()
      try:
        ckpt.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # already closed, or the error being raised says more


def _train(run: Run, workdir: str, ckpt, preempt, checked, t_start, opened, *, progress,
           max_steps):
  config, cfg_t = run.config, run.config.train
  main = parallel.is_main_process()
  summary = [run.describe(),
             f"method {config.method.name}; model {config.model.name} ({config.model.dtype}); "
             f"{run.data.description} (checked: "
             f"{', '.join(f'{v} {k}' for k, v in checked.items())})",
             f"optimizer {config.optim.name} base lr {config.optim.base_lr:g} "
             f"(head x{config.optim.head_lr_mult:g}), {cfg_t.total_steps} steps"]
  recipe = config.get("recipe")
  if recipe and recipe.get("global_batch"):
    summary.append(f"recipe: global batch {recipe.global_batch} on {recipe.gpus or '?'} GPUs, "
                   f"base lr {recipe.base_lr:g}" + (f" ({recipe.source})" if recipe.source
                                                    else ""))
  if main:
    for line in summary:
      print(f"[semijax] {line}", flush=True)
    for w in _recipe_warnings(config, run.mesh):
      print(f"[semijax] WARNING: {w}", flush=True)

  state = run.init_state()
  data_state, acc, acc_n = None, None, 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state, meta = ckpt.restore(latest, state, run.meta())
    acc, acc_n = _acc_from_json(meta.get("train_accumulator"), run.mesh)
    if main:
      print(f"[semijax] resumed from {ckpt.directory} at step {int(state.step)}", flush=True)
  start = int(state.step)
  writer = writer_lib.MetricWriter(workdir, enabled=main,
                                   resume_step=start if latest is not None else None)
  opened.append(writer)
  if main and latest is None:
    writer.text(0, "config", "```\n" + str(config) + "\n```")
    checkpoint.atomic_write_text(os.path.join(workdir, "config.json"),
                                 checkpoint.config_fingerprint(config))

  augment = transforms.TrainAugment(crop_size=config.data.crop_size,
                                    scale_range=tuple(config.data.scale_range),
                                    base_size=config.data.base_size or None,
                                    flip=config.data.flip)
  # With every image labeled ("full"), the labeled images double as the unlabeled stream.
  unlabeled = (run.data.unlabeled or run.data.labeled) if run.method.uses_unlabeled else None
  ds = pipeline.semi_dataset(
      run.data.labeled, unlabeled,
      labeled_batch=config.data.labeled_batch,
      unlabeled_batch=config.data.unlabeled_batch if run.method.uses_unlabeled else 0,
      seed=config.seed, augment=augment, process_index=jax.process_index(),
      process_count=jax.process_count())
  it = pipeline.iterate(ds, num_workers=config.data.num_workers)
  it.set_state(data_state if data_state else {"next_index": start})

  jit_step = functools.partial(jax.jit, in_shardings=(parallel.replicated(run.mesh),
                                                      parallel.data_sharded(run.mesh)),
                               out_shardings=parallel.replicated(run.mesh), donate_argnums=0)
  p_step = jit_step(step_lib.make_train_step(run.model, run.method, config))
  warmup_steps = cfg_t.supervised_warmup_steps if run.method.uses_unlabeled else 0
  if warmup_steps > start:   # compiled only when some warm-up steps remain
    p_warmup = jit_step(step_lib.make_train_step(run.model, run.method, config, warmup=True))

  skipped_seen = int(jax.device_get(state.skipped_steps))
  history = {"val_miou": None, "best_val_miou": None}
  last_means = {}
  bar = None
  if main and progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=cfg_t.total_steps, initial=start, dynamic_ncols=True, unit="step",
               desc=config.method.name)

  def first_nonfinite(acc_host) -> Optional[int]:
    if acc_host is None or step_lib.FIRST_NONFINITE not in acc_host:
      return None
    value = int(acc_host[step_lib.FIRST_NONFINITE])
    return None if value == step_lib.NO_NONFINITE else value

  def stopped(done: int, why: str):
    ckpt.wait()
    if bar is not None:
      bar.close()
    if main:
      print(f"[semijax] stopped ({why}) at step {done}: latest checkpoint step "
            f"{ckpt.latest_step()} in {ckpt.directory}; rerun the same command to continue",
            flush=True)
    return {"stopped_at": done}

  if preempt.requested:   # a signal during set-up: nothing new to save
    return stopped(start, "signal")
  t_train = time.time()
  for step in range(start, cfg_t.total_steps):
    try:
      host_batch = next(it)
    except DataError as e:
      ckpt.wait()
      raise DataError(f"{e} (training stopped before step {step + 1}; the last checkpoint, "
                      f"step {ckpt.latest_step()}, is intact)") from e
    state, metrics = (p_warmup if step < warmup_steps else p_step)(
        state, parallel.put_batch(host_batch, run.mesh))
    if acc is not None and set(acc) != set(metrics):
      acc, acc_n = None, 0   # sums saved by a version with other metrics: a new window
    acc = _merge(acc, metrics)
    acc_n += 1
    done = step + 1
    last = done == cfg_t.total_steps
    if bar is not None:
      bar.update(1)

    # Not on preemption: the partial window's sums go into the checkpoint instead, so a
    # resumed run logs exactly the lines of an uninterrupted one.
    if done % cfg_t.log_every == 0 or last:
      host = jax.device_get(acc)
      first_bad = first_nonfinite(host)
      means = {k: float(v) / acc_n for k, v in host.items() if k != step_lib.FIRST_NONFINITE}
      acc, acc_n = None, 0
      skipped = int(jax.device_get(state.skipped_steps))
      means["skipped_steps"] = skipped
      last_means = means
      writer.scalars(done, means, prefix="train/")
      if skipped > skipped_seen:
        if cfg_t.nonfinite == "stop":
          ckpt.wait()
          raise NonFiniteLossError(_nonfinite_message(first_bad, done, ckpt))
        if main:
          print(f"[semijax] WARNING: non-finite loss or gradient: {skipped - skipped_seen} "
                f"update(s) skipped in steps {done - cfg_t.log_every + 1}..{done} (first: "
                f"step {first_bad + 1 if first_bad is not None else '?'}); {skipped} skipped "
                "in all", flush=True)
        skipped_seen = skipped
      if bar is not None:
        bar.set_postfix(_postfix(means, history), refresh=False)

    eval_now = cfg_t.eval_every and (done % cfg_t.eval_every == 0 or last)
    metrics_for_ckpt = None
    if eval_now:
      res = run.evaluate(state.ema_params, state.ema_batch_stats)
      history["val_miou"] = res["miou"] * 100
      history["best_val_miou"] = max(history["best_val_miou"] or 0.0, history["val_miou"])
      writer.scalars(done, {"miou": res["miou"] * 100, "pixel_accuracy": res["pixel_accuracy"]},
                     prefix="val_teacher/")
      if cfg_t.eval_student:
        res_s = run.evaluate(state.params, state.batch_stats)
        writer.scalars(done, {"miou": res_s["miou"] * 100}, prefix="val_student/")
      metrics_for_ckpt = {checkpoint.BEST_METRIC: res["miou"] * 100}
      if bar is not None:
        bar.set_postfix(_postfix(last_means, history), refresh=True)

    stop = preempt.poll(done) or (max_steps is not None and done - start >= max_steps)
    if (cfg_t.checkpoint_every and done % cfg_t.checkpoint_every == 0) or last or stop or \
        eval_now:
      if cfg_t.nonfinite == "stop" and int(jax.device_get(state.skipped_steps)) > skipped_seen:
        ckpt.wait()   # never save a state that followed a non-finite update
        raise NonFiniteLossError(_nonfinite_message(
            first_nonfinite(jax.device_get(acc)), done, ckpt))
      meta = dict(run.meta(), train_accumulator=_acc_to_json(acc, acc_n))
      ckpt.save(done, state, it.get_state(), meta, metrics_for_ckpt)
    if stop and not last:
      return stopped(done, "signal" if preempt.requested else f"max_steps={max_steps}")
  ckpt.wait()
  if bar is not None:
    bar.close()
  if preempt.requested:   # the last checkpoint is saved; the final report can wait
    return stopped(cfg_t.total_steps, "signal")
  train_seconds = time.time() - t_train
  results = final_report(run, state, writer, workdir, train_seconds=train_seconds,
                         total_seconds=time.time() - t_start,
                         steps_run=cfg_t.total_steps - start)
  return results


def _postfix(means: Dict[str, float], history: Dict[str, Any]) -> Dict[str, str]:
  out = {k: f"{means[k]:.3f}" for k in sorted(means) if k.startswith("loss")}
  if history.get("val_miou") is not None:
    out["val_mIoU"] = f"{history['val_miou']:.1f}"
  return out


def final_report(run: Run, state, writer, workdir: str, *, train_seconds: float,
                 total_seconds: float, steps_run: int) -> Dict[str, Any]:
  """Evaluates teacher and student, writes results.json and the prediction figure."""
  config = run.config
  teacher = run.evaluate(state.ema_params, state.ema_batch_stats)
  student = run.evaluate(state.params, state.batch_stats)
  results = {
      "method": config.method.name, "dataset": config.data.dataset, "split": config.data.split,
      "split_seed": config.data.split_seed, "seed": config.seed,
      "steps": config.train.total_steps, "steps_this_run": steps_run,
      "eval_mode": teacher["mode"],
      "miou_teacher": teacher["miou"] * 100, "miou_student": student["miou"] * 100,
      "per_class_iou_teacher": [None if np.isnan(x) else float(x) * 100
                                for x in teacher["per_class_iou"]],
      "skipped_steps": int(jax.device_get(state.skipped_steps)),
      "train_seconds": train_seconds, "total_seconds": total_seconds,
      "tensorboard": os.path.abspath(writer.logdir),
  }
  if parallel.is_main_process():
    figure = os.path.join(workdir, "predictions.png")
    models = {"teacher": (state.ema_params, state.ema_batch_stats),
              "student": (state.params, state.batch_stats)}
    if jax.process_count() > 1:
      # Only this process draws the figure: on host copies of the (replicated) variables, a
      # computation of its own devices; the global arrays would need every process.
      models = jax.tree.map(np.asarray, models)
    visualize.save_prediction_figure(figure, run, models)
    results["figure"] = os.path.abspath(figure)
    writer.scalars(config.train.total_steps, {"miou_teacher": results["miou_teacher"],
                                              "miou_student": results["miou_student"]},
                   prefix="final/")
    checkpoint.atomic_write_text(os.path.join(workdir, "results.json"),
                                 json.dumps(results, indent=1))
  return results


def check(config, workdir: str, *, reference=None) -> Dict[str, Any]:
  """`--check`: validates config, data and workdir without training; writes nothing.

  Runs every check of `train_and_evaluate` (config, workdir, data, model, an existing
  checkpoint's compatibility) and decodes every record, unlabeled ones included, so a bad
  file is named now rather than hours into a run.

  Args:
    config: the run config.
    workdir: the run directory (need not exist; it is not created).
    reference: optional config of every valid field (see `check_config`).

  Returns:
    A summary dict; raises on the first problem with a message that names it.
  """
  check_config(config, reference)
  run, resume, checked = prepare(config, workdir, full_data_check=True)
  for name, n in checked.items():
    print(f"[semijax] {name}: {n} records read", flush=True)
  n = run.meta()["num_params"]
  print(f"[semijax] model {config.model.name}: {n:,} parameters", flush=True)
  print(f"[semijax] {run.describe()}", flush=True)
  for w in _recipe_warnings(config, run.mesh):
    print(f"[semijax] WARNING: {w}", flush=True)
  print(f"[semijax] check passed ({'resumes at step %d' % resume if resume else 'fresh run'})",
        flush=True)
  return {"num_params": n, "resume_step": resume, "data": run.data.description,
          "records_checked": checked}
