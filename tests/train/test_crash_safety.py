"""Crash safety: SIGKILL at a random step, SIGTERM, a kill during a save, a full disk, NaNs.

The killed runs are real `python -m experiments.train` processes; the uninterrupted reference
and the resumed runs train in this process. Both compile the same train step (the same XLA
flags and matmul precision, and the tests' persistent compilation cache is passed on), so
"equal" below means bitwise equal: every array of the final TrainState, every line of
metrics.jsonl and the final mIoUs.

The kill step is drawn from a seeded generator (SEMIJAX_KILL_SEED, default 0), so a CI
failure can be replayed; runs watch `checkpoints/` (one save per step) to know the step.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mean_teacher, supervised
from semijax import checkpoint
from semijax.data import pipeline, sources, transforms
from semijax.data.sources import DataError
from semijax.methods.supervised import Supervised
from semijax.train import evaluation, loop, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
# One save per step (keep 2: older steps are deleted as the run goes, a kill may land in a
# deletion too), logs every 2 steps (a checkpoint at an odd step holds a partial window).
OVERRIDES = {"train.num_devices": 1, "train.total_steps": STEPS, "train.eval_every": 0,
             "train.checkpoint_every": 1, "train.log_every": 2}
SEED = int(os.environ.get("SEMIJAX_KILL_SEED", "0"))
_STEP_DIR = re.compile(r"^(\d+)(" + re.escape(checkpoint.TMP_SUFFIX) + ".*)?$")

pytestmark = pytest.mark.slow


def smoke_config(**extra):
  """The subprocesses' config; runs in this process save only at the end unless asked."""
  c = mean_teacher.get_config("smoke")
  for key, value in {**OVERRIDES, "train.checkpoint_every": 0, **extra}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


@pytest.fixture(scope="module", autouse=True)
def reuse_train_steps():
  """Runs in this process with the same config share one step function (one trace/compile).

  Only a speed-up: the subprocesses build their own, and the tests check that both agree
  bitwise. The key holds the method's loss so that a patched loss gets its own step.
  """
  original, cache = step_lib.make_train_step, {}

  def cached(model, method, config):
    settings = config.to_dict()
    for field in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                  "nonfinite"):   # read by the host loop only, never by the step
      settings["train"].pop(field)
    key = (json.dumps(settings, sort_keys=True, default=str), type(method).loss)
    if key not in cache:
      cache[key] = original(model, method, config)
    return cache[key]

  step_lib.make_train_step = cached
  yield
  step_lib.make_train_step = original


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              # The precision and XLA flags of this process (conftest), so the subprocess
              # compiles the same executable and finds it in the shared cache.
              JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision),
              XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))


def start_training(workdir, *, python_code=None, env=None):
  """`python -m experiments.train` on the smoke config (or `python -c python_code`, same flags)."""
  head = ["-c", python_code] if python_code else ["-m", "experiments.train"]
  cmd = [sys.executable, *head, "--config=experiments/configs/mean_teacher.py:smoke",
         f"--workdir={workdir}", f"--jax_cache_dir={jax.config.jax_compilation_cache_dir}"]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  log = open(workdir + ".log", "w")   # a file, not a pipe: a full pipe would block the run
  proc = subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=log,
                          stderr=subprocess.STDOUT)
  proc.log_path = log.name
  log.close()
  return proc


def output(proc):
  with open(proc.log_path) as f:
    return f.read()


def steps_on_disk(workdir):
  """`{step: finished?}` of the step directories in `workdir/checkpoints`."""
  directory = os.path.join(workdir, "checkpoints")
  out = {}
  for name in os.listdir(directory) if os.path.isdir(directory) else ():
    m = _STEP_DIR.match(name)
    if m:
      out[int(m.group(1))] = m.group(2) is None
  return out


def wait_for(condition, proc, timeout=300.0, poll=0.002):
  t0 = time.monotonic()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"training exited with {proc.returncode} first:\n"
                           f"{output(proc)[-3000:]}")
    if time.monotonic() - t0 > timeout:
      raise AssertionError(f"timed out after {timeout:.0f} s")
    time.sleep(poll)


def stop(proc):
  """Kills `proc` if it still runs, and returns its output."""
  if proc.poll() is None:
    proc.kill()
  proc.wait(timeout=60)
  return output(proc)


