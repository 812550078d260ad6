"""Methods as plugins: recipes, pseudo-label rules and extra terms, registered by name.

`get(name)` returns a method's class; `configure(config, name, ...)` merges its config
block, its rule's and its terms' into a run config (experiments/configs/<method>.py call it).
See `registry` for how a method registers itself and `teacher_student` for the structure
the teacher-student recipes share.
"""

from semijax.methods.configure import configure, reference_config, smoke
from semijax.methods.registry import get, get_rule, get_term, names, register

__all__ = ["configure", "get", "get_rule", "get_term", "names", "reference_config",
           "register", "smoke"]
