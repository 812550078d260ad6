"""The methods' steps are bit-identical to the values recorded before they became plugins.

`recorded_steps.json` holds, for each method's smoke config (SGD, 1 device, synthetic
batches), the metrics of 3 train steps and SHA-256 digests of the final state, recorded with
the code before the plugin refactor (commit 12589ec: methods with their own config blocks in
base.py), with that commit's method, train and config code run on the current pieces it calls
(`semijax/augment/photometric.py`, `semijax/models/`, `semijax/sampling/`, `semijax/banks/`:
issue 17 changed their floating-point order, e.g. the DGCL density's chunking, by design and
under their own NumPy-reference tests). Recipe: `git worktree add /tmp/head 12589ec`, copy
those files in, run `python tests/methods/record_steps.py` there. Any change of a method's
arithmetic, random streams or BatchNorm batches shows up here as a changed bit.
"""

import hashlib
import json
import os

import jax
import numpy as np
import pytest

from tests.parallel import harness

RECORDED = os.path.join(os.path.dirname(__file__), "recorded_steps.json")


def machine() -> dict:
  """What decides XLA:CPU's float order: CPU model and vector width, jax version."""
  import platform  # pylint: disable=g-import-not-at-top
  cpu, flags = "", []
  if os.path.exists("/proc/cpuinfo"):
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name") and not cpu:
        cpu = line.split(":", 1)[1].strip()
      elif line.startswith("flags") and not flags:
        flags = line.split(":", 1)[1].split()
  return {"cpu": cpu, "avx512f": "avx512f" in flags, "jax": jax.__version__,
          "machine": platform.machine()}
FIELDS = ("params", "batch_stats", "ema_params", "ema_batch_stats", "method_state")


def digest(tree) -> str:
  """SHA-256 of every array leaf's bytes, in tree order (PRNG keys skipped)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    if a.dtype == object or str(a.dtype).startswith("key"):
      continue
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def record(name: str, steps: int = 3) -> dict:
  """Metrics of `steps` smoke steps and digests of the final state, for method `name`."""
  config = harness.smoke_config(name)
  config.train.num_devices = 1
  state, history = harness.train(config, steps=steps)
  return {"metrics": [{k: float(np.asarray(v)) for k, v in m.items()} for m in history],
          "digests": {f: digest(getattr(state, f)) for f in FIELDS}}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["supervised", "mean_teacher", "dgcl", "dssn"])
def test_steps_match_the_recording(name):
  with open(RECORDED) as f:
    recorded = json.load(f)
  expected = recorded[name]
  # Bit identity is a property of one compiler on one CPU: elsewhere XLA may order float sums
  # differently, so another machine checks the metrics to float32 rounding instead of bits.
  same_machine = recorded.get("_machine") == machine()
  got = record(name)
  for t, (want, have) in enumerate(zip(expected["metrics"], got["metrics"])):
    for key, value in want.items():
      assert key in have, f"step {t}: metric {key!r} is gone"
      if same_machine:
        assert have[key] == value or (np.isnan(value) and np.isnan(have[key])), (
            f"step {t} {key}: recorded {value!r}, now {have[key]!r}")
      else:
        np.testing.assert_allclose(have[key], value, rtol=1e-5, atol=1e-6,
                                   err_msg=f"step {t} {key}")
  if same_machine:
    assert got["digests"] == expected["digests"]
