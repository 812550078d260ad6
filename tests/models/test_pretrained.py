"""The shipped pretrained backbone and the source it was trained on."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import base, mean_teacher
from semijax.data import embedded, glyphs
from semijax.models import pretrained, weights
from semijax.train import loop


def test_shipped_weights_load_into_the_embedded_model_completely():
  config = mean_teacher.get_config("")
  assert config.model.pretrained == "embedded"
  config.train.num_devices = 1
  run = loop.Run(config, "/tmp/unused")
  shapes = run.state_shapes()
  params, stats, report = weights.load_backbone(pretrained.path("embedded"), shapes.params,
                                                shapes.batch_stats, stem="small")
  assert report.ok and not report.missing and not report.shape_mismatch
  assert len(report.loaded) == len(jax.tree.leaves(shapes.params["backbone"])) + len(
      jax.tree.leaves(shapes.batch_stats["backbone"]))
  # The state the trainer builds starts from them, teacher included.
  state = run.init_state()
  loaded = np.asarray(params["backbone"]["conv1"]["kernel"])
  np.testing.assert_array_equal(np.asarray(state.params["backbone"]["conv1"]["kernel"]), loaded)
  np.testing.assert_array_equal(np.asarray(state.ema_params["backbone"]["conv1"]["kernel"]),
                                loaded)


def test_shipped_weights_record_how_they_were_made():
  path = pretrained.path("embedded")
  with open(os.path.splitext(path)[0] + ".json") as f:
    record = json.load(f)
  assert record["command"].startswith("python -m experiments.pretrain")
  assert record["held_out_accuracy"] > 0.5
  assert record["model_kwargs"]["widths"] == list(base.get_config().model.kwargs.widths)
  assert record["scene"]["canvas"] == base.get_config().data.embedded.canvas


def test_pretraining_source_shares_no_photograph_with_the_benchmark():
  used = set(embedded._COLOUR_PHOTOS) | set(embedded._GRAY_PHOTOS)   # pylint: disable=protected-access
  assert not used & set(glyphs.SOURCE_PHOTOS)
  assert "chelsea" in used and "cat" not in glyphs.SOURCE_PHOTOS   # skimage's cat is chelsea


def test_glyph_scenes_are_deterministic_and_labelled():
  cfg = glyphs.GlyphConfig(num_scenes=64, glyphs_per_class=2, num_textures=3)
  scene = embedded.SceneConfig(num_train=1, num_val=1)
  glyphs.generate.cache_clear()
  a = glyphs.generate(cfg, scene)
  glyphs.generate.cache_clear()
  b = glyphs.generate(cfg, scene)
  np.testing.assert_array_equal(a["images"], b["images"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  assert a["images"].shape[1:] == (scene.canvas, scene.canvas, 3)
  assert 0 <= a["labels"].min() and a["labels"].max() < len(glyphs.CHARACTERS)


def test_unknown_shipped_name_and_missing_file_are_named():
  with pytest.raises(ValueError, match="embedded"):
    pretrained.path("imagenet")
  config = mean_teacher.get_config("")
  config.model.pretrained = "/no/such/weights.safetensors"
  config.train.num_devices = 1
  with pytest.raises(loop.ConfigError, match="no such file"):
    loop.Run(config, "/tmp/unused").init_state()
