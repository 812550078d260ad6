"""Hostile inputs: each is refused with an error naming the culprit, and nothing is written.

Every case runs both `train_and_evaluate` and `check` (the train command's `--check`) and
compares the workdir before and after: a workdir that did not exist still does not, and one
that held a run (checkpoint, logs, an unfinished save) is byte-for-byte unchanged. Nothing
here reaches the train step, so no test compiles it.
"""

import errno
import glob
import hashlib
import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from experiments.configs import base, mean_teacher, supervised
from semijax import checkpoint
from semijax.data import image_io, validation
from semijax.data.sources import DataError
from semijax.train import loop
from tests.data import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def snapshot(path):
  """Every entry under `path`: mode, size, mtime (ns) and, for files, a SHA-256 (None if absent)."""
  if not os.path.exists(path):
    return None
  out = {".": os.lstat(path).st_mtime_ns}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.lstat(full)
      digest = None
      if name in files:
        with open(full, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(full, path)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
  return out


def assert_refused(config, workdir, error, match):
  """Both entry points raise `error` matching `match` and leave `workdir` as it was."""
  before = snapshot(workdir)
  with pytest.raises(error, match=match):
    loop.check(config, workdir, reference=base.get_config())
  assert snapshot(workdir) == before, "--check changed the workdir"
  with pytest.raises(error, match=match):
    loop.train_and_evaluate(config, workdir, progress=False)
  assert snapshot(workdir) == before, "a refused run changed the workdir"


def host_state(run, value: float = 0.0):
  """A TrainState of `run`'s shapes as NumPy arrays (no init compile needed to save one)."""
  return jax.tree.map(lambda x: np.full(x.shape, value, x.dtype), run.state_shapes())


def _small(config):
  config.train.num_devices = 1
  config.train.eval_every = 0
  return config


def folder_config(root, split="full", val_fraction=0.25):
  c = _small(supervised.get_config("smoke"))
  c.data.dataset = "folder"
  c.data.root = root
  c.data.split = split
  c.data.val_fraction = val_fraction
  c.data.crop_size = 16
  return c


@pytest.fixture
def folder(tmp_path):
  """A valid 8-image binary folder dataset (6 labeled, 2 val, 2 extra unlabeled)."""
  d = fixtures.make_folder(str(tmp_path / "data"))
  c = folder_config(d["root"])
  loop.check(c, str(tmp_path / "fresh"))  # the intact dataset passes
  return d


def _png(root, part, stem):
  return os.path.join(root, part, stem + ".png")


def _first_labeled(root):
  """A stem of the labeled set and its image path (the split is seeded, so this is stable)."""
  parts = loop.Run(folder_config(root), "unused").data
  item = parts.labeled.items[0]
  return item.id, item.image, item.label


def test_corrupt_image_is_named(folder, tmp_path):
  stem, image, _ = _first_labeled(folder["root"])
  with open(image, "wb") as f:
    f.write(b"this is not an image" * 10)
  assert_refused(folder_config(folder["root"]), str(tmp_path / "run"), DataError,
                 f"{stem}.*(cannot read image header|cannot decode)")


def test_truncated_labeled_image_and_label_are_named(folder, tmp_path):
  stem, image, label = _first_labeled(folder["root"])
  size = os.path.getsize(label)
  with open(label, "rb") as f:
    head = f.read(size // 2)
  with open(label, "wb") as f:
    f.write(head)   # header intact, pixel data cut
  assert_refused(folder_config(folder["root"]), str(tmp_path / "run"), DataError,
                 f"masks/{stem}.png: cannot decode")


def test_truncated_unlabeled_image_is_named_without_decoding(folder, tmp_path):
  path = os.path.join(folder["root"], "unlabeled", "extra_001.jpg")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) * 2 // 3])
  with pytest.raises(DataError, match="extra_001.jpg: cannot decode"):
    validation.check_image_file(path)
  assert_refused(folder_config(folder["root"]), str(tmp_path / "run"), DataError,
                 "extra_001.jpg")


def test_jpeg_with_trailing_bytes_is_not_refused(tmp_path):
  path = str(tmp_path / "padded.jpg")
  image_io.write_image(path, fixtures.random_image("x"))
  with open(path, "ab") as f:
    f.write(b"\0" * 500)   # some cameras pad after the end marker
  assert validation.check_image_file(path) == (fixtures.SIZE[1], fixtures.SIZE[0])


def test_label_size_mismatch_is_named(folder, tmp_path):
  stem, _, label = _first_labeled(folder["root"])
  image_io.write_label(label, np.zeros((fixtures.SIZE[0] + 3, fixtures.SIZE[1]), np.uint8))
  assert_refused(folder_config(folder["root"]), str(tmp_path / "run"), DataError,
                 f"masks/{stem}.png: label size 28x23 .*does not match image")


def test_out_of_range_label_values_are_named(folder, tmp_path):
  stem, _, label = _first_labeled(folder["root"])
  bad = folder["masks"][stem].copy()
  bad[0, 0] = 7
  image_io.write_label(label, bad)
  assert_refused(folder_config(folder["root"]), str(tmp_path / "run"), DataError,
                 rf"masks/{stem}.png: label values \[7\]")


def _explicit(root, splits):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(root, "dataset.json"), "w") as f:
    json.dump({"class_names": ["background", "foreground"], "splits": splits}, f)


