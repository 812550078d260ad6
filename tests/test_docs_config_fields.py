"""The config fields the docs name exist, so the README's commands cannot go stale.

Every `--config.<path>=` override in README.md's code blocks is checked against the config its
command line loads (`--config=experiments/configs/<file>.py[:args]`, built with those args);
inline overrides and `config.<path>` references in README.md and BUILD_NOTES.md are checked
against their paired config where the same span or table row names one, else against every
method's config (with every registered term). Configs only: nothing is compiled or trained.
"""

import functools
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUILD_NOTES = ROOT / "BUILD_NOTES.md"
CONFIG_FILES = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py")
                      if "def get_config(arg" in p.read_text())

_CONFIG_ARG = re.compile(r"(?:--config=experiments/configs/|\b)(\w+)\.py(?::([^\s`\"'|]*))?")
_OVERRIDE = re.compile(r"--config\.([A-Za-z_][\w.]*[\w])=")
_REFERENCE = re.compile(r"(?<![\w./-])config\.([A-Za-z_][\w.]*[\w])(?![\w.])")
_FILE_SUFFIXES = ("json", "yaml", "yml", "py", "txt")


def _code_and_prose(text):
  """(code-block commands with backslash continuations joined, prose with its line numbers)."""
  commands, prose, block, in_code = [], [], [], False
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith("```"):
      in_code = not in_code
      continue
    if in_code:
      block.append((number, line))
      if not line.rstrip().endswith("\\"):
        commands.append((block[0][0], " ".join(text.rstrip().rstrip("\\") for _, text in block)))
        block = []
    else:
      prose.append((number, line))
  return commands, prose


@functools.cache
def _config(name, args):
  module = importlib.import_module(f"experiments.configs.{name}")
  return module.get_config(args)


def _has(config, path):
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


@functools.cache
def _all_configs():
  """Each method's default config, on each dataset, and mean teacher with each term."""
  from semijax import methods  # pylint: disable=g-import-not-at-top
  out = [_config(name, args) for name in CONFIG_FILES
         for args in ("", "dataset=voc", "dataset=cityscapes")]
  out += [_config("mean_teacher", f"terms={t}") for t in methods.names()["terms"]]
  return tuple(out)


def _exists_anywhere(path):
  return any(_has(c, path) for c in _all_configs())


def _paired(text):
  """The single `<file>.py[:args]` config that `text` names, or None."""
  found = {(m.group(1), (m.group(2) or "").rstrip(".,;:)")) for m in _CONFIG_ARG.finditer(text)
           if m.group(1) in CONFIG_FILES}
  return found.pop() if len(found) == 1 else None


def _code_overrides():
  commands, _ = _code_and_prose(README.read_text())
  out = []
  for number, command in commands:
    for path in _OVERRIDE.findall(command):
      out.append((number, _paired(command), path))
  return out


def _prose_references():
  out = []
  for doc in (README, BUILD_NOTES):
    _, prose = _code_and_prose(doc.read_text())
    text = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    starts = [0]
    for _, line in prose:
      starts.append(starts[-1] + len(line) + 1)
    for span in re.finditer(r"`([^`]+)`", text):
      index = next(i for i in range(len(numbers)) if starts[i + 1] > span.start())
      number, content = numbers[index], span.group(1)
      # Paired only with a config in the same span (a table row's other cells: any config).
      pair = _paired(content)
      for path in _OVERRIDE.findall(content):
        out.append((f"{doc.name}:{number}", pair, path))
      for path in _REFERENCE.findall(content.replace("--config.", "")):
        if path.rsplit(".", 1)[-1] in _FILE_SUFFIXES:   # a file such as a run's config.json
          continue
        out.append((f"{doc.name}:{number}", None, path))
  return out


CODE = _code_overrides()
PROSE = _prose_references()


def test_docs_have_overrides():
  assert len(CODE) >= 6, CODE
  assert sum(pair is not None for _, pair, _ in CODE) >= 6, CODE
  assert len(PROSE) >= 20, PROSE


def test_stale_fields_are_caught():
  assert not _has(_config("dssn", ""), "dssn.pseudo_rule")
  assert not _has(_config("dgcl", ""), "dgcl.contra_weight")
  assert not _exists_anywhere("dgcl.steps_per_epoch")
  assert _has(_config("dgcl", ""), "pseudo_label.entropy_percentile.steps_per_epoch")
  assert _paired("--config=experiments/configs/dgcl.py:split=1/8,preset=paper \\") == (
      "dgcl", "split=1/8,preset=paper")


@pytest.mark.parametrize("number,pair,path", CODE, ids=[f"README:{n}:{p}" for n, _, p in CODE])
def test_readme_command_override_exists(number, pair, path):
  if pair is None:
    assert _exists_anywhere(path), f"README.md:{number}: no config has --config.{path}"
    return
  name, args = pair
  assert _has(_config(name, args), path), (
      f"README.md:{number}: --config.{path} is not a field of {name}.py:{args}")


@pytest.mark.parametrize("where,pair,path", PROSE, ids=[f"{w}:{p}" for w, _, p in PROSE])
def test_docs_reference_exists(where, pair, path):
  if pair is not None:
    assert _has(_config(*pair), path), f"{where}: --config.{path} is not a field of {pair}"
    return
  assert _exists_anywhere(path), f"{where}: no config has the field {path}"
