"""Segments a folder of images with a trained run: raw label PNGs and colour overlays.

    python -m experiments.predict --workdir=runs/dgcl_1_8 --images=my_images/ --out=preds/ \
        [--model=teacher|student] [--step=best|latest|N] [--window=512 --stride=342]
"""

from absl import app, flags

from experiments import cli

flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
flags.DEFINE_string("images", None, "Folder of images (.jpg, .png, ...).")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_string("step", "best", "'best', 'latest' or a step number.")
flags.DEFINE_enum("model", "teacher", ["teacher", "student"], "Which network predicts.")
flags.DEFINE_integer("window", None, "Sliding-window side (default: automatic for large images).")
flags.DEFINE_integer("stride", None, "Sliding-window stride (default ceil(2/3 window)).")
flags.mark_flags_as_required(["workdir", "images", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup()
  from semijax.train import evaluation  # pylint: disable=g-import-not-at-top
  out = evaluation.predict_folder(FLAGS.workdir, FLAGS.images, FLAGS.out, step=FLAGS.step,
                                  model=FLAGS.model, window=FLAGS.window, stride=FLAGS.stride)
  print(f"[semijax] {out['images']} images -> {out['out_dir']} ({out['model']} @ step "
        f"{out['step']}, {out['mode']})")


if __name__ == "__main__":
  app.run(main)
