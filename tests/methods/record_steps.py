"""Writes tests/methods/recorded_steps.json (see test_recorded_steps.py).

    python tests/methods/record_steps.py [methods...]

Run it from a checkout of the code to record (the recording is the reference the current code
must reproduce bit for bit); it uses the test settings (8 fake CPU devices, 1 in the mesh,
`highest` matmul precision).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.getcwd())

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests.methods import test_recorded_steps  # noqa: E402


def main(names):
  path = test_recorded_steps.RECORDED
  out = json.load(open(path)) if os.path.exists(path) else {}
  for name in names:
    out[name] = test_recorded_steps.record(name)
    print(name, out[name]["metrics"][-1]["loss"], flush=True)
  out["_machine"] = test_recorded_steps.machine()
  with open(path, "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
  main(sys.argv[1:] or ["supervised", "mean_teacher", "dgcl", "dssn"])