def test_split_list_naming_missing_files(folder, tmp_path):
  _explicit(folder["root"], {"labeled": ["case_001", "case_404"], "val": ["case_002"]})
  c = folder_config(folder["root"], split="explicit", val_fraction=0.0)
  assert_refused(c, str(tmp_path / "run"), DataError,
                 "splits.labeled names 1 stems that are not images with masks: case_404")
  # VOC with the shipped split lists over a folder holding only a few of their files.
  voc = fixtures.make_voc(str(tmp_path / "voc"))
  c = _small(supervised.get_config("smoke"))
  c.data.dataset, c.data.root, c.data.split = "voc", voc["root"], "92"
  assert_refused(c, str(tmp_path / "run_voc"), DataError, "files not found")


def test_overlapping_labeled_and_unlabeled_sets(folder, tmp_path):
  _explicit(folder["root"], {"labeled": ["case_001", "case_003"], "unlabeled": ["case_003"],
                             "val": ["case_002"]})
  c = folder_config(folder["root"], split="explicit", val_fraction=0.0)
  assert_refused(c, str(tmp_path / "run"), DataError,
                 "'case_003' is in splits.labeled and splits.unlabeled")


def test_empty_splits(folder, tmp_path):
  c = folder_config(folder["root"], split="explicit", val_fraction=0.0)
  _explicit(folder["root"], {"labeled": [], "val": ["case_002"]})
  assert_refused(c, str(tmp_path / "run"), DataError, "splits.labeled is empty")
  _explicit(folder["root"], {"labeled": ["case_001"]})
  assert_refused(c, str(tmp_path / "run"), DataError, "no validation images")
  # A fraction asked of a folder that lists its splits, and the other way round.
  assert_refused(folder_config(folder["root"]), str(tmp_path / "run"), DataError,
                 "lists splits.labeled; a val_fraction could hold out labeled images")
  assert_refused(folder_config(folder["root"], val_fraction=0.0), str(tmp_path / "run"),
                 DataError, r"lists splits.labeled, so a labeled fraction \(1\) has nothing to "
                 "draw from: train on the list with split=explicit")


def test_unknown_field_and_wrong_type(tmp_path):
  workdir = str(tmp_path / "run")
  c = _small(mean_teacher.get_config("smoke"))
  c.train.totl_steps = 5  # a config file may add fields before the CLI locks it
  with pytest.raises(loop.ConfigError, match="unknown config field 'train.totl_steps' "
                                             r"\(did you mean 'train.total_steps'\?\)"):
    loop.check(c, workdir, reference=base.get_config())
  c = _small(mean_teacher.get_config("smoke"))
  del c.train["log_every"]
  c.train.log_every = "10"
  with pytest.raises(loop.ConfigError, match="config.train.log_every='10' is str; expected int"):
    loop.check(c, workdir, reference=base.get_config())
  for field, value, match in (("nonfinite", "explode", r"nonfinite='explode'; expected one of"),
                              ("total_steps", 0, "total_steps=0; expected an integer >= 1"),
                              ("num_devices", 64, "num_devices=64: asked for 64 devices")):
    c = _small(mean_teacher.get_config("smoke"))
    c.train[field] = value
    assert_refused(c, workdir, loop.ConfigError, match)
  c = _small(mean_teacher.get_config("smoke"))
  c.data.labeled_batch = 7
  c.train.num_devices = 2
  assert_refused(c, workdir, loop.ConfigError, "labeled_batch=7 is not divisible by the 2")
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("name", sorted(
    os.path.basename(f)[:-3] for f in glob.glob(os.path.join(REPO, "experiments", "configs",
                                                             "*.py"))
    if os.path.basename(f) not in ("__init__.py", "base.py", "common.py", "recipes.py")))
def test_shipped_configs_pass_the_schema_check(name):
  """Every field a config file sets exists in base.py with a value of the same type."""
  module = importlib.import_module(f"experiments.configs.{name}")
  for arg in ("", "smoke"):
    loop.check_config(module.get_config(arg), base.get_config())


