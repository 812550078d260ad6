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
  workdir's checkpoints before it has written anything. (Orbax warns "Given directory is read
  only" and "read_only=True, setting save_interval_steps=0" for every such manager; both describe
  our own choice: the first is filtered out, the second avoided by passing that setting.)
The last `keep` checkpoints and the best one by validation mIoU are kept.

Resume safety: `config_differences(saved, current)` lists the config fields that differ
between the run that wrote a workdir (`config.json`) and the one resuming it, except the
fields of `MAY_DIFFER_ON_RESUME` (logging, evaluation and checkpoint cadence, input workers,
device count); `check_resume_config` refuses the resume naming them, before anything is written.
"""

import contextlib
import errno
import glob
import hashlib
import json
import logging as std_logging
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
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


class _DropReadOnlyNotice(std_logging.Filter):
  """Drops orbax's "Given directory is read only=..." warning and nothing else."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(ORBAX_READ_ONLY_NOTICE)


ORBAX_READ_ONLY_NOTICE = "Given directory is read only"


@contextlib.contextmanager
def _quiet_read_only_notice():
  """While opening a read-only manager: orbax warns that the directory is read only, which is
  what we asked for (inspecting a workdir without writing); the notice alarms users on every
  resume, evaluation and prediction, so it is filtered from absl's logger for that call only."""
  logger = absl_logging.get_absl_logger()
  notice_filter = _DropReadOnlyNotice()
  logger.addFilter(notice_filter)
  try:
    yield
  finally:
    logger.removeFilter(notice_filter)


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
        cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only,
        # Orbax resets these for a read-only manager and warns that it did; say it up front.
        save_interval_steps=0 if read_only else 1)
    if not read_only and jax.process_index() == 0:
      # Unfinished saves of a killed run; orbax would delete them in the background too,
      # but doing it now makes the state of the directory known when this returns.
      for path in glob.glob(os.path.join(glob.escape(self.directory), f"*{TMP_SUFFIX}*")):
        shutil.rmtree(path, ignore_errors=True)
    with _quiet_read_only_notice() if read_only else contextlib.nullcontext():
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
        f"could not write checkpoint {f'step {failed} ' if failed is not None else ''}"
        f"in {self.directory}: {reason}. The previous checkpoint "
        f"({f'step {intact}' if intact is not None else 'none'}) is intact; the unfinished "
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


# ------------------------------------------------------------------------------------------
# Resume safety: a resumed run must be the run that wrote the checkpoint.
# ------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"

# Config fields that may differ between a run and the checkpoint it resumes: they change how a
# run is watched, saved or fed, never the state it reaches or the numbers it reports. Every
# other field (data, split, seeds, model, method and its hyperparameters, optimizer, schedule,
# evaluation protocol, ...) changes the result and must match. An allow-list, so that a field
# added later is compared until someone decides it is harmless.
MAY_DIFFER_ON_RESUME = (
    "train.log_every",          # logging cadence
    "train.eval_every",         # evaluation cadence (evaluation does not touch the state)
    "train.eval_student",       # whether the student is also evaluated during training
    "train.checkpoint_every",   # checkpoint cadence
    "train.keep_checkpoints",   # checkpoints kept on disk
    "train.num_devices",        # the step is device-count independent (README, multi-device);
                                # compared when it decides the BatchNorm groups, see below
    "data.num_workers",         # input worker processes
    "data.eval_batch",          # evaluation batch: per-image results, only the padding differs
    "recipe.source",            # provenance text
)


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
  """`{'a': {'b': 1}}` -> `{'a.b': 1}` for dicts and ConfigDicts; tuples become lists (JSON)."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if hasattr(value, "to_dict") or isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _as_json(config: Any) -> Dict[str, Any]:
  """A config (ConfigDict, nested or flat dict) as the flat JSON values `config.json` holds."""
  flat = _flatten(config) if not (isinstance(config, Mapping) and all(
      not isinstance(v, Mapping) and not hasattr(v, "to_dict") for v in config.values())) \
      else dict(config)
  return json.loads(json.dumps(flat, sort_keys=True, default=str))


def result_fields(config: Any) -> Dict[str, Any]:
  """The flat `{dotted field: value}` of every config field that changes a run's result.

  That is every field except `MAY_DIFFER_ON_RESUME`, with one exception: with
  `train.sync_bn=False`, `train.bn_groups=0` and no `recipe.gpus`, the BatchNorm statistic
  groups follow the device count (`parallel.bn_groups_per_forward`), so `train.num_devices`
  is a result field there.

  Args:
    config: an ml_collections ConfigDict, a nested dict, or the flat dict it becomes.

  Returns:
    JSON-normalised values (tuples as lists), keyed by dotted path, sorted.
  """
  flat = _as_json(config)
  allowed = set(MAY_DIFFER_ON_RESUME)
  if (flat.get("train.sync_bn") is False and not flat.get("train.bn_groups")
      and not flat.get("recipe.gpus")):
    allowed.discard("train.num_devices")
  return {k: v for k, v in sorted(flat.items()) if k not in allowed}


def config_differences(saved: Any, current: Any) -> List[str]:
  """The result-changing fields where `current` differs from `saved`, one line each.

  Args:
    saved: the config the checkpoint was trained with (`config.json`: a nested dict), or a
      ConfigDict.
    current: the config of the run that wants to resume.

  Returns:
    `["data.split: checkpoint '1/8', this run '1/4'", ...]`, sorted by field; empty when the
    runs agree on every `result_fields` field. A field only one side has (a config written
    by another semijax version) is not compared.
  """
  old, new = result_fields(saved), result_fields(current)
  return [f"{k}: checkpoint {old[k]!r}, this run {new[k]!r}"
          for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def load_saved_config(workdir: str) -> Optional[Dict[str, Any]]:
  """The config a workdir was first trained with (`workdir/config.json`), or None if absent.

  Raises:
    CheckpointMismatchError: the file exists but is not a JSON object.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointMismatchError(f"{path}: cannot read the config of the run in this workdir "
                                  f"({e}); use another --workdir") from e
  if not isinstance(saved, dict):
    raise CheckpointMismatchError(f"{path}: expected a JSON object (the run's config)")
  return saved


def check_resume_config(workdir: str, config: Any, *,
                        saved: Optional[Mapping[str, Any]] = None) -> None:
  """Refuses to resume `workdir` with a config that would change the result; writes nothing.

  Args:
    workdir: the run directory holding a checkpoint.
    config: the config of the run that wants to resume.
    saved: the config the checkpoint was trained with; default `workdir/config.json` (no
      check when neither exists).

  Raises:
    CheckpointMismatchError: listing every differing field with both values, the fields that
      may differ, and what to do.
  """
  if saved is None:
    saved = load_saved_config(workdir)
  if saved is None:
    return
  diffs = config_differences(saved, config)
  if diffs:
    raise CheckpointMismatchError(
        f"{os.path.join(workdir, 'checkpoints')} was trained with another config, and these "
        f"fields change the result: {'; '.join(diffs)}. Resuming would mix two runs (and "
        f"results.json would describe neither). Rerun with the checkpoint's values "
        f"({os.path.join(workdir, CONFIG_FILE)}), use another --workdir, or delete this one to "
        f"start over. Fields that may differ on resume: {', '.join(MAY_DIFFER_ON_RESUME)}.")
