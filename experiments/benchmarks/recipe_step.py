"""A method's compiled train step at a recipe's scale, without data on disk.

Shared by the compile-time, memory and accelerator benchmarks. The config is a method's
official recipe (`experiments/configs/<method>.py:dataset=voc,...` with a root that need not
exist); the model, optimizer, state and step are built from the library's pieces
(`semijax.models.registry`, `semijax.train.{schedules,state,step}`), as `train.loop.Run`
does, but without the data sources, so nothing here imports grain, tensorboardX or orbax.
The state and batch are abstract (`jax.ShapeDtypeStruct`s with shardings), so a step can be
lowered, compiled and analysed (memory, FLOPs) without allocating it.
"""

import copy
import dataclasses
import importlib
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = {"voc": 21, "cityscapes": 19}
DEFAULT_RECIPE = dict(dataset="voc", protocol="blended_cps", split="1/16")


def recipe_config(method: str, *, dataset: str = "voc", protocol: str = "blended_cps",
                  split: str = "1/16", root: str = "/nonexistent/semijax-benchmark"):
  """The official recipe config of `method` (the dataset root is never read)."""
  module = importlib.import_module(f"experiments.configs.{method}")
  return module.get_config(f"dataset={dataset},protocol={protocol},split={split},root={root}")


def embedded_config(method: str, arg: str = ""):
  """A method's embedded (CPU) config."""
  return importlib.import_module(f"experiments.configs.{method}").get_config(arg)


def override(config, **fields):
  """A copy of `config` with dotted fields set (`model.remat='blocks'`); None skips a field."""
  config = copy.deepcopy(config)
  with config.unlocked():
    for dotted, value in fields.items():
      if value is None:
        continue
      node = config
      *parents, leaf = dotted.replace("__", ".").split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def build_model(config, num_classes: int, method, *, bn_batch_groups: int = 1):
  """`train.loop.build_model`, plus `model.remat` (which the trainer does not pass yet)."""
  from semijax.models import registry  # pylint: disable=g-import-not-at-top
  kwargs = dict(config.model.kwargs.to_dict()) if config.model.get("kwargs") else {}
  if bn_batch_groups > 1:
    kwargs["bn_batch_groups"] = bn_batch_groups
  remat = config.model.get("remat", "none")
  if remat != "none":
    kwargs.setdefault("remat", remat)
  return registry.build_model(config.model.name, num_classes=num_classes,
                              dtype=config.model.dtype, heads=method.heads(num_classes),
                              **kwargs)


@dataclasses.dataclass
class Step:
  """A jitted train step with abstract arguments.

  Attributes:
    fn: `jax.jit(step, donate_argnums=0)`.
    state: abstract TrainState (replicated over the mesh).
    batch: abstract global batch (uint8 images, sharded over the mesh's data axis).
    mesh: the device mesh.
    model, method, config: what the step was built from.
    info: facts for a report (method, devices, batches, crop, dtype, remat, params).
    init: `rng -> TrainState`, the state `state` describes.
  """
  fn: Any
  state: Any
  batch: Any
  mesh: Any
  model: Any
  method: Any
  config: Any
  info: Dict[str, Any]
  init: Any = None

  def trace(self):
    """`jax.jit(...).trace`: the jaxpr (`.jaxpr`) and, from it, `.lower()`."""
    return self.fn.trace(self.state, self.batch)

  def lower(self):
    return self.fn.lower(self.state, self.batch)


