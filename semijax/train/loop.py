"""`train_and_evaluate(config, workdir)`: the whole run, resumable, on 1..N devices/hosts.

Kept deliberately linear: set-up, (restore), the step loop with periodic logging,
evaluation and checkpoints, then the final evaluation, results table and figure.
"""

import functools
import json
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging

from semijax import checkpoint, methods, parallel
from semijax.data import datasets, pipeline, transforms
from semijax.eval import inference, visualize
from semijax.methods import base as method_base
from semijax.models import registry as model_registry
from semijax.train import schedules, step as step_lib, writer as writer_lib
from semijax.train import state as state_lib


class NonFiniteLossError(FloatingPointError):
  """The loss or a gradient became NaN/inf and `train.nonfinite == 'stop'`."""


def build_model(config, num_classes: int, method):
  """The segmenter named by `config.model`, with the method's heads attached."""
  kwargs = dict(config.model.kwargs.to_dict()) if config.model.get("kwargs") else {}
  return model_registry.build_model(config.model.name, num_classes=num_classes,
                                    dtype=config.model.dtype, heads=method.heads(num_classes),
                                    **kwargs)


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag checked at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint at the next step boundary", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _eval_images(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  return {"image": batch["image"].astype(np.float32) / 255.0,
          "label": batch["label"].astype(np.int32), "valid": batch["valid"]}


class Run:
  """Everything a run needs, built once from the config (also used by evaluate/predict)."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.mesh = parallel.make_mesh(config.train.num_devices or None)
    self.data = datasets.build(config.data)
    self.info = self.data.info
    self.method = methods.get(config.method.name)(config)
    self.model = build_model(config, self.info.num_classes, self.method)
    size = config.data.crop_size
    params_shape = jax.eval_shape(
        lambda rng: step_lib.init_variables(self.model, rng, (1, size, size, 3)),
        jax.random.key(0))
    self.tx = schedules.make_optimizer(
        name=config.optim.name, base_lr=config.optim.base_lr,
        total_steps=config.train.total_steps, head_lr_mult=config.optim.head_lr_mult,
        momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
        power=config.optim.power, warmup_steps=config.optim.warmup_steps,
        params=params_shape[0])
    self.logits_fn = functools.partial(_logits, self.model)
    self.predict = jax.jit(self.logits_fn)   # `(variables, images) -> logits`, for figures

  def init_state(self) -> state_lib.TrainState:
    """Fresh state (pretrained backbone loaded if configured), replicated on the mesh."""
    config, size = self.config, self.config.data.crop_size

    def init(rng):
      params, batch_stats = step_lib.init_variables(self.model, rng, (1, size, size, 3))
      outputs = jax.eval_shape(
          lambda: self.model.apply({"params": params, "batch_stats": batch_stats},
                                   np.zeros((1, size, size, 3), np.float32), train=False))
      method_state = self.method.init_state(jax.random.fold_in(rng, 1),
                                            num_classes=self.info.num_classes,
                                            outputs=outputs)
      return state_lib.TrainState.create(apply_fn=self.model.apply, params=params, tx=self.tx,
                                         batch_stats=batch_stats, method_state=method_state)

    state = jax.jit(init, out_shardings=parallel.replicated(self.mesh))(
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
    return {"model": self.config.model.name, "method": self.config.method.name,
            "dataset": self.config.data.dataset, "num_classes": self.info.num_classes,
            "crop_size": self.config.data.crop_size}

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
  """Differences between this run's data-parallel layout and the recipe it reproduces."""
  recipe = config.get("recipe")
  if not recipe or not recipe.get("global_batch"):
    return []
  out = []
  ours = config.data.labeled_batch * config.train.grad_accum_steps
  if ours != recipe.global_batch:
    scaled = recipe.base_lr * ours / recipe.global_batch
    out.append(
        f"global labeled batch {ours} differs from the recipe's {recipe.global_batch} "
        f"({recipe.gpus} GPUs x {recipe.global_batch // max(recipe.gpus, 1)}). Published "
        f"numbers assume the recipe's batch: keep data.labeled_batch={recipe.global_batch} "
        f"(use train.grad_accum_steps to fit memory) or scale the LR linearly to "
        f"optim.base_lr={scaled:g}.")
  if config.optim.base_lr != recipe.base_lr and ours == recipe.global_batch:
    out.append(f"optim.base_lr={config.optim.base_lr:g} differs from the recipe's "
               f"{recipe.base_lr:g} at the same global batch")
  return out


