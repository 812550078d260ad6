"""The one-call accelerator benchmark: its tiny preset end to end on the CPU, and its pieces."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import accelerator, recipe_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_peak_table_matches_device_kinds():
  class Device:
    def __init__(self, kind):
      self.device_kind = kind

  assert accelerator.peak_tflops(Device("NVIDIA H100 80GB HBM3")) == 989.4
  assert accelerator.peak_tflops(Device("NVIDIA H100 PCIe")) == 756.0
  assert accelerator.peak_tflops(Device("NVIDIA H200")) == 989.4
  assert accelerator.peak_tflops(Device("NVIDIA A100-SXM4-80GB")) == 312.0
  assert accelerator.peak_tflops(Device("cpu")) is None


def test_model_flops_count_convolutions_matmuls_and_scan_iterations():
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 3, 5), jnp.float32)
  m = jax.ShapeDtypeStruct((7, 4), jnp.float32)

  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z, _ = jax.lax.scan(lambda c, _: (c @ jnp.ones((4, 4)), None), m, None, length=6)
    return y, z

  flops = recipe_step.jaxpr_matmul_flops(jax.make_jaxpr(f)(x, w, m))
  conv = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
  matmul = 6 * 2 * (7 * 4) * 4
  assert flops == conv + matmul


@pytest.mark.slow
def test_tiny_preset_runs_every_method_and_imports_no_data_stack(tmp_path):
  # A fresh process, as on the GPU machine (which has no grain, TensorFlow Datasets or
  # tensorboardX): the whole voc_r101 code path at tiny sizes.
  out = tmp_path / "accelerator.json"
  cache = jax.config.jax_compilation_cache_dir or ""
  subprocess.run([sys.executable, "-m", "experiments.benchmarks.accelerator", "--preset=tiny",
                  f"--out={out}", f"--jax_cache_dir={cache}"], cwd=ROOT, check=True,
                 timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  result = json.loads(out.read_text())
  assert result["heavy_modules_loaded"] == []
  assert set(result["settings"]) == {f"{m}/{s}" for m in accelerator.PRESETS["tiny"]["methods"]
                                     for s in ("per_gpu", "global")}
  for name, entry in result["settings"].items():
    assert "error" not in entry, (name, entry.get("error"))
    assert entry["step_seconds_median"] > 0 and entry["loss_finite"], name
    assert entry["model_flops"] > 0 and entry["compiled_peak_gb"] > 0, name
    assert entry["mfu_measured_peak"] > 0, name
  assert result["settings"]["dgcl/global"]["remat"] == "blocks"
  assert result["settings"]["dgcl/per_gpu"]["dgcl_bank_full"] == 1.0
  # The global batch holds more images than the per-GPU one: more FLOPs.
  assert (result["settings"]["dssn/global"]["model_flops"]
          > result["settings"]["dssn/per_gpu"]["model_flops"])
  assert result["matmul_tflops_measured"]["bfloat16"] > 0
  assert result["targets"]["dgcl_global_step_seconds"] > 0