def _abstract_batch(config, uses_unlabeled: bool, mesh) -> Dict[str, Dict[str, Any]]:
  from jax.sharding import (
    NamedSharding,  # pylint: disable=g-import-not-at-top
    PartitionSpec as P,
  )
  s = config.data.crop_size
  sharding = NamedSharding(mesh, P("data"))

  def part(n):
    return {"image": jax.ShapeDtypeStruct((n, s, s, 3), jnp.uint8, sharding=sharding),
            "label": jax.ShapeDtypeStruct((n, s, s), jnp.uint8, sharding=sharding),
            "pad": jax.ShapeDtypeStruct((n, s, s), jnp.bool_, sharding=sharding),
            "index": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)}
  batch = {"labeled": part(config.data.labeled_batch)}
  if uses_unlabeled and config.data.unlabeled_batch:
    batch["unlabeled"] = part(config.data.unlabeled_batch)
  return batch


def build_step(config, *, num_devices: int = 1, num_classes: Optional[int] = None,
               warmup: bool = False) -> Step:
  """The config's train step over `num_devices` devices, with abstract state and batch.

  The config's batches are global (`data.labeled_batch` over all devices, as the trainer).
  """
  from jax.sharding import (
    NamedSharding,  # pylint: disable=g-import-not-at-top
    PartitionSpec as P,
  )

  from semijax import methods, parallel  # pylint: disable=g-import-not-at-top
  from semijax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  if num_classes is None:
    num_classes = NUM_CLASSES.get(config.data.dataset, 11)
  mesh = parallel.make_mesh(num_devices)
  method = methods.get(config.method.name)(config)
  groups = parallel.bn_groups_per_forward(
      sync_bn=bool(config.train.get("sync_bn", True)),
      bn_groups=int(config.train.get("bn_groups", 0) or 0),
      recipe_gpus=int(config.get("recipe", {}).get("gpus", 0) or 0),
      num_devices=num_devices, grad_accum_steps=int(config.train.get("grad_accum_steps", 1)))
  model = build_model(config, num_classes, method, bn_batch_groups=groups)
  init = make_init(config, model, method, num_classes)
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                       jax.eval_shape(init, jax.random.key(config.seed)))
  batch = _abstract_batch(config, method.uses_unlabeled and not warmup, mesh)
  fn = jax.jit(step_lib.make_train_step(model, method, config, warmup=warmup),
               donate_argnums=0)
  size = config.data.crop_size
  info = {"method": config.method.name, "model": config.model.name,
          "devices": num_devices, "labeled_batch": config.data.labeled_batch,
          "unlabeled_batch": (config.data.unlabeled_batch if method.uses_unlabeled
                              and not warmup else 0),
          "crop_size": size, "dtype": config.model.dtype,
          "remat": config.model.get("remat", "none"),
          "scan_blocks": bool(getattr(model.backbone, "scan_blocks", False)),
          "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))}
  return Step(fn, state, batch, mesh, model, method, config, info, init)


def make_init(config, model, method, num_classes: int):
  """`rng -> TrainState` as `train.loop.init_train_state` with the configured optimizer."""
  from semijax.train import (
    schedules,  # pylint: disable=g-import-not-at-top
    state as state_lib,  # pylint: disable=g-import-not-at-top
    step as step_lib,  # pylint: disable=g-import-not-at-top
  )
  size = config.data.crop_size
  params_shape = jax.eval_shape(
      lambda rng: step_lib.init_variables(model, rng, (1, size, size, 3)), jax.random.key(0))
  tx = schedules.make_optimizer(
      name=config.optim.name, base_lr=config.optim.base_lr,
      total_steps=config.train.total_steps, head_lr_mult=config.optim.head_lr_mult,
      momentum=config.optim.momentum, weight_decay=config.optim.weight_decay,
      power=config.optim.power, warmup_steps=config.optim.warmup_steps,
      params=params_shape[0])

  def init(rng):
    params, batch_stats = step_lib.init_variables(model, rng, (1, size, size, 3))
    outputs = jax.eval_shape(
        lambda: model.apply({"params": params, "batch_stats": batch_stats},
                            np.zeros((1, size, size, 3), np.float32), train=False))
    method_state = method.init_state(jax.random.fold_in(rng, 1), num_classes=num_classes,
                                     outputs=outputs)
    return state_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                       batch_stats=batch_stats, method_state=method_state)
  return init