def train_and_evaluate(config, workdir: str, *, progress: bool = True,
                       max_steps: Optional[int] = None) -> Dict[str, Any]:
  """Trains (resuming from `workdir` when it holds a checkpoint), evaluates, summarises.

  Args:
    config: the run config.
    workdir: checkpoints, logs and results go here.
    progress: show a progress bar (process 0).
    max_steps: stop after this many steps in this invocation (checkpoint saved), e.g. to
      fit a job's time limit; rerunning continues.

  Returns:
    The final results dict (also written to `workdir/results.json`).
  """
  checkpoint.check_workdir_writable(workdir)
  t_start = time.time()
  run = Run(config, workdir)
  cfg_t = config.train
  main = parallel.is_main_process()
  for what, b in (("data.labeled_batch", config.data.labeled_batch),
                  ("data.unlabeled_batch", config.data.unlabeled_batch),
                  ("data.eval_batch", config.data.eval_batch)):
    if b:
      parallel.check_batch_divisible(b, run.mesh, what)

  summary = [parallel.describe(run.mesh, config.data.labeled_batch,
                               config.data.unlabeled_batch if run.method.uses_unlabeled else 0),
             f"method {config.method.name}; model {config.model.name} ({config.model.dtype}); "
             f"{run.data.description}",
             f"optimizer {config.optim.name} base lr {config.optim.base_lr:g} "
             f"(head x{config.optim.head_lr_mult:g}), {cfg_t.total_steps} steps"]
  warnings_ = _recipe_warnings(config, run.mesh)
  if main:
    for line in summary:
      print(f"[semijax] {line}", flush=True)
    for w in warnings_:
      print(f"[semijax] WARNING: {w}", flush=True)

  writer = writer_lib.MetricWriter(workdir, enabled=main)
  ckpt = checkpoint.Checkpointer(workdir, keep=cfg_t.keep_checkpoints)
  state = run.init_state()
  if main and ckpt.latest_step() is None:
    writer.text(0, "config", "```\n" + str(config) + "\n```")
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(checkpoint.config_fingerprint(config))

  data_state = None
  if ckpt.latest_step() is not None:
    state, data_state, _ = ckpt.restore(ckpt.latest_step(), state, run.meta())
    if main:
      print(f"[semijax] resumed from {ckpt.directory} at step {int(state.step)}", flush=True)
  start = int(state.step)

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

  step_fn = step_lib.make_train_step(run.model, run.method, config)
  p_step = jax.jit(step_fn, in_shardings=(parallel.replicated(run.mesh),
                                          parallel.data_sharded(run.mesh)),
                   out_shardings=parallel.replicated(run.mesh), donate_argnums=0)

  history = {"val_miou": None, "best_val_miou": None}
  acc, acc_n, last_means = None, 0, {}
  bar = None
  if main and progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=cfg_t.total_steps, initial=start, dynamic_ncols=True, unit="step",
               desc=config.method.name)
  t_train = time.time()
  with _Preemption() as preempt:
    for step in range(start, cfg_t.total_steps):
      batch = parallel.put_batch(next(it), run.mesh)
      state, metrics = p_step(state, batch)
      acc = metrics if acc is None else jax.tree.map(lambda a, b: a + b, acc, metrics)
      acc_n += 1
      done = step + 1
      last = done == cfg_t.total_steps
      if bar is not None:
        bar.update(1)

      if done % cfg_t.log_every == 0 or last or preempt.requested:
        means = {k: float(v) / acc_n for k, v in jax.device_get(acc).items()}
        acc, acc_n = None, 0
        skipped = int(jax.device_get(state.skipped_steps))
        means["skipped_steps"] = skipped
        last_means = means
        writer.scalars(done, means, prefix="train/")
        if skipped and cfg_t.nonfinite == "stop":
          ckpt.wait()
          raise NonFiniteLossError(
              f"non-finite loss or gradient before step {done} (loss {means['loss']:.4g}); "
              f"the update was not applied and the last good checkpoint "
              f"(step {ckpt.latest_step()}) in {ckpt.directory} is intact. Lower the "
              "learning rate, or set train.nonfinite='skip' to skip such updates.")
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

      stop = preempt.requested or (max_steps is not None and done - start >= max_steps)
      if (cfg_t.checkpoint_every and done % cfg_t.checkpoint_every == 0) or last or stop or \
          eval_now:
        ckpt.save(done, state, it.get_state(), run.meta(), metrics_for_ckpt)
      if stop and not last:
        ckpt.wait()
        if bar is not None:
          bar.close()
        print(f"[semijax] stopped: checkpoint at step {done} saved in {ckpt.directory}; "
              "rerun the same command to continue", flush=True)
        writer.close()
        ckpt.close()
        return {"stopped_at": done}
  ckpt.wait()
  if bar is not None:
    bar.close()
  train_seconds = time.time() - t_train
  results = final_report(run, state, writer, workdir, train_seconds=train_seconds,
                         total_seconds=time.time() - t_start, steps_run=cfg_t.total_steps - start)
  writer.close()
  ckpt.close()
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
      "train_seconds": train_seconds, "total_seconds": total_seconds,
      "tensorboard": os.path.abspath(writer.logdir),
  }
  if parallel.is_main_process():
    figure = os.path.join(workdir, "predictions.png")
    visualize.save_prediction_figure(
        figure, run, {"teacher": (state.ema_params, state.ema_batch_stats),
                      "student": (state.params, state.batch_stats)})
    results["figure"] = os.path.abspath(figure)
    writer.scalars(config.train.total_steps, {"miou_teacher": results["miou_teacher"],
                                              "miou_student": results["miou_student"]},
                   prefix="final/")
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  return results


