"""Set-up shared by the command-line entry points (train, evaluate, demo, predict).

Several processes (hosts) run the same command, each with its own process id; JAX connects
them before any computation (`semijax.parallel.initialize_distributed`):

    # Cloud TPU slice, SLURM (srun), Open MPI (mpirun): detected, no addresses needed
    python -m experiments.train ... --distributed
    # anywhere else: the same command on every host with its own --process_id
    python -m experiments.train ... --coordinator_address=host0:12345 --num_processes=2 \
        --process_id=0
"""

import json
import os

import jax
from absl import flags, logging

flags.DEFINE_string("jax_cache_dir", os.path.expanduser("~/.cache/semijax/jax"),
                    "Persistent XLA compilation cache ('' disables): a resumed or repeated "
                    "run skips recompiling its train step.")
flags.DEFINE_bool("distributed", False,
                  "Join a multi-process run through jax.distributed.initialize(), detecting the "
                  "cluster (Cloud TPU slice, SLURM, Open MPI, Kubernetes) when the flags below "
                  "are not given. Implied by --coordinator_address, --num_processes > 1 or "
                  "JAX_COORDINATOR_ADDRESS.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordinator (default: JAX_COORDINATOR_ADDRESS, or "
                    "detected from the cluster).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: detected).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) "
                     "(default: detected).")
flags.DEFINE_string("coordinator_bind_address", None,
                    "Where process 0's coordinator listens (default: every interface on the "
                    "coordinator's port, or JAX_COORDINATOR_BIND_ADDRESS).")
flags.DEFINE_string("local_device_ids", None,
                    "Comma-separated local devices of this process, e.g. one GPU per process "
                    "(default: all, or SLURM_LOCALID under SLURM; JAX_LOCAL_DEVICE_IDS).")
flags.DEFINE_integer("distributed_timeout", 300,
                     "Seconds to wait for every process to join.")


def setup() -> None:
  """Joins a multi-process run if asked; quiets orbax's INFO logs; enables the compile cache."""
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from semijax import parallel  # pylint: disable=g-import-not-at-top
  if parallel.distributed_requested(coordinator_address=f.coordinator_address,
                                    num_processes=f.num_processes, distributed=f.distributed):
    parallel.initialize_distributed(
        coordinator_address=f.coordinator_address, num_processes=f.num_processes,
        process_id=f.process_id, coordinator_bind_address=f.coordinator_bind_address,
        local_device_ids=f.local_device_ids, timeout_seconds=f.distributed_timeout)
    print(f"[semijax] {parallel.describe_processes()}", flush=True)
  if f.jax_cache_dir:
    jax.config.update("jax_compilation_cache_dir", f.jax_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def report_json(result: dict, out: str = "") -> None:
  """Prints a benchmark's JSON result and, if `out` is set, writes it there (folders created)."""
  text = json.dumps(result, indent=1)
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")
