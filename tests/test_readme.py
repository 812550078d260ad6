"""The README's code snippets run as written (8 fake CPU devices from conftest)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 4


@pytest.mark.slow   # several snippets compile and run losses and banks end to end (30-60 s each)
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
  exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {})  # noqa: S102
