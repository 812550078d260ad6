"""Metric writing: TensorBoard event files (tensorboardX) and a JSONL log, process 0 only.

clu's metric writers need TensorFlow; tensorboardX writes the same event files with
protobuf alone, so TensorFlow stays out of the install. tensorboardX is an optional extra
(`tensorboard`, also in `demo` and `dev`): without it a run writes `metrics.jsonl` only and
says so once.
"""

import json
import os
from typing import Dict, Optional

import numpy as np

from semijax import extras

_noted_missing_tensorboardx = False


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, or None (and one printed note per process) without it."""
  global _noted_missing_tensorboardx
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not _noted_missing_tensorboardx:
      _noted_missing_tensorboardx = True
      print("[semijax] note: tensorboardX is not installed, so no TensorBoard event files are "
            "written (metrics.jsonl only); to get them: "
            f"{extras.install_hint('tensorboard')}", flush=True)
    return None
  return SummaryWriter


def truncate_jsonl(path: str, resume_step: int) -> None:
  """Drops the lines a killed run logged after its last checkpoint (`step > resume_step`).

  Also drops `final/` lines (the resumed run writes them again) and a half-written last
  line, so that a resumed run's log equals an uninterrupted run's.
  """
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record.get("step", 0) <= resume_step and not any(k.startswith("final/")
                                                           for k in record):
        keep.append(line.rstrip("\n") + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


class MetricWriter:
  """Scalars, images and the config to `workdir/tensorboard` and `workdir/metrics.jsonl`.

  Without tensorboardX (an optional extra) only `metrics.jsonl` is written and `tb_enabled`
  is False.

  Args:
    workdir: the run directory.
    enabled: False on processes other than 0.
    resume_step: the checkpoint step a resumed run continues from: later lines of
      metrics.jsonl are dropped and TensorBoard hides later events (`purge_step`).
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
    self.enabled = enabled
    self.logdir = os.path.join(workdir, "tensorboard")
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        truncate_jsonl(path, resume_step)
      summary_writer = _summary_writer_class()
      if summary_writer is not None:
        os.makedirs(self.logdir, exist_ok=True)
        self._tb = summary_writer(self.logdir, flush_secs=30,
                                  purge_step=None if resume_step is None else resume_step + 1)
      self._jsonl = open(path, "a")

  @property
  def tb_enabled(self) -> bool:
    """Whether TensorBoard event files are written (process 0 with tensorboardX installed)."""
    return self._tb is not None

  def scalars(self, step: int, values: Dict[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    clean = {f"{prefix}{k}": float(v) for k, v in values.items() if np.ndim(v) == 0}
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """`image` uint8 [H, W, 3]."""
    if self._tb is not None:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def text(self, step: int, name: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(name, text, step)

  def flush(self) -> None:
    if self.enabled:
      if self._tb is not None:
        self._tb.flush()
      self._jsonl.flush()

  def close(self, final: Optional[Dict[str, float]] = None) -> None:
    if not self.enabled:
      return
    del final
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