def _train_command(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "experiments.train",
       "--config=experiments/configs/mean_teacher.py:smoke", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_train_command_refuses_bad_config_in_one_line(tmp_path):
  workdir = str(tmp_path / "run")
  for flag, message in (("--config.train.totl_steps=5", 'Did you mean "total_steps"'),
                        ("--config.train.nonfinite=explode", "nonfinite='explode'")):
    out = _train_command(f"--workdir={workdir}", flag, "--check")
    assert out.returncode == 1, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
  out = _train_command(f"--workdir={workdir}", "--config.train.total_steps=abc")
  assert out.returncode == 1 and "--config.train.total_steps=abc" in out.stderr
  assert not os.path.exists(workdir)


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
  """A workdir holding a supervised smoke checkpoint, logs and an unfinished save."""
  workdir = str(tmp_path_factory.mktemp("sup") / "run")
  config = _small(supervised.get_config("smoke"))
  run = loop.Run(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(2, host_state(run), {"next_index": 2}, run.meta())
  ckpt.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 2, "train/loss": 1.0}\n')
  os.makedirs(os.path.join(workdir, "checkpoints", "3" + checkpoint.TMP_SUFFIX))  # a killed save
  return config, workdir


def test_checkpoint_of_another_method_or_model(supervised_run, tmp_path):
  config, workdir = supervised_run
  other = _small(mean_teacher.get_config("smoke"))
  assert_refused(other, workdir, checkpoint.CheckpointMismatchError,
                 "method: checkpoint has 'supervised', this run 'mean_teacher'")
  wider = _small(supervised.get_config("smoke"))
  wider.model.kwargs.widths = (8, 8, 16, 32)
  assert_refused(wider, workdir, checkpoint.CheckpointMismatchError,
                 r"num_params: checkpoint has \d+, this run \d+.*shape or structure")
  other_optimizer = _small(supervised.get_config("smoke"))
  other_optimizer.optim.name = "sgd" if config.optim.name == "adamw" else "adamw"
  assert_refused(other_optimizer, workdir, checkpoint.CheckpointMismatchError,
                 "optimizer: checkpoint has .*state_fingerprint")
  # The matching config passes --check (and names the step it would resume from).
  before = snapshot(workdir)
  assert loop.check(config, workdir)["resume_step"] == 2
  assert snapshot(workdir) == before


def test_checkpoint_without_fingerprint_still_refuses_wrong_shapes(tmp_path):
  """Checkpoints written before the fingerprint was recorded: orbax's error, named."""
  workdir = str(tmp_path / "old")
  config = _small(supervised.get_config("smoke"))
  run = loop.Run(config, workdir)
  meta = {k: v for k, v in run.meta().items() if k not in ("num_params", "state_fingerprint")}
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(1, host_state(run), {}, meta)
  ckpt.close()
  wider = _small(supervised.get_config("smoke"))
  wider.model.kwargs.widths = (8, 8, 16, 32)
  run = loop.Run(wider, workdir)
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="does not fit this run's state"):
    ckpt.restore(1, host_state(run), meta)
  ckpt.close()


def test_workdir_that_cannot_be_written(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  config = _small(mean_teacher.get_config("smoke"))
  assert_refused(config, str(blocker / "run"), checkpoint.WorkdirError,
                 "cannot be created: .*a_file' is a file")
  assert_refused(config, str(blocker), checkpoint.WorkdirError, "exists and is not a directory")
  assert blocker.read_text() == "not a directory"
  if os.geteuid() == 0:
    pytest.skip("permission bits do not bind the superuser")
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    assert_refused(config, str(locked / "run"), checkpoint.WorkdirError, "not writable")
  finally:
    locked.chmod(0o700)


def test_full_disk_during_save_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  """ENOSPC while orbax commits step 3: a clear error, step 2 intact, step 3 cleaned up later.

  The disk "fills up" when the commit marker of step 3 is written (every array is written by
  then, so nothing races with the checks below); a failure in the middle of writing the
  arrays leaves the same unfinished directory behind.
  """
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = _small(supervised.get_config("smoke"))
  run = loop.Run(config, workdir)
  state = host_state(run, 0.5)
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(2, state, {"next_index": 2}, run.meta())
  ckpt.wait()
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self):
    if self.get_final().name != "3":
      return await original(self)
    path = self.get() / atomicity.COMMIT_SUCCESS_FILE
    path.write_text("Checkpoint com")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full_disk)
  ckpt.save(3, host_state(run, 1.5), {"next_index": 3}, run.meta())
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r"could not write checkpoint step 3 in .*: No space left on device "
                           r".*previous checkpoint \(step 2\) is intact.*Free some space"):
    ckpt.wait()
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", original)
  ckpt.close()
  assert sorted(os.listdir(ckpt.directory)) == ["2", "3" + checkpoint.TMP_SUFFIX]
  ckpt = checkpoint.Checkpointer(workdir)   # what a resumed run does first
  assert sorted(os.listdir(ckpt.directory)) == ["2"]
  restored, data, _ = ckpt.restore(ckpt.latest_step(), state, run.meta())
  assert ckpt.latest_step() == 2 and data == {"next_index": 2}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()


def test_image_modes_that_decode_are_accepted(tmp_path):
  """The cheap unlabeled check never refuses a valid file (gray PNG, RGBA PNG, BMP)."""
  image = fixtures.random_image("y")
  for name, img in (("gray.png", Image.fromarray(image[..., 0])),
                    ("rgba.png", Image.fromarray(np.dstack([image, image[..., :1]]))),
                    ("plain.bmp", Image.fromarray(image))):
    path = str(tmp_path / name)
    img.save(path)
    assert validation.check_image_file(path) == (fixtures.SIZE[1], fixtures.SIZE[0])
