"""Pretrains the embedded benchmark's backbone on its source task (the ImageNet analogue).

    python -m experiments.pretrain            # ~10 min on 2 CPU cores; deterministic

Trains `ImageClassifier(small ResNet)` to name the character in typeset-character scenes
(`semijax.data.glyphs`: 62 classes, Pillow's bundled font on scikit-image photographs the
benchmark does not use) and writes the backbone, torchvision-named, to
`semijax/models/pretrained/embedded_small.safetensors` with a `.json` beside it (the command,
the settings, the source's held-out accuracy, versions, time). Runs select it with
`--config.model.pretrained=embedded` (the embedded configs' default).

The backbone is the one `experiments/configs/base.py` builds for the embedded data
(`model.kwargs`), so the weights load with no missing or unexpected key.
"""

import dataclasses
import json
import os
import platform
import sys
import time

from absl import app, flags

flags.DEFINE_string("out", "semijax/models/pretrained/embedded_small",
                    "Output path without extension (.safetensors and .json are written).")
flags.DEFINE_integer("steps", 4000, "Optimizer steps.")
flags.DEFINE_integer("batch", 128, "Images per step.")
flags.DEFINE_float("lr", 3e-3, "AdamW peak learning rate (poly decay, 100-step warm-up).")
flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
flags.DEFINE_integer("num_scenes", 40000, "Pretraining scenes (glyphs.GlyphConfig).")
flags.DEFINE_integer("seed", 0, "Initialisation, data order and the source's own draw.")
flags.DEFINE_integer("eval_scenes", 2000, "Scenes held out to report the source accuracy.")
FLAGS = flags.FLAGS


def pretrain(*, steps: int, batch: int, lr: float, weight_decay: float, num_scenes: int,
             seed: int, eval_scenes: int, log=print) -> dict:
  """Trains the classifier; returns `{'params', 'batch_stats', 'report'}` (host arrays)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  from semijax.data import embedded, glyphs  # pylint: disable=g-import-not-at-top
  from semijax.models import classifier, resnet  # pylint: disable=g-import-not-at-top
  from semijax.train import schedules  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  glyph_cfg = glyphs.GlyphConfig(num_scenes=num_scenes + eval_scenes, seed=seed)
  scene_cfg = embedded.SceneConfig(**base.get_config().data.embedded.to_dict())
  data = glyphs.generate(glyph_cfg, scene_cfg)
  images, labels = data["images"], data["labels"]
  n_eval = min(eval_scenes, len(labels) // 10)
  train_x, train_y = images[n_eval:], labels[n_eval:]
  eval_x, eval_y = images[:n_eval], labels[:n_eval]
  log(f"[pretrain] {len(train_y)} train / {n_eval} held-out scenes of "
      f"{len(glyphs.CHARACTERS)} characters ({time.time() - t0:.0f} s to draw)")

  kwargs = base.get_config().model.kwargs.to_dict()
  model = classifier.ImageClassifier(
      num_classes=len(glyphs.CHARACTERS),
      backbone=resnet.small_resnet(widths=tuple(kwargs["widths"]),
                                   stem_width=kwargs["stem_width"],
                                   stem_stride=kwargs["stem_stride"],
                                   stem_pool=kwargs["stem_pool"],
                                   output_stride=kwargs["output_stride"]))
  size = scene_cfg.canvas
  variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  lr_fn = schedules.poly_schedule(lr, steps, warmup_steps=100)
  tx = optax.adamw(lr_fn, weight_decay=weight_decay)
  opt_state = tx.init(params)
  shift = 4

  def augment(rng, x):
    """A random translation of up to `shift` pixels (reflect padding) per image."""
    padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    offsets = jax.random.randint(rng, (x.shape[0], 2), 0, 2 * shift + 1)
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), x.shape[1:]))(
        padded, offsets)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y, step):
    rng = jax.random.fold_in(jax.random.key(seed), step)
    x = augment(rng, jnp.asarray(x, jnp.float32) / 255.0)

    def loss_fn(p):
      logits, mutated = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (mutated["batch_stats"], jnp.mean(jnp.argmax(logits, -1) == y))

    (loss, (new_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss, acc

  @jax.jit
  def predict(params, batch_stats, x):
    logits = model.apply({"params": params, "batch_stats": batch_stats},
                         jnp.asarray(x, jnp.float32) / 255.0, train=False)
    return jnp.argmax(logits, -1)

  def accuracy(x, y):
    hits = sum(int(np.sum(np.asarray(predict(params, batch_stats, x[i:i + 500])) ==
                          y[i:i + 500])) for i in range(0, len(y), 500))
    return hits / len(y)

  order_rng = np.random.default_rng([seed, 4])
  order = np.zeros(0, np.int64)
  t_train, window = time.time(), []
  for step in range(steps):
    if len(order) < batch:
      order = np.concatenate([order, order_rng.permutation(len(train_y))])
    idx, order = order[:batch], order[batch:]
    params, batch_stats, opt_state, loss, acc = train_step(
        params, batch_stats, opt_state, train_x[idx], train_y[idx], step)
    window.append((loss, acc))
    if (step + 1) % 250 == 0 or step + 1 == steps:
      loss_m, acc_m = (float(np.mean([float(v[i]) for v in window])) for i in range(2))
      window = []
      log(f"[pretrain] step {step + 1}/{steps}: loss {loss_m:.3f}, train accuracy "
          f"{100 * acc_m:.1f} %, {time.time() - t_train:.0f} s")
  held_out = accuracy(eval_x, eval_y)
  log(f"[pretrain] held-out accuracy {100 * held_out:.1f} % over {n_eval} scenes")
  report = {
      "task": f"{len(glyphs.CHARACTERS)}-way classification of typeset-character scenes "
              "(semijax.data.glyphs)",
      "glyphs": dataclasses.asdict(glyph_cfg), "scene": dataclasses.asdict(scene_cfg),
      "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
      "steps": steps, "batch": batch, "lr": lr, "weight_decay": weight_decay, "seed": seed,
      "held_out_accuracy": held_out, "train_seconds": time.time() - t_train,
      "total_seconds": time.time() - t0,
  }
  return {"params": jax.device_get(params), "batch_stats": jax.device_get(batch_stats),
          "report": report}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import PIL  # pylint: disable=g-import-not-at-top

  from semijax.models import weights  # pylint: disable=g-import-not-at-top

  out = pretrain(steps=FLAGS.steps, batch=FLAGS.batch, lr=FLAGS.lr,
                 weight_decay=FLAGS.weight_decay, num_scenes=FLAGS.num_scenes, seed=FLAGS.seed,
                 eval_scenes=FLAGS.eval_scenes)
  report = dict(out["report"])
  report["command"] = "python -m experiments.pretrain " + " ".join(sys.argv[1:])
  report["versions"] = {"python": platform.python_version(), "jax": jax.__version__,
                        "numpy": np.__version__, "pillow": PIL.__version__}
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  weights.save_torchvision_safetensors(FLAGS.out + ".safetensors", out["params"],
                                       out["batch_stats"], num_batches_tracked=False)
  with open(FLAGS.out + ".json", "w") as f:
    json.dump(report, f, indent=1)
  print(f"[pretrain] wrote {FLAGS.out}.safetensors and .json "
        f"({report['total_seconds'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
  app.run(main)
