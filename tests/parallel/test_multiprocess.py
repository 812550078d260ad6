"""Two processes on 127.0.0.1 (jax.distributed + gloo) train like one process.

`python -m experiments.train` runs twice with --num_processes=2 and its own --process_id,
one fake CPU device each, on the supervised smoke config: each process reads only its rows
of every global batch, only process 0 writes logs, results and the figure, orbax writes one
checkpoint from both. The reference is the same command in one process with 2 fake devices
(the same global batch, mesh size and XLA CPU client set-up): the final TrainState,
metrics.jsonl and the final mIoUs must agree bitwise (a 2-way all-reduce gives the same
float sum in either order). Against this pytest process (8 fake devices, 2 in the mesh) the
run agrees to 1 ulp only: the XLA CPU client with 8 devices splits some reductions
differently.

Bounded: each process runs under a deadline and both are killed in `finally`; skipped (not
failed) when this jaxlib has no gloo CPU collectives.
"""

import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

import jax
import numpy as np
import pytest

from semijax.train import evaluation

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {"train.total_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 0,
             "train.log_every": 1}
DEADLINE_S = 480


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir: str, *, process_id: Optional[int] = None, port: Optional[int] = None,
            devices: int = 1, log_name: str) -> subprocess.Popen:
  """`python -m experiments.train` as process `process_id` of 2, or alone with `devices`."""
  cmd = [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/supervised.py:smoke", f"--workdir={workdir}",
         f"--jax_cache_dir={jax.config.jax_compilation_cache_dir}"]
  if process_id is not None:
    address = f"127.0.0.1:{port}"
    cmd += [f"--coordinator_address={address}", f"--coordinator_bind_address={address}",
            "--num_processes=2", f"--process_id={process_id}", "--distributed_timeout=120"]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision))
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "SLURM_JOB_ID"):
    env.pop(var, None)   # nothing from an enclosing cluster job
  log = open(log_name, "w")   # a file: a full pipe would block
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log.name
  log.close()
  return proc


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _lines(workdir: str):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_agree_with_one_process(tmp_path):
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  workdir, reference = str(tmp_path / "two"), str(tmp_path / "one")
  port = _free_port()
  procs = [_launch(workdir, process_id=i, port=port, log_name=f"{workdir}.{i}.log")
           for i in range(2)]
  procs.append(_launch(reference, devices=2, log_name=f"{reference}.log"))
  try:
    t0 = time.monotonic()
    for proc in procs:
      proc.wait(timeout=max(1.0, DEADLINE_S - (time.monotonic() - t0)))
  except subprocess.TimeoutExpired:
    pytest.fail(f"the runs exceeded {DEADLINE_S} s:\n" +
                "\n".join(_read(p.log_path)[-2000:] for p in procs))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
  outputs = [_read(p.log_path) for p in procs]
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-4000:]
  print("process 0 of 2:\n" + outputs[0] + "\nprocess 1 of 2:\n" + outputs[1])
  assert "process 0 of 2, 1 local devices of 2" in outputs[0]
  assert "process 1 of 2, 1 local devices of 2" in outputs[1]
  assert "devices 2 (cpu) over 2 process(es)" in outputs[0]
  assert "[semijax] devices" not in outputs[1]   # only process 0 prints the run summary
  assert "devices 2 (cpu) over 1 process(es)" in outputs[2]

  _, a, step_a = evaluation.restore(reference, "latest")
  _, b, step_b = evaluation.restore(workdir, "latest")
  assert step_a == step_b == OVERRIDES["train.total_steps"]
  leaves_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
  leaves_b = jax.tree.leaves(jax.device_get(b))
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  assert _lines(reference) == _lines(workdir)
  one, two = (json.loads(_read(os.path.join(w, "results.json"))) for w in (reference, workdir))
  for key in ("miou_teacher", "miou_student", "per_class_iou_teacher"):
    assert two[key] == one[key], key
  assert os.path.exists(os.path.join(workdir, "predictions.png"))