def compile_step(step: Step) -> Dict[str, Any]:
  """Lowers and compiles `step`; returns the executable and the seconds of both phases."""
  t = time.perf_counter()
  lowered = step.lower()
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  return {"compiled": compiled, "lower_seconds": lower_s, "compile_seconds": compile_s}


def memory_stats(compiled) -> Dict[str, int]:
  """XLA's compiled memory analysis (bytes per device); `peak_bytes` as the device needs it.

  `peak_bytes` = arguments + outputs + temporaries - aliased (donated) bytes: what one
  device holds while the step runs (XLA's own `peak_memory_in_bytes` where it reports one).
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k, 0) or 0) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")}
  computed = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
              + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  out["peak_bytes"] = max(out.get("peak_memory_in_bytes", 0), computed)
  return out


def cost_flops(compiled) -> float:
  """XLA's cost-analysis FLOPs of one call (per device for a partitioned step)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def concrete_inputs(step: Step, seed: int = 0):
  """A fresh state on the mesh and a random batch (uint8 images, labels) of `step`'s shapes."""
  from semijax import parallel  # pylint: disable=g-import-not-at-top
  shardings = jax.tree.map(lambda s: s.sharding, step.state)
  state = jax.jit(step.init, out_shardings=shardings)(jax.random.key(step.config.seed))
  num_classes = NUM_CLASSES.get(step.config.data.dataset, 11)
  rs = np.random.default_rng(seed)
  batch = {}
  for part, rec in step.batch.items():
    batch[part] = {
        "image": rs.integers(0, 256, rec["image"].shape, dtype=np.uint8),
        "label": rs.integers(0, num_classes, rec["label"].shape).astype(np.uint8),
        "pad": np.zeros(rec["pad"].shape, bool),
        "index": np.arange(rec["index"].shape[0], dtype=np.int32)}
  return state, parallel.put_batch(batch, step.mesh)


def jaxpr_matmul_flops(jaxpr) -> float:
  """FLOPs of the convolutions and matmuls a jaxpr runs (2 per multiply-add).

  Scan bodies count `length` times (XLA's cost analysis counts a loop body once, which
  undercounts a scanned ResNet by its number of blocks); `while` bodies (loops whose trip
  count is data-dependent, e.g. DGCL's density chunks) and the larger branch of a `cond`
  count once. Elementwise work is not counted (model FLOPs, as MFU is usually defined).
  """
  from jax.extend import core as jex  # pylint: disable=g-import-not-at-top
  if isinstance(jaxpr, jex.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      out = eqn.outvars[0].aval
      out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * np.prod(out.shape) * np.prod(rhs.shape) / out_features
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
          [lhs.shape[d] for d in contract])
    subs = [jaxpr_matmul_flops(s) for s in jex.jaxprs_in_params(eqn.params)]
    if subs:
      if name == "scan":
        total += eqn.params["length"] * sum(subs)
      elif name == "cond":
        total += max(subs)
      else:
        total += sum(subs)
  return float(total)


def fill_banks(state, seed: int = 0):
  """`state` with every `ClassBank` in its method state full of random entries.

  DGCL's loss waits for full banks (official); a benchmark starting from an empty bank
  would time a step without its contrastive loss.
  """
  from semijax.banks import fifo  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def fill(x):
    if not isinstance(x, fifo.ClassBank):
      return x
    entries = {k: jax.device_put(rng.standard_normal(v.shape).astype(v.dtype), v.sharding)
               for k, v in x.entries.items()}
    full = jnp.full_like(x.count, x.capacity)
    return fifo.ClassBank(entries=entries, ptr=jnp.zeros_like(x.ptr), count=full)

  return state.replace(method_state=jax.tree.map(
      fill, state.method_state, is_leaf=lambda x: isinstance(x, fifo.ClassBank)))
