"""Checkpoints: the whole train state, the data iterator position and run metadata.

One orbax `CheckpointManager` per workdir. Each checkpoint holds
  state: the TrainState (student, teacher, optimizer, BN statistics, banks, step),
  data:  the grain iterator state (JSON),
  meta:  what the state belongs to (model, method, dataset, parameter count, a fingerprint of
         every array's path/shape/dtype), the metrics at that step and the partial metric
         sums of the current logging window (so a resumed run logs the same numbers).

Crash safety (each point is exercised by tests/train/test_crash_safety.py):
- Orbax writes a step into `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` only
  after every file is written (`commit_success.txt` first), so a kill at any moment, during
  a save included, leaves the previous checkpoints intact; the next writable `Checkpointer`
  deletes the unfinished temporary directory (`cleanup_tmp_directories`).
- Saves are asynchronous; a write error (a full disk) surfaces at the next `save` or `wait`,
  where it is raised as `CheckpointSaveError` naming the directory, the step and the OS
  reason; the unfinished directory is deleted by the next writable `Checkpointer`.
- `Checkpointer(..., read_only=True)` never writes, so a run can inspect (and refuse) a
  workdir's checkpoints before it has written anything.
The last `keep` checkpoints and the best one by validation mIoU are kept.
"""

import errno
import glob
import hashlib
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from semijax.data.sources import DataError

BEST_METRIC = "val_miou"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir belongs to a different model, method or dataset."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full); the previous ones are intact."""


class WorkdirError(DataError):
  """The workdir cannot be created or written (a `DataError` for older callers)."""


def _metric(metrics: Dict[str, Any]) -> float:
  return float(metrics[BEST_METRIC])


