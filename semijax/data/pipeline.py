"""grain input pipelines: one global batch per step, each process reading only its rows.

Determinism: shuffling and augmentation are functions of (seed, element index), so step t's
global batch is the same whatever the number of processes, workers or restarts. Process p
of P reads rows [p*b, (p+1)*b) of each global batch of G = P*b (a strided slice of the
batched dataset), which is exactly the order `jax.make_array_from_process_local_data`
assembles them in.
"""

from typing import Iterator, Optional

import grain
import numpy as np

from semijax.data import transforms


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by the {process_count} "
                     "processes")
  return global_batch // process_count


def train_dataset(source, *, global_batch: int, seed: int, augment: transforms.TrainAugment,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite shuffled, augmented, batched stream of this process's rows.

  Element t is this process's part of global step t's batch: a dict of stacked arrays
  `image` uint8 [b, S, S, 3], `label` uint8 [b, S, S], `pad` bool [b, S, S], `index` [b].
  """
  if len(source) == 0:
    raise ValueError(f"{source!r} is empty: nothing to train on")
  local = _local_batch(global_batch, process_count)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds.random_map(augment, seed=seed + 1)
  ds = ds.batch(local, drop_remainder=True)
  return ds[process_index::process_count]


def semi_dataset(labeled, unlabeled, *, labeled_batch: int, unlabeled_batch: int, seed: int,
                 augment: transforms.TrainAugment, unlabeled_augment=None,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Zips a labeled and an unlabeled stream: element t = {'labeled': ..., 'unlabeled': ...}.

  `unlabeled_augment` (default: `augment`) is the unlabeled stream's host transform, e.g. a
  method's own views of each image (`Method.unlabeled_transform`).
  """
  kwargs = dict(process_index=process_index, process_count=process_count)
  parts = {"labeled": train_dataset(labeled, global_batch=labeled_batch, seed=seed,
                                    augment=augment, **kwargs)}
  if unlabeled is not None and unlabeled_batch > 0:
    parts["unlabeled"] = train_dataset(unlabeled, global_batch=unlabeled_batch,
                                       seed=seed + 7919,
                                       augment=unlabeled_augment or augment, **kwargs)
  names = tuple(parts)
  # Both streams repeat forever, but batching divides grain's "infinite" length by each batch
  # size, and zipping needs equal lengths.
  length = min(len(p) for p in parts.values())
  zipped = grain.experimental.ZipMapDataset([parts[n][:length] for n in names])
  return zipped.map(_Name(names))


class _Name(grain.transforms.Map):
  """Turns a zipped tuple into a dict (a top-level class so grain workers can pickle it)."""

  def __init__(self, names):
    self.names = names

  def map(self, parts):
    return dict(zip(self.names, parts))


def iterate(ds: grain.MapDataset, *, num_workers: int = 0,
            prefetch: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator (`get_state`/`set_state`) over a MapDataset.

  At most `prefetch` elements (global-batch parts) are read ahead, by as many threads (in
  each worker process when `num_workers > 0`). grain's default read-ahead is 500 elements on
  16 threads: for one batch per element that is hundreds of batches held in memory, and on a
  small CPU host those threads slowed the tracing of the first train step about tenfold.
  """
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch),
                                            prefetch_buffer_size=max(1, prefetch)))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch))
  return iter(it)


def eval_batches(source, *, global_batch: int, size: Optional[tuple] = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Yields this process's rows of fixed-shape eval batches, padded with invalid rows.

  Every batch has `global_batch / P` rows; padded rows repeat record 0 with `valid=False`
  so that shapes stay static and no example is counted twice.
  """
  local = _local_batch(global_batch, process_count)
  n = len(source)
  num_batches = -(-n // global_batch)
  pad = transforms.EvalPad(size)
  for b in range(num_batches):
    rows = []
    for j in range(local):
      i = b * global_batch + process_index * local + j
      rec = pad.map(source[i if i < n else 0])
      rec["valid"] = np.bool_(i < n)
      rows.append(rec)
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