def check(config, workdir: str) -> Dict[str, Any]:
  """`--check`: validates config, data and workdir without training; changes nothing.

  Builds the data sources (reading every labeled record, so a bad file is named now rather
  than hours into a run), the model and optimizer shapes, and compares an existing
  checkpoint's metadata with this run.

  Returns:
    A summary dict; raises on the first problem with a message that names it.
  """
  if os.path.exists(workdir):
    checkpoint.check_workdir_writable(workdir)
  else:
    parent = os.path.dirname(os.path.abspath(workdir))
    if not os.access(parent, os.W_OK):
      checkpoint.check_workdir_writable(workdir)  # raises with the OS reason
  run = Run(config, workdir)
  for name, src in (("labeled", run.data.labeled), ("val", run.data.val)):
    for i in range(len(src)):
      src[i]
    print(f"[semijax] {name}: {len(src)} records read", flush=True)
  if run.data.unlabeled is not None and len(run.data.unlabeled):
    run.data.unlabeled[0]
    run.data.unlabeled[len(run.data.unlabeled) - 1]
  shapes = jax.eval_shape(run.init_state)
  n = state_lib.num_params(shapes.params)
  print(f"[semijax] model {config.model.name}: {n:,} parameters", flush=True)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  resume = None
  if os.path.isdir(ckpt_dir):
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    if ckpt.latest_step() is not None:
      meta = ckpt.read_meta(ckpt.latest_step())
      diffs = {k: (meta.get(k), v) for k, v in run.meta().items() if meta.get(k) != v}
      if diffs:
        raise checkpoint.CheckpointMismatchError(
            f"{ckpt_dir}: checkpoint belongs to a different run: {diffs}")
      resume = ckpt.latest_step()
    ckpt.close()
  for w in _recipe_warnings(config, run.mesh):
    print(f"[semijax] WARNING: {w}", flush=True)
  print(f"[semijax] check passed ({'resumes at step %d' % resume if resume else 'fresh run'})",
        flush=True)
  return {"num_params": n, "resume_step": resume, "data": run.data.description}