def state_fingerprint(state: Any) -> str:
  """A short hash of every array's tree path, shape and dtype (works on abstract states).

  Two states restore into each other exactly when their fingerprints agree, so comparing
  them names a different model size, optimizer or method state before orbax meets arrays
  of the wrong shape.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  text = "\n".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{x.dtype}" for p, x in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def compare_meta(meta: Dict[str, Any], expected: Dict[str, Any], where: str) -> None:
  """Raises `CheckpointMismatchError` naming the fields where `meta` differs from `expected`.

  Keys missing from `meta` (checkpoints written before they were recorded) are not compared;
  orbax's own shape check still guards those.
  """
  diffs = [f"{k}: checkpoint has {meta.get(k)!r}, this run {v!r}"
           for k, v in expected.items() if k in meta and meta[k] != v]
  if diffs:
    hint = ""
    if any(d.startswith("state_fingerprint") for d in diffs):
      hint = (" The arrays of the state differ in shape or structure: the model's size "
              "(model.kwargs), the optimizer or the method's state changed.")
    raise CheckpointMismatchError(
        f"{where} belongs to a different run ({'; '.join(diffs)}).{hint} Use another "
        "--workdir, or delete that checkpoint directory to start over.")


class Checkpointer:
  """Saves and restores `(state, data_state, meta)` in `workdir/checkpoints`.

  Args:
    workdir: the run directory.
    keep: most recent checkpoints kept.
    keep_best: also keep the best checkpoint by `val_miou`.
    async_save: write in a background thread (the step loop continues meanwhile).
    read_only: inspect existing checkpoints without creating, cleaning or writing anything.
  """

  def __init__(self, workdir: str, *, keep: int = 2, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.read_only = read_only
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
      policies.append(checkpoint_managers.BestN(get_metric_fn=_metric, reverse=False, n=1,
                                                keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save and not read_only,
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only)
    if not read_only and jax.process_index() == 0:
      # Unfinished saves of a killed run; orbax would delete them in the background too,
      # but doing it now makes the state of the directory known when this returns.
      for path in glob.glob(os.path.join(glob.escape(self.directory), f"*{TMP_SUFFIX}*")):
        shutil.rmtree(path, ignore_errors=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight: Optional[int] = None  # step of the last save not yet known to be done

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def _save_failed(self, error: Exception, failed: Optional[int]):
    """Explains a failed save and what is still on disk.

    The unfinished `<step>.orbax-checkpoint-tmp` directory is left where it is: orbax may
    still be writing other items into it when the first error surfaces, and the next
    writable `Checkpointer` (the resumed run) deletes it.
    """
    try:
      intact = self.manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      intact = None
    if isinstance(error, OSError) and error.errno:
      reason = f"{os.strerror(error.errno)} ({error.filename or error})"
    else:  # tensorstore reports OS errors as ValueError('... [os_error_code=28]')
      reason = f"{type(error).__name__}: {str(error)[:400]}"
    full = (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
            or "os_error_code='28'" in str(error))
    hint = " Free some space (or move --workdir), then rerun the same command to resume." \
        if full else ""
    return CheckpointSaveError(
        f"could not write checkpoint {'step %d ' % failed if failed is not None else ''}"
        f"in {self.directory}: {reason}. The previous checkpoint "
        f"({'step %d' % intact if intact is not None else 'none'}) is intact; the unfinished "
        f"one is removed when the run restarts.{hint}")

  def save(self, step: int, state: Any, data_state: Optional[dict], meta: Dict[str, Any],
           metrics: Optional[Dict[str, float]] = None) -> None:
    """Starts an (async) save; `metrics` with `val_miou` make the step a best candidate.

    Raises:
      CheckpointSaveError: this save, or the previous asynchronous one, could not be
        written (the error of an asynchronous save surfaces here or in `wait`).
    """
    meta = dict(meta, step=int(step), metrics=metrics or {})
    try:
      self.manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state or {}),
                                  meta=ocp.args.JsonSave(meta)),
          metrics=metrics if metrics and BEST_METRIC in metrics else None)
    except Exception as e:  # pylint: disable=broad-except
      # An error of the previous async save is raised when the next one starts.
      failed = self._in_flight if self._in_flight is not None else int(step)
      self._in_flight = None
      raise self._save_failed(e, failed) from e
    self._in_flight = int(step)

  def read_meta(self, step: int) -> Dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def check_compatible(self, step: int, expected_meta: Dict[str, Any]) -> Dict[str, Any]:
    """Reads step `step`'s metadata and raises `CheckpointMismatchError` if it is not ours."""
    meta = self.read_meta(step)
    compare_meta(meta, expected_meta, f"{self.directory}/{step}")
    return meta

  def restore(self, step: int, target_state: Any,
              expected_meta: Dict[str, Any]) -> Tuple[Any, dict, Dict[str, Any]]:
    """Restores onto `target_state`'s structure and shardings after checking the metadata.

    Raises:
      CheckpointMismatchError: naming the fields that differ (model, method, dataset,
        number of classes or parameters, state fingerprint), before orbax sees
        incompatible arrays; or wrapping orbax's error when the arrays do not fit anyway.
    """
    self.check_compatible(step, expected_meta)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                        data=ocp.args.JsonRestore(),
                                        meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"{self.directory}/{step} does not fit this run's state ({type(e).__name__}: "
          f"{str(e)[:500]}). Use another --workdir, or delete that checkpoint directory to "
          "start over.") from e
    return restored["state"], dict(restored["data"]), dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises `CheckpointSaveError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      failed, self._in_flight = self._in_flight, None
      raise self._save_failed(e, failed) from e
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def check_workdir(workdir: str) -> None:
  """Raises `WorkdirError` if `workdir` could not be created or written; writes nothing.

  An existing workdir must be a writable directory; a new one needs its nearest existing
  ancestor to be a writable directory. (The superuser passes permission checks; a
  read-only file system is then only met by `prepare_workdir`'s probe.)
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise WorkdirError(f"workdir {workdir!r} is not writable: it exists and is not a "
                         "directory")
    if not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(f"workdir {workdir!r} is not writable: permission denied")
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"workdir {workdir!r} cannot be created: {parent!r} is a file, not a "
                       "directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir!r} cannot be created: {parent!r} is not writable "
                       "(permission denied)")


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and proves it writable with a probe file (the run's first write)."""
  check_workdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    # One name per process: hosts of a multi-process run may share the workdir.
    probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from e


def check_workdir_writable(workdir: str) -> None:
  """Fails early (before any training) if `workdir` cannot be created or written.

  Creates the directory; prefer `check_workdir` (no writes) then `prepare_workdir`.
  """
  prepare_workdir(workdir)


def atomic_write_text(path: str, text: str) -> None:
  """Writes `path` through a temporary file and a rename, so a kill never leaves half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def config_fingerprint(config) -> str:
  """A stable JSON of the config (written next to checkpoints for provenance)."""
  return json.dumps(config.to_dict(), sort_keys=True, default=str)
