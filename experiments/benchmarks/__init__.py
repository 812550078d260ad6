"""Benchmarks. The flags several of them share are defined here, once."""

from absl import flags

flags.DEFINE_string("out", None, "JSON output path (default: print only, unless the benchmark "
                    "names a default file in its docstring).")
flags.DEFINE_list("methods", ["supervised", "mean_teacher", "dgcl", "dssn"],
                  "Config names under experiments/configs/.")
flags.DEFINE_string("baseline", None,
                    "A git revision (e.g. 12589ec, the code before issue 17) to build and time "
                    "side by side with the working tree, where the benchmark supports it.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds (benchmarks that interleave).")
