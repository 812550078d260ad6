"""Set-up shared by the command-line entry points (train, evaluate, demo, predict)."""

import os

import jax
from absl import flags, logging

flags.DEFINE_string("jax_cache_dir", os.path.expanduser("~/.cache/semijax/jax"),
                    "Persistent XLA compilation cache ('' disables): a resumed or repeated "
                    "run skips recompiling its train step.")


def setup() -> None:
  """Quiet orbax's per-file INFO logs unless -v was given; enable the compilation cache."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if flags.FLAGS.jax_cache_dir:
    jax.config.update("jax_compilation_cache_dir", flags.FLAGS.jax_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
