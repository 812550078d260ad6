"""`train_and_evaluate(config, workdir)`: the whole run, resumable, on 1..N devices/hosts.

Kept deliberately linear: validation (nothing is written until the config, the data, the
model and any checkpoint already in the workdir have been checked: `run.prepare`), set-up,
(restore), the step loop with periodic logging, evaluation and checkpoints (`_Trainer`),
then the final evaluation, results and figure. The pieces live by concern: `config_checks`,
`preemption`, `run` (the run object and its builders), `step` (the jitted step).

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

import functools
import json
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from semijax import checkpoint, extras, parallel
from semijax.data import pipeline, transforms
from semijax.data.sources import DataError
from semijax.eval import visualize
from semijax.methods import diagnostics
from semijax.train import (
  config_checks,
  run as run_lib,
  step as step_lib,
  summary,
  writer as writer_lib,
)

# The pieces callers reach through this module (the trainer's public surface).
from semijax.train.config_checks import ConfigError, check_config  # noqa: F401
from semijax.train.preemption import Preemption
from semijax.train.run import (
  Run,
  build_model as build_model,
  init_train_state as init_train_state,
  make_optimizer as make_optimizer,
  prepare,
)


class NonFiniteLossError(FloatingPointError):
  """The loss or a gradient became NaN/inf and `train.nonfinite == 'stop'`."""


# The errors a user fixes (bad input, full disk, diverged run), as opposed to bugs:
# the train command prints their message without a traceback.
USER_ERRORS = (ConfigError, DataError, checkpoint.CheckpointMismatchError,
               checkpoint.CheckpointSaveError, NonFiniteLossError, extras.MissingExtraError)


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
  with Preemption() as preempt:
    run, resume, checked = prepare(config, workdir)
    if preempt.requested:
      print("[semijax] stopped (signal) before writing anything", flush=True)
      return {"stopped_at": resume or 0}
    # Every process has inspected the workdir (e.g. an existing checkpoint) before any
    # creates something there: else they could disagree on what they found.
    parallel.sync_processes("semijax:workdir_checked")
    checkpoint.prepare_workdir(workdir)   # the first write
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    trainer = None
    try:
      trainer = _Trainer(run, workdir, ckpt, preempt, progress=progress)
      out = trainer.train(checked, t_start, max_steps=max_steps)
      ckpt.close()   # raises CheckpointSaveError if the last save failed
      return out
    finally:
      if trainer is not None:
        trainer.close()
      try:
        ckpt.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # already closed, or the error being raised says more


def _nonfinite_message(first: Optional[int], upto: int, ckpt) -> str:
  where = (f"in the update of step {first + 1}" if first is not None
           else f"before step {upto}")
  return (f"non-finite loss or gradient {where}; that update was not applied and no later "
          f"checkpoint was written: the last good checkpoint (step {ckpt.latest_step()}) in "
          f"{ckpt.directory} is intact. Lower the learning rate (or resume from an earlier "
          "checkpoint), or set train.nonfinite='skip' to skip such updates.")


def _first_nonfinite(acc_host) -> Optional[int]:
  """The first step of a window whose update was not finite, from the window's sums."""
  if acc_host is None or step_lib.FIRST_NONFINITE not in acc_host:
    return None
  value = int(acc_host[step_lib.FIRST_NONFINITE])
  return None if value == step_lib.NO_NONFINITE else value


