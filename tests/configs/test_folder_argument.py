"""`dataset=folder` and `root=` in the config argument, like the other datasets (issue 18)."""

import pytest

from experiments.configs import dgcl, dssn, mean_teacher, supervised


@pytest.mark.parametrize("module", [supervised, mean_teacher, dgcl, dssn])
def test_every_method_takes_a_folder(module):
  c = module.get_config("dataset=folder,root=/data/my_set,split=1/8,seed=2")
  assert (c.data.dataset, c.data.root, c.data.split, c.seed) == ("folder", "/data/my_set",
                                                                  "1/8", 2)
  assert c.recipe.global_batch == 0   # no published recipe is claimed for custom data
  smoke = module.get_config("dataset=folder,root=/d,split=explicit,smoke")
  assert smoke.data.split == "explicit" and smoke.train.total_steps == 4


@pytest.mark.parametrize("arg,message", [
    ("dataset=folder,split=1/8", "dataset=folder needs root="),
    ("dataset=folder,root=/d,protocol=cps", "protocol= applies to dataset=voc|cityscapes"),
    ("dataset=folder,root=/d,split=1/0", r"split='1/0'; expected a fraction like 1/16"),
    ("dataset=nope", "valid: embedded, voc, cityscapes, folder"),
    ("root=/d", "protocol= and root= apply to dataset=voc|cityscapes|folder"),
])
def test_bad_folder_arguments_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    mean_teacher.get_config(arg)
