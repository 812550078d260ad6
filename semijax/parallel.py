"""Device mesh, shardings and process helpers for data-parallel training.

Our trainer runs `jax.jit` over a 1-D `('data',)` mesh of every device of every process:
the global batch is sharded over devices, the state is replicated, and XLA inserts the
gradient all-reduce. BatchNorm over a sharded global batch is SyncBN by construction.
"""

import math
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D data mesh over the first `num_devices` global devices (default: all)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(f"asked for {n} devices but only {len(devices)} are visible")
  return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def is_main_process() -> bool:
  """Only process 0 writes logs, figures and summaries (orbax coordinates checkpoints)."""
  return jax.process_index() == 0


def put_batch(batch: Any, mesh) -> Any:
  """Host-local rows of a global batch -> global arrays sharded over the data axis.

  Each process passes its own rows (`pipeline` reads only those); the global array is
  their concatenation in process order.
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def check_batch_divisible(global_batch: int, mesh, what: str) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
                     f"use a multiple of {n} (or train.grad_accum_steps to keep the recipe)")


def describe(mesh, global_batch: int, unlabeled_batch: int) -> str:
  """One-line summary of the data-parallel layout."""
  n = mesh.devices.size
  return (f"devices {n} ({jax.devices()[0].platform}) over {jax.process_count()} process(es); "
          f"global batch {global_batch} labeled + {unlabeled_batch} unlabeled, per device "
          f"{global_batch / n:g} + {unlabeled_batch / n:g}")


def lcm(a: int, b: int) -> int:
  return a * b // math.gcd(a, b)
