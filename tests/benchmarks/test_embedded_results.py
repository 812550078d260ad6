"""The results-table helpers: mean +- std per method and split, paired differences per seed."""

import pytest

from experiments.benchmarks import embedded_results


def _rows():
  values = {("supervised", 0): 50.0, ("supervised", 1): 60.0, ("supervised", 2): 55.0,
            ("mean_teacher", 0): 52.0, ("mean_teacher", 1): 61.0, ("mean_teacher", 2): 58.0,
            ("dgcl", 0): 49.0, ("dgcl", 1): 60.0}
  return [dict(method=m, split="1/16", seed=s, miou_teacher=v, train_seconds=120.0)
          for (m, s), v in values.items()]


def test_table_mean_std_and_count():
  md = embedded_results.table(_rows())
  assert "| supervised | 55.0 ± 5.0 (n=3) | 2.0 min |" in md
  assert "| dgcl | 54.5 ± 7.8 (n=2) | 2.0 min |" in md


def test_paired_differences_use_matching_seeds_only():
  md = embedded_results.paired_table(_rows(), "supervised")
  # mean teacher - supervised per seed: +2, +1, +3 -> mean 2, std 1.
  assert "| mean_teacher − supervised | +2.0 ± 1.0 (n=3) |" in md
  # dgcl: -1, 0 -> mean -0.5, std 0.71; seed 2 has no dgcl run and is left out.
  assert "| dgcl − supervised | -0.5 ± 0.7 (n=2) |" in md
  assert "supervised − supervised" not in md


def test_replace_block_names_a_missing_marker(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb\n")
  embedded_results.replace_block(str(readme), "results", "new")
  assert readme.read_text() == "a\n<!-- results:begin -->\nnew\n<!-- results:end -->\nb\n"
  with pytest.raises(ValueError, match="ablations:begin"):
    embedded_results.replace_block(str(readme), "ablations", "x")