def latest_step(workdir):
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.manager.close()


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_same_run(reference, workdir):
  """Final state, metrics.jsonl and results of `workdir` equal the reference's, bitwise."""
  _, a, step_a = evaluation.restore(reference, "latest")
  _, b, step_b = evaluation.restore(workdir, "latest")
  assert step_a == step_b == STEPS
  leaves_a, leaves_b = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0], \
      jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  assert _lines(reference) == _lines(workdir)
  res_a, res_b = (json.load(open(os.path.join(w, "results.json"))) for w in (reference, workdir))
  for key in ("miou_teacher", "miou_student", "per_class_iou_teacher", "skipped_steps"):
    assert res_a[key] == res_b[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run (in this process)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  res = loop.train_and_evaluate(smoke_config(), workdir, progress=False)
  assert res["steps_this_run"] == STEPS
  assert [rec["step"] for rec in _lines(workdir)] == [2, 4, 6, 6]
  return workdir


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(reference, tmp_path):
  rng = random.Random(SEED)
  kill_at, delay = rng.randint(2, STEPS - 2), rng.uniform(0.0, 0.3)
  workdir = str(tmp_path / "run")
  proc = start_training(workdir)
  try:
    wait_for(lambda: max(steps_on_disk(workdir), default=0) >= kill_at, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    out = stop(proc)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  on_disk, resume_from = steps_on_disk(workdir), latest_step(workdir)
  print(f"SIGKILL after step {kill_at} + {delay:.2f} s: step dirs {on_disk}, "
        f"resuming from {resume_from}")
  assert resume_from is not None and resume_from < STEPS
  res = loop.train_and_evaluate(smoke_config(), workdir, progress=False)
  assert res["steps_this_run"] == STEPS - resume_from
  assert_same_run(reference, workdir)


def test_sigterm_saves_at_the_next_step_and_exits_0(reference, tmp_path):
  rng = random.Random(SEED + 1)
  signal_at = rng.choice([1, 3])   # odd: the checkpoint holds a partial logging window
  workdir = str(tmp_path / "run")
  proc = start_training(workdir)
  try:
    wait_for(lambda: max(steps_on_disk(workdir), default=0) >= signal_at, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    out = stop(proc)
  assert proc.returncode == 0, out[-3000:]
  assert re.search(r"stopped \(signal\) at step \d+", out), out[-3000:]
  on_disk = steps_on_disk(workdir)
  assert all(on_disk.values()), f"unfinished save left behind: {on_disk}"
  saved = latest_step(workdir)
  assert signal_at <= saved < STEPS and not os.path.exists(os.path.join(workdir,
                                                                         "results.json"))
  loop.train_and_evaluate(smoke_config(), workdir, progress=False)
  assert_same_run(reference, workdir)


# Runs the train command with the commit of step K's checkpoint stalled (all files written,
# the final rename not yet done): the test kills the process inside that window.
_STALLED_SAVE = """
import asyncio, os, sys
from orbax.checkpoint._src.path import atomicity
K, MARK = os.environ["STALL_STEP"], os.environ["STALL_MARK"]
original = atomicity.AtomicRenameTemporaryPath.finalize
async def stalled(self):
  if self.get_final().name == K:
    open(MARK, "w").close()
    await asyncio.sleep(600)
  return await original(self)
atomicity.AtomicRenameTemporaryPath.finalize = stalled
from absl import app
from experiments import train
app.run(train.main, flags_parser=train.parse_flags)
"""


def test_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  workdir, mark, stall = str(tmp_path / "run"), str(tmp_path / "stalled"), 3
  proc = start_training(workdir, python_code=_STALLED_SAVE,
                        env={"STALL_STEP": str(stall), "STALL_MARK": mark})
  try:
    wait_for(lambda: os.path.exists(mark), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    stop(proc)
  assert steps_on_disk(workdir) == {stall - 2: True, stall - 1: True, stall: False}
  tmp = os.path.join(workdir, "checkpoints", f"{stall}{checkpoint.TMP_SUFFIX}")
  assert {"state", "data", "meta"} <= set(os.listdir(tmp))   # written, never committed
  assert latest_step(workdir) == stall - 1
  _, state, step = evaluation.restore(workdir, "latest")
  assert step == int(state.step) == stall - 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
  # The next run deletes the unfinished directory and saves that step again.
  out = loop.train_and_evaluate(smoke_config(), workdir, progress=False, max_steps=1)
  assert out == {"stopped_at": stall}
  assert steps_on_disk(workdir) == {stall - 1: True, stall: True}


def test_full_disk_during_a_save_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top

  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self):
    if self.get_final().name == "3":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
    return await original(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  workdir = str(tmp_path / "run")
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r"step 3 .*No space left on device.*previous checkpoint \(step 2\) "
                           "is intact"):
    loop.train_and_evaluate(smoke_config(**{"train.checkpoint_every": 1}), workdir,
                            progress=False)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", original)
  assert latest_step(workdir) == 2
  assert steps_on_disk(workdir)[3] is False   # removed by the next run (see above)


def test_bad_record_met_mid_run_is_named_and_keeps_the_checkpoints(tmp_path, monkeypatch):
  """A file that passed the start-up checks but fails when read (e.g. it changed on disk)."""
  config = smoke_config(**{"train.checkpoint_every": 1})
  run = loop.Run(config, "unused")
  augment = transforms.TrainAugment(crop_size=config.data.crop_size,
                                    scale_range=tuple(config.data.scale_range))
  ds = pipeline.semi_dataset(run.data.labeled, run.data.unlabeled,
                             labeled_batch=config.data.labeled_batch,
                             unlabeled_batch=config.data.unlabeled_batch, seed=config.seed,
                             augment=augment)
  seen = {int(i) for b in range(3) for i in ds[b]["unlabeled"]["index"]}
  bad_row = next(int(i) for i in ds[3]["unlabeled"]["index"] if int(i) not in seen)  # step 4
  original = sources.ArraySource.__getitem__
  unlabeled_rows = np.asarray(run.data.unlabeled.indices)

  def getitem(self, i):
    # The unlabeled source (it keeps its hidden masks for the diagnostics, so match by rows).
    if np.array_equal(self.indices, unlabeled_rows) and int(self.indices[i]) == bad_row:
      raise DataError(f"{self.info.name}[{bad_row}]: cannot decode (injected)")
    return original(self, i)

  monkeypatch.setattr(sources.ArraySource, "__getitem__", getitem)
  workdir = str(tmp_path / "run")
  with pytest.raises(DataError, match=rf"\[{bad_row}\]: cannot decode \(injected\) \(training "
                                      r"stopped before step 4; the last checkpoint, step 3, is "
                                      r"intact\)"):
    loop.train_and_evaluate(config, workdir, progress=False)
  assert steps_on_disk(workdir) == {2: True, 3: True}


# ------------------------------------------------------------------------------------------
# Non-finite losses. The supervised smoke loss is made NaN at one step (a separate compile
# from the runs above, shared by the three tests below).
# ------------------------------------------------------------------------------------------

NAN_STEP = 2   # state.step of the poisoned update, i.e. the update that makes step 3


@pytest.fixture
def nan_at_step(monkeypatch):
  original = Supervised.loss

  def poisoned(self, ctx):
    loss, metrics, extras = original(self, ctx)
    return loss * jnp.where(ctx.step == NAN_STEP, jnp.nan, 1.0), metrics, extras

  monkeypatch.setattr(Supervised, "loss", poisoned)


def nan_config(policy, log_every):
  c = supervised.get_config("smoke")
  for key, value in dict(OVERRIDES, **{"train.total_steps": 5, "train.nonfinite": policy,
                                       "train.log_every": log_every,
                                       "train.keep_checkpoints": 10}).items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _state_at(workdir, step):
  _, state, _ = evaluation.restore(workdir, step)
  return jax.device_get(state)


def test_nonfinite_skip_policy_skips_counts_and_logs(nan_at_step, tmp_path, capsys):
  del nan_at_step
  workdir = str(tmp_path / "run")
  res = loop.train_and_evaluate(nan_config("skip", 1), workdir, progress=False)
  assert res["skipped_steps"] == 1 and res["steps_this_run"] == 5
  assert "1 update(s) skipped in steps 3..3 (first: step 3)" in capsys.readouterr().out
  lines = {rec["step"]: rec for rec in _lines(workdir) if "train/loss" in rec}
  assert [lines[s]["train/skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
  assert np.isnan(lines[3]["train/loss"]) and lines[3]["train/finite"] == 0.0
  assert all(np.isfinite(lines[s]["train/loss"]) for s in (1, 2, 4, 5))
  before, skipped, after = (_state_at(workdir, s) for s in (2, 3, 4))
  assert int(skipped.step) == 3 and int(skipped.skipped_steps) == 1
  for field in ("params", "opt_state", "batch_stats", "ema_params", "ema_batch_stats"):
    for x, y in zip(jax.tree.leaves(getattr(before, field)),
                    jax.tree.leaves(getattr(skipped, field))):
      np.testing.assert_array_equal(x, y, err_msg=field)   # the update was not applied
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(skipped.params),
                                                       jax.tree.leaves(after.params)))


@pytest.mark.parametrize("log_every", [1, 4], ids=["noticed_at_log", "noticed_at_save"])
def test_nonfinite_stop_policy_keeps_the_last_good_checkpoint(nan_at_step, tmp_path, log_every):
  del nan_at_step
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"in the update of step 3; .*last good checkpoint \(step 2\)"):
    loop.train_and_evaluate(nan_config("stop", log_every), workdir, progress=False)
  assert steps_on_disk(workdir) == {1: True, 2: True}
  state = _state_at(workdir, "latest")
  assert int(state.step) == 2 and int(state.skipped_steps) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