class _Trainer:
  """The step loop of one invocation, in named pieces: set-up, log, evaluate, save, stop."""

  def __init__(self, run: Run, workdir: str, ckpt, preempt, *, progress: bool):
    self.run, self.config, self.workdir = run, run.config, workdir
    self.ckpt, self.preempt = ckpt, preempt
    self.main = parallel.is_main_process()
    self.progress = progress
    self.writer, self.bar = None, None
    self.acc, self.acc_n = None, 0
    self.history = {"val_miou": None, "best_val_miou": None}
    self.last_means = {}

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()

  # -- Set-up. ---------------------------------------------------------------------------

  def banner(self, checked) -> None:
    """Prints what is about to run, and where it departs from the recipe (process 0)."""
    run, config = self.run, self.config
    cfg_t = config.train
    lines = [run.describe(),
             f"method {config.method.name}; model {config.model.name} ({config.model.dtype}); "
             f"{run.data.description} (checked: "
             f"{', '.join(f'{v} {k}' for k, v in checked.items())})",
             f"optimizer {config.optim.name} base lr {config.optim.base_lr:g} "
             f"(head x{config.optim.head_lr_mult:g}), {cfg_t.total_steps} steps"]
    recipe = config.get("recipe")
    if recipe and recipe.get("global_batch"):
      lines.append(f"recipe: global batch {recipe.global_batch} on {recipe.gpus or '?'} GPUs, "
                   f"base lr {recipe.base_lr:g}" + (f" ({recipe.source})" if recipe.source
                                                    else ""))
    if self.main:
      for line in lines:
        print(f"[semijax] {line}", flush=True)
      for w in config_checks.recipe_warnings(config, run.mesh):
        print(f"[semijax] WARNING: {w}", flush=True)

  def restore(self):
    """The initial or restored state and data-iterator state; opens the metric writer."""
    state = self.run.init_state()
    data_state = None
    latest = self.ckpt.latest_step()
    if latest is not None:
      state, data_state, meta = self.ckpt.restore(latest, state, self.run.meta())
      self.acc, self.acc_n = _acc_from_json(meta.get("train_accumulator"), self.run.mesh)
      if self.main:
        print(f"[semijax] resumed from {self.ckpt.directory} at step {int(state.step)}",
              flush=True)
    start = int(state.step)
    self.writer = writer_lib.MetricWriter(self.workdir, enabled=self.main,
                                          resume_step=start if latest is not None else None)
    if self.main and latest is None:
      self.writer.text(0, "config", "```\n" + str(self.config) + "\n```")
      checkpoint.atomic_write_text(os.path.join(self.workdir, "config.json"),
                                   checkpoint.config_fingerprint(self.config))
    return state, data_state, start

  def data_iterator(self, start: int, data_state):
    """The checkpointable iterator over the labeled (+ unlabeled) stream from `start`."""
    run, config = self.run, self.config
    augment = transforms.TrainAugment(crop_size=config.data.crop_size,
                                      scale_range=tuple(config.data.scale_range),
                                      base_size=config.data.base_size or None,
                                      flip=config.data.flip)
    # With every image labeled ("full"), the labeled images double as the unlabeled stream.
    uses = run.method.uses_unlabeled
    unlabeled = (run.data.unlabeled or run.data.labeled) if uses else None
    ds = pipeline.semi_dataset(
        run.data.labeled, unlabeled, labeled_batch=config.data.labeled_batch,
        unlabeled_batch=config.data.unlabeled_batch if uses else 0, seed=config.seed,
        augment=augment, unlabeled_augment=run.method.unlabeled_transform(augment),
        process_index=jax.process_index(), process_count=jax.process_count())
    self.dataset = ds
    it = pipeline.iterate(ds, num_workers=config.data.num_workers)
    it.set_state(data_state if data_state else {"next_index": start})
    return it

  def step_functions(self, start: int):
    """`step -> jitted step function`: the supervised warm-up step, then the method's."""
    run, cfg_t = self.run, self.config.train
    jit_step = functools.partial(jax.jit, in_shardings=(parallel.replicated(run.mesh),
                                                        parallel.data_sharded(run.mesh)),
                                 out_shardings=parallel.replicated(run.mesh),
                                 donate_argnums=0)
    main_step = jit_step(step_lib.make_train_step(run.model, run.method, self.config))
    warmup_steps = cfg_t.supervised_warmup_steps if run.method.uses_unlabeled else 0
    if warmup_steps <= start:
      return lambda step: main_step
    # Compiled only when some warm-up steps remain.
    warmup = jit_step(step_lib.make_train_step(run.model, run.method, self.config,
                                               warmup=True))
    return lambda step: warmup if step < warmup_steps else main_step

  # -- Periodic work. ----------------------------------------------------------------------

  def log(self, done: int, state, skipped_seen: int) -> int:
    """Writes the window's mean metrics; handles skipped (non-finite) updates."""
    host = jax.device_get(self.acc)
    first_bad = _first_nonfinite(host)
    means = diagnostics.pool_ratios(
        {k: float(v) / self.acc_n for k, v in host.items() if k != step_lib.FIRST_NONFINITE})
    window = self.acc_n
    self.acc, self.acc_n = None, 0
    skipped = int(jax.device_get(state.skipped_steps))
    means["skipped_steps"] = skipped
    self.last_means = means
    self.writer.scalars(done, means, prefix="train/")
    if skipped > skipped_seen:
      if self.config.train.nonfinite == "stop":
        self.ckpt.wait()
        raise NonFiniteLossError(_nonfinite_message(first_bad, done, self.ckpt))
      if self.main:
        print(f"[semijax] WARNING: non-finite loss or gradient: {skipped - skipped_seen} "
              f"update(s) skipped in steps {done - window + 1}..{done} (first: step "
              f"{first_bad + 1 if first_bad is not None else '?'}); {skipped} skipped in all",
              flush=True)
    if self.bar is not None:
      self.bar.set_postfix(_postfix(means, self.history), refresh=False)
    return skipped

  def evaluate(self, done: int, state) -> Dict[str, float]:
    """Val mIoU of the teacher (and student); returns the checkpoint's metric."""
    res = self.run.evaluate(state.ema_params, state.ema_batch_stats)
    miou = res["miou"] * 100
    self.history["val_miou"] = miou
    self.history["best_val_miou"] = max(self.history["best_val_miou"] or 0.0, miou)
    self.writer.scalars(done, {"miou": miou, "pixel_accuracy": res["pixel_accuracy"]},
                        prefix="val_teacher/")
    if self.config.train.eval_student:
      res_s = self.run.evaluate(state.params, state.batch_stats)
      self.writer.scalars(done, {"miou": res_s["miou"] * 100}, prefix="val_student/")
    if self.bar is not None:
      self.bar.set_postfix(_postfix(self.last_means, self.history), refresh=True)
    return {checkpoint.BEST_METRIC: miou}

  def save(self, done: int, state, it, skipped_seen: int, metrics) -> None:
    """A checkpoint of state, iterator and window sums; never after a non-finite update."""
    if (self.config.train.nonfinite == "stop"
        and int(jax.device_get(state.skipped_steps)) > skipped_seen):
      self.ckpt.wait()
      raise NonFiniteLossError(_nonfinite_message(
          _first_nonfinite(jax.device_get(self.acc)), done, self.ckpt))
    meta = dict(self.run.meta(), train_accumulator=_acc_to_json(self.acc, self.acc_n))
    self.ckpt.save(done, state, it.get_state(), meta, metrics)

  def stopped(self, done: int, why: str) -> Dict[str, Any]:
    self.ckpt.wait()
    if self.bar is not None:
      self.bar.close()
    if self.main:
      print(f"[semijax] stopped ({why}) at step {done}: latest checkpoint step "
            f"{self.ckpt.latest_step()} in {self.ckpt.directory}; rerun the same command to "
            "continue", flush=True)
    return {"stopped_at": done}

  # -- The loop. -------------------------------------------------------------------------

  def train(self, checked, t_start: float, *, max_steps: Optional[int]) -> Dict[str, Any]:
    cfg_t = self.config.train
    self.banner(checked)
    state, data_state, start = self.restore()
    it = self.data_iterator(start, data_state)
    step_fn = self.step_functions(start)
    skipped_seen = int(jax.device_get(state.skipped_steps))
    if self.main and self.progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=cfg_t.total_steps, initial=start, dynamic_ncols=True, unit="step",
                      desc=self.config.method.name)
    if self.preempt.requested:   # a signal during set-up: nothing new to save
      return self.stopped(start, "signal")
    t_train = time.time()
    for step in range(start, cfg_t.total_steps):
      if step == start:
        self.warn_if_too_big(step_fn(step), state)
      state = self.one_step(step, state, it, step_fn)
      done = step + 1
      last = done == cfg_t.total_steps
      # Not on preemption: the partial window's sums go into the checkpoint instead, so a
      # resumed run logs exactly the lines of an uninterrupted one.
      if done % cfg_t.log_every == 0 or last:
        skipped_seen = self.log(done, state, skipped_seen)
      eval_now = cfg_t.eval_every and (done % cfg_t.eval_every == 0 or last)
      metrics = self.evaluate(done, state) if eval_now else None
      stop = self.preempt.poll(done) or (max_steps is not None and done - start >= max_steps)
      if ((cfg_t.checkpoint_every and done % cfg_t.checkpoint_every == 0) or last or stop
          or eval_now):
        self.save(done, state, it, skipped_seen, metrics)
      if stop and not last:
        return self.stopped(done, "signal" if self.preempt.requested
                            else f"max_steps={max_steps}")
    self.ckpt.wait()
    if self.bar is not None:
      self.bar.close()
    if self.preempt.requested:   # the last checkpoint is saved; the final report can wait
      return self.stopped(cfg_t.total_steps, "signal")
    results = final_report(self.run, state, self.writer, self.workdir,
                           train_seconds=time.time() - t_train,
                           total_seconds=time.time() - t_start,
                           steps_run=cfg_t.total_steps - start)
    if self.main:
      print(summary.format_run_summary(results, self.workdir), flush=True)
    return results

  def warn_if_too_big(self, step_fn, state) -> None:
    """Before the first compile (minutes on a big model): does the step fit the device?

    Traces the step on abstract inputs shaped like the data (seconds), only on a device
    that reports its memory (not a CPU); see `semijax.models.memory`.
    """
    from semijax.models import memory  # pylint: disable=g-import-not-at-top
    if memory.device_memory_bytes() is None:
      return
    # The first element of this process's stream, scaled to the global batch.
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(),) + x.shape[1:],
                                       x.dtype), self.dataset[0])
    message = memory.step_fits_message(step_fn, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), batch,
        num_devices=self.run.mesh.devices.size)
    if message and self.main:
      print(f"[semijax] WARNING: {message}", flush=True)

  def one_step(self, step: int, state, it, step_fn):
    """Reads the next global batch, runs the step, adds its metrics to the window."""
    try:
      host_batch = next(it)
    except DataError as e:
      self.ckpt.wait()
      raise DataError(f"{e} (training stopped before step {step + 1}; the last checkpoint, "
                      f"step {self.ckpt.latest_step()}, is intact)") from e
    state, metrics = step_fn(step)(state, parallel.put_batch(host_batch, self.run.mesh))
    if self.acc is not None and set(self.acc) != set(metrics):
      self.acc, self.acc_n = None, 0   # sums saved by a version with other metrics
    self.acc = _merge(self.acc, metrics)
    self.acc_n += 1
    if self.bar is not None:
      self.bar.update(1)
    return state


