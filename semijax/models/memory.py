"""Device-memory estimate of a jitted step before compiling it, and a fits-the-device check.

Compiling a ResNet-101 train step takes up to a minute on a CPU host and longer at a big
batch; a run that will not fit the accelerator should say so before that. The estimate here
needs only a trace (`jax.make_jaxpr`, seconds): it replays the step's jaxpr in program
order, keeping every value alive from the equation that makes it to its last use, and
reports the largest total (arguments, which are donated by the trainer, die after their last
use too). Loops count one iteration's temporaries plus their stacked outputs (a scan over
ResNet blocks saves its residuals as `[L, ...]` outputs), conditionals their largest branch,
nested calls (`pjit`, `checkpoint`, custom derivatives) their own peak.

What it does not see: XLA's fusion (elementwise chains are never materialised; a
rematerialised producer is not kept), buffer sharing between non-overlapping values and
the backend's workspace (cuDNN). So it is an estimate, not a bound; `experiments/benchmarks/
memory.py` compares it with XLA's compiled memory analysis per method (BUILD_NOTES).

    est = memory.estimate_step_bytes(step_fn, state_shapes, per_device_batch_shapes)
    message = memory.check_fits(est, jax.local_devices()[0])   # None when it fits
    # or, in one call that traces nothing on a CPU (whose memory size is unknown):
    message = memory.step_fits_message(step_fn, state_shapes, global_batch_shapes,
                                       num_devices=mesh.devices.size)
"""

from typing import Any, Callable, Dict, Optional, Sequence

import jax
import numpy as np
from jax.extend import core as ext_core

# Memory per device of accelerators whose runtime does not report it (bytes, nominal).
DEVICE_MEMORY = {
    "H100": 80 * 10**9,
    "H200": 141 * 10**9,
    "A100-SXM4-80GB": 80 * 10**9,
    "A100-SXM4-40GB": 40 * 10**9,
    "A100 80GB": 80 * 10**9,
    "A100": 40 * 10**9,
}


def _nbytes(aval: Any) -> int:
  shape = getattr(aval, "shape", None)
  dtype = getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:   # extended dtypes (PRNG keys): their underlying words
    itemsize = 8
  return int(np.prod(shape, dtype=np.int64)) * itemsize


def _var_bytes(v: Any) -> int:
  return 0 if isinstance(v, ext_core.Literal) else _nbytes(v.aval)


def _sub_jaxprs(eqn) -> Sequence[Any]:
  """The jaxprs an equation runs (`ClosedJaxpr`s or `Jaxpr`s), from its params."""
  subs = []
  for value in eqn.params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, ext_core.ClosedJaxpr):
        subs.append(item.jaxpr)
      elif isinstance(item, ext_core.Jaxpr):
        subs.append(item)
  return subs


def jaxpr_peak_bytes(jaxpr: Any) -> int:
  """Largest total size of the values alive at once while `jaxpr` runs (see the module doc).

  Args:
    jaxpr: a `Jaxpr` or `ClosedJaxpr`.

  Returns:
    Bytes, arguments and outputs included.
  """
  if isinstance(jaxpr, ext_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  last_use: Dict[Any, int] = {}
  n = len(jaxpr.eqns)
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if not isinstance(v, ext_core.Literal):
        last_use[v] = i
  for v in jaxpr.outvars:
    if not isinstance(v, ext_core.Literal):
      last_use[v] = n
  live = {v: _var_bytes(v) for v in list(jaxpr.invars) + list(jaxpr.constvars)}
  current = sum(live.values())
  peak = current
  for i, eqn in enumerate(jaxpr.eqns):
    out_bytes = sum(_var_bytes(v) for v in eqn.outvars)
    in_bytes = sum(_var_bytes(v) for v in eqn.invars)
    inner = 0
    for sub in _sub_jaxprs(eqn):
      sub_in = sum(_var_bytes(v) for v in list(sub.invars) + list(sub.constvars))
      sub_out = sum(_var_bytes(v) for v in sub.outvars)
      inner = max(inner, jaxpr_peak_bytes(sub) - sub_in - sub_out)
    if eqn.primitive.name == "scan":   # one iteration's slices besides the stacked arrays
      inner += in_bytes // max(int(eqn.params.get("length", 1)), 1)
    peak = max(peak, current + out_bytes + max(inner, 0))
    for v in eqn.outvars:
      if not isinstance(v, ext_core.DropVar):
        live[v] = _var_bytes(v)
        current += live[v]
    for v in eqn.invars:
      if not isinstance(v, ext_core.Literal) and last_use.get(v) == i and v in live:
        current -= live.pop(v)
    for v in eqn.outvars:   # results nobody reads
      if v in live and v not in last_use:
        current -= live.pop(v)
  return int(peak)


def estimate_step_bytes(fn: Callable, *args: Any, **kwargs: Any) -> int:
  """Estimated peak device memory of `fn(*args, **kwargs)` (traced, not compiled).

  Args:
    fn: the (un-jitted or jitted) step.
    *args, **kwargs: arrays or `jax.ShapeDtypeStruct`s as ONE device sees them (for a
      data-parallel step: the replicated state and the per-device batch).

  Returns:
    Bytes.
  """
  strip = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
                     if hasattr(x, "shape") and hasattr(x, "dtype") else x)
  args, kwargs = jax.tree.map(strip, (args, kwargs))
  return jaxpr_peak_bytes(jax.make_jaxpr(fn)(*args, **kwargs))


