"""NumPy references shared by several test modules (written from the papers' equations)."""

from typing import Optional, Sequence

import numpy as np


def np_density(queries: np.ndarray, bank: np.ndarray, bank_valid: Optional[np.ndarray] = None,
               ks: Sequence[int] = (8, 16, 32)) -> np.ndarray:
  """DGCL eqs. 7-8 by brute force: mean cosine similarity to the k most similar valid bank
  entries, averaged over ks; min(k, n_valid) neighbours, 0 with an empty bank."""
  q = queries.astype(np.float64)
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  b = bank.astype(np.float64) if bank_valid is None else bank[bank_valid].astype(np.float64)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  sims = -np.sort(-(q @ b.T), axis=1)
  out = np.zeros(len(q))
  for k in ks:
    kk = min(k, len(b))
    if kk:
      out += sims[:, :kk].mean(1)
  return out / len(ks)
