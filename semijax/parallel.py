"""Device mesh, shardings and process helpers for data-parallel training.

Our trainer runs `jax.jit` over a 1-D `('data',)` mesh of every device of every process:
the global batch is sharded over devices, the state is replicated, and XLA inserts the
gradient all-reduce. BatchNorm over a sharded global batch is SyncBN by construction.

Three numbers describe a step's layout, and only the first changes the results:
  * the global batch B (`data.labeled_batch`, `data.unlabeled_batch`): per optimizer step,
    whatever the number of devices, processes or micro-batches;
  * `train.grad_accum_steps` A: the step runs A forward/backward passes on micro-batches of
    B/A rows (micro-batch a holds rows a, a + A, a + 2A, ... of the global batch) and
    averages their gradients, so one small device reproduces a recipe's global batch;
  * the devices n: each micro-batch is sharded over them (B/(A n) rows per device).
BatchNorm statistics are either global per forward pass (`train.sync_bn=True`, SyncBN; with
A > 1 a forward pass sees one micro-batch) or per group of rows (`train.sync_bn=False`, the
recipe's unsynchronised per-GPU BN, `bn_groups_per_forward`).
"""

import math
import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
  """A 1-D data mesh over the first `num_devices` global devices (default: all).

  With several processes every device of every process must take part (each process
  feeds its own rows to its own devices), so `num_devices` must then be all of them.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if n > len(devices):
    raise ValueError(f"asked for {n} devices but only {len(devices)} are visible")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"asked for {n} of the {len(devices)} devices of a "
                     f"{jax.process_count()}-process run; a multi-process run uses every "
                     "device (set it to 0)")
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


def check_batch_divisible(global_batch: int, mesh, what: str, *, grad_accum_steps: int = 1,
                          bn_groups: int = 1) -> None:
  """Raises ValueError unless `global_batch` splits into whole rows per device and group.

  Args:
    global_batch: rows per optimizer step.
    mesh: the data mesh (its device count n).
    what: the config field, for the message.
    grad_accum_steps: micro-batches A per step; each must split over the n devices.
    bn_groups: BatchNorm statistic groups per forward pass; each micro-batch must split
      into them.
  """
  n = mesh.devices.size
  need = lcm(n, bn_groups) * grad_accum_steps
  if global_batch % need == 0:
    return
  if need == n:
    raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
                     f"use a multiple of {n}, or fewer devices (train.num_devices)")
  parts = [f"{n} devices"]
  if bn_groups > 1:
    parts.append(f"{bn_groups} BatchNorm groups per forward pass")
  if grad_accum_steps > 1:
    parts.append(f"{grad_accum_steps} micro-batches (train.grad_accum_steps)")
  raise ValueError(f"{what}={global_batch} does not split into whole rows per "
                   f"{' and '.join(parts)}; use a multiple of {need}")


def bn_groups_per_forward(*, sync_bn: bool, bn_groups: int, recipe_gpus: int,
                          num_devices: int, grad_accum_steps: int) -> int:
  """The model's `bn_batch_groups`: BatchNorm statistic groups in one forward pass.

  Args:
    sync_bn: True for SyncBN (statistics over the whole forward batch): returns 1.
    bn_groups: with `sync_bn=False`, the number G of statistic groups per optimizer step,
      i.e. the GPUs of the recipe being reproduced (each had its own BN statistics);
      0 means `recipe_gpus`, or else one group per device per micro-batch.
    recipe_gpus: `recipe.gpus` (0 when unknown).
    num_devices: devices of the mesh.
    grad_accum_steps: micro-batches A per optimizer step; each forward pass holds G/A groups.

  Returns:
    G / A.

  Raises:
    ValueError: G is not a multiple of A (a micro-batch would hold part of a group).
  """
  if sync_bn:
    return 1
  groups = bn_groups or recipe_gpus or num_devices * grad_accum_steps
  if groups % grad_accum_steps:
    raise ValueError(f"{groups} BatchNorm groups per step (train.bn_groups, else recipe.gpus) "
                     f"do not split over train.grad_accum_steps={grad_accum_steps} "
                     "micro-batches: use a number of micro-batches that divides it")
  return groups // grad_accum_steps


def describe(mesh, global_batch: int, unlabeled_batch: int, *, grad_accum_steps: int = 1,
             bn_groups: int = 1) -> str:
  """One-line summary of the data-parallel layout (global and per-device batches)."""
  n, a = mesh.devices.size, grad_accum_steps
  parts = [f"{global_batch} labeled"] + ([f"{unlabeled_batch} unlabeled"]
                                         if unlabeled_batch else [])
  per_device = " + ".join(f"{b // (a * n)}" if b % (a * n) == 0 else f"{b / (a * n):g}"
                          for b in (global_batch, unlabeled_batch) if b)
  text = (f"devices {n} ({mesh.devices.flat[0].platform}) over {jax.process_count()} "
          f"process(es); global batch {' + '.join(parts)} per optimizer step")
  if a > 1:
    micro = " + ".join(f"{b // a}" for b in (global_batch, unlabeled_batch) if b)
    text += f" in {a} micro-batches of {micro} (train.grad_accum_steps)"
  text += f"; per device {per_device} per forward pass"
  text += ("; BatchNorm synchronised over each forward pass" if bn_groups == 1 else
           f"; BatchNorm statistics per group of rows, {bn_groups} groups per forward pass")
  return text


def lcm(a: int, b: int) -> int:
  return a * b // math.gcd(a, b)


# ------------------------------------------------------------------------------------------
# Several processes (hosts).
# ------------------------------------------------------------------------------------------

# Environment variables read by `jax.distributed.initialize` (jax 0.10) and its cluster
# detection; listed in the README's multi-host section.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT",
                   "JAX_COORDINATOR_BIND_ADDRESS", "JAX_LOCAL_DEVICE_IDS")


def initialize_distributed(*, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           coordinator_bind_address: Optional[str] = None,
                           local_device_ids: Optional[str] = None,
                           timeout_seconds: int = 300) -> None:
  """`jax.distributed.initialize` before any JAX computation (one call per process).

  With no arguments JAX detects the cluster: Cloud TPU slices (every host runs the same
  command), SLURM (`srun`, one task per node or per GPU: SLURM_JOB_ID, SLURM_NTASKS,
  SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST), Open MPI (`mpirun`) and Kubernetes
  indexed jobs. Elsewhere give the coordinator's `host:port` (process 0's machine), the
  number of processes and this process's id, or the `JAX_COORDINATOR_ADDRESS` variable.

  Args:
    coordinator_address: `host:port` of process 0's coordinator service.
    num_processes: processes in the run.
    process_id: this process, in [0, num_processes).
    coordinator_bind_address: where process 0's coordinator listens (default every
      interface, `[::]:port`); e.g. `127.0.0.1:port` for a single machine.
    local_device_ids: comma-separated local device ids this process uses (one GPU per
      process), e.g. `'0'`; default all (or SLURM_LOCALID under SLURM).
    timeout_seconds: how long to wait for every process to join.
  """
  kwargs = dict(coordinator_address=coordinator_address or None,
                num_processes=num_processes, process_id=process_id,
                coordinator_bind_address=coordinator_bind_address or None,
                initialization_timeout=timeout_seconds)
  if local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in local_device_ids.split(",")]
  jax.distributed.initialize(**kwargs)


def distributed_requested(*, coordinator_address: Optional[str], num_processes: Optional[int],
                          distributed: bool) -> bool:
  """Whether the command line (or JAX_COORDINATOR_ADDRESS) asks for several processes."""
  return bool(distributed or coordinator_address or (num_processes or 1) > 1
              or os.environ.get("JAX_COORDINATOR_ADDRESS"))


def sync_processes(name: str) -> None:
  """A barrier across processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def describe_processes() -> str:
  """This process's place in the run, e.g. 'process 1 of 2, 4 local devices of 8'."""
  return (f"process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local devices of {jax.device_count()}")
