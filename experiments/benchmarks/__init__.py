"""Benchmarks. The flags several of them share are defined here, once."""

from absl import flags

flags.DEFINE_string("out", None, "JSON output path (default: print only, unless the benchmark "
                    "names a default file in its docstring).")
flags.DEFINE_list("methods", ["supervised", "mean_teacher", "dgcl", "dssn"],
                  "Config names under experiments/configs/.")