def per_device(batch: Any, num_devices: int) -> Any:
  """`jax.ShapeDtypeStruct`s of one device's rows of a global batch (leading axis split)."""
  def one(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"batch of {x.shape[0]} rows does not split over {num_devices} devices")
    return jax.ShapeDtypeStruct((x.shape[0] // num_devices,) + tuple(x.shape[1:]), x.dtype)
  return jax.tree.map(one, batch)


def device_memory_bytes(device: Optional[Any] = None) -> Optional[int]:
  """Memory of `device` in bytes: what its runtime reports, else the nominal size of a known
  accelerator (`DEVICE_MEMORY`, matched in `device_kind`), else None (e.g. a CPU)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  kind = getattr(device, "device_kind", "") or ""
  for name in sorted(DEVICE_MEMORY, key=len, reverse=True):
    if name in kind:
      return DEVICE_MEMORY[name]
  return None


def check_fits(estimate_bytes: int, device: Optional[Any] = None, *,
               limit_bytes: Optional[int] = None, margin: float = 0.9) -> Optional[str]:
  """A warning when `estimate_bytes` exceeds `margin` x the device's memory, else None.

  Args:
    estimate_bytes: from `estimate_step_bytes`.
    device: the device the step runs on (default: the first local one).
    limit_bytes: the device's memory, overriding `device_memory_bytes(device)`.
    margin: fraction of the memory the step may use (the runtime keeps some).

  Returns:
    A one-paragraph message naming the estimate, the device memory and the remedies, or
    None when it fits or the device's memory is unknown.
  """
  limit = limit_bytes if limit_bytes is not None else device_memory_bytes(device)
  if not limit or estimate_bytes <= margin * limit:
    return None
  kind = getattr(device or jax.local_devices()[0], "device_kind", "device")
  return (f"the train step needs an estimated {estimate_bytes / 2**30:.1f} GiB per device, "
          f"more than {margin:.0%} of the {limit / 2**30:.1f} GiB of a {kind}; it will "
          "probably run out of memory. Use model.remat=blocks (or full), more devices, or "
          "train.grad_accum_steps > 1.")


def step_fits_message(step_fn: Callable, state: Any, global_batch: Any, *, num_devices: int,
                      device: Optional[Any] = None, margin: float = 0.9) -> Optional[str]:
  """`check_fits` of a data-parallel train step, traced only when the device's size is known.

  The trainer calls this once before compiling its step (a CPU reports no memory size, so
  nothing is traced there).

  Args:
    step_fn: `step(state, batch)` (jitted or not).
    state: the (abstract) train state, replicated on every device.
    global_batch: the (abstract) global batch; each device gets `1 / num_devices` of its rows.
    num_devices: devices of the data mesh.
    device: a device of the mesh (default: the first local one).
    margin: see `check_fits`.

  Returns:
    The warning, or None.
  """
  limit = device_memory_bytes(device)
  if not limit:
    return None
  estimate = estimate_step_bytes(step_fn, state, per_device(global_batch, num_devices))
  return check_fits(estimate, device, limit_bytes=limit, margin=margin)
