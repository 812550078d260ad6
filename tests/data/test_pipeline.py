"""grain pipeline: deterministic per (seed, index), resumable, identical across processes."""

import numpy as np
import pytest

from semijax.data import embedded, pipeline, sources, transforms

AUG = transforms.TrainAugment(crop_size=24, scale_range=(0.75, 1.25), flip=True)


@pytest.fixture(scope="module")
def source():
  cfg = embedded.SceneConfig(canvas=32, num_train=48, num_val=8, digit_size=(14, 22))
  return embedded.make_sources(cfg)["train"]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_records_have_fixed_shapes_and_pad_is_ignore(source):
  ds = pipeline.train_dataset(source, global_batch=4, seed=0,
                              augment=transforms.TrainAugment(crop_size=40, scale_range=(1, 1)))
  batch = ds[0]
  assert batch["image"].shape == (4, 40, 40, 3) and batch["label"].shape == (4, 40, 40)
  assert batch["pad"].any() and np.all(batch["label"][batch["pad"]] == 255)


def test_iterator_state_resumes_exactly(source):
  ds = pipeline.semi_dataset(source, source, labeled_batch=4, unlabeled_batch=4, seed=1,
                             augment=AUG)
  it = pipeline.iterate(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  resumed = pipeline.iterate(ds)
  resumed.set_state(state)
  got = next(resumed)
  assert _equal(expected["labeled"], got["labeled"]) and _equal(expected["unlabeled"],
                                                                  got["unlabeled"])


@pytest.mark.parametrize("processes", [1, 2])
def test_labeled_and_unlabeled_batches_may_differ(source, processes):
  ds = pipeline.semi_dataset(source, source, labeled_batch=8, unlabeled_batch=4, seed=1,
                             augment=AUG, process_count=processes)
  step = ds[20]   # past an epoch of both streams
  assert step["labeled"]["image"].shape[0] == 8 // processes
  assert step["unlabeled"]["image"].shape[0] == 4 // processes


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_concatenate_to_the_single_process_batch(source, processes):
  single = pipeline.train_dataset(source, global_batch=8, seed=2, augment=AUG)
  shards = [pipeline.train_dataset(source, global_batch=8, seed=2, augment=AUG,
                                   process_index=p, process_count=processes)
            for p in range(processes)]
  for step in (0, 7, 30):  # 30 batches of 8 > 48 images: crosses an epoch boundary
    parts = [s[step] for s in shards]
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert _equal(single[step], whole)


def test_epochs_are_reshuffled(source):
  ds = pipeline.train_dataset(source, global_batch=48, seed=3, augment=AUG)
  assert not np.array_equal(ds[0]["index"], ds[1]["index"])
  assert sorted(ds[0]["index"]) == sorted(ds[1]["index"]) == list(range(48))


def test_eval_batches_pad_with_invalid_rows(source):
  batches = list(pipeline.eval_batches(source, global_batch=20))
  assert [b["image"].shape[0] for b in batches] == [20, 20, 20]
  assert sum(int(b["valid"].sum()) for b in batches) == 48
  two = [list(pipeline.eval_batches(source, global_batch=20, process_index=p, process_count=2))
         for p in range(2)]
  for b, (p0, p1) in zip(batches, zip(*two)):
    np.testing.assert_array_equal(b["index"], np.concatenate([p0["index"], p1["index"]]))
    np.testing.assert_array_equal(b["valid"], np.concatenate([p0["valid"], p1["valid"]]))


def test_empty_source_is_an_error():
  empty = sources.ArraySource(np.zeros((0, 4, 4, 3), np.uint8), None, embedded.INFO)
  with pytest.raises(ValueError, match="empty"):
    pipeline.train_dataset(empty, global_batch=2, seed=0, augment=AUG)


def test_batch_not_divisible_by_processes_is_an_error(source):
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_dataset(source, global_batch=6, seed=0, augment=AUG, process_count=4)
