"""Alonso et al.'s class-wise memory bank: per-class FIFO of high-quality labeled projections.

At every step the teacher's projections z' = g_xi(f_xi(x_l)) of the labeled images are
candidates. The feature quality filter (FQF, `quality_mask`) keeps a pixel when the
teacher's prediction there equals the label and its confidence exceeds phi = 0.95. The
candidates of each image and class are ranked by the teacher's attention score
R_c = S_{c,xi}(z') and the K highest-scoring are inserted (`push`), K = max(1, psi / |X_l|)
(`per_image_count`); each class keeps its psi = 256 newest entries (FIFO).

The bank is a `semijax.banks.fifo.ClassBank` with one field, `projection` `[C, psi, D]`, so it
lives in the train state, is checkpointed and replicated like every bank. `from_entries`
builds one from given contents (tests, a user's own features).
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semijax import collectives, ops
from semijax.banks import fifo

PROJECTION = "projection"
SCOPES = ("image", "batch")
COUNT_RULES = ("paper", "voc_official", "cityscapes_official")


def init_bank(num_classes: int, size: int = 256, dim: int = 256,
              dtype: jnp.dtype = jnp.float32) -> fifo.ClassBank:
  """An empty bank: `projection` `[C, size, dim]` (psi = 256, D = 256 in the paper)."""
  return fifo.init(num_classes, size, {PROJECTION: ((dim,), dtype)})


def from_entries(entries: Sequence[np.ndarray], size: int, *,
                 dtype: jnp.dtype = jnp.float32) -> fifo.ClassBank:
  """A bank holding given entries, as if they had been pushed in order (oldest first).

  Args:
    entries: one `[n_c, D]` array per class (n_c may be 0); if n_c > size only the last
      `size` rows are kept, as a FIFO would.
    size: psi, capacity per class.
    dtype: storage dtype.

  Returns:
    A `ClassBank` with `count = min(n_c, size)`.
  """
  dims = {np.asarray(e).shape[-1] for e in entries if np.asarray(e).ndim == 2}
  if len(dims) != 1:
    raise ValueError(f"entries must be [n_c, D] arrays with one D, got dims {sorted(dims)}")
  dim = dims.pop()
  n = max(max(np.asarray(e).shape[0] for e in entries), 1)
  block = np.zeros((len(entries), n, dim), np.float32)
  valid = np.zeros((len(entries), n), bool)
  for c, e in enumerate(entries):
    e = np.asarray(e, np.float32).reshape(-1, dim)
    block[c, :len(e)] = e
    valid[c, :len(e)] = True
  return fifo.write(init_bank(len(entries), size, dim, dtype), {PROJECTION: block}, valid)


def per_image_count(bank_size: int, num_labeled: int, *, rule: str = "paper",
                    num_classes: int = 0) -> int:
  """K, the entries each labeled image adds per class and step.

  * 'paper': max(1, psi / |X_l|), rounded to the nearest integer (psi / |X_l| is rarely one).
  * 'cityscapes_official': max(1, int(round(psi / N_l))).
  * 'voc_official': max(1, int(C / 3 * round(psi / N_l))) (VOC images hold ~3 classes; gives 1
    for 1323 labels, 7 for 212 and 1 for 530, since round(0.48) = 0).
  """
  if num_labeled < 1:
    raise ValueError(f"num_labeled must be >= 1, got {num_labeled}")
  if rule in ("paper", "cityscapes_official"):
    return max(1, int(round(bank_size / num_labeled)))
  if rule == "voc_official":
    if num_classes < 1:
      raise ValueError("rule='voc_official' needs num_classes")
    return max(1, int(num_classes / 3 * round(bank_size / num_labeled)))
  raise ValueError(f"rule={rule!r}; expected one of {COUNT_RULES}")


def quality_mask(predicted: jax.typing.ArrayLike, confidence: jax.typing.ArrayLike,
                 labels: jax.typing.ArrayLike, *, threshold: float = 0.95,
                 ignore_index: int = ops.IGNORE_INDEX) -> jax.Array:
  """The feature quality filter: the teacher predicts the label with confidence > phi.

  Args:
    predicted: `[...]` int teacher argmax (at feature resolution).
    confidence: `[...]` its max probability.
    labels: `[...]` int ground truth (`ignore_index` never passes).
    threshold: phi (0.95); strict `>` as the official code.

  Returns:
    `[...]` bool.
  """
  labels = jnp.asarray(labels)
  return ((jnp.asarray(predicted) == labels) & (jnp.asarray(confidence) > threshold)
          & (labels != ignore_index))


def push(bank: fifo.ClassBank, projections: jax.typing.ArrayLike, labels: jax.typing.ArrayLike,
         valid: jax.typing.ArrayLike, scores: Optional[jax.typing.ArrayLike] = None,
         rng: Optional[jax.Array] = None, *, per_image: int = 1, scope: str = "image",
         axis_name: Optional[str] = None) -> fifo.ClassBank:
  """Inserts the top-K candidates of each image and class (or of each class, `scope='batch'`).

  Candidates are the `valid` pixels (e.g. `quality_mask`) with a label in [0, C). With
  `scores` the K highest-scoring candidates of each (image, class) are kept (the paper's
  "top-K highest-scoring"; the official code sorts ascending and keeps the lowest, a bug we
  do not copy); without, K at random (no attention module). An image with fewer candidates
  gives all of them. Items are written FIFO, image by image, highest score first.

  `scope='batch'` is the official selection: the `B * per_image` highest-scoring candidates
  of each class over the whole batch, whatever image they come from.

  Args:
    bank: from `init_bank` (field `projection`).
    projections: `[B, ..., D]` candidate vectors (e.g. `[B, h, w, D]`); no gradient.
    labels: `[B, ...]` int classes.
    valid: `[B, ...]` bool candidates.
    scores: optional `[B, ...]` ranking scores (higher = inserted first).
    rng: PRNG key, needed without `scores`.
    per_image: K.
    scope: 'image' (paper, default) or 'batch' (official).
    axis_name: inside `pmap`/`shard_map`: the candidates of every device are gathered (as
      constants; images keep their global order) and every device writes the same items,
      so banks stay identical.

  Returns:
    The updated bank.
  """
  if scope not in SCOPES:
    raise ValueError(f"scope={scope!r}; expected one of {SCOPES}")
  if per_image < 1:
    raise ValueError(f"per_image must be >= 1, got {per_image}")
  if scores is None and rng is None:
    raise ValueError("push needs `scores` (attention ranking) or `rng` (random choice)")
  projections = jnp.asarray(projections)
  b = projections.shape[0]
  dim = projections.shape[-1]
  pixels = math.prod(projections.shape[1:-1])
  gather = lambda x: collectives.all_gather(x, axis_name, differentiable=False)  # noqa: E731
  proj = gather(projections.reshape(b, pixels, dim)).reshape(-1, dim)
  y = gather(jnp.asarray(labels).reshape(b, pixels).astype(jnp.int32)).reshape(-1)
  v = gather(jnp.asarray(valid, bool).reshape(b, pixels)).reshape(-1)
  s = None if scores is None else gather(
      jnp.asarray(scores, jnp.float32).reshape(b, pixels)).reshape(-1)
  if rng is not None:
    rng = collectives.same_rng(rng, axis_name)
  images = proj.shape[0] // pixels
  c = bank.num_classes
  v = v & (y >= 0) & (y < c)
  if scope == "image":
    image = jnp.arange(images * pixels, dtype=jnp.int32) // pixels
    group = jnp.where(v, image * c + y, images * c)
    idx, ok = fifo.select_per_class(group, v, rng, num_classes=images * c,
                                    max_per_class=per_image, scores=s)
    # [B C, K] -> [C, B K]: a class's row holds image 0's K items, then image 1's, ...
    idx = idx.reshape(images, c, per_image).transpose(1, 0, 2).reshape(c, images * per_image)
    ok = ok.reshape(images, c, per_image).transpose(1, 0, 2).reshape(c, images * per_image)
  else:
    idx, ok = fifo.select_per_class(y, v, rng, num_classes=c,
                                    max_per_class=images * per_image, scores=s)
  return fifo.write(bank, {PROJECTION: jnp.take(proj, idx, axis=0)}, ok)
