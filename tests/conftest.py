"""Test-wide setup: 8 fake CPU devices (set before JAX is imported anywhere)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests compare against float32 NumPy references; keep XLA's default matmul precision exact.
jax.config.update("jax_default_matmul_precision", "highest")
# Compiled executables are reused across tests (and subprocesses, and later runs): several
# tests train the same smoke config, and compiling dominates their time on 2 cores.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("SEMIJAX_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "semijax-test-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA's optimisation passes off for a module: pure compile cost in small numeric tests.

  Use with `pytestmark = pytest.mark.usefixtures("fast_compiles")`.
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="session")
def mesh8():
  """A 1-D `data` mesh over the 8 fake CPU devices (Auto axis, as our trainer uses)."""
  assert jax.device_count() == 8, "conftest must run before JAX initialises"
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# Folders whose tests train, compile whole train steps or run benchmark scripts: `make
# test-fast` (`-m "not slow"`) leaves them out; `make test` runs everything.
SLOW_FOLDERS = ("train", "parallel", "methods", "benchmarks")


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    parts = item.path.parts
    if "tests" in parts and parts[parts.index("tests") + 1] in SLOW_FOLDERS:
      item.add_marker(pytest.mark.slow)
