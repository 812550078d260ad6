"""The pure packages import without the training stack; missing extras fail clearly or degrade.

`semijax.losses`, `sampling`, `banks`, `pseudo` and `augment` are for researchers who want the
losses in their own JAX code: importing them (in a fresh interpreter) must load jax and numpy
only, not flax, the data tooling or an optional extra. The extras of pyproject.toml
(semijax/extras.py) either raise an error naming the extra (the embedded dataset, SBD) or
degrade (the TensorBoard writer: metrics.jsonl only, one printed note).
"""

import json
import os
import subprocess
import sys

import pytest

from semijax import extras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PURE = ("semijax.losses", "semijax.sampling", "semijax.banks", "semijax.pseudo",
        "semijax.augment")
# The training stack, the data tooling and the optional extras (jax itself imports none).
HEAVY = ("flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets", "tensorboardX",
         "tensorboard", "skimage", "sklearn", "scipy", "PIL", "ml_collections", "absl", "tqdm",
         "safetensors", "chex", "matplotlib", "torch")
# semijax's own training-side packages.
OWN_HEAVY = ("semijax.data", "semijax.train", "semijax.methods", "semijax.models",
             "semijax.eval", "semijax.checkpoint", "semijax.parallel")

_PROBE = """
import json, sys
import jax, jax.numpy, numpy
before = {m.split(".")[0] for m in sys.modules}
import importlib
importlib.import_module(sys.argv[1])
after = {m.split(".")[0] for m in sys.modules}
print(json.dumps({"new": sorted(after - before - set(sys.stdlib_module_names)),
                  "modules": sorted(sys.modules)}))
"""


def _probe(module):
  """The modules `import module` loads in a fresh interpreter (after jax and numpy)."""
  out = subprocess.run([sys.executable, "-c", _PROBE, module], cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _loaded(modules, names):
  return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


@pytest.mark.parametrize("module", PURE)
def test_pure_packages_import_only_jax_and_numpy(module):
  found = _probe(module)
  assert not _loaded(found["modules"], HEAVY), f"{module} imports {found['new']}"
  assert not _loaded(found["modules"], OWN_HEAVY)
  # Beyond jax, numpy (and what they load) and the standard library: semijax itself only.
  assert found["new"] == ["semijax"]


def test_top_level_package_and_extras_module_import_nothing():
  code = ("import json, sys; import semijax, semijax.extras; "
          "print(json.dumps(sorted(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, check=True)
  modules = json.loads(out.stdout.strip().splitlines()[-1])
  assert not _loaded(modules, HEAVY + OWN_HEAVY + ("jax", "numpy"))


def _without(monkeypatch, *names):
  """Makes `import name` fail as if the package were not installed."""
  for name in names:
    monkeypatch.setitem(sys.modules, name, None)


def test_embedded_dataset_names_the_extra_when_scikit_learn_is_missing(monkeypatch):
  from semijax.data import embedded  # pylint: disable=g-import-not-at-top
  _without(monkeypatch, "sklearn", "sklearn.datasets")
  with pytest.raises(extras.MissingExtraError, match=r"embedded dataset .* needs scikit-learn.*"
                                                    r"pip install -e '\.\[embedded\]'"):
    embedded.generate.__wrapped__(embedded.SceneConfig())


def test_embedded_photos_name_the_extra_when_scikit_image_is_missing(monkeypatch):
  from semijax.data import embedded, glyphs  # pylint: disable=g-import-not-at-top
  _without(monkeypatch, "skimage", "skimage.data")
  with pytest.raises(ImportError, match=r"needs scikit-image.*pip install -e '\.\[embedded\]'"):
    embedded._photos()  # pylint: disable=protected-access
  with pytest.raises(extras.MissingExtraError, match=r"\.\[embedded\]"):
    glyphs.source_photos(0, 0)


def test_sbd_reader_names_the_extra_when_scipy_is_missing(monkeypatch, tmp_path):
  from semijax.data import voc  # pylint: disable=g-import-not-at-top
  _without(monkeypatch, "scipy", "scipy.io")
  with pytest.raises(extras.MissingExtraError, match=r"needs scipy.*pip install -e '\.\[sbd\]'"):
    voc.read_sbd_mat(str(tmp_path / "2008_000002.mat"))


def test_writer_without_tensorboardx_writes_jsonl_only_and_says_so_once(monkeypatch, tmp_path,
                                                                        capsys):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from semijax.train import writer as writer_lib  # pylint: disable=g-import-not-at-top
  _without(monkeypatch, "tensorboardX")
  monkeypatch.setattr(writer_lib, "_noted_missing_tensorboardx", False)
  for run in ("a", "b"):
    w = writer_lib.MetricWriter(str(tmp_path / run))
    assert not w.tb_enabled
    w.scalars(3, {"train/loss": 0.5})
    w.image(3, "val/predictions", np.zeros((4, 4, 3), np.uint8))
    w.text(3, "config", "text")
    w.flush()
    w.close()
    with open(tmp_path / run / "metrics.jsonl") as f:
      assert [json.loads(line) for line in f] == [{"step": 3, "train/loss": 0.5}]
    assert not os.path.exists(tmp_path / run / "tensorboard")
  out = capsys.readouterr().out
  assert out.count("tensorboardX is not installed") == 1
  assert "pip install -e '.[tensorboard]'" in out


def test_writer_with_tensorboardx_writes_event_files(tmp_path):
  pytest.importorskip("tensorboardX")
  from semijax.train import writer as writer_lib  # pylint: disable=g-import-not-at-top
  w = writer_lib.MetricWriter(str(tmp_path))
  assert w.tb_enabled
  w.scalars(1, {"train/loss": 1.0})
  w.close()
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