def _postfix(means: Dict[str, float], history: Dict[str, Any]) -> Dict[str, str]:
  out = {k: f"{means[k]:.3f}" for k in sorted(means) if k.startswith("loss")}
  if history.get("val_miou") is not None:
    out["val_mIoU"] = f"{history['val_miou']:.1f}"
  return out


def final_report(run: run_lib.Run, state, writer, workdir: str, *, train_seconds: float,
                 total_seconds: float, steps_run: int) -> Dict[str, Any]:
  """Evaluates teacher and student, writes results.json and the prediction figure."""
  config = run.config
  best = summary.best_from_metrics(os.path.join(workdir, "metrics.jsonl")) or (None, None)
  teacher = run.evaluate(state.ema_params, state.ema_batch_stats)
  student = run.evaluate(state.params, state.batch_stats)
  results = {
      "method": config.method.name, "dataset": config.data.dataset, "split": config.data.split,
      "split_seed": config.data.split_seed, "seed": config.seed,
      "steps": config.train.total_steps, "steps_this_run": steps_run,
      "warmup_steps": config.train.supervised_warmup_steps,
      "pretrained": config.model.pretrained or "none",
      "labeled_batch": config.data.labeled_batch,
      "unlabeled_batch": config.data.unlabeled_batch if run.method.uses_unlabeled else 0,
      "eval_mode": teacher["mode"],
      "miou_teacher": teacher["miou"] * 100, "miou_student": student["miou"] * 100,
      "per_class_iou_teacher": [None if np.isnan(x) else float(x) * 100
                                for x in teacher["per_class_iou"]],
      "class_names": list(run.info.class_names),
      "best_step": best[0], "best_val_miou": best[1],
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
  run, resume, checked = run_lib.prepare(config, workdir, full_data_check=True)
  for name, n in checked.items():
    print(f"[semijax] {name}: {n} records read", flush=True)
  n = run.meta()["num_params"]
  print(f"[semijax] model {config.model.name}: {n:,} parameters", flush=True)
  print(f"[semijax] {run.describe()}", flush=True)
  for w in config_checks.recipe_warnings(config, run.mesh):
    print(f"[semijax] WARNING: {w}", flush=True)
  print(f"[semijax] check passed ({f'resumes at step {resume}' if resume else 'fresh run'})",
        flush=True)
  return {"num_params": n, "resume_step": resume, "data": run.data.description,
          "records_checked": checked}
