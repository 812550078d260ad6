"""The README's "Train on your own data" commands, run as written on the generated folder.

The block between `<!-- own-data:begin -->` and `<!-- own-data:end -->` is split into commands
(backslash continuations joined) and each runs as a subprocess in a fresh folder, so its relative
`data/` and `runs/` paths land there; that folder links `experiments/` to the repository's (the
README runs them from the repository root, where `experiments/configs/...` resolves). The only
change: training gets `smoke` in its config argument and no
supervised warm-up, so the run takes seconds instead of minutes.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def own_data_commands() -> list:
  """The commands of the README block, as argument lists."""
  text = README.read_text()
  match = re.search(r"<!-- own-data:begin -->\s*```bash\n(.*?)```\s*<!-- own-data:end -->", text,
                    flags=re.S)
  assert match, "README.md: no own-data block between <!-- own-data:begin/end --> markers"
  joined = match.group(1).replace("\\\n", " ")
  commands = []
  for line in joined.splitlines():
    line = line.split("#", 1)[0].strip()   # trailing comments
    if line:
      commands.append(shlex.split(line))
  return commands


def smoke(argv: list) -> list:
  """The train command shrunk: `smoke` in the config argument, no supervised warm-up."""
  out = []
  for arg in argv:
    if arg.startswith("--config=") and ":" in arg:
      arg += ",smoke"
    out.append(arg)
  return out + ["--config.train.supervised_warmup_steps=0"]


def test_block_is_the_documented_path():
  modules = [c[2] for c in own_data_commands()]
  assert [c[:2] for c in own_data_commands()] == [["python", "-m"]] * len(modules)
  assert modules == ["experiments.prepare_data", "experiments.prepare_data", "experiments.train",
                     "experiments.evaluate", "experiments.predict"]


@pytest.mark.slow
def test_readme_own_data_commands_run(tmp_path):
  os.symlink(ROOT / "experiments", tmp_path / "experiments")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # one CPU device, as a user's machine (conftest sets 8)
  outputs = []
  for argv in own_data_commands():
    if argv[2] == "experiments.train":
      argv = smoke(argv)
    result = subprocess.run([sys.executable] + argv[1:], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (argv, result.stdout[-3000:], result.stderr[-3000:])
    outputs.append(result.stdout + result.stderr)
  prepare, check, train, evaluate, predict = outputs
  assert "320 images with masks (64 listed as val)" in prepare
  assert "split=1/8 (fraction 0.125_seed0): 32 labeled, 288 unlabeled, 64 val" in check
  assert "no problems found" in check
  assert "32 labeled, 288 unlabeled, 64 val (splits.val)" in train
  for out in (train, evaluate, predict):   # no orbax notices on opening checkpoints read-only
    assert "read only" not in out and "read_only" not in out, out
  run = tmp_path / "runs" / "textures_mt_1_8"
  results = json.loads((run / "results.json").read_text())
  assert results["dataset"] == "folder" and results["split"] == "1/8"
  assert len(results["per_class_iou_teacher"]) == 3
  assert re.search(r"teacher\s+\d+\.\d\d", evaluate) and "per-class IoU (teacher): stripes=" \
      in evaluate
  assert "64 images -> " in predict
  preds = sorted(os.listdir(run / "predictions"))
  assert len(preds) == 128 and preds[0] == "tex_u000.png" and preds[1] == "tex_u000_overlay.jpg"
  label = np.asarray(Image.open(run / "predictions" / "tex_u000.png"))
  assert label.shape == (64, 64) and label.max() < 3
  figure = np.asarray(Image.open(run / "predictions.png"))
  assert figure.shape[1] == 4 * (64 + 2) * 1   # image | ground truth | teacher | student
